"""The latent file: one safetensors file written as a stream, read memory-mapped.

Layout (a plain safetensors file, readable by ``safetensors.torch.load_file``)::

    u64 little-endian N | N bytes of JSON header, padded with spaces | latents | pts

- ``latents``: (T, C, h, w), T >= 1, float32/float16/bfloat16, finite, stored scaled as diffusion
  models consume them: ``(z - shift_factor) * scaling_factor``.
- ``pts``: (T,) int64, presentation time of each frame in units of ``time_base``; its bytes follow
  the latents' directly and end the file.
- ``__metadata__`` (all strings): the keys of :data:`REQUIRED_METADATA` given by the caller (and
  any others), plus ``format``, ``dtype``, ``latent_channels``, ``num_frames``, ``tool_version``
  and ``checksum``.

Checksum, format ``codec-latents/2``: ``sha256:<hex>`` of the canonical JSON (sorted keys, no
spaces) of the tensor entries (dtype, shape, data_offsets of ``latents`` and ``pts``) and of all
metadata but the checksum, followed by the 32-byte sha256 of the latents and pts bytes. So
relabelling the bytes (F16 as I16, another shape) or editing the metadata fails verification.
Format ``codec-latents/1`` (earlier versions) is still read: its checksum covers only the latents
and pts bytes; every structural check below applies to it too. Any other format is refused.

Reading validates the header before using it: the two tensor entries (known dtypes, shapes of
non-negative ints, offsets contiguous from 0 to the end of the file, byte counts that match the
shapes), their agreement with the metadata (dtype, channels, frames), fps and time base positive
rationals, scaling and shift finite, source size and padding consistent with the latent size.
Every failure is a one-line ValueError that names the file and what was expected.

The header space is reserved when the file is opened (sized for up to 10**12 frames) and the
final JSON, padded with spaces, is written over it on close; latent frames go to disk as they
arrive, so memory stays flat however long the clip is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

__all__ = ["LatentWriter", "LatentReader", "check_compatible", "REQUIRED_METADATA"]

FORMAT = "codec-latents/2"
FORMAT_1 = "codec-latents/1"  # read only: checksum over the data bytes alone
# The keys format-1 files hold; keys added to REQUIRED_METADATA later are not asked of them.
_FORMAT_1_METADATA = ("model_id", "family", "scaling_factor", "shift_factor", "fps", "time_base",
                      "source_width", "source_height", "pad_bottom", "pad_right")
# Keys the caller gives: add new ones here (values are strings in the file, all covered by the checksum).
REQUIRED_METADATA = (*_FORMAT_1_METADATA,)
_AUTO_METADATA = ("format", "dtype", "latent_channels", "num_frames", "tool_version", "checksum")
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}
_MAX_HEADER = 100 * 2**20
_CHUNK = 2**20
_INTEGER = re.compile(r"\d{1,18}")
_RATIONAL = re.compile(r"\d{1,18}/\d{1,18}|\d{1,18}(\.\d{1,18})?([eE][-+]?\d{1,3})?")
_REAL = re.compile(r"[-+]?\d{1,18}(\.\d{0,18})?([eE][-+]?\d{1,3})?")


class _Invalid(ValueError):
    """A check failed; the reader and writer prefix the file name to its text."""


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


def _show(value: object, limit: int = 40) -> str:
    """A short repr for messages (fuzzed values can be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _header(shape: tuple[int, ...], dtype: str, metadata: dict[str, str], itemsize: int) -> dict:
    nbytes = math.prod(shape) * itemsize
    return {
        "__metadata__": metadata,
        "latents": {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]},
        "pts": {"dtype": "I64", "shape": [shape[0]], "data_offsets": [nbytes, nbytes + 8 * shape[0]]},
    }


def _json(obj: object, sort_keys: bool = False) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=sort_keys, ensure_ascii=True).encode()


def _checksum(header: Mapping, data_sha256: bytes) -> str:
    """The ``codec-latents/2`` checksum of a validated header and the sha256 digest of its data."""
    covered = {"latents": header["latents"], "pts": header["pts"],
               "__metadata__": {k: v for k, v in header["__metadata__"].items() if k != "checksum"}}
    return "sha256:" + hashlib.sha256(_json(covered, sort_keys=True) + data_sha256).hexdigest()


# ---- validation (raise _Invalid; callers add the file name) -------------------------------------

def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(meta: Mapping[str, str], key: str, least: int) -> int:
    text = meta[key]
    if not _INTEGER.fullmatch(text) or int(text) < least:
        raise _Invalid(f"metadata {key!r}: expected an integer >= {least}, got {_show(text)}")
    return int(text)


def _positive_rational(meta: Mapping[str, str], key: str) -> Fraction:
    text, value = meta[key], Fraction(0)
    if _RATIONAL.fullmatch(text):  # bounded digits: no 1e999999999, no inf or nan
        num, _, den = text.partition("/")
        if int(den or 1):
            value = Fraction(num) / int(den or 1)
    if value <= 0:
        raise _Invalid(f"metadata {key!r}: expected a positive rational like 30000/1001, got {_show(text)}")
    return value


def _finite(meta: Mapping[str, str], key: str, nonzero: bool = False) -> float:
    text = meta[key]
    value = float(text) if _REAL.fullmatch(text) else math.nan
    if not math.isfinite(value) or (nonzero and value == 0):
        raise _Invalid(f"metadata {key!r}: expected a finite{' non-zero' if nonzero else ''} number, "
                       f"got {_show(text)}")
    return value


def _check_metadata(meta: Mapping[str, str], dtype: str, shape_chw: Sequence[int]) -> tuple[Fraction, Fraction]:
    """Check the metadata that decides how the data is read against the latents' dtype and (C, h, w)
    (everything but ``num_frames``, which the writer only knows at the end); returns (fps, time_base)."""
    want = str(_NAMES[dtype]).removeprefix("torch.")
    if meta["dtype"] != want:
        raise _Invalid(f"metadata 'dtype' is {_show(meta['dtype'])}, the latents are {dtype} (expected {want})")
    channels, h, w = shape_chw
    if _integer(meta, "latent_channels", 1) != channels:
        raise _Invalid(f"metadata says {meta['latent_channels']} latent channels, the latents hold {channels}")
    fps, time_base = _positive_rational(meta, "fps"), _positive_rational(meta, "time_base")
    _finite(meta, "scaling_factor", nonzero=True)
    _finite(meta, "shift_factor")
    height, width = _integer(meta, "source_height", 1), _integer(meta, "source_width", 1)
    bottom, right = _integer(meta, "pad_bottom", 0), _integer(meta, "pad_right", 0)
    factor = (height + bottom) // h
    if factor < 1 or (height + bottom, width + right) != (factor * h, factor * w) or max(bottom, right) >= factor:
        raise _Invalid(f"a {width}x{height} source padded by {right} right and {bottom} bottom does not fit "
                       f"latents of {w}x{h} (expected both sides scaled by one factor, padding below it)")
    return fps, time_base


def _check_tensors(header: dict, data_size: int) -> tuple[str, tuple[int, ...]]:
    """Check the tensor entries against each other and the data size; returns the latents' dtype and shape."""
    names = sorted(k for k in header if k != "__metadata__")
    if names != ["latents", "pts"]:
        raise _Invalid(f"expected tensors 'latents' and 'pts', found {_show(names, 80)}")
    for name, ndim, dtypes in (("latents", 4, ("F32", "F16", "BF16")), ("pts", 1, ("I64",))):
        entry = header[name]
        if not isinstance(entry, dict) or sorted(entry) != ["data_offsets", "dtype", "shape"]:
            raise _Invalid(f"tensor {name!r}: expected an object with dtype, shape and data_offsets, "
                           f"got {_show(entry)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in dtypes:
            raise _Invalid(f"tensor {name!r}: expected dtype {' or '.join(dtypes)}, got {_show(dtype)}")
        if not (isinstance(shape, list) and len(shape) == ndim and all(_is_int(s) and s >= 1 for s in shape)):
            raise _Invalid(f"tensor {name!r}: expected a shape of {ndim} positive integers, got {_show(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise _Invalid(f"tensor {name!r}: expected data_offsets [begin, end] of non-negative integers, "
                           f"got {_show(offsets)}")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise _Invalid(f"tensor {name!r}: {dtype} {shape} takes {nbytes} bytes, data_offsets {offsets} "
                           f"give {offsets[1] - offsets[0]}")
    lat, pts = header["latents"], header["pts"]
    if pts["shape"][0] != lat["shape"][0]:
        raise _Invalid(f"expected pts ({lat['shape'][0]},) for latents {lat['shape']}, got pts {pts['shape']}")
    first, second = sorted((lat["data_offsets"], pts["data_offsets"]))
    if first[0] != 0 or second[0] != first[1]:
        raise _Invalid(f"expected the tensors' data to follow each other from byte 0, got data_offsets "
                       f"{lat['data_offsets']} (latents) and {pts['data_offsets']} (pts)")
    if second[1] != data_size:
        what = "the file is truncated" if second[1] > data_size else "unexpected bytes follow the data"
        raise _Invalid(f"{what}: the header describes {second[1]} bytes of data, found {data_size}")
    return lat["dtype"], tuple(lat["shape"])


def _check_header(header: object, data_size: int) -> tuple[str, tuple[int, ...], dict[str, str]]:
    """The structure of the file: tensors, format, metadata keys and frame count (the meaning of the
    metadata is :func:`_check_metadata`'s); returns the latents' dtype, their shape and the metadata."""
    if not isinstance(header, dict):
        raise _Invalid("expected a safetensors file, its header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Invalid("expected __metadata__ to be an object of strings")
    fmt, readable = meta.get("format", ""), f"expected {FORMAT}, or {FORMAT_1} from earlier versions"
    if fmt.startswith("codec-latents/") and fmt not in (FORMAT, FORMAT_1):  # ours, but another version
        raise _Invalid(f"format {_show(fmt)} is not one this tool reads ({readable})")
    dtype, shape = _check_tensors(header, data_size)
    required = _FORMAT_1_METADATA if fmt == FORMAT_1 else REQUIRED_METADATA
    missing = [k for k in (*required, *_AUTO_METADATA) if k not in meta]
    if missing:
        raise _Invalid(f"not a latent file of this tool, metadata lacks {', '.join(missing)}")
    if fmt not in (FORMAT, FORMAT_1):
        raise _Invalid(f"not a latent file of this tool, format {_show(fmt)} ({readable})")
    if _integer(meta, "num_frames", 1) != shape[0]:
        raise _Invalid(f"metadata says {meta['num_frames']} frames, latents hold {shape[0]}")
    return dtype, shape, meta


class LatentWriter:
    """Write latent frames to ``path`` as they come; a context manager.

    shape_chw: (C, h, w) of one latent frame. dtype: torch.float32, float16 or bfloat16 (the
    stored dtype; written tensors are converted to it). metadata: the keys of
    REQUIRED_METADATA (values str/int/float/Fraction, fractions stored as "num/den").
    frames_hint: expected frame count, only used to size the header reserve (which already
    fits 10**12 frames). The metadata is checked here (fps, sizes, ... as the reader will), so a
    file the reader would refuse is never started. The file is written to ``.<name>.partial``
    beside ``path`` and renamed on a clean close (at least one frame); if the ``with`` block
    raises, it is removed.
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
        try:
            _check_metadata(self._meta, _DTYPES[dtype], shape_chw)
        except _Invalid as e:
            raise ValueError(f"{self.path}: {e}") from None
        self._itemsize = torch.tensor([], dtype=dtype).element_size()
        self._frame_bytes = int(np.prod(shape_chw)) * self._itemsize
        most = max(10**12, frames_hint or 0)
        widest = _json(_header((most, *shape_chw), "BF16",
                               {**self._meta, "num_frames": str(most), "checksum": "sha256:" + "0" * 64}, 8))
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
        """Write pts and the final header, then move the file to its final name. With no frames
        written, remove the partial file and raise ValueError (a latent file holds >= 1 frame)."""
        if self._file is None:
            return
        if not self._pts:
            self.abort()
            raise ValueError(f"{self.path}: no frames were written, so no latent file was made")
        try:
            pts = np.asarray(self._pts, dtype="<i8").tobytes()
            self._file.write(pts)
            self._hash.update(pts)
            header = _header((len(self._pts), *self.shape_chw), _DTYPES[self.dtype],
                             {**self._meta, "num_frames": str(len(self._pts))}, self._itemsize)
            header["__metadata__"]["checksum"] = _checksum(header, self._hash.digest())
            header = _json(header)
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
        """Discard the partial file (also when closing it fails, e.g. on a full disk)."""
        file, self._file = self._file, None
        try:
            if file is not None:
                file.close()  # flushes the buffer: raises again on a full disk, yet closes the file
        except OSError:
            pass
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> LatentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read_header(path: Path) -> tuple[int, object, int]:
    """The safetensors framing and JSON, checked here for errors that name the problem and the file;
    returns where the data starts, the parsed JSON (unchecked) and the size of the data part."""
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
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep, huge integers
            raise ValueError(f"{path}: expected a safetensors file, its header is not JSON "
                             f"({_show(str(e), 120)})") from None
    return 8 + n, header, size - 8 - n


def _first_bad_frame(latents: torch.Tensor) -> tuple[int, str] | None:
    """(index, "NaN" or "Inf") of the first frame of ``latents`` (n, ...) holding a non-finite value."""
    bad = ~torch.isfinite(latents.reshape(len(latents), -1))
    if not bad.any():
        return None
    frame = int(bad.any(1).nonzero()[0])
    return frame, "NaN" if bool(latents[frame].isnan().any()) else "Inf"


class LatentReader:
    """Memory-mapped access to a latent file written by :class:`LatentWriter`.

    ``read(start, end)`` returns latents (n, C, h, w) in the stored dtype (CPU), reading only
    those frames; it raises ValueError when one of them holds NaN or Inf (checked per read until
    :meth:`verify` has checked every frame at once). ``pts``: (T,) int64 tensor. Iterating yields
    ``(latents, pts)`` batches of ``batch`` frames. Opening validates the whole header (see the
    module docstring); :meth:`verify` checks the content.
    """

    def __init__(self, path: str | os.PathLike, batch: int = 8):
        self.path = Path(path)
        if not _is_int(batch) or batch < 1:
            raise ValueError(f"{self.path}: expected a batch of at least 1 frame, got {batch!r}")
        self.batch = batch
        self._data_start, header, data_size = _read_header(self.path)
        try:
            dtype, self.shape, self.metadata = _check_header(header, data_size)
            self.fps, self.time_base = _check_metadata(self.metadata, dtype, self.shape[1:])
        except _Invalid as e:
            raise ValueError(f"{self.path}: {e}") from None
        self._header = {k: header[k] for k in ("latents", "pts", "__metadata__")}
        self.dtype: torch.dtype = _NAMES[dtype]
        self._all_finite = False  # set by a verify() that passed: read() need not look again
        try:
            self._file = safe_open(str(self.path), framework="pt")
            self._slice = self._file.get_slice("latents")
            self.pts: torch.Tensor = self._file.get_tensor("pts")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{self.path}: not a valid safetensors file ({_show(str(e), 120)})") from None

    @property
    def num_frames(self) -> int:
        return self.shape[0]

    def read(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Latent frames start..end-1 as (n, C, h, w) in the stored dtype, all finite."""
        end = self.num_frames if end is None else end
        if not 0 <= start < end <= self.num_frames:
            raise ValueError(f"{self.path}: expected 0 <= start < end <= {self.num_frames}, "
                             f"got start={start}, end={end}")
        latents = self._slice[start:end]
        if not self._all_finite and (bad := _first_bad_frame(latents)):
            raise ValueError(f"{self.path}: frame {start + bad[0]} holds {bad[1]} values (expected finite latents)")
        return latents

    def __len__(self) -> int:
        return self.num_frames

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_frames, self.batch):
            end = min(start + self.batch, self.num_frames)
            yield self.read(start, end), self.pts[start:end]

    def verify(self) -> None:
        """Recompute the checksum from the file in 1 MiB chunks and, in the same pass, check that
        every latent value is finite; ValueError on a mismatch, else at the first NaN/Inf frame."""
        digest, bad = hashlib.sha256(), None
        itemsize, frame_values = self.dtype.itemsize, math.prod(self.shape[1:])
        buffer = bytearray(_CHUNK)  # a multiple of every itemsize: chunks hold whole values
        with open(self.path, "rb") as f:
            for name in ("latents", "pts"):  # in this order for the checksum, wherever they lie
                begin, stop = self._header[name]["data_offsets"]
                f.seek(self._data_start + begin)
                for done in range(0, stop - begin, _CHUNK):
                    want = min(_CHUNK, stop - begin - done)
                    if f.readinto(memoryview(buffer)[:want]) != want:  # cut since it was opened
                        raise ValueError(f"{self.path}: checksum mismatch: the file was modified or truncated")
                    digest.update(memoryview(buffer)[:want])
                    if name == "latents" and bad is None:
                        values = torch.frombuffer(buffer, dtype=self.dtype, count=want // itemsize)
                        where = (~torch.isfinite(values)).nonzero()
                        if len(where):
                            i = int(where[0])
                            bad = (done // itemsize + i) // frame_values, "NaN" if values[i].isnan() else "Inf"
        if self.metadata["format"] == FORMAT_1:
            expected = "sha256:" + digest.hexdigest()
        else:
            expected = _checksum(self._header, digest.digest())
        if expected != self.metadata["checksum"]:
            raise ValueError(f"{self.path}: checksum mismatch: the file was modified or truncated")
        if bad is not None:
            raise ValueError(f"{self.path}: frame {bad[0]} holds {bad[1]} values (expected finite latents)")
        self._all_finite = True

    def close(self) -> None:
        self._slice = self._file = None

    def __enter__(self) -> LatentReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_compatible(metadata: Mapping[str, str], latent_channels: int, family: str,
                     model_id: str = "the chosen model", scaling_factor: float | None = None,
                     shift_factor: float | None = None, force: bool = False) -> list[str]:
    """Raise ValueError unless latents described by ``metadata`` fit a model with
    ``latent_channels`` channels of ``family`` (e.g. "kl" or "tiny") and the latent convention
    ``scaling_factor``/``shift_factor`` (compared when given and recorded).

    The channel count must match. A different family, scaling or shift is refused with both
    conventions in the message, unless ``force`` (the user's --force-convention): then the
    differences are returned, for the caller to warn about (the model's convention is used).
    """
    made_by = metadata.get("model_id", "an unknown model")
    channels, made_family = metadata.get("latent_channels", "?"), metadata.get("family", "?")
    if channels != str(latent_channels):
        raise ValueError(f"latents were made by {made_by} ({channels} channels, family {made_family}); "
                         f"model {model_id} expects {latent_channels} channels, family {family}")
    diffs = [f"family {made_family} vs {family}"] if made_family != family else []
    for key, value in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)):
        if value is None or key not in metadata:
            continue
        try:
            recorded = float(metadata[key])
        except ValueError:
            raise ValueError(f"metadata {key}: expected a number, got {metadata[key]!r}") from None
        if not abs(recorded - value) <= 1e-6 * max(abs(recorded), abs(value)) + 1e-12:
            diffs.append(f"{key.removesuffix('_factor')} {metadata[key]} vs {value:g}")
    if diffs and not force:
        made = (f"family {made_family}, scaling {metadata.get('scaling_factor', '?')}, "
                f"shift {metadata.get('shift_factor', '?')}")
        want = f"family {family}" + (f", scaling {scaling_factor:g}" if scaling_factor is not None else "") + (
            f", shift {shift_factor:g}" if shift_factor is not None else "")
        raise ValueError(f"latents were made by {made_by} ({channels} channels, {made}); model {model_id} has "
                         f"{want}: its decode would misread them; pass --force-convention to decode with the "
                         "model's convention anyway")
    return diffs
