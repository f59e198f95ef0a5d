"""Channel RMS normalization (the Wan VAEs' norm) with a fused SiLU.

``y = x / max(||x||_C, eps) * sqrt(C) * gamma``, the norm taken over the channels of each position
separately (``F.normalize(x, dim=1)``), then optionally ``silu(y)``. x is (N, C, *positions),
contiguous: for each sample the channel planes are P = prod(positions) elements apart, so one
unit of work is a block of positions of one sample, whose program walks the channels twice (sum
of squares, then scale and write), reading contiguous runs. Statistics in float32 whatever the
storage dtype. The Triton path is the custom op ``torch.ops.codec.rms_norm`` (see ``_dispatch``).

The reference is what the model computed before the kernel existed: normalize in float32, cast to
x's dtype, scale, then SiLU in x's dtype (on the CPU it is the model's path, bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

from ._dispatch import HAVE_TRITON, launch_grid, launch_or_fallback, triton_ready

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-12  # F.normalize's default

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, gamma_ptr, y_ptr,  # x, y: (N, C, P) contiguous; gamma: (C,)
        C, P,  # channels, positions per sample
        scale, eps,  # sqrt(C), the floor of the norm
        BLOCKS, TOTAL,  # BLOCK-sized pieces of positions per sample; units of work N * BLOCKS
        SILU: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        for pid in range(tl.program_id(0), TOTAL, tl.num_programs(0)):
            n = pid // BLOCKS
            p = (pid % BLOCKS) * BLOCK + tl.arange(0, BLOCK)
            mask = p < P
            base = n.to(tl.int64) * C * P + p
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for c in range(0, C):
                v = tl.load(x_ptr + base + c * P, mask=mask, other=0.0).to(tl.float32)
                acc += v * v
            inv = scale / tl.maximum(tl.sqrt(acc), eps)
            for c in range(0, C):
                v = tl.load(x_ptr + base + c * P, mask=mask, other=0.0).to(tl.float32)
                y = v * inv * tl.load(gamma_ptr + c).to(tl.float32)
                if SILU:
                    y = y * tl.sigmoid(y)
                tl.store(y_ptr + base + c * P, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x, gamma, act):
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be (N, C, ...), got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if gamma.numel() != x.shape[1]:
        raise ValueError(f"gamma must hold {x.shape[1]} values (one per channel), got {tuple(gamma.shape)}")
    if act not in (None, "silu"):
        raise ValueError(f"act must be None or 'silu', got {act!r}")


def rms_norm(x, gamma, act=None, reference=False):
    """x: (N, C, ...) float32/float16/bfloat16; gamma: C values (any shape). Returns x's shape and
    dtype: ``x / max(||x||_C, 1e-12) * sqrt(C) * gamma``, then SiLU when ``act="silu"``."""
    _check(x, gamma, act)
    if triton_ready("rms_norm", x, reference=reference):
        return torch.ops.codec.rms_norm(x, gamma, act)
    return _reference(x, gamma, act)


@custom_op("codec::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, gamma: Tensor, act: str | None) -> Tensor:
    """The Triton path of :func:`rms_norm` (inputs checked by it); returns x's dtype, contiguous."""
    x = x.contiguous()
    return launch_or_fallback("rms_norm", lambda: _triton(x, gamma, act),
                              lambda: _reference(x, gamma, act).to(x.dtype).contiguous())


@_rms_norm_op.register_fake
def _rms_norm_fake(x, gamma, act):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _reference(x, gamma, act):
    shape = (-1,) + (1,) * (x.dim() - 2)
    y = F.normalize(x.float() if x.dtype != torch.float32 else x, dim=1, eps=EPS).to(x.dtype)
    y = y * x.shape[1] ** 0.5 * gamma.reshape(shape)
    return F.silu(y) if act == "silu" else y


def _triton(x, gamma, act):
    """x: contiguous."""
    n, c = x.shape[:2]
    p = x[0, 0].numel() if n and c else 0
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    block = min(1024, triton.next_power_of_2(max(p, 16)))
    blocks = triton.cdiv(p, block)
    _rms_norm_kernel[launch_grid(n * blocks)](x, gamma.reshape(-1).contiguous(), y, c, p, float(c) ** 0.5, EPS,
                                              blocks, n * blocks, SILU=act == "silu", BLOCK=block)
    return y
