"""What the sparse-cache tests share: the model input, dense references, small clips, the halo."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels


def prepare(model):
    """(N, H, W, 3) uint8 -> the model's (N, 3, H, W) [-1, 1] input, channels_last."""
    return lambda t: kernels.frames_to_input(t, dtype=model.dtype, channels_last=True)


def dense_encode(model, frames):
    return torch.cat([model.encode(prepare(model)(frames[i:i + 1])) for i in range(len(frames))])


def dense_decode(model, z):
    return torch.cat([model.decode(z[i:i + 1]) for i in range(len(z))])


def static_clip(n, h, w, seed=0):
    """(n, h, w, 3) uint8: one random frame repeated."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)[None].repeat(n, 1, 1, 1)


def smooth_clip(n, h, w):
    """Gradients (no texture): a block changed on it moves the frame statistics predictably."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    f = torch.stack([60 + 80 * xx / w, 60 + 80 * yy / h, 100 + 0 * xx], -1)
    return f.round().to(torch.uint8)[None].repeat(n, 1, 1, 1)


def dilate(mask, k=1):
    """(rows, cols) bool grown by k cells each way (k 3x3 halos)."""
    m = mask[None, None].float()
    for _ in range(k):
        m = F.max_pool2d(m, 3, 1, 1)
    return m[0, 0] > 0
