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


# Per-channel latent statistics of the released Wan VAEs (published configs): latents are stored
# normalized, (z - mean) / std, the form the Wan transformers consume.
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
WAN22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
              -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
              -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
              -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
              0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
             0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
             0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
             0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
             0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


@dataclass(frozen=True)
class WanConfig:
    """Wan causal video VAE (3D causal convs, RMS norm, per-frame mid attention; see models/wan.py).

    Field names follow diffusers' ``AutoencoderKLWan`` config. 2.1: 4x temporal, 8x8 spatial,
    16 channels. 2.2: a 2x2 patchify in front (12 input channels), residual down/up blocks with
    avg-down / dup-up shortcuts, 4x16x16, 48 channels. ``latents_mean``/``latents_std`` per channel
    (``None``: zeros/ones, e.g. for small test models).
    """

    name: str = "wan"
    base_dim: int = 96
    decoder_base_dim: int | None = None
    latent_channels: int = 16  # diffusers: z_dim
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # diffusers' spelling
    is_residual: bool = False
    patch_size: int = 1
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    family: str = field(default="wan", init=False)

    def __post_init__(self):
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(self.dim_mult) - 1} entries (one per "
                             f"down stage), got {len(self.temperal_downsample)}")
        if self.patch_size not in (1, 2):
            raise ValueError(f"patch_size must be 1 or 2, got {self.patch_size}")
        for what in ("latents_mean", "latents_std"):
            v = getattr(self, what)
            if v is not None and len(v) != self.latent_channels:
                raise ValueError(f"{what} needs {self.latent_channels} values, got {len(v)}")

    @property
    def downscale(self) -> int:
        """Spatial factor, pixels per latent cell along each side."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first (the frame rule: T = 1 + factor * (T' - 1))."""
        return 2 ** sum(self.temperal_downsample)

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def scaling_factor(self) -> float:  # the image families' convention, neutral here
        return 1.0

    @property
    def shift_factor(self) -> float:
        return 0.0


ModelConfig = KLConfig | TinyConfig | WanConfig


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
    "wan2.1": WanConfig(name="wan2.1", latents_mean=WAN21_MEAN, latents_std=WAN21_STD),
    "wan2.2": WanConfig(name="wan2.2", base_dim=160, decoder_base_dim=256, latent_channels=48,
                        is_residual=True, patch_size=2, latents_mean=WAN22_MEAN, latents_std=WAN22_STD),
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
    cls = {"kl": KLConfig, "tiny": TinyConfig, "wan": WanConfig}.get(family) if isinstance(family, str) else None
    if cls is None:
        raise ValueError(f"{where}: expected family 'kl', 'tiny' or 'wan', got {family!r}")
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
    return {name: None if value is None and known[name].default is None
            else _checked_value(value, _example(known[name]), f"{where}: {name}")
            for name, value in data.items()}


def _example(f) -> object:
    """A value of field ``f``'s type: its default, or for an optional field (default None: Wan's
    decoder width and latent statistics) one read from its annotation (``int | None`` or
    ``tuple[float, ...] | None``)."""
    if f.default is not None:
        return f.default
    return 1 if str(f.type).startswith("int") else (0.0,)


def _checked_value(value: object, default: object, what: str):
    """``value`` with the type of the field's ``default`` (ints positive; floats finite); a tuple
    of booleans takes a list of booleans, a tuple of floats a list of finite numbers."""
    if isinstance(default, tuple) and default and isinstance(default[0], bool):
        if not (isinstance(value, (list, tuple)) and all(isinstance(v, bool) for v in value)):
            raise ValueError(f"{what}: expected a list of true/false, got {value!r}"[:300])
        return tuple(value)
    if isinstance(default, tuple) and default and isinstance(default[0], float):
        if not (isinstance(value, (list, tuple)) and len(value) > 0 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf") for v in value)):
            raise ValueError(f"{what}: expected null or a list of finite numbers, got {value!r}"[:300])
        return tuple(float(v) for v in value)
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
