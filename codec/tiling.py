"""Tiles aligned to the latent grid: layout, extraction, blending, and sizing from a memory budget.

A layout is defined in latent units; pixel tiles are ``factor`` (8) times larger, so a pixel tile
and its latent tile cover exactly the same region. Neighbouring tiles overlap; the cut between
them runs through the middle of the overlap, so each tile's core has about overlap/2 of context
(margin) on every inner side, which its receptive field reads. Results are blended with a narrow
raised-cosine hand-over at each cut, so no seam shows, and the least accurate tile borders get
no weight. All tiles of a layout have one size, so tiles of several frames and positions go
through the model as one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import kernels

LATENT_MIN_TILE = 4  # latent pixels; smaller tiles see too little context to be useful


def _ramp(t: torch.Tensor) -> torch.Tensor:
    """0 -> 1 raised cosine over t in [0, 1] (clamped outside)."""
    return 0.5 - 0.5 * torch.cos(math.pi * t.clamp(0, 1))


def axis_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering [0, size), neighbours overlapping by
    at least ``overlap``; the last tile ends exactly at ``size``."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    # Spread the starts evenly so every overlap is at least the asked one.
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


@dataclass
class TileLayout:
    """Tiles over a (height, width) latent canvas. ``tile``/``overlap`` in latent pixels."""

    height: int
    width: int
    tile: int
    overlap: int
    ys: list[int] = field(init=False)
    xs: list[int] = field(init=False)

    def __post_init__(self):
        if self.tile < 1 or self.overlap < 0:
            raise ValueError(f"expected tile >= 1 and overlap >= 0 (latent px), got {self.tile}, {self.overlap}")
        if self.overlap >= self.tile:
            raise ValueError(f"overlap ({self.overlap * 8} px) must be smaller than the tile ({self.tile * 8} px)")
        self.ys = axis_starts(self.height, self.tile, self.overlap)
        self.xs = axis_starts(self.width, self.tile, self.overlap)

    @property
    def tile_hw(self) -> tuple[int, int]:
        return min(self.tile, self.height), min(self.tile, self.width)

    @property
    def origins(self) -> list[tuple[int, int]]:
        """(y, x) of every tile, row-major, latent units."""
        return [(y, x) for y in self.ys for x in self.xs]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def is_whole_frame(self) -> bool:
        return len(self) == 1

    def core_boxes(self) -> list[tuple[int, int, int, int]]:
        """Per tile, the region it owns (y0, y1, x0, x1) relative to the tile, latent units: the
        tiles' cores partition the canvas (cuts in the middle of each overlap)."""
        th, tw = self.tile_hw

        def cuts(starts: list[int], t: int, size: int) -> list[tuple[int, int]]:
            edges = [0] + [(starts[i] + t + starts[i + 1]) // 2 for i in range(len(starts) - 1)] + [size]
            return [(edges[i] - s, edges[i + 1] - s) for i, s in enumerate(starts)]

        rows, cols = cuts(self.ys, th, self.height), cuts(self.xs, tw, self.width)
        return [(r0, r1, c0, c1) for (r0, r1) in rows for (c0, c1) in cols]

    def windows(self, scale: int, device=None) -> torch.Tensor:
        """(K, th*scale, tw*scale) float32 blend weights for tiles at ``scale`` x latent size.

        Each tile is weighted ~1 over its core and ~0 near its edges, where missing context makes
        it least accurate; across each cut between two cores a raised-cosine ramp of
        ``blend_width`` hands over from one tile to the next (the two ramps sum to 1), hiding any seam.
        """
        th, tw = self.tile_hw
        b = self.blend_width * scale

        def profile(n: int, lo: int, hi: int) -> torch.Tensor:
            i = torch.arange(n, dtype=torch.float64) + 0.5
            p = torch.ones(n, dtype=torch.float64)
            if lo > 0:
                p = p * _ramp((i - (lo * scale - b / 2)) / b)
            if hi < n // scale:
                p = p * _ramp(((hi * scale + b / 2) - i) / b)
            return p.clamp_min(1e-6)  # never exactly 0: every pixel stays covered

        out = [torch.outer(profile(th * scale, y0, y1), profile(tw * scale, x0, x1))
               for (y0, y1, x0, x1) in self.core_boxes()]
        return torch.stack(out).to(device=device, dtype=torch.float32)

    @property
    def blend_width(self) -> int:
        """Width of the hand-over ramp at each cut, latent pixels: half the overlap."""
        return max(1, self.overlap // 2)

    def extract(self, frames: torch.Tensor, scale: int, channels_last: bool = False) -> torch.Tensor:
        """Tiles of every frame, frame-major: frames (N,C,H,W) or, with ``channels_last``,
        (N,H,W,C) at ``scale`` x latent size -> (N*K, C, th, tw) or (N*K, th, tw, C)."""
        th, tw = (t * scale for t in self.tile_hw)
        crops = []
        for y, x in self.origins:
            y, x = y * scale, x * scale
            crops.append(frames[:, y:y + th, x:x + tw] if channels_last else frames[..., y:y + th, x:x + tw])
        return torch.stack(crops, dim=1).flatten(0, 1)

    def blend(self, tiles: torch.Tensor, frames: int, scale: int, windows: torch.Tensor | None = None) -> torch.Tensor:
        """tiles (N*K, C, th*scale, tw*scale), frame-major -> (N, C, H*scale, W*scale) float32."""
        if self.is_whole_frame:
            return tiles.float()
        if windows is None:  # computed once per scale and device, not per batch
            key = (scale, tiles.device)
            cached = self.__dict__.setdefault("_windows", {})
            if key not in cached:
                cached[key] = self.windows(scale, device=tiles.device)
            windows = cached[key]
        k = len(self)
        origins = torch.tensor([(f, y * scale, x * scale) for f in range(frames) for y, x in self.origins],
                               dtype=torch.int64, device=tiles.device)
        window = windows.repeat(frames, 1, 1) if windows.dim() == 3 and windows.shape[0] == k else windows
        return kernels.blend_tiles(tiles, origins, window,
                                   (frames, tiles.shape[1], self.height * scale, self.width * scale))


# ---- sizing from a memory budget ---------------------------------------------------------------

def activation_bytes(model, pixels: int, dtype: torch.dtype, decode: bool) -> int:
    """Peak activation memory of one image of ``pixels`` pixels through ``model`` (an estimate
    from the architecture: the widest full-resolution activations that are alive at once, plus
    the attention matrix of the mid block, which grows with the square of the tile area)."""
    item = torch.tensor([], dtype=dtype).element_size()
    cfg = model.config
    if cfg.family == "kl":
        full = cfg.block_out_channels[0]  # widest full-resolution stage, encoder and decoder alike
        live = 6  # input, norm out, conv out, residual, shortcut, workspace
        tokens = pixels // (model.downscale**2)
        # The CPU's attention may materialize the (tokens x tokens) fp32 matrix; CUDA's does not.
        on_cpu = model.device.type == "cpu"
        attn = tokens * tokens * 4 if cfg.mid_block_add_attention and on_cpu else 0
        return int(pixels * full * item * live + attn)
    live = 4  # input, conv out, residual, workspace
    return int(pixels * cfg.width * item * live)


@dataclass(frozen=True)
class TilePlan:
    """tile/overlap in pixels (None tile = whole frames); batch = images per model call."""

    tile: int | None
    overlap: int
    batch: int


def plan_tiles(model, height: int, width: int, budget_bytes: int, dtype: torch.dtype, batch: int | None = None,
               tile: int | None = None, overlap: int | None = None) -> TilePlan:
    """Choose tile and batch sizes so a model call fits ``budget_bytes``.

    Whole frames when one fits, else the largest tile from a ladder of sizes that does. Explicit
    ``tile``/``overlap``/``batch`` are checked and kept. Sizes in pixels, multiples of 8.
    """
    f = model.downscale
    for name, v in (("tile", tile), ("overlap", overlap)):
        if v is not None and (v < 0 or v % f):
            raise ValueError(f"--{name} must be a non-negative multiple of {f} px, got {v}")
    if tile is not None and tile < LATENT_MIN_TILE * f:
        raise ValueError(f"--tile must be at least {LATENT_MIN_TILE * f} px, got {tile}")
    if tile is not None and overlap is not None and overlap >= tile:
        raise ValueError(f"--overlap ({overlap}) must be smaller than --tile ({tile})")
    if budget_bytes <= 0:
        raise ValueError(f"the memory budget must be positive, got {budget_bytes} bytes")

    def cost(t_h: int, t_w: int) -> int:
        return max(activation_bytes(model, t_h * t_w, dtype, decode=True),
                   activation_bytes(model, t_h * t_w, dtype, decode=False))

    if tile is None and cost(height, width) <= budget_bytes:
        chosen = None
        per = cost(height, width)
    else:
        ladder = [tile] if tile is not None else [t for t in (1024, 768, 512, 384, 256, 192, 128, 96, 64)
                                                   if t < max(height, width)]
        chosen = next((t for t in ladder if cost(min(t, height), min(t, width)) <= budget_bytes), None)
        if chosen is None:
            smallest = ladder[-1] if ladder else tile
            need = cost(min(smallest, height), min(smallest, width))
            raise ValueError(f"the memory budget ({budget_bytes / 2**20:.0f} MiB) is too small for one "
                             f"{smallest}x{smallest} tile (needs about {need / 2**20:.0f} MiB)")
        per = cost(min(chosen, height), min(chosen, width))
    if overlap is None:
        overlap = 0 if chosen is None else max(f * 4, (chosen // 4) // f * f)
    fits = max(1, budget_bytes // max(per, 1))
    return TilePlan(tile=chosen, overlap=overlap, batch=int(batch or min(fits, 16)))
