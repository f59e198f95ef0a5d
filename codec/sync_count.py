"""Count the operations that make the host wait for the device (a CUDA stream sync).

On CUDA a host sync stalls the thread that launches work until the device has caught up, so the
device idles while the host prepares the next batch. Which operations sync is known per op; this
counter recognizes them on any device, so on the CPU the count is the proxy for what the same code
would sync on CUDA:

- a scalar read on the host: ``item``/``bool``/``int``/``float`` (``aten._local_scalar_dense``,
  ``is_nonzero``, ``equal``);
- an output whose size depends on the data: ``nonzero``, boolean-mask indexing and
  ``masked_select`` (a nonzero inside), ``unique``, ``repeat_interleave`` without ``output_size``;
- a copy to the host: ``.cpu()``, ``.numpy()``, ``.tolist()``, ``np.asarray(t)`` (counted whatever
  the tensor's device: on the CPU they are free, but the same line reads the device on CUDA), and a
  ``to``/``copy_`` into a CPU tensor from another device. ``t.to(device)`` is not counted on the
  CPU (there it cannot tell an upload from a download).

    with SyncCounter() as syncs:
        run()
    syncs.total, syncs.by_op  # e.g. 3, {"aten.nonzero.default": 3}

Counts only the calling thread (torch's mode stacks are thread-local). With CUDA,
``torch.cuda.set_sync_debug_mode("error")`` is the ground truth; this is the CPU stand-in.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that sync whatever their arguments.
_ALWAYS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
           aten.nonzero.default, aten.masked_select.default, aten._unique.default,
           aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}
_REPEAT = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_INDEX = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Tensor methods that hand data to the host (no aten op runs for them on a CPU tensor).
_HOST_READS = {"cpu", "numpy", "tolist", "__array__"}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _to_host_from_device(func, args, kwargs, out) -> bool:
    if func in (aten._to_copy.default,):
        src = args[0]
        return out.device.type == "cpu" and src.device.type != "cpu"
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    return False


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counts: Counter, state: dict):
        super().__init__()
        self.counts, self.state = counts, state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.state["paused"]:
            return out
        if (func in _ALWAYS
                or (func in _REPEAT and kwargs.get("output_size") is None)
                or (func in _INDEX and _bool_index(args))
                or _to_host_from_device(func, args, kwargs, out)):
            self.counts[str(func)] += 1
        return out


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, counts: Counter, state: dict):
        super().__init__()
        self.counts, self.state = counts, state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.state["paused"] and name in _HOST_READS and args and isinstance(args[0], torch.Tensor):
            self.counts[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Context manager: counts host-sync operations run by this thread while inside (see module
    docstring). ``total``: all of them; ``by_op``: per operation name."""

    def __init__(self):
        self.by_op: Counter = Counter()
        self._state = {"paused": False}
        self._modes = (_FunctionCounter(self.by_op, self._state), _DispatchCounter(self.by_op, self._state))

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    @contextlib.contextmanager
    def paused(self):
        """Inside, nothing is counted (e.g. a CPU-only reference kernel that a test sets aside)."""
        before, self._state["paused"] = self._state["paused"], True
        try:
            yield
        finally:
            self._state["paused"] = before

    def __enter__(self) -> SyncCounter:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
