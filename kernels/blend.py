"""Weighted blending of overlapping tiles into a canvas, and the smooth ramp windows to weigh them.

out = sum_k w_k * tile_k / sum_k w_k wherever a tile covers a pixel, 0 elsewhere. The kernel
scatters numerator and weight sum with float atomics (tiles overlap, so two programs may add to
one pixel): the result is exact up to the order of additions, which may vary between runs.
The Triton path is the custom op ``torch.ops.codec.blend_tiles`` (see ``_dispatch``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.library import custom_op

from ._dispatch import HAVE_TRITON, launch_grid, launch_or_fallback, triton_ready

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _blend_scatter_kernel(
        tile_ptr, org_ptr, win_ptr, num_ptr, den_ptr,
        # tile: (K, C, TH, TW) any float strides; org: (K, 3) int64 contiguous (f, y, x);
        # win: (K or 1, TH, TW) fp32 contiguous; num: (F, C, H, W) fp32 contiguous; den: (F, H, W)
        C, TH, TW, FR, H, W,
        t_k, t_c, t_h, t_w,
        WIN_K,  # TH * TW when every tile has its own window, 0 when they share one
        BLOCKS, TOTAL,  # BLOCK-sized pieces per tile row; units of work K * TH * BLOCKS (launch_grid)
        BLOCK: tl.constexpr,
    ):
        for pid in range(tl.program_id(0), TOTAL, tl.num_programs(0)):
            row = pid // BLOCKS  # k * TH + i: one row of one tile, every channel
            k = row // TH
            i = row % TH
            j = (pid % BLOCKS) * BLOCK + tl.arange(0, BLOCK)
            f = tl.load(org_ptr + k * 3)
            y = tl.load(org_ptr + k * 3 + 1) + i
            x = tl.load(org_ptr + k * 3 + 2) + j
            # Clip tiles that stick out of the canvas (or name a frame outside it).
            ok_row = (f >= 0) & (f < FR) & (y >= 0) & (y < H)  # scalar: broadcast it by where()
            mask = tl.where(ok_row, (j < TW) & (x >= 0) & (x < W), False)
            w = tl.load(win_ptr + k * WIN_K + i * TW + j, mask=mask, other=0.0)
            pix = (f * H + y) * W + x  # int64: origins are int64
            tl.atomic_add(den_ptr + pix, w, mask=mask)
            src = tile_ptr + k.to(tl.int64) * t_k + i.to(tl.int64) * t_h + j.to(tl.int64) * t_w
            for c in range(C):
                v = tl.load(src + c * t_c, mask=mask, other=0.0).to(tl.float32)
                tl.atomic_add(num_ptr + pix + (f * (C - 1) + c) * H * W, w * v, mask=mask)


def ramp_window(th, tw, overlap_y, overlap_x, edges=(False, False, False, False), device=None):
    """Separable raised-cosine weights for one tile, (th, tw) float32 in (0, 1].

    A side ramps over ``overlap`` pixels when it has a neighbour and stays flat at 1 when its
    flag in ``edges = (top, bottom, left, right)`` says it lies on the image border. The ramp
    argument is (i + 0.5) / overlap, so no weight is exactly 0 and two facing ramps sum to 1.
    """
    top, bottom, left, right = (bool(e) for e in edges)

    def profile(n: int, overlap: int, flat_start: bool, flat_end: bool) -> torch.Tensor:
        p = torch.ones(n, dtype=torch.float64)
        overlap = min(int(overlap), n)
        if overlap > 0:
            t = (torch.arange(overlap, dtype=torch.float64) + 0.5) / overlap
            ramp = 0.5 - 0.5 * torch.cos(math.pi * t)
            if not flat_start:
                p[:overlap] *= ramp
            if not flat_end:
                p[n - overlap :] *= ramp.flip(0)
        return p

    wy = profile(th, overlap_y, top, bottom)
    wx = profile(tw, overlap_x, left, right)
    return torch.outer(wy, wx).to(device=device, dtype=torch.float32)


def _check(tiles, origins, window, out_shape):
    if tiles.dim() != 4 or not tiles.is_floating_point():
        raise ValueError(f"tiles must be (K, C, th, tw) float, got {tuple(tiles.shape)} {tiles.dtype}")
    k, c, th, tw = tiles.shape
    if tuple(origins.shape) != (k, 3):
        raise ValueError(f"origins must be ({k}, 3) (frame, y, x), got {tuple(origins.shape)}")
    if tuple(window.shape) not in ((th, tw), (k, th, tw)):
        raise ValueError(f"window must be ({th}, {tw}) or ({k}, {th}, {tw}), got {tuple(window.shape)}")
    if len(out_shape) != 4 or out_shape[1] != c:
        raise ValueError(f"out_shape must be (F, {c}, H, W), got {tuple(out_shape)}")


def _reference(tiles, origins, window, out_shape):
    fr, c, h, w = out_shape
    k, _, th, tw = tiles.shape
    num = torch.zeros((fr, c, h, w), device=tiles.device, dtype=torch.float32)
    den = torch.zeros((fr, 1, h, w), device=tiles.device, dtype=torch.float32)
    win = window.float().expand(k, th, tw)
    for t, (f, y, x) in enumerate(origins.tolist()):
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + th, h), min(x + tw, w)
        if not (0 <= f < fr) or y0 >= y1 or x0 >= x1:
            continue
        wt = win[t, y0 - y : y1 - y, x0 - x : x1 - x]
        num[f, :, y0:y1, x0:x1] += wt * tiles[t, :, y0 - y : y1 - y, x0 - x : x1 - x].float()
        den[f, 0, y0:y1, x0:x1] += wt
    return num.div_(den.clamp_min_(torch.finfo(torch.float32).tiny))


def blend_tiles(tiles, origins, window, out_shape, reference=False):
    """Blend overlapping tiles into frames.

    tiles: (K, C, th, tw) float. origins: (K, 3) int64, (frame f, top y, left x) of each tile in
    the output; tiles may stick out past the canvas and are clipped. window: (th, tw) or
    (K, th, tw) float32 weights > 0. out_shape: (F, C, H, W).
    Returns (F, C, H, W) float32 contiguous: the weighted mean of the tiles covering each pixel,
    0 where none does.
    """
    _check(tiles, origins, window, out_shape)
    shape = tuple(int(s) for s in out_shape)
    if triton_ready("blend_tiles", tiles, origins, window, reference=reference):
        return torch.ops.codec.blend_tiles(tiles, origins, window, shape)
    return _reference(tiles, origins.to(torch.int64), window, shape)


@custom_op("codec::blend_tiles", mutates_args=())
def _blend_op(tiles: Tensor, origins: Tensor, window: Tensor, out_shape: list[int]) -> Tensor:
    """The Triton path of :func:`blend_tiles` (inputs checked by it)."""
    shape = tuple(out_shape)
    return launch_or_fallback("blend_tiles", lambda: _blend_triton(tiles, origins, window, shape),
                              lambda: _reference(tiles, origins.to(torch.int64), window, shape))


@_blend_op.register_fake
def _blend_fake(tiles, origins, window, out_shape):
    return tiles.new_empty(tuple(out_shape), dtype=torch.float32)


def _blend_triton(tiles, origins, window, out_shape):
    fr, c, h, w = out_shape
    k, _, th, tw = tiles.shape
    num = torch.zeros((fr, c, h, w), device=tiles.device, dtype=torch.float32)
    den = torch.zeros((fr, 1, h, w), device=tiles.device, dtype=torch.float32)
    org = origins.to(device=tiles.device, dtype=torch.int64).contiguous()
    win = window.to(device=tiles.device, dtype=torch.float32).contiguous()
    block = min(1024, triton.next_power_of_2(max(tw, 16)))
    blocks = triton.cdiv(tw, block)
    if k and th and tw:
        _blend_scatter_kernel[launch_grid(k * th * blocks)](
            tiles, org, win, num, den, c, th, tw, fr, h, w, *tiles.stride(),
            th * tw if win.dim() == 3 else 0, blocks, k * th * blocks, BLOCK=block, num_warps=4,
        )
    # Pixels nothing covered have num == 0, so dividing by a tiny weight leaves them at 0.
    return num.div_(den.clamp_min_(torch.finfo(torch.float32).tiny))
