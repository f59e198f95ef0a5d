"""Model identity: presets from exact file-name tokens, and the latent file's portable model record.

A latent file names the model that made it (``default``, a preset, or an absolute path, plus a
content hash of the weights) and its latent convention; decoding without ``--model`` reloads that
model from any working directory, and a model with another convention is refused unless
``--force-convention``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import moving_square_frames, write_clip
from safetensors.torch import save_file

from codec.cli import main
from codec.latents import LatentReader
from codec.models import build, load_model, save_model, weights_digest
from codec.models.config import presets_named_by
from codec.video import FrameReader

diffusers = pytest.importorskip("diffusers", reason="diffusers (dev extra) writes the model folders")


# ---- preset hints: whole tokens of the file stem only ---------------------------------------

@pytest.mark.parametrize("name,want", [
    ("stable-diffusion-3-vae.safetensors", {"sd3"}),
    ("sd3_vae.safetensors", {"sd3"}),
    ("ae.safetensors", {"flux1"}),
    ("FLUX.1-dev-vae.safetensors", {"flux1"}),
    ("sdxl_vae.safetensors", {"sdxl"}),
    ("sd_xl_base_1.0_vae.safetensors", {"sdxl"}),
    ("taesdxl_encoder.pth", {"taesdxl"}),  # not taesd, not sdxl
    ("vae-ft-mse-840000-ema-pruned.safetensors", set()),
    ("my_vae.safetensors", set()),  # "vae" holds "ae" as a substring: no hint
    ("aesthetic.safetensors", set()),
])
def test_presets_named_by_whole_tokens(tmp_path, name, want):
    assert presets_named_by(tmp_path / name) == want


def kl_single_file(path: Path, latent: int = 16) -> Path:
    """An original-layout-free (diffusers-named) KL single file without config, SD3/FLUX style."""
    quant = latent == 4
    model = build("sd15", latent_channels=latent, block_out_channels=(32, 32), layers_per_block=1,
                  use_quant_conv=quant, use_post_quant_conv=quant)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def test_name_hint_gives_the_named_preset(tmp_path):
    sd3 = load_model(kl_single_file(tmp_path / "stable-diffusion-3-vae.safetensors"))
    assert (sd3.name, sd3.scaling_factor, sd3.shift_factor) == ("sd3", 1.5305, 0.0609)
    flux = load_model(kl_single_file(tmp_path / "ae.safetensors"))
    assert (flux.name, flux.scaling_factor, flux.shift_factor) == ("flux1", 0.3611, 0.1159)
    sdxl = load_model(kl_single_file(tmp_path / "sdxl_vae.safetensors", latent=4))
    assert (sdxl.name, sdxl.scaling_factor) == ("sdxl", 0.13025)


@pytest.mark.parametrize("rel,latent", [("my-vae.safetensors", 16), ("flux1/weights.safetensors", 16),
                                        ("vae-ft-mse.safetensors", 4)])
def test_no_hint_asks_for_preset(tmp_path, rel, latent):
    """No substring of the path (here 'vae' or a folder named flux1) picks a convention."""
    path = kl_single_file(tmp_path / rel, latent)
    with pytest.raises(ValueError, match=r"--preset") as info:
        load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert load_model(path, preset_name="sd3" if latent == 16 else "sd15").latent_channels == latent


def test_preset_with_other_channels_refused(tmp_path):
    path = kl_single_file(tmp_path / "x.safetensors", 16)
    with pytest.raises(ValueError, match=r"preset 'sd15' is a 4-channel kl model; the file holds a 16-channel"):
        load_model(path, preset_name="sd15")


# ---- the latent file's model record ------------------------------------------------------------

def kl_folder(path: Path, scaling: float = 0.5, shift: float = 0.1, seed: int = 0, latent: int = 16,
              width: int = 8, groups: int = 4) -> Path:
    """A small random diffusers AutoencoderKL folder (8 px per latent; quant convs with 4 channels)."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=(width,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=groups, use_quant_conv=latent == 4, use_post_quant_conv=latent == 4,
        scaling_factor=scaling, shift_factor=shift)
    ref.save_pretrained(path)
    return path


def tiny_folder(path: Path) -> Path:
    torch.manual_seed(1)
    diffusers.AutoencoderTiny(latent_channels=4, encoder_block_out_channels=(8,) * 4,
                              decoder_block_out_channels=(8,) * 4).save_pretrained(path)
    return path


def frames_of(path) -> np.ndarray:
    with FrameReader(path, batch=64) as r:
        return np.concatenate([b.frames for b in r])


def decode(lat, out, *extra) -> int:
    return main(["decode", str(lat), "-o", str(out), "--lossless", "--quiet", *extra])


@pytest.mark.parametrize("make", [kl_folder, tiny_folder])
def test_identity_round_trip_from_another_folder(tmp_path, monkeypatch, make):
    """Encode with a folder given by a relative path; decode from elsewhere without --model."""
    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()
    make(a / "vae")
    write_clip(a / "clip.mp4", moving_square_frames(4, 32, 48))
    monkeypatch.chdir(a)
    assert main(["encode", "clip.mp4", "-o", "clip.safetensors", "--model", "vae", "--quiet"]) == 0
    model = load_model(a / "vae")
    with LatentReader(a / "clip.safetensors") as r:
        meta = r.metadata
    assert meta["model_id"] == str((a / "vae").resolve())
    assert meta["model_sha256"] == weights_digest(model) and len(meta["model_sha256"]) == 64
    assert (meta["family"], meta["latent_channels"]) == (model.family, str(model.latent_channels))
    assert (float(meta["scaling_factor"]), float(meta["shift_factor"])) == (model.scaling_factor, model.shift_factor)

    monkeypatch.chdir(b)
    assert decode(a / "clip.safetensors", "recorded.mp4") == 0
    assert decode(a / "clip.safetensors", "explicit.mp4", "--model", str(a / "vae")) == 0
    np.testing.assert_array_equal(frames_of(b / "recorded.mp4"), frames_of(b / "explicit.mp4"))


def test_single_file_named_with_preset_reloads_with_it(tmp_path, monkeypatch):
    weights = kl_single_file(tmp_path / "a" / "my-vae.safetensors", latent=16)
    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(2, 16, 16))
    lat = tmp_path / "c.safetensors"
    monkeypatch.chdir(tmp_path / "a")
    assert main(["encode", str(clip), "-o", str(lat), "--model", "my-vae.safetensors", "--preset", "flux1",
                 "--quiet"]) == 0
    with LatentReader(lat) as r:
        meta = r.metadata
    assert (meta["model_id"], meta["model_name"]) == (str(weights.resolve()), "flux1")
    assert (meta["scaling_factor"], meta["shift_factor"]) == ("0.3611", "0.1159")
    monkeypatch.chdir(tmp_path)
    assert decode(lat, tmp_path / "o.mp4") == 0


def test_recorded_folder_keeps_its_scaling_and_groups(tmp_path):
    """A 4-channel folder: its weights file alone would load as sd15 (scaling 0.18215, 32 groups);
    the record is the folder, so the decode uses the folder's scaling, shift and groups."""
    folder = kl_folder(tmp_path / "vae", latent=4, width=32, groups=8)
    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(3, 32, 48))
    lat = tmp_path / "c.safetensors"
    assert main(["encode", str(clip), "-o", str(lat), "--model", str(folder), "--quiet"]) == 0
    model = load_model(folder)
    with LatentReader(lat) as r:
        z = r.read(0, 1)
    assert decode(lat, tmp_path / "o.mp4") == 0
    want = ((model.decode(z.float())[0, :, :32, :48] + 1) * 127.5).round().clamp(0, 255)
    got = torch.from_numpy(frames_of(tmp_path / "o.mp4")[0]).permute(2, 0, 1).float()
    assert (got - want).abs().max() <= 1  # lossless RGB H.264: rounding only


def test_other_scaling_refused_unless_forced(tmp_path, capsys):
    folder = kl_folder(tmp_path / "vae")
    other = tmp_path / "other"
    shutil.copytree(folder, other)  # same weights, another latent scaling in config.json
    cfg = json.loads((other / "config.json").read_text())
    cfg["scaling_factor"] = 0.25
    (other / "config.json").write_text(json.dumps(cfg))
    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(3, 32, 48))
    lat = tmp_path / "c.safetensors"
    assert main(["encode", str(clip), "-o", str(lat), "--model", str(folder), "--quiet"]) == 0
    capsys.readouterr()
    assert decode(lat, tmp_path / "no.mp4", "--model", str(other)) == 2
    err = capsys.readouterr().err
    assert "scaling 0.5" in err and "scaling 0.25" in err and "--force-convention" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "no.mp4").exists()
    assert decode(lat, tmp_path / "forced.mp4", "--model", str(other), "--force-convention") == 0
    warned = capsys.readouterr().err  # the command prints warnings as one line each
    assert re.search(r"codec: warning: .*scaling 0\.5 vs 0\.25", warned)
    assert decode(lat, tmp_path / "right.mp4") == 0
    assert not np.array_equal(frames_of(tmp_path / "forced.mp4"), frames_of(tmp_path / "right.mp4"))


def test_changed_weights_at_the_recorded_path_refused(tmp_path, capsys):
    folder = kl_folder(tmp_path / "vae")
    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(3, 32, 48))
    lat = tmp_path / "c.safetensors"
    assert main(["encode", str(clip), "-o", str(lat), "--model", str(folder), "--quiet"]) == 0
    kl_folder(folder, seed=5)  # same config, other weights
    capsys.readouterr()
    assert decode(lat, tmp_path / "o.mp4") == 2
    assert "has other weights now" in capsys.readouterr().err


def test_in_memory_model_is_recorded_as_such(tmp_path, capsys):
    from codec.pipeline import encode_video

    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(2, 16, 16))
    lat = tmp_path / "c.safetensors"
    model = build("taesd", width=8)
    encode_video(clip, lat, model)
    with LatentReader(lat) as r:
        assert r.metadata["model_id"] == "in-memory" and r.metadata["model_sha256"] == weights_digest(model)
    assert decode(lat, tmp_path / "o.mp4") == 2
    assert "not loaded from weights" in capsys.readouterr().err
    path = save_model(model, tmp_path / "m.safetensors", dtype=torch.float32)
    assert decode(lat, tmp_path / "o.mp4", "--model", str(path)) == 0  # same weights: no warning needed
    assert "warning" not in capsys.readouterr().err


def test_preset_and_default_identity(tmp_path, monkeypatch):
    """A preset is recorded by name (resolved from the local hub cache), the default as 'default'."""
    pytest.importorskip("huggingface_hub", reason="optional hub support")
    repo = tmp_path / "hub" / "models--madebyollin--taesd"
    tiny_folder(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_model("taesd").model_id == "taesd"
    (tmp_path / "default").mkdir()  # "default" is reserved for the built-in model, whatever the folder
    monkeypatch.chdir(tmp_path)
    default = load_model("default")
    assert default.model_id == "default" and default.source.endswith("default.safetensors")
    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(2, 16, 16))
    lat = tmp_path / "c.safetensors"
    assert main(["encode", str(clip), "-o", str(lat), "--model", "taesd", "--quiet"]) == 0
    with LatentReader(lat) as r:
        assert (r.metadata["model_id"], r.metadata["model_name"]) == ("taesd", "taesd")
    monkeypatch.chdir(tmp_path / "hub")
    assert decode(lat, tmp_path / "o.mp4") == 0


def test_weights_digest_ignores_storage_dtype_but_not_values(tmp_path):
    model = build("taesd", width=8)
    a = load_model(save_model(model, tmp_path / "a.safetensors", dtype=torch.float16))
    b = load_model(save_model(a, tmp_path / "b.safetensors", dtype=torch.float32))
    half = copy.deepcopy(a).half()
    half.weights_sha256 = None  # computed afresh from fp16 values: the same numbers, the same hash
    assert a.weights_sha256 == b.weights_sha256 == weights_digest(half)
    with torch.no_grad():
        b.decoder[1].bias[0] += 1e-3
    b.weights_sha256 = None
    assert weights_digest(b) != a.weights_sha256
