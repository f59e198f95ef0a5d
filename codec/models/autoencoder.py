"""One interface over both families: images in [-1,1] <-> scaled latents."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .config import KLConfig, ModelConfig, TinyConfig
from .kl import Decoder, Encoder
from .layers import Normalizer, frame_normalizer
from .tiny import tiny_decoder, tiny_encoder


class ModelFacts:
    """What the rest of the codec reads of a model of any family (a mixin over ``nn.Module``):
    the config's name, family, channels, factors, and the parameters' dtype and device.

    The loader sets ``source`` (where the weights came from), ``model_id`` (the portable identity
    that reloads them: ``default``, a preset, an absolute path; None for a model not loaded from
    weights) and ``weights_sha256`` (the content hash of the weights as loaded, see ``identity``).
    """

    UNLOADED = ("untrained", None, None)  # source, model_id, weights_sha256 before any loader ran

    name = property(lambda self: self.config.name)
    family = property(lambda self: self.config.family)
    latent_channels = property(lambda self: self.config.latent_channels)
    downscale = property(lambda self: self.config.downscale)
    scaling_factor = property(lambda self: self.config.scaling_factor)
    shift_factor = property(lambda self: self.config.shift_factor)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class Autoencoder(ModelFacts, nn.Module):
    """An image autoencoder with the latent conventions of the diffusion model it serves.

    ``encode``: x (N,3,H,W) float in [-1,1], H and W multiples of ``downscale`` ->
    z (N,C,H/8,W/8) scaled latents, ``(mode - shift) * scaling`` (or a sample with ``sample=True``).
    ``decode``: scaled latents -> (N,3,H,W) float, nominally [-1,1] (not clamped).

    On half precision a batch whose result is not finite (SDXL's VAE overflows in fp16) is
    recomputed in fp32 and returned in fp32; the first time this warns, and ``fp32_fallbacks``
    counts such batches (reported by the pipeline).

    ``norm``: a frame normalizer (``codec.global_norm.GlobalNorm.measure`` or ``.replay``) that
    supplies the statistics of every GroupNorm layer for this call only (see ``layers``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # One layout for both families: state-dict keys are the diffusers names (KL) or the
        # TAESD names (tiny), so checkpoints load without renaming.
        self.quant_conv = self.post_quant_conv = None
        if isinstance(cfg, KLConfig):
            c = cfg.latent_channels
            self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
            if cfg.use_quant_conv:
                self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
            if cfg.use_post_quant_conv:
                self.post_quant_conv = nn.Conv2d(c, c, 1)
        elif isinstance(cfg, TinyConfig):
            self.encoder, self.decoder = tiny_encoder(cfg), tiny_decoder(cfg)
        else:
            raise TypeError(f"expected a KLConfig or TinyConfig, got {type(cfg).__name__}")
        self.fp32_fallbacks = 0
        self.source, self.model_id, self.weights_sha256 = ModelFacts.UNLOADED

    # ---- raw passes (unscaled, no fallback) ---------------------------------------------
    def _encode_raw(self, x: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        if self.family == "tiny":
            return self.encoder((x + 1) / 2)
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        if self.family == "tiny":
            return self.decoder(z) * 2 - 1
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # ---- public -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               *, norm: Normalizer | None = None) -> torch.Tensor:
        self._check_input(x, 3, "x")
        z = self._with_fallback(lambda m, t: m._encode_raw(t, sample, generator), x, norm)
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, norm: Normalizer | None = None) -> torch.Tensor:
        self._check_input(z, self.latent_channels, "z")
        z = z / self.scaling_factor + self.shift_factor
        return self._with_fallback(lambda m, t: m._decode_raw(t), z, norm)

    @torch.no_grad()
    def encode_unchecked(self, x: torch.Tensor, *, norm: Normalizer | None = None) -> torch.Tensor:
        """:meth:`encode` (mode, no sampling) in the model's dtype without the finiteness check,
        so nothing waits for the device. The caller checks the result where it reads it anyway
        and recomputes non-finite batches in float32 (``fp32_twin``, ``note_fp32_fallback``)."""
        self._check_input(x, 3, "x")
        with frame_normalizer(norm, self):
            z = self._encode_raw(x.to(self.dtype), False, None)
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode_unchecked(self, z: torch.Tensor, *, norm: Normalizer | None = None) -> torch.Tensor:
        """:meth:`decode` without the finiteness check (see :meth:`encode_unchecked`)."""
        self._check_input(z, self.latent_channels, "z")
        z = z / self.scaling_factor + self.shift_factor
        with frame_normalizer(norm, self):
            return self._decode_raw(z.to(self.dtype))

    def note_fp32_fallback(self, stacklevel: int = 3) -> None:
        """Count a batch recomputed in float32; the first one warns."""
        if self.fp32_fallbacks == 0:
            warnings.warn(f"{self.name}: non-finite values in {self.dtype}; recomputing in float32 "
                          "(expected for the SDXL VAE in fp16)", RuntimeWarning, stacklevel=stacklevel + 1)
        self.fp32_fallbacks += 1

    def _check_input(self, t: torch.Tensor, channels: int, what: str) -> None:
        if t.ndim != 4 or t.shape[1] != channels:
            raise ValueError(f"{self.name}: expected {what} shaped (N,{channels},H,W), got {tuple(t.shape)}")

    def _with_fallback(self, fn, t: torch.Tensor, norm: Normalizer | None) -> torch.Tensor:
        with frame_normalizer(norm, self):
            out = fn(self, t.to(self.dtype))
        if self.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(out).all():
            self.note_fp32_fallback(stacklevel=3)
            twin = self.fp32_twin()
            # The twin's layers have the model's names, so a normalizer's statistics carry over.
            with frame_normalizer(norm, twin):
                out = fn(twin, t.float())  # kept in fp32: it may not fit fp16
        return out

    def fp32_twin(self) -> Autoencoder:
        """A float32 copy of this model (made once) for the fallback."""
        # Kept outside the module tree so it is neither saved nor moved with the model. A plain
        # deep copy: a frame normalizer is passed per call, never stored on the layers.
        twin = self.__dict__.get("_twin")
        if twin is None:
            twin = copy.deepcopy(self).float()
            self.__dict__["_twin"] = twin
        return twin
