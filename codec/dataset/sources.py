"""Which clips a dataset run encodes, and where each one's latent file goes.

Inputs are folders (searched recursively for video files) or manifests: a text file with one
path per line (blank lines and ``#`` comments skipped), or a ``.csv``/``.parquet`` table with a
``path`` column. Relative paths in a manifest are relative to the manifest's folder.

A clip's name in the dataset (``rel``) is its path relative to its input folder (for a manifest,
the manifest's folder; an absolute path outside it keeps its full path without the root). Its
latent file is ``OUTDIR/rel`` with the suffix replaced by ``.safetensors``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..train.data import VIDEO_SUFFIXES

MANIFEST_SUFFIXES = (".txt", ".lst", ".csv", ".parquet")


@dataclass(frozen=True)
class Clip:
    """path: the video file (absolute); rel: its name in the dataset (POSIX, relative)."""

    path: str
    rel: str

    @property
    def latents(self) -> str:
        """The latent file, relative to the output folder."""
        return str(PurePosixPath(self.rel).with_suffix(".safetensors"))


def find_clips(inputs: list[str | os.PathLike]) -> list[Clip]:
    """The clips named by ``inputs`` (folders and manifests), in input order, folders sorted.

    Raises ValueError for a missing input, a manifest without paths, no clips at all, or two
    clips that would write the same latent file.
    """
    clips: list[Clip] = []
    for item in map(Path, inputs):
        if item.is_dir():
            root = item.resolve()
            clips += [Clip(str(f), f.relative_to(root).as_posix()) for f in sorted(root.rglob("*"))
                      if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES and not f.name.startswith(".")]
        elif item.is_file() and item.suffix.lower() in MANIFEST_SUFFIXES:
            root = item.resolve().parent
            clips += [_clip(root, entry) for entry in read_manifest(item)]
        elif item.is_file():
            raise ValueError(f"{item}: expected a folder or a manifest ({', '.join(MANIFEST_SUFFIXES)}), "
                             f"got a {item.suffix or 'suffix-less'} file")
        else:
            raise ValueError(f"{item}: no such folder or manifest")
    if not clips:
        raise ValueError(f"no video files found in {', '.join(map(str, inputs))}")
    clips = list(dict.fromkeys(clips))  # a clip named twice is encoded once
    _check_unique(clips)
    return clips


def read_manifest(path: Path) -> list[str]:
    """The paths listed in a manifest, as written."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "path" not in table.column_names:
            raise ValueError(f"{path}: expected a 'path' column, found {', '.join(table.column_names)}")
        entries = [str(p) for p in table.column("path").to_pylist() if p]
    elif suffix == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or ()):
                raise ValueError(f"{path}: expected a 'path' column, found {', '.join(reader.fieldnames or [])}")
            entries = [row["path"].strip() for row in reader if (row["path"] or "").strip()]
    else:
        lines = (line.strip() for line in path.read_text().splitlines())
        entries = [line for line in lines if line and not line.startswith("#")]
    if not entries:
        raise ValueError(f"{path}: the manifest lists no paths")
    return entries


def _clip(root: Path, entry: str) -> Clip:
    path = Path(entry).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    try:
        rel = path.relative_to(root)
    except ValueError:  # outside the manifest's folder: keep the full path, minus the root
        rel = path.relative_to(path.anchor)
    return Clip(str(path), rel.as_posix())


def _check_unique(clips: list[Clip]) -> None:
    seen: dict[str, str] = {}
    for c in clips:
        other = seen.setdefault(c.latents, c.path)
        if other != c.path:
            raise ValueError(f"{other} and {c.path} would both be written to {c.latents}; "
                             f"rename one or give them separate input folders")
