"""The latent file: one safetensors file written as a stream, read memory-mapped.

Layout (a plain safetensors file, readable by ``safetensors.torch.load_file``)::

    u64 little-endian N | N bytes of JSON header, padded with spaces | latents | pts

- ``latents``: (T, C, h, w), float32/float16/bfloat16, stored scaled as diffusion models
  consume them: ``(z - shift_factor) * scaling_factor``.
- ``pts``: (T,) int64, presentation time of each frame in units of ``time_base``.
- ``__metadata__`` (all strings): the keys of :data:`REQUIRED_METADATA` given by the caller,
  plus ``format``, ``dtype``, ``latent_channels``, ``num_frames``, ``tool_version`` and
  ``checksum`` (``sha256:<hex>`` of the latents bytes followed by the pts bytes).

The header space is reserved when the file is opened (sized for up to 10**12 frames) and the
final JSON, padded with spaces, is written over it on close; latent frames go to disk as they
arrive, so memory stays flat however long the clip is.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

__all__ = ["LatentWriter", "LatentReader", "check_compatible", "REQUIRED_METADATA"]

FORMAT = "codec-latents/1"
REQUIRED_METADATA = ("model_id", "family", "scaling_factor", "shift_factor", "fps", "time_base",
                     "source_width", "source_height", "pad_bottom", "pad_right")
_AUTO_METADATA = ("format", "dtype", "latent_channels", "num_frames", "tool_version", "checksum")
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20
_CHUNK = 2**20


def _tool_version() -> str:
    try:
        from codec import __version__
    except Exception:
        return "0"
    return str(__version__)


def _as_string(key: str, value) -> str:
    if isinstance(value, Fraction):
        return f"{value.numerator}/{value.denominator}"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"metadata {key!r}: expected str, int, float or Fraction, got {type(value).__name__}")


def _header(shape: tuple[int, ...], dtype: str, metadata: dict[str, str], itemsize: int) -> bytes:
    nbytes = int(np.prod(shape)) * itemsize
    return json.dumps({
        "__metadata__": metadata,
        "latents": {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]},
        "pts": {"dtype": "I64", "shape": [shape[0]], "data_offsets": [nbytes, nbytes + 8 * shape[0]]},
    }, separators=(",", ":")).encode()


class LatentWriter:
    """Write latent frames to ``path`` as they come; a context manager.

    shape_chw: (C, h, w) of one latent frame. dtype: torch.float32, float16 or bfloat16 (the
    stored dtype; written tensors are converted to it). metadata: the keys of
    REQUIRED_METADATA (values str/int/float/Fraction, fractions stored as "num/den").
    frames_hint: expected frame count, only used to size the header reserve (which already
    fits 10**12 frames). The file is written to ``.<name>.partial`` beside ``path`` and
    renamed on a clean close; if the ``with`` block raises, it is removed.
    """

    def __init__(self, path: str | os.PathLike, shape_chw: Sequence[int], dtype: torch.dtype | str,
                 metadata: Mapping[str, object], frames_hint: int | None = None):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ValueError(f"{self.path}: expected an existing output folder, "
                             f"{self.path.parent} does not exist")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"{self.path}: expected dtype float32, float16 or bfloat16, got {dtype}")
        shape_chw = tuple(int(s) for s in shape_chw)
        if len(shape_chw) != 3 or min(shape_chw) < 1:
            raise ValueError(f"{self.path}: expected shape_chw (C, h, w) of positive sizes, got {shape_chw}")
        missing = [k for k in REQUIRED_METADATA if k not in metadata]
        if missing:
            raise ValueError(f"{self.path}: metadata lacks {', '.join(missing)} "
                             f"(expected {', '.join(REQUIRED_METADATA)})")
        self.shape_chw, self.dtype = shape_chw, dtype
        self._meta = {k: _as_string(k, v) for k, v in metadata.items() if k not in _AUTO_METADATA}
        self._meta.update(format=FORMAT, dtype=str(dtype).removeprefix("torch."),
                          latent_channels=str(shape_chw[0]), tool_version=_tool_version())
        self._itemsize = torch.tensor([], dtype=dtype).element_size()
        self._frame_bytes = int(np.prod(shape_chw)) * self._itemsize
        most = max(10**12, frames_hint or 0)
        widest = _header((most, *shape_chw), "BF16",
                         {**self._meta, "num_frames": str(most), "checksum": "sha256:" + "0" * 64}, 8)
        self._reserve = (len(widest) + 256 + 7) // 8 * 8  # data starts 8-byte aligned
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._hash = hashlib.sha256()
        self._pts: list[int] = []
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", self._reserve) + b" " * self._reserve)

    @property
    def num_frames(self) -> int:
        return len(self._pts)

    def update_metadata(self, metadata: Mapping[str, object]) -> None:
        """Replace values known only at the end (e.g. a video clip's end padding), written with the
        header on close. The keys must have been given at open, with a placeholder, so the header
        space reserved then fits them (values may grow by up to 64 characters in all)."""
        if self._file is None:
            raise ValueError(f"{self.path}: the latent writer is closed")
        new = {k: _as_string(k, v) for k, v in metadata.items()}
        unknown = sorted(set(new) - set(self._meta) | set(new) & set(_AUTO_METADATA))
        if unknown:
            raise ValueError(f"{self.path}: metadata {', '.join(unknown)} must be given when the writer opens")
        if sum(len(v) - len(self._meta[k]) for k, v in new.items()) > 64:
            raise ValueError(f"{self.path}: updated metadata outgrows the reserved header space")
        self._meta.update(new)

    def write(self, latents: torch.Tensor, pts: int | Sequence[int] | torch.Tensor) -> None:
        """latents: (n, C, h, w) or (C, h, w) float tensor, any device; pts: n ints (int64)."""
        if self._file is None:
            raise ValueError(f"{self.path}: the latent writer is closed")
        if latents.ndim == 3:
            latents = latents[None]
        if tuple(latents.shape[1:]) != self.shape_chw or latents.ndim != 4:
            raise ValueError(f"{self.path}: expected latents (n, {', '.join(map(str, self.shape_chw))}), "
                             f"got {tuple(latents.shape)}")
        pts = [int(p) for p in np.asarray(pts.cpu() if torch.is_tensor(pts) else pts).reshape(-1)]
        if len(pts) != len(latents):
            raise ValueError(f"{self.path}: expected {len(latents)} pts for {len(latents)} frames, "
                             f"got {len(pts)}")
        data = latents.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy()
        self._file.write(data.data)
        self._hash.update(data.data)
        self._pts.extend(pts)

    def close(self) -> None:
        """Write pts and the final header, then move the file to its final name."""
        if self._file is None:
            return
        try:
            pts = np.asarray(self._pts, dtype="<i8").tobytes()
            self._file.write(pts)
            self._hash.update(pts)
            meta = {**self._meta, "num_frames": str(len(self._pts)),
                    "checksum": "sha256:" + self._hash.hexdigest()}
            header = _header((len(self._pts), *self.shape_chw), _DTYPES[self.dtype], meta, self._itemsize)
            assert len(header) <= self._reserve, "header reserve too small"
            self._file.seek(8)
            self._file.write(header.ljust(self._reserve, b" "))
            self._file.close()
            self._file = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard the partial file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> LatentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read_header(path: Path) -> tuple[int, dict]:
    """Check the safetensors framing ourselves, for errors that name the problem and the file."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected a latents .safetensors file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 1 or n > _MAX_HEADER:
            raise ValueError(f"{path}: expected a safetensors file, the header length field is invalid")
        if n > size - 8:
            raise ValueError(f"{path}: the file is truncated: its header alone needs {8 + n} bytes, "
                             f"found {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: expected a safetensors file, its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: expected a safetensors file, its header is not a JSON object")
    for name in ("latents", "pts"):
        if not isinstance(header.get(name), dict):
            raise ValueError(f"{path}: expected tensors 'latents' and 'pts', found "
                             f"{sorted(k for k in header if k != '__metadata__')}")
    end = max(header[k]["data_offsets"][1] for k in header if k != "__metadata__")
    if size < 8 + n + end:
        raise ValueError(f"{path}: the file is truncated: expected {8 + n + end} bytes, found {size}")
    return 8 + n, header


class LatentReader:
    """Memory-mapped access to a latent file written by :class:`LatentWriter`.

    ``read(start, end)`` returns latents (n, C, h, w) in the stored dtype (CPU), reading only
    those frames. ``pts``: (T,) int64 tensor. Iterating yields ``(latents, pts)`` batches of
    ``batch`` frames. Opening checks structure, not content: call :meth:`verify` for that.
    """

    def __init__(self, path: str | os.PathLike, batch: int = 8):
        self.path = Path(path)
        self.batch = batch
        self._data_start, header = _read_header(self.path)
        self._offsets = {k: header[k]["data_offsets"] for k in ("latents", "pts")}
        try:
            self._file = safe_open(str(self.path), framework="pt")
            self.metadata: dict[str, str] = self._file.metadata() or {}
            self._slice = self._file.get_slice("latents")
            self.pts: torch.Tensor = self._file.get_tensor("pts")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{self.path}: not a valid safetensors file ({e})") from e
        missing = [k for k in (*REQUIRED_METADATA, *_AUTO_METADATA) if k not in self.metadata]
        if missing:
            raise ValueError(f"{self.path}: not a latent file of this tool, "
                             f"metadata lacks {', '.join(missing)}")
        self.shape = tuple(self._slice.get_shape())
        if len(self.shape) != 4 or self.pts.shape != (self.shape[0],) or self.pts.dtype != torch.int64:
            raise ValueError(f"{self.path}: expected latents (T, C, h, w) and pts (T,) int64, got "
                             f"{self.shape} and {tuple(self.pts.shape)} {self.pts.dtype}")
        if int(self.metadata["num_frames"]) != self.shape[0]:
            raise ValueError(f"{self.path}: metadata says {self.metadata['num_frames']} frames, "
                             f"latents hold {self.shape[0]}")
        self.dtype = _NAMES.get(self._slice.get_dtype())

    @property
    def num_frames(self) -> int:
        return self.shape[0]

    @property
    def fps(self) -> Fraction:
        return Fraction(self.metadata["fps"])

    @property
    def time_base(self) -> Fraction:
        return Fraction(self.metadata["time_base"])

    def read(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Latent frames start..end-1 as (n, C, h, w) in the stored dtype."""
        end = self.num_frames if end is None else end
        if not 0 <= start < end <= self.num_frames:
            raise ValueError(f"{self.path}: expected 0 <= start < end <= {self.num_frames}, "
                             f"got start={start}, end={end}")
        return self._slice[start:end]

    def __len__(self) -> int:
        return self.num_frames

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_frames, self.batch):
            end = min(start + self.batch, self.num_frames)
            yield self.read(start, end), self.pts[start:end]

    def verify(self) -> None:
        """Recompute the checksum from the file in 1 MiB chunks; ValueError on mismatch."""
        digest, missing = hashlib.sha256(), 0
        with open(self.path, "rb") as f:
            for name in ("latents", "pts"):
                begin, stop = self._offsets[name]
                f.seek(self._data_start + begin)
                left = stop - begin
                while left > 0 and (chunk := f.read(min(_CHUNK, left))):
                    digest.update(chunk)
                    left -= len(chunk)
                missing += left
        if missing or "sha256:" + digest.hexdigest() != self.metadata["checksum"]:
            raise ValueError(f"{self.path}: checksum mismatch: the file was modified or truncated")

    def close(self) -> None:
        self._slice = self._file = None

    def __enter__(self) -> LatentReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_compatible(metadata: Mapping[str, str], latent_channels: int, family: str,
                     model_id: str = "the chosen model") -> None:
    """Raise ValueError unless latents described by ``metadata`` fit a model with
    ``latent_channels`` channels of ``family`` (e.g. "kl" or "tiny")."""
    made_by = metadata.get("model_id", "an unknown model")
    channels, made_family = metadata.get("latent_channels", "?"), metadata.get("family", "?")
    if channels != str(latent_channels) or made_family != family:
        raise ValueError(f"latents were made by {made_by} ({channels} channels, family {made_family}); "
                         f"model {model_id} expects {latent_channels} channels, family {family}")
