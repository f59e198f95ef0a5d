"""Wan 2.1 / 2.2 video VAEs: equivalence with diffusers, both checkpoint layouts, streaming.

Small random models (base_dim 8, the real stage structure), 32x32 frames, fp32 on the CPU.
Real Wan weights are not on this machine; nothing here downloads them.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from codec.models import load_model
from codec.models.config import PRESETS, WanConfig
from codec.models.video_autoencoder import VideoAutoencoder
from codec.models.wan_layouts import original_to_diffusers, shape_config

diffusers = pytest.importorskip("diffusers")

SMALL = {
    "2.1": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1),
    "2.2": dict(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16),
}
MEAN, STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(version: str, seed: int = 0):
    """A small diffusers AutoencoderKLWan with random weights; conv_out scaled down so decoded
    values stay mostly inside [-1, 1] (the clamp would otherwise hide differences)."""
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKLWan(**SMALL[version], latents_mean=MEAN, latents_std=STD).eval()
    with torch.no_grad():
        ref.decoder.conv_out.weight.mul_(0.3)
    return ref


def normalize(z: torch.Tensor) -> torch.Tensor:
    return (z - torch.tensor(MEAN).view(1, -1, 1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1, 1)


def clip(frames: int = 9, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


@pytest.fixture(params=["2.1", "2.2"])
def version(request):
    return request.param


@pytest.fixture
def pair(version, tmp_path):
    """(diffusers model, ours loaded from its saved diffusers folder)."""
    ref = reference(version)
    ref.save_pretrained(tmp_path / "vae")
    return ref, load_model(tmp_path / "vae")


# ---- equivalence with diffusers -----------------------------------------------------------------

def test_encode_decode_match_diffusers(pair):
    ref, ours = pair
    x = clip()
    with torch.no_grad():
        mode = ref.encode(x).latent_dist.mode()
        decoded = ref.decode(mode).sample
    z = ours.encode(x)
    assert z.shape == mode.shape == (1, 4, 3, 32 // ours.downscale, 32 // ours.downscale)
    assert rel(z, normalize(mode)) < 1e-5
    assert (decoded.abs() >= 1).float().mean() < 0.1  # the comparison is not all clamp
    out = ours.decode(normalize(mode))
    assert out.shape == decoded.shape == (1, 3, 9, 32, 32)
    assert rel(out, decoded) < 1e-5


def test_sampling_uses_the_posterior_spread(pair):
    _, ours = pair
    x = clip(5)
    a = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    b = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    mode = ours.encode(x)
    assert torch.equal(a, b) and not torch.allclose(a, mode)


# ---- the original single-file layout --------------------------------------------------------------

_RESNET = [(".norm1.gamma", ".residual.0.gamma"), (".conv1.", ".residual.2."), (".norm2.gamma", ".residual.3.gamma"),
           (".conv2.", ".residual.6."), (".conv_shortcut.", ".shortcut.")]


def to_original(state: dict, nres: int, residual: bool) -> dict:
    """diffusers names -> the original Wan names, written here from the rules (block arithmetic),
    independently of the loader's conversion."""
    out = {}
    for key, v in state.items():
        k = key
        for new, old in _RESNET:
            k = k.replace(new, old)
        k = (k.replace("mid_block.resnets.0.", "middle.0.").replace("mid_block.attentions.0.", "middle.1.")
             .replace("mid_block.resnets.1.", "middle.2.").replace("norm_out.", "head.0.")
             .replace("conv_out.", "head.2.").replace("conv_in.", "conv1."))
        k = {"quant_conv.weight": "conv1.weight", "quant_conv.bias": "conv1.bias",
             "post_quant_conv.weight": "conv2.weight", "post_quant_conv.bias": "conv2.bias"}.get(k, k)
        parts = k.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            side, b = ("downsamples", int(parts[2])) if parts[1] == "down_blocks" else ("upsamples", int(parts[2]))
            n = nres if parts[1] == "down_blocks" else nres + 1  # resnets per block
            if residual:
                j = parts[4] if parts[3] == "resnets" else str(n)
                rest = parts[5:] if parts[3] == "resnets" else parts[4:]
                k = ".".join([parts[0], side, str(b), side, j, *rest])
            elif parts[1] == "down_blocks":
                k = ".".join([parts[0], side, *parts[2:]])
            else:
                flat = b * (n + 1) + (int(parts[4]) if parts[3] == "resnets" else n)
                k = ".".join([parts[0], side, str(flat), *parts[5:]])
        out[k] = v
    return out


def test_original_layout_loads_to_the_same_model(pair, version, tmp_path):
    ref, ours = pair
    cfg = SMALL[version]
    original = to_original(ref.state_dict(), cfg["num_res_blocks"], version == "2.2")
    assert original_to_diffusers(original).keys() == ref.state_dict().keys()
    path = tmp_path / f"Wan{version}_VAE.pth"
    torch.save(original, path)
    loaded = load_model(path)
    assert loaded.config == WanConfig(**{**_fields(ours.config), "latents_mean": None, "latents_std": None})
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = clip(5)
    with torch.no_grad():
        mode = ref.encode(x).latent_dist.mode()
    assert rel(loaded.encode(x), mode) < 1e-5  # no statistics in the file: identity normalization


def _fields(cfg: WanConfig) -> dict:
    return {k: getattr(cfg, k) for k in WanConfig.__dataclass_fields__ if k != "family"}


def test_full_size_key_facts():
    """Known original <-> diffusers pairs of the released architectures (from the published
    conversion): 2.1's flat decoder list has upsamplers at 3, 7, 11 and block 1's shortcut at 4."""
    with torch.device("meta"):
        v21 = diffusers.AutoencoderKLWan().state_dict()
        v22 = diffusers.AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True,
                                         in_channels=12, out_channels=12, patch_size=2).state_dict()
    orig21 = to_original(v21, 2, False)
    assert original_to_diffusers(orig21).keys() == v21.keys()
    fwd = {k: next(iter(original_to_diffusers({k: torch.empty(0)}))) for k in
           ("encoder.middle.1.to_qkv.weight", "conv1.weight", "encoder.head.2.bias")}
    assert fwd == {"encoder.middle.1.to_qkv.weight": "encoder.mid_block.attentions.0.to_qkv.weight",
                   "conv1.weight": "quant_conv.weight", "encoder.head.2.bias": "encoder.conv_out.bias"}
    mapped = original_to_diffusers({k: v for k, v in orig21.items() if k.startswith("decoder.upsamples.")})
    for o, d in [("decoder.upsamples.4.shortcut.weight", "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"),
                 ("decoder.upsamples.3.time_conv.weight", "decoder.up_blocks.0.upsamplers.0.time_conv.weight"),
                 ("decoder.upsamples.11.resample.1.weight", "decoder.up_blocks.2.upsamplers.0.resample.1.weight"),
                 ("decoder.upsamples.14.residual.6.bias", "decoder.up_blocks.3.resnets.2.conv2.bias")]:
        assert o in orig21 and d in mapped
    orig22 = to_original(v22, 2, True)
    assert "encoder.downsamples.1.downsamples.2.time_conv.weight" in orig22
    assert original_to_diffusers(orig22).keys() == v22.keys()
    assert shape_config(dict(v21), "x") == PRESETS["wan2.1"]
    assert shape_config(dict(v22), "x") == PRESETS["wan2.2"]


def test_diffusers_config_of_a_release_keeps_its_name(tmp_path):
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan()
    cfg = dict(ref.config)
    from codec.models.wan_layouts import diffusers_config

    assert diffusers_config(cfg, tmp_path).name == "wan2.1"
    cfg["latents_std"] = [1.0] * 16
    assert diffusers_config(cfg, tmp_path).name == "wan"  # other statistics: not the release
    with pytest.raises(ValueError, match="attn_scales"):
        diffusers_config({**cfg, "attn_scales": [0.5]}, tmp_path)


def test_loading_is_strict(tmp_path):
    ref = reference("2.1")
    state = ref.state_dict()
    state.pop("decoder.mid_block.attentions.0.proj.bias")
    path = tmp_path / "vae.pth"
    torch.save(to_original(state, 1, False), path)
    with pytest.raises(ValueError, match="missing keys"):
        load_model(path)
    folder = tmp_path / "folder"
    ref.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "z_dim": 8, "latents_mean": None, "latents_std": None}))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model(folder)


# ---- streaming: chunks, prefixes ----------------------------------------------------------------

def small_model(version: str) -> VideoAutoencoder:
    torch.manual_seed(0)
    cfg = SMALL[version]
    return VideoAutoencoder(WanConfig(base_dim=8, decoder_base_dim=cfg.get("decoder_base_dim"), latent_channels=4,
                                      dim_mult=(1, 2, 4, 4), num_res_blocks=1, is_residual=version == "2.2",
                                      patch_size=cfg.get("patch_size", 1))).eval()


def test_chunk_plans_do_not_change_the_result(version):
    """The streams run the network on the same pieces whatever the cut: bit-identical."""
    model = small_model(version)
    x = clip(13)
    whole = model.encode(x)
    rng = random.Random(0)
    for _ in range(2):  # any cut, including single frames and chunks that complete no latent frame
        cuts = [0, *sorted(rng.sample(range(1, 13), 4)), 13]
        step = model.encoder_stream()
        parts = [step(x[:, :, a:b]) for a, b in zip(cuts, cuts[1:])]
        assert torch.equal(torch.cat(parts, dim=2), whole), cuts
    decoded = model.decode(whole)
    step = model.decoder_stream()
    parts = [step(whole[:, :, a:b]) for a, b in ((0, 2), (2, 4))]
    assert [p.shape[2] for p in parts] == [5, 8]  # 1 + 4, then 4 per latent frame
    assert torch.equal(torch.cat(parts, dim=2), decoded)


def test_network_caches_carry_any_cut(version):
    """Below the streams, every causal layer carries its state for chunks of any length:
    one call over the whole clip equals any sequence of calls (up to float rounding)."""
    net = small_model(version)
    x = clip(13)
    with torch.no_grad():
        whole, _ = net.encode_moments(x, {})
        for cuts in ([0, 1, 2, 3, 7, 8, 13], [0, 5, 6, 13]):
            state, parts = {}, []
            for a, b in zip(cuts, cuts[1:]):
                out = net.encode_moments(x[:, :, a:b], state)
                if out is not None:
                    parts.append(out[0])
            assert rel(torch.cat(parts, dim=2), whole) < 1e-6, cuts
        z = whole[:, :, :3]
        dec_whole = net.decode_latents(z, {})
        state = {}
        dec = torch.cat([net.decode_latents(z[:, :, :2], state), net.decode_latents(z[:, :, 2:], state)], dim=2)
        assert rel(dec, dec_whole) < 1e-5


def test_prefix_encodes_to_a_prefix(version):
    model = small_model(version)
    x = clip(13)
    whole = model.encode(x)
    assert torch.equal(model.encode(x[:, :, :9]), whole[:, :, :3])
    assert torch.equal(model.encode(x[:, :, :1]), whole[:, :, :1])


def test_bad_inputs_are_refused():
    model = small_model("2.1")
    with pytest.raises(ValueError, match=r"1 \+ 4k frames, got 6"):
        model.encode(clip(6))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        model.encode(clip(5, size=20))
    with pytest.raises(ValueError, match=r"\(N,4,T,H,W\)"):
        model.decode(torch.zeros(1, 5, 2, 4, 4))


def test_save_model_round_trip(tmp_path):
    from codec.models import save_model

    model = small_model("2.2")
    path = save_model(model, tmp_path / "wan.safetensors", dtype=torch.float32)
    loaded = load_model(path)
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_half_precision_stays_close():
    """bf16 weights and activations (the GPU path's dtype), RMS norm statistics in fp32."""
    model = small_model("2.1")
    x = clip(5)
    z = model.encode(x)
    half = small_model("2.1").to(torch.bfloat16)
    z_half = half.encode(x)
    assert z_half.dtype == torch.float32 and rel(z_half, z) < 0.05
    out = half.decode(z)
    assert out.dtype == torch.float32 and rel(out, model.decode(z)) < 0.05


def test_float16_overflow_is_an_error_not_garbage():
    model = small_model("2.1").half()
    with torch.no_grad():
        model.encoder.conv_out.weight.fill_(1e4)
    with pytest.raises(ValueError, match="non-finite values in float16"):
        model.encode(clip(1))


# ---- --preset, and original names in a diffusers folder ----------------------------------------------

def test_preset_gives_the_statistics_when_it_fits(tmp_path):
    """A file without statistics takes the preset's (encode normalizes with them); a config that
    states the same ones keeps them under the preset's name."""
    torch.manual_seed(0)  # the small 2.1 shape with wan2.1's 16 channels; diffusers' default statistics are 2.1's
    ref = diffusers.AutoencoderKLWan(**{**SMALL["2.1"], "z_dim": 16}).eval()
    path = tmp_path / "small_vae.pth"
    torch.save(to_original(ref.state_dict(), 1, False), path)
    plain = load_model(path)
    assert plain.name == "wan" and plain.config.latents_mean is None
    named = load_model(path, preset_name="wan2.1")
    assert named.name == "wan2.1" and named.config.latents_mean == PRESETS["wan2.1"].latents_mean
    x = clip(5)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (PRESETS["wan2.1"].latents_mean,
                                                                  PRESETS["wan2.1"].latents_std))
    assert rel(named.encode(x), (plain.encode(x) - mean) / std) < 1e-6
    ref.save_pretrained(tmp_path / "folder")
    assert load_model(tmp_path / "folder", preset_name="wan2.1").name == "wan2.1"


@pytest.mark.parametrize("preset_name, match", [
    ("wan2.2", r"preset wan2.2 is a 48-channel Wan VAE \(4x temporal, 16x16 spatial\); the weights are a "
               r"4-channel Wan VAE \(4x temporal, 8x8 spatial\)"),
    ("wan2.1", "preset wan2.1 is a 16-channel Wan VAE"),
    ("sd15", "preset sd15 is a 4-channel kl image autoencoder; the weights are a 4-channel Wan VAE")])
def test_preset_that_contradicts_the_weights_is_refused(tmp_path, preset_name, match):
    path = tmp_path / "vae.pth"
    torch.save(to_original(reference("2.1").state_dict(), 1, False), path)
    reference("2.1").save_pretrained(tmp_path / "folder")
    from codec.models import save_model

    own = save_model(small_model("2.1"), tmp_path / "own.safetensors", dtype=torch.float32)
    for source in (path, tmp_path / "folder", own):  # single file, diffusers folder, our own file
        with pytest.raises(ValueError, match=match):
            load_model(source, preset_name=preset_name)


def test_preset_must_fit_the_temporal_factor_and_stated_statistics(tmp_path):
    from codec.models import save_model

    two_x = VideoAutoencoder(WanConfig(base_dim=8, latent_channels=16, num_res_blocks=1,
                                       temperal_downsample=(False, False, True))).eval()
    path = save_model(two_x, tmp_path / "two_x.safetensors", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"16-channel Wan VAE \(2x temporal, 8x8 spatial\)"):
        load_model(path, preset_name="wan2.1")
    torch.manual_seed(0)
    other = diffusers.AutoencoderKLWan(**{**SMALL["2.1"], "z_dim": 16}, latents_std=[2.0] * 16)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"wan2.1 has latents_std\[0\] = 2.8184, the model's config states 2.0"):
        load_model(tmp_path / "other", preset_name="wan2.1")
    assert load_model(tmp_path / "other").config.latents_std == (2.0,) * 16  # without --preset: the config


def test_diffusers_folder_with_original_names_loads(pair, version, tmp_path):
    """A diffusers config beside weights under the original Wan names: renamed, the same model."""
    from safetensors.torch import save_file

    ref, ours = pair
    folder = tmp_path / "vae"
    original = to_original(ref.state_dict(), SMALL[version]["num_res_blocks"], version == "2.2")
    save_file({k: v.contiguous() for k, v in original.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    loaded = load_model(folder)
    assert loaded.config == ours.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())
    original.pop("decoder.middle.1.proj.bias")  # still strict after the renaming
    save_file({k: v.contiguous() for k, v in original.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="missing keys"):
        load_model(folder)
