"""Training frames: images and video clips decoded once into memory, served as random crops.

Every source (an image, or a clip of which up to ``frames_per_clip`` frames are kept, sampled
evenly across it) is decoded to uint8 RGB once. A batch picks a source uniformly, then one of its
frames uniformly, then a random ``crop`` x ``crop`` window, flipped horizontally half the time
(and, with ``color_aug``, its colours jittered: see ``jitter_colors``).
All randomness comes from one ``torch.Generator`` whose state the trainer checkpoints.

Frames smaller than the crop on either side are **upscaled** (bicubic, aspect kept) until the
short side equals the crop; nothing is skipped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".gif")


def find_sources(paths: Iterable[str | Path], exclude: Iterable[str] = ()) -> list[Path]:
    """Image and video files under ``paths`` (files or folders, folders searched recursively).

    ``exclude``: glob patterns matched against the file name and the full path
    (e.g. ``skimage_motorcycle_*``). A file named explicitly is kept whatever its suffix (PyAV
    decides whether it can read it); in folders only known image/video suffixes are taken.
    Raises ValueError for a missing path or when nothing is left.
    """
    patterns = list(exclude)
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file()
                            and f.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise ValueError(f"{p}: no such training file or folder")
    kept = [f for f in dict.fromkeys(found)
            if not any(fnmatch.fnmatch(f.name, g) or fnmatch.fnmatch(str(f), g) for g in patterns)]
    if not kept:
        raise ValueError(f"no training images or videos found in {', '.join(map(str, paths))}")
    return kept


def read_image(path: Path) -> np.ndarray:
    """One image file -> (H, W, 3) uint8 RGB."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def read_clip(path: Path, max_frames: int) -> list[np.ndarray]:
    """Up to ``max_frames`` frames of a video, evenly spread over it: list of (H, W, 3) uint8 RGB."""
    import av

    try:
        total = _count_frames(path)
        if total == 0:
            raise ValueError(f"{path}: the video holds no frames")
        want = set(np.linspace(0, total - 1, min(max_frames, total)).round().astype(int).tolist())
        frames = []
        with av.open(str(path)) as box:
            stream = box.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(box.decode(stream)):
                if i in want:
                    frames.append(frame.to_ndarray(format="rgb24"))
        return frames
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"{path}: not a readable video ({e})") from None


def _count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as box:
        stream = box.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in box.demux(stream) if _.size)  # packets = frames for video streams


def fit_crop(frame: np.ndarray, crop: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H', W') uint8 tensor, upscaled so that min(H', W') >= crop."""
    t = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)
    h, w = t.shape[1:]
    if min(h, w) >= crop:
        return t.contiguous()
    s = crop / min(h, w)
    size = (max(crop, round(h * s)), max(crop, round(w * s)))
    up = F.interpolate(t[None].float(), size=size, mode="bicubic", align_corners=False)
    return up[0].round().clamp(0, 255).to(torch.uint8)


def jitter_colors(patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, H, W) uint8 with the RGB channels in a random order, the saturation
    scaled by a factor in [0.5, 1.8] and each channel's gain in [0.75, 1.25].

    The training data hold much grey and muted footage; without this, saturated colours (a red
    door, a blue sky) come back shifted, a low-frequency error that costs many dB on Kodak.
    """
    u = torch.rand(4, generator=generator)
    x = patch[torch.randperm(3, generator=generator)].float()
    grey = x.mean(0, keepdim=True)
    x = grey + (0.5 + 1.3 * u[0]) * (x - grey)
    x = x * (0.75 + 0.5 * u[1:]).view(3, 1, 1)
    return x.round().clamp(0, 255).to(torch.uint8)


class FrameBank:
    """All training frames in memory as uint8 (3, H, W) tensors, grouped by source.

    ``sample(batch, generator)`` -> (batch, 3, crop, crop) uint8 RGB tensor.
    """

    def __init__(self, files: list[Path], crop: int, frames_per_clip: int = 64, color_aug: bool = False):
        if crop < 8 or crop % 8:
            raise ValueError(f"--crop must be a positive multiple of 8, got {crop}")
        self.crop, self.color_aug = crop, color_aug
        self.files = list(files)
        self.sources: list[list[torch.Tensor]] = []
        self.upscaled: list[Path] = []  # sources smaller than the crop (upscaled, not skipped)
        for f in self.files:
            frames = [read_image(f)] if f.suffix.lower() in IMAGE_SUFFIXES else read_clip(f, frames_per_clip)
            if min(frames[0].shape[:2]) < crop:
                self.upscaled.append(f)
            self.sources.append([fit_crop(fr, crop) for fr in frames])

    @property
    def n_frames(self) -> int:
        return sum(len(s) for s in self.sources)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for s in self.sources for t in s)

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        c = self.crop
        out = torch.empty(batch, 3, c, c, dtype=torch.uint8)
        for i in range(batch):
            src = self.sources[int(torch.randint(len(self.sources), (1,), generator=generator))]
            frame = src[int(torch.randint(len(src), (1,), generator=generator))]
            h, w = frame.shape[1:]
            y = int(torch.randint(h - c + 1, (1,), generator=generator))
            x = int(torch.randint(w - c + 1, (1,), generator=generator))
            patch = frame[:, y:y + c, x:x + c]
            if bool(torch.rand((), generator=generator) < 0.5):
                patch = patch.flip(-1)
            out[i] = jitter_colors(patch, generator) if self.color_aug else patch
        return out
