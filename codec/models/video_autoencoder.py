"""One interface for the causal video VAEs (Wan family): clips in [-1,1] <-> normalized latents.

Latents are normalized per channel, ``(z - latents_mean) / latents_std``, the form the Wan
transformers consume. A clip of T = 1 + 4k frames gives T' = 1 + k latent frames and back.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import WanConfig
from .wan import State, WanNetwork


class VideoAutoencoder(nn.Module):
    """``encode``: x (N, 3, T, H, W) float in [-1, 1], T = 1 + 4k, H and W multiples of
    ``downscale`` -> z (N, C, 1 + k, H/s, W/s) float32 normalized latents (the mode, or a sample).
    ``decode``: z -> (N, 3, 1 + 4(T' - 1), H, W) float32 in [-1, 1] (clamped).

    Streaming: ``encoder_stream()`` / ``decoder_stream()`` return callables that take the next
    chunk of a clip (any number of frames) and return what it completes; the causal caches carry
    the state between chunks, so the result does not depend on how the clip is cut.
    """

    def __init__(self, cfg: WanConfig):
        super().__init__()
        if not isinstance(cfg, WanConfig):
            raise TypeError(f"expected a WanConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.net = WanNetwork(cfg)
        self.fp32_fallbacks = 0  # read by the pipeline's report; the Wan VAEs run fine in half precision
        self.source = "untrained"

    name = property(lambda self: self.config.name)
    family = property(lambda self: self.config.family)
    latent_channels = property(lambda self: self.config.latent_channels)
    downscale = property(lambda self: self.config.downscale)
    temporal_factor = property(lambda self: self.config.temporal_factor)
    scaling_factor = property(lambda self: self.config.scaling_factor)
    shift_factor = property(lambda self: self.config.shift_factor)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def latent_stats(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) as float32 (1, C, 1, 1, 1) tensors."""
        c = self.latent_channels
        mean = self.config.latents_mean or (0.0,) * c
        std = self.config.latents_std or (1.0,) * c
        shape = (1, c, 1, 1, 1)
        return (torch.tensor(mean, device=device).view(shape), torch.tensor(std, device=device).view(shape))

    def num_latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.temporal_factor

    def num_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_factor * (latent_frames - 1)

    # ---- streams ------------------------------------------------------------------------
    def encoder_stream(self, sample: bool = False, generator: torch.Generator | None = None):
        """A callable: x (N, 3, t, H, W) in [-1, 1], the next t >= 1 frames -> normalized latents
        (N, C, t', H/s, W/s) float32 for the latent frames completed so far (t' may be 0)."""
        state: State = {}

        @torch.no_grad()
        def step(x: torch.Tensor) -> torch.Tensor:
            self._check(x, 3, "x")
            s = self.downscale
            if x.shape[3] % s or x.shape[4] % s:
                raise ValueError(f"{self.name}: frame size {x.shape[4]}x{x.shape[3]} is not a multiple of {s}")
            moments = self.net.encode_moments(x.to(self.device, self.dtype), state)
            if moments is None:
                return x.new_zeros(x.shape[0], self.latent_channels, 0, x.shape[3] // s, x.shape[4] // s,
                                   dtype=torch.float32, device=self.device)
            mean, logvar = (m.float() for m in moments)
            z = mean
            if sample:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
                z = mean + torch.exp(0.5 * logvar) * noise
            mu, std = self.latent_stats(z.device)
            return (z - mu) / std

        return step

    def decoder_stream(self):
        """A callable: z (N, C, t', h, w), the next t' >= 1 normalized latent frames -> (N, 3, t, H, W)
        float32 in [-1, 1]: 1 frame for the clip's first latent frame, ``temporal_factor`` per later one."""
        state: State = {}

        @torch.no_grad()
        def step(z: torch.Tensor) -> torch.Tensor:
            self._check(z, self.latent_channels, "z")
            mu, std = self.latent_stats(z.device)
            z = z.float() * std + mu
            return self.net.decode_latents(z.to(self.device, self.dtype), state).float()

        return step

    # ---- whole clips ----------------------------------------------------------------------
    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """A whole clip, fed in chunks of 1 then 4 frames (memory independent of its length)."""
        self._check(x, 3, "x")
        t, f = x.shape[2], self.temporal_factor
        if (t - 1) % f:
            raise ValueError(f"{self.name}: expected 1 + {f}k frames, got {t} (pad the clip's end first)")
        step = self.encoder_stream(sample, generator)
        bounds = [0, 1, *range(1 + f, t + 1, f)]
        return torch.cat([step(x[:, :, a:b]) for a, b in zip(bounds, bounds[1:])], dim=2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """A whole latent clip, one latent frame at a time."""
        self._check(z, self.latent_channels, "z")
        step = self.decoder_stream()
        return torch.cat([step(z[:, :, i:i + 1]) for i in range(z.shape[2])], dim=2)

    def _check(self, t: torch.Tensor, channels: int, what: str) -> None:
        if t.ndim != 5 or t.shape[1] != channels or t.shape[2] < 1:
            raise ValueError(f"{self.name}: expected {what} shaped (N,{channels},T,H,W) with T >= 1, "
                             f"got {tuple(t.shape)}")
