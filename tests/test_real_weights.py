"""The real TAEF2 weights through ``load_model``: Kodak round trip quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from codec.models import load_model


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def taef2(shared_data):
    return load_model(shared_data / "weights" / "taef2_encoder.pth")


def test_taef2_detected(taef2):
    assert taef2.name == "taef2" and taef2.latent_channels == 32 and taef2.config.midblock_groupnorm
    assert taef2.downscale == 8 and taef2.dtype == torch.float32


def test_taef2_kodak_round_trip_psnr(taef2, shared_data):
    scores = []
    for name in ("kodim01", "kodim05", "kodim23"):
        img = np.array(Image.open(shared_data / "images" / "kodak" / f"{name}.png").convert("RGB"))
        img = img[64:448, 128:640]  # central 384x512: same content, faster on 2 cores
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            z = taef2.encode(x)
            y = taef2.decode(z)
        assert z.shape == (1, 32, img.shape[0] // 8, img.shape[1] // 8)
        out = ((y.clamp(-1, 1) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).numpy()
        scores.append(psnr(out, img))
    print("taef2 Kodak PSNR:", [round(s, 2) for s in scores])
    assert np.mean(scores) >= 27.0, scores
