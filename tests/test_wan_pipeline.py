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
from codec.pipeline import decode_video, encode_video
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
    assert main(["roundtrip", str(src), "-o", str(tmp_path / "rt.mp4"), "--model", str(wan_folder)]) == 2
