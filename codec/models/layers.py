"""Layers shared by both families."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch
from torch import nn

import kernels

# A frame normalizer replaces the per-call GroupNorm statistics of every GroupNormAct under one
# model for the duration of a call: ``normalizer(name, layer, x) -> normalized x``, where ``name``
# is the layer's qualified name in that model (stable across copies of the model, unlike its id).
# Thread-local state, not an attribute on the layers: nothing is written onto the model, a deep
# copy carries nothing, and threads running other models are unaffected. A threading.local rather
# than a ContextVar because torch.compile traces (and guards on) the former without a graph break.
Normalizer = Callable[[str, "GroupNormAct", torch.Tensor], torch.Tensor]
_STATE = threading.local()  # .active: (normalizer, {id(layer): name}) inside frame_normalizer


def _active() -> tuple[Normalizer, dict[int, str]] | None:
    return getattr(_STATE, "active", None)


@contextlib.contextmanager
def frame_normalizer(normalizer: Normalizer | None, model: nn.Module):
    """Within the block, the GroupNormAct layers of ``model`` normalize through ``normalizer``
    (None: their own statistics, as outside the block)."""
    if normalizer is None:
        yield
        return
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, GroupNormAct)}
    previous, _STATE.active = _active(), (normalizer, names)
    try:
        yield
    finally:
        _STATE.active = previous


def frame_normalizer_active() -> bool:
    """True inside :func:`frame_normalizer` (a call that must not be replayed from a CUDA graph)."""
    return _active() is not None


class GroupNormAct(nn.GroupNorm):
    """GroupNorm with an optional fused activation ("silu", "relu"), run through ``kernels``.

    Inside :func:`frame_normalizer` the active normalizer supplies the statistics instead.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, act: str | None = "silu"):
        super().__init__(num_groups, num_channels, eps=eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = _active()
        if active is not None and id(self) in active[1]:
            return active[0](active[1][id(self)], self, x)
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
        # Training folds inside the autograd graph; torch.compile folds inside its graph (the
        # cache key below compares data pointers, which dynamo cannot trace).
        if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            folded = kernels.fold_weight(w)
        else:  # inference: fold once per weight version, dtype and device
            key = (w._version, w.dtype, w.device, w.data_ptr())
            if self._folded is None or self._folded[0] != key:
                self._folded = (key, kernels.fold_weight(w.detach()))
            folded = self._folded[1]
        return kernels.upsample_conv3x3(x, w, conv.bias, folded=folded)
