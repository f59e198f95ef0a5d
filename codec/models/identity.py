"""What makes a model the same model: a content hash of its weights.

The hash covers each state-dict entry in sorted key order: its name, its shape, and its values as
little-endian float32 (the dtype the loader holds weights in), so the same weights hash the same
whether the file stored them in fp16 or fp32, and whatever the device or dtype the model runs in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of a state dict's names, shapes and float32 values, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.numpy().astype("<f4", copy=False).data)  # the buffer itself: no copy
    return h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """The content hash of ``model``'s weights: the one its loader computed when it loaded them
    (``model.weights_sha256``), else computed now from the model's state dict."""
    return getattr(model, "weights_sha256", None) or state_digest(model.state_dict())
