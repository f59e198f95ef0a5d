"""codec.video: probe, FrameReader, VideoWriter on synthetic clips and the real clips of ../shared/data."""

import threading
from fractions import Fraction

import av
import numpy as np
import pytest

from codec.video import FrameReader, VideoWriter, probe_video

EDGE = ["av1_video.mkv", "h265_video.mp4", "h264_10bits.mp4", "bt709_full_range.mp4", "no_duration.webm"]


def _clip(t=10, h=48, w=64, seed=0):
    """Smooth moving gradients plus mild noise: (t, h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([x * 3 + i * 4, y * 4 + i, 200 - x - y + i * 2], -1) for i in range(t)]
    noise = rng.integers(-3, 4, (t, h, w, 3))
    return np.clip(np.stack(frames) + noise, 0, 255).astype(np.uint8)


def _write(path, frames, **kw):
    fps = kw.pop("fps", Fraction(25))
    with VideoWriter(path, frames.shape[2], frames.shape[1], fps, **kw) as writer:
        writer.write(frames)
    return path


def _read_all(path, **kw):
    with FrameReader(path, **kw) as reader:
        batches = list(reader)
    cat = lambda name: np.concatenate([getattr(b, name) for b in batches])  # noqa: E731
    return cat("frames"), cat("pts"), cat("indices")


def test_lossy_round_trip_keeps_size_rate_and_colour(tmp_path):
    frames = _clip()
    path = _write(tmp_path / "a.mp4", frames, fps=Fraction(30000, 1001))
    info = probe_video(path)
    assert (info.width, info.height, info.fps) == (64, 48, Fraction(30000, 1001))
    assert (info.num_frames, info.num_frames_exact, info.codec, info.pix_fmt) == (10, True, "h264", "yuv420p")
    got, pts, idx = _read_all(path, batch=3)
    assert got.shape == frames.shape and got.dtype == np.uint8
    diff = got.astype(float) - frames
    assert np.abs(diff).mean() < 3.0  # crf 18 smooths the +-3 noise away
    assert idx.tolist() == list(range(10))
    assert np.array_equal(pts, np.arange(10) * 1001 * info.time_base.denominator // 30000)


def test_no_colour_shift(tmp_path):
    """crf 0 keeps YUV exactly: what is left is RGB<->YUV rounding and chroma subsampling, which
    must not shift any channel (a wrong matrix, range or chroma siting shifts it by 1-10 levels)."""
    frames = _clip(t=2)
    got, _, _ = _read_all(_write(tmp_path / "c.mp4", frames, crf=0))
    assert np.abs((got.astype(float) - frames).mean(axis=(0, 1, 2))).max() < 0.1


@pytest.mark.parametrize("size", [(48, 64), (47, 63), (1, 1)])
def test_lossless_round_trip_is_bit_exact(tmp_path, size):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (5, *size, 3), dtype=np.uint8)
    path = _write(tmp_path / "l.mp4", frames, lossless=True, preset="ultrafast")
    got, _, _ = _read_all(path)
    assert np.array_equal(got, frames)


def test_odd_size_is_padded_by_one_edge_pixel(tmp_path):
    frames = _clip(t=3, h=47, w=63)
    path = _write(tmp_path / "odd.mp4", frames, crf=0)
    info = probe_video(path)
    assert (info.width, info.height) == (64, 48)
    got, _, _ = _read_all(path)
    assert np.abs(got[:, :47, :63].astype(float) - frames).mean() < 1.5
    assert np.abs(got[:, 47, :63].astype(float) - frames[:, 46]).mean() < 3


def test_given_pts_and_time_base_are_kept(tmp_path):
    frames = _clip(t=5)
    pts = np.array([0, 512, 1536, 2048, 4096])  # variable frame durations
    path = tmp_path / "vfr.mp4"
    with VideoWriter(path, 64, 48, Fraction(24), time_base=Fraction(1, 12288)) as writer:
        writer.write(frames[:2], pts[:2])
        writer.write(frames[2:], pts[2:])
    info = probe_video(path)
    assert info.time_base == Fraction(1, 12288)
    assert _read_all(path)[1].tolist() == pts.tolist()


def test_start_end_stride(tmp_path):
    path = _write(tmp_path / "s.mp4", _clip(t=10), preset="ultrafast")
    assert _read_all(path, start=2, end=9, stride=3, batch=2)[2].tolist() == [2, 5, 8]
    assert _read_all(path, start=7)[2].tolist() == [7, 8, 9]
    assert _read_all(path, end=100)[2].tolist() == list(range(10))
    batches = list(FrameReader(path, batch=4))
    assert [len(b) for b in batches] == [4, 4, 2]


@pytest.mark.parametrize("kw", [dict(start=-1), dict(end=3, start=3), dict(end=0), dict(stride=0),
                                dict(batch=0), dict(start=1.5)])
def test_bad_ranges_are_refused(tmp_path, kw):
    path = _write(tmp_path / "s.mp4", _clip(t=2), preset="ultrafast")
    with pytest.raises(ValueError, match="s.mp4: expected"):
        FrameReader(path, **kw)


def _threads():
    return {t for t in threading.enumerate() if t.name.startswith("FrameReader(")}


def test_early_stop_and_close_end_the_decoder_thread(tmp_path):
    path = _write(tmp_path / "s.mp4", _clip(t=10), preset="ultrafast")
    for _ in FrameReader(path, batch=1, queue_size=1):
        break
    assert not _threads()
    with FrameReader(path, batch=1, queue_size=1) as reader:
        it = iter(reader)
        next(it)
        assert len(_threads()) == 1
    assert not _threads()


def test_bad_inputs_are_refused_naming_the_file(tmp_path):
    missing, empty, text = tmp_path / "missing.mp4", tmp_path / "empty.mp4", tmp_path / "text.mp4"
    empty.write_bytes(b"")
    text.write_text("not a video at all\n" * 20)
    png = tmp_path / "still.png"
    av.VideoFrame.from_ndarray(_clip(t=1)[0], format="rgb24").save(str(png))
    wav = tmp_path / "sound.wav"
    with av.open(str(wav), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
    for path, what in [(missing, "no such file"), (empty, "empty"), (text, "not a readable video"),
                       (png, "still image"), (wav, "has none"), (tmp_path, "expected a video")]:
        with pytest.raises(ValueError, match=what) as err:
            FrameReader(path)
        assert path.name in str(err.value)


def test_writer_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        VideoWriter(tmp_path / "nowhere" / "x.mp4", 64, 48, 25)
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(tmp_path / "x.mp4", 64, 48, 0)
    with VideoWriter(tmp_path / "x.mp4", 64, 48, 25) as writer:
        with pytest.raises(ValueError, match=r"expected frames \(T, 48, 64, 3\) uint8"):
            writer.write(np.zeros((2, 48, 64, 3), np.float32))
        writer.write(_clip(t=2), pts=[0, 1])
        with pytest.raises(ValueError, match="increasing pts"):
            writer.write(_clip(t=1), pts=[1])


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(target, 64, 48, 25) as writer:
            writer.write(_clip(t=3))
            assert not target.exists()
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


# Real clips (../shared/data/video)


@pytest.mark.parametrize("name, size, fps, frames", [
    ("squirrel.mp4", (1280, 720), Fraction(25), 250),
    ("realshort.mp4", (320, 240), Fraction(45000, 1499), 36),
    ("tears_of_steel.webm", (960, 400), Fraction(24), 48),
])
def test_probe_real_clips(shared_data, name, size, fps, frames):
    info = probe_video(shared_data / "video" / name)
    assert ((info.width, info.height), info.fps, info.num_frames) == (size, fps, frames)
    assert info.num_frames_exact == name.endswith(".mp4")


def test_end_gives_that_many_frames(shared_data):
    frames, pts, idx = _read_all(shared_data / "video" / "realshort.mp4", end=24, batch=5)
    assert frames.shape == (24, 240, 320, 3) and idx.tolist() == list(range(24))
    assert np.all(np.diff(pts) > 0)


@pytest.mark.parametrize("name", EDGE)
def test_edge_files_decode(shared_data, name):
    path = shared_data / "video" / "edge" / name
    info = probe_video(path)
    frames, _, _ = _read_all(path, end=3)
    assert frames.shape == (3, info.height, info.width, 3) and frames.dtype == np.uint8
    assert 2 < frames.mean() < 250 and frames.std() > 1  # no_duration.webm starts nearly black
    assert info.codec == {"av1_video.mkv": "av1", "h265_video.mp4": "hevc"}.get(name, info.codec)
    if name == "no_duration.webm":
        assert info.duration is None and info.num_frames is None


def _reference_rgb_mean(frame: av.VideoFrame) -> float:
    """Mean of a float YUV->RGB conversion from the planes, using the frame's matrix and range."""
    bits = 10 if "10" in frame.format.name else 8
    planes = []
    for p in frame.planes:
        a = np.frombuffer(p, np.uint16 if bits == 10 else np.uint8).reshape(p.height, -1)[:, : p.width]
        planes.append(a.astype(np.float64) / 2 ** (bits - 8))
    y, u, v = planes
    u, v = (c.repeat(y.shape[0] // c.shape[0], 0).repeat(y.shape[1] // c.shape[1], 1) for c in (u, v))
    if frame.color_range == 2 or frame.format.name.startswith("yuvj"):
        y, u, v = y / 255, (u - 128) / 255, (v - 128) / 255
    else:
        y, u, v = (y - 16) / 219, (u - 128) / 224, (v - 128) / 224
    kr, kb = (0.2126, 0.0722) if frame.colorspace == 1 else (0.299, 0.114)
    r, b = y + 2 * (1 - kr) * v, y + 2 * (1 - kb) * u
    g = (y - kr * r - kb * b) / (1 - kr - kb)
    return float(np.clip(np.stack([r, g, b]) * 255, 0, 255).mean())


@pytest.mark.parametrize("name", ["edge/bt709_full_range.mp4", "edge/h264_10bits.mp4", "squirrel.mp4"])
def test_colour_range_and_matrix_are_honoured(shared_data, name):
    path = shared_data / "video" / name
    with av.open(str(path)) as c:
        expected = _reference_rgb_mean(next(c.decode(video=0)))
    frames, _, _ = _read_all(path, end=1)
    assert abs(frames.mean() - expected) < 0.5  # a wrong range or matrix is off by several levels


@pytest.mark.parametrize("threads", [True, False])
def test_truncated_mp4_raises_in_the_consumer(shared_data, tmp_path, threads):
    data = (shared_data / "video" / "clip_03_sintel.mp4").read_bytes()  # index at the front
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 3 // 10])
    got = []
    with pytest.raises(ValueError, match=r"cut\.mp4: corrupt or truncated video data at frame index") as err:
        with FrameReader(cut, batch=16, threads=threads) as reader:
            for batch in reader:
                got.extend(batch.indices)
    assert got == list(range(len(got))) and len(got) > 40  # the good frames come first
    assert f"frame index {len(got)} " in str(err.value)
    assert not _threads()
    data = (shared_data / "video" / "chaplin.mp4").read_bytes()  # index at the end: nothing readable
    cut.write_bytes(data[: len(data) * 3 // 10])
    with pytest.raises(ValueError, match="cut.mp4: not a readable video"):
        FrameReader(cut)


def test_kodak_png_is_not_a_video(shared_data):
    with pytest.raises(ValueError, match="kodim01.png: expected a video, got a still image"):
        probe_video(shared_data / "images" / "kodak" / "kodim01.png")
