"""Streaming orchestration: video -> latent file, latent file -> video, and the round trip.

Reading the input (FrameReader's decoder thread), model work (this thread) and writing the output
(a BackgroundStage thread) overlap through bounded queues, so memory stays flat however long the
clip. Per-frame latency is measured as DESIGN.md defines it: for encoding, from a decoded frame
being available to this thread to its latent being written; for decoding, from a latent frame
being read to its video frame being encoded.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .cache import CacheStats
from .coder import CoderOptions, FrameDecoder, FrameEncoder
from .latents import LatentReader, LatentWriter, check_compatible
from .models import Autoencoder, load_model
from .models.accel import accelerate
from .quality import psnr, ssim
from .stages import BackgroundStage, now, peak_host_mb, progress
from .video import FrameReader, VideoWriter, probe_video


@dataclass
class RunReport:
    """What a run did: frame count, wall time, per-frame latency (ms), cache hits, memory."""

    frames: int = 0
    seconds: float = 0.0
    latency_ms: list[float] = field(default_factory=list)
    cache_hit_rate: float = 0.0
    cache_per_frame: list[float] = field(default_factory=list)
    flop_fraction: float | None = None  # fraction of the dense model's FLOPs that ran (sparse cache)
    flops_per_frame: list[float] = field(default_factory=list)
    fp32_fallbacks: int = 0
    peak_host_mb: float = 0.0
    peak_device_mb: float | None = None
    tile: int | None = None
    overlap: int = 0
    norm: str = "tile"
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latency_ms, q)) if self.latency_ms else 0.0

    def summary(self) -> dict:
        per_frame = ("latency_ms", "cache_per_frame", "flops_per_frame", "psnr", "ssim")
        out = {k: v for k, v in asdict(self).items() if k not in per_frame}
        out.update(fps=self.fps, p50_ms=self.percentile(50), p95_ms=self.percentile(95), p99_ms=self.percentile(99))
        if self.psnr:
            out.update(mean_psnr=float(np.mean(self.psnr)), mean_ssim=float(np.mean(self.ssim)))
        return out


def _finish(report: RunReport, start: float, coder, model: Autoencoder, stats: CacheStats) -> RunReport:
    report.seconds = now() - start
    report.cache_hit_rate, report.cache_per_frame = stats.hit_rate, list(stats.per_frame)
    if hasattr(stats, "flop_fraction"):  # the sparse cache counts the FLOPs of the blocks it ran
        report.flop_fraction, report.flops_per_frame = stats.flop_fraction, list(stats.flops_per_frame)
    report.fp32_fallbacks = model.fp32_fallbacks
    report.peak_host_mb = peak_host_mb()
    if model.device.type == "cuda":
        report.peak_device_mb = torch.cuda.max_memory_allocated(model.device) / 2**20
    report.tile, report.overlap = coder.plan.tile, coder.plan.overlap
    report.norm = "global" if coder.global_norm else "tile"
    return report


def _model(model: Autoencoder | str | os.PathLike, device, dtype) -> Autoencoder:
    if isinstance(model, Autoencoder):
        return model
    return accelerate(load_model(model, device=device, dtype=dtype))  # channels_last etc. on CUDA


def _check_output(path: Path) -> None:
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the output folder {path.parent} does not exist")


def encode_video(src: str | os.PathLike, dst: str | os.PathLike, model: Autoencoder | str = "default", *,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, options: CoderOptions | None = None,
                 start: int = 0, end: int | None = None, stride: int = 1, batch: int = 8,
                 latent_dtype: torch.dtype = torch.float16, quiet: bool = True) -> RunReport:
    """Encode frames ``start:end:stride`` of the video ``src`` to the latent file ``dst``.

    The latent file is written under a temporary name and renamed when complete: an interrupted
    or failed run leaves nothing at ``dst``.
    """
    dst = Path(dst)
    _check_output(dst)
    model = _model(model, device, dtype)
    reader = FrameReader(src, start=start, end=end, stride=stride, batch=batch)
    info = reader.info
    encoder = FrameEncoder(model, info.height, info.width, options)
    f = model.downscale
    meta = {
        "model_id": model.name, "model_source": model.source, "family": model.family,
        "scaling_factor": model.scaling_factor, "shift_factor": model.shift_factor,
        "fps": Fraction(info.fps) / stride, "time_base": info.time_base,
        "source_width": info.width, "source_height": info.height,
        "pad_bottom": encoder.padding[0], "pad_right": encoder.padding[1],
        "source_file": Path(src).name, "start": start, "stride": stride, "tool": f"codec {__version__}",
    }
    total = _frame_count(info.num_frames, start, end, stride)
    report = RunReport()
    bar = progress(total, "encode", quiet)
    t0 = now()
    with reader, LatentWriter(dst, (model.latent_channels, encoder.h8 // f, encoder.w8 // f),
                              latent_dtype, meta, frames_hint=total) as writer:

        def write(item):
            latents, pts, ready = item
            writer.write(latents, pts)
            done = now()
            report.latency_ms.extend((done - r) * 1000 for r in ready)
            bar.update(len(pts))

        def work(fb):
            ready = [now()] * len(fb)
            report.frames += len(fb)
            return encoder(fb.frames).to("cpu", latent_dtype), fb.pts, ready

        _pump(reader, work, write, "latent-writer", bar)
        if report.frames == 0:
            raise ValueError(f"{src}: no frames selected (start={start}, end={end}, stride={stride})")
    return _finish(report, t0, encoder, model, encoder.stats)


def decode_video(src: str | os.PathLike, dst: str | os.PathLike, model: Autoencoder | str | None = None, *,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, options: CoderOptions | None = None,
                 crf: int = 18, preset: str = "medium", lossless: bool = False, batch: int = 8,
                 verify: bool = True, quiet: bool = True) -> RunReport:
    """Decode the latent file ``src`` to the video ``dst`` (H.264). ``model`` None: the model
    recorded in the file. Refuses a model whose family or latent channels differ."""
    dst = Path(dst)
    _check_output(dst)
    reader = LatentReader(src, batch=batch)
    meta = reader.metadata
    if verify:
        reader.verify()
    if model is None:
        model = meta.get("model_source") or meta["model_id"]
        try:
            model = _model(model, device, dtype)
        except ValueError as e:
            raise ValueError(f"{src}: the model recorded in the file ({meta['model_id']}) could not be "
                             f"loaded; pass --model ({e})") from None
    else:
        model = _model(model, device, dtype)
    check_compatible(meta, model.latent_channels, model.family, model.name)
    height, width = int(meta["source_height"]), int(meta["source_width"])
    decoder = FrameDecoder(model, height, width, options)
    if decoder.h8 // model.downscale != reader.shape[2] or decoder.w8 // model.downscale != reader.shape[3]:
        raise ValueError(f"{src}: latents of {reader.shape[2]}x{reader.shape[3]} do not fit a "
                         f"{width}x{height} source at {model.downscale}x")
    report = RunReport()
    bar = progress(reader.num_frames, "decode", quiet)
    t0 = now()
    clock = OutputClock(reader.fps, reader.time_base)
    with VideoWriter(dst, width, height, reader.fps, crf=crf, preset=preset, lossless=lossless,
                     time_base=clock.time_base) as out:

        def write(item):
            frames, pts, ready = item
            out.write(frames, clock(pts))
            done = now()
            report.latency_ms.extend((done - r) * 1000 for r in ready)
            bar.update(len(pts))

        def work(item):
            latents, pts = item
            ready = [now()] * len(pts)
            report.frames += len(pts)
            return decoder(latents.float()).cpu().numpy(), pts.numpy(), ready

        _pump(reader, work, write, "video-writer", bar)
    return _finish(report, t0, decoder, model, decoder.stats)


def roundtrip_video(src: str | os.PathLike, dst: str | os.PathLike, model: Autoencoder | str = "default", *,
                    device: str = "cpu", dtype: torch.dtype = torch.float32, options: CoderOptions | None = None,
                    start: int = 0, end: int | None = None, stride: int = 1, batch: int = 8,
                    crf: int = 18, preset: str = "medium", lossless: bool = False,
                    quiet: bool = True) -> tuple[RunReport, RunReport]:
    """Encode and decode in one stream, writing ``dst`` and measuring PSNR/SSIM per frame of the
    decoded frames against the source frames (before any video-codec loss of ``dst``).
    Returns the (encode, decode) reports; quality is in the decode report."""
    dst = Path(dst)
    _check_output(dst)
    model = _model(model, device, dtype)
    reader = FrameReader(src, start=start, end=end, stride=stride, batch=batch)
    info = reader.info
    encoder = FrameEncoder(model, info.height, info.width, options)
    decoder = FrameDecoder(model, info.height, info.width, options)
    enc, dec = RunReport(), RunReport()
    bar = progress(_frame_count(info.num_frames, start, end, stride), "roundtrip", quiet)
    t0 = now()
    clock = OutputClock(Fraction(info.fps) / stride, info.time_base)
    with reader, VideoWriter(dst, info.width, info.height, clock.fps, crf=crf, preset=preset,
                             lossless=lossless, time_base=clock.time_base) as out:

        def write(item):
            frames, pts = item
            out.write(frames, clock(pts))
            bar.update(len(pts))

        def work(fb):
            t_in = now()
            latents = encoder(fb.frames)
            t_mid = now()
            frames = decoder(latents).cpu().numpy()
            t_out = now()
            enc.latency_ms.extend([(t_mid - t_in) * 1000] * len(fb))
            dec.latency_ms.extend([(t_out - t_mid) * 1000] * len(fb))
            dec.psnr.extend(np.atleast_1d(psnr(frames, fb.frames)).tolist())
            dec.ssim.extend(np.atleast_1d(ssim(frames, fb.frames)).tolist())
            enc.frames += len(fb)
            dec.frames += len(fb)
            return frames, fb.pts

        _pump(reader, work, write, "video-writer", bar)
    _finish(enc, t0, encoder, model, encoder.stats)
    _finish(dec, t0, decoder, model, decoder.stats)
    return enc, dec


class OutputClock:
    """Timestamps for the output video, so that it reports the source's frame rate exactly.

    When the time base counts a whole number of ticks per frame (1/90000 at 30000/1001 fps),
    pts pass through unchanged. Otherwise (1/1000 at 24 fps, as WebM stores it) the output
    uses one tick per frame, 1/fps, and each pts is snapped to the nearest frame slot (kept
    increasing): exact for constant-frame-rate sources, nearest-slot for variable ones.
    """

    def __init__(self, fps: Fraction, time_base: Fraction):
        self.fps, self.source_base = Fraction(fps), Fraction(time_base)
        self.keep = (1 / (self.fps * self.source_base)).denominator == 1
        self.time_base = self.source_base if self.keep else 1 / self.fps
        self._last: int | None = None

    def __call__(self, pts) -> np.ndarray:
        pts = np.asarray(pts, dtype=np.int64).reshape(-1)
        if self.keep:
            return pts
        out = []
        for p in pts.tolist():
            slot = round(p * self.source_base * self.fps)
            if self._last is not None and slot <= self._last:
                slot = self._last + 1
            self._last = slot
            out.append(slot)
        return np.asarray(out, dtype=np.int64)


def _pump(source, work, write, name: str, bar) -> None:
    """For each item of ``source``: ``work`` here, then ``write`` on a background thread (bounded
    queue). Any failure stops both and is raised; the bar is closed either way."""
    stage = BackgroundStage(write, size=4, name=name)
    try:
        for item in source:
            stage.put(work(item))
        stage.close()
    except BaseException:
        stage.abort()
        raise
    finally:
        bar.close()


def _frame_count(total: int | None, start: int, end: int | None, stride: int) -> int | None:
    last = end if end is not None else total
    if last is None:
        return None
    if total is not None:
        last = min(last, total)
    return max(0, -(-(last - start) // stride))


def write_json(path: str | os.PathLike, data: dict) -> None:
    path = Path(path)
    _check_output(path)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def plot_quality(path: str | os.PathLike, report: RunReport, title: str) -> None:
    """PSNR and SSIM per frame over the clip, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    _check_output(path)
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    a.plot(report.psnr, lw=1)
    a.set_ylabel("PSNR (dB)")
    a.set_title(title)
    b.plot(report.ssim, lw=1, color="tab:orange")
    b.set_ylabel("SSIM")
    b.set_xlabel("frame")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe_latents(path: str | os.PathLike) -> dict:
    """Metadata, shape, frame count, duration and size of a latent file (for ``codec info``)."""
    with LatentReader(path) as r:
        fps = r.fps
        return {
            "file": str(path), "size_bytes": Path(path).stat().st_size, "shape": list(r.shape),
            "frames": r.num_frames, "dtype": str(r.dtype).removeprefix("torch."),
            "duration_s": float(r.num_frames / fps) if fps else None, **r.metadata,
        }


def describe_video(path: str | os.PathLike) -> dict:
    info = probe_video(path)
    d = asdict(info)
    d.update(fps=str(info.fps), time_base=str(info.time_base), size_bytes=Path(path).stat().st_size)
    return d
