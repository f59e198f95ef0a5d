"""AutoencoderKL (Stable Diffusion style), parameter names as in the diffusers layout.

Encoder: conv_in -> down blocks (ResNet x layers_per_block, stride-2 conv) -> mid block
(ResNet, self-attention, ResNet) -> GroupNorm+SiLU -> conv_out (2C: mean and log-variance).
Decoder mirrors it with layers_per_block + 1 ResNets per up block and nearest 2x upsampling.
Images are (N,3,H,W) in [-1,1]; latents (N,C,H/8,W/8), unscaled (scaling lives in Autoencoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import KLConfig
from .layers import GroupNormAct, UpsampleConv


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = GroupNormAct(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = GroupNormAct(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.norm2(self.conv1(self.norm1(x))))
        return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class Attention(nn.Module):
    """Single-head spatial self-attention with a residual (per tile when tiled)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = GroupNormAct(groups, c, act=None)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        q, k, v = (p(t).unsqueeze(1) for p in (self.to_q, self.to_k, self.to_v))
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        a = self.to_out[0](a).transpose(1, 2).reshape(n, c, h, w)
        return a + x


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom by one (SD's asymmetric padding)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x, then a 3x3 conv (fused: see ``UpsampleConv``)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.fused = UpsampleConv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x, self.conv)


class Stage(nn.Module):
    """ResNets then an optional resampler (``downsamplers`` or ``upsamplers`` in the layout)."""

    def __init__(self, c_in: int, c_out: int, n: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(c_out)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(c_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", ()) or getattr(self, "upsamplers", ()):
            x = s(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: KLConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Stage(ch[max(i - 1, 0)], c, cfg.layers_per_block, g, "down" if i < len(ch) - 1 else None)
            for i, c in enumerate(ch)
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNormAct(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: KLConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            Stage(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, "up" if i < len(ch) - 1 else None)
            for i, c in enumerate(ch)
        )
        self.conv_norm_out = GroupNormAct(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(self.conv_norm_out(x))
