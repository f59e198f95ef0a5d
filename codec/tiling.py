"""Tiles aligned to the latent grid: layout, extraction, blending, and sizing from a memory budget.

A layout is defined in latent units; pixel tiles are ``factor`` (8) times larger, so a pixel tile
and its latent tile cover exactly the same region. Neighbouring tiles overlap; the cut between
them runs through the middle of the overlap, so each tile's core has about overlap/2 of context
(margin) on every inner side, which its receptive field reads. Results are blended with a narrow
raised-cosine hand-over at each cut, so no seam shows, and the least accurate tile borders get
no weight. All tiles of a layout have one size (height and width may differ), so tiles of several
frames and positions go through the model as one batch.

:func:`plan_tiles` picks that size from a memory budget: the tile height and width, and so the
tile count per axis, that cover the frame with the fewest computed pixels (the *waste factor*,
pixels of all tiles over the frame's pixels, is 1.0 when no pixel is computed twice).
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
    """Tiles over a (height, width) latent canvas. ``tile``: the tile size in latent pixels, one
    int for square tiles or (tile height, tile width); ``overlap``: the least overlap of two
    neighbours, latent pixels. A tile larger than the canvas is clipped to it (one tile on that axis)."""

    height: int
    width: int
    tile: int | tuple[int, int]
    overlap: int
    ys: list[int] = field(init=False)
    xs: list[int] = field(init=False)

    def __post_init__(self):
        th, tw = (self.tile, self.tile) if isinstance(self.tile, int) else self.tile
        if min(th, tw) < 1 or self.overlap < 0:
            raise ValueError(f"expected tile >= 1 and overlap >= 0 (latent px), got {self.tile}, {self.overlap}")
        # An axis with one tile has no seam, so only a tiled axis needs tiles larger than the overlap.
        if any(self.overlap >= t and t < size for t, size in ((th, self.height), (tw, self.width))):
            raise ValueError(f"overlap ({self.overlap} latent px) must be smaller than the tile ({th}x{tw} latent px)")
        self.ys = axis_starts(self.height, th, self.overlap)
        self.xs = axis_starts(self.width, tw, self.overlap)

    @property
    def tile_hw(self) -> tuple[int, int]:
        """(height, width) of every tile, latent pixels."""
        th, tw = (self.tile, self.tile) if isinstance(self.tile, int) else self.tile
        return min(th, self.height), min(tw, self.width)

    @property
    def covered(self) -> int:
        """Latent pixels of all tiles of one frame: what the model computes per frame."""
        th, tw = self.tile_hw
        return len(self) * th * tw

    @property
    def waste(self) -> float:
        """Pixels of all tiles over the frame's pixels: 1.0 when no pixel is computed twice."""
        return self.covered / (self.height * self.width)

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
        # kept per (scale, frames, device): a new host-to-device copy per call would wait for the device
        origins = self.__dict__.setdefault("_origins", {})
        key = (scale, frames, tiles.device)
        if key not in origins:
            origins[key] = torch.tensor([(f, y * scale, x * scale) for f in range(frames) for y, x in self.origins],
                                        dtype=torch.int64, device=tiles.device)
        origins = origins[key]
        window = windows.repeat(frames, 1, 1) if windows.dim() == 3 and windows.shape[0] == k else windows
        return kernels.blend_tiles(tiles, origins, window,
                                   (frames, tiles.shape[1], self.height * scale, self.width * scale))


# ---- sizing from a memory budget ---------------------------------------------------------------
#
# The estimate walks the model's stages from its config and takes the largest set of activations
# alive at once, in "channels x pixels" at each stage's resolution. What is alive follows eager
# PyTorch: a module's input stays referenced until its call returns, so a stage's input is held
# while its blocks run, and a ResNet block holds its input while its norm/conv outputs come and go.
# Checked against the live tensor bytes measured with a dispatch mode (tests/test_memory_estimate.py).

WORKSPACE = 1.25  # convolution workspaces and allocator rounding on top of the live activations


def _norm_temporaries(dtype: torch.dtype, device: torch.device) -> int:
    """Activations a GroupNorm+act holds besides its input, in units of its width: the Triton
    kernel writes its output only (1); the torch path keeps the norm output and the activation
    (2), in low precision also their fp32 copies (5 units of the half-precision width)."""
    if kernels.use_triton(torch.empty(0, device=device)):
        return 1
    return 2 if dtype == torch.float32 else 5


def _resnet(c_in: int, c_out: int, t: int) -> int:
    """Peak of a ResNet block (norm, conv, norm, conv, shortcut), its input included."""
    shortcut = c_out if c_in != c_out else 0
    return c_in + max(t * c_in, c_in + c_out, c_out + t * c_out, 2 * c_out + shortcut)


def _mid(c: int, t: int) -> int:
    """Peak of the mid block with its input held: a ResNet block, or self-attention (norm output,
    q, k, v, the attended values, the projection and its reshaped copy)."""
    return c + max(_resnet(c, c, t), 7 * c)


def _kl_stages(cfg, decode: bool, t: int) -> list[tuple[float, float]]:
    """(resolution as a fraction of the image's pixels, peak width in channels at that resolution)
    for every stage of the KL encoder or decoder; t: see :func:`_norm_temporaries`."""
    ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
    stages = []
    if not decode:
        prev = ch[0]
        stages.append((1.0, 3 + ch[0]))  # conv_in
        for i, c in enumerate(ch):
            s = 4.0**-i
            peak = max(_resnet(prev, c, t), prev + _resnet(c, c, t))  # later blocks: stage input held
            if i < n - 1:  # stride-2 conv: its input, a padded copy, the quarter-size output
                peak = max(peak, prev + 2 * c + c / 4)
            stages.append((s, peak))
            prev = c
        return stages + [(4.0 ** -(n - 1), _mid(ch[-1], t))]
    rev = tuple(reversed(ch))
    stages.append((4.0 ** -(n - 1), _mid(rev[0], t)))  # conv_in's output held by the mid block
    prev = rev[0]
    for i, c in enumerate(rev):
        s = 4.0 ** -(n - 1 - i)
        peak = max(_resnet(prev, c, t), prev + _resnet(c, c, t))
        stages.append((s, peak))
        if i < n - 1:  # fused 2x upsample + conv: input, 4 phases at the input size, 2x output
            stages.append((4 * s, (prev + c + 4 * c) / 4 + c))
        prev = c
    stages.append((1.0, prev + ch[0] * t + 3))  # conv_norm_out, conv_out
    return stages


def activation_bytes(model, pixels: int, dtype: torch.dtype, decode: bool) -> int:
    """Peak activation memory of one image of ``pixels`` pixels through the model's encoder
    (``decode=False``: input pixels) or decoder (output pixels), from its config.

    KL: the largest stage peak (the decoder's last stage reads twice the first stage's width at
    full resolution), plus the mid block's attention matrix where the CPU may materialize it
    (tokens x tokens fp32; CUDA's attention does not). Tiny: three full-width activations at full
    resolution (a block's input, a conv output and the next), plus the 3-channel image.
    """
    item = torch.tensor([], dtype=dtype).element_size()
    cfg = model.config
    if cfg.family == "kl":
        stages = _kl_stages(cfg, decode, _norm_temporaries(dtype, model.device))
        widths = max(s * w for s, w in stages)
        tokens = pixels // (model.downscale**2)
        on_cpu = model.device.type == "cpu"
        attn = tokens * tokens * 4 if cfg.mid_block_add_attention and on_cpu else 0
        return int(pixels * widths * item * WORKSPACE + attn)
    widths = 3 * cfg.width + 3
    return int(pixels * widths * item * WORKSPACE)


@dataclass(frozen=True)
class TilePlan:
    """How frames are cut, in pixels: ``tile_hw`` (height, width) of every tile (None: whole
    frames, or square ``tile`` tiles for a plan made without :func:`plan_tiles`); ``tile`` the
    larger side (None: whole frames); ``overlap`` the least overlap of two neighbouring tiles;
    ``batch`` images per model call."""

    tile: int | None
    overlap: int
    batch: int
    tile_hw: tuple[int, int] | None = None

    def layout(self, height: int, width: int, factor: int) -> TileLayout:
        """This plan's tiles over a (height, width) px frame (multiples of ``factor``), in latent
        units; ``layout(...).waste`` is the plan's waste factor."""
        th, tw = self.tile_hw or (self.tile or max(height, width),) * 2
        return TileLayout(height // factor, width // factor, (th // factor, tw // factor), self.overlap // factor)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def axis_options(size: int, overlap: int, smallest: int, largest: int) -> list[tuple[int, int]]:
    """(count, tile) for every useful tile count along an axis of ``size`` latent px: the smallest
    tile, at least ``smallest`` (> overlap) and at most ``largest``, that covers the axis with
    neighbours overlapping by at least ``overlap``. n tiles of t cover it when
    n*t - (n-1)*overlap >= size, so t = overlap + ceil((size - overlap) / n); one tile is the whole
    axis. A count that gives the same tile as a smaller count is dropped: that tile's layout
    (:func:`axis_starts`) uses the smaller count."""
    options = [(1, size)] if size <= largest else []
    previous = size
    for n in range(2, size - overlap + 1):
        t = max(smallest, overlap + -(-(size - overlap) // n))
        if t < previous and t <= largest:
            options.append((n, t))
        if t == smallest:  # more tiles would be just as large
            break
        previous = t
    return options


def best_grid(height: int, width: int, overlap: int, max_area: int, smallest: int,
              largest: int) -> tuple[int, int] | None:
    """(tile height, tile width) in latent px covering a (height, width) latent canvas with the
    fewest computed pixels (tile count x tile area), tiles of at most ``max_area`` pixels with
    sides in [smallest, largest] (or the whole axis); ties go to fewer tiles (fewer, larger tiles
    keep a GPU busier), then squarer ones. None when no tile fits."""
    best = None
    for ny, th in axis_options(height, overlap, smallest, largest):
        for nx, tw in axis_options(width, overlap, smallest, largest):
            if th * tw <= max_area:
                key = (ny * nx * th * tw, ny * nx, abs(th - tw), -th)
                best = min(best or (key, th, tw), (key, th, tw))
    return None if best is None else best[1:]


def largest_area(cost, limit: int, budget_bytes: int) -> int:
    """The largest a in [0, limit] with cost(a) <= budget_bytes, by bisection (cost increases with a)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget_bytes else (lo, mid - 1)
    return lo


# px: the default overlap is a quarter of the largest of these square tiles (clipped to the frame) that
# fits the budget: the overlap the former planner asked (it used these tiles as they were).
OVERLAP_LADDER = (1024, 768, 512, 384, 256, 192, 128, 96, 64)


def plan_tiles(model, height: int, width: int, budget_bytes: int, dtype: torch.dtype, *, decode: bool,
               batch: int | None = None, tile: int | None = None, overlap: int | None = None) -> TilePlan:
    """Choose tile and batch sizes so a model call of the encoder (``decode=False``) or the decoder
    fits ``budget_bytes``, from that direction's :func:`activation_bytes`. Sizes in pixels, multiples
    of the model's factor; ``height``/``width`` too.

    Whole frames when one fits (and no ``tile`` is given). Else the tile height and width, not
    necessarily equal, that cover the frame with the fewest computed pixels (:func:`best_grid`)
    while one tile fits the budget and every two neighbours overlap by at least ``overlap``
    (default: a quarter of the largest of 1024, 768, 512, ... px square tiles that fits, at least
    4 latent px; a quarter of ``tile`` when that is given). A given ``tile`` is
    the largest side a tile may have: tiles are shrunk to the least size that covers the frame with
    the asked overlap. Explicit ``overlap``/``batch`` are kept.
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

    def cost(pixels: int) -> int:
        return activation_bytes(model, pixels, dtype, decode=decode)

    def with_batch(plan_tile, plan_overlap, hw, per) -> TilePlan:
        fits = max(1, budget_bytes // max(per, 1))
        return TilePlan(tile=plan_tile, overlap=plan_overlap, batch=int(batch or min(fits, 16)), tile_hw=hw)

    if tile is None and cost(height * width) <= budget_bytes:
        return with_batch(None, overlap or 0, None, cost(height * width))
    lat_h, lat_w = height // f, width // f
    max_area = largest_area(lambda a: cost(a * f * f), lat_h * lat_w, budget_bytes)  # latent px
    if overlap is None:
        fitting = (t for t in OVERLAP_LADDER
                   if t < max(height, width) and min(t, height) * min(t, width) <= max_area * f * f)
        side = tile if tile is not None else next(fitting, 0)
        overlap = max(f * 4, side // 4 // f * f)
    o = overlap // f
    largest = tile // f if tile is not None else max(lat_h, lat_w)
    smallest = min(largest, o + LATENT_MIN_TILE)  # a core of at least LATENT_MIN_TILE, unless --tile says less
    grid = best_grid(lat_h, lat_w, o, max_area, smallest, largest)
    if grid is None:
        h, w = min(smallest, lat_h) * f, min(smallest, lat_w) * f
        what = f"one {h}x{w} frame (no smaller tile is useful)" if (h, w) == (height, width) else f"one {h}x{w} tile"
        raise ValueError(f"the memory budget ({_mib(budget_bytes)}) is too small for {what}: the "
                         f"{'decoder' if decode else 'encoder'} needs about {_mib(cost(h * w))}; raise --max-memory")
    th, tw = grid[0] * f, grid[1] * f
    per = cost(th * tw)
    assert per <= budget_bytes, (th, tw, per, budget_bytes)  # the bisection assumes cost grows with area
    return with_batch(max(th, tw), overlap, (th, tw), per)
