"""Tiny autoencoder, TAESD architecture, written as data: an ``nn.Sequential`` of small blocks.

Parameter names follow the TAESD files (``0.weight``, ``1.conv.0.weight``, ``11.pool.1.bias``):
index ``i`` is layer ``i`` of the Sequential, so those checkpoints load without renaming.
Encoder input is [0, 1] RGB; decoder output is roughly [0, 1] (unclamped).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TinyConfig
from .layers import GroupNormAct, UpsampleConv


def conv3x3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3): tanh(x / 3) * 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class GroupNormReLUBranch(nn.Module):
    """1x1 conv to 4x width, GroupNorm(4) fused with ReLU, 1x1 conv back (TAEF2's ``pool``)."""

    def __init__(self, n: int, expand: int = 4, groups: int = 4):
        super().__init__()
        self.expand = nn.Conv2d(n, n * expand, 1, bias=False)
        self.norm = GroupNormAct(groups, n * expand, eps=1e-5, act="relu")
        self.project = nn.Conv2d(n * expand, n, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.norm(self.expand(x)))

    # Checkpoints name these pool.0 / pool.1 / pool.3 (a Sequential with a ReLU at index 2).
    KEY_MAP = {"0.": "expand.", "1.": "norm.", "3.": "project."}


class Block(nn.Module):
    """Residual block: three 3x3 convs with ReLU, identity skip, ReLU after the sum."""

    def __init__(self, n: int, midblock_groupnorm: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv3x3(n, n), nn.ReLU(), conv3x3(n, n), nn.ReLU(), conv3x3(n, n))
        self.pool = GroupNormReLUBranch(n) if midblock_groupnorm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


def tiny_encoder(cfg: TinyConfig) -> nn.Sequential:
    """(N,3,H,W) in [0,1] -> (N,C,H/8,W/8) latents."""
    w, gn = cfg.width, cfg.midblock_groupnorm

    def down():
        if cfg.resample == "shuffle":
            return [nn.PixelUnshuffle(2), conv3x3(4 * w, w, bias=False)]
        return [conv3x3(w, w, stride=2, bias=False)]

    return nn.Sequential(conv3x3(3, w), Block(w),
                         *down(), Block(w), Block(w), Block(w),
                         *down(), Block(w), Block(w), Block(w),
                         *down(), Block(w, gn), Block(w, gn), Block(w, gn),
                         conv3x3(w, cfg.latent_channels))


class TinyDecoder(nn.Sequential):
    """The decoder Sequential, running each ``Upsample`` + conv pair as one fused step
    (``UpsampleConv``: exact, 4/9 of the arithmetic); indices and names stay TAESD's."""

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        self.fused = [UpsampleConv() for m in layers if isinstance(m, nn.Upsample)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers, i, up = list(self), 0, 0
        while i < len(layers):
            if isinstance(layers[i], nn.Upsample):
                x = self.fused[up](x, layers[i + 1])
                i, up = i + 2, up + 1
            else:
                x = layers[i](x)
                i += 1
        return x


def tiny_decoder(cfg: TinyConfig) -> nn.Sequential:
    """(N,C,h,w) latents -> (N,3,8h,8w), roughly [0,1]."""
    w, gn = cfg.width, cfg.midblock_groupnorm

    def up():
        if cfg.resample == "shuffle":  # replicate padding: a border block's outside neighbour is itself
            return [conv3x3(w, 4 * w, bias=False, padding_mode="replicate"), nn.PixelShuffle(2)]
        return [nn.Upsample(scale_factor=2), conv3x3(w, w, bias=False)]

    return TinyDecoder(
        Clamp(), conv3x3(cfg.latent_channels, w), nn.ReLU(),
        Block(w, gn), Block(w, gn), Block(w, gn), *up(),
        Block(w), Block(w), Block(w), *up(),
        Block(w), Block(w), Block(w), *up(),
        Block(w), conv3x3(w, 3),
    )


def rename_pool_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TAESD checkpoint names (``N.pool.0.weight``) -> this module's (``N.pool.expand.weight``)."""
    out = {}
    for key, value in state.items():
        head, sep, tail = key.partition(".pool.")
        if sep:
            for old, new in GroupNormReLUBranch.KEY_MAP.items():
                if tail.startswith(old):
                    tail = new + tail[len(old):]
                    break
            key = f"{head}.pool.{tail}"
        out[key] = value
    return out
