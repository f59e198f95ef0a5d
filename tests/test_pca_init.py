"""The pixel-shuffle tiny variant and its PCA start (``codec train --pca-init``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codec.models import build, load_model, save_model
from codec.models.config import TinyConfig
from codec.train.pca_init import patch_pca, pca_autoencoder


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) float in [0, 1]: smooth random colour fields (upsampled noise) plus texture."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g), size=(size, size), mode="bicubic")
    return (low + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def _pca_reconstruction(x: torch.Tensor, mean, comps, k: int) -> torch.Tensor:
    p = F.unfold(x.double(), 8, stride=8)
    c = comps[:, :k].T @ (p - mean[:, None])
    return F.fold(comps[:, :k] @ c + mean[:, None], x.shape[-2:], 8, stride=8).float()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


def test_shuffle_variant_shapes_and_file_round_trip(tmp_path):
    cfg = TinyConfig(name="s", latent_channels=4, width=8, resample="shuffle")
    model = build(cfg)
    x = torch.rand(2, 3, 24, 40) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 4, 3, 5) and model.decode(z).shape == x.shape
    path = save_model(model, tmp_path / "s.safetensors", dtype=torch.float32)
    again = load_model(path)
    assert again.config.resample == "shuffle"
    torch.testing.assert_close(again.decode(again.encode(x)), model.decode(z), rtol=0, atol=0)
    with pytest.raises(ValueError, match="resample"):
        TinyConfig(resample="bilinear")


def test_pca_start_is_the_linear_block_codec():
    torch.manual_seed(0)
    fit, held_out = _images(24, 64, seed=1), _images(4, 64, seed=2)
    cfg = TinyConfig(name="p", latent_channels=8, width=16, resample="shuffle")
    model = pca_autoencoder(fit, cfg, overlap=False).eval()
    mean, comps, var = patch_pca(fit, 8)
    assert torch.all(var[:-1] >= var[1:])  # components by decreasing variance
    with torch.no_grad():
        z = model._encode_raw(held_out * 2 - 1, sample=False, generator=None)
        y = (model._decode_raw(z) + 1) / 2
    # The network computes the 8-component PCA codec (its extra losses: 15 of 48 components per
    # 4x4 quarter on the way, and the tanh clamp of the latents), not merely something as good.
    pca = _pca_reconstruction(held_out, mean, comps, 8)
    assert abs(_psnr(y, held_out) - _psnr(pca, held_out)) < 0.3
    assert _psnr(y, pca) > 40
    # Latents: the whitened coefficients times LATENT_STD (std ~0.25 per channel on the fit data).
    with torch.no_grad():
        z_fit = model._encode_raw(fit * 2 - 1, sample=False, generator=None)
    assert z_fit.std(dim=(0, 2, 3)).sub(0.25).abs().max() < 0.02
    # Fewer components lose more: the codec is the truncation, not an identity in disguise.
    assert _psnr(pca, held_out) > _psnr(_pca_reconstruction(held_out, mean, comps, 4), held_out) + 1
    # Overlapped decoding (d6 refitted on 3x3 latent neighbourhoods) beats the block-local codec
    # on held-out images, borders included; the encoder is the same.
    overlapped = pca_autoencoder(fit, cfg).eval()
    with torch.no_grad():
        z2 = overlapped._encode_raw(held_out * 2 - 1, sample=False, generator=None)
        y2 = (overlapped._decode_raw(z2) + 1) / 2
    torch.testing.assert_close(z2, z)
    assert _psnr(y2, held_out) > _psnr(y, held_out) + 0.3


def test_pca_start_needs_room():
    with pytest.raises(ValueError, match="shuffle"):
        pca_autoencoder(_images(2, 16, 0), TinyConfig(latent_channels=4, width=16))
    with pytest.raises(ValueError, match="width >= 17"):
        pca_autoencoder(_images(2, 16, 0), TinyConfig(latent_channels=16, width=16, resample="shuffle"))
