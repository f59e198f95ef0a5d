"""The one timer of the GPU scripts: CUDA events on a GPU, perf_counter on the CPU (smoke runs)."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, dev: torch.device, reps: int, warmup: int | None = None) -> tuple[float, list[float]]:
    """(median, all) milliseconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones
    (default 3 on CUDA, 1 on the CPU); on CUDA each call is timed by events around it."""
    warmup = warmup if warmup is not None else (3 if dev.type == "cuda" else 1)
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


@contextlib.contextmanager
def no_tf32():
    """TF32 off for matmuls and cuDNN inside the block (correctness checks compare fp32 exactly)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
