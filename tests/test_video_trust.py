"""Nothing lost, nothing silent: truncated, damaged, mistimed, rotated and undecodable sources.

Each bad file is made here with PyAV from a small synthetic clip (no network, no shared data),
then read through FrameReader, the pipeline and the command.
"""

from __future__ import annotations

import json
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import tiny_model_file

from codec.cli import main
from codec.latents import LatentReader
from codec.pipeline import decode_video, describe_video, encode_video, roundtrip_video
from codec.video import FrameReader, VideoWriter, probe_video

W, H, N = 64, 48, 24


def _frames(n: int = N) -> np.ndarray:
    """(n, 48, 64, 3) uint8: moving gradients, different in every frame."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([np.stack([x * 3 + i * 7, y * 4 + i * 3, 200 - x - y + i * 5], -1)
                     for i in range(n)]).clip(0, 255).astype(np.uint8)


def _encode(path: Path, codec: str = "libx264", pix_fmt: str = "yuv420p", options=None,
            container_options=None, rotation: int | None = None) -> Path:
    """Encode _frames() at 24 fps with PyAV directly (not our writer)."""
    with av.open(str(path), "w", options=container_options or {}) as c:
        s = c.add_stream(codec, rate=24)
        s.width, s.height, s.pix_fmt = W, H, pix_fmt
        s.options = options or {}
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i, image in enumerate(_frames()):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def _packets(path: Path) -> list[av.Packet]:
    with av.open(str(path)) as c:
        return [p for p in c.demux(c.streams.video[0]) if p.size]


def _cut_before_packet(src: Path, dst: Path, k: int) -> Path:
    """dst: src cut where its k-th video packet starts (a clean packet boundary)."""
    dst.write_bytes(src.read_bytes()[: _packets(src)[k].pos])
    return dst


def _read(path: Path, **kw):
    with FrameReader(path, batch=5, **kw) as reader:
        batches = list(reader)
    if not batches:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), reader
    return np.concatenate([b.indices for b in batches]), np.concatenate([b.pts for b in batches]), reader


def _read_until_error(path: Path, **kw) -> tuple[list[int], ValueError]:
    got = []
    with pytest.raises(ValueError) as err:
        with FrameReader(path, batch=5, **kw) as reader:
            for b in reader:
                got.extend(b.indices.tolist())
    return got, err.value


@pytest.fixture
def model_file(tmp_path):
    return tiny_model_file(tmp_path / "tiny.safetensors")


@pytest.fixture
def cut_mp4(tmp_path):
    """A faststart mp4 whose index states 24 frames, cut after 12 packets: FFmpeg reads it
    without any error."""
    full = _encode(tmp_path / "full.mp4", options={"preset": "ultrafast"},
                   container_options={"movflags": "+faststart"})
    return _cut_before_packet(full, tmp_path / "cut.mp4", 12)


# 1. truncation that FFmpeg does not report


def test_cut_faststart_mp4_is_refused_after_its_good_frames(cut_mp4):
    info = probe_video(cut_mp4)
    assert (info.num_frames, info.num_frames_exact) == (24, True)  # the index is intact
    with av.open(str(cut_mp4)) as c:  # what FFmpeg does: 12 frames, no error
        assert sum(1 for _ in c.decode(video=0)) == 12
    got, err = _read_until_error(cut_mp4)
    assert got == list(range(12))
    assert "cut.mp4: the video ends early (truncated or damaged): 12 frames decode, expected 24" in str(err)
    assert "--allow-short" in str(err) and "\n" not in str(err)


def test_webm_cut_in_half_is_refused(tmp_path):
    full = _encode(tmp_path / "full.webm", codec="libvpx")
    cut = _cut_before_packet(full, tmp_path / "half.webm", 12)
    info = probe_video(cut)
    assert (info.num_frames, info.num_frames_exact) == (24, False)  # from the header's duration
    got, err = _read_until_error(cut)
    assert len(got) == 12 and "12 frames decode, expected 24 (the container states 24, estimated)" in str(err)


def test_truncation_check_follows_start_end_stride(cut_mp4):
    assert _read(cut_mp4, end=10)[0].tolist() == list(range(10))  # all asked-for frames are there
    assert _read(cut_mp4, end=13)[0].tolist() == list(range(12))  # one short: within the slack
    got, err = _read_until_error(cut_mp4, end=20)
    assert got == list(range(12)) and "expected 20, up to end=20" in str(err)
    got, err = _read_until_error(cut_mp4, start=4, stride=3)
    assert got == [4, 7, 10] and "12 frames decode, expected 24" in str(err)


def test_allow_short_keeps_the_frames_with_a_warning(cut_mp4):
    with pytest.warns(UserWarning, match="12 frames decode, expected 24.*kept the 12 frames"):
        idx, _, reader = _read(cut_mp4, start=1, stride=2, allow_short=True)
    assert idx.tolist() == [1, 3, 5, 7, 9, 11] and reader.missing_frames == 12


def test_encode_of_a_cut_source_fails_and_keeps_nothing(cut_mp4, model_file, tmp_path, capsys):
    out = tmp_path / "lat.safetensors"
    code = main(["encode", str(cut_mp4), "-o", str(out), "--model", str(model_file), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "12 frames decode, expected 24" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    rt = tmp_path / "rt.mp4"
    assert main(["roundtrip", str(cut_mp4), "-o", str(rt), "--model", str(model_file), "--quiet"]) == 2
    assert not rt.exists()


def test_allow_short_encode_records_the_short_count(cut_mp4, model_file, tmp_path, capsys):
    out = tmp_path / "lat.safetensors"
    with pytest.warns(UserWarning, match="ends early"):
        rep = encode_video(cut_mp4, out, str(model_file), allow_short=True)
    assert (rep.frames, rep.missing_frames) == (12, 12)
    with LatentReader(out) as r:
        assert r.num_frames == 12 and r.metadata["container_frames"] == "24"
    assert main(["encode", str(cut_mp4), "-o", str(out), "--model", str(model_file), "--allow-short"]) == 0
    captured = capsys.readouterr()
    assert "short by 12 frames" in captured.out
    warned = [line for line in captured.err.splitlines() if "ends early" in line]
    assert len(warned) == 1 and warned[0].startswith("codec: warning: ")  # one line, no source line
    assert not any(line.startswith("  ") for line in captured.err.splitlines())
    with pytest.warns(UserWarning, match="ends early"):
        enc, dec = roundtrip_video(cut_mp4, tmp_path / "rt.mp4", str(model_file), allow_short=True)
    assert dec.frames == 12 and enc.missing_frames == dec.missing_frames == 12


# 3. a container count is "exact" only where the container keeps one


def test_avi_header_count_is_an_estimate_and_a_cut_avi_is_refused(tmp_path, capsys):
    full = _encode(tmp_path / "tree.avi", codec="cinepak", pix_fmt="rgb24")
    info = probe_video(full)
    assert (info.num_frames, info.num_frames_exact) == (24, False)
    assert main(["info", str(full)]) == 0
    assert json.loads(capsys.readouterr().out)["num_frames_status"] == "estimated"
    assert len(_read(full)[0]) == 24
    cut = _cut_before_packet(full, tmp_path / "cut.avi", 8)  # the header still states 24
    assert probe_video(cut).num_frames_exact is False
    got, err = _read_until_error(cut)
    assert got == list(range(8)) and "8 frames decode" in str(err)


def test_info_says_exact_for_an_mp4(tmp_path, capsys):
    path = _encode(tmp_path / "a.mp4", options={"preset": "ultrafast"})
    assert main(["info", str(path)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["num_frames"], d["num_frames_exact"], d["num_frames_status"]) == (24, True, "exact")


# 2. frames the decoder flags as damaged


@pytest.mark.parametrize("threads", [True, False])
def test_frames_flagged_corrupt_are_not_passed_on(tmp_path, threads):
    path = _encode(tmp_path / "a.mp4", options={"preset": "ultrafast", "qp": "0"})  # big packets
    data = bytearray(path.read_bytes())
    packets = _packets(path)
    assert packets[0].is_keyframe and not packets[5].is_keyframe
    p = packets[5]
    start = p.pos + p.size // 3  # keep the slice header, damage the macroblocks
    data[start:p.pos + p.size] = np.random.default_rng(0).bytes(p.pos + p.size - start)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    got, err = _read_until_error(bad, threads=threads)
    assert got == list(range(5))
    assert "bad.mp4: corrupt video data at frame index 5 (the decoder flagged the frame as damaged)" in str(err)


# 4. time stamps


def _remux_pts_from_dts(src: Path, dst: Path) -> Path:
    """What box.mp4 is: B-frames remuxed with each packet's pts replaced by its dts (shifted to
    start at 0), so the pts carry decode order, not presentation order."""
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        s_in = i.streams.video[0]
        s_out = o.add_stream_from_template(s_in)
        first = None
        for p in i.demux(s_in):
            if p.dts is None:
                continue
            first = p.dts if first is None else first
            p.dts -= first
            p.pts = p.dts
            p.stream = s_out
            o.mux(p)
    return dst


@pytest.fixture
def box_mp4(tmp_path):
    src = _encode(tmp_path / "b.mp4", options={"preset": "medium", "bframes": "3"})
    return _remux_pts_from_dts(src, tmp_path / "box.mp4")


def test_pts_copied_from_dts_are_rebuilt_in_presentation_order(box_mp4):
    with av.open(str(box_mp4)) as c:  # the file really is broken: FFmpeg's pts go backwards
        raw = [f.pts for f in c.decode(video=0)]
    assert len(raw) == N and np.any(np.diff(raw) <= 0) and sorted(raw) == [512 * i for i in range(N)]
    info = probe_video(box_mp4)
    idx, pts, _ = _read(box_mp4)
    assert idx.tolist() == list(range(N)) and pts.tolist() == [512 * i for i in range(N)]
    assert info.fps == 24 and info.time_base == Fraction(1, 12288)


def test_box_style_source_keeps_rate_count_and_duration_through_the_pipeline(box_mp4, model_file, tmp_path):
    lat, out = tmp_path / "box.safetensors", tmp_path / "out.mp4"
    encode_video(box_mp4, lat, str(model_file))
    with LatentReader(lat) as r:
        assert r.fps == 24 and r.num_frames == N
    decode_video(lat, out)
    back, src = probe_video(out), probe_video(box_mp4)
    assert (back.fps, back.num_frames) == (24, N) and back.duration == pytest.approx(N / 24, abs=1e-3)
    _, pts, _ = _read(out)
    assert np.array_equal(pts * back.time_base * 24, np.arange(N))  # one frame slot each
    rt = tmp_path / "rt.mp4"
    roundtrip_video(box_mp4, rt, str(model_file))
    assert (probe_video(rt).fps, probe_video(rt).num_frames) == (src.fps, N)


def test_out_of_order_pts_without_reordering_are_repaired_with_a_warning(tmp_path):
    """An intra-only stream (no reordering) whose frame 10 claims the time of frame 8."""
    src = _encode(tmp_path / "a.mp4", codec="mjpeg", pix_fmt="yuvj420p")
    bad = tmp_path / "back.mp4"
    with av.open(str(src)) as i, av.open(str(bad), "w") as o:
        s_in = i.streams.video[0]
        s_out = o.add_stream_from_template(s_in)
        for k, p in enumerate(p for p in i.demux(s_in) if p.size):
            p.dts = p.pts - 3 * p.duration  # room for a pts that goes back, keeping pts >= dts
            if k == 10:
                p.pts -= 2 * p.duration
            p.stream = s_out
            o.mux(p)
    with av.open(str(bad)) as c:
        assert [f.pts for f in c.decode(video=0)][9:11] == [9 * 512, 8 * 512]
    with pytest.warns(UserWarning, match="1 frames had time stamps out of order"):
        idx, pts, _ = _read(bad)
    assert len(idx) == N and pts.tolist() == [512 * i for i in range(N)]


# 5. rotation


def test_rotation_is_kept_through_encode_decode_and_roundtrip(tmp_path, model_file):
    src = _encode(tmp_path / "rot.mp4", options={"preset": "ultrafast"}, rotation=90)
    info = probe_video(src)
    assert (info.rotation, info.width, info.height) == (90, W, H)  # frames stay as stored
    lat, out, rt = tmp_path / "rot.safetensors", tmp_path / "out.mp4", tmp_path / "rt.mp4"
    encode_video(src, lat, str(model_file))
    with LatentReader(lat) as r:
        assert r.metadata["rotation"] == "90"
    decode_video(lat, out)
    assert probe_video(out).rotation == 90
    roundtrip_video(src, rt, str(model_file), lossless=True)
    assert probe_video(rt).rotation == 90
    plain = _encode(tmp_path / "plain.mp4", options={"preset": "ultrafast"})
    assert probe_video(plain).rotation == 0


def test_writer_stores_any_rotation_and_refuses_a_non_integer(tmp_path):
    for degrees, back in [(180, 180), (270, -90), (360, 0)]:
        path = tmp_path / f"r{degrees}.mp4"
        with VideoWriter(path, W, H, 24, rotation=degrees, preset="ultrafast") as w:
            w.write(_frames(2))
        assert probe_video(path).rotation == back
    with pytest.raises(ValueError, match="rotation in whole degrees, got 1.5"):
        VideoWriter(tmp_path / "x.mp4", W, H, 24, rotation=1.5)
    assert not list(tmp_path.glob("*x*"))


# 6. a codec FFmpeg cannot decode


def test_unknown_codec_is_one_clear_line(tmp_path, capsys, model_file):
    src = _encode(tmp_path / "m.avi", codec="mjpeg", pix_fmt="yuvj420p")
    data = src.read_bytes()
    assert data.count(b"MJPG") == 2
    unknown = tmp_path / "unknown.avi"
    unknown.write_bytes(data.replace(b"MJPG", b"QQQQ"))  # a fourcc no decoder claims
    with pytest.raises(ValueError, match="unknown.avi: FFmpeg has no decoder for the video stream's codec"):
        probe_video(unknown)
    for argv in (["info", str(unknown)],
                 ["encode", str(unknown), "-o", str(tmp_path / "x.safetensors"), "--model", str(model_file)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "no decoder" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_real_clips_are_not_flagged(shared_data):
    """The slack meets real files: short clips decoded whole, counted (mp4) or estimated (webm)."""
    for name in ["realshort.mp4", "tears_of_steel.webm", "edge/h265_video.mp4", "edge/av1_video.mkv"]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            idx, pts, reader = _read(shared_data / "video" / name)
        assert len(idx) == reader.info.num_frames and reader.missing_frames == 0
        assert np.all(np.diff(pts) > 0)
    assert describe_video(shared_data / "video" / "edge" / "no_duration.webm")["num_frames_status"] == "unknown"
