"""The command's promises on outputs, signals and arguments: nothing lost, nothing silent.

Every refused case exits non-zero with one line on stderr, leaves its inputs byte-identical and
leaves no output (complete or partial) behind.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import signal
import stat
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import moving_square_frames, on_second_call, tiny_model_file, write_clip

from codec import latents as latents_module
from codec.cli import build_parser, main
from codec.latents import LatentWriter
from codec.quality import psnr
from codec.video import FrameReader, VideoWriter, probe_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clip(tmp_path):
    return write_clip(tmp_path / "clip.mp4", moving_square_frames(6, 32, 48), fps=Fraction(25))


@pytest.fixture
def model_file(tmp_path):
    return tiny_model_file(tmp_path / "tiny.safetensors")


def refused(args, capfd) -> str:
    """Run the command; assert exit 2 and one line on stderr (C-level prints included); return it."""
    code = main([str(a) for a in args])
    err = capfd.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("codec: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def leftovers(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.iterdir() if name in p.name]


# ---- outputs: never an input, never the model, regular files only, checked before any work -----

def _spellings(clip: Path, tmp_path: Path):
    (tmp_path / "sub").mkdir()
    hard = tmp_path / "hard.mp4"
    os.link(clip, hard)
    link = tmp_path / "link.mp4"
    link.symlink_to(clip)
    return {"same": clip, "dotted": tmp_path / "sub" / ".." / "clip.mp4", "relative": os.path.relpath(clip),
            "hard link": hard, "symlink": link}


@pytest.mark.parametrize("spelling", ["same", "dotted", "relative", "hard link", "symlink"])
def test_roundtrip_never_overwrites_its_input(spelling, clip, model_file, tmp_path, capfd):
    before = clip.read_bytes()
    out = _spellings(clip, tmp_path)[spelling]
    err = refused(["roundtrip", clip, "-o", out, "--model", model_file, "--quiet"], capfd)
    assert "is also an input" in err
    assert clip.read_bytes() == before and not leftovers(tmp_path, "partial")


def test_encode_onto_the_source_video_is_refused(clip, model_file, tmp_path, capfd):
    before = clip.read_bytes()
    err = refused(["encode", clip, "-o", clip, "--model", model_file, "--quiet"], capfd)
    assert ".safetensors" in err  # a latent file must be named as one: the video is never replaced
    assert clip.read_bytes() == before


def test_decode_never_overwrites_the_latent_file(clip, model_file, tmp_path, capfd):
    lat = tmp_path / "lat.safetensors"
    assert main(["encode", str(clip), "-o", str(lat), "--model", str(model_file), "--quiet"]) == 0
    alias = tmp_path / "alias.mp4"
    alias.symlink_to(lat)
    before = lat.read_bytes()
    err = refused(["decode", lat, "-o", alias, "--quiet"], capfd)
    assert "is also an input" in err and lat.read_bytes() == before


@pytest.mark.parametrize("case", ["model file", "taesd partner", "diffusers folder", "file in model folder"])
def test_outputs_never_overwrite_the_model(case, clip, model_file, tmp_path, capfd):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (tmp_path / "t_encoder.safetensors").write_bytes(b"encoder")
    (tmp_path / "t_decoder.safetensors").write_bytes(b"decoder")
    model, out = {
        "model file": (model_file, model_file),
        "taesd partner": (tmp_path / "t_encoder.safetensors", tmp_path / "t_decoder.safetensors"),
        "diffusers folder": (folder, folder / "diffusion_pytorch_model.safetensors"),
        "file in model folder": (folder / "diffusion_pytorch_model.safetensors", folder / "config.json"),
    }[case]
    before = {p: p.read_bytes() for p in (model_file, *tmp_path.glob("t_*"), *folder.iterdir())}
    if out.suffix == ".safetensors":
        err = refused(["encode", clip, "-o", out, "--model", model, "--quiet"], capfd)
    else:
        err = refused(["roundtrip", clip, "-o", tmp_path / "rt.mp4", "--report", out, "--model", model], capfd)
    assert "is also an input" in err
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "rt.mp4").exists()


def test_the_model_recorded_in_the_latent_file_is_protected_too(clip, model_file, tmp_path):
    from codec.pipeline import decode_video, encode_video

    lat = tmp_path / "lat.safetensors"
    encode_video(clip, lat, str(model_file))
    alias = tmp_path / "model.mp4"
    alias.symlink_to(model_file)
    before = model_file.read_bytes()
    with pytest.raises(ValueError, match="is also an input"):
        decode_video(lat, alias)  # no model given: the file's own model is loaded, then protected
    assert model_file.read_bytes() == before


def test_device_nodes_and_folders_are_not_replaced(clip, model_file, tmp_path, capfd):
    null = tmp_path / "null.mp4"
    null.symlink_to("/dev/null")
    err = refused(["roundtrip", clip, "-o", null, "--model", model_file], capfd)
    assert "not a regular file" in err
    err = refused(["roundtrip", clip, "-o", tmp_path / "o.mp4", "--report", "/dev/null", "--model", model_file], capfd)
    assert "not a regular file" in err
    err = refused(["encode", clip, "-o", "/dev/null", "--model", model_file], capfd)
    assert "not a regular file" in err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and null.is_symlink()
    (tmp_path / "d.safetensors").mkdir()
    err = refused(["encode", clip, "-o", tmp_path / "d.safetensors", "--model", model_file], capfd)
    assert "is a folder" in err
    assert not (tmp_path / "o.mp4").exists()


def test_stdout_is_refused_with_a_reason(clip, model_file, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = refused(["encode", clip, "-o", "-", "--model", model_file], capfd)
    assert "standard output" in err and "not useful" in err
    refused(["roundtrip", clip, "-o", "-", "--model", model_file], capfd)
    assert not Path("-").exists() and not leftovers(tmp_path, "partial")


def test_every_output_is_checked_before_any_work(clip, model_file, tmp_path, capfd, monkeypatch):
    from codec import coder

    def no_work(*a, **k):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr(coder.FrameEncoder, "__init__", no_work)
    monkeypatch.setattr("codec.models.load_model", no_work)
    out = tmp_path / "rt.mp4"
    for extra, words in ((["--report", tmp_path / "missing" / "r.json"], "does not exist"),
                         (["--plot", tmp_path / "missing" / "p.png"], "does not exist"),
                         (["--plot", tmp_path / "p.txt"], ".png"),
                         (["--report", tmp_path / "same.png", "--plot", tmp_path / "same.png"], "same file")):
        err = refused(["roundtrip", clip, "-o", out, "--model", model_file, *extra], capfd)
        assert words in err
    assert not out.exists() and not leftovers(tmp_path, "partial")
    monkeypatch.setattr("codec.bench.read_frames", no_work)
    for extra in (["--json", tmp_path / "missing" / "b.json"], ["--plot", tmp_path / "b.gif"]):
        refused(["bench", clip, "--model", model_file, *extra], capfd)


@pytest.fixture(scope="module")
def latent_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latents")
    clip = write_clip(folder / "clip.mp4", moving_square_frames(3, 32, 48))
    lat = folder / "lat.safetensors"
    assert main(["encode", str(clip), "-o", str(lat), "--model", str(tiny_model_file(folder / "m.safetensors")),
                 "--quiet"]) == 0
    return lat


@pytest.mark.parametrize("suffix", [".webm", ".avi", ".gif", ".xyz", ""])
def test_decode_to_a_container_x264_cannot_fill_is_refused_up_front(suffix, latent_file, tmp_path, capfd,
                                                                    monkeypatch):
    lat = latent_file
    monkeypatch.setattr("codec.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    err = refused(["decode", lat, "-o", tmp_path / f"out{suffix}"], capfd)
    assert ".mp4" in err and ".mkv" in err and ".mov" in err
    assert not leftovers(tmp_path, "out")


# ---- sizes and settings x264 refuses: one line, before any frame --------------------------------

def test_video_writer_refuses_what_x264_cannot_encode(tmp_path, capfd):
    for w, h in ((16400, 16), (16, 16386)):
        with pytest.raises(ValueError, match="16384"):
            VideoWriter(tmp_path / "big.mp4", w, h, 25)
    with pytest.raises(ValueError, match="libx264 refused the settings"):
        VideoWriter(tmp_path / "bad.mp4", 64, 48, 25, preset="nope")
    with pytest.raises(ValueError, match=r"\.mp4, \.mkv, \.mov"):
        VideoWriter(tmp_path / "x.webm", 64, 48, 25)
    assert list(tmp_path.iterdir()) == []


def test_too_wide_source_is_refused_before_the_work(model_file, tmp_path, capfd):
    import av

    wide = tmp_path / "wide.mkv"  # FFV1 takes widths x264 cannot
    with av.open(str(wide), "w") as c:
        s = c.add_stream("ffv1", rate=25)
        s.width, s.height, s.pix_fmt = 16400, 16, "yuv420p"
        for t in range(2):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16400, 3), 40 * t, np.uint8), format="rgb24")
            for p in s.encode(frame.reformat(format="yuv420p")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    err = refused(["roundtrip", wide, "-o", tmp_path / "o.mp4", "--model", model_file, "--quiet"], capfd)
    assert "16384" in err and "16400" in err
    assert not leftovers(tmp_path, "o.mp4")


def test_ffmpeg_errors_mid_run_are_one_line(clip, model_file, tmp_path, capfd, monkeypatch):
    import av

    def failing(self, image, pts):
        raise av.error.ExternalError(542398533, "Generic error in an external library\n(x264: frame\nrefused)")

    monkeypatch.setattr(VideoWriter, "_encode", failing)
    err = refused(["roundtrip", clip, "-o", tmp_path / "e.mp4", "--model", model_file, "--quiet"], capfd)
    assert "external library (x264: frame refused)" in err
    assert not leftovers(tmp_path, "e.mp4")


# ---- signals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["encode", "roundtrip"])
def test_sigterm_is_handled_like_ctrl_c(command, clip, model_file, tmp_path, capfd, monkeypatch):
    from codec import coder

    calls = on_second_call(monkeypatch, coder.FrameEncoder, lambda: os.kill(os.getpid(), signal.SIGTERM))
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / ("x.safetensors" if command == "encode" else "x.mp4")
    code = main([command, str(clip), "-o", str(out), "--model", str(model_file), "--batch", "2", "--quiet"])
    err = capfd.readouterr().err.strip()
    assert code == 143 and err == "codec: terminated (SIGTERM); no partial output was kept"
    assert calls["n"] == 2 and not leftovers(tmp_path, "x.")
    assert signal.getsignal(signal.SIGTERM) == handler  # restored for whoever called main


_DURING_IMPORT = """
import importlib.abc, os, signal, sys
import codec.cli
assert "torch" not in sys.modules, "the command imported torch before main"

class SignalOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.{sig})
        return None

sys.meta_path.insert(0, SignalOnImport())
sys.exit(codec.cli.main({argv!r}))
"""


@pytest.mark.parametrize("sig, code, line", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_during_start_up_gives_one_line(sig, code, line, clip, tmp_path):
    script = _DURING_IMPORT.format(sig=sig, argv=["encode", str(clip), "-o", str(tmp_path / "s.safetensors")])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == code, r.stderr
    assert r.stderr.strip() == f"codec: {line}{' (SIGTERM)' if sig == 'SIGTERM' else ''}; no partial output was kept"


def test_ctrl_c_while_the_model_loads_gives_one_line(clip, tmp_path, capfd, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("codec.models.load_model", interrupted)
    assert main(["encode", str(clip), "-o", str(tmp_path / "k.safetensors")]) == 130
    assert capfd.readouterr().err == "codec: interrupted; no partial output was kept\n"


# ---- a full disk: abort removes the partial file ---------------------------------------------------

class _FullDisk(io.FileIO):
    """A raw file that takes ``room`` bytes, then fails every write with ENOSPC."""

    room = 4096

    def write(self, b):
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)


def _full_disk_open(path, mode="r", *args, **kwargs):
    assert mode == "wb"
    return io.BufferedWriter(_FullDisk(path, mode))


def test_latent_writer_abort_removes_the_partial_file_on_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(latents_module, "open", _full_disk_open, raising=False)
    meta = {"model_id": "m", "family": "tiny", "scaling_factor": 1, "shift_factor": 0, "fps": 25,
            "time_base": Fraction(1, 25), "source_width": 64, "source_height": 64, "pad_bottom": 0, "pad_right": 0}
    with pytest.raises(OSError) as e:
        with LatentWriter(tmp_path / "l.safetensors", (4, 8, 8), torch.float16, meta) as w:
            for t in range(200):
                w.write(torch.zeros(4, 8, 8), [t])
    assert e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_encode_on_a_full_disk_is_one_line_and_leaves_nothing(clip, model_file, tmp_path, capfd, monkeypatch):
    ok = tmp_path / "ok.safetensors"
    assert main(["encode", str(clip), "-o", str(ok), "--model", str(model_file), "--quiet"]) == 0
    monkeypatch.setattr(latents_module, "open", _full_disk_open, raising=False)
    monkeypatch.setattr(_FullDisk, "room", ok.stat().st_size - 500)  # the header fits, not all latents
    capfd.readouterr()
    err = refused(["encode", clip, "-o", tmp_path / "f.safetensors", "--model", model_file, "--quiet"], capfd)
    assert "No space left on device" in err
    assert not leftovers(tmp_path, "f.safetensors")


def test_video_writer_abort_removes_the_partial_file_on_a_full_disk(tmp_path):
    class FullContainer:
        def __init__(self, real):
            self.real = real

        def mux(self, packet):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.real.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError):
        with VideoWriter(tmp_path / "v.mp4", 64, 48, 25, preset="ultrafast") as w:
            w._container = FullContainer(w._container)
            w.write(moving_square_frames(40, 48, 64))
            w.close()
    assert list(tmp_path.iterdir()) == []


# ---- the argument parser -------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["encode"], "required"),
    (["encode", "a.mp4", "-o", "b.safetensors", "--frobnicate"], "unrecognized"),
    (["frobnicate"], "invalid choice"),
    (["encode", "a.mp4", "-o", "b.safetensors", "--max-memory", "0"], "positive size"),
    (["encode", "a.mp4", "-o", "b.safetensors", "--max-memory=-2G"], "positive size"),
    (["encode", "a.mp4", "-o", "b.safetensors", "--max-memory", "lots"], "4G"),
    (["encode", "a.mp4", "-o", "b.safetensors", "--batch", "0"], "--batch"),
    (["encode", "a.mp4", "-o", "b.safetensors", "--stride", "0"], "--stride"),
    (["encode", "a.mp4", "-o", "b.safetensors", "--dtype", "float8"], "--dtype"),
    (["decode", "a.safetensors", "-o", "b.mp4", "--crf", "99"], "from 0 to 51"),
    (["decode", "a.safetensors", "-o", "b.mp4", "--preset-x264", "nope"], "--preset-x264"),
    (["sample", "s.mp4", "--frames", "0"], "--frames"),
])
def test_argument_errors_are_one_line(args, words, capfd):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capfd.readouterr().err
    assert e.value.code == 2
    assert err.startswith("codec: error: ") and err.count("\n") == 1 and "usage:" not in err, err
    assert words in err


def test_debug_is_accepted_anywhere(tmp_path, capfd):
    parser = build_parser()
    for argv in (["--debug", "info", "x"], ["info", "x", "--debug"], ["info", "--debug", "x"]):
        assert parser.parse_args(argv).debug is True
    assert parser.parse_args(["info", "x"]).debug is False
    missing = str(tmp_path / "missing.mp4")
    assert main(["info", missing]) == 2
    with pytest.raises(ValueError, match="no such file"):
        main(["info", missing, "--debug"])


def test_every_flag_has_help_with_its_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in [("codec", parser), *sub.choices.items()]:
        for a in p._actions:
            if not a.option_strings or a.required or isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if "default" not in (a.help or ""):
                missing.append(f"{name} {a.option_strings[-1]}")
    assert missing == []


def test_half_precision_on_the_cpu_warns(clip, model_file, tmp_path, capfd):
    args = ["encode", str(clip), "-o", str(tmp_path / "h.safetensors"), "--model", str(model_file), "--device", "cpu",
            "--end", "1", "--quiet"]
    assert main([*args, "--dtype", "bfloat16"]) == 0
    err = capfd.readouterr().err
    assert "warning" in err and "bfloat16" in err and "3-5x slower" in err
    assert main(args) == 0
    assert "warning" not in capfd.readouterr().err


# ---- codec info: typed JSON ------------------------------------------------------------------------

def test_info_prints_typed_json(clip, model_file, tmp_path, capfd):
    lat = tmp_path / "i.safetensors"
    assert main(["encode", str(clip), "-o", str(lat), "--model", str(model_file), "--quiet"]) == 0
    capfd.readouterr()
    assert main(["info", str(lat)]) == 0
    d = json.loads(capfd.readouterr().out)
    assert d["frames"] == d["num_frames"] == 6 and d["source_width"] == 48 and d["latent_channels"] == 4
    assert d["pad_bottom"] == 0 and d["start"] == 0 and type(d["stride"]) is int
    assert isinstance(d["scaling_factor"], float) and isinstance(d["shift_factor"], (int, float))
    assert d["fps"] == "25/1" and d["fps_float"] == 25.0 and d["duration_s"] == pytest.approx(0.24)
    assert isinstance(d["model_id"], str) and isinstance(d["checksum"], str)
    assert main(["info", str(clip)]) == 0
    v = json.loads(capfd.readouterr().out)
    assert (v["width"], v["height"], v["num_frames"]) == (48, 32, 6) and v["num_frames_exact"] is True
    assert v["fps"] == "25/1" and v["fps_float"] == 25.0 and isinstance(v["duration"], float)


def test_metadata_typing_keeps_names_and_hashes_as_text():
    from codec.pipeline import _typed

    assert _typed("scaling_factor", "0.18215") == 0.18215 and _typed("num_frames", "12") == 12
    assert _typed("exact", "true") is True and _typed("shift", "nan") == "nan"
    for key in ("model_hash", "model_id", "model_source", "source_file", "tool_version", "checksum"):
        assert _typed(key, "12e34") == "12e34"


# ---- codec sample --------------------------------------------------------------------------------

def test_sample_clip_is_deterministic_textured_and_moving():
    from codec.sample import sample_frame

    a, b = sample_frame(3, 96, 64, 10), sample_frame(3, 96, 64, 10)
    assert a.shape == (64, 96, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, sample_frame(4, 96, 64, 10))  # motion
    assert a.std() > 20 and len(np.unique(a[..., 1])) > 50  # gradient and texture, not a flat card


def test_sample_command_writes_the_stated_clip(tmp_path, capfd):
    from codec.sample import sample_frame

    out = tmp_path / "s.mp4"
    assert main(["sample", str(out), "--frames", "5", "--size", "64x48", "--fps", "12"]) == 0
    info = probe_video(out)
    assert (info.width, info.height, info.fps, info.num_frames, info.num_frames_exact) == (64, 48, 12, 5, True)
    with FrameReader(out) as r:
        frames = np.concatenate([b.frames for b in r])
    assert frames.shape == (5, 48, 64, 3)
    expected = np.stack([sample_frame(t, 64, 48, 5) for t in range(5)])
    own = np.atleast_1d(psnr(frames, expected))  # what was drawn, through H.264 4:2:0 at crf 18
    shifted = np.atleast_1d(psnr(frames, np.roll(expected, 1, axis=0)))  # each frame against another
    assert own.min() > 22 and (own > shifted + 3).all()
    for bad, words in ((["--size", "8x8"], "16"), (["--size", "big"], "320x240")):
        assert main(["sample", str(tmp_path / "t.mp4"), *bad]) == 2
        err = capfd.readouterr().err
        assert words in err and err.count("\n") == 1
    assert not leftovers(tmp_path, "t.mp4")


def test_default_sample_and_the_readme_job_through_the_command(tmp_path, capfd):
    out = tmp_path / "sample.mp4"
    assert main(["sample", str(out)]) == 0
    info = probe_video(out)
    assert (info.width, info.height, info.fps, info.num_frames) == (320, 240, 24, 72)
    small = tmp_path / "small.mp4"  # the README's job with the default model, on a short clip
    assert main(["sample", str(small), "--frames", "3", "--size", "96x64"]) == 0
    lat, back = tmp_path / "clip.safetensors", tmp_path / "clip.mp4"
    assert main(["encode", str(small), "-o", str(lat), "--quiet"]) == 0
    assert main(["decode", str(lat), "-o", str(back), "--quiet"]) == 0
    info = probe_video(back)
    assert (info.width, info.height, info.fps, info.num_frames) == (96, 64, 24, 3)
