"""Video file <-> latent file through a causal video VAE (Wan family), streamed.

Called by :mod:`codec.pipeline` when the model is a :class:`VideoAutoencoder`. The latent file
holds (T', C, h, w) normalized latents, ``(z - latents_mean) / latents_std``, T' = 1 + (T - 1) / 4
for the clip padded at its end to T = 1 + 4k frames; each latent frame's pts is that of the first
source frame it covers (frame 0, then frames 1, 5, 9 ...). Metadata adds the statistics, the
temporal factor, the frame rule, the end padding and the source frame count.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .coder import CoderOptions
from .latents import LatentReader, LatentWriter
from .models.video_autoencoder import VideoAutoencoder
from .pipeline import (
    OutputClock,
    RunReport,
    _finish,
    _frame_count,
    _measure_quality,
    _pump,
    _recorded_rotation,
    check_fit,
    clip_metadata,
)
from .stages import BackgroundStage, now, progress
from .video import FrameReader, VideoWriter
from .video_coder import VideoDecoder, VideoEncoder

FRAME_RULE = "1+4k"
_NORM = "none (RMS norm)"  # the Wan VAEs normalize per pixel: no tile or frame statistics


def _stats_text(values) -> str:
    return json.dumps([round(float(v), 6) for v in values])


def video_metadata(model: VideoAutoencoder) -> dict:
    """What a latent file records of a video model's latent convention."""
    mean, std = model.latent_stats()
    return {"latents_mean": _stats_text(mean.flatten()), "latents_std": _stats_text(std.flatten()),
            "temporal_factor": model.temporal_factor, "frame_rule": FRAME_RULE.replace("4", str(model.temporal_factor))}


def encode_clip(src, dst: Path, model: VideoAutoencoder, *, options: CoderOptions | None, start: int,
                end: int | None, stride: int, batch: int, latent_dtype: torch.dtype, allow_short: bool = False,
                quiet: bool, metadata: dict[str, str] | None = None) -> RunReport:
    """Encode frames ``start:end:stride`` of ``src`` to the latent file ``dst`` (see the module
    docstring); ``allow_short`` and ``metadata`` as for :func:`codec.pipeline.encode_video`."""
    reader = FrameReader(src, start=start, end=end, stride=stride, batch=batch, allow_short=allow_short)
    info = reader.info
    encoder = VideoEncoder(model, info.height, info.width, options)
    s, f = model.downscale, model.temporal_factor
    meta = {
        **clip_metadata(model, src, info, encoder.padding, start, stride, metadata), **video_metadata(model),
        "pad_frames": "0" * 8, "source_frames": "0" * 16,  # placeholders, set on close
    }
    total = _frame_count(info.num_frames, start, end, stride)
    report = RunReport()
    bar = progress(total, "encode", quiet)
    starts: deque[int] = deque()  # pts of the frames that start a latent frame, not yet written
    ready: deque[float] = deque()  # arrival time of each frame whose latent is not yet written
    t0 = now()
    with reader, LatentWriter(dst, (model.latent_channels, encoder.h8 // s, encoder.w8 // s), latent_dtype,
                              meta, frames_hint=None if total is None else 1 + total // f) as writer:

        def write(item):
            latents, done = item
            if len(latents):
                writer.write(latents, [starts.popleft() for _ in range(len(latents))])
                t = now()
                for i in range(len(latents)):
                    covered = 1 if writer.num_frames - len(latents) + i == 0 else f
                    for _ in range(min(covered, len(ready))):
                        report.latency_ms.append((t - ready.popleft()) * 1000)
            bar.update(done)

        def work(fb):
            for p in np.asarray(fb.pts).reshape(-1).tolist():
                if report.frames == 0 or (report.frames - 1) % f == 0:
                    starts.append(int(p))
                report.frames += 1
                ready.append(now())
            return encoder(fb.frames).to("cpu", latent_dtype), len(fb)

        _pump(reader, work, write, "latent-writer", bar)
        if report.frames == 0:
            raise ValueError(f"{src}: no frames selected (start={start}, end={end}, stride={stride})")
        last = encoder.finish().to("cpu", latent_dtype)
        write((last, 0))
        writer.update_metadata({"pad_frames": encoder.pad_frames, "source_frames": report.frames})
    report.missing_frames = reader.missing_frames
    return _finish(report, t0, encoder, model, norm=_NORM)


def check_video_convention(meta: dict, model: VideoAutoencoder, src) -> None:
    """Refuse latents whose statistics or temporal rule differ from the model's."""
    mine = video_metadata(model)
    for key in ("latents_mean", "latents_std", "temporal_factor"):
        if key not in meta:
            raise ValueError(f"{src}: not a video-VAE latent file (metadata lacks {key})")
        if str(meta[key]) != str(mine[key]):
            raise ValueError(f"{src}: the file's {key} ({meta[key][:60]}) differs from model {model.name}'s "
                             f"({str(mine[key])[:60]}); decode with the model that encoded it")


def decode_clip(reader: LatentReader, dst: Path, model: VideoAutoencoder, *, options: CoderOptions | None,
                crf: int, preset: str, lossless: bool, quiet: bool) -> RunReport:
    """Decode an open latent file to the video ``dst``: every source frame back, the end padding dropped."""
    meta = reader.metadata
    check_video_convention(meta, model, reader.path)
    height, width = int(meta["source_height"]), int(meta["source_width"])
    frames = int(meta["source_frames"])
    decoder = VideoDecoder(model, height, width, options, frames=frames)
    check_fit(reader, decoder, model.downscale)
    if model.num_frames(reader.num_frames) - int(meta["pad_frames"]) != frames:
        raise ValueError(f"{reader.path}: {reader.num_frames} latent frames do not give the recorded "
                         f"{frames} frames with {meta['pad_frames']} frames of end padding")
    report = RunReport()
    bar = progress(frames, "decode", quiet)
    clock = OutputClock(reader.fps, reader.time_base)
    ticks = 1 / (reader.fps * reader.time_base)  # pts units per frame
    first = [True]
    t0 = now()
    with VideoWriter(dst, width, height, reader.fps, crf=crf, preset=preset, lossless=lossless,
                     time_base=clock.time_base, rotation=_recorded_rotation(reader.path, meta)) as out:

        def write(item):
            images, pts, ready = item
            if len(images):
                out.write(images, clock(pts))
                t = now()
                report.latency_ms.extend([(t - ready) * 1000] * len(images))
                bar.update(len(images))

        def work(item):
            latents, lat_pts = item
            ready = now()
            images = decoder(latents.float()).cpu().numpy()
            pts = []
            for p in lat_pts.tolist():  # frames of each latent frame: 1 for the first, then 4
                n = 1 if first[0] else model.temporal_factor
                first[0] = False
                pts += [p + round(k * ticks) for k in range(n)]
            report.frames += len(images)
            return images, np.asarray(pts[:len(images)], dtype=np.int64), ready

        _pump(_one_by_one(reader), work, write, "video-writer", bar)
    return _finish(report, t0, decoder, model, norm=_NORM)


def _one_by_one(reader: LatentReader):
    """Latent frames one at a time, so each one's video frames are written as soon as decoded."""
    for latents, pts in reader:
        for i in range(len(pts)):
            yield latents[i:i + 1], pts[i:i + 1]


def roundtrip_clip(src, dst: Path, model: VideoAutoencoder, *, options: CoderOptions | None, start: int,
                   end: int | None, stride: int, batch: int, crf: int, preset: str, lossless: bool,
                   allow_short: bool, quiet: bool) -> tuple[RunReport, RunReport]:
    """Encode and decode frames ``start:end:stride`` of ``src`` in one stream (as
    :func:`codec.pipeline.roundtrip_video` does for image VAEs): each latent frame is decoded as it
    completes, its frames are written to ``dst`` and compared with the source frames they stand
    for (PSNR/SSIM per frame, in the decode report); the end padding is dropped. Latencies are the
    model thread's encode and decode time of the batch that completed a frame."""
    reader = FrameReader(src, start=start, end=end, stride=stride, batch=batch, allow_short=allow_short)
    info = reader.info
    encoder = VideoEncoder(model, info.height, info.width, options)
    decoder = VideoDecoder(model, info.height, info.width, options)
    enc, dec = RunReport(), RunReport()
    bar = progress(_frame_count(info.num_frames, start, end, stride), "roundtrip", quiet)
    clock = OutputClock(Fraction(info.fps) / stride, info.time_base)
    metrics = BackgroundStage(lambda pair: _measure_quality(dec, *pair), size=4, name="quality")
    waiting: deque[tuple[np.ndarray, int]] = deque()  # source frames (and pts) not decoded yet
    t0 = now()
    with reader, VideoWriter(dst, info.width, info.height, clock.fps, crf=crf, preset=preset,
                             lossless=lossless, time_base=clock.time_base, rotation=info.rotation) as out:

        def write(item):
            frames, source, pts = item
            if len(frames):
                out.write(frames, clock(pts))
                metrics.put((frames, source))
                bar.update(len(frames))

        def work(fb):
            t_in = now()
            if fb is None:  # the clip's end: padded to 1 + 4k frames, the last latents
                latents = encoder.finish()
            else:
                waiting.extend(zip(fb.frames, fb.pts.reshape(-1).tolist()))
                latents = encoder(fb.frames)
                enc.frames += len(fb)
            t_mid = now()
            frames = decoder(latents).cpu().numpy() if len(latents) else np.zeros((0, info.height, info.width, 3),
                                                                                   np.uint8)
            frames = frames[:len(waiting)]  # the end padding decodes to frames no source frame stands for
            t_out = now()
            done = [waiting.popleft() for _ in range(len(frames))]
            enc.latency_ms.extend([(t_mid - t_in) * 1000] * len(frames))
            dec.latency_ms.extend([(t_out - t_mid) * 1000] * len(frames))
            dec.frames += len(frames)
            source = np.stack([f for f, _ in done]) if done else frames
            return frames, source, np.asarray([p for _, p in done], dtype=np.int64)

        try:
            _pump(itertools.chain(reader, [None]), work, write, "video-writer", bar)
            metrics.close()
        except BaseException:
            metrics.abort()
            raise
        if enc.frames == 0:
            raise ValueError(f"{src}: no frames selected (start={start}, end={end}, stride={stride})")
    enc.missing_frames = dec.missing_frames = reader.missing_frames
    _finish(enc, t0, encoder, model, norm=_NORM)
    _finish(dec, t0, decoder, model, norm=_NORM)
    return enc, dec
