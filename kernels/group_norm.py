"""GroupNorm with a fused activation, split into partial statistics and apply.

The split serves global-statistics tiling: every tile reports ``(count, mean, m2)`` per group,
:func:`merge_group_stats` combines them (Chan's parallel formula), and each tile is then
normalised with the frame's statistics by :func:`group_norm_apply`. :func:`group_norm` is the
same two steps on one tensor.

Layouts: x is (N, C, H, W), contiguous NCHW or channels_last. Inside a launch a group of sample
n is addressed as ``n * stride_n + c * stride_c + p * stride_p`` with p = h * W + w, which holds
for both layouts because H and W are always dense relative to each other. The launchers pass the
canonical strides of the format (computed from the shape: torch leaves the strides of size-1
dimensions arbitrary), so no strided view of x is ever made.

The Triton paths are the custom ops ``torch.ops.codec.group_norm`` (with its autograd formula),
``group_norm_stats`` and ``group_norm_apply``; see ``_dispatch``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

from ._dispatch import HAVE_TRITON, launch_grid, launch_or_fallback, triton_ready

_ACTS = {None: 0, "silu": 1, "relu": 2}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _channel_pixel(e, CPG, HW, PIX_MAJOR: tl.constexpr):
        """Element e of a group -> (channel within the group, pixel): pixel-major for
        channels_last (contiguous runs), channel-major for NCHW."""
        if PIX_MAJOR:
            c = e % CPG
            p = e // CPG
        else:
            c = e // HW
            p = e % HW
        return c, p

    @triton.jit
    def _gn_stats_kernel(
        x_ptr, count_ptr, mean_ptr, m2_ptr,  # x: (N, C, H, W); outputs: (N * G, SPLITS) fp32
        G, CPG, HW,  # groups, channels per group, pixels per channel
        stride_n, stride_c, stride_p,  # element strides of x (p = h * W + w)
        group_numel, chunk, SPLITS,  # elements per group, elements per unit (multiple of BLOCK)
        TOTAL,  # units of work: N * G * SPLITS, one (row, split) each; see launch_grid
        PIX_MAJOR: tl.constexpr,  # channels_last: walk pixel-major so reads are contiguous runs
        BLOCK: tl.constexpr,
    ):
        for pid in range(tl.program_id(0), TOTAL, tl.num_programs(0)):
            row = pid // SPLITS  # n * G + g
            split = pid % SPLITS
            n = row // G
            g = row % G
            base = x_ptr + n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c
            start = split * chunk
            end = tl.minimum(start + chunk, group_numel)
            cnt = 0.0
            mean = 0.0
            m2 = 0.0
            for off in range(start, end, BLOCK):
                e = off + tl.arange(0, BLOCK)
                mask = e < end
                c, p = _channel_pixel(e, CPG, HW, PIX_MAJOR)
                ptrs = base + c.to(tl.int64) * stride_c + p.to(tl.int64) * stride_p
                v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                # Two-pass statistics of the block in registers, then Chan's merge into the running
                # ones: one read of the data, no E[x^2] - E[x]^2 cancellation.
                b_cnt = tl.sum(mask.to(tl.float32), axis=0)
                b_mean = tl.sum(v, axis=0) / b_cnt
                d = tl.where(mask, v - b_mean, 0.0)
                b_m2 = tl.sum(d * d, axis=0)
                tot = cnt + b_cnt
                delta = b_mean - mean
                mean = mean + delta * (b_cnt / tot)
                m2 = m2 + b_m2 + delta * delta * (cnt * (b_cnt / tot))
                cnt = tot
            tl.store(count_ptr + pid, cnt)  # (row, split) row-major: pid itself
            tl.store(mean_ptr + pid, mean)
            tl.store(m2_ptr + pid, m2)

    @triton.jit
    def _gn_apply_kernel(
        x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr,  # y has x's strides; mean/rstd: (N * G,)
        G, CPG, HW, stride_n, stride_c, stride_p, group_numel,
        BLOCKS, TOTAL,  # BLOCK-sized pieces per group; units of work N * G * BLOCKS (launch_grid)
        HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        ACT: tl.constexpr,  # 0 none, 1 silu, 2 relu
        PIX_MAJOR: tl.constexpr, BLOCK: tl.constexpr,
    ):
        for pid in range(tl.program_id(0), TOTAL, tl.num_programs(0)):
            row = pid // BLOCKS
            n = row // G
            g = row % G
            e = (pid % BLOCKS) * BLOCK + tl.arange(0, BLOCK)
            mask = e < group_numel
            c, p = _channel_pixel(e, CPG, HW, PIX_MAJOR)
            offs = n.to(tl.int64) * stride_n + (g * CPG + c).to(tl.int64) * stride_c + p.to(tl.int64) * stride_p
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = (v - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row)
            if HAS_W:
                y = y * tl.load(w_ptr + g * CPG + c, mask=mask, other=1.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(b_ptr + g * CPG + c, mask=mask, other=0.0).to(tl.float32)
            if ACT == 1:
                y = y * tl.sigmoid(y)
            elif ACT == 2:
                y = tl.maximum(y, 0.0)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- checks, layout


def _check(x: torch.Tensor, num_groups: int, act=None, weight=None, bias=None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if num_groups <= 0 or x.shape[1] % num_groups:
        raise ValueError(f"channels ({x.shape[1]}) must be a multiple of num_groups ({num_groups})")
    if act not in _ACTS:
        raise ValueError(f"act must be one of {list(_ACTS)}, got {act!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (x.shape[1],):
            raise ValueError(f"{name} must have shape ({x.shape[1]},), got {tuple(t.shape)}")


def _format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of x and of every output shaped like it: channels_last when x is dense in
    it (and not also NCHW-contiguous), else NCHW (a non-dense x is made contiguous)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, torch.memory_format, tuple[int, int, int]]:
    """x dense in its format (no copy when it already is), the format, and the element strides
    (n, c, p) the kernels use, p = h * W + w: the format's canonical strides, correct for every
    dimension of size > 1 (the only ones ever indexed past 0)."""
    fmt = _format(x)
    x = x.contiguous(memory_format=fmt)
    n, c, h, w = x.shape
    strides = (c * h * w, h * w, 1) if fmt == torch.contiguous_format else (h * w * c, 1, c)
    return x, fmt, strides


def _geometry(x: torch.Tensor, num_groups: int, fmt):
    n, c, h, w = x.shape
    cpg, hw = c // num_groups, h * w
    numel = cpg * hw
    return n, cpg, hw, numel, _block(numel), fmt == torch.channels_last and cpg > 1


def _block(group_numel: int) -> int:
    return min(1024, 1 << (max(group_numel, 16) - 1).bit_length())  # next power of two, 16..1024


def stats_work(shape, num_groups: int) -> tuple[int, int, int]:
    """(splits per group, elements per split, units of work) of the statistics kernel for x of
    ``shape`` (N, C, H, W): long groups are split so a 32-group frame still fills the GPU."""
    n, c, h, w = shape
    numel, rows = c // num_groups * h * w, n * num_groups
    block = _block(numel)
    blocks = -(-numel // block)
    splits = min(blocks, max(1, -(-1024 // rows)))
    chunk = -(-blocks // splits) * block
    splits = -(-numel // chunk)
    return splits, chunk, rows * splits


def apply_work(shape, num_groups: int) -> tuple[int, int]:
    """(BLOCK-sized pieces per group, units of work) of the apply kernel for x of ``shape``."""
    n, c, h, w = shape
    numel = c // num_groups * h * w
    blocks = -(-numel // _block(numel))
    return blocks, n * num_groups * blocks


def _activate(y: torch.Tensor, act) -> torch.Tensor:
    if act == "silu":
        return F.silu(y)
    if act == "relu":
        return F.relu(y)
    return y


def _merge(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, dim: int):
    """Chan's combination of partial (count, mean, m2) along ``dim``, in fp32."""
    total = count.sum(dim)
    weight = count / total.clamp_min(1.0).unsqueeze(dim)
    mu = (weight * mean).sum(dim)
    m2 = m2.sum(dim) + (count * (mean - mu.unsqueeze(dim)).square()).sum(dim)
    return total, mu, m2


# ----------------------------------------------------------------------------- statistics


def _stats_triton(x: torch.Tensor, num_groups: int):
    x, fmt, strides = _dense(x)
    n, cpg, hw, numel, block, pix_major = _geometry(x, num_groups, fmt)
    rows = n * num_groups
    splits, chunk, total = stats_work(x.shape, num_groups)
    parts = torch.empty((3, rows, splits), device=x.device, dtype=torch.float32)
    _gn_stats_kernel[launch_grid(total)](
        x, parts[0], parts[1], parts[2], num_groups, cpg, hw, *strides, numel, chunk, splits, total,
        PIX_MAJOR=pix_major, BLOCK=block, num_warps=4,
    )
    count, mean, m2 = _merge(parts[0], parts[1], parts[2], dim=1)
    shape = (n, num_groups)
    return count.view(shape), mean.view(shape), m2.view(shape)


def _stats_reference(x: torch.Tensor, num_groups: int):
    n = x.shape[0]
    xf = x.float().reshape(n, num_groups, -1)
    mean = xf.mean(dim=-1)
    m2 = (xf - mean.unsqueeze(-1)).square().sum(dim=-1)
    count = torch.full_like(mean, float(xf.shape[-1]))
    return count, mean, m2


def group_norm_stats(x: torch.Tensor, num_groups: int, reference: bool = False):
    """Partial GroupNorm statistics of one tile.

    x: (N, C, H, W) float32/float16/bfloat16, NCHW or channels_last.
    Returns ``(count, mean, m2)``, each (N, G) float32: elements per group, their mean and the
    sum of squared deviations from that mean. Combine tiles with :func:`merge_group_stats`.
    A call that needs gradients runs the (differentiable) reference.
    """
    _check(x, num_groups)
    if triton_ready("group_norm_stats", x, reference=reference or _needs_grad(x)):
        return torch.ops.codec.group_norm_stats(x, num_groups)
    return _stats_reference(x, num_groups)


@custom_op("codec::group_norm_stats", mutates_args=())
def _stats_op(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton path of :func:`group_norm_stats` (inputs checked by it)."""
    return launch_or_fallback("group_norm_stats", lambda: _stats_triton(x, num_groups),
                              lambda: _stats_reference(x, num_groups))


@_stats_op.register_fake
def _stats_fake(x, num_groups):
    return tuple(x.new_empty((x.shape[0], num_groups), dtype=torch.float32) for _ in range(3))


def merge_group_stats(stats):
    """Combine partial statistics of several tiles (Chan et al.'s parallel formula).

    stats: a non-empty sequence of ``(count, mean, m2)``, each (N, G) float32.
    Returns the ``(count, mean, m2)`` of the union, each (N, G) float32.
    """
    stats = list(stats)
    if not stats:
        raise ValueError("merge_group_stats needs at least one (count, mean, m2) triple")
    count, mean, m2 = (torch.stack([s[i].float() for s in stats]) for i in range(3))
    return _merge(count, mean, m2, dim=0)


# ----------------------------------------------------------------------------- apply


def _apply_triton(x, mean, rstd, num_groups, weight, bias, act):
    x, fmt, strides = _dense(x)
    n, cpg, hw, numel, block, pix_major = _geometry(x, num_groups, fmt)
    y = torch.empty_like(x, memory_format=fmt)  # the canonical strides of fmt, as x is addressed
    mean = mean.to(device=x.device, dtype=torch.float32).contiguous()
    rstd = rstd.to(device=x.device, dtype=torch.float32).contiguous()
    blocks, total = apply_work(x.shape, num_groups)
    _gn_apply_kernel[launch_grid(total)](
        x, y, mean, rstd,
        weight if weight is not None else mean,  # dummy pointers, never read
        bias if bias is not None else mean,
        num_groups, cpg, hw, *strides, numel, blocks, total,
        HAS_W=weight is not None, HAS_B=bias is not None, ACT=_ACTS[act],
        PIX_MAJOR=pix_major, BLOCK=block, num_warps=4,
    )
    return y


def _apply_reference(x, mean, rstd, num_groups, weight, bias, act):
    fmt = _format(x)
    n, c, h, w = x.shape
    xf = x.float().reshape(n, num_groups, -1)
    y = ((xf - mean.float().unsqueeze(-1)) * rstd.float().unsqueeze(-1)).reshape(n, c, h, w)
    if weight is not None:
        y = y * weight.float().view(1, c, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, c, 1, 1)
    return _activate(y, act).to(x.dtype).contiguous(memory_format=fmt)


def group_norm_apply(x, mean, rstd, num_groups, weight=None, bias=None, act=None, reference=False):
    """Normalise with given statistics, then affine, then activation.

    x: (N, C, H, W) float32/float16/bfloat16, NCHW or channels_last.
    mean, rstd: (N, G) float32, rstd = 1 / sqrt(m2 / count + eps).
    weight, bias: (C,) or None. act: None, "silu" or "relu".
    Returns a tensor of x's shape, dtype and memory format. A call that needs gradients runs the
    (differentiable) reference: the Triton kernel has no backward.
    """
    _check(x, num_groups, act, weight, bias)
    expected = (x.shape[0], num_groups)
    if tuple(mean.shape) != expected or tuple(rstd.shape) != expected:
        raise ValueError(f"mean and rstd must be {expected}, got {tuple(mean.shape)}, {tuple(rstd.shape)}")
    if triton_ready("group_norm_apply", x, reference=reference or _needs_grad(x, mean, rstd, weight, bias)):
        return torch.ops.codec.group_norm_apply(x, mean, rstd, num_groups, weight, bias, act)
    return _apply_reference(x, mean, rstd, num_groups, weight, bias, act)


@custom_op("codec::group_norm_apply", mutates_args=())
def _apply_op(x: Tensor, mean: Tensor, rstd: Tensor, num_groups: int, weight: Tensor | None,
              bias: Tensor | None, act: str | None) -> Tensor:
    """The Triton path of :func:`group_norm_apply` (inputs checked by it)."""
    return launch_or_fallback("group_norm_apply", lambda: _apply_triton(x, mean, rstd, num_groups, weight, bias, act),
                              lambda: _apply_reference(x, mean, rstd, num_groups, weight, bias, act))


@_apply_op.register_fake
def _apply_fake(x, mean, rstd, num_groups, weight, bias, act):
    return torch.empty_like(x, memory_format=_format(x))


def _reference(x, num_groups, weight, bias, eps, act):
    fmt = _format(x)
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y = F.group_norm(x.float(), num_groups, w, b, eps)
    return _activate(y, act).to(x.dtype).contiguous(memory_format=fmt)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-6, act=None, reference=False):
    """GroupNorm (biased variance, like ``torch.nn.GroupNorm``) with a fused activation.

    x: (N, C, H, W) float32/float16/bfloat16, NCHW or channels_last; statistics in float32.
    weight, bias: (C,) or None. act: None, "silu" or "relu", applied after the affine.
    Returns a tensor of x's shape, dtype and memory format. Differentiable on every path (the
    Triton op through its registered autograd formula, whose backward is torch code).
    """
    _check(x, num_groups, act, weight, bias)
    if triton_ready("group_norm", x, reference=reference):
        return torch.ops.codec.group_norm(x, num_groups, weight, bias, float(eps), act)[0]
    return _reference(x, num_groups, weight, bias, eps, act)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@custom_op("codec::group_norm", mutates_args=())
def _group_norm_op(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                   act: str | None) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton path of :func:`group_norm` (inputs checked by it): ``(y, mean, rstd)``, the
    statistics ((N, G) float32) kept for the backward, not differentiable."""

    def triton_call():
        count, mean, m2 = _stats_triton(x, num_groups)
        rstd = torch.rsqrt(m2 / count + eps)
        return _apply_triton(x, mean, rstd, num_groups, weight, bias, act), mean, rstd

    def reference_call():
        count, mean, m2 = _stats_reference(x, num_groups)
        return _reference(x, num_groups, weight, bias, eps, act), mean, torch.rsqrt(m2 / count + eps)

    return launch_or_fallback("group_norm", triton_call, reference_call)


@_group_norm_op.register_fake
def _group_norm_fake(x, num_groups, weight, bias, eps, act):
    stats = (x.shape[0], num_groups)
    return (torch.empty_like(x, memory_format=_format(x)), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


def _group_norm_setup(ctx, inputs, output):
    x, num_groups, weight, bias, _, act = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.act = num_groups, act


def _group_norm_grad(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    d_x, d_weight, d_bias = _backward(grad, x, weight, bias, mean, rstd, ctx.num_groups, ctx.act)
    return d_x, None, d_weight, d_bias, None, None


_group_norm_op.register_autograd(_group_norm_grad, setup_context=_group_norm_setup)


def _backward(grad, x, weight, bias, mean, rstd, num_groups, act):
    """Gradients of y = act(xhat * weight + bias), xhat = (x - mean) * rstd per group, with respect
    to x, weight and bias (None for an absent affine), in fp32; mean, rstd: (N, G) fp32."""
    n, c, h, w = x.shape
    fmt = _format(x)
    per_group = (n, num_groups, -1)
    xhat = (x.float().reshape(per_group) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    xhat = xhat.reshape(n, c, h, w)
    g = grad.float()
    if act is not None:
        z = xhat
        if weight is not None:
            z = z * weight.float().view(1, c, 1, 1)
        if bias is not None:
            z = z + bias.float().view(1, c, 1, 1)
        if act == "silu":
            s = torch.sigmoid(z)
            g = g * (s * (1 + z * (1 - s)))
        else:  # relu
            g = g * (z > 0)
    d_weight = (g * xhat).sum((0, 2, 3)).to(weight.dtype) if weight is not None else None
    d_bias = g.sum((0, 2, 3)).to(bias.dtype) if bias is not None else None
    g_xhat = (g * weight.float().view(1, c, 1, 1) if weight is not None else g).reshape(per_group)
    xhat = xhat.reshape(per_group)
    d_x = rstd.unsqueeze(-1) * (g_xhat - g_xhat.mean(-1, keepdim=True)
                                - xhat * (g_xhat * xhat).mean(-1, keepdim=True))
    return d_x.reshape(n, c, h, w).to(x.dtype).contiguous(memory_format=fmt), d_weight, d_bias
