"""Per-tile change between two stacks of tiles, for the temporal cache: max and mean of |a - b|.

One pass over both inputs: each program reduces a slice of one tile to a partial max and sum
(fp32, so uint8 never wraps), written to a small (K, S) buffer that torch folds afterwards.
A fixed buffer instead of atomics keeps the result deterministic. The Triton path is the custom
op ``torch.ops.codec.tile_change`` (see ``_dispatch``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from ._dispatch import HAVE_TRITON, launch_grid, launch_or_fallback, triton_ready

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_change_kernel(
        a_ptr, b_ptr,  # (K, M) contiguous, uint8 or float
        max_ptr, sum_ptr,  # (K, SPLITS) float32 partials
        M, chunk, SPLITS,  # elements per tile, elements per unit of work (multiple of BLOCK)
        TOTAL,  # units of work: K * SPLITS, one (tile, split) each; see launch_grid
        BLOCK: tl.constexpr,
    ):
        for pid in range(tl.program_id(0), TOTAL, tl.num_programs(0)):
            k = pid // SPLITS
            split = pid % SPLITS
            base = k.to(tl.int64) * M
            start = split * chunk
            end = tl.minimum(start + chunk, M)
            acc_max = tl.zeros((BLOCK,), dtype=tl.float32)
            acc_sum = tl.zeros((BLOCK,), dtype=tl.float32)
            for off in range(start, end, BLOCK):
                e = off + tl.arange(0, BLOCK)
                mask = e < end
                a = tl.load(a_ptr + base + e, mask=mask, other=0).to(tl.float32)
                b = tl.load(b_ptr + base + e, mask=mask, other=0).to(tl.float32)
                d = tl.abs(a - b)  # masked lanes are 0 - 0
                acc_max = tl.maximum(acc_max, d)
                acc_sum += d
            tl.store(max_ptr + pid, tl.max(acc_max, axis=0))  # (tile, split) row-major: pid itself
            tl.store(sum_ptr + pid, tl.sum(acc_sum, axis=0))


def _reference(a: torch.Tensor, b: torch.Tensor):
    d = (a.reshape(a.shape[0], -1).float() - b.reshape(b.shape[0], -1).float()).abs()
    return d.amax(dim=1), d.mean(dim=1)


def tile_change(current, reference_tiles, reference=False):
    """Max and mean absolute difference per tile.

    current, reference_tiles: (K, ...) of identical shape and dtype (uint8 or float), K >= 1
    and at least one element per tile. Returns ``(max_abs, mean_abs)``, each (K,) float32,
    computed in float32 (values in uint8 units for uint8 input).
    """
    a, b = current, reference_tiles
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"tiles differ: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
    if a.dim() < 1 or a.numel() == 0:
        raise ValueError(f"need (K, ...) tiles with at least one element, got {tuple(a.shape)}")
    if a.dtype == torch.bool or a.is_complex():
        raise TypeError(f"tiles must be uint8 or float, got {a.dtype}")
    if triton_ready("tile_change", a, b, reference=reference):
        return torch.ops.codec.tile_change(a, b)
    return _reference(a, b)


@custom_op("codec::tile_change", mutates_args=())
def _tile_change_op(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The Triton path of :func:`tile_change` (inputs checked by it)."""
    return launch_or_fallback("tile_change", lambda: _triton(a, b), lambda: _reference(a, b))


@_tile_change_op.register_fake
def _tile_change_fake(a, b):
    return a.new_empty(a.shape[:1], dtype=torch.float32), a.new_empty(a.shape[:1], dtype=torch.float32)


def _triton(a, b):
    k = a.shape[0]
    a = a.reshape(k, -1).contiguous()
    b = b.reshape(k, -1).contiguous()
    m = a.shape[1]
    block = min(2048, triton.next_power_of_2(max(m, 16)))
    blocks = triton.cdiv(m, block)
    splits = min(blocks, max(1, triton.cdiv(512, k)))  # enough programs to fill the GPU
    chunk = triton.cdiv(blocks, splits) * block
    splits = triton.cdiv(m, chunk)
    parts = torch.empty((2, k, splits), device=a.device, dtype=torch.float32)
    _tile_change_kernel[launch_grid(k * splits)](a, b, parts[0], parts[1], m, chunk, splits, k * splits,
                                                 BLOCK=block, num_warps=4)
    return parts[0].amax(dim=1), parts[1].sum(dim=1) / m
