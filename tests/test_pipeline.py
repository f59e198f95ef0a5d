"""End to end: encode a clip to latents and back, streaming, through the API and the command."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from helpers import moving_square_frames, on_second_call, tiny_model_file, write_clip

from codec.cli import main
from codec.latents import LatentReader
from codec.pipeline import decode_video, encode_video
from codec.quality import psnr
from codec.video import FrameReader, probe_video


@pytest.fixture
def clip(tmp_path):
    return write_clip(tmp_path / "clip.mp4", moving_square_frames(10, 50, 70), fps=Fraction(30000, 1001))


@pytest.fixture
def model_file(tmp_path):
    return tiny_model_file(tmp_path / "tiny.safetensors")


def read_all(path):
    with FrameReader(path, batch=64) as r:
        return np.concatenate([b.frames for b in r])


def test_encode_decode_streaming_preserves_clip(clip, model_file, tmp_path):
    lat = tmp_path / "clip.safetensors"
    rep = encode_video(clip, lat, str(model_file), batch=3)
    assert rep.frames == 10 and len(rep.latency_ms) == 10
    with LatentReader(lat) as r:
        assert r.shape == (10, 4, 7, 9)  # 50x70 padded to 56x72
        assert r.metadata["pad_bottom"] == "6" and r.metadata["pad_right"] == "2"
        assert r.fps == Fraction(30000, 1001)
        r.verify()
    out = tmp_path / "out.mp4"
    rep = decode_video(lat, out, lossless=True, batch=4)  # model taken from the file
    assert rep.frames == 10
    src, dst = probe_video(clip), probe_video(out)
    assert (dst.width, dst.height, dst.fps, dst.num_frames) == (70, 50, src.fps, 10)
    assert abs(dst.duration - src.duration) < 1e-3
    assert read_all(out).shape == (10, 50, 70, 3)


def test_cli_encode_decode_info(clip, model_file, tmp_path, capsys):
    lat, out = tmp_path / "a.safetensors", tmp_path / "a.mp4"
    assert main(["encode", str(clip), "-o", str(lat), "--model", str(model_file), "--end", "4", "--quiet"]) == 0
    assert LatentReader(lat).num_frames == 4
    assert main(["decode", str(lat), "-o", str(out), "--quiet"]) == 0
    assert probe_video(out).num_frames == 4
    capsys.readouterr()
    assert main(["info", str(lat)]) == 0
    assert '"frames": 4' in capsys.readouterr().out
    assert main(["encode", str(clip), "-o", str(lat), "--model", str(model_file), "--start", "2", "--stride", "3",
                 "--quiet"]) == 0
    with LatentReader(lat) as r:
        assert r.num_frames == 3  # frames 2, 5, 8
        assert r.fps == Fraction(30000, 1001) / 3


def test_lossless_roundtrip_psnr_is_the_models_own(clip, model_file, tmp_path):
    import json

    out, rep = tmp_path / "rt.mp4", tmp_path / "rt.json"
    assert main(["roundtrip", str(clip), "-o", str(out), "--model", str(model_file), "--lossless",
                 "--report", str(rep), "--plot", str(tmp_path / "rt.png"), "--quiet"]) == 0
    report = json.loads(rep.read_text())
    back = read_all(out)
    src = read_all(clip)
    assert back.shape == src.shape
    measured = psnr(back, src)
    assert np.allclose(measured, report["psnr"], atol=1e-9)  # no codec loss at all
    assert (tmp_path / "rt.png").stat().st_size > 1000


def test_version_and_models(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "flux1" in out and "0.3611" in out and "taef2" in out


# ---- bad input: one clear line, non-zero exit, no output that looks complete --------------------

def run_error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("codec: ") and "\n" not in err and "Traceback" not in err
    return err


def assert_no_output(folder, name):
    leftovers = [p.name for p in folder.iterdir() if name in p.name]
    assert leftovers == [], leftovers


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "png", "audio-only"])
def test_bad_video_inputs(kind, clip, model_file, tmp_path, capsys):
    bad = tmp_path / f"bad-{kind}.mp4"
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("hello, I am not a video\n" * 20)
    elif kind == "truncated":
        data = clip.read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    elif kind == "png":
        import av

        bad = tmp_path / "still.png"
        with av.open(str(bad), "w", format="image2") as c:
            s = c.add_stream("png", rate=1)
            s.width, s.height, s.pix_fmt = 16, 16, "rgb24"
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
            for p in s.encode():
                c.mux(p)
    else:
        import av

        bad = tmp_path / "audio.wav"
        with av.open(str(bad), "w") as c:
            s = c.add_stream("pcm_s16le", rate=8000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            frame.sample_rate = 8000
            for p in s.encode(frame):
                c.mux(p)
            for p in s.encode():
                c.mux(p)
    out = tmp_path / "out.safetensors"
    run_error(["encode", str(bad), "-o", str(out), "--model", str(model_file), "--quiet"], capsys)
    assert_no_output(tmp_path, "out.safetensors")


def test_missing_output_folder(clip, model_file, tmp_path, capsys):
    err = run_error(["encode", str(clip), "-o", str(tmp_path / "nope" / "x.safetensors"), "--model",
                     str(model_file), "--quiet"], capsys)
    assert "does not exist" in err


def encoded(clip, model_file, tmp_path):
    lat = tmp_path / "good.safetensors"
    encode_video(clip, lat, str(model_file))
    return lat


def test_truncated_latent_file(clip, model_file, tmp_path, capsys):
    lat = encoded(clip, model_file, tmp_path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(lat.read_bytes()[:-100])
    run_error(["decode", str(cut), "-o", str(tmp_path / "o.mp4"), "--quiet"], capsys)
    assert_no_output(tmp_path, "o.mp4")


def test_tampered_latent_file(clip, model_file, tmp_path, capsys):
    lat = encoded(clip, model_file, tmp_path)
    data = bytearray(lat.read_bytes())
    data[-200] ^= 0xFF  # inside the latent data
    lat.write_bytes(bytes(data))
    err = run_error(["decode", str(lat), "-o", str(tmp_path / "o.mp4"), "--quiet"], capsys)
    assert "checksum" in err
    assert_no_output(tmp_path, "o.mp4")


def test_latents_decoded_with_another_model(clip, model_file, tmp_path, capsys):
    lat = encoded(clip, model_file, tmp_path)
    other = tiny_model_file(tmp_path / "c16.safetensors", latent_channels=16)
    err = run_error(["decode", str(lat), "-o", str(tmp_path / "o.mp4"), "--model", str(other), "--quiet"], capsys)
    assert "4 channels" in err and "16 channels" in err
    assert_no_output(tmp_path, "o.mp4")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_encode_leaves_nothing(exc, clip, model_file, tmp_path, capsys, monkeypatch):
    from codec import coder

    def stop():
        raise exc("stop midway")

    calls = on_second_call(monkeypatch, coder.FrameEncoder, stop)
    code = main(["encode", str(clip), "-o", str(tmp_path / "x.safetensors"), "--model", str(model_file),
                 "--batch", "2", "--quiet"])
    assert code == (130 if exc is KeyboardInterrupt else 2)
    assert calls["n"] == 2
    assert_no_output(tmp_path, "x.safetensors")


def test_interrupted_decode_leaves_nothing(clip, model_file, tmp_path, monkeypatch):
    from codec import coder

    lat = encoded(clip, model_file, tmp_path)
    def stop():
        raise KeyboardInterrupt

    on_second_call(monkeypatch, coder.FrameDecoder, stop)
    assert main(["decode", str(lat), "-o", str(tmp_path / "y.mp4"), "--quiet"]) == 130
    assert_no_output(tmp_path, "y.mp4")


# ---- real clips -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def taef2(shared_data):
    from codec.models import load_model

    return load_model(shared_data / "weights" / "taef2_encoder.pth")


def test_real_clip_roundtrip(taef2, shared_data, tmp_path):
    src = shared_data / "video" / "realshort.mp4"
    lat, out = tmp_path / "r.safetensors", tmp_path / "r.mp4"
    encode_video(src, lat, taef2, end=6)
    decode_video(lat, out, taef2)
    info, back = probe_video(src), probe_video(out)
    assert (back.width, back.height, back.fps, back.num_frames) == (info.width, info.height, info.fps, 6)
    frames_in = read_all(src)[:6]
    assert float(np.mean(psnr(read_all(out), frames_in))) > 25


@pytest.mark.parametrize("name", ["av1_video.mkv", "h265_video.mp4", "h264_10bits.mp4", "bt709_full_range.mp4",
                                  "no_duration.webm"])
def test_edge_files_encode_and_decode(name, shared_data, model_file, tmp_path):
    src = shared_data / "video" / "edge" / name
    lat, out = tmp_path / "e.safetensors", tmp_path / "e.mp4"
    encode_video(src, lat, str(model_file), end=3)
    decode_video(lat, out)
    info, back = probe_video(src), probe_video(out)
    assert back.num_frames == 3
    assert (back.width + back.width % 2, back.height + back.height % 2) == (
        info.width + info.width % 2, info.height + info.height % 2)


def test_output_clock_keeps_or_snaps_timestamps():
    from codec.pipeline import OutputClock

    keep = OutputClock(Fraction(30000, 1001), Fraction(1, 90000))
    assert keep.keep and keep.time_base == Fraction(1, 90000)
    assert keep([0, 3003, 6006]).tolist() == [0, 3003, 6006]
    snap = OutputClock(Fraction(24), Fraction(1, 1000))  # WebM milliseconds at 24 fps
    assert not snap.keep and snap.time_base == Fraction(1, 24)
    assert snap([0, 42, 83, 125]).tolist() == [0, 1, 2, 3]
    fresh = OutputClock(Fraction(24), Fraction(1, 1000))
    assert fresh([0, 10, 20]).tolist() == [0, 1, 2]  # never two frames in one slot


def test_webm_millisecond_clock_gives_exact_rate(shared_data, model_file, tmp_path):
    src = shared_data / "video" / "tears_of_steel.webm"
    out = tmp_path / "w.mp4"
    from codec.pipeline import roundtrip_video

    roundtrip_video(src, out, str(model_file), end=5)
    assert probe_video(out).fps == probe_video(src).fps == 24
