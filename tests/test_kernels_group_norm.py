"""GroupNorm kernels against their torch reference and F.group_norm, under the Triton interpreter."""

import pytest
import torch
import torch.nn.functional as F

import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# (N, C, H, W, groups): one pixel, odd sizes, channels that are not a power of two.
SHAPES = [(1, 6, 1, 1, 3), (3, 12, 5, 7, 3), (2, 6, 3, 1, 6), (1, 4, 2, 9, 1)]


def _act64(y, act):
    return {None: y, "silu": F.silu(y), "relu": F.relu(y)}[act]


def _truth(x, groups, w, b, eps, act):
    wd = None if w is None else w.double()
    bd = None if b is None else b.double()
    return _act64(F.group_norm(x.double(), groups, wd, bd, eps), act)


def interpreter_bf16(t):
    """float32 -> bfloat16 as Triton's CPU interpreter casts: it truncates (a GPU rounds to nearest)."""
    return (t.float().view(torch.int32) & -65536).view(torch.float32).bfloat16()


def assert_within_reference_error(out, ref, truth, atol=1e-5):
    """Low precision: the kernel may lose at most twice what the reference loses (plus atol).

    Under the interpreter a bfloat16 store truncates, so there the bound also admits twice what
    truncating the exact answer loses; on a GPU (bench/gpu_kernels.py) the plain rule applies.
    """
    err_out = (out.double() - truth).abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    if out.dtype == torch.bfloat16 and kernels.interpreting():
        err_ref = max(err_ref, (interpreter_bf16(truth).double() - truth).abs().max().item())
    assert err_out <= 2 * err_ref + atol, (err_out, err_ref)


def _inputs(shape, dtype, fmt, affine=True, seed=0):
    n, c, h, w, groups = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * 2 + 0.5).to(dtype).contiguous(memory_format=FORMATS[fmt])
    weight = torch.randn(c, generator=g).to(dtype) if affine else None
    bias = torch.randn(c, generator=g).to(dtype) if affine else None
    return x, groups, weight, bias


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_group_norm_matches_reference(shape, dtype, fmt):
    x, groups, w, b = _inputs(shape, dtype, fmt)
    for act in (None, "silu"):
        out = kernels.group_norm(x, groups, w, b, eps=1e-6, act=act)
        ref = kernels.group_norm(x, groups, w, b, eps=1e-6, act=act, reference=True)
        assert out.dtype == dtype and out.shape == x.shape
        assert out.is_contiguous(memory_format=FORMATS[fmt])
        if dtype == torch.float32:
            plain = _act64(F.group_norm(x, groups, w, b, 1e-6), act)
            torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ref, plain, rtol=1e-5, atol=1e-5)
        else:
            assert_within_reference_error(out, ref, _truth(x, groups, w, b, 1e-6, act))


@pytest.mark.parametrize("act", [None, "relu", "silu"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_group_norm_without_affine(act, fmt):
    x, groups, _, _ = _inputs((3, 6, 3, 5, 3), torch.float32, fmt, affine=False)
    out = kernels.group_norm(x, groups, act=act, eps=1e-5)
    torch.testing.assert_close(out, _act64(F.group_norm(x, groups, eps=1e-5), act), rtol=1e-5, atol=1e-5)


def test_stats_survive_a_large_offset():
    # E[x^2] - E[x]^2 would lose every digit of the variance here; Welford/Chan keeps them.
    g = torch.Generator().manual_seed(1)
    x = 1000.0 + 0.01 * torch.randn(2, 6, 7, 9, generator=g)
    count, mean, m2 = kernels.group_norm_stats(x, 3)
    xd = x.double().reshape(2, 3, -1)
    truth = (xd - xd.mean(-1, keepdim=True)).square().sum(-1)
    torch.testing.assert_close(m2.double(), truth, rtol=1e-3, atol=0)
    torch.testing.assert_close(count, torch.full((2, 3), 126.0))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stats_of_slices_merge_to_stats_of_whole(dtype, fmt):
    x, groups, w, b = _inputs((2, 12, 9, 5, 3), dtype, fmt, seed=2)
    parts = [x[:, :, :3], x[:, :, 3:4], x[:, :, 4:]]  # three horizontal slices, uneven
    for reference in (False, True):
        merged = kernels.merge_group_stats(
            [kernels.group_norm_stats(p, groups, reference=reference) for p in parts]
        )
        whole = kernels.group_norm_stats(x, groups, reference=True)
        for got, want in zip(merged, whole):
            assert got.shape == (2, 3) and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_apply_with_global_stats_equals_untiled(fmt):
    eps = 1e-6
    x, groups, w, b = _inputs((1, 6, 7, 4, 3), torch.float32, fmt, seed=3)
    parts = [x[:, :, :2], x[:, :, 2:5], x[:, :, 5:]]
    count, mean, m2 = kernels.merge_group_stats([kernels.group_norm_stats(p, groups) for p in parts])
    rstd = torch.rsqrt(m2 / count + eps)
    tiled = [kernels.group_norm_apply(p, mean, rstd, groups, w, b, "silu") for p in parts]
    for t, p in zip(tiled, parts):
        ref = kernels.group_norm_apply(p, mean, rstd, groups, w, b, "silu", reference=True)
        torch.testing.assert_close(t, ref, rtol=1e-5, atol=1e-6)
    whole = F.silu(F.group_norm(x, groups, w, b, eps))
    torch.testing.assert_close(torch.cat(tiled, dim=2), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_apply_low_precision(dtype):
    x, groups, w, b = _inputs((3, 12, 2, 3, 3), dtype, "nhwc", seed=4)
    count, mean, m2 = kernels.group_norm_stats(x, groups)
    rstd = torch.rsqrt(m2 / count + 1e-6)
    out = kernels.group_norm_apply(x, mean, rstd, groups, w, b, act="relu")
    ref = kernels.group_norm_apply(x, mean, rstd, groups, w, b, act="relu", reference=True)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_within_reference_error(out, ref, _truth(x, groups, w, b, 1e-6, "relu"))


def test_non_dense_input_is_accepted():
    x = torch.randn(2, 6, 5, 8)[..., ::2]  # neither NCHW- nor NHWC-contiguous
    torch.testing.assert_close(kernels.group_norm(x, 3), F.group_norm(x, 3, eps=1e-6), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
    x = torch.randn(1, 6, 2, 2)
    with pytest.raises(ValueError):
        kernels.group_norm(x, 4)
    with pytest.raises(ValueError):
        kernels.group_norm(x, 3, act="gelu")
    with pytest.raises(TypeError):
        kernels.group_norm(x.double(), 3)
    with pytest.raises(ValueError):
        kernels.group_norm_apply(x, torch.zeros(1, 2), torch.ones(1, 2), 3)


# ----------------------------------------------------------------------------- backward


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", [None, "silu", "relu"])
def test_backward_matches_torch(act, fmt, affine):
    x, groups, w, b = _inputs((2, 12, 5, 3, 3), torch.float32, fmt, affine=affine, seed=5)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    leaves = [t for t in (x, w, b) if t is not None]

    def grads(fn):
        ins = [t.detach().clone().requires_grad_() for t in leaves]
        xi, wi, bi = (ins + [None, None])[:3]
        fn(xi, wi, bi).backward(grad_out)
        return [t.grad for t in ins]

    assert kernels.use_triton(x)  # the interpreter runs the Triton forward
    ours = grads(lambda xi, wi, bi: kernels.group_norm(xi, groups, wi, bi, eps=1e-6, act=act))
    want = grads(lambda xi, wi, bi: _act64(F.group_norm(xi, groups, wi, bi, 1e-6), act))
    for got, ref, name in zip(ours, want, ("x", "weight", "bias")):
        assert got is not None, name
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=name)
    assert ours[0].is_contiguous(memory_format=FORMATS[fmt])


def test_stats_and_apply_with_grad_run_the_differentiable_reference():
    x, groups = _inputs((1, 6, 4, 4, 3), torch.float32, "nchw")[:2]
    x.requires_grad_()
    count, mean, m2 = kernels.group_norm_stats(x, groups)
    rstd = torch.rsqrt(m2 / count + 1e-6)
    y = kernels.group_norm_apply(x, mean, rstd, groups, act="silu")
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    F.silu(F.group_norm(x2, groups, eps=1e-6)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_every_kl_decoder_parameter_gets_a_gradient_through_the_triton_path(monkeypatch):
    """On CUDA the Triton GroupNorm had no backward: `codec train` updated 2 of 68 decoder tensors."""
    import importlib

    from codec.models import build

    gn_module = importlib.import_module("kernels.group_norm")  # the module, not the function

    torch.manual_seed(0)
    model = build("sd15", block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4)
    launches = []
    real = gn_module._apply_triton
    monkeypatch.setattr(gn_module, "_apply_triton", lambda *a: launches.append(1) or real(*a))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))

    def decoder_grads():
        model.zero_grad(set_to_none=True)
        model._decode_raw(z).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters()
                if {"decoder", "post_quant_conv"} & set(n.split("."))}

    ours = decoder_grads()  # Triton GroupNorm under the interpreter
    assert len(launches) >= 18  # every GroupNorm of the decoder went through the Triton kernel
    with kernels.force_reference():
        want = decoder_grads()
    assert len(ours) > 40
    for name, g in ours.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, want[name], rtol=1e-3, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- launch grids


def test_launch_grids_of_a_4k_frame_respect_cuda_limits():
    """256 channels at 4096x2160: main launched apply on (N*G, blocks) with blocks > 65535 (grid y)."""
    from kernels._dispatch import launch_grid
    from kernels.group_norm import apply_work, stats_work

    shape = (1, 256, 2160, 4096)
    blocks, total = apply_work(shape, 32)
    assert blocks == 8 * 2160 * 4096 // 1024 > 65535 and total == 32 * blocks
    grid = launch_grid(total)
    assert grid == (total,) and grid[0] <= 2**31 - 1  # one program per unit, on grid x only
    splits, chunk, total = stats_work(shape, 32)
    assert splits * chunk >= 8 * 2160 * 4096 and launch_grid(total) == (32 * splits,)
    assert launch_grid(2**40) == (2**31 - 1,)  # beyond x's limit the programs loop
