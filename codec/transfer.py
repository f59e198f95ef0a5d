"""Host <-> device copies that do not make the model thread wait (CUDA; plain copies elsewhere).

- :class:`Uploader`: host batches to the device through pinned buffers used in turn (double
  buffering), copied on a side stream; the compute stream waits for the copy on the device.
- :class:`HostCopy`: a device tensor copied into pinned host memory without blocking; the
  consumer (the writer thread) waits on the copy's event, the model thread never does.

On the CPU both are plain ``to`` calls and the waits are no-ops.
"""

from __future__ import annotations

import numpy as np
import torch


class Slots:
    """``count`` reusable buffers taken in turn. ``take(make, fits)`` returns the next slot's
    index and buffer, after waiting (``wait(token)``) for the last use of that slot to be done;
    ``done(i, token)`` records that use (on CUDA the token is the copy's event)."""

    def __init__(self, count: int = 2, wait=lambda token: token.synchronize()):
        if count < 1:
            raise ValueError(f"expected at least 1 slot, got {count}")
        self.buffers: list = [None] * count
        self.tokens: list = [None] * count
        self.turn = 0
        self._wait = wait

    def take(self, make, fits) -> tuple[int, object]:
        i = self.turn
        self.turn = (i + 1) % len(self.buffers)
        if self.tokens[i] is not None:  # the copy out of this buffer, `count` calls ago
            self._wait(self.tokens[i])
            self.tokens[i] = None
        if self.buffers[i] is None or not fits(self.buffers[i]):
            self.buffers[i] = make()
        return i, self.buffers[i]

    def done(self, i: int, token) -> None:
        self.tokens[i] = token


class Uploader:
    """``uploader(x)``: a host batch (numpy array or CPU tensor, any dtype) -> the same tensor on
    ``device``. On CUDA the batch goes through two pinned buffers in turn and a copy stream, so
    the copy of batch i+1 overlaps the model's work on batch i and no pinned memory is allocated
    per call; the current stream waits for the copy on the device, not the host. The host waits
    only for the copy out of the same buffer two calls ago. Elsewhere: ``x.to(device)``."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.slots = Slots(2)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def __call__(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        if not self.cuda or t.device.type != "cpu":
            return t.to(self.device)
        i, buf = self.slots.take(lambda: torch.empty(t.shape, dtype=t.dtype, pin_memory=True),
                                 lambda b: b.shape == t.shape and b.dtype == t.dtype)
        buf.copy_(t)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            out = buf.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self.slots.done(i, copied)
        compute.wait_event(copied)
        out.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return out


class HostCopy:
    """``t`` (a tensor on any device) copied to the host as ``dtype`` (default: its own).
    On CUDA the copy goes into pinned memory without blocking and ``wait()`` waits for its event
    (call it on the consumer's thread); elsewhere the copy is made at once."""

    def __init__(self, t: torch.Tensor, dtype: torch.dtype | None = None):
        t = t.to(dtype) if dtype is not None else t  # on the device: half the bytes to move for fp16
        self.event = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(t.device))
        else:
            self.host = t

    def wait(self) -> torch.Tensor:
        """The CPU tensor, once the copy is done."""
        if self.event is not None:
            self.event.synchronize()
        return self.host
