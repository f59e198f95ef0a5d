"""Layers shared by both families."""

from __future__ import annotations

import torch
from torch import nn

import kernels


class GroupNormAct(nn.GroupNorm):
    """GroupNorm with an optional fused activation ("silu", "relu"), run through ``kernels``.

    ``stats_hook``, when set (by tiling's global normalization), replaces the per-call statistics:
    ``hook(module, x) -> normalized x``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, act: str | None = "silu"):
        super().__init__(num_groups, num_channels, eps=eps)
        self.act = act
        self.stats_hook = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats_hook is not None:
            return self.stats_hook(self, x)
        return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, act=self.act)


class UpsampleConv:
    """Nearest 2x upsample then ``conv`` (3x3, padding 1), computed by ``kernels.upsample_conv3x3``
    as one 2x2 convolution on the small input (exact, 4/9 of the arithmetic).

    A plain object, not a module: ``conv`` stays where checkpoints name it, and the Sequential
    that holds the layers keeps TAESD's indices.
    """

    def __init__(self):
        self._folded: tuple | None = None

    def __call__(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        w = conv.weight
        if torch.is_grad_enabled() and w.requires_grad:  # training: fold inside the autograd graph
            folded = kernels.fold_weight(w)
        else:  # inference: fold once per weight version, dtype and device
            key = (w._version, w.dtype, w.device, w.data_ptr())
            if self._folded is None or self._folded[0] != key:
                self._folded = (key, kernels.fold_weight(w.detach()))
            folded = self._folded[1]
        return kernels.upsample_conv3x3(x, w, conv.bias, folded=folded)
