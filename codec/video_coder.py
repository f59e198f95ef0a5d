"""Frames <-> latents for a causal video VAE (Wan family), streamed and spatially tiled.

``VideoEncoder``: uint8 frames (n, H, W, 3) in clip order, any n per call -> normalized latents
(n', C, H8/s, W8/s) float32 as they complete (the first frame gives one latent frame, then every
4 frames one more). ``finish()`` pads the clip's end by repeating its last frame up to the frame
rule T = 1 + 4k, returns the last latents and records the padding in ``pad_frames``.
``VideoDecoder``: latent frames in order -> uint8 frames, emitted as each latent frame is decoded,
cropped to the source size; the recorded end padding is dropped.

The causal caches carry everything between calls, so memory does not grow with the clip. A frame
that does not fit the memory budget is cut into tiles aligned to the latent grid, each with its own
causal cache, blended in space with the raised-cosine hand-over of :class:`TileLayout`. The RMS
norm is per position, so tiles need no frame statistics; what differs at tile borders is the
zero padding the convolutions see, which the overlap keeps away from each tile's core. Time is
never cut: there are no temporal tiles and so no temporal seams.
"""

from __future__ import annotations

import numpy as np
import torch

import kernels

from .coder import CoderOptions, default_budget, round_up
from .models.video_autoencoder import VideoAutoencoder
from .tiling import TileLayout, TilePlan

TILE_LADDER = (1024, 768, 512, 384, 256, 192, 128, 96, 64)  # px


def memory_bytes(model: VideoAutoencoder, tile_px: int, tiles_px: int) -> int:
    """Estimated peak bytes: the causal caches of every tile (``tiles_px`` pixels in all; two frames
    of the input of each full-resolution conv dominate), plus one model call on a ``tile_px``-pixel
    tile (4 frames in, or 4 out, at the widest full-resolution width, a few tensors alive)."""
    cfg = model.config
    item = torch.tensor([], dtype=model.dtype).element_size()
    width = max(cfg.base_dim, cfg.decoder_dim * cfg.dim_mult[0]) / cfg.patch_size**2  # per pixel
    convs = 2 * (cfg.num_res_blocks + 1) + 2  # full-resolution causal convs, decoder side
    cache = tiles_px * width * item * 2 * convs * 2  # encoder and decoder caches alike
    call = tile_px * width * item * model.temporal_factor * 6
    return int(cache + call)


def plan_video_tiles(model: VideoAutoencoder, h8: int, w8: int, options: CoderOptions) -> TilePlan:
    """Whole frames when they fit the budget, else the largest tile of the ladder that does."""
    s = model.downscale
    if str(options.cache) not in ("exact", "off") or options.refresh is not None:
        raise ValueError(f"--cache {options.cache} / --refresh do not apply to the video VAE {model.name}: its causal "
                         "caches carry time (every frame is coded, nothing is reused)")
    if options.norm == "global":
        raise ValueError(f"--norm global does not apply to {model.name}: its RMS norm is per position")
    for name, v in (("tile", options.tile), ("overlap", options.overlap)):
        if v is not None and (v <= 0 and name == "tile" or v < 0 or v % s):
            raise ValueError(f"--{name} must be a {'positive' if name == 'tile' else 'non-negative'} "
                             f"multiple of {s} px for {model.name}, got {v}")
    budget = options.max_memory or default_budget(model.device)

    def overlap_for(tile: int) -> int:
        return options.overlap if options.overlap is not None else max(2 * s, tile // 4 // s * s)

    def fits(tile: int | None) -> bool:
        if tile is None:
            return memory_bytes(model, h8 * w8, h8 * w8) <= budget
        layout = _layout(model, h8, w8, tile, overlap_for(tile))
        th, tw = (t * s for t in layout.tile_hw)
        return memory_bytes(model, th * tw, th * tw * len(layout)) <= budget

    if options.tile is None and fits(None):
        return TilePlan(tile=None, overlap=0, batch=1)
    ladder = [options.tile] if options.tile is not None else [t for t in TILE_LADDER if t < max(h8, w8)]
    for tile in ladder:
        if overlap_for(tile) >= tile:
            raise ValueError(f"--overlap ({overlap_for(tile)}) must be smaller than --tile ({tile})")
        if fits(tile):
            return TilePlan(tile=tile, overlap=overlap_for(tile), batch=1)
    raise ValueError(f"the memory budget ({budget / 2**20:.0f} MiB) is too small for {model.name} at "
                     f"{w8}x{h8} (the causal caches alone need about "
                     f"{memory_bytes(model, 0, h8 * w8) / 2**20:.0f} MiB); raise --max-memory")


def _layout(model: VideoAutoencoder, h8: int, w8: int, tile: int | None, overlap: int) -> TileLayout:
    s = model.downscale
    lat = (tile or max(h8, w8)) // s
    return TileLayout(h8 // s, w8 // s, lat, overlap // s)


class _StreamedCoder:
    def __init__(self, model: VideoAutoencoder, height: int, width: int, options: CoderOptions | None):
        if not isinstance(model, VideoAutoencoder):
            raise TypeError(f"expected a VideoAutoencoder, got {type(model).__name__}")
        self.model = model
        self.height, self.width = height, width
        s = model.downscale
        self.h8, self.w8 = round_up(height, s), round_up(width, s)
        self.plan = plan_video_tiles(model, self.h8, self.w8, options or CoderOptions())
        self.layout = _layout(model, self.h8, self.w8, self.plan.tile, self.plan.overlap)
        self.global_norm = False  # RMS norm: nothing frame-wide to gather

    def _tiles(self, x: torch.Tensor, scale: int) -> list[torch.Tensor]:
        """x (1, C, t, H, W) at ``scale`` x latent size -> one crop per tile, row-major."""
        th, tw = (t * scale for t in self.layout.tile_hw)
        return [x[..., y * scale:y * scale + th, x0 * scale:x0 * scale + tw] for y, x0 in self.layout.origins]

    def _blend(self, outs: list[torch.Tensor], scale: int) -> torch.Tensor:
        """Per-tile (1, C, t, th, tw) -> (t, C, H, W) float32."""
        t = outs[0].shape[2]
        if t == 0:
            return outs[0].new_zeros(0, outs[0].shape[1], self.layout.height * scale, self.layout.width * scale)
        tiles = torch.stack([o[0].transpose(0, 1) for o in outs], dim=1).flatten(0, 1)  # frame-major
        return self.layout.blend(tiles, t, scale=scale)


class VideoEncoder(_StreamedCoder):
    """uint8 frames -> normalized latents, streamed (see the module docstring)."""

    def __init__(self, model: VideoAutoencoder, height: int, width: int, options: CoderOptions | None = None):
        super().__init__(model, height, width, options)
        self.streams = [model.encoder_stream() for _ in range(len(self.layout))]
        self.frames_in = 0
        self.pad_frames = 0
        self._last: torch.Tensor | None = None  # the last frame, for the end padding
        self._finished = False

    @property
    def padding(self) -> tuple[int, int]:
        """(pad_bottom, pad_right) in pixels."""
        return self.h8 - self.height, self.w8 - self.width

    @torch.no_grad()
    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """frames (n, H, W, 3) uint8 RGB -> latents (n', C, h, w) float32 on the model's device,
        the latent frames these frames complete (n' may be 0)."""
        if self._finished:
            raise ValueError("the video encoder is finished; start a new one for another clip")
        frames = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (self.height, self.width, 3) or frames.dtype != torch.uint8:
            raise ValueError(f"expected frames (n, {self.height}, {self.width}, 3) uint8, "
                             f"got {tuple(frames.shape)} {frames.dtype}")
        if frames.shape[0] == 0:
            return self._empty()
        frames = frames.to(self.model.device)
        self.frames_in += frames.shape[0]
        self._last = frames[-1:].clone()
        x = kernels.frames_to_input(frames, size=(self.h8, self.w8), dtype=self.model.dtype)
        x = x.transpose(0, 1).unsqueeze(0)  # (1, 3, n, H8, W8)
        outs = [stream(tile) for stream, tile in zip(self.streams, self._tiles(x, self.model.downscale))]
        return self._blend(outs, 1)

    def finish(self) -> torch.Tensor:
        """Pad the end to 1 + 4k frames by repeating the last frame; the remaining latents."""
        if self._finished or self.frames_in == 0:
            self._finished = True
            return self._empty()
        f = self.model.temporal_factor
        pad = (-(self.frames_in - 1)) % f
        out = self(self._last.expand(pad, -1, -1, -1)) if pad else self._empty()
        self.frames_in -= pad
        self.pad_frames = pad
        self._finished = True
        return out

    def _empty(self) -> torch.Tensor:
        s = self.model.downscale
        return torch.zeros(0, self.model.latent_channels, self.h8 // s, self.w8 // s, device=self.model.device)


class VideoDecoder(_StreamedCoder):
    """normalized latents -> uint8 frames cropped to the source size, streamed.

    ``frames``: how many frames the clip had before its end padding (None: keep all).
    """

    def __init__(self, model: VideoAutoencoder, height: int, width: int, options: CoderOptions | None = None,
                 frames: int | None = None):
        super().__init__(model, height, width, options)
        self.streams = [model.decoder_stream() for _ in range(len(self.layout))]
        self.frames_out = 0
        self.limit = frames

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (n', C, h, w), the clip's next latent frames -> frames (n, H, W, 3) uint8 on the
        model's device: 1 for the first latent frame, 4 for each later one, minus the end padding."""
        s = self.model.downscale
        want = (self.model.latent_channels, self.h8 // s, self.w8 // s)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != want:
            raise ValueError(f"expected latents (n, {', '.join(map(str, want))}), got {tuple(latents.shape)}")
        z = latents.to(self.model.device).transpose(0, 1).unsqueeze(0)  # (1, C, n', h, w)
        outs = [stream(tile) for stream, tile in zip(self.streams, self._tiles(z, 1))]
        canvas = self._blend(outs, s)
        if self.limit is not None:
            canvas = canvas[:max(0, self.limit - self.frames_out)]
        self.frames_out += canvas.shape[0]
        if canvas.shape[0] == 0:
            return torch.zeros(0, self.height, self.width, 3, dtype=torch.uint8, device=canvas.device)
        return kernels.output_to_frames(canvas, self.height, self.width)
