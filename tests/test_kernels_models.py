"""The production path of the models (Triton kernels through the interpreter, the fused upsample
convolution) against diffusers: the same 1e-5 contract as the torch reference path."""

from __future__ import annotations

import pytest
import torch

import kernels
from codec.models import build
from codec.models.layouts import tiny_diffusers_to_taesd

diffusers = pytest.importorskip("diffusers", reason="diffusers (dev extra) is the reference")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.skipif(not kernels.HAVE_TRITON, reason="triton is not installed")
def test_kl_with_kernels_matches_diffusers():
    assert not kernels.reference_forced()
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                                  latent_channels=4).eval()
    model = build("sd15", block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                  scaling_factor=ref.config.scaling_factor)
    model.load_state_dict(ref.state_dict())
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mode() * ref.config.scaling_factor
        assert rel(model.encode(x), want) < 1e-5
        z = torch.randn(1, 4, 2, 3)
        assert rel(model.decode(z * ref.config.scaling_factor), ref.decode(z).sample) < 1e-5


def test_tiny_with_fused_upsample_matches_diffusers():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny(latent_channels=4).eval()
    model = build("taesd")
    model.load_state_dict(tiny_diffusers_to_taesd(ref.state_dict()), strict=True)
    z = torch.randn(2, 4, 5, 3)
    with torch.no_grad():
        assert rel(model.decode(z), ref.decode(z).sample) < 1e-5
