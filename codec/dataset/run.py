"""``codec dataset``: find the clips, run an engine over them, keep the index up to date."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..stages import now
from .index import INDEX_NAME, read_index, write_index
from .sources import find_clips
from .work import EncodeSettings

ENGINES = ("local", "ray")
INDEX_EVERY_S = 30.0  # how often a long run rewrites the index between clips


@dataclass
class Summary:
    """What a run did: clips encoded, reused (kept from an earlier run), failed; frames encoded."""

    clips: int = 0
    encoded: int = 0
    reused: int = 0
    failed: int = 0
    frames: int = 0
    seconds: float = 0.0
    index: str = ""

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def run_dataset(inputs: list[str | os.PathLike], outdir: str | os.PathLike, settings: EncodeSettings, *,
                engine: str = "local", workers: int | None = None, address: str | None = None,
                quiet: bool = True, on_row: Callable[[dict], None] | None = None) -> Summary:
    """Encode every clip of ``inputs`` (folders, manifests) to ``outdir`` and write its index.

    ``on_row(row)`` is called here after each clip's row is recorded (for monitoring). The index
    is rewritten atomically every ``INDEX_EVERY_S`` seconds and when the run ends, also when it
    is interrupted: it then lists the clips finished so far, and a rerun completes it.
    """
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if address and engine != "ray":
        raise ValueError("--address joins a Ray cluster; it needs --engine ray")
    clips = find_clips(inputs)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"{outdir}: expected an output folder, got a file")
    if any(Path(c.path) == (outdir / INDEX_NAME).resolve() for c in clips):
        raise ValueError(f"{outdir / INDEX_NAME} is an input; choose another output folder")
    outdir.mkdir(parents=True, exist_ok=True)

    earlier = {r["latents"]: r for r in read_index(outdir)}
    rows: dict[str, dict] = {}
    summary, bar = Summary(clips=len(clips)), _Progress(len(clips), quiet)
    t0 = last_write = now()

    def record(row: dict) -> None:
        nonlocal last_write
        old = earlier.get(row["latents"])
        if row["reused"] and old is not None and old.get("key") == row["key"]:
            row["seconds"] = old.get("seconds")  # the time of the encode that made the file
        rows[row["latents"]] = row
        summary.failed += row["status"] == "failed"
        summary.reused += row["reused"]
        if row["status"] == "ok" and not row["reused"]:
            summary.encoded += 1
            summary.frames += row["frames"]
        summary.seconds = now() - t0
        bar.update(summary)
        if now() - last_write > INDEX_EVERY_S:
            write_index(outdir, list(rows.values()))
            last_write = now()
        if on_row is not None:
            on_row(row)

    try:
        if engine == "ray":
            from .ray_engine import run_ray

            run_ray(clips, outdir, settings, workers, address, record)
        else:
            from .local import run_local

            run_local(clips, outdir, settings, workers or 1, record)
    finally:
        bar.close()
        if rows:  # never replace an index by an empty one (a run that failed to start)
            summary.index = str(write_index(outdir, list(rows.values())))
    summary.seconds = now() - t0
    return summary


class _Progress:
    """Clips done / total, frames per second and time left: a tqdm bar on a terminal, else silent."""

    def __init__(self, total: int, quiet: bool):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="dataset", unit="clip", dynamic_ncols=True)

    def update(self, s: Summary) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{s.fps:.1f} frames/s, {s.failed} failed", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
