"""uint8 RGB frames <-> model tensors in [-1, 1], with edge padding and cropping.

Both directions are exact twins of their torch references: the input side computes
``(2 * v - 255) * (1 / 255)`` (the subtraction is exact, so one rounding, no FMA to differ on)
and the output side rounds half to even from an exact floor/fraction split, like ``torch.round``.
The Triton paths are the custom ops ``torch.ops.codec.frames_to_input`` and
``torch.ops.codec.output_to_frames`` (see ``_dispatch``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from ._dispatch import HAVE_TRITON, launch_grid, launch_or_fallback, triton_ready

_INV255 = 1.0 / 255.0

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _to_input_kernel(
        src_ptr, dst_ptr,  # src: (N, H, W, 3) uint8; dst: (N, 3, H2, W2) float
        H, W, H2, W2,
        s_n, s_h, s_w, s_c,  # strides of src
        d_n, d_c, d_h, d_w,  # strides of dst (NCHW or channels_last)
        BLOCKS, TOTAL,  # BLOCK-sized pieces per output row; units of work N * H2 * BLOCKS
        BLOCK: tl.constexpr,
    ):
        for pid in range(tl.program_id(0), TOTAL, tl.num_programs(0)):
            row = pid // BLOCKS  # n * H2 + y
            n = row // H2
            y = row % H2
            j = (pid % BLOCKS) * BLOCK + tl.arange(0, BLOCK)  # x * 3 + c along the output row
            mask = j < W2 * 3
            x = j // 3
            c = j % 3
            # Edge padding: rows/columns past the frame repeat the last one.
            sy = tl.minimum(y, H - 1).to(tl.int64)
            sx = tl.minimum(x, W - 1).to(tl.int64)
            v = tl.load(src_ptr + n.to(tl.int64) * s_n + sy * s_h + sx * s_w + c * s_c, mask=mask, other=0)
            v = (v.to(tl.float32) * 2.0 - 255.0) * 0.00392156862745098  # 1 / 255
            dst = n.to(tl.int64) * d_n + c.to(tl.int64) * d_c + y.to(tl.int64) * d_h + x.to(tl.int64) * d_w
            tl.store(dst_ptr + dst, v.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _to_frames_kernel(
        src_ptr, dst_ptr,  # src: (N, 3, H, W) float; dst: (N, HO, WO, 3) uint8 contiguous
        HO, WO,
        s_n, s_c, s_h, s_w,
        BLOCKS, TOTAL,  # BLOCK-sized pieces per output row; units of work N * HO * BLOCKS
        BLOCK: tl.constexpr,
    ):
        for pid in range(tl.program_id(0), TOTAL, tl.num_programs(0)):
            row = pid // BLOCKS  # n * HO + y
            n = row // HO
            y = row % HO
            j = (pid % BLOCKS) * BLOCK + tl.arange(0, BLOCK)
            mask = j < WO * 3
            x = j // 3
            c = j % 3
            src = n.to(tl.int64) * s_n + c.to(tl.int64) * s_c + y.to(tl.int64) * s_h + x.to(tl.int64) * s_w
            v = tl.load(src_ptr + src, mask=mask, other=0.0).to(tl.float32)
            v = (tl.minimum(tl.maximum(v, -1.0), 1.0) + 1.0) * 127.5
            # Round half to even, from an exact split (v < 2**23, so v - floor(v) is exact).
            f = tl.floor(v)
            frac = v - f
            odd = (f.to(tl.int32) % 2) == 1
            r = f + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
            tl.store(dst_ptr + row.to(tl.int64) * WO * 3 + j, r.to(tl.uint8), mask=mask)


def _block(n: int) -> int:
    return min(1024, triton.next_power_of_2(max(n, 16)))


def _input_reference(frames, h2, w2, dtype, fmt):
    n, h, w, _ = frames.shape
    x = (frames.to(torch.float32) * 2.0 - 255.0) * _INV255
    x = x.permute(0, 3, 1, 2)
    if (h2, w2) != (h, w):
        # Replicate padding by indexing: F.pad(mode="replicate") does not take every dtype/size.
        rows = torch.arange(h2, device=x.device).clamp_max(h - 1)
        cols = torch.arange(w2, device=x.device).clamp_max(w - 1)
        x = x[:, :, rows][:, :, :, cols]
    return x.to(dtype).contiguous(memory_format=fmt)


def frames_to_input(frames, size=None, dtype=torch.float32, channels_last=False, reference=False):
    """uint8 RGB frames to model input.

    frames: (N, H, W, 3) uint8 RGB, any device and strides.
    size: (H2, W2) >= (H, W), or None for (H, W); extra rows/columns at the bottom/right repeat
    the last row/column. Returns (N, 3, H2, W2) of ``dtype`` in [-1, 1] (v / 127.5 - 1),
    channels_last memory format when asked.
    """
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (N, H, W, 3), got {getattr(frames, 'shape', type(frames))}")
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}")
    n, h, w, _ = frames.shape
    h2, w2 = (h, w) if size is None else (int(size[0]), int(size[1]))
    if h2 < h or w2 < w or h == 0 or w == 0:
        raise ValueError(f"size must be >= the frame size {(h, w)}, got {(h2, w2)}")
    if triton_ready("frames_to_input", frames, reference=reference):
        return torch.ops.codec.frames_to_input(frames, h2, w2, dtype, channels_last)
    return _input_reference(frames, h2, w2, dtype, _format(channels_last))


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


@custom_op("codec::frames_to_input", mutates_args=())
def _input_op(frames: Tensor, h2: int, w2: int, dtype: torch.dtype, channels_last: bool) -> Tensor:
    """The Triton path of :func:`frames_to_input` (inputs checked by it)."""
    fmt = _format(channels_last)
    return launch_or_fallback("frames_to_input", lambda: _input_triton(frames, h2, w2, dtype, fmt),
                              lambda: _input_reference(frames, h2, w2, dtype, fmt))


@_input_op.register_fake
def _input_fake(frames, h2, w2, dtype, channels_last):
    return torch.empty((frames.shape[0], 3, h2, w2), device=frames.device, dtype=dtype,
                       memory_format=_format(channels_last))


def _input_triton(frames, h2, w2, dtype, fmt):
    n, h, w, _ = frames.shape
    out = torch.empty((n, 3, h2, w2), device=frames.device, dtype=dtype, memory_format=fmt)
    block = _block(w2 * 3)
    blocks = triton.cdiv(w2 * 3, block)
    if out.numel():
        _to_input_kernel[launch_grid(n * h2 * blocks)](
            frames, out, h, w, h2, w2, *frames.stride(), *out.stride(), blocks, n * h2 * blocks,
            BLOCK=block, num_warps=4,
        )
    return out


def _frames_reference(x, height, width):
    x = x[:, :, :height, :width].to(torch.float32)
    y = torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5)
    return y.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def output_to_frames(x, height=None, width=None, reference=False):
    """Model output to uint8 RGB frames.

    x: (N, 3, H, W) float (any dtype and memory format), nominally in [-1, 1].
    Returns (N, height, width, 3) uint8 = round((clamp(x, -1, 1) + 1) * 127.5), half to even,
    cropped to the top-left height x width (None: the full size).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must be (N, 3, H, W), got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    n, _, h, w = x.shape
    height = h if height is None else int(height)
    width = w if width is None else int(width)
    if not (0 < height <= h and 0 < width <= w):
        raise ValueError(f"crop {(height, width)} must lie within the tensor's {(h, w)}")
    if triton_ready("output_to_frames", x, reference=reference):
        return torch.ops.codec.output_to_frames(x, height, width)
    return _frames_reference(x, height, width)


@custom_op("codec::output_to_frames", mutates_args=())
def _frames_op(x: Tensor, height: int, width: int) -> Tensor:
    """The Triton path of :func:`output_to_frames` (inputs checked by it)."""
    return launch_or_fallback("output_to_frames", lambda: _frames_triton(x, height, width),
                              lambda: _frames_reference(x, height, width))


@_frames_op.register_fake
def _frames_fake(x, height, width):
    return torch.empty((x.shape[0], height, width, 3), device=x.device, dtype=torch.uint8)


def _frames_triton(x, height, width):
    n = x.shape[0]
    out = torch.empty((n, height, width, 3), device=x.device, dtype=torch.uint8)
    block = _block(width * 3)
    blocks = triton.cdiv(width * 3, block)
    if out.numel():
        _to_frames_kernel[launch_grid(n * height * blocks)](
            x, out, height, width, *x.stride(), blocks, n * height * blocks, BLOCK=block, num_warps=4
        )
    return out
