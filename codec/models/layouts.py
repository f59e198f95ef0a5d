"""Key layouts of the checkpoints people have, converted to this package's names.

KL family: the diffusers layout is native; the original (LDM) single-file layout is renamed.
Tiny family: TAESD files are native (``pool.N`` renamed); diffusers ``AutoencoderTiny`` shifts
the decoder indices by one (its clamp is not a layer).
"""

from __future__ import annotations

import re

import torch

from .wan_layouts import wan_layout

LDM_PREFIX = "first_stage_model."
_LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """One of 'kl-diffusers', 'kl-ldm', 'tiny-diffusers', 'tiny-encoder', 'tiny-decoder', 'tiny-pair',
    'wan-diffusers', 'wan-original'.

    Decided by the pattern of the key names, so a partial state dict still gets its layout (and
    the strict fit then names what is missing). Raises ValueError (without the file name; the
    caller adds it) for anything else, naming what the keys look like when we can tell.
    """
    keys = set(state)

    if wan := wan_layout(keys):  # before KL: Wan 2.2's diffusers names share KL's block names
        return wan

    def has(pattern: str) -> bool:
        return any(re.match(pattern, k) for k in keys)

    if has(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\."):
        return "kl-diffusers"
    if has(r"(encoder|decoder)\.(down|up|mid)\."):
        return "kl-ldm"
    if has(r"(encoder|decoder)\.layers\.\d+\."):
        return "tiny-diffusers"
    if has(r"(encoder|decoder)\.\d+\."):
        return "tiny-pair"
    if keys and all(re.match(r"\d+\.", k) for k in keys):
        # TAESD's encoder starts with a conv (0.weight) then a block (1.conv.*); its decoder
        # starts with the clamp (no weights) then a conv (1.weight).
        return "tiny-decoder" if "1.weight" in keys or "0.weight" not in keys else "tiny-encoder"
    sample = ", ".join(sorted(keys)[:3])
    if any(k.startswith(("model.diffusion_model.", "down_blocks.", "input_blocks.", "time_embed")) for k in keys):
        what = "a diffusion UNet/transformer checkpoint, not a VAE"
    elif any("text_model" in k or "transformer.resblocks" in k or "token_embedding" in k for k in keys):
        what = "a text-encoder checkpoint, not a VAE"
    else:
        what = "no known autoencoder layout"
    raise ValueError(f"{what} (keys like {sample or 'none: the file holds no tensors'}); expected the keys of a "
                     "diffusers or original AutoencoderKL, or of a TAESD/AutoencoderTiny encoder or decoder")


def ldm_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original SD VAE names -> diffusers names (decoder up blocks are stored in reverse)."""
    n_up = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1)

    def flip(m: re.Match) -> str:
        return str(n_up - 1 - int(m.group(1)))

    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k)
        k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{flip(m)}.resnets.", k)
        k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{flip(m)}.upsamplers.0.", k)
        k = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", k)
        m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", k)
        if m:
            k = f"{m.group(1)}.mid_block.attentions.0.{_LDM_ATTN[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "norm" and value.ndim == 4:
                value = value[:, :, 0, 0]  # 1x1 conv -> linear
        k = k.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")
        out[k] = value
    return out


def tiny_diffusers_to_taesd(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderTiny names -> TAESD pair names (``encoder.N``, ``decoder.N+1``)."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$", key)
        if not m:
            out[key] = value  # left for the strict load to report
            continue
        idx = int(m.group(2)) + (1 if m.group(1) == "decoder" else 0)
        out[f"{m.group(1)}.{idx}.{m.group(3)}"] = value
    return out


def kl_shape_config(state: dict[str, torch.Tensor]) -> dict:
    """Architecture fields of a diffusers-named KL state dict, read from tensor shapes.

    Only what the present keys tell: a partial state dict gives fewer fields (the caller asks
    for the rest, and the strict fit names the missing keys).
    """
    def shape(key: str) -> tuple[int, ...] | None:
        t = state.get(key)
        return tuple(t.shape) if t is not None and t.ndim >= 2 else None

    out: dict = {}
    enc = [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")
           for i in range(_count(state, "encoder.down_blocks"))]
    dec = [shape(f"decoder.up_blocks.{i}.resnets.0.conv1.weight") for i in range(_count(state, "decoder.up_blocks"))]
    chans = [s[0] for s in enc] if enc and all(enc) else [s[0] for s in reversed(dec)] if dec and all(dec) else None
    if chans:  # the decoder's blocks are stored in reverse order
        out["block_out_channels"] = tuple(int(c) for c in chans)
    # The encoder's blocks hold layers_per_block ResNets, the decoder's one more.
    layers = _count(state, "encoder.down_blocks.0.resnets") or _count(state, "decoder.up_blocks.0.resnets") - 1
    if layers > 0:
        out["layers_per_block"] = layers
    if shape("decoder.conv_in.weight"):
        out["latent_channels"] = int(shape("decoder.conv_in.weight")[1])
    elif shape("encoder.conv_out.weight") and shape("encoder.conv_out.weight")[0] % 2 == 0:
        out["latent_channels"] = int(shape("encoder.conv_out.weight")[0] // 2)
    out.update(use_quant_conv="quant_conv.weight" in state, use_post_quant_conv="post_quant_conv.weight" in state,
               mid_block_add_attention=any(".mid_block.attentions." in k for k in state))
    return out


def _count(state: dict, prefix: str) -> int:
    """1 + the largest index N of keys ``prefix.N.*`` (0 when there are none)."""
    found = [int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))]
    return 1 + max(found) if found else 0


# Keys a shape reader needs when the config does not give the field (for the error message).
KL_SHAPE_KEYS = {"block_out_channels": "encoder.down_blocks.N.resnets.0.conv1.weight",
                 "latent_channels": "decoder.conv_in.weight or encoder.conv_out.weight"}
TINY_SHAPE_KEYS = {"width": "encoder.0.weight or decoder.1.weight",
                   "latent_channels": "the last encoder conv or decoder.1.weight"}


def tiny_shape_config(state: dict[str, torch.Tensor]) -> dict:
    """Architecture fields of a TAESD-named pair state dict (``encoder.N`` / ``decoder.N``);
    only what the present keys tell, as ``kl_shape_config``."""
    out: dict = {"midblock_groupnorm": any(".pool." in k for k in state)}
    first, dec_in = state.get("encoder.0.weight"), state.get("decoder.1.weight")
    last = state.get(f"encoder.{_count(state, 'encoder') - 1}.weight")
    if first is not None and first.ndim == 4:
        out["width"] = int(first.shape[0])
    elif dec_in is not None and dec_in.ndim == 4:
        out["width"] = int(dec_in.shape[0])
    if dec_in is not None and dec_in.ndim == 4:
        out["latent_channels"] = int(dec_in.shape[1])
    elif last is not None and last.ndim == 4:
        out["latent_channels"] = int(last.shape[0])
    return out


def diffusers_config(cfg: object, where: str) -> tuple[str, dict]:
    """(family, config fields) from a diffusers ``config.json`` (AutoencoderKL or AutoencoderTiny).

    Only the fields it states; architectures this package does not have (other block types or
    activations) are refused with a ValueError naming ``where``.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    cls = cfg.get("_class_name", "AutoencoderKL")

    def expect(key: str, want) -> None:
        if key in cfg and cfg[key] != want:
            raise ValueError(f"{where}: {key} {cfg[key]!r} is not supported (expected {want!r})")

    expect("in_channels", 3)
    expect("out_channels", 3)
    if cls == "AutoencoderKL":
        expect("act_fn", "silu")
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if key in cfg and (not isinstance(cfg[key], list) or set(cfg[key]) != {block}):
                raise ValueError(f"{where}: {key} {cfg[key]!r} is not supported (expected only {block})")
        names = ("latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups", "use_quant_conv",
                 "use_post_quant_conv", "mid_block_add_attention", "scaling_factor", "force_upcast")
        out = {k: cfg[k] for k in names if cfg.get(k) is not None}
        family = "kl"
    elif cls == "AutoencoderTiny":
        expect("act_fn", "relu")
        expect("upsample_fn", "nearest")
        expect("upsampling_scaling_factor", 2)
        expect("num_encoder_blocks", [1, 3, 3, 3])
        expect("num_decoder_blocks", [3, 3, 3, 1])
        widths = [w for k in ("encoder_block_out_channels", "decoder_block_out_channels") for w in cfg.get(k) or []]
        if len(set(map(str, widths))) > 1:
            raise ValueError(f"{where}: block widths {widths} differ; TAESD blocks all have one width")
        out = {k: cfg[k] for k in ("latent_channels", "scaling_factor") if cfg.get(k) is not None}
        if widths:
            out["width"] = widths[0]
        family = "tiny"
    else:
        raise ValueError(f"{where}: describes a {cls}; expected an AutoencoderKL or AutoencoderTiny")
    if "scaling_factor" in out:  # diffusers writes shift_factor null for "no shift"
        out["shift_factor"] = cfg.get("shift_factor") or 0.0
    return family, out
