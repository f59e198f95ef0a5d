"""Key layouts of Wan VAE checkpoints, and the config each one implies.

Native names are diffusers' ``AutoencoderKLWan`` names. The original single files
(``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``) name the same tensors differently:

==============================================  =====================================================
original                                        diffusers
==============================================  =====================================================
``conv1`` / ``conv2``                           ``quant_conv`` / ``post_quant_conv``
``{enc,dec}oder.conv1``                         ``{enc,dec}oder.conv_in``
``*.middle.0`` / ``.1`` / ``.2``                ``*.mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``*.head.0.gamma`` / ``*.head.2``               ``*.norm_out.gamma`` / ``*.conv_out``
``residual.0.gamma`` ``residual.2``             ``norm1.gamma`` ``conv1``
``residual.3.gamma`` ``residual.6``             ``norm2.gamma`` ``conv2``
``shortcut``                                    ``conv_shortcut``
2.1 ``encoder.downsamples.N``                   ``encoder.down_blocks.N`` (one flat list in both)
2.1 ``decoder.upsamples.N`` (flat)              ``decoder.up_blocks.B.resnets.R`` / ``.upsamplers.0``
2.2 ``encoder.downsamples.B.downsamples.J``     ``encoder.down_blocks.B.resnets.J`` / ``.downsampler``
2.2 ``decoder.upsamples.B.upsamples.J``         ``decoder.up_blocks.B.resnets.J`` / ``.upsampler``
==============================================  =====================================================

Resamplers keep their inner names (``resample.1``, ``time_conv``). The original files carry no
config: it is read from tensor shapes, and the latent statistics come from the matching preset
(or ``--preset``, ``with_preset``). A diffusers folder may hold its weights under either names.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from .config import PRESETS, WanConfig, checked_fields, preset

_RESNET = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
           "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
           "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv", "encoder.conv1": "encoder.conv_in",
        "decoder.conv1": "decoder.conv_in", "encoder.head.0": "encoder.norm_out", "encoder.head.2": "encoder.conv_out",
        "decoder.head.0": "decoder.norm_out", "decoder.head.2": "decoder.conv_out"}
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}


def wan_layout(keys) -> str | None:
    """'wan-diffusers', 'wan-original' or None (not a Wan VAE)."""
    keys = set(keys)
    if {"encoder.mid_block.attentions.0.to_qkv.weight", "decoder.mid_block.attentions.0.to_qkv.weight"} & keys:
        return "wan-diffusers"
    if {"encoder.middle.1.to_qkv.weight", "decoder.middle.1.to_qkv.weight"} & keys:
        return "wan-original"
    return None


def _resnet_part(rest: str) -> str:
    return _RESNET.get(rest, rest)  # resample.1.*, time_conv.*: unchanged


def _is_resample(rest: str) -> bool:
    return rest.startswith(("resample.", "time_conv."))


def original_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan 2.1 / 2.2 VAE names -> diffusers names (values untouched). Keys it does not
    know are kept, for the strict load to report."""
    up_map = _flat_decoder_map(state)
    out = {}
    for key, value in state.items():
        stem, _, leaf = key.rpartition(".")
        k = key
        if stem in _TOP:
            k = f"{_TOP[stem]}.{leaf}"
        elif m := re.match(r"^(encoder|decoder)\.middle\.(\d)\.(.+)$", key):
            inner = m.group(3) if m.group(2) == "1" else _resnet_part(m.group(3))
            k = f"{m.group(1)}.mid_block.{_MIDDLE[m.group(2)]}.{inner}"
        elif m := re.match(r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(.+)$", key):  # 2.2
            b, j, rest = m.groups()
            k = (f"encoder.down_blocks.{b}.downsampler.{rest}" if _is_resample(rest)
                 else f"encoder.down_blocks.{b}.resnets.{j}.{_resnet_part(rest)}")
        elif m := re.match(r"^decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.(.+)$", key):  # 2.2
            b, j, rest = m.groups()
            k = (f"decoder.up_blocks.{b}.upsampler.{rest}" if _is_resample(rest)
                 else f"decoder.up_blocks.{b}.resnets.{j}.{_resnet_part(rest)}")
        elif m := re.match(r"^encoder\.downsamples\.(\d+)\.(.+)$", key):  # 2.1: the same flat list
            k = f"encoder.down_blocks.{m.group(1)}.{_resnet_part(m.group(2))}"
        elif m := re.match(r"^decoder\.upsamples\.(\d+)\.(.+)$", key):  # 2.1: flat -> blocks
            target = up_map[int(m.group(1))]
            k = f"decoder.up_blocks.{target}.{_resnet_part(m.group(2))}"
        out[k] = value
    return out


def _flat_decoder_map(state: dict[str, torch.Tensor]) -> dict[int, str]:
    """2.1's flat decoder list -> 'B.resnets.R' / 'B.upsamplers.0': each block is its residual
    blocks followed by its upsampler (the last block has none)."""
    kinds: dict[int, bool] = {}  # flat index -> is a resampler
    for key in state:
        if m := re.match(r"^decoder\.upsamples\.(\d+)\.(.+)$", key):
            if not re.match(r"^\d+\.upsamples\.", key.removeprefix("decoder.upsamples.")):
                kinds[int(m.group(1))] = kinds.get(int(m.group(1)), False) or _is_resample(m.group(2))
    mapping, block, r = {}, 0, 0
    for i in sorted(kinds):
        if kinds[i]:
            mapping[i] = f"{block}.upsamplers.0"
            block, r = block + 1, 0
        else:
            mapping[i] = f"{block}.resnets.{r}"
            r += 1
    return mapping


def shape_config(state: dict[str, torch.Tensor], path: Path) -> WanConfig:
    """The WanConfig of a diffusers-named Wan state dict, read from its tensor shapes; the name and
    latent statistics of the preset whose architecture it matches (else 'wan', no statistics)."""
    try:
        conv_in = state["encoder.conv_in.weight"]
        base = conv_in.shape[0]
        residual = "encoder.down_blocks.0.resnets.0.conv1.weight" in state
        stage_out = []
        if residual:
            i = 0
            while f"encoder.down_blocks.{i}.resnets.0.conv1.weight" in state:
                stage_out.append(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                i += 1
            nres = sum(1 for k in state if re.match(r"encoder\.down_blocks\.0\.resnets\.\d+\.conv1\.weight$", k))
            temporal = tuple(f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in state
                             for i in range(len(stage_out) - 1))
        else:
            flat = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
            resamplers = [i for i in flat if f"encoder.down_blocks.{i}.resample.1.weight" in state]
            nres = resamplers[0] if resamplers else len(flat)
            stage_out = [state[f"encoder.down_blocks.{i}.conv1.weight"].shape[0] for i in flat
                         if f"encoder.down_blocks.{i}.conv1.weight" in state][nres - 1::nres]
            temporal = tuple(f"encoder.down_blocks.{i}.time_conv.weight" in state for i in resamplers)
        dec_out = state["decoder.conv_out.weight"].shape[1]  # decoder_base_dim * dim_mult[0]
        mult = tuple(int(c) // base for c in stage_out)
        patch = int(round((conv_in.shape[1] / 3) ** 0.5))
        cfg = WanConfig(name="wan", base_dim=int(base), decoder_base_dim=int(dec_out) // mult[0],
                        latent_channels=int(state["post_quant_conv.weight"].shape[0]), dim_mult=mult,
                        num_res_blocks=int(nres), temperal_downsample=temporal, is_residual=residual,
                        patch_size=patch)
    except (KeyError, IndexError, ZeroDivisionError, ValueError) as e:
        raise ValueError(f"{path}: a Wan VAE checkpoint whose shapes do not read as one ({e})") from None
    if cfg.decoder_base_dim == cfg.base_dim:
        cfg = replace(cfg, decoder_base_dim=None)
    return _with_preset(cfg)


def _with_preset(cfg: WanConfig) -> WanConfig:
    for name in ("wan2.1", "wan2.2"):
        p = PRESETS[name]
        if replace(p, name=cfg.name, latents_mean=None, latents_std=None) == cfg:
            return p
    return cfg


def diffusers_config(cfg_json: dict, path: Path) -> WanConfig:
    """The WanConfig of a diffusers ``AutoencoderKLWan`` config.json (defaults as diffusers has them)."""
    if cfg_json.get("attn_scales"):
        raise ValueError(f"{path}: attn_scales={cfg_json['attn_scales']} (attention in the down blocks) is not "
                         "supported; the released Wan VAEs use none")
    patch = cfg_json.get("patch_size") or 1
    want_in = 3 * patch * patch
    for k in ("in_channels", "out_channels"):
        if cfg_json.get(k, 3) != want_in:
            raise ValueError(f"{path}: {k}={cfg_json.get(k)} does not fit patch_size={patch} (expected {want_in})")
    names = {"z_dim": "latent_channels", **{k: k for k in ("base_dim", "decoder_base_dim", "dim_mult", "num_res_blocks",
             "temperal_downsample", "is_residual", "patch_size", "latents_mean", "latents_std")}}
    stated = {ours: cfg_json[k] for k, ours in names.items() if cfg_json.get(k) is not None}
    fields_ = checked_fields(WanConfig, stated, str(path))  # as our own config metadata is checked
    try:
        cfg = WanConfig(name="wan", **fields_)
    except ValueError as e:
        raise ValueError(f"{path}: not a usable AutoencoderKLWan config ({e})") from None
    if cfg_json.get("scale_factor_spatial") not in (None, cfg.downscale):
        raise ValueError(f"{path}: scale_factor_spatial={cfg_json['scale_factor_spatial']} but the architecture "
                         f"downsamples {cfg.downscale}x")
    # A released architecture with its statistics keeps its name.
    p = _with_preset(replace(cfg, latents_mean=None, latents_std=None))
    return p if (p.latents_mean, p.latents_std) == (cfg.latents_mean, cfg.latents_std) else cfg


def _latent_layout(cfg: WanConfig) -> str:
    return (f"{cfg.latent_channels}-channel Wan VAE ({cfg.temporal_factor}x temporal, "
            f"{cfg.downscale}x{cfg.downscale} spatial)")


def with_preset(cfg: WanConfig, name: str, where) -> WanConfig:
    """``cfg`` with the name and latent statistics of the Wan preset ``name`` (``--preset``).

    The preset must fit the weights' latent layout: latent channels, temporal and spatial factors
    (the widths may differ, e.g. a pruned VAE of the same latent space). Statistics the config
    already states (config.json, our own metadata, or a released architecture's) must be the
    preset's. Raises ValueError naming ``where``, the preset and the weights otherwise.
    """
    p = preset(name)
    if not isinstance(p, WanConfig):
        raise ValueError(f"{where}: preset {p.name} is a {p.latent_channels}-channel {p.family} image autoencoder; "
                         f"the weights are a {_latent_layout(cfg)}")
    if (p.latent_channels, p.temporal_factor, p.downscale) != (cfg.latent_channels, cfg.temporal_factor,
                                                                cfg.downscale):
        raise ValueError(f"{where}: preset {p.name} is a {_latent_layout(p)}; the weights are a {_latent_layout(cfg)}")
    for what in ("latents_mean", "latents_std"):
        stated, wanted = getattr(cfg, what), getattr(p, what)
        if stated is not None and stated != wanted:
            i = next(i for i, (a, b) in enumerate(zip(stated, wanted)) if a != b)
            raise ValueError(f"{where}: preset {p.name} has {what}[{i}] = {wanted[i]}, the model's config states "
                             f"{stated[i]}; leave out --preset (the config decides) or fix the config")
    return replace(cfg, name=p.name, latents_mean=p.latents_mean, latents_std=p.latents_std)
