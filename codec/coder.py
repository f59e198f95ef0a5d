"""Frames <-> latents for one clip: padding, tiling, batching, the temporal cache, blending.

``FrameEncoder``: uint8 frames (N, H, W, 3) -> latents (N, C, H8/8, W8/8) float32, where H8, W8
are H, W rounded up to the model's factor (the frame is padded by repeating its edge).
``FrameDecoder``: latents (N, C, h, w) -> uint8 frames (N, H, W, 3), cropped to the source size.
Both keep per-position cache state across calls, so feed frames in clip order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import kernels

from .cache import TemporalCache
from .global_norm import GlobalNorm
from .models import Autoencoder
from .models.layers import GroupNormAct
from .sparse_cache import SparseDecoderCache, SparseEncoderCache, Unsupported
from .tiling import TileLayout, TilePlan, activation_bytes, plan_tiles

NORM_MODES = ("auto", "tile", "global")
CACHE_TILE = 256  # px: the tile size a threshold cache uses when no --tile is given


@dataclass
class CoderOptions:
    """tile/overlap in pixels (None: chosen from the budget); max_memory in bytes (None: free
    device memory, or 4 GiB on the CPU); norm: "tile", "global" (GroupNorm models: frame-wide
    statistics, tiled output matches untiled) or "auto" (global when a frame's tiles fit the
    budget in one batch, else per tile); cache:
    "off", "exact" or a threshold in uint8 units; refresh: recompute every tile at least every N frames."""

    tile: int | None = None
    overlap: int | None = None
    batch: int | None = None
    max_memory: int | None = None
    norm: str = "auto"
    cache: str | float = "exact"
    refresh: int | None = None

    def __post_init__(self):
        if self.norm not in NORM_MODES:
            raise ValueError(f"--norm must be one of {', '.join(NORM_MODES)}, got {self.norm!r}")
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")


def default_budget(device: torch.device) -> int:
    """Bytes a model call may use: 70% of free device memory on CUDA, 4 GiB on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7)
    return 4 << 30


def round_up(v: int, f: int) -> int:
    return -(-v // f) * f


def pad_edge(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H, W, C) -> (N, height, width, C), repeating the last row/column (any dtype)."""
    n, h, w, c = frames.shape
    if (h, w) == (height, width):
        return frames
    rows = torch.cat([frames, frames[:, -1:].expand(n, height - h, w, c)], dim=1) if height > h else frames
    return torch.cat([rows, rows[:, :, -1:].expand(n, height, width - w, c)], dim=2) if width > w else rows


class _TiledCoder:
    """What encoder and decoder share: plan, layout, cache, global-norm replay, statistics."""

    def __init__(self, model: Autoencoder, height: int, width: int, options: CoderOptions, unit: float,
                 decode: bool):
        self.model, self.options = model, options
        f = model.downscale
        self.height, self.width = height, width  # source pixels
        self.h8, self.w8 = round_up(height, f), round_up(width, f)
        budget = options.max_memory or default_budget(model.device)
        self.cache = TemporalCache(options.cache, options.refresh, unit=unit)
        # A threshold cache on a whole frame runs the per-layer sparse cache when the model allows
        # it (tiny and KL families) and its activations fit the budget; `exact` stays with
        # the tile cache: packed convs round differently from the dense conv, exact must not.
        self.sparse = None
        if self.cache.threshold and options.tile is None:
            try:
                self.sparse = self._sparse_cache()
            except Unsupported:
                pass
            if self.sparse is not None and self.sparse.net.memory_bytes(model.dtype.itemsize) > budget:
                self.sparse = None
        tile = options.tile
        if tile is None and self.sparse is None and self.cache.threshold and max(self.h8, self.w8) > CACHE_TILE:
            tile = CACHE_TILE  # a threshold cache works per tile: whole frames rarely stay still
        self.plan: TilePlan = plan_tiles(model, self.h8, self.w8, budget, model.dtype, decode=decode,
                                         batch=options.batch, tile=tile, overlap=options.overlap)
        lat_tile = (self.plan.tile or max(self.h8, self.w8)) // f
        self.layout = TileLayout(self.h8 // f, self.w8 // f, lat_tile, self.plan.overlap // f)
        has_norm = any(isinstance(m, GroupNormAct) for m in model.modules())
        frame_tiles = len(self.layout) * lat_tile**2 * f * f  # pixels of a frame's tiles in one batch
        tiles_fit = activation_bytes(model, frame_tiles, model.dtype, decode) <= budget
        self.global_norm = has_norm and not self.layout.is_whole_frame and (
            options.norm == "global" or (options.norm == "auto" and tiles_fit))
        self._gn: GlobalNorm | None = None
        self._anchor_stats: torch.Tensor | None = None  # frame stats when the GN stats were recorded

    @property
    def stats(self):
        return self.sparse.stats if self.sparse is not None else self.cache.stats

    def _run(self, fn, x: torch.Tensor) -> torch.Tensor:
        """fn over x in chunks of the planned batch."""
        if x.shape[0] == 0:
            return x.new_empty(0)
        return torch.cat([fn(x[i:i + self.plan.batch]) for i in range(0, x.shape[0], self.plan.batch)])

    def _code(self, tiles: torch.Tensor, frames: int, fn, prepare, frame_stats) -> torch.Tensor:
        """tiles (N*K, ...) cache units -> per-tile results (N*K, ...) via the cache and
        ``fn(x, norm=...)`` (the model's encode or decode)."""
        k = len(self.layout)
        grouped = tiles.view(frames, k, *tiles.shape[1:])
        if not self.global_norm:
            compute, source = self.cache.schedule(grouped)
            out = self._run(fn, prepare(tiles[compute]))
            result = self.cache.gather(source, out)
            self.cache.commit(out)
            return result
        # Global statistics: one frame at a time, all its tiles in one batch.
        if self._gn is None:
            self._gn = GlobalNorm(self.layout.core_boxes(), self.layout.tile_hw)
        results = []
        for t in range(frames):
            stats = frame_stats(t) if self.cache.enabled else None  # compared only for replay
            tol = self.cache.threshold
            # Replay recorded frame statistics only while this frame's statistics stay within the
            # cache threshold of the frame that produced them; in exact mode only for an identical frame.
            replay = (self.cache.enabled and self._anchor_stats is not None
                      and (stats - self._anchor_stats).abs().max().item() <= tol)
            if replay and tol == 0:
                replay = bool(self.cache.hits(grouped[t]).all())
            compute, source = self.cache.schedule(grouped[t:t + 1], force=not replay)
            if replay:  # the recorded statistics, per layer: any tiles, in batches of any size
                out = self._run(lambda x: fn(x, norm=self._gn.replay), prepare(grouped[t][compute]))
            else:  # fresh statistics from the whole frame: every tile in one batch
                out = fn(prepare(grouped[t]), norm=self._gn.measure)
                self._anchor_stats = stats
            results.append(self.cache.gather(source, out))
            self.cache.commit(out)
        return torch.cat(results)


class FrameEncoder(_TiledCoder):
    """uint8 frames -> scaled latents, tiled and cached (see module docstring)."""

    def __init__(self, model: Autoencoder, height: int, width: int, options: CoderOptions | None = None):
        super().__init__(model, height, width, options or CoderOptions(), unit=1.0, decode=False)

    def _sparse_cache(self) -> SparseEncoderCache:
        prepare = lambda t: kernels.frames_to_input(t, dtype=self.model.dtype, channels_last=True)  # noqa: E731
        return SparseEncoderCache(self.model, self.h8, self.w8, self.options.cache, self.options.refresh, prepare)

    @property
    def padding(self) -> tuple[int, int]:
        """(pad_bottom, pad_right) in pixels."""
        return self.h8 - self.height, self.w8 - self.width

    @torch.no_grad()
    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """frames (N, H, W, 3) uint8 RGB -> latents (N, C, H8/8, W8/8) float32 on the model's device."""
        frames = _to_device(frames, self.model.device)
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != torch.uint8:
            raise ValueError(f"expected frames ({'N'}, {self.height}, {self.width}, 3) uint8, "
                             f"got {tuple(frames.shape)} {frames.dtype}")
        n = frames.shape[0]
        padded = pad_edge(frames, self.h8, self.w8)
        if self.sparse is not None:
            return self.sparse(padded).float()
        tiles = self.layout.extract(padded, scale=self.model.downscale, channels_last=True)
        def prepare(t: torch.Tensor) -> torch.Tensor:
            # channels_last on every device: cuDNN and oneDNN convolutions are fastest in NHWC
            # (measured on this CPU: 1701 -> 1343 ms per 640x360 encode, 1 thread).
            return kernels.frames_to_input(t, dtype=self.model.dtype, channels_last=True)

        def frame_stats(t: int) -> torch.Tensor:  # per-channel mean and std, uint8 units
            f = padded[t].float()
            return torch.cat([f.mean((0, 1)), f.std((0, 1))])

        latents = self._code(tiles, n, self.model.encode, prepare, frame_stats)
        return self.layout.blend(latents, n, scale=1)


class FrameDecoder(_TiledCoder):
    """scaled latents -> uint8 frames cropped to the source size, tiled and cached."""

    def __init__(self, model: Autoencoder, height: int, width: int, options: CoderOptions | None = None):
        super().__init__(model, height, width, options or CoderOptions(), unit=127.5, decode=True)

    def _sparse_cache(self) -> SparseDecoderCache:
        f = self.model.downscale
        return SparseDecoderCache(self.model, self.h8 // f, self.w8 // f, self.options.cache, self.options.refresh)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (N, C, H8/8, W8/8) -> frames (N, H, W, 3) uint8 on the model's device."""
        f = self.model.downscale
        latents = latents.to(self.model.device)
        want = (self.model.latent_channels, self.h8 // f, self.w8 // f)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != want:
            raise ValueError(f"expected latents (N, {', '.join(map(str, want))}), got {tuple(latents.shape)}")
        n = latents.shape[0]
        if self.sparse is not None:
            return kernels.output_to_frames(self.sparse(latents), self.height, self.width)
        tiles = self.layout.extract(latents, scale=1)

        def prepare(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.model.dtype).contiguous(memory_format=torch.channels_last)  # see FrameEncoder

        def frame_stats(t: int) -> torch.Tensor:  # per-channel mean and std, in threshold units
            z = latents[t].float() * self.cache.unit
            return torch.cat([z.mean((1, 2)), z.std((1, 2))])

        images = self._code(tiles, n, self.model.decode, prepare, frame_stats)
        canvas = self.layout.blend(images, n, scale=f)
        return kernels.output_to_frames(canvas, self.height, self.width)


def _to_device(frames: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
