"""codec.latents: the streamed safetensors latent file, its checks and its checksum."""

import hashlib
import json
import struct
from fractions import Fraction

import pytest
import torch
from helpers import tiny_model_file
from safetensors.torch import load_file, save_file

from codec import latents as latents_module
from codec.latents import REQUIRED_METADATA, LatentReader, LatentWriter, check_compatible

META = dict(model_id="stabilityai/sd-vae-ft-mse", family="kl", scaling_factor=0.18215, shift_factor=0.0,
            fps=Fraction(30000, 1001), time_base=Fraction(1, 30000), source_width=63, source_height=47,
            pad_bottom=1, pad_right=1)


def meta_for(shape_chw, **changes):
    """META with a source size that fits latents (C, h, w) at 8x (padded by 1 bottom and right)."""
    _, h, w = shape_chw
    return {**META, "source_width": 8 * w - 1, "source_height": 8 * h - 1, **changes}


def _write(path, latents, pts=None, dtype=None, step=1):
    pts = torch.arange(len(latents)) * 1001 if pts is None else pts
    dtype = dtype or latents.dtype
    with LatentWriter(path, latents.shape[1:], dtype, meta_for(latents.shape[1:]), frames_hint=len(latents)) as w:
        for i in range(0, len(latents), step):
            w.write(latents[i : i + step], pts[i : i + step])
    return path


def split(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def rewrite(path, edit, resign=True):
    """Apply ``edit(header)`` to a latent file's JSON header; with ``resign``, recompute the checksum
    as the writer would, so the edit reaches the checks behind the checksum."""
    header, body = split(path)
    edit(header)
    if resign and isinstance(header.get("__metadata__"), dict):
        digest = hashlib.sha256(body).digest()
        header["__metadata__"]["checksum"] = (
            "sha256:" + digest.hex() if header["__metadata__"]["format"] == "codec-latents/1"
            else latents_module._checksum(header, digest))
    text = json.dumps(header).encode()
    text = text.ljust((len(text) + 7) // 8 * 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return path


def refused(path, match, verify=False):
    """The one-line ValueError that opening (and verifying) ``path`` raises, checked against ``match``."""
    with pytest.raises(ValueError, match=match) as err:
        reader = LatentReader(path)
        if verify:
            reader.verify()
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "\n" not in text, text
    return text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plain_safetensors_reads_it(tmp_path, dtype):
    latents = torch.randn(50, 4, 6, 8).to(dtype)
    path = _write(tmp_path / "a.safetensors", latents, step=1)  # streamed frame by frame
    tensors = load_file(path)
    assert set(tensors) == {"latents", "pts"}
    assert torch.equal(tensors["latents"], latents) and tensors["latents"].dtype == dtype
    assert tensors["pts"].tolist() == [i * 1001 for i in range(50)]
    with LatentReader(path) as reader:
        meta = reader.metadata
        assert reader.shape == (50, 4, 6, 8) and reader.num_frames == 50 and reader.dtype == dtype
        assert reader.fps == Fraction(30000, 1001) and reader.time_base == Fraction(1, 30000)
        reader.verify()
    assert meta["fps"] == "30000/1001" and meta["scaling_factor"] == "0.18215"
    assert meta["num_frames"] == "50" and meta["latent_channels"] == "4" and meta["format"] == "codec-latents/2"
    assert meta["dtype"] == str(dtype).removeprefix("torch.") and meta["checksum"].startswith("sha256:")
    assert all(isinstance(v, str) for v in meta.values())
    assert set(REQUIRED_METADATA) <= set(meta)
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_len % 8 == 0 and json.loads(path.read_bytes()[8 : 8 + header_len])["__metadata__"] == meta


def test_range_reads_and_batches(tmp_path):
    latents = torch.randn(23, 16, 3, 5)
    path = _write(tmp_path / "r.safetensors", latents, dtype=torch.float32, step=4)
    reader = LatentReader(path, batch=10)
    assert torch.equal(reader.read(5, 9), latents[5:9])
    assert torch.equal(reader.read(22, 23), latents[22:])
    assert torch.equal(reader.read(), latents)
    batches = list(reader)
    assert [len(b) for b, _ in batches] == [10, 10, 3]
    assert torch.equal(torch.cat([p for _, p in batches]), reader.pts)
    for start, end in [(-1, 3), (5, 5), (0, 24)]:
        with pytest.raises(ValueError, match=r"r.safetensors: expected 0 <= start < end <= 23"):
            reader.read(start, end)


def test_odd_sized_frames(tmp_path):
    latents = torch.randn(7, 1, 3, 3).half()  # 18 bytes a frame: pts lands unaligned
    path = _write(tmp_path / "odd.safetensors", latents)
    reader = LatentReader(path)
    reader.verify()
    assert torch.equal(reader.read(), latents)


def test_no_frames_makes_no_file(tmp_path):
    target = tmp_path / "empty.safetensors"
    writer = LatentWriter(target, (4, 2, 2), torch.float16, meta_for((4, 2, 2)))
    with pytest.raises(ValueError, match=r"empty.safetensors: no frames were written, so no latent file was made"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
    writer.close()  # closed: nothing more to do
    with pytest.raises(ValueError, match="no frames were written"):
        with LatentWriter(target, (4, 2, 2), torch.float16, meta_for((4, 2, 2))):
            pass
    assert list(tmp_path.iterdir()) == []


def test_tampering_fails_verify(tmp_path):
    path = _write(tmp_path / "t.safetensors", torch.randn(10, 4, 4, 4))
    data = bytearray(path.read_bytes())
    data[-200] ^= 0x01  # a bit inside the latents
    path.write_bytes(bytes(data))
    reader = LatentReader(path)
    with pytest.raises(ValueError, match="t.safetensors: checksum mismatch: the file was modified or trunc"):
        reader.verify()


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.01])
def test_truncated_file_is_refused(tmp_path, keep):
    path = _write(tmp_path / "cut.safetensors", torch.randn(10, 4, 4, 4))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="cut.safetensors: .*truncated"):
        LatentReader(path).verify()


def test_not_a_latent_file(tmp_path):
    text = tmp_path / "text.safetensors"
    text.write_text("hello, this is not safetensors at all")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, other, metadata={"format": "pt"})
    no_meta = tmp_path / "nometa.safetensors"
    save_file({"latents": torch.zeros(2, 4, 1, 1), "pts": torch.zeros(2, dtype=torch.int64)}, no_meta)
    for path, what in [(text, "expected a safetensors file"), (tiny, "expected a safetensors file"),
                       (other, "expected tensors 'latents' and 'pts'"), (no_meta, "metadata lacks"),
                       (tmp_path / "missing.safetensors", "no such file")]:
        with pytest.raises(ValueError, match=what) as err:
            LatentReader(path)
        assert path.name in str(err.value)


def test_exception_inside_with_leaves_nothing(tmp_path):
    target = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError):
        with LatentWriter(target, (4, 2, 2), torch.float16, meta_for((4, 2, 2))) as writer:
            writer.write(torch.zeros(3, 4, 2, 2), [0, 1, 2])
            assert not target.exists() and (tmp_path / ".x.safetensors.partial").exists()
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="metadata lacks fps"):
        LatentWriter(tmp_path / "a.safetensors", (4, 2, 2), torch.float16,
                     {k: v for k, v in meta_for((4, 2, 2)).items() if k != "fps"})
    with pytest.raises(ValueError, match="dtype"):
        LatentWriter(tmp_path / "a.safetensors", (4, 2, 2), torch.int8, meta_for((4, 2, 2)))
    with pytest.raises(ValueError, match="does not exist"):
        LatentWriter(tmp_path / "no" / "a.safetensors", (4, 2, 2), torch.float16, meta_for((4, 2, 2)))
    with LatentWriter(tmp_path / "a.safetensors", (4, 2, 2), "float16", meta_for((4, 2, 2))) as writer:
        with pytest.raises(ValueError, match=r"expected latents \(n, 4, 2, 2\), got \(1, 4, 2, 3\)"):
            writer.write(torch.zeros(1, 4, 2, 3), [0])
        with pytest.raises(ValueError, match="expected 2 pts"):
            writer.write(torch.zeros(2, 4, 2, 2), [0])
        writer.write(torch.zeros(1, 4, 2, 2), [0])
    assert LatentReader(tmp_path / "a.safetensors").num_frames == 1  # the refused writes left no trace


def test_check_compatible():
    meta = {"model_id": "flux-vae", "latent_channels": "16", "family": "kl"}
    check_compatible(meta, 16, "kl")
    with pytest.raises(ValueError, match=r"latents were made by flux-vae \(16 channels, family kl\); "
                                         r"model taesd expects 4 channels, family tiny"):
        check_compatible(meta, 4, "tiny", model_id="taesd")


# ---- the header is validated before it is used (each case was a traceback or silently accepted) ----

def _set(*path_and_value):
    *path, value = path_and_value

    def edit(header):
        node = header
        for key in path[:-1]:
            node = node[key]
        if value is DROP:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return edit


DROP = object()
HEADER_CASES = {  # name: (edit, what the message must say); the file is re-signed after the edit
    "no data_offsets": (_set("latents", "data_offsets", DROP), "tensor 'latents': expected an object with dtype"),
    "offsets not a list": (_set("pts", "data_offsets", None), r"tensor 'pts': expected data_offsets \[begin, end\]"),
    "one offset": (_set("latents", "data_offsets", [0]), r"expected data_offsets \[begin, end\]"),
    "offsets reversed": (_set("latents", "data_offsets", [512, 0]), "takes 512 bytes, data_offsets"),
    "offsets overlap": (_set("pts", "data_offsets", [504, 536]), "expected the tensors' data to follow"),
    "offsets past the end": (_set("pts", "data_offsets", [520, 552]), "expected the tensors' data to follow"),
    "offset is a bool": (_set("latents", "data_offsets", [False, 512]), r"expected data_offsets \[begin, end\]"),
    "entry not an object": (_set("latents", [1, 2]), "tensor 'latents': expected an object"),
    "negative size": (_set("latents", "shape", [4, 4, -4, -4]), "expected a shape of 4 positive integers"),
    "3-D latents": (_set("latents", "shape", [4, 16, 4]), "expected a shape of 4 positive integers"),
    "string size": (_set("latents", "shape", [4, 4, "4", 4]), "expected a shape of 4 positive integers"),
    "unknown dtype": (_set("latents", "dtype", "F64"), "expected dtype F32 or F16 or BF16, got 'F64'"),
    "dtype not a string": (_set("latents", "dtype", ["F16"]), "expected dtype F32 or F16 or BF16"),
    "float pts": (_set("pts", "dtype", "F64"), "tensor 'pts': expected dtype I64"),
    "pts of another length": (_set("pts", "shape", [3]), "takes 24 bytes"),
    "an extra tensor": (_set("extra", {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]}),
                        r"expected tensors 'latents' and 'pts', found \['extra', 'latents', 'pts'\]"),
    "metadata not an object": (_set("__metadata__", [["format", "codec-latents/2"]]), "__metadata__ to be an obj"),
    "metadata value a number": (_set("__metadata__", "source_width", 31), "__metadata__ to be an object of str"),
    "fps 0/0": (_set("__metadata__", "fps", "0/0"), r"metadata 'fps': expected a positive rational"),
    "fps 0": (_set("__metadata__", "fps", "0"), r"metadata 'fps': expected a positive rational"),
    "fps -1": (_set("__metadata__", "fps", "-1"), r"metadata 'fps': expected a positive rational"),
    "fps inf": (_set("__metadata__", "fps", "inf"), r"metadata 'fps': expected a positive rational"),
    "fps nan": (_set("__metadata__", "fps", "nan"), r"metadata 'fps': expected a positive rational"),
    "fps garbage": (_set("__metadata__", "fps", "thirty"), r"metadata 'fps': expected a positive rational"),
    "fps huge": (_set("__metadata__", "fps", "1e999999999"), r"got '1e999999999'"),
    "fps huge numerator": (_set("__metadata__", "fps", "9" * 5000 + "/1"), r"got '99999"),
    "time base 0": (_set("__metadata__", "time_base", "0/1"), r"metadata 'time_base': expected a positive"),
    "time base 1/0": (_set("__metadata__", "time_base", "1/0"), r"metadata 'time_base': expected a positive"),
    "scaling 0": (_set("__metadata__", "scaling_factor", "0"), r"'scaling_factor': expected a finite non-zero"),
    "shift nan": (_set("__metadata__", "shift_factor", "nan"), r"'shift_factor': expected a finite number"),
    "frames not a number": (_set("__metadata__", "num_frames", "four"), r"'num_frames': expected an integer >= 1"),
    "frames disagree": (_set("__metadata__", "num_frames", "5"), "metadata says 5 frames, latents hold 4"),
    "channels disagree": (_set("__metadata__", "latent_channels", "16"), "says 16 latent channels, the latents hold 4"),
    "dtype disagrees": (_set("__metadata__", "dtype", "bfloat16"), "'dtype' is 'bfloat16', the latents are F16"),
    "negative padding": (_set("__metadata__", "pad_right", "-1"), r"'pad_right': expected an integer >= 0"),
    "zero width": (_set("__metadata__", "source_width", "0"), r"'source_width': expected an integer >= 1"),
    "size does not fit": (_set("__metadata__", "source_width", "40"), "a 40x31 source padded by 1 right and 1 bottom"),
    "padding too large": (_set("__metadata__", "pad_bottom", "9"), "does not fit latents of 4x4"),
    "metadata key missing": (_set("__metadata__", "time_base", DROP), "metadata lacks time_base"),
    "a newer format": (_set("__metadata__", "format", "codec-latents/3"),
                       "format 'codec-latents/3' is not one this tool reads"),
    "not our format": (_set("__metadata__", "format", "pt"), "not a latent file of this tool, format 'pt'"),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_bad_headers_are_refused_in_one_line(tmp_path, case):
    edit, message = HEADER_CASES[case]
    path = _write(tmp_path / "h.safetensors", torch.randn(4, 4, 4, 4).half())
    refused(rewrite(path, edit), message)


def test_file_end_must_be_the_data_end(tmp_path):
    path = _write(tmp_path / "e.safetensors", torch.randn(4, 4, 4, 4).half())
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    refused(path, "unexpected bytes follow the data: the header describes 544 bytes of data, found 552")
    deep = tmp_path / "deep.safetensors"
    text = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    deep.write_bytes(struct.pack("<Q", len(text)) + text)
    refused(deep, "its header is not JSON")


def test_writer_refuses_metadata_the_reader_would(tmp_path):
    for changes, message in [({"fps": Fraction(0)}, "'fps': expected a positive rational"),
                             ({"time_base": "0/0"}, "'time_base': expected a positive rational"),
                             ({"scaling_factor": float("nan")}, "'scaling_factor': expected a finite"),
                             ({"source_width": 100}, "a 100x15 source padded by 1 right and 1 bottom")]:
        with pytest.raises(ValueError, match=message):
            LatentWriter(tmp_path / "w.safetensors", (4, 2, 2), torch.float16, meta_for((4, 2, 2), **changes))
        assert list(tmp_path.iterdir()) == []


# ---- the checksum covers what the bytes mean, not only the bytes ----

@pytest.mark.parametrize("change", ["relabel bf16", "other shape", "scaling", "fps", "new key"])
def test_checksum_covers_tensor_entries_and_metadata(tmp_path, change):
    path = _write(tmp_path / "c.safetensors", torch.randn(4, 4, 4, 4).half())
    edit = {
        "relabel bf16": lambda h: (h["latents"].update(dtype="BF16"), h["__metadata__"].update(dtype="bfloat16")),
        "other shape": lambda h: (h["latents"].update(shape=[4, 4, 2, 8]),
                                  h["__metadata__"].update(source_width="63", source_height="15")),
        "scaling": lambda h: h["__metadata__"].update(scaling_factor="1.5305"),
        "fps": lambda h: h["__metadata__"].update(fps="60"),
        "new key": lambda h: h["__metadata__"].update(model_sha256="0" * 64),
    }[change]
    rewrite(path, edit, resign=False)
    reader = LatentReader(path)  # structurally consistent: only the checksum can tell
    with pytest.raises(ValueError, match="c.safetensors: checksum mismatch"):
        reader.verify()


def test_relabelled_as_int16_is_refused_on_open(tmp_path):
    path = _write(tmp_path / "i.safetensors", torch.randn(4, 4, 4, 4).half())
    refused(rewrite(path, _set("latents", "dtype", "I16"), resign=False), "expected dtype F32 or F16 or BF16, got 'I1")


def _as_format_1(path):
    """The same file as the previous version wrote it (byte for byte, checked against its writer):
    format 1, checksum of the data bytes only."""
    return rewrite(path, lambda h: h["__metadata__"].update(format="codec-latents/1"))


def test_format_1_files_still_read(tmp_path):
    latents = torch.randn(4, 4, 4, 4).half()
    path = _as_format_1(_write(tmp_path / "v1.safetensors", latents))
    with LatentReader(path) as reader:
        reader.verify()
        assert torch.equal(reader.read(), latents)
    rewrite(path, lambda h: h["__metadata__"].update(scaling_factor="1.5"), resign=False)
    LatentReader(path).verify()  # format 1's rule: the data bytes only (documented)
    data = bytearray(path.read_bytes())
    data[-40] ^= 1
    path.write_bytes(bytes(data))
    refused(path, "checksum mismatch", verify=True)
    refused(rewrite(path, _set("__metadata__", "fps", "0/0")), "'fps': expected a positive rational")


# ---- finite values ----

@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_latents_are_refused(tmp_path, value, dtype):
    latents = torch.randn(6, 4, 4, 4).to(dtype)
    latents[4, 3, 2, 1] = float(value)
    latents[5, 0, 0, 0] = float(value)
    path = _write(tmp_path / "n.safetensors", latents)  # a valid checksum
    word = "NaN" if value == "nan" else "Inf"
    refused(path, f"frame 4 holds {word} values \\(expected finite latents\\)", verify=True)
    reader = LatentReader(path, batch=2)
    assert torch.equal(reader.read(0, 4), latents[:4])
    with pytest.raises(ValueError, match=f"n.safetensors: frame 4 holds {word} values"):
        list(reader)  # without verify(), reading refuses the frame
    with pytest.raises(ValueError, match=f"frame 4 holds {word}"):
        reader.verify()
    with pytest.raises(ValueError, match=f"frame 4 holds {word}"):
        reader.read(4, 5)  # a verify() that failed leaves reads checking


def test_reads_after_a_passing_verify_are_the_stored_frames(tmp_path):
    latents = torch.randn(5, 4, 4, 4)
    reader = LatentReader(_write(tmp_path / "v.safetensors", latents), batch=2)
    reader.verify()
    assert torch.equal(torch.cat([b for b, _ in reader]), latents)


def test_first_bad_frame_past_the_first_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(latents_module, "_CHUNK", 64)  # 32 float16 values a chunk: 2 frames of 16
    latents = torch.randn(9, 1, 4, 4).half()
    latents[7, 0, 3, 3] = float("nan")
    path = _write(tmp_path / "k.safetensors", latents)
    refused(path, "frame 7 holds NaN", verify=True)


def test_decode_refuses_nan_latents_and_leaves_no_video(tmp_path):
    from codec.pipeline import decode_video

    model = tiny_model_file(tmp_path / "tiny.safetensors")
    latents = torch.randn(3, 4, 2, 2).half()
    latents[1, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    with LatentWriter(path, (4, 2, 2), torch.float16, meta_for((4, 2, 2), family="tiny", model_id="taesd",
                                                                   scaling_factor=1.0, shift_factor=0.0)) as w:
        w.write(latents, [0, 1, 2])
    for verify in (True, False):
        with pytest.raises(ValueError, match="nan.safetensors: frame 1 holds NaN"):
            decode_video(path, tmp_path / "out.mp4", str(model), verify=verify)
        assert not [p for p in tmp_path.iterdir() if "out" in p.name]
