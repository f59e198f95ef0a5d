"""Model configurations as dataclasses, with the named presets users know.

The KL numbers are the published configs of the Stable Diffusion family VAEs; latents are stored
scaled, ``(z - shift) * scaling``, which is what diffusion models consume. Tiny models (TAESD
architecture) are trained to emit latents already in that space, so their scaling is 1, shift 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


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
        if self.resample not in ("nearest", "shuffle"):
            raise ValueError(f"resample must be 'nearest' or 'shuffle', got {self.resample!r}")

    @property
    def downscale(self) -> int:
        return 8


ModelConfig = KLConfig | TinyConfig

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
