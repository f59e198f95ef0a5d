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
