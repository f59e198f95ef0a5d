"""LPIPS (Zhang et al. 2018, the "vgg" variant), built in code, weights from the user's file.

The network: VGG16 conv features (torchvision layer indices 0..29) tapped after relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3; each tap normalised to unit length over channels; the
squared difference weighted by a learned 1x1 conv (no bias) per tap, averaged over space and
summed over taps. Inputs are scaled by the LPIPS constants (shift/scale) first.

Weights are not shipped: pass a file holding both the VGG16 features and the linear heads, as
safetensors or a torch pickle (read with ``weights_only=True``). Accepted key names:
``features.N.*`` (torchvision) or ``net.sliceK.N.*`` (the ``lpips`` package) for the VGG part,
``linK.model.1.weight`` (``lpips`` package), ``linK.weight`` or ``lins.K.weight`` for the heads.

In this project's tests LPIPS only ever runs with *random* weights (no pretrained file is
available offline): the tests check plumbing and finiteness, not perceptual quality.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from codec.models.checkpoint import read_state_dict

VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # ReLU indices in torchvision's vgg16().features
TAP_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """``forward(x, y)``: (N,3,H,W) float in [-1, 1] each -> (N,) perceptual distances (>= 0)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(ch, 1, 1, bias=False) for ch in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = (torch.cat([x, y]).float() - self.shift) / self.scale
        total = torch.zeros(x.shape[0], device=x.device)
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == TAPS[tap]:
                f = h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10)
                fx, fy = f.chunk(2)
                total = total + self.lins[tap]((fx - fy).square()).mean((1, 2, 3))
                tap += 1
                if tap == len(TAPS):
                    break
        return total


def _rename(key: str) -> str | None:
    """A key of a supported LPIPS/VGG file -> this module's name; None for keys to ignore."""
    if key.startswith(("scaling_layer.", "classifier.")):
        return None
    if m := re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key):
        return f"features.{m[1]}.{m[2]}"
    if m := re.fullmatch(r"lin(\d)(?:\.model\.1)?\.weight", key):
        return f"lins.{m[1]}.weight"
    return key


def load_lpips(path: str | os.PathLike, device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS with the weights of ``path``, frozen (requires_grad False), eval mode, fp32."""
    state, _ = read_state_dict(path)
    renamed = {}
    for k, v in state.items():
        new = _rename(k)
        if new is not None:
            renamed[new] = v.float()
    net = LPIPS()
    expected = net.state_dict()
    missing = sorted(set(expected) - set(renamed))
    bad = [k for k in expected if k in renamed and renamed[k].shape != expected[k].shape]
    if missing or bad:
        what = f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})" if missing else \
            f"shape mismatch at {bad[0]}: file {tuple(renamed[bad[0]].shape)}, expected {tuple(expected[bad[0]].shape)}"
        raise ValueError(f"{path}: not an LPIPS-vgg weight file ({what}); it needs the VGG16 features "
                         "and the five linear heads")
    net.load_state_dict({k: renamed[k] for k in expected})
    net.requires_grad_(False)
    return net.to(device).eval()
