"""Wan video VAEs through the streaming coder, the latent file and the command.

Small random Wan 2.1-shaped models (base_dim 8, 16 latent channels): no real weights here.
"""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import moving_square_frames, write_clip

import kernels
from codec.cli import main
from codec.coder import CoderOptions
from codec.latents import LatentReader, LatentWriter
from codec.models.config import WanConfig
from codec.models.video_autoencoder import VideoAutoencoder
from codec.pipeline import decode_video, encode_video, roundtrip_video
from codec.quality import psnr
from codec.video import FrameReader, VideoWriter, probe_video
from codec.video_coder import VideoDecoder, VideoEncoder

diffusers = pytest.importorskip("diffusers")


def wan_model(seed: int = 0, **overrides) -> VideoAutoencoder:
    torch.manual_seed(seed)
    cfg = WanConfig(**{"name": "wan-test", "base_dim": 8, "num_res_blocks": 1, **overrides})
    model = VideoAutoencoder(cfg).eval()
    with torch.no_grad():  # keep decoded values mostly inside [-1, 1]
        model.decoder.conv_out.weight.mul_(0.3)
    return model


@pytest.fixture
def wan_folder(tmp_path):
    """A small random diffusers AutoencoderKLWan folder (Wan 2.1 shape, 16 channels)."""
    torch.manual_seed(0)
    folder = tmp_path / "wan-vae"
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, num_res_blocks=1).save_pretrained(folder)
    return folder


def frames_uint8(n: int, h: int, w: int) -> torch.Tensor:
    return torch.from_numpy(moving_square_frames(n, h, w))


def test_coder_streams_like_the_model():
    """Batches of any size, the end padded by repeating the last frame, the padding dropped on decode."""
    model = wan_model(latent_channels=4)
    frames = frames_uint8(10, 34, 50)  # padded to 40x56 in space, to 13 frames in time
    enc = VideoEncoder(model, 34, 50)
    z = torch.cat([enc(frames[:3]), enc(frames[3:8]), enc(frames[8:]), enc.finish()])
    assert enc.pad_frames == 3 and enc.frames_in == 10 and enc.padding == (6, 6)
    padded = torch.cat([frames, frames[-1:].expand(3, -1, -1, -1)])
    x = kernels.frames_to_input(padded, size=(40, 56)).transpose(0, 1).unsqueeze(0)
    expected = model.encode(x)[0].transpose(0, 1)
    assert z.shape == (4, 4, 5, 7) and torch.equal(z, expected)

    dec = VideoDecoder(model, 34, 50, frames=10)
    out = torch.cat([dec(z[:1]), dec(z[1:3]), dec(z[3:])])
    full = model.decode(z.transpose(0, 1).unsqueeze(0))[0].transpose(0, 1)
    assert out.shape == (10, 34, 50, 3)
    assert torch.equal(out, kernels.output_to_frames(full, 34, 50)[:10])


def test_tiles_each_keep_their_own_cache():
    """Tiled coding streams like untiled coding (chunks do not matter), and stays close to it."""
    model = wan_model(latent_channels=4)
    frames = frames_uint8(5, 64, 96)
    tiled = CoderOptions(tile=48, overlap=16)
    enc = VideoEncoder(model, 64, 96, tiled)
    assert len(enc.layout) == 6  # 2 x 3 tiles
    z_chunks = torch.cat([enc(frames[:2]), enc(frames[2:]), enc.finish()])
    enc_whole = VideoEncoder(model, 64, 96, tiled)
    z_tiled = torch.cat([enc_whole(frames), enc_whole.finish()])
    assert torch.equal(z_chunks, z_tiled)
    whole = VideoEncoder(model, 64, 96)
    z = torch.cat([whole(frames), whole.finish()])
    assert ((z_tiled - z).norm() / z.norm()).item() < 0.5  # a misplaced tile gives ~1.4
    a = VideoDecoder(model, 64, 96)(z).float()
    b = VideoDecoder(model, 64, 96, tiled)(z).float()
    assert a.shape == b.shape == (5, 64, 96, 3)
    assert 10 * torch.log10(255**2 / ((a - b) ** 2).mean()).item() > 25


def test_options_that_do_not_apply_are_refused():
    model = wan_model(latent_channels=4)
    for options, match in ((CoderOptions(cache="2"), "do not apply"), (CoderOptions(refresh=8), "do not apply"),
                           (CoderOptions(norm="global"), "per position"), (CoderOptions(tile=36), "multiple of 8"),
                           (CoderOptions(tile=32, overlap=32), "smaller than"),
                           (CoderOptions(max_memory=1000), "too small")):
        with pytest.raises(ValueError, match=match):
            VideoEncoder(model, 64, 96, options)


def test_api_round_trip_keeps_frames_and_timing(wan_folder, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(7, 34, 50), fps=Fraction(30000, 1001))
    lat, out = tmp_path / "clip.safetensors", tmp_path / "out.mp4"
    rep = encode_video(clip, lat, str(wan_folder), batch=3)
    assert rep.frames == 7 and len(rep.latency_ms) == 7
    assert rep.norm == "none (RMS norm)" and rep.cache_per_frame == [] and rep.seconds > 0
    with LatentReader(lat) as r:
        r.verify()
        assert r.shape == (3, 16, 5, 7)  # 7 frames padded to 9: 1 + 8/4 latent frames
        m = r.metadata
        assert (m["pad_frames"], m["source_frames"], m["temporal_factor"], m["frame_rule"]) == ("2", "7", "4", "1+4k")
        assert len(json.loads(m["latents_mean"])) == 16 and m["family"] == "wan"
        src_pts = np.concatenate([b.pts for b in FrameReader(clip, batch=64)])
        assert r.pts.tolist() == [src_pts[0], src_pts[1], src_pts[5]]  # first frame of each latent frame
    rep = decode_video(lat, out, lossless=True)
    assert rep.frames == 7 and rep.norm == "none (RMS norm)" and rep.seconds > 0
    src, dst = probe_video(clip), probe_video(out)
    assert (dst.width, dst.height, dst.fps, dst.num_frames) == (50, 34, src.fps, 7)
    assert abs(dst.duration - src.duration) < 1e-3


def test_rotation_is_kept(wan_folder, tmp_path):
    clip, lat, out = tmp_path / "rot.mp4", tmp_path / "rot.safetensors", tmp_path / "out.mp4"
    with VideoWriter(clip, 32, 32, 24, lossless=True, rotation=90) as w:
        w.write(moving_square_frames(5, 32, 32))
    encode_video(clip, lat, str(wan_folder))
    decode_video(lat, out, lossless=True)
    assert probe_video(clip).rotation == 90 and probe_video(out).rotation == 90


def test_decode_refuses_other_statistics(wan_folder, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(5, 32, 32), fps=Fraction(24))
    lat = tmp_path / "clip.safetensors"
    encode_video(clip, lat, str(wan_folder))
    other = wan_model(latent_channels=16)  # same shape, no statistics (mean 0, std 1)
    with pytest.raises(ValueError, match="latents_mean"):
        decode_video(lat, tmp_path / "out.mp4", model=other)
    assert not (tmp_path / "out.mp4").exists()


def test_writer_metadata_update_needs_a_placeholder(tmp_path):
    meta = {"model_id": "m", "family": "wan", "scaling_factor": "1", "shift_factor": "0", "fps": "24/1",
            "time_base": "1/24", "source_width": "16", "source_height": "16", "pad_bottom": "0", "pad_right": "0"}
    with LatentWriter(tmp_path / "a.safetensors", (1, 2, 2), torch.float32, {**meta, "pad_frames": "0"}) as w:
        w.write(torch.zeros(1, 1, 2, 2), [0])
        with pytest.raises(ValueError, match="must be given when the writer opens"):
            w.update_metadata({"new_key": 1})
        w.update_metadata({"pad_frames": 3})
    assert LatentReader(tmp_path / "a.safetensors").metadata["pad_frames"] == "3"


def test_command_on_a_real_clip(shared_data, wan_folder, tmp_path, capsys):
    src = shared_data / "video" / "realshort.mp4"
    lat, out = tmp_path / "real.safetensors", tmp_path / "real.mp4"
    assert main(["encode", str(src), "-o", str(lat), "--model", str(wan_folder), "--end", "5", "--quiet"]) == 0
    info = probe_video(src)
    with LatentReader(lat) as r:  # 5 frames -> 1 + 4/4 latent frames of 240/8 x 320/8
        assert r.shape == (2, 16, info.height // 8, info.width // 8)
    assert main(["decode", str(lat), "-o", str(out), "--quiet"]) == 0
    dst = probe_video(out)
    assert (dst.width, dst.height, dst.fps, dst.num_frames) == (info.width, info.height, info.fps, 5)
    assert abs(dst.duration - 5 / info.fps) < 1e-3
    capsys.readouterr()
    assert main(["info", str(lat)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["frames"] == 5 and shown["pad_frames"] == 0 and "latents_std" in shown  # typed JSON
    rt = tmp_path / "rt.mp4"
    assert main(["roundtrip", str(src), "-o", str(rt), "--model", str(wan_folder), "--end", "1", "--quiet"]) == 0
    assert "quality: mean PSNR" in capsys.readouterr().out and probe_video(rt).num_frames == 1


def test_roundtrip_is_encode_then_decode_with_quality_per_frame(wan_folder, tmp_path, capsys):
    """The streamed round trip writes the frames that encode + decode give (float32 latents, lossless
    video), and reports each one's PSNR against its own source frame; the end padding is dropped."""
    frames = moving_square_frames(7, 34, 50)  # 7 frames: padded to 9; batches of 3 straddle the groups of 4
    clip = write_clip(tmp_path / "clip.mp4", frames, fps=Fraction(24))
    lat, via_file, rt = tmp_path / "clip.safetensors", tmp_path / "via_file.mp4", tmp_path / "rt.mp4"
    encode_video(clip, lat, str(wan_folder), batch=3, latent_dtype=torch.float32)
    decode_video(lat, via_file, lossless=True)
    enc, dec = roundtrip_video(clip, rt, str(wan_folder), batch=3, lossless=True)
    expected = np.concatenate([b.frames for b in FrameReader(via_file, batch=64)])
    got = np.concatenate([b.frames for b in FrameReader(rt, batch=64)])
    source = np.concatenate([b.frames for b in FrameReader(clip, batch=64)])
    assert got.shape == (7, 34, 50, 3) and np.array_equal(got, expected)
    assert enc.frames == dec.frames == 7 and len(dec.latency_ms) == len(enc.latency_ms) == 7
    assert np.allclose(dec.psnr, psnr(got, source)) and len(set(dec.psnr)) > 1 and len(dec.ssim) == 7
    assert [p for p in psnr(got, np.roll(source, 1, axis=0))] != dec.psnr  # each against its own frame
    assert probe_video(rt).fps == 24 and dec.norm == "none (RMS norm)"
    report = tmp_path / "r.json"
    assert main(["roundtrip", str(clip), "-o", str(tmp_path / "cli.mp4"), "--model", str(wan_folder),
                 "--report", str(report), "--quiet"]) == 0
    assert "quality: mean PSNR" in capsys.readouterr().out
    assert json.loads(report.read_text())["psnr"] == dec.psnr  # other batches, the same frames


def test_bench_refuses_a_video_vae_in_one_line(wan_folder, tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(5, 32, 32), fps=Fraction(24))
    assert main(["bench", str(clip), "--model", str(wan_folder), "--baseline", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "codec bench times image VAEs" in err and "video VAE" in err, err


def test_preset_on_the_command_line(tmp_path, capsys):
    """--preset gives a model file without statistics its preset's; decoding the latents needs no --model
    (the preset is recorded as the model's name); a preset that contradicts the weights is one line, no output."""
    from codec.models import save_model

    weights = save_model(wan_model(latent_channels=16), tmp_path / "small_vae.safetensors", dtype=torch.float32)
    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(5, 32, 32), fps=Fraction(24))
    lat, out = tmp_path / "clip.safetensors", tmp_path / "out.mp4"
    bad = ["encode", str(clip), "-o", str(lat), "--model", str(weights), "--quiet", "--preset", "wan2.2"]
    assert main(bad) == 2 and not lat.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "preset wan2.2 is a 48-channel" in err and "16-channel" in err, err
    assert main([*bad[:-1], "wan2.1"]) == 0
    with LatentReader(lat) as r:
        assert r.metadata["model_name"] == "wan2.1"
        assert json.loads(r.metadata["latents_std"])[:2] == [2.8184, 1.4541]
    assert main(["decode", str(lat), "-o", str(out), "--quiet"]) == 0 and probe_video(out).num_frames == 5


def test_short_source_is_counted(tmp_path):
    """A clip cut short of its container's count: --allow-short keeps its frames and reports the missing ones."""
    import av

    full = tmp_path / "full.mp4"
    with av.open(str(full), "w", options={"movflags": "+faststart"}) as c:  # the index first: it survives the cut
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt, s.options = 32, 32, "yuv420p", {"preset": "ultrafast"}
        for i, image in enumerate(moving_square_frames(12, 32, 32)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    with av.open(str(full)) as c:
        cut_at = [p for p in c.demux(c.streams.video[0]) if p.size][6].pos
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[:cut_at])
    model = wan_model(latent_channels=4)
    with pytest.warns(UserWarning, match="ends early"):
        rep = encode_video(cut, tmp_path / "lat.safetensors", model, allow_short=True)
    assert rep.frames + rep.missing_frames == 12 and rep.missing_frames > 0
    with pytest.warns(UserWarning, match="ends early"):
        enc, dec = roundtrip_video(cut, tmp_path / "rt.mp4", model, allow_short=True)
    assert dec.frames == rep.frames and enc.missing_frames == dec.missing_frames == rep.missing_frames
