"""One dispatch rule for every kernel in this package.

Triton runs on CUDA tensors when Triton imports. With ``TRITON_INTERPRET=1`` set, CPU tensors go
to the Triton kernels too (that is how the tests exercise them on a machine without a GPU).
Everything else, and any call made while the reference is forced, runs the pure-torch reference.

Force the reference with the environment variable ``CODEC_KERNELS=reference``, with
:func:`force_reference` (a context manager), or per call with ``reference=True``.

A kernel that Triton cannot compile or launch on this machine (a compiler error, too little shared
memory, ptxas failing) is not fatal: :func:`run_kernel` warns once and that kernel runs
its reference from then on, so a new GPU or Triton version degrades speed, never results.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

try:  # Triton is optional: macOS and Windows wheels do not exist.
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    HAVE_TRITON = True
    # What a kernel that cannot be built or launched on this GPU raises (never a wrong input:
    # every launcher checks its inputs before launching).
    LAUNCH_ERRORS: tuple[type[Exception], ...] = (CompilationError, OutOfResources, PTXASError)
except Exception:  # pragma: no cover - depends on the platform
    HAVE_TRITON = False
    LAUNCH_ERRORS = ()

_state = threading.local()
_unusable: dict[str, str] = {}  # kernel name -> why Triton could not run it here
T = TypeVar("T")


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


def run_kernel(name: str, tensors: tuple[torch.Tensor, ...], reference: bool,
               triton_call: Callable[[], T], reference_call: Callable[[], T]) -> T:
    """Every kernel's entry point: ``triton_call()`` where the dispatch rule sends ``tensors`` to
    Triton (``use_triton``) and Triton can run ``name`` here, else ``reference_call()``.

    The first failure to build or launch ``name`` warns (naming the kernel and the error) and is
    remembered for the process; other errors propagate.
    """
    if use_triton(*tensors, reference=reference) and name not in _unusable:
        try:
            return triton_call()
        except LAUNCH_ERRORS as err:
            _unusable[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"kernels.{name}: Triton cannot run it here ({_unusable[name]}); "
                          "using the torch reference for it from now on", RuntimeWarning, stacklevel=3)
    return reference_call()


def unusable_kernels() -> dict[str, str]:
    """Kernels that fell back to their reference in this process, with the reason."""
    return dict(_unusable)
