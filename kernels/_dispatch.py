"""One dispatch rule for every kernel in this package.

Triton runs on CUDA tensors when Triton imports. With ``TRITON_INTERPRET=1`` set, CPU tensors go
to the Triton kernels too (that is how the tests exercise them on a machine without a GPU).
Everything else, and any call made while the reference is forced, runs the pure-torch reference.

Force the reference with the environment variable ``CODEC_KERNELS=reference``, with
:func:`force_reference` (a context manager), or per call with ``reference=True``.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

try:  # Triton is optional: macOS and Windows wheels do not exist.
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAVE_TRITON = False

_state = threading.local()


def interpreting() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def reference_forced() -> bool:
    """True when the torch reference is forced by the environment or by :func:`force_reference`."""
    if getattr(_state, "forced", 0) > 0:
        return True
    return os.environ.get("CODEC_KERNELS", "").lower() in ("reference", "torch", "ref")


@contextlib.contextmanager
def force_reference(enabled: bool = True):
    """Run every kernel call inside the block through its torch reference (for A/B timing)."""
    _state.forced = getattr(_state, "forced", 0) + (1 if enabled else 0)
    try:
        yield
    finally:
        _state.forced -= 1 if enabled else 0


def use_triton(*tensors: torch.Tensor, reference: bool = False) -> bool:
    """Whether a call on these tensors goes to Triton under the dispatch rule above."""
    if reference or not HAVE_TRITON or reference_forced():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)
