"""The RMS norm (+ SiLU) kernel against its torch reference and float64, under the Triton interpreter."""

import pytest
import torch
import torch.nn.functional as F

import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C, positions...): one position, odd sizes, 5D video tensors, channels not a power of two.
SHAPES = [(1, 3, 1), (2, 5, 3, 7), (1, 6, 2, 3, 5), (2, 12, 1, 4, 4)]


def truth(x, gamma, act):
    xd = x.double()
    y = xd / xd.norm(dim=1, keepdim=True).clamp_min(1e-12) * x.shape[1] ** 0.5
    y = y * gamma.double().reshape((-1,) + (1,) * (x.dim() - 2))
    return F.silu(y) if act == "silu" else y


def interpreter_bf16(t):
    """float32 -> bfloat16 as the CPU interpreter casts (it truncates; a GPU rounds to nearest)."""
    return (t.float().view(torch.int32) & -65536).view(torch.float32).bfloat16()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    gamma = torch.randn(shape[1], 1, 1, generator=g).to(dtype)
    for act in (None, "silu"):
        out = kernels.rms_norm(x, gamma, act)
        ref = kernels.rms_norm(x, gamma, act, reference=True)
        exact = truth(x, gamma, act)
        assert out.dtype == dtype and out.shape == x.shape
        err_out = (out.double() - exact).abs().max().item()
        err_ref = (ref.double() - exact).abs().max().item()
        if dtype == torch.bfloat16 and kernels.interpreting():
            err_ref = max(err_ref, (interpreter_bf16(exact).double() - exact).abs().max().item())
        # The kernel keeps float32 until its one final cast: never worse than twice the reference.
        assert err_out <= 2 * err_ref + 1e-5, (act, err_out, err_ref)


def test_zero_vector_and_bad_input():
    x = torch.zeros(1, 4, 3)
    assert torch.equal(kernels.rms_norm(x, torch.ones(4), "silu"), x)  # norm floored, no NaN
    with pytest.raises(ValueError, match="one per channel"):
        kernels.rms_norm(x, torch.ones(3))
    with pytest.raises(ValueError, match="act"):
        kernels.rms_norm(x, torch.ones(4), act="relu")
    with pytest.raises(TypeError, match="float32"):
        kernels.rms_norm(x.double(), torch.ones(4))


def test_wan_model_runs_the_kernel():
    """A small Wan VAE with the kernel (interpreted here) matches its torch-reference run."""
    from codec.models.config import WanConfig
    from codec.models.video_autoencoder import VideoAutoencoder

    torch.manual_seed(0)
    model = VideoAutoencoder(WanConfig(base_dim=8, latent_channels=4, num_res_blocks=1)).eval()
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = model.encode(x)
    with kernels.force_reference():
        z_ref = model.encode(x)
    assert ((z - z_ref).norm() / z_ref.norm()).item() < 1e-5
