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
    if resign:
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
