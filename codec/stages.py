"""Small building blocks for streaming: a background consumer stage, a progress bar, a clock,
and SIGTERM turned into an exception like Ctrl-C's."""

from __future__ import annotations

import contextlib
import queue
import resource
import signal
import sys
import threading
import time

_DONE = object()


class BackgroundStage:
    """Run ``consume(item)`` on a background thread fed through a bounded queue.

    ``put`` blocks when ``size`` items wait (back-pressure keeps memory flat). An exception in the
    consumer is raised in the producer at its next ``put`` or at ``close``.
    """

    def __init__(self, consume, size: int = 4, name: str = "stage"):
        self._consume, self._q = consume, queue.Queue(maxsize=size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._consume(item)
                except BaseException as e:  # handed to the producer
                    self._error = e

    def put(self, item) -> None:
        self._raise()
        while True:
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise()

    def close(self) -> None:
        """Wait for every queued item to be consumed; re-raise a consumer error."""
        self._q.put(_DONE)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop without consuming what waits (after a failure upstream)."""
        self._error = self._error or RuntimeError("aborted")
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._q.put(_DONE)
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def progress(total: int | None, desc: str, quiet: bool = False):
    """A tqdm bar on a terminal (frames, fps, time left); a silent stand-in otherwise."""
    if quiet or not sys.stderr.isatty():
        return _Silent()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", dynamic_ncols=True, leave=True)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def peak_host_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


now = time.perf_counter


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the same
    clean-up runs (partial outputs removed) wherever the run was."""


@contextlib.contextmanager
def sigterm_raises():
    """While inside, SIGTERM raises :class:`Terminated` in the main thread; a second SIGTERM
    during the clean-up is ignored. Outside the main thread (where signals cannot be handled)
    this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
