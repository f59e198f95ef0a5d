"""codec.quality: PSNR and SSIM."""

import math

import numpy as np
import pytest
import torch

from codec.quality import PSNR_CAP, psnr, ssim


def _frames(t=3, h=32, w=40, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 5, y * 6, 255 - x * 3], -1)
    return np.clip(base + rng.integers(-10, 11, (t, h, w, 3)), 0, 255).astype(np.uint8)


def test_psnr_identical_is_capped():
    a = _frames()
    assert psnr(a[0], a[0]) == PSNR_CAP == 100.0
    assert psnr(a, a).tolist() == [100.0] * 3


def test_psnr_known_mse():
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[..., 0] += 3  # MSE = 9 / 3 = 3
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 3), abs=1e-12)
    batch = np.stack([a, a, a])
    other = np.stack([a, b, a + 1])  # MSE 0, 3, 1
    expected = [100.0, 10 * math.log10(255**2 / 3), 20 * math.log10(255)]
    assert psnr(batch, other) == pytest.approx(expected, abs=1e-12)
    assert psnr(torch.from_numpy(batch), torch.from_numpy(other)) == pytest.approx(expected, abs=1e-12)


def test_ssim_values():
    a = _frames()
    assert ssim(a[0], a[0]) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(1)
    light = np.clip(a + rng.normal(0, 3, a.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.uint8)
    s_light, s_heavy = ssim(a, light), ssim(a, heavy)
    assert s_light.shape == (3,) and s_light.dtype == np.float64
    assert np.all((0 < s_heavy) & (s_heavy < s_light) & (s_light < 1))
    assert np.all(s_light > 0.8) and np.all(s_heavy < 0.6)


def test_ssim_matches_a_direct_implementation():
    """Same formula written naively with float loops over 11x11 windows (valid region)."""
    a, b = _frames(t=1, h=14, w=13)[0], _frames(t=1, h=14, w=13, seed=5)[0]
    luma = lambda f: f.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    x, y = luma(a), luma(b)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2, vals = (0.01 * 255) ** 2, (0.03 * 255) ** 2, []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert ssim(a, b) == pytest.approx(np.mean(vals), abs=1e-9)


def test_bad_inputs():
    a = _frames()
    with pytest.raises(ValueError, match=r"psnr: expected \(H, W, 3\) or \(T, H, W, 3\) uint8"):
        psnr(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="equal shape"):
        psnr(a, a[:2])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :10], a[:, :10])
