"""Bounded fuzz of the latent reader (hypothesis, derandomized: the same examples on every run).

A small valid latent file is mutated (byte flips, insertions, deletions and truncation anywhere;
structured edits of the JSON header: dropped keys, values of the wrong type, negative and huge
numbers, unknown dtypes, overlapping or out-of-file offsets, deep nesting; NaN/Inf in the data),
optionally re-signed so the checksum holds and the mutation reaches the checks behind it. Opening,
verifying and reading every frame must then either succeed with consistent data or raise a
one-line ValueError that names the file: never another exception type, never a hang.
CODEC_FUZZ_EXAMPLES sets the number of examples (default 5000: about 20 s of one CPU core; more for a longer hunt).
"""

import hashlib
import json
import os
import signal
import struct
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec import latents

SHAPE = (3, 2, 2, 3)  # T, C, h, w
META = dict(model_id="sd15", family="kl", scaling_factor=0.18215, shift_factor=0.0, fps=Fraction(30000, 1001),
            time_base=Fraction(1, 30000), source_width=3 * 8 - 1, source_height=2 * 8 - 2, pad_bottom=2,
            pad_right=1)
DTYPES = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}
EXAMPLES = int(os.environ.get("CODEC_FUZZ_EXAMPLES", 5000))
SECONDS_PER_EXAMPLE = 10  # interrupts a hang (hypothesis' 2 s deadline only reports slow examples afterwards)


def _valid_file(tmp, dtype: torch.dtype) -> bytes:
    path = tmp / f"base-{dtype}.safetensors"
    values = torch.linspace(-3, 3, torch.Size(SHAPE).numel()).reshape(SHAPE)
    with latents.LatentWriter(path, SHAPE[1:], dtype, META) as writer:
        writer.write(values, [1001 * i for i in range(SHAPE[0])])
    return path.read_bytes()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    return tmp, {name: _valid_file(tmp, dtype) for name, dtype in DTYPES.items()}


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: object, body: bytes, align: bool = True) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    if align:
        text = text.ljust((len(text) + 7) // 8 * 8, b" ")
    return struct.pack("<Q", len(text)) + text + body


def _resign(header: object, body: bytes) -> None:
    """Recompute the checksum of a mutated header in place, as the writer would have (harness only)."""
    try:
        meta = header["__metadata__"]
        if meta.get("format") == "codec-latents/1":
            meta["checksum"] = "sha256:" + hashlib.sha256(body).hexdigest()
        else:
            meta["checksum"] = latents._checksum(header, hashlib.sha256(body).digest())
    except Exception:  # a header mangled beyond signing stays as it is
        pass


# ---- mutations ---------------------------------------------------------------------------------

INTERESTING_STRINGS = ["0/0", "0", "-1", "1/0", "inf", "-inf", "nan", "1e999999999", "9" * 5000 + "/1",
                       "30000/1001", "1/90000", "-30/1", " 30", "30.0", "0x1E", "F16", "I16", "BF16", "F32",
                       "F64", "I64", "U8", "BOOL", "float16", "int16", "bfloat16", "", "codec-latents/1",
                       "codec-latents/2", "codec-latents/3", "sha256:" + "0" * 64, "kl", "tiny", "4", "16"]
NUMBERS = st.one_of(st.integers(-3, 300), st.integers(-2**70, 2**70), st.sampled_from([10**400, -(10**400)]),
                    st.floats(allow_nan=True, allow_infinity=True))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.sampled_from(INTERESTING_STRINGS), st.text(max_size=6))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                        st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                      max_leaves=8)
META_KEYS = [*latents.REQUIRED_METADATA, "format", "dtype", "latent_channels", "num_frames", "checksum"]
PATHS = [(), ("__metadata__",), ("latents",), ("pts",), ("extra",),
         *[(t, f) for t in ("latents", "pts") for f in ("dtype", "shape", "data_offsets")],
         *[(t, f, i) for t in ("latents", "pts") for f in ("shape", "data_offsets") for i in range(4)],
         *[("__metadata__", k) for k in META_KEYS]]


def _edit(header: object, path: tuple, op: str, value: object) -> object:
    """Drop or set the value at ``path`` (a list index past the end appends); returns the header."""
    if not path:
        return value if op == "set" else {}
    node = header
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return header
    key = path[-1]
    if isinstance(node, dict) and isinstance(key, str):
        if op == "drop":
            node.pop(key, None)
        else:
            node[key] = value
    elif isinstance(node, list) and isinstance(key, int):
        if op == "drop" and key < len(node):
            del node[key]
        elif op == "set":
            node[key:key + 1] = [value]
    return header


SPECIAL = st.sampled_from(["overlap", "past_end", "swap", "grow_shape", "shrink_shape", "relabel", "nan", "inf",
                           "deep", "no_meta_dict", "zero_frames"])
BYTE_OPS = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
                              st.integers(0, 2**20), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4)
JSON_OPS = st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(["drop", "set"]), VALUES),
                    min_size=1, max_size=3)
META_OPS = st.lists(st.tuples(st.sampled_from(META_KEYS), st.one_of(st.sampled_from(INTERESTING_STRINGS),
                                                                      st.text(max_size=8))), min_size=1, max_size=2)
MUTATIONS = st.one_of(st.tuples(st.just("bytes"), BYTE_OPS), st.tuples(st.just("json"), JSON_OPS),
                      st.tuples(st.just("meta"), META_OPS), st.tuples(st.just("special"), SPECIAL))


def _special(header: dict, body: bytes, kind: str, dtype: str) -> tuple[object, bytes]:
    lat, pts = header["latents"], header["pts"]
    nbytes = lat["data_offsets"][1]
    if kind == "overlap":
        pts["data_offsets"] = [nbytes - 8, nbytes - 8 + 8 * SHAPE[0]]
    elif kind == "past_end":
        pts["data_offsets"] = [nbytes, nbytes + 8 * SHAPE[0] + 8]
    elif kind == "swap":
        lat["data_offsets"], pts["data_offsets"] = pts["data_offsets"], lat["data_offsets"]
    elif kind == "grow_shape":
        lat["shape"][1] += 1
    elif kind == "shrink_shape":
        lat["shape"] = [SHAPE[0] * 2, SHAPE[1], SHAPE[2], SHAPE[3] // 2 or 1]
    elif kind == "relabel":  # same byte count, other meaning
        lat["dtype"] = {"F16": "I16", "BF16": "F16", "F32": "I32"}[dtype]
    elif kind in ("nan", "inf"):
        bad = torch.tensor([float(kind)], dtype=DTYPES[dtype]).view(torch.uint8).numpy().tobytes()
        at = len(bad) * 7  # an element of the second frame
        body = body[:at] + bad + body[at + len(bad):]
    elif kind == "no_meta_dict":
        header["__metadata__"] = [["format", "codec-latents/2"]]
    elif kind == "zero_frames":
        lat["shape"][0], pts["shape"] = 0, [0]
        lat["data_offsets"], pts["data_offsets"] = [0, 0], [0, 0]
        header["__metadata__"]["num_frames"] = "0"
        body = b""
    return header, body


def _mutate(base: bytes, dtype: str, mutation, resign: bool) -> bytes:
    kind, ops = mutation
    if kind == "bytes":
        data = bytearray(base)
        for op, pos, blob in ops:
            pos %= max(len(data), 1)
            if op == "flip" and data:
                data[pos] ^= blob[0] or 1
            elif op == "insert":
                data[pos:pos] = blob
            elif op == "delete":
                del data[pos : pos + len(blob)]
            else:
                del data[pos:]
        return bytes(data)
    header, body = _split(base)
    if kind == "json":
        for path, op, value in ops:
            header = _edit(header, path, op, value)
    elif kind == "meta":
        header["__metadata__"].update(ops)
    elif ops == "deep":  # nesting that Python's JSON parser cannot follow
        text = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
        return struct.pack("<Q", len(text)) + text + body
    else:
        header, body = _special(header, body, ops, dtype)
    if resign:
        _resign(header, body)
    return _join(header, body)


def open_verify_read(path) -> tuple[tuple, int, bool]:
    """What a decode does with the file: open, verify, read every frame in batches."""
    with latents.LatentReader(path, batch=2) as reader:
        reader.verify()
        frames, finite = 0, True
        for batch, pts in reader:
            assert batch.shape[1:] == reader.shape[1:] and len(pts) == len(batch)
            frames += len(batch)
            finite &= bool(torch.isfinite(batch.float()).all())
        assert reader.fps > 0 and reader.time_base > 0
        meta = reader.metadata
        assert (meta["num_frames"], meta["latent_channels"]) == (str(reader.shape[0]), str(reader.shape[1]))
        return reader.shape, frames, finite


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"an example ran longer than {SECONDS_PER_EXAMPLE} s")


@settings(max_examples=EXAMPLES, deadline=2000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(dtype=st.sampled_from(sorted(DTYPES)), mutation=MUTATIONS, resign=st.booleans())
def test_mutants_raise_only_one_line_value_errors(workdir, dtype, mutation, resign):
    tmp, bases = workdir
    path = tmp / "mutant.safetensors"
    path.write_bytes(_mutate(bases[dtype], dtype, mutation, resign))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_EXAMPLE)
    try:
        shape, frames, finite = open_verify_read(path)
    except ValueError as e:
        text = str(e)
        assert path.name in text and "\n" not in text, text
        return
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # accepted: the file says what it holds
    assert len(shape) == 4 and frames == shape[0] > 0 and finite


def test_unmutated_files_pass(workdir):
    tmp, bases = workdir
    for dtype, data in bases.items():
        path = tmp / f"clean-{dtype}.safetensors"
        path.write_bytes(data)
        assert open_verify_read(path) == (SHAPE, SHAPE[0], True)
        assert _mutate(data, dtype, ("json", [((), "drop", None)]), False) != data  # the harness mutates
