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
import warnings
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .cache import CacheStats
from .coder import CoderOptions, FrameDecoder, FrameEncoder
from .latents import LatentReader, LatentWriter, check_compatible
from .models import PRESETS, Autoencoder, load_model, weights_digest
from .models.accel import accelerate
from .models.video_autoencoder import VideoAutoencoder
from .outputs import PLOT_SUFFIXES, check_output, model_files
from .quality import psnr, ssim
from .stages import BackgroundStage, now, peak_host_mb, progress
from .video import FrameReader, VideoWriter, probe_video


@dataclass
class RunReport:
    """What a run did: frame count, wall time, per-frame latency (ms), cache hits, memory.
    missing_frames: frames the source's container states that did not decode (a truncated
    source read with ``allow_short``)."""

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
    tile_waste: float = 1.0  # pixels of a frame's tiles / the frame's pixels (1.0: none computed twice)
    overlap: int = 0
    norm: str = "tile"
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    missing_frames: int = 0

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


def _finish(report: RunReport, start: float, coder, model: Autoencoder, stats: CacheStats | None = None,
            norm: str | None = None) -> RunReport:
    """Fill in the run-wide figures: time, cache (``stats``, when the coder caches), memory, tiling;
    ``norm`` names the normalization when the coder's ``global_norm`` does not describe it."""
    report.seconds = now() - start
    if stats is not None:
        report.cache_hit_rate, report.cache_per_frame = stats.hit_rate, list(stats.per_frame)
    if hasattr(stats, "flop_fraction"):  # the sparse cache counts the FLOPs of the blocks it ran
        report.flop_fraction, report.flops_per_frame = stats.flop_fraction, list(stats.flops_per_frame)
    report.fp32_fallbacks = model.fp32_fallbacks
    report.peak_host_mb = peak_host_mb()
    if model.device.type == "cuda":
        report.peak_device_mb = torch.cuda.max_memory_allocated(model.device) / 2**20
    report.tile, report.overlap, report.tile_waste = coder.plan.tile, coder.plan.overlap, coder.layout.waste
    report.norm = norm or ("global" if coder.global_norm else "tile")
    return report


def _model(model: Autoencoder | str | os.PathLike, device, dtype) -> Autoencoder:
    if isinstance(model, (Autoencoder, VideoAutoencoder)):
        return model
    model = load_model(model, device=device, dtype=dtype)
    return model if isinstance(model, VideoAutoencoder) else accelerate(model)  # channels_last etc. on CUDA


IN_MEMORY = "in-memory"  # model_id of a model that was not loaded from weights (nothing reloads it)


def model_identity(model: Autoencoder) -> dict[str, str]:
    """Latent-file metadata that names ``model`` portably: ``model_id`` (``default``, a preset,
    a hub repo id or an absolute path: what ``load_model`` reloads from any working directory),
    ``model_sha256`` (its weights' content hash) and ``model_name`` (its config's name)."""
    return {"model_id": model.model_id or IN_MEMORY, "model_sha256": weights_digest(model),
            "model_name": model.name}


def recorded_model(meta: dict[str, str], src, device, dtype) -> Autoencoder:
    """The model a latent file records, loaded again; refused (ValueError) when it cannot be
    loaded or its weights are no longer the ones that encoded the file."""
    model_id, digest, name = meta.get("model_id"), meta.get("model_sha256"), meta.get("model_name")
    if not digest or not model_id or model_id == IN_MEMORY:
        why = "a model that was not loaded from weights" if model_id == IN_MEMORY else "no model identity"
        raise ValueError(f"{src}: the file records {why} (model {model_id}); pass --model")
    # A convention that came from a preset (a single-file KL or Wan model named with --preset) needs it again.
    preset_name = name if name in PRESETS and all(
        meta.get(k) is not None and float(meta[k]) == getattr(PRESETS[name], k)
        for k in ("scaling_factor", "shift_factor")) else None
    try:
        model = accelerate(load_model(model_id, device=device, dtype=dtype, preset_name=preset_name))
    except ValueError as e:
        raise ValueError(f"{src}: the model recorded in the file ({model_id}) could not be loaded; "
                         f"pass --model ({e})") from None
    if weights_digest(model) != digest:
        raise ValueError(f"{src}: the model recorded in the file ({model_id}) has other weights now "
                         f"(sha256 {weights_digest(model)[:16]}, the file's {digest[:16]}); "
                         "pass --model to decode with another model")
    return model


def clip_metadata(model, src, info, padding: tuple[int, int], start: int, stride: int,
                  extra: dict[str, str] | None = None) -> dict:
    """What a latent file records of an encode: the model's identity and latent convention, the
    source's geometry, rate and rotation, the frames taken, and ``extra`` (e.g. a dataset key).
    ``container_frames`` is the frame count the source's container states, when it states one."""
    meta = {
        **model_identity(model), "family": model.family,
        "scaling_factor": model.scaling_factor, "shift_factor": model.shift_factor,
        "fps": Fraction(info.fps) / stride, "time_base": info.time_base,
        "source_width": info.width, "source_height": info.height,
        "pad_bottom": padding[0], "pad_right": padding[1],
        "source_file": Path(src).name, "start": start, "stride": stride, "tool": f"codec {__version__}",
        "rotation": info.rotation,
    }
    if info.num_frames is not None:
        meta["container_frames"] = info.num_frames
    return {**meta, **(extra or {})}


def _check_output(dst, src=None, model=None, suffixes=None) -> Path:
    """``dst`` as a Path if it may be written: not ``src``, not a file of ``model``, a regular
    file path in an existing folder (``codec.outputs.check_output``)."""
    return check_output(dst, inputs=[src, *model_files(model)], suffixes=suffixes)


def encode_video(src: str | os.PathLike, dst: str | os.PathLike, model: Autoencoder | str = "default", *,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, options: CoderOptions | None = None,
                 start: int = 0, end: int | None = None, stride: int = 1, batch: int = 8,
                 latent_dtype: torch.dtype = torch.float16, allow_short: bool = False,
                 quiet: bool = True, metadata: dict[str, str] | None = None) -> RunReport:
    """Encode frames ``start:end:stride`` of the video ``src`` to the latent file ``dst``.

    The latent file is written under a temporary name and renamed when complete: an interrupted
    or failed run leaves nothing at ``dst``. A source that decodes short of the frame count its
    container states is an error, unless ``allow_short`` (then ``missing_frames`` of the report
    counts them; the file records the container's count as ``container_frames``). The source's
    display rotation is recorded as ``rotation`` (degrees counter-clockwise). ``metadata``: extra
    entries recorded in the file (e.g. the cache key of ``codec dataset``); they do not change the latents.
    """
    dst = _check_output(dst, src, model)
    model = _model(model, device, dtype)
    _check_output(dst, src, model)  # the loaded model's own files (a preset resolves to a folder)
    if isinstance(model, VideoAutoencoder):  # causal video VAE: the temporal coder
        from .video_pipeline import encode_clip

        return encode_clip(src, dst, model, options=options, start=start, end=end, stride=stride, batch=batch,
                           latent_dtype=latent_dtype, allow_short=allow_short, quiet=quiet, metadata=metadata)
    reader = FrameReader(src, start=start, end=end, stride=stride, batch=batch, allow_short=allow_short)
    info = reader.info
    encoder = FrameEncoder(model, info.height, info.width, options)
    f = model.downscale
    meta = clip_metadata(model, src, info, encoder.padding, start, stride, metadata)
    total = _frame_count(info.num_frames, start, end, stride)
    report = RunReport()
    bar = progress(total, "encode", quiet)
    t0 = now()
    with reader, LatentWriter(dst, (model.latent_channels, encoder.h8 // f, encoder.w8 // f),
                              latent_dtype, meta, frames_hint=total) as writer:

        def write(item):
            latents, pts, ready = item
            writer.write(latents.wait(), pts)
            done = now()
            report.latency_ms.extend((done - r) * 1000 for r in ready)
            bar.update(len(pts))

        def work(fb):
            ready = [now()] * len(fb)
            report.frames += len(fb)
            return encoder.submit(fb.frames).to_host(latent_dtype), fb.pts, ready

        _pump(reader, work, write, "latent-writer", bar)
        if report.frames == 0:
            raise ValueError(f"{src}: no frames selected (start={start}, end={end}, stride={stride})")
    report.missing_frames = reader.missing_frames
    return _finish(report, t0, encoder, model, encoder.stats)


def decode_video(src: str | os.PathLike, dst: str | os.PathLike, model: Autoencoder | str | None = None, *,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, options: CoderOptions | None = None,
                 crf: int = 18, preset: str = "medium", lossless: bool = False, batch: int = 8,
                 verify: bool = True, quiet: bool = True, force_convention: bool = False) -> RunReport:
    """Decode the latent file ``src`` to the video ``dst`` (H.264). ``model`` None: the model
    recorded in the file (``recorded_model``). Refuses a model whose latent channels differ, and
    one whose family, scaling or shift differ unless ``force_convention`` (then it warns and
    decodes with the model's convention)."""
    dst = _check_output(dst, src, model, VideoWriter.SUFFIXES)
    reader = LatentReader(src, batch=batch)
    meta = reader.metadata
    if verify:
        reader.verify()
    if model is None:
        model = recorded_model(meta, src, device, dtype)
    else:
        model = _model(model, device, dtype)
    _check_output(dst, src, model)  # the loaded model's own files (a preset resolves to a folder)
    forced = check_compatible(meta, model.latent_channels, model.family, model.model_id or model.name,
                              model.scaling_factor, model.shift_factor, force=force_convention)
    if forced:
        warnings.warn(f"{src}: --force-convention: decoding with the model's latent convention although the "
                      f"file's differs ({'; '.join(forced)})", RuntimeWarning, stacklevel=2)
    if meta.get("model_sha256") not in (None, weights_digest(model)):
        warnings.warn(f"{src}: decoding with other weights than those that encoded it ({meta.get('model_id')}); "
                      "expected for a fine-tuned decoder", RuntimeWarning, stacklevel=2)
    if isinstance(model, VideoAutoencoder):  # causal video VAE: the temporal coder
        from .video_pipeline import decode_clip

        return decode_clip(reader, dst, model, options=options, crf=crf, preset=preset, lossless=lossless,
                           quiet=quiet)
    height, width = int(meta["source_height"]), int(meta["source_width"])
    decoder = FrameDecoder(model, height, width, options)
    check_fit(reader, decoder, model.downscale)
    report = RunReport()
    bar = progress(reader.num_frames, "decode", quiet)
    t0 = now()
    clock = OutputClock(reader.fps, reader.time_base)
    with VideoWriter(dst, width, height, reader.fps, crf=crf, preset=preset, lossless=lossless,
                     time_base=clock.time_base, rotation=_recorded_rotation(src, meta)) as out:

        def write(item):
            frames, pts, ready = item
            out.write(frames.wait().numpy(), clock(pts.numpy()))
            done = now()
            report.latency_ms.extend((done - r) * 1000 for r in ready)
            bar.update(len(pts))

        def work(item):
            latents, pts = item
            ready = [now()] * len(pts)
            report.frames += len(pts)
            return decoder.submit(latents.float()).to_host(), pts, ready

        _pump(reader, work, write, "video-writer", bar)
    return _finish(report, t0, decoder, model, decoder.stats)


def roundtrip_video(src: str | os.PathLike, dst: str | os.PathLike, model: Autoencoder | str = "default", *,
                    device: str = "cpu", dtype: torch.dtype = torch.float32, options: CoderOptions | None = None,
                    start: int = 0, end: int | None = None, stride: int = 1, batch: int = 8,
                    crf: int = 18, preset: str = "medium", lossless: bool = False,
                    allow_short: bool = False, quiet: bool = True) -> tuple[RunReport, RunReport]:
    """Encode and decode in one stream, writing ``dst`` and measuring PSNR/SSIM per frame of the
    decoded frames against the source frames (before any video-codec loss of ``dst``).
    Returns the (encode, decode) reports; quality is in the decode report. ``dst`` keeps the
    source's rotation; ``allow_short`` as for :func:`encode_video`."""
    dst = _check_output(dst, src, model, VideoWriter.SUFFIXES)
    model = _model(model, device, dtype)
    _check_output(dst, src, model)  # the loaded model's own files (a preset resolves to a folder)
    if isinstance(model, VideoAutoencoder):  # causal video VAE: the temporal coder
        from .video_pipeline import roundtrip_clip

        return roundtrip_clip(src, dst, model, options=options, start=start, end=end, stride=stride, batch=batch,
                              crf=crf, preset=preset, lossless=lossless, allow_short=allow_short, quiet=quiet)
    reader = FrameReader(src, start=start, end=end, stride=stride, batch=batch, allow_short=allow_short)
    info = reader.info
    encoder = FrameEncoder(model, info.height, info.width, options)
    decoder = FrameDecoder(model, info.height, info.width, options)
    enc, dec = RunReport(), RunReport()
    bar = progress(_frame_count(info.num_frames, start, end, stride), "roundtrip", quiet)
    t0 = now()
    clock = OutputClock(Fraction(info.fps) / stride, info.time_base)
    # PSNR/SSIM (float64) run on their own thread, in frame order, off the model thread.
    metrics = BackgroundStage(lambda pair: _measure_quality(dec, *pair), size=4, name="quality")
    with reader, VideoWriter(dst, info.width, info.height, clock.fps, crf=crf, preset=preset,
                             lossless=lossless, time_base=clock.time_base, rotation=info.rotation) as out:

        def write(item):
            frames, source, pts = item
            frames = frames.wait().numpy()
            out.write(frames, clock(pts))
            metrics.put((frames, source))
            bar.update(len(pts))

        def work(fb):
            # Latencies are the model thread's time per batch: with CUDA's asynchronous launches
            # they measure queueing there, not the device (the encode/decode commands measure
            # latency to the written output).
            t_in = now()
            latents = encoder.submit(fb.frames).result()
            t_mid = now()
            frames = decoder.submit(latents).to_host()
            t_out = now()
            enc.latency_ms.extend([(t_mid - t_in) * 1000] * len(fb))
            dec.latency_ms.extend([(t_out - t_mid) * 1000] * len(fb))
            enc.frames += len(fb)
            dec.frames += len(fb)
            return frames, fb.frames, fb.pts

        try:
            _pump(reader, work, write, "video-writer", bar)
            metrics.close()
        except BaseException:
            metrics.abort()
            raise
    enc.missing_frames = dec.missing_frames = reader.missing_frames
    _finish(enc, t0, encoder, model, encoder.stats)
    _finish(dec, t0, decoder, model, decoder.stats)
    return enc, dec


def _measure_quality(report: RunReport, decoded: np.ndarray, source: np.ndarray) -> None:
    """Append the PSNR and SSIM of each decoded frame against its source frame to ``report``."""
    report.psnr.extend(np.atleast_1d(psnr(decoded, source)).tolist())
    report.ssim.extend(np.atleast_1d(ssim(decoded, source)).tolist())


def check_fit(reader: LatentReader, decoder, scale: int) -> None:
    """Refuse latents whose (h, w) are not the decoder's padded source size over ``scale``."""
    if (decoder.h8 // scale, decoder.w8 // scale) != tuple(reader.shape[2:]):
        raise ValueError(f"{reader.path}: latents of {reader.shape[2]}x{reader.shape[3]} do not fit a "
                         f"{decoder.width}x{decoder.height} source at {scale}x")


def _recorded_rotation(src, meta: dict) -> int:
    """The source's display rotation recorded at encode (files written before it: none)."""
    value = meta.get("rotation", "0")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{src}: expected metadata 'rotation' in whole degrees, got {value!r}") from None


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
    path = _check_output(path)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def plot_quality(path: str | os.PathLike, report: RunReport, title: str) -> None:
    """PSNR and SSIM per frame over the clip, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = _check_output(path, suffixes=PLOT_SUFFIXES)
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
    """Metadata, shape, frame count, duration and size of a latent file (for ``codec info``):
    numbers as numbers, rationals as "num/den" text plus ``fps_float``."""
    with LatentReader(path) as r:
        fps = r.fps
        meta = {k: _typed(k, v) for k, v in r.metadata.items()}
        frames = int(r.metadata.get("source_frames", r.num_frames))  # video VAEs: T frames in T' latents
        return {
            **meta, "file": str(path), "size_bytes": Path(path).stat().st_size, "shape": list(r.shape),
            "frames": frames, "dtype": str(r.dtype).removeprefix("torch."),
            "fps": _rational(fps), "fps_float": float(fps), "time_base": _rational(r.time_base),
            "duration_s": float(frames / fps),  # fps > 0: the reader checked it
        }


def describe_video(path: str | os.PathLike) -> dict:
    """What the container says about a video (``VideoInfo``) and its size in bytes, typed JSON;
    ``num_frames_status`` is "exact" (a sample count the container keeps), "estimated" or "unknown"."""
    info = probe_video(path)
    d = asdict(info)
    status = "exact" if info.num_frames_exact else "estimated" if info.num_frames is not None else "unknown"
    d.update(fps=_rational(info.fps), fps_float=float(info.fps), time_base=_rational(info.time_base),
             size_bytes=Path(path).stat().st_size, num_frames_status=status)
    return d


# Metadata values that stay text even when they look like numbers (names, paths, hashes).
_TEXT_KEYS = {"checksum", "tool", "format", "family"}
_TEXT_ENDINGS = ("_id", "_source", "_file", "_path", "hash", "_version", "_name")


def _typed(key: str, value: str):
    """A latent file's metadata string as JSON would type it: int, float, bool, else the text."""
    if key in _TEXT_KEYS or key.endswith(_TEXT_ENDINGS) or not isinstance(value, str):
        return value
    if value in ("true", "false", "True", "False"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        return number if kind is int or np.isfinite(number) else value
    return value


def _rational(x: Fraction) -> str:
    x = Fraction(x)
    return f"{x.numerator}/{x.denominator}"
