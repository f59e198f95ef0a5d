"""One dispatch rule for every kernel in this package.

Triton runs on CUDA tensors when Triton imports. With ``TRITON_INTERPRET=1`` set, CPU tensors go
to the Triton kernels too (that is how the tests exercise them on a machine without a GPU).
Everything else, and any call made while the reference is forced, runs the pure-torch reference.

Force the reference with the environment variable ``CODEC_KERNELS=reference``, with
:func:`force_reference` (a context manager), or per call with ``reference=True``.

Every kernel's Triton path is a ``torch.library`` custom op, ``torch.ops.codec.<kernel>``, with a
fake implementation (shapes, dtypes, strides), so ``torch.compile(fullgraph=True)`` keeps it in
one graph as an opaque call. The public function of each kernel makes the dispatch decision
(:func:`triton_ready`) before the op, in Python that dynamo traces and guards on; the op holds
only the launch.

A kernel that Triton cannot compile or launch on this machine (a compiler error, too little shared
memory, ptxas failing, a launch the driver refuses) is not fatal: :func:`launch_or_fallback`, which
runs inside the op, warns once and returns the reference's result, and that kernel runs its
reference from then on, so a new GPU or Triton version degrades speed, never results.

Launch grids: CUDA allows up to 2**31 - 1 programs along grid x but only 65535 along y and z, so
every kernel here runs on the 1-D grid :func:`launch_grid` returns and loops over its units of work
(``for pid in range(tl.program_id(0), TOTAL, tl.num_programs(0))``): any tensor size launches.
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

# CUDA's limit on grid x (y and z: 65535, unused here). A module constant so that tests can lower
# it and make every program loop over several units of work.
MAX_PROGRAMS = 2**31 - 1
# The driver's answer to a launch it refuses (e.g. a grid over its limits): Triton raises a plain
# RuntimeError with this text (CUDA_ERROR_INVALID_VALUE), matched by _is_launch_error.
_REFUSED_LAUNCH = "Triton Error [CUDA]: invalid argument"

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


def launch_grid(programs: int) -> tuple[int]:
    """The 1-D launch grid for ``programs`` units of work: ``(min(programs, MAX_PROGRAMS),)``, at
    least 1. Kernels loop ``pid`` from ``tl.program_id(0)`` to ``programs`` in steps of the grid."""
    if programs < 0:
        raise ValueError(f"programs must be >= 0, got {programs}")
    return (max(1, min(int(programs), MAX_PROGRAMS)),)


def _is_launch_error(err: Exception) -> bool:
    return isinstance(err, LAUNCH_ERRORS) or (
        isinstance(err, RuntimeError) and str(err).startswith(_REFUSED_LAUNCH))


def triton_ready(name: str, *tensors: torch.Tensor, reference: bool = False) -> bool:
    """Whether a call of kernel ``name`` on ``tensors`` goes to its Triton op: the dispatch rule
    (:func:`use_triton`) and ``name`` not known to be unusable here.

    Pure Python on devices, the environment and two module-level states, so ``torch.compile``
    traces it without a graph break (and guards on what it read); the public kernel functions
    decide with it OUTSIDE their ``torch.ops.codec`` op, which holds only the launch."""
    return use_triton(*tensors, reference=reference) and name not in _unusable


def launch_or_fallback(name: str, triton_call: Callable[[], T], reference_call: Callable[[], T]) -> T:
    """``triton_call()``, or ``reference_call()`` once Triton has failed to build or launch ``name``
    here. Runs eagerly, inside a custom op's real implementation (never traced).

    The first such failure warns (naming the kernel and the error) and is remembered for the
    process (later calls do not reach the op: :func:`triton_ready`); other errors propagate.
    """
    if name not in _unusable:
        try:
            return triton_call()
        except Exception as err:
            if not _is_launch_error(err):
                raise
            _unusable[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"kernels.{name}: Triton cannot run it here ({_unusable[name]}); "
                          "using the torch reference for it from now on", RuntimeWarning, stacklevel=3)
    return reference_call()


def unusable_kernels() -> dict[str, str]:
    """Kernels that fell back to their reference in this process, with the reason."""
    return dict(_unusable)
