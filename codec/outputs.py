"""Where a run may write: every output path is checked before any work starts.

An output is never one of the run's inputs (the source clip or latent file, the model's weight
files, found by path, other spellings, hard and symbolic links alike), never something that is
not a regular file (a device node such as /dev/null, a folder, a pipe), and never standard
output: latent files and videos are written under a temporary name and renamed when complete
(a latent file's header is rewritten in place when it closes), so ``-`` cannot stream.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

LATENT_SUFFIXES = (".safetensors",)
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def check_output(path: str | os.PathLike, *, flag: str = "output", inputs: Iterable = (),
                 suffixes: tuple[str, ...] | None = None) -> Path:
    """``path`` as a Path if a run may write a file there; ValueError (one line, naming ``flag``)
    otherwise. ``inputs``: paths the run reads, never to be overwritten (missing ones are
    ignored). ``suffixes``: the file-name endings this output may have (lower case)."""
    text = os.fspath(path)
    if text == "-":
        raise ValueError(f"{flag} -: writing to standard output is not supported (latents on a pipe are not "
                         "useful: a latent file's header is completed when it closes, and videos are renamed "
                         "into place); name a file, e.g. ./out" + (suffixes[0] if suffixes else ""))
    path = Path(text)
    try:
        mode = path.stat().st_mode  # follows symbolic links: what would be written over
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot be checked ({e.strerror or e})") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise ValueError(f"{flag} {path}: is a folder; name a file inside it")
    if mode is not None and not stat.S_ISREG(mode):
        raise ValueError(f"{flag} {path}: is not a regular file (a device, pipe or socket); refusing to replace it")
    if suffixes and path.suffix.lower() not in suffixes:
        got = repr(path.suffix) if path.suffix else "none"
        raise ValueError(f"{flag} {path}: expected a file name ending in {', '.join(suffixes)}; its suffix: {got}")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the output folder {path.parent} does not exist")
    if mode is not None:
        for source in inputs:
            if _same_file(path, source):
                raise ValueError(f"{flag} {path}: is also an input of this run ({source}); refusing to overwrite it")
    return path


def check_outputs(outputs: Iterable[tuple[str, str | os.PathLike | None, tuple[str, ...] | None]],
                  inputs: Iterable = ()) -> None:
    """``check_output`` for each (flag, path or None, suffixes), and no two outputs the same file."""
    inputs = list(inputs)
    seen: dict[Path, str] = {}
    for flag, path, suffixes in outputs:
        if path is None:
            continue
        where = check_output(path, flag=flag, inputs=inputs, suffixes=suffixes).resolve()
        if where in seen:
            raise ValueError(f"{flag} {path}: the same file as {seen[where]}; name two different files")
        seen[where] = flag


def model_files(model) -> list[Path]:
    """The files (or folders: every file inside) a model source reads, to protect them.

    ``model``: an ``Autoencoder`` (its ``source``), ``"default"`` (the built-in weights), a file
    (with its TAESD ``_encoder``/``_decoder`` partner, or the diffusers folder it sits in), a
    folder, or anything else (a preset name, None: nothing)."""
    source = getattr(model, "source", model)
    if not isinstance(source, (str, os.PathLike)):
        return []
    if os.fspath(source) == "default":
        from .models.loading import DEFAULT_FILE

        return [DEFAULT_FILE]
    path = Path(source).expanduser()
    if path.is_file():
        if not (path.parent / "config.json").is_file():
            partners = [path.with_name(path.name.replace(a, b))
                        for a, b in (("_encoder", "_decoder"), ("_decoder", "_encoder")) if a in path.name]
            return [path, *partners]
        return [path.parent]  # a diffusers folder: its config and weights
    return [path] if path.is_dir() else []


def _same_file(path: Path, source) -> bool:
    """Whether the existing ``path`` is the file ``source``, or lies inside the folder ``source``."""
    try:
        source = Path(source)
        if source.is_dir():
            return path.resolve().is_relative_to(source.resolve())
        return os.path.samefile(path, source)
    except (OSError, TypeError, ValueError):  # source missing or not a path
        return False
