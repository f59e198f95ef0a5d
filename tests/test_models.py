"""The model layer against diffusers (same weights, fp32, CPU) and the loading paths."""

from __future__ import annotations

import re

import pytest
import torch

from codec.models import PRESETS, build, load_model
from codec.models.layouts import tiny_diffusers_to_taesd

diffusers = pytest.importorskip("diffusers", reason="diffusers (dev extra) is the reference")

REL_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def randomize_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """Default init leaves GroupNorm at identity; random affines make the test able to fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def diffusers_kl(channels=(32, 64), latent=4, quant=True, groups=8, layers=1, seed=0):
    torch.manual_seed(seed)
    n = len(channels)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=layers, norm_num_groups=groups, use_quant_conv=quant, use_post_quant_conv=quant,
        scaling_factor=0.5, shift_factor=0.1,
    ).eval()
    randomize_norms(ref, seed)
    return ref


def ours_like(ref) -> torch.nn.Module:
    c = ref.config
    model = build("sd15", latent_channels=c.latent_channels, block_out_channels=tuple(c.block_out_channels),
                  layers_per_block=c.layers_per_block, norm_num_groups=c.norm_num_groups,
                  use_quant_conv=c.use_quant_conv, use_post_quant_conv=c.use_post_quant_conv,
                  scaling_factor=c.scaling_factor, shift_factor=c.shift_factor)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def check_kl_equivalence(ref, model, size=32, n=2):
    torch.manual_seed(1)
    x = torch.rand(n, 3, size, size) * 2 - 1
    with torch.no_grad():
        mode = ref.encode(x).latent_dist.mode()
        want_z = (mode - ref.config.shift_factor) * ref.config.scaling_factor
        got_z = model.encode(x)
        assert got_z.shape == want_z.shape
        assert rel_err(got_z, want_z) < REL_TOL
        z = torch.randn_like(mode)
        want_x = ref.decode(z).sample
        got_x = model.decode((z - ref.config.shift_factor) * ref.config.scaling_factor)
        assert rel_err(got_x, want_x) < REL_TOL


@pytest.mark.parametrize("latent,quant", [(4, True), (16, False)])
def test_kl_matches_diffusers_small(latent, quant):
    ref = diffusers_kl(latent=latent, quant=quant)
    check_kl_equivalence(ref, ours_like(ref))


def test_one_layout_keys_are_the_checkpoint_names(tmp_path):
    """KL modules sit on Autoencoder itself: its state dict and save_model's file use diffusers'
    names for KL and TAESD's for tiny, with no prefix anywhere."""
    from safetensors import safe_open

    from codec.models import save_model

    ref = diffusers_kl()
    model = ours_like(ref)
    assert not hasattr(model, "net") and set(model.state_dict()) == set(ref.state_dict())
    with safe_open(str(save_model(model, tmp_path / "kl.safetensors")), "pt") as f:
        assert set(f.keys()) == set(ref.state_dict())
    tiny = build("taesd", width=8)
    assert {k.split(".")[0] for k in tiny.state_dict()} == {"encoder", "decoder"}
    assert "encoder.0.weight" in tiny.state_dict() and "decoder.1.weight" in tiny.state_dict()


def test_kl_matches_diffusers_sd_widths():
    ref = diffusers_kl(channels=(128, 256, 512, 512), groups=32, layers=2, seed=3)
    check_kl_equivalence(ref, ours_like(ref), size=48, n=1)


def test_kl_sample_is_stochastic_and_centered_on_mode():
    model = ours_like(diffusers_kl())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    a, b = model.encode(x, sample=True, generator=g1), model.encode(x, sample=True, generator=g2)
    assert not torch.equal(a, b)
    mode = model.encode(x)
    assert (a - mode).abs().mean() > 0 and (a - mode).abs().mean() < 10


def test_tiny_matches_diffusers():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny(latent_channels=4).eval()
    model = build("taesd")
    model.load_state_dict(tiny_diffusers_to_taesd(ref.state_dict()), strict=True)
    x = torch.rand(2, 3, 32, 40) * 2 - 1
    with torch.no_grad():
        assert rel_err(model.encode(x), ref.encode(x).latents) < REL_TOL
        z = torch.randn(2, 4, 4, 5)
        assert rel_err(model.decode(z), ref.decode(z).sample) < REL_TOL


# ---- loading layouts ---------------------------------------------------------------------

def test_load_diffusers_folder_config_decides(tmp_path):
    """A 16-channel folder with no name hint loads with its config.json's scaling and shift."""
    ref = diffusers_kl(latent=16, quant=False)
    ref.save_pretrained(tmp_path / "vae")
    model = load_model(tmp_path / "vae")
    assert model.latent_channels == 16 and model.scaling_factor == 0.5 and model.shift_factor == 0.1
    check_kl_equivalence(ref, model, size=16, n=1)
    # An explicit preset that contradicts config.json is refused, with both conventions named.
    with pytest.raises(ValueError, match=r"preset sd3 has scaling 1\.5305 and shift 0\.0609, but the model's "
                                         r"config says scaling 0\.5 and shift 0\.1"):
        load_model(tmp_path / "vae", preset_name="sd3")


def test_config_json_groups_apply_to_widths_not_divisible_by_32(tmp_path):
    ref = diffusers_kl(channels=(24, 48), latent=4, groups=8)
    ref.save_pretrained(tmp_path / "vae")
    model = load_model(tmp_path / "vae")
    assert model.config.norm_num_groups == 8 and model.config.block_out_channels == (24, 48)
    check_kl_equivalence(ref, model, size=16, n=1)


def test_config_json_decides_architecture_before_shapes(tmp_path):
    """config.json's layers_per_block and attention flag are the architecture the weights must fit."""
    ref = diffusers_kl(channels=(32, 32), latent=4, groups=8, layers=2)
    ref.save_pretrained(tmp_path / "vae")
    cfg = (tmp_path / "vae" / "config.json")
    import json
    data = json.loads(cfg.read_text())
    data["layers_per_block"] = 1  # a config that contradicts its weights: refused, naming the keys
    cfg.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unexpected keys \(e\.g\. decoder\.up_blocks\.0\.resnets\.2"):
        load_model(tmp_path / "vae")


def test_tiny_diffusers_folder_uses_its_config(tmp_path):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny(latent_channels=16, encoder_block_out_channels=(8,) * 4,
                                    decoder_block_out_channels=(8,) * 4, scaling_factor=0.7, shift_factor=0.2).eval()
    ref.save_pretrained(tmp_path / "small")
    model = load_model(tmp_path / "small")
    assert (model.family, model.latent_channels, model.config.width) == ("tiny", 16, 8)
    assert (model.scaling_factor, model.shift_factor, model.name) == (0.7, 0.2, "tiny-c16")


def to_ldm(state: dict) -> dict:
    """diffusers names -> original SD names (the inverse of what the loader does)."""
    n_up = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in state.items():
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                    lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", k2)
        k2 = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k2)
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", k2)
        if m:
            k2 = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and v.ndim == 2:
                v = v[:, :, None, None]
        k2 = k2.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out[k2] = v.clone()
    return out


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_load_original_single_file(tmp_path, prefix):
    from safetensors.torch import save_file

    ref = diffusers_kl(latent=4, quant=True, groups=32)  # single files carry no config: SD's 32 groups
    state = {prefix + k: v for k, v in to_ldm(ref.state_dict()).items()}
    if prefix:  # a whole SD checkpoint: the UNet's keys are ignored, only the VAE is taken
        state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / "sd-vae.safetensors")
    model = load_model(tmp_path / "sd-vae.safetensors", preset_name="sd15")
    ref.config.scaling_factor = model.scaling_factor  # the preset's convention
    ref.config.shift_factor = model.shift_factor
    check_kl_equivalence(ref, model, size=16, n=1)


def test_load_tiny_diffusers_folder_and_taesd_pair(tmp_path):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny(latent_channels=4).eval()
    ref.save_pretrained(tmp_path / "tiny")
    a = load_model(tmp_path / "tiny")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert rel_err(a.encode(x), ref.encode(x).latents) < REL_TOL
    enc = {k.removeprefix("encoder.layers."): v for k, v in ref.state_dict().items() if k.startswith("encoder.")}
    dec = {}
    for k, v in ref.state_dict().items():
        if k.startswith("decoder."):
            i, rest = k.removeprefix("decoder.layers.").split(".", 1)
            dec[f"{int(i) + 1}.{rest}"] = v
    torch.save(enc, tmp_path / "taesd_encoder.pth")
    torch.save(dec, tmp_path / "taesd_decoder.pth")
    for source in (tmp_path / "taesd_decoder.pth", tmp_path):
        b = load_model(source)
        assert b.name == "taesd" and b.latent_channels == 4
        z = torch.randn(1, 4, 3, 2)
        assert rel_err(b.decode(z), ref.decode(z).sample) < REL_TOL


def test_presets_have_real_conventions():
    assert {n: c.latent_channels for n, c in PRESETS.items()} == {
        "sd15": 4, "sd2": 4, "sdxl": 4, "sd3": 16, "flux1": 16,
        "taesd": 4, "taesdxl": 4, "taesd3": 16, "taef1": 16, "taef2": 32, "wan2.1": 16, "wan2.2": 48}
    assert PRESETS["sd3"].scaling_factor == 1.5305 and PRESETS["sd3"].shift_factor == 0.0609
    assert PRESETS["flux1"].scaling_factor == 0.3611 and not PRESETS["flux1"].use_quant_conv
    assert PRESETS["sdxl"].scaling_factor == 0.13025 and PRESETS["taef2"].midblock_groupnorm


def test_fp16_overflow_falls_back_to_fp32():
    torch.manual_seed(0)
    model = build("taesd", width=8)
    with torch.no_grad():
        for layer in (model.decoder[1], model.decoder[-1]):  # outputs past fp16's 65504, weights within
            layer.weight.mul_(3000.0)
    z = torch.randn(1, 4, 4, 4)
    want = model.decode(z)
    assert torch.isfinite(want).all() and want.abs().max() > 65504
    half = model.half()
    with pytest.warns(RuntimeWarning, match="float32"):
        got = half.decode(z)
    assert half.fp32_fallbacks == 1 and torch.isfinite(got).all()
    assert got.dtype == torch.float32  # the fallback result may not fit fp16
    assert rel_err(got, want) < 1e-2  # fp16-rounded weights, fp32 arithmetic


@pytest.mark.parametrize("name,overrides", [("taef2", {"width": 8}), ("flux1", {"block_out_channels": (32, 32)})])
def test_save_model_round_trip(tmp_path, name, overrides):
    from codec.models import save_model

    torch.manual_seed(0)
    model = build(name, **overrides)
    randomize_norms(model)
    path = save_model(model, tmp_path / "m.safetensors", dtype=torch.float32, metadata={"note": "x"})
    again = load_model(path)
    assert again.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_hub_cache_resolves_repo_ids_and_presets(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub", reason="optional hub support")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny(latent_channels=4).eval()
    repo = tmp_path / "hub" / "models--madebyollin--taesd"
    ref.save_pretrained(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for source in ("madebyollin/taesd", "taesd"):
        model = load_model(source)
        assert model.latent_channels == 4 and rel_err(model.encode(x), ref.encode(x).latents) < REL_TOL
    with pytest.raises(ValueError, match="never downloads"):
        load_model("someone/not-cached")
    with pytest.raises(ValueError, match="pass a local file"):
        load_model("taef1")
