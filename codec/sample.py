"""``codec sample``: a short synthetic clip, so the codec can be tried where no video is at hand.

The clip is deterministic (the same frames on every machine): a colour gradient with a
fixed fine grain, a band of stripes scrolling left, a disc circling and a checkered square
sliding across, written as H.264 by :class:`~codec.video.VideoWriter`. It has what a codec should
be tried on: smooth areas, texture, sharp edges and motion over a still background.
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

from .video import VideoWriter

FRAMES, WIDTH, HEIGHT, FPS = 72, 320, 240, 24  # 3 s at 24 fps
MIN_SIZE = 16


def sample_frame(t: int, width: int = WIDTH, height: int = HEIGHT, frames: int = FRAMES) -> np.ndarray:
    """Frame ``t`` of ``frames`` of the sample clip: (height, width, 3) uint8 RGB."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    img = np.stack([40 + 170 * u, 60 + 130 * v, 200 - 120 * (u + v) / 2], -1)
    grain = np.random.default_rng(0).integers(-9, 10, size=(height, width, 1)).astype(np.float32)
    img += grain
    phase = t / max(frames, 1)
    band = (v > 0.72) & (v < 0.86)
    stripes = 127 + 100 * np.sin(2 * np.pi * (x / 12.0 + 8 * phase))
    img[band] = np.stack([stripes, stripes * 0.6 + 40, 255 - stripes], -1)[band]
    radius = 0.12 * min(width, height)
    cx = width * (0.5 + 0.3 * np.cos(2 * np.pi * phase))
    cy = height * (0.4 + 0.2 * np.sin(2 * np.pi * phase))
    img[(x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2] = (235, 200, 40)
    side = max(2, int(0.2 * min(width, height)))
    x0, y0 = int((width - side) * phase), int(0.1 * height)
    square = (x >= x0) & (x < x0 + side) & (y >= y0) & (y < y0 + side)
    checker = ((x - x0) // max(1, side // 4) + (y - y0) // max(1, side // 4)) % 2 == 0
    img[square & checker] = (20, 20, 30)
    img[square & ~checker] = (240, 240, 250)
    return img.clip(0, 255).round().astype(np.uint8)


def write_sample(path: str | os.PathLike, frames: int = FRAMES, width: int = WIDTH, height: int = HEIGHT,
                 fps: Fraction | int = FPS) -> None:
    """Write the sample clip (``frames`` frames of ``width`` x ``height`` at ``fps``) to ``path``
    (.mp4/.mkv/.mov, H.264 crf 18), frame by frame; nothing is left at ``path`` on failure."""
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"expected frames to be an integer >= 1, got {frames!r}")
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or not MIN_SIZE <= value <= VideoWriter.MAX_SIZE:
            raise ValueError(f"expected {name} to be an integer from {MIN_SIZE} to {VideoWriter.MAX_SIZE}, "
                             f"got {value!r}")
    with VideoWriter(path, width, height, fps) as out:
        for t in range(frames):
            out.write(sample_frame(t, width, height, frames))


def parse_size(text: str) -> tuple[int, int]:
    """'320x240' -> (320, 240); ValueError otherwise."""
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise ValueError(f"--size must look like 320x240 (width x height), got {text!r}")
    return int(w), int(h)
