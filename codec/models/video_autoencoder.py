"""One interface for the causal video VAEs (Wan family): clips in [-1,1] <-> normalized latents.

Latents are normalized per channel, ``(z - latents_mean) / latents_std``, the form the Wan
transformers consume. A clip of T = 1 + 4k frames gives T' = 1 + k latent frames and back.
"""

from __future__ import annotations

import torch

from .autoencoder import ModelFacts
from .config import WanConfig
from .wan import State, WanNetwork


class VideoAutoencoder(ModelFacts, WanNetwork):
    """``encode``: x (N, 3, T, H, W) float in [-1, 1], T = 1 + 4k, H and W multiples of
    ``downscale`` -> z (N, C, 1 + k, H/s, W/s) float32 normalized latents (the mode, or a sample).
    ``decode``: z -> (N, 3, 1 + 4(T' - 1), H, W) float32 in [-1, 1] (clamped).

    Streaming: ``encoder_stream()`` / ``decoder_stream()`` return callables that take the next
    chunk of a clip (any number of frames) and return what it completes; the causal caches carry
    the state between chunks, so the result does not depend on how the clip is cut.
    """

    def __init__(self, cfg: WanConfig):
        if not isinstance(cfg, WanConfig):
            raise TypeError(f"expected a WanConfig, got {type(cfg).__name__}")
        super().__init__(cfg)  # encoder, decoder, quant convs: the diffusers names, no prefix
        self.fp32_fallbacks = 0  # read by the pipeline's report; the Wan VAEs run fine in half precision
        self.source, self.model_id, self.weights_sha256 = ModelFacts.UNLOADED

    temporal_factor = property(lambda self: self.config.temporal_factor)

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
        (N, C, t', H/s, W/s) float32 for the latent frames completed so far (t' may be 0).

        The network always runs on the same pieces, the first frame and then each complete group
        of ``temporal_factor`` frames (the others wait here), so however a clip is cut the result
        is bit-identical and one call's memory does not grow with the chunk.
        """
        state: State = {}
        waiting: list[torch.Tensor] = []  # frames of an incomplete group
        started = False

        @torch.no_grad()
        def step(x: torch.Tensor) -> torch.Tensor:
            nonlocal started
            self._check(x, 3, "x")
            s, f = self.downscale, self.temporal_factor
            if x.shape[3] % s or x.shape[4] % s:
                raise ValueError(f"{self.name}: frame size {x.shape[4]}x{x.shape[3]} is not a multiple of {s}")
            waiting.append(x)
            frames = torch.cat(waiting, dim=2)
            pieces = []
            if not started:
                pieces, frames, started = [frames[:, :, :1]], frames[:, :, 1:], True
            full = frames.shape[2] // f * f
            pieces += [frames[:, :, i:i + f] for i in range(0, full, f)]
            waiting[:] = [frames[:, :, full:].clone()] if frames.shape[2] > full else []
            if not pieces:
                return x.new_zeros(x.shape[0], self.latent_channels, 0, x.shape[3] // s, x.shape[4] // s,
                                   dtype=torch.float32, device=self.device)
            mu, std = self.latent_stats(self.device)  # once per call, not per piece: a host-to-device copy
            return (torch.cat([self._encode_piece(p, state, sample, generator) for p in pieces], dim=2) - mu) / std

        return step

    def _encode_piece(self, x: torch.Tensor, state: State, sample: bool, generator) -> torch.Tensor:
        mean, logvar = (m.float() for m in self.encode_moments(x.to(self.device, self.dtype), state))
        self._check_finite(mean)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def decoder_stream(self):
        """A callable: z (N, C, t', h, w), the next t' >= 1 normalized latent frames -> (N, 3, t, H, W)
        float32 in [-1, 1]: 1 frame for the clip's first latent frame, ``temporal_factor`` per later
        one. The network runs one latent frame at a time (bit-identical for any cut)."""
        state: State = {}

        @torch.no_grad()
        def step(z: torch.Tensor) -> torch.Tensor:
            self._check(z, self.latent_channels, "z")
            mu, std = self.latent_stats(z.device)
            z = (z.float() * std + mu).to(self.device, self.dtype)
            out = torch.cat([self.decode_latents(z[:, :, i:i + 1], state).float() for i in range(z.shape[2])],
                            dim=2)
            self._check_finite(out)
            return out

        return step

    # ---- whole clips ----------------------------------------------------------------------
    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """A whole clip of 1 + 4k frames (memory independent of its length: see ``encoder_stream``)."""
        self._check(x, 3, "x")
        t, f = x.shape[2], self.temporal_factor
        if (t - 1) % f:
            raise ValueError(f"{self.name}: expected 1 + {f}k frames, got {t} (pad the clip's end first)")
        return self.encoder_stream(sample, generator)(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """A whole latent clip (one latent frame at a time)."""
        return self.decoder_stream()(z)

    def _check_finite(self, t: torch.Tensor) -> None:
        # A stream cannot be recomputed in fp32 halfway (its caches hold half-precision state).
        if self.dtype == torch.float16 and not torch.isfinite(t).all():
            raise ValueError(f"{self.name}: non-finite values in float16; run it in bfloat16 or float32 (--dtype)")

    def _check(self, t: torch.Tensor, channels: int, what: str) -> None:
        if t.ndim != 5 or t.shape[1] != channels or t.shape[2] < 1:
            raise ValueError(f"{self.name}: expected {what} shaped (N,{channels},T,H,W) with T >= 1, "
                             f"got {tuple(t.shape)}")
