"""Small synthetic clips and models for the pipeline tests."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from codec.models import build, save_model
from codec.video import VideoWriter


def moving_square_frames(n: int = 8, height: int = 50, width: int = 70, seed: int = 0) -> np.ndarray:
    """(n, H, W, 3) uint8: a smooth static background and a small square moving right."""
    yy, xx = np.mgrid[0:height, 0:width]
    bg = np.stack([128 + 60 * np.sin(xx / 9.0), 255 * xx / width, 255 * yy / height], -1)
    frames = np.repeat(bg[None], n, 0)
    for t in range(n):
        x0 = 4 + 3 * t
        frames[t, 10:20, x0:x0 + 10] = (250, 30, 30)
    return frames.clip(0, 255).astype(np.uint8)


def write_clip(path: Path, frames: np.ndarray, fps=Fraction(25), lossless: bool = True) -> Path:
    with VideoWriter(path, frames.shape[2], frames.shape[1], fps, lossless=lossless) as w:
        w.write(frames)
    return path


def tiny_model_file(path: Path, latent_channels: int = 4, width: int = 8, seed: int = 0) -> Path:
    """A small random tiny-family model saved where ``load_model`` reads it back."""
    torch.manual_seed(seed)
    model = build("taesd", latent_channels=latent_channels, width=width)
    return save_model(model, path, dtype=torch.float32)


def on_second_call(monkeypatch, cls, action) -> dict:
    """Patch ``cls.submit`` (a coder's entry point in the pipeline) so its second call runs ``action()``
    first (raise, send a signal).

    Returns the call counter, ``{"n": calls so far}``."""
    calls = {"n": 0}
    real = cls.submit

    def patched(self, x):
        calls["n"] += 1
        if calls["n"] == 2:
            action()
        return real(self, x)

    monkeypatch.setattr(cls, "submit", patched)
    return calls
