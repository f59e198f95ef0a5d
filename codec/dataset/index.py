"""``OUTDIR/index.parquet``: one row per clip of the run, written atomically.

Columns: ``source`` (the clip's path relative to its input folder), ``latents`` (relative to
OUTDIR), ``status`` (``ok`` or ``failed``), ``error`` (one line, empty when ok), ``frames``,
``shape`` (the latent shape T, C, h, w), ``fps``, ``seconds`` (encode wall time), ``reused``
(kept from an earlier run), ``key`` (the cache key) and its three parts ``source_sha256``,
``weights_sha256``, ``options_sha256``. Load it with ``pandas.read_parquet`` or
``pyarrow.parquet.read_table``.
"""

from __future__ import annotations

import os
from pathlib import Path

INDEX_NAME = "index.parquet"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("codec dataset writes index.parquet with pyarrow, which is not installed; "
                         "pip install 'codec[ray]'") from None
    return pa, pq


def _schema(pa):
    return pa.schema([
        ("source", pa.string()), ("latents", pa.string()), ("status", pa.string()), ("error", pa.string()),
        ("frames", pa.int64()), ("shape", pa.list_(pa.int64())), ("fps", pa.float64()),
        ("seconds", pa.float64()), ("reused", pa.bool_()), ("key", pa.string()),
        ("source_sha256", pa.string()), ("weights_sha256", pa.string()), ("options_sha256", pa.string()),
    ])


COLUMNS = ("source", "latents", "status", "error", "frames", "shape", "fps", "seconds", "reused", "key",
           "source_sha256", "weights_sha256", "options_sha256")


def write_index(outdir: str | os.PathLike, rows: list[dict]) -> Path:
    """Write ``rows`` (dicts with :data:`COLUMNS`, missing ones null) sorted by ``latents`` to
    ``outdir/index.parquet``: to a temporary name first, then renamed, so a reader never sees a
    half-written index."""
    pa, pq = _pyarrow()
    path = Path(outdir) / INDEX_NAME
    rows = sorted(rows, key=lambda r: r["latents"])
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=_schema(pa))
    tmp = path.with_name(f".{path.name}.partial")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_index(outdir: str | os.PathLike) -> list[dict]:
    """The rows of ``outdir/index.parquet``; empty when there is none or it cannot be read (an
    index is a summary: the latent files and their keys are what resume trusts)."""
    path = Path(outdir) / INDEX_NAME
    if not path.is_file():
        return []
    _, pq = _pyarrow()
    try:
        return pq.read_table(path).to_pylist()
    except Exception:  # a damaged index is rebuilt by this run
        return []
