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

    Raises ValueError (without the file name; the caller adds it) for anything else, naming what
    the keys look like when we can tell (a UNet, a text encoder).
    """
    keys = set(state)
    if wan := wan_layout(keys):  # before KL: Wan 2.2's diffusers names share KL's block names
        return wan
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in keys or "decoder.up_blocks.0.resnets.0.conv1.weight" in keys:
        return "kl-diffusers"
    if "encoder.down.0.block.0.conv1.weight" in keys or "decoder.up.0.block.0.conv1.weight" in keys:
        return "kl-ldm"
    if "encoder.layers.0.weight" in keys or "decoder.layers.0.weight" in keys:
        return "tiny-diffusers"
    if "encoder.0.weight" in keys and "decoder.1.weight" in keys:
        return "tiny-pair"
    if "0.weight" in keys and "1.conv.0.weight" in keys:
        return "tiny-encoder"
    if "1.weight" in keys and "3.conv.0.weight" in keys:
        return "tiny-decoder"
    sample = ", ".join(sorted(keys)[:3])
    if any(k.startswith(("model.diffusion_model.", "down_blocks.", "input_blocks.", "time_embed")) for k in keys):
        what = "a diffusion UNet/transformer checkpoint, not a VAE"
    elif any("text_model" in k or "transformer.resblocks" in k or "token_embedding" in k for k in keys):
        what = "a text-encoder checkpoint, not a VAE"
    else:
        what = "no known autoencoder layout"
    raise ValueError(f"{what} (keys like {sample}); expected the keys of a diffusers or original "
                     "AutoencoderKL, or of a TAESD/AutoencoderTiny encoder or decoder")


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
    """Architecture fields of a diffusers-named KL state dict, read from tensor shapes."""
    chans, i = [], 0
    while f"encoder.down_blocks.{i}.resnets.0.conv1.weight" in state:
        chans.append(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
        i += 1
    if not chans:  # a decoder-only file: read the decoder, whose blocks are reversed
        while f"decoder.up_blocks.{i}.resnets.0.conv1.weight" in state:
            chans.insert(0, state[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0])
            i += 1
    layers = sum(1 for k in state if re.match(r"encoder\.down_blocks\.0\.resnets\.\d+\.conv1\.weight$", k))
    if "decoder.conv_in.weight" in state:
        latent = state["decoder.conv_in.weight"].shape[1]
    else:
        latent = state["encoder.conv_out.weight"].shape[0] // 2
    return dict(
        latent_channels=int(latent),
        block_out_channels=tuple(int(c) for c in chans),
        layers_per_block=layers or 2,
        use_quant_conv="quant_conv.weight" in state,
        use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention=any(".mid_block.attentions." in k for k in state),
    )


def tiny_shape_config(state: dict[str, torch.Tensor]) -> dict:
    """Architecture fields of a TAESD-named pair state dict (``encoder.N`` / ``decoder.N``)."""
    if "encoder.0.weight" in state:
        width = state["encoder.0.weight"].shape[0]
        last = max(int(k.split(".")[1]) for k in state if k.startswith("encoder."))
        latent = state[f"encoder.{last}.weight"].shape[0]
    else:
        width, latent = state["decoder.1.weight"].shape[0], state["decoder.1.weight"].shape[1]
    return dict(latent_channels=int(latent), width=int(width),
                midblock_groupnorm=any(".pool." in k for k in state))
