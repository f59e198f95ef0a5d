"""Model configurations as dataclasses, with the named presets users know.

The KL numbers are the published configs of the Stable Diffusion family VAEs; latents are stored
scaled, ``(z - shift) * scaling``, which is what diffusion models consume. Tiny models (TAESD
architecture) are trained to emit latents already in that space, so their scaling is 1, shift 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


@dataclass(frozen=True)
class KLConfig:
    """AutoencoderKL (ResNet blocks, GroupNorm+SiLU, mid-block attention, diagonal Gaussian)."""

    name: str = "kl"
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    # SDXL's VAE overflows in fp16: the model runs its half-precision batches with an fp32 fallback.
    force_upcast: bool = False
    family: str = field(default="kl", init=False)

    def __post_init__(self):
        _check_convention(self)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TinyConfig:
    """Tiny autoencoder (TAESD architecture: Conv3x3+ReLU blocks, no attention)."""

    name: str = "tiny"
    latent_channels: int = 4
    width: int = 64
    # Optional GroupNorm branch in the blocks next to the latent (TAEF2 has it).
    midblock_groupnorm: bool = False
    # How each 2x step resamples. "nearest": TAESD's stride-2 conv / nearest upsample + conv.
    # "shuffle": pixel unshuffle + conv / conv to 4x width + pixel shuffle (same arithmetic; it
    # can express an exact linear block transform, which is how `codec train --pca-init` starts).
    resample: str = "nearest"
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    family: str = field(default="tiny", init=False)

    def __post_init__(self):
        _check_convention(self)
        if self.resample not in ("nearest", "shuffle"):
            raise ValueError(f"resample must be 'nearest' or 'shuffle', got {self.resample!r}")

    @property
    def downscale(self) -> int:
        return 8


ModelConfig = KLConfig | TinyConfig


def _check_convention(cfg: ModelConfig) -> None:
    # Decoding divides by the scaling: zero, negative or infinite would give garbage silently.
    if not 0 < cfg.scaling_factor < float("inf") or not abs(cfg.shift_factor) < float("inf"):
        raise ValueError(f"expected a positive finite scaling_factor and a finite shift_factor, "
                         f"got {cfg.scaling_factor} and {cfg.shift_factor}")

PRESETS: dict[str, ModelConfig] = {
    "sd15": KLConfig(name="sd15"),
    "sd2": KLConfig(name="sd2"),
    "sdxl": KLConfig(name="sdxl", scaling_factor=0.13025, force_upcast=True),
    "sd3": KLConfig(name="sd3", latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                    use_quant_conv=False, use_post_quant_conv=False),
    "flux1": KLConfig(name="flux1", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                      use_quant_conv=False, use_post_quant_conv=False),
    "taesd": TinyConfig(name="taesd", latent_channels=4),
    "taesdxl": TinyConfig(name="taesdxl", latent_channels=4),
    "taesd3": TinyConfig(name="taesd3", latent_channels=16),
    "taef1": TinyConfig(name="taef1", latent_channels=16),
    "taef2": TinyConfig(name="taef2", latent_channels=32, midblock_groupnorm=True),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` with some fields replaced (e.g. small widths for tests)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


# File-name tokens that name a preset. A name is split on non-alphanumerics into lowercase tokens
# ("stable-diffusion-3-vae" -> stable diffusion 3 vae); a preset is named when one of these token
# sequences appears in it, whole tokens only. Every preset name is also its own one-token alias.
PRESET_ALIASES: dict[tuple[str, ...], str] = {
    ("ae",): "flux1",  # FLUX.1 ships its VAE as ae.safetensors
    ("flux", "1"): "flux1",
    ("sd", "1", "5"): "sd15", ("v1", "5"): "sd15", ("stable", "diffusion", "v1", "5"): "sd15",
    ("stable", "diffusion", "1", "5"): "sd15",
    ("sd21",): "sd2", ("sd", "2"): "sd2", ("stable", "diffusion", "2"): "sd2",
    ("sd", "xl"): "sdxl", ("stable", "diffusion", "xl"): "sdxl",
    ("sd", "3"): "sd3", ("stable", "diffusion", "3"): "sd3",
}


def name_tokens(name: str) -> list[str]:
    """'FLUX.1-dev_vae' -> ['flux', '1', 'dev', 'vae']."""
    return [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]


def presets_named_by(path: Path) -> set[str]:
    """Presets that the file stem (or a folder's name) of ``path`` names by whole tokens."""
    tokens = name_tokens(path.name if path.is_dir() else path.stem)
    names = {(n,): n for n in PRESETS} | PRESET_ALIASES
    return {preset_name for seq, preset_name in names.items()
            if any(tuple(tokens[i:i + len(seq)]) == seq for i in range(len(tokens) - len(seq) + 1))}


def config_from_dict(data: object, where: str) -> ModelConfig:
    """A config from its JSON form (``dataclasses.asdict`` plus ``family``), every field type-checked.

    Raises ValueError naming ``where`` for anything else: not an object, an unknown family or
    field, a value of the wrong type.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with the model config, got {type(data).__name__}")
    data = dict(data)
    family = data.pop("family", None)
    cls = {"kl": KLConfig, "tiny": TinyConfig}.get(family) if isinstance(family, str) else None
    if cls is None:
        raise ValueError(f"{where}: expected family 'kl' or 'tiny', got {family!r}")
    try:
        return cls(**checked_fields(cls, data, where))
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def checked_fields(cls: type, data: dict, where: str) -> dict:
    """``data`` as fields of the config class ``cls``, each of its field's type (see above)."""
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} fields {', '.join(unknown)}")
    return {name: _checked_value(value, known[name].default, f"{where}: {name}") for name, value in data.items()}


def _checked_value(value: object, default: object, what: str):
    """``value`` with the type of the field's ``default`` (ints positive; floats finite)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:  # block_out_channels
        ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        value = tuple(value) if ok else value
    if not ok:
        want = {bool: "true/false", int: "a positive integer", float: "a finite number",
                str: "a string"}.get(type(default), "a non-empty list of positive integers")
        raise ValueError(f"{what}: expected {want}, got {value!r}"[:300])
    return value
