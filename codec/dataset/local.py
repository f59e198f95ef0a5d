"""The local engine: the clips one after another in this process, or spread over N worker
processes (each loads the model once; with several GPUs and no --device, worker i uses GPU
i mod count). No retries here: a worker process that dies stops the run, and a rerun finishes
what is missing."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

from .sources import Clip
from .work import ClipEncoder, EncodeSettings

_encoder: ClipEncoder | None = None  # the worker process's model
_failure: Exception | None = None  # why it could not be loaded, raised by each _encode


def run_local(clips: list[Clip], outdir: Path, settings: EncodeSettings, workers: int,
              on_row: Callable[[dict], None]) -> None:
    """Encode ``clips`` into ``outdir``, calling ``on_row(row)`` here as each clip finishes."""
    if workers <= 1:
        encoder = ClipEncoder(outdir, settings)
        for clip in clips:
            on_row(encoder(clip))
        return
    threads = max(1, (os.cpu_count() or 1) // workers)  # the workers share the cores
    context = get_context("spawn")
    number = context.Value("i", 0)  # numbers the workers, to give each its own GPU
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker,
                               initargs=(outdir, settings, threads, number))
    try:
        # One clip per worker in flight: an interruption leaves little half-done work behind.
        todo, running = iter(clips), set()
        while True:
            while len(running) < workers and (clip := next(todo, None)) is not None:
                running.add(pool.submit(_encode, clip))
            if not running:
                break
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                on_row(future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(outdir: Path, settings: EncodeSettings, threads: int, number) -> None:
    import torch

    global _encoder, _failure
    torch.set_num_threads(threads)
    with number.get_lock():
        index, number.value = number.value, number.value + 1
    if settings.device is None and torch.cuda.device_count() > 1:  # worker i on GPU i mod count
        settings = replace(settings, device=f"cuda:{index % torch.cuda.device_count()}")
    try:
        _encoder = ClipEncoder(outdir, settings)
    except Exception as e:  # an initializer that raises breaks the pool and loses the message
        _failure = e


def _encode(clip: Clip) -> dict:
    if _encoder is None:
        raise _failure or RuntimeError("the worker process did not load the model")
    return _encoder(clip)
