"""The built-in default model: it ships in the package, loads offline and is good enough to trust."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import moving_square_frames, write_clip
from PIL import Image

from codec.cli import main
from codec.latents import LatentReader
from codec.models import load_model
from codec.models.loading import DEFAULT_FILE
from codec.quality import psnr
from codec.video import FrameReader, probe_video


@pytest.fixture(scope="module")
def model():
    assert DEFAULT_FILE.is_file(), "the built-in weights are missing from the package"
    return load_model("default")


def test_default_is_the_shipped_tiny_model(model):
    assert model.family == "tiny" and model.latent_channels == 16 and model.downscale == 8
    assert model.source == str(DEFAULT_FILE) and DEFAULT_FILE.stat().st_size < 5_000_000


def test_default_quality_on_held_out_kodak(model, shared_data):
    """Central 256x256 of three held-out Kodak images; the card's full table is bench/eval_kodak.py."""
    scores = []
    for name in ("kodim03", "kodim13", "kodim23"):
        img = np.asarray(Image.open(shared_data / "images" / "kodak" / f"{name}.png").convert("RGB"))
        h, w = img.shape[:2]
        crop = np.ascontiguousarray(img[h // 2 - 128:h // 2 + 128, w // 2 - 128:w // 2 + 128])
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
        z = model.encode(x)
        # Published latents are zero-mean, unit-variance (what a diffusion model expects).
        assert abs(z.mean().item()) < 0.5 and 0.5 < z.std().item() < 2.0
        y = ((model.decode(z)[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        scores.append(psnr(y[None], crop[None])[0])
    assert np.mean(scores) >= 27.0, scores


def test_main_job_without_model_argument(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(6, 48, 64))
    lat, out = tmp_path / "clip.safetensors", tmp_path / "back.mp4"
    assert main(["encode", str(clip), "-o", str(lat), "--quiet"]) == 0
    with LatentReader(lat) as r:
        assert r.shape == (6, 16, 6, 8) and r.metadata["model_id"] == "default"
    assert main(["decode", str(lat), "-o", str(out), "--quiet"]) == 0
    assert probe_video(out).num_frames == 6
    with FrameReader(out, batch=8) as a, FrameReader(clip, batch=8) as b:
        back, src = next(iter(a)).frames, next(iter(b)).frames
    assert np.mean(psnr(back, src)) > 25


def test_default_keeps_its_quality_in_half_precision(shared_data):
    """The GPU path runs fp16: the offsets the PCA start carries must not cost precision there."""
    img = np.asarray(Image.open(shared_data / "images" / "kodak" / "kodim23.png").convert("RGB"))
    crop = np.ascontiguousarray(img[128:384, 256:512])
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
    scores = {}
    for dtype in (torch.float32, torch.float16):
        m = load_model("default", dtype=dtype)
        y = m.decode(m.encode(x.to(dtype))).float()
        out = ((y[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        scores[dtype] = psnr(out[None], crop[None])[0]
        assert m.fp32_fallbacks == 0
    assert abs(scores[torch.float16] - scores[torch.float32]) < 0.1, scores
