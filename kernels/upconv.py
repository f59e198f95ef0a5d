"""Nearest 2x upsample followed by a 3x3 convolution, computed on the small input (exact).

Upsampling by 2 then convolving with a 3x3 kernel W equals, for each output phase (i, j) in
{0,1}^2, a 2x2 convolution of the small input: rows h-1, h carry W[0] and W[1]+W[2] for i = 0,
rows h, h+1 carry W[0]+W[1] and W[2] for i = 1 (columns alike). The four phases are one 2x2
convolution with 4x the output channels over the input padded by one pixel (4/9 of the
arithmetic), then an interleave: phase (i, j) is the window [i:i+H, j:j+W] of that result, placed
at output pixels (2h+i, 2w+j). Convolutions stay with cuDNN/oneDNN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import reference_forced

# Per phase along one axis: which 3x3 taps sum into each of the two 2x2 taps.
_TAPS = {0: ((0,), (1, 2)), 1: ((0, 1), (2,))}


def fold_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) -> (4*Cout, Cin, 2, 2), phase-major: rows [p*Cout:(p+1)*Cout] hold phase
    p = 2*i + j."""
    phases = []
    for i in (0, 1):
        rows = [weight[:, :, list(t)].sum(2) for t in _TAPS[i]]  # 2 x (Cout, Cin, 3)
        w_i = torch.stack(rows, 2)  # (Cout, Cin, 2, 3)
        for j in (0, 1):
            cols = [w_i[:, :, :, list(t)].sum(3) for t in _TAPS[j]]
            phases.append(torch.stack(cols, 3))  # (Cout, Cin, 2, 2)
    return torch.cat(phases, 0)


def upsample_conv3x3_reference(x, weight, bias=None):
    """x (N,Cin,H,W) -> (N,Cout,2H,2W): F.interpolate(nearest, 2x) then conv3x3 with padding 1."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def upsample_conv3x3(x, weight, bias=None, folded=None, reference: bool = False):
    """Same result as :func:`upsample_conv3x3_reference`, with 4/9 of its arithmetic.

    x: (N, Cin, H, W) float, NCHW or channels_last; weight (Cout, Cin, 3, 3); bias (Cout,) or None;
    folded: ``fold_weight(weight)`` if the caller keeps it (it is recomputed otherwise).
    Returns (N, Cout, 2H, 2W) in x's dtype and memory format.
    """
    if reference or reference_forced():
        return upsample_conv3x3_reference(x, weight, bias)
    n, _, h, w = x.shape
    cout = weight.shape[0]
    folded = fold_weight(weight) if folded is None else folded
    phases = F.conv2d(x, folded.to(x.dtype), None, padding=1)  # (N, 4*Cout, H+1, W+1)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty((n, cout, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for p, (i, j) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, i::2, j::2] = phases[:, p * cout:(p + 1) * cout, i:i + h, j:j + w]
    if bias is not None:
        out += bias.to(x.dtype).view(1, -1, 1, 1)
    return out
