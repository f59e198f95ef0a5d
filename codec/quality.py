"""Frame quality metrics: PSNR and SSIM between uint8 RGB frames.

Inputs are ``(H, W, 3)`` or ``(T, H, W, 3)`` uint8 RGB (numpy arrays or CPU/GPU tensors).
A single frame gives a float; a batch gives a float64 numpy array of one value per frame.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "PSNR_CAP"]

PSNR_CAP = 100.0
"""PSNR of identical frames (MSE 0), and the most any pair reports."""

_LUMA = (0.299, 0.587, 0.114)  # BT.601 weights, as in Wang et al.'s reference on grey images


def _pair(a, b, name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Both as float64 (T, H, W, 3) tensors on a's device, and whether the input was one frame."""
    ta, tb = (torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x) for x in (a, b))
    for t in (ta, tb):
        if t.dtype != torch.uint8 or t.ndim not in (3, 4) or t.shape[-1] != 3:
            raise ValueError(f"{name}: expected (H, W, 3) or (T, H, W, 3) uint8 RGB frames, "
                             f"got {tuple(t.shape)} {t.dtype}")
    if ta.shape != tb.shape:
        raise ValueError(f"{name}: expected frames of equal shape, "
                         f"got {tuple(ta.shape)} and {tuple(tb.shape)}")
    single = ta.ndim == 3
    ta, tb = (t.reshape(-1, *t.shape[-3:]).to(torch.float64) for t in (ta, tb))
    return ta, tb.to(ta.device), single


def _result(values: torch.Tensor, single: bool) -> float | np.ndarray:
    out = values.cpu().numpy()
    return float(out[0]) if single else out


def psnr(a, b) -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB over all pixels and channels, peak 255.

    Identical frames (MSE 0) give :data:`PSNR_CAP` (100 dB); values are capped there.
    """
    ta, tb, single = _pair(a, b, "psnr")
    mse = (ta - tb).square().mean(dim=(1, 2, 3))
    db = 10 * torch.log10(255.0**2 / mse.clamp_min(1e-300))
    return _result(db.clamp(max=PSNR_CAP), single)


def _gaussian(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a, b, window: int = 11, sigma: float = 1.5) -> float | np.ndarray:
    """Structural similarity (Wang et al. 2004) on BT.601 luma, 0..255 range.

    Gaussian window ``window`` x ``window`` (sigma 1.5), K1 = 0.01, K2 = 0.03, statistics over
    the valid region only (no padding), mean of the SSIM map per frame. Identical frames give
    1.0; the value falls towards 0 (it can go slightly negative) as frames differ. Frames must
    be at least ``window`` pixels on each side. Processed one frame at a time (bounded memory).
    """
    ta, tb, single = _pair(a, b, "ssim")
    if min(ta.shape[1:3]) < window:
        raise ValueError(f"ssim: expected frames of at least {window}x{window} pixels, "
                         f"got {ta.shape[2]}x{ta.shape[1]}")
    luma = torch.tensor(_LUMA, dtype=torch.float64, device=ta.device)
    g = _gaussian(window, sigma, ta.device)
    gx, gy = g.view(1, 1, 1, -1), g.view(1, 1, -1, 1)
    blur = lambda x: F.conv2d(F.conv2d(x, gx), gy)  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for fa, fb in zip(ta, tb):
        x, y = (f @ luma for f in (fa, fb))
        x, y = x[None, None], y[None, None]
        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx * mx
        vy = blur(y * y) - my * my
        cov = blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        values.append(s.mean())
    return _result(torch.stack(values), single)

