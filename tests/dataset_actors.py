"""A Ray actor for tests/test_dataset.py that dies the way a crashed worker does (importable by
the Ray workers, which get tests/ on their path from the test's cluster fixture)."""

from __future__ import annotations

import os
from pathlib import Path

from codec.dataset.ray_engine import RayClipEncoder


class DiesOnce(RayClipEncoder):
    """Exits the worker process, without a word, on a clip that has a ``<clip>.die-once`` file
    beside it (removing the file first, so the retry of that clip goes through)."""

    def __call__(self, batch: dict) -> dict:
        for path in batch["path"]:
            marker = Path(f"{path}.die-once")
            if marker.exists():
                marker.unlink()
                os._exit(1)
        return super().__call__(batch)
