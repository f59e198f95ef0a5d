"""Frames <-> latents for one clip: padding, tiling, batching, the temporal cache, blending.

``FrameEncoder``: uint8 frames (N, H, W, 3) -> latents (N, C, H8/8, W8/8) float32, where H8, W8
are H, W rounded up to the model's factor (the frame is padded by repeating its edge).
``FrameDecoder``: latents (N, C, h, w) -> uint8 frames (N, H, W, 3), cropped to the source size.
Both keep per-position cache state across calls, so feed frames in clip order.

``submit`` queues the work and returns a :class:`Pending` without waiting for the device (no host
sync per frame with ``--cache off``; one per call while a tile cache may reuse results); its
``result()`` or ``to_host()`` is where the host waits, and where a half-precision result that
came out non-finite is recomputed in float32. ``coder(x)`` is ``coder.submit(x).result()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

import kernels

from .cache import TemporalCache
from .global_norm import GlobalNorm
from .models import Autoencoder
from .models.accel import planning_budget
from .models.layers import GroupNormAct
from .sparse_cache import SparseDecoderCache, SparseEncoderCache, Unsupported
from .tiling import TilePlan, activation_bytes, plan_tiles
from .transfer import HostCopy, Uploader

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
        self._upload = Uploader(model.device)
        f = model.downscale
        self.height, self.width = height, width  # source pixels
        self.h8, self.w8 = round_up(height, f), round_up(width, f)
        budget = options.max_memory or default_budget(model.device)
        plan_budget = planning_budget(model, budget)  # less the CUDA graphs' pool
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
        self.plan: TilePlan = plan_tiles(model, self.h8, self.w8, plan_budget, model.dtype, decode=decode,
                                         batch=options.batch, tile=tile, overlap=options.overlap)
        self.layout = self.plan.layout(self.h8, self.w8, f)
        has_norm = any(isinstance(m, GroupNormAct) for m in model.modules())
        frame_tiles = self.layout.covered * f * f  # pixels of a frame's tiles in one batch
        tiles_fit = activation_bytes(model, frame_tiles, model.dtype, decode) <= plan_budget
        self.global_norm = has_norm and not self.layout.is_whole_frame and (
            options.norm == "global" or (options.norm == "auto" and tiles_fit))
        self._gn: GlobalNorm | None = None
        self._anchor_stats: torch.Tensor | None = None  # frame stats when the GN stats were recorded
        self._fallback = None  # the float32 twin's coder, built on the first non-finite result

    @property
    def stats(self):
        return self.sparse.stats if self.sparse is not None else self.cache.stats

    def _run(self, fn, x: torch.Tensor) -> torch.Tensor:
        """fn over x in chunks of the planned batch; a partial chunk is padded (with copies of
        its last item) up to :func:`batch_bucket`, so the model sees few distinct batch shapes
        (each shape is a CUDA graph) however long the clip and however many tiles changed."""
        if x.shape[0] == 0:
            return x.new_empty(0)
        outs = []
        for i in range(0, x.shape[0], self.plan.batch):
            part = x[i:i + self.plan.batch]
            n = part.shape[0]
            size = batch_bucket(n, self.plan.batch)
            if size > n:
                part = torch.cat([part, part[-1:].expand(size - n, *part.shape[1:])])
            outs.append(fn(part)[:n])
        return torch.cat(outs)

    def _code(self, tiles: torch.Tensor, frames: int, fn, prepare, frame_stats) -> torch.Tensor:
        """tiles (N*K, ...) cache units -> per-tile results (N*K, ...) via the cache and
        ``fn(x, norm=...)`` (the model's unchecked encode or decode). No host sync of its own:
        the cache's schedule reads the device once per call when it holds reusable results."""
        k = len(self.layout)
        grouped = tiles.view(frames, k, *tiles.shape[1:])
        if not self.global_norm:
            compute, source = self.cache.schedule(grouped)
            out = self._run(fn, prepare(tiles[compute]))
            result = self.cache.gather(source, out)
            self.cache.commit(out)
            return result
        # Global statistics: a frame whose tiles all run measures its statistics (every tile in
        # one batch); the others replay the recorded ones on the tiles that changed.
        if self._gn is None:
            self._gn = GlobalNorm(self.layout.core_boxes(), self.layout.tile_hw)
        gate = self._replay_gate(frame_stats) if self.cache.enabled else None
        compute, source = self.cache.schedule(grouped, gate)
        outs, start = [], 0
        for t, m in enumerate(self.cache.computed):
            if m == k:
                outs.append(fn(prepare(grouped[t]), norm=self._gn.measure))
            elif m:
                idx = compute[start:start + m]
                outs.append(self._run(lambda x: fn(x, norm=self._gn.replay), prepare(tiles[idx])))
            start += m
        out = torch.cat(outs) if outs else tiles.new_empty(0)
        result = self.cache.gather(source, out)
        self.cache.commit(out)
        return result

    def _replay_gate(self, frame_stats):
        """The cache's per-frame gate under global normalization (device tensors only): tiles are
        reused only while the frame's statistics stay within the cache threshold of those of the
        frame that recorded the GroupNorm statistics (the anchor); in exact mode only when every
        tile of the frame is reused. A frame that reuses nothing is measured and becomes the anchor."""
        tol = self.cache.threshold

        def gate(t: int, hit: torch.Tensor) -> torch.Tensor:
            stats = frame_stats(t)
            if self._anchor_stats is None:
                keep = torch.zeros_like(hit)
            else:
                ok = (stats - self._anchor_stats).abs().max() <= tol
                keep = hit & (ok & hit.all() if tol == 0 else ok)
            measured = ~keep.any()
            self._anchor_stats = stats if self._anchor_stats is None else torch.where(
                measured, stats, self._anchor_stats)
            return keep

        return gate

    def _pending(self, out: torch.Tensor, source: torch.Tensor, check: torch.Tensor) -> Pending:
        """``out`` as a Pending, flagged by the finiteness of ``check`` (the float result ``out``
        comes from) in half precision; nothing to check in float32. The fallback recomputes
        ``source`` (this call's input, on the device) with the model's float32 twin, cache off."""
        if self.model.dtype not in HALF:
            return Pending(out, None, None)
        return Pending(out, torch.isfinite(check).all(), lambda: self._redo(source))

    def _redo(self, source: torch.Tensor) -> torch.Tensor:
        self.model.note_fp32_fallback()
        if self._fallback is None:
            self._fallback = type(self)(self.model.fp32_twin(), self.height, self.width,
                                        replace(self.options, cache="off"))
        return self._fallback(source)


HALF = (torch.float16, torch.bfloat16)


def batch_bucket(n: int, batch: int) -> int:
    """The batch size ``n`` items are padded to: the next power of two, at most ``batch`` (so a
    plan of batch B has at most log2(B) + 2 shapes)."""
    return min(batch, 1 << (n - 1).bit_length())


@dataclass
class Pending:
    """A coder's output as queued on the device, not waited for.

    ``out``: the output tensor on the device (see the coder for its layout). ``finite``: a 0-dim
    bool device tensor (half precision) telling whether ``out`` is all finite, or None (float32:
    nothing to check). ``redo``: computes the same output in float32 (the fallback)."""

    out: torch.Tensor
    finite: torch.Tensor | None
    redo: Callable[[], torch.Tensor]

    def result(self) -> torch.Tensor:
        """The output, recomputed in float32 when it came out non-finite. Reading the flag waits
        for the device: call it where the output is needed anyway."""
        if self.finite is not None and not bool(self.finite):
            return self.redo()
        return self.out

    def to_host(self, dtype: torch.dtype | None = None) -> HostResult:
        """Start copying the output (as ``dtype``) and its flag to the host without waiting."""
        flag = None if self.finite is None else HostCopy(self.finite)
        return HostResult(HostCopy(self.out, dtype), flag, self.redo, dtype)


@dataclass
class HostResult:
    """A :class:`Pending` on its way to the host; ``wait()`` (the consumer's thread) returns the
    CPU tensor, recomputed in float32 on the device when the flag says it was non-finite."""

    copy: HostCopy
    finite: HostCopy | None
    redo: Callable[[], torch.Tensor]
    dtype: torch.dtype | None

    def wait(self) -> torch.Tensor:
        out = self.copy.wait()
        if self.finite is not None and not bool(self.finite.wait()):
            out = self.redo().to("cpu", self.dtype or out.dtype)
        return out


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

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """frames (N, H, W, 3) uint8 RGB -> latents (N, C, H8/8, W8/8) float32 on the model's device."""
        return self.submit(frames).result()

    @torch.no_grad()
    def submit(self, frames: np.ndarray | torch.Tensor) -> Pending:
        """As ``__call__``, without waiting for the device: the latents as a :class:`Pending`."""
        frames = self._upload(frames)
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != torch.uint8:
            raise ValueError(f"expected frames ({'N'}, {self.height}, {self.width}, 3) uint8, "
                             f"got {tuple(frames.shape)} {frames.dtype}")
        n = frames.shape[0]
        padded = pad_edge(frames, self.h8, self.w8)
        if self.sparse is not None:
            return Pending(self.sparse(padded).float(), None, None)
        tiles = self.layout.extract(padded, scale=self.model.downscale, channels_last=True)
        def prepare(t: torch.Tensor) -> torch.Tensor:
            # channels_last on every device: cuDNN and oneDNN convolutions are fastest in NHWC
            # (measured on this CPU: 1701 -> 1343 ms per 640x360 encode, 1 thread).
            return kernels.frames_to_input(t, dtype=self.model.dtype, channels_last=True)

        def frame_stats(t: int) -> torch.Tensor:  # per-channel mean and std, uint8 units
            f = padded[t].float()
            return torch.cat([f.mean((0, 1)), f.std((0, 1))])

        latents = self._code(tiles, n, self.model.encode_unchecked, prepare, frame_stats)
        latents = self.layout.blend(latents, n, scale=1)
        return self._pending(latents, frames, latents)


class FrameDecoder(_TiledCoder):
    """scaled latents -> uint8 frames cropped to the source size, tiled and cached."""

    def __init__(self, model: Autoencoder, height: int, width: int, options: CoderOptions | None = None):
        super().__init__(model, height, width, options or CoderOptions(), unit=127.5, decode=True)

    def _sparse_cache(self) -> SparseDecoderCache:
        f = self.model.downscale
        return SparseDecoderCache(self.model, self.h8 // f, self.w8 // f, self.options.cache, self.options.refresh)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (N, C, H8/8, W8/8) -> frames (N, H, W, 3) uint8 on the model's device."""
        return self.submit(latents).result()

    @torch.no_grad()
    def submit(self, latents: torch.Tensor) -> Pending:
        """As ``__call__``, without waiting for the device: the frames as a :class:`Pending`."""
        f = self.model.downscale
        latents = self._upload(latents)
        want = (self.model.latent_channels, self.h8 // f, self.w8 // f)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != want:
            raise ValueError(f"expected latents (N, {', '.join(map(str, want))}), got {tuple(latents.shape)}")
        n = latents.shape[0]
        if self.sparse is not None:
            return Pending(kernels.output_to_frames(self.sparse(latents), self.height, self.width), None, None)
        tiles = self.layout.extract(latents, scale=1)

        def prepare(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.model.dtype).contiguous(memory_format=torch.channels_last)  # see FrameEncoder

        def frame_stats(t: int) -> torch.Tensor:  # per-channel mean and std, in threshold units
            z = latents[t].float() * self.cache.unit
            return torch.cat([z.mean((1, 2)), z.std((1, 2))])

        images = self._code(tiles, n, self.model.decode_unchecked, prepare, frame_stats)
        canvas = self.layout.blend(images, n, scale=f)
        return self._pending(kernels.output_to_frames(canvas, self.height, self.width), latents, canvas)
