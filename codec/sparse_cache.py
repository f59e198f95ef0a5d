"""Sparse temporal cache: per-layer activations, recompute only the blocks that changed.

DeltaCNN / CBinfer / SBNet style, for the tiny family (3x3 convs, ReLU, residual blocks, pixel
(un)shuffle or stride-2 resampling). The frame is cut into cells, one latent cell each (8x8 px at
the model input, 4x4 after one 2x step, ..., 1x1 at the latent): the same cell grid at every
layer. Per layer the cache keeps the activations of the whole frame (NHWC, on the model's device).

For a new frame:
- change is decided per cell of the input against the cell's REFERENCE, the input the cached
  values were computed from (never the previous frame, so there is no drift): mean absolute change
  over the cell and the largest change of a 2x2-pooled window (single-pixel noise averages out;
  a small object does not);
- each conv recomputes the cells its changed input reaches: the changed cells of its input dilated
  by one cell (a 3x3 conv reads 1 px around, 2 px after an unshuffle: always within the next
  cell). The cells are gathered with that halo into one packed batch ``(B, P, P, C)`` (zeros or
  replicated edge outside the frame, as the dense conv pads), run through the same conv weights
  with no padding, and scattered into the cached output. Over a block with its full halo this is
  the dense convolution at that block up to rounding: oneDNN picks its algorithm by shape, so
  the packed result is not bit-identical (tested: 1e-7). So ``exact`` (tolerance 0: reuse only
  bit-identical input, keep any changed output) equals the dense model to rounding only; the
  codec's bit-identical ``exact`` mode stays with the tile cache (codec.coder);
- after each conv, a recomputed cell whose output moved less than the layer's threshold keeps its
  cached value and is not propagated: a change that died out stops spreading;
- a refresh every ``refresh`` frames and on a scene cut (the changed input cells with their halo
  are more than ``CUT_FRACTION`` of the frame: a sparse pass would cost more than a dense one)
  runs the dense model and keeps its activations (no copies: the dense outputs become the cache).
  Once a conv would recompute more than ``DENSE_FRACTION`` of the cells, the rest of the network
  runs densely for that frame (its cache becomes the exact dense result).

Decisions: on the host path (the CPU's) each step reads its cell mask (numpy); on the device path
(``sync_free``, CUDA's) the host reads a few counts once per frame, and each step runs a batch of
planned size on the device (see SparseNetCache).

GroupNorm layers (taef2's middle blocks, the KL family) run per cell with the statistics of the
last refresh, checked every frame (``codec.sparse_norm``); the KL family's other steps (attention,
downsample convs) are in ``codec.sparse_kl``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .cache import CacheStats, parse_mode
from .models.tiny import Block, Clamp

CELL = 8  # px per cell at the model's full resolution (one latent cell)
MAX_FACTOR = 4.0  # a 2x2-pooled window may change by MAX_FACTOR * T before its cell counts as changed
PERSIST_FACTOR = 0.5  # a change that persists counts from PERSIST_FACTOR * T (see cell_change)
# Past half the cells, a packed pass costs about what the dense one does on the CPU (same-run
# A/B on 480x272 crops, default model, T=4: squirrel 0.85x of off at 0.3, 0.87x at 0.5, with
# FLOPs 0.81 -> 0.49; smpte 0.39x -> 0.37x)
CUT_FRACTION = 0.5  # more cells than this to recompute at the first conv: scene cut, dense refresh
DENSE_FRACTION = 0.5  # a conv recomputing more cells than this runs densely, and the rest of the network
ACT_FACTOR = 0.25  # layer threshold = ACT_FACTOR * T/255 * mean |activation| at the last refresh
HEADROOM = 1.25  # device path: batch capacity over the cells expected (see SparseNetCache.plan)
HISTORY = 4  # device path: frames of counts the capacity covers (a moving object's cells vary)


class Unsupported(ValueError):
    """The model has a layer the sparse cache does not handle."""


@dataclass
class ConvStep:
    """One 3x3 conv of the network: buffer ``src`` -> buffer ``dst``.

    ``scale_in``/``scale_out``: px per cell at the two resolutions. ``unshuffle``: pixel-unshuffle
    (2x) before the conv; ``shuffle``: pixel-shuffle (2x) after it; ``residual``: buffer added
    before the ReLU (the skip of a residual block); ``relu``: ReLU after.
    """

    conv: nn.Conv2d
    src: int
    dst: int
    scale_in: int
    scale_out: int
    unshuffle: bool = False
    shuffle: bool = False
    upsample: bool = False  # nearest 2x upsample before the conv, run as kernels.upsample_conv3x3
    residual: int | None = None
    relu: bool = False

    @property
    def halo(self) -> int:  # px of the source the conv reads around a cell
        return 2 if self.unshuffle else 1

    @property
    def zero_pad(self) -> bool:
        return self.conv.padding_mode == "zeros"

    def flops_per_cell(self) -> int:
        """Multiply-adds x 2 of the conv for one cell of its output (the upsample conv runs as a
        2x2 conv with 4x the outputs on the small input, as the model runs it)."""
        if self.upsample:
            return 2 * 16 * self.conv.weight[:, :, 0, 0].numel() * self.scale_in ** 2
        px = self.scale_in if self.shuffle else self.scale_out
        return 2 * self.conv.weight.numel() * px * px

    def dense(self, x: torch.Tensor, res: torch.Tensor | None) -> torch.Tensor:
        """The dense layer, the same calls the model makes: (1, C, H, W) -> (1, C', H', W')."""
        if self.unshuffle:
            x = F.pixel_unshuffle(x, 2)
        if self.upsample:
            y = kernels.upsample_conv3x3(x, self.conv.weight, self.conv.bias)
        else:
            y = self.conv(x)
        if self.shuffle:
            y = F.pixel_shuffle(y, 2)
        if res is not None:
            y = y + res
        return torch.relu(y) if self.relu else y

    def packed(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, P, P, Cin) patches with their halo -> (B, s, s, Cout) cells (before the residual)."""
        b, p = patches.shape[:2]
        if self.upsample:  # the four output phases of upsample + conv, as kernels.upsample_conv3x3
            x = patches.permute(0, 3, 1, 2)  # channels_last view
            phases = F.conv2d(x, self._kernel[0].to(x.dtype))  # (B, 4 Cout, s + 1, s + 1)
            cout, s = self.conv.out_channels, p - 2
            y = x.new_empty((b, cout, 2 * s, 2 * s))
            for k, (i, j) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
                y[:, :, i::2, j::2] = phases[:, k * cout:(k + 1) * cout, i:i + s, j:j + s]
            if self.conv.bias is not None:
                y += self.conv.bias.to(x.dtype).view(1, -1, 1, 1)
            return y.permute(0, 2, 3, 1)
        weight, bias, stride = self._kernel
        weight, bias = weight.to(patches.dtype), bias if bias is None else bias.to(patches.dtype)
        if p == weight.shape[-1]:  # one output px per cell: the patch is its own im2col
            w = self._matrix.to(patches.dtype)
            x = patches.reshape(b, -1)
            y = (torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)).view(b, 1, 1, -1)
        else:
            y = F.conv2d(patches.permute(0, 3, 1, 2), weight, bias, stride).permute(0, 2, 3, 1)
        if self.shuffle:  # channels in (i, j, c) order: pixel (2 y + i, 2 x + j) moves whole
            s, c = y.shape[1], y.shape[-1] // 4
            y = y.reshape(b, s, s, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * s, 2 * s, c)
        return y

    @cached_property
    def _kernel(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The conv as ``packed`` runs it on NHWC patches, (weight, bias, stride), so that no
        pixel (un)shuffle copies elements one by one: an unshuffle (channel c * 4 + 2 i + j) then
        3x3 conv is one 6x6 stride-2 conv on the patch's own pixels; a conv before a shuffle
        has its output channels reordered to (i, j, c), so the shuffle moves whole pixels.
        Upsample steps: the folded phase kernel of kernels.upsample_conv3x3."""
        w, b = self.conv.weight.detach(), self.conv.bias
        b = None if b is None else b.detach()
        if self.upsample:
            return kernels.fold_weight(w), b, 1
        if self.unshuffle:  # w[o, 4 c + 2 i + j, a, b] -> w'[o, c, 2 a + i, 2 b + j]
            cout, cin = w.shape[0], w.shape[1] // 4
            return w.reshape(cout, cin, 2, 2, 3, 3).permute(0, 1, 4, 2, 5, 3).reshape(cout, cin, 6, 6), b, 2
        if self.shuffle:  # output channel 4 c + 2 i + j -> (2 i + j) C + c
            c = w.shape[0] // 4
            w = w.reshape(c, 4, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
            b = None if b is None else b.reshape(c, 4).t().reshape(-1)
            return w, b, 1
        return w, b, self.conv.stride[0]

    @cached_property
    def _matrix(self) -> torch.Tensor:
        """``_kernel``'s weight as a (K K Cin, Cout) matrix, the rows in a patch's (y, x, c) order."""
        w = self._kernel[0]
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).t()


@dataclass
class NormBlockStep:
    """A step recomputed densely on the whole frame every frame and merged cell by cell
    (:meth:`SparseNetCache._merge_dense`): the base of the KL mid-block attention
    (``sparse_kl.AttentionStep``), which defines ``dense`` and ``flops_per_cell``."""

    block: nn.Module
    src: int
    dst: int
    scale_in: int
    scale_out: int
    residual = None


def plan_steps(layers: nn.Sequential, scale: int) -> tuple[list[ConvStep], list[int]]:
    """The conv steps of a tiny encoder (``scale`` 8) or decoder (``scale`` 1), and the channel
    count of each buffer (buffer 0 is the network input). Raises :class:`Unsupported`."""
    if not isinstance(layers, nn.Sequential):  # one direction of a KL model (a sparse_kl.KLPath)
        from .sparse_kl import plan_kl_steps
        return plan_kl_steps(layers, scale)
    items = list(layers)
    steps: list[ConvStep] = []
    channels = [None]
    cur = 0

    def add(conv, src, s_in, s_out, **kw) -> int:
        steps.append(ConvStep(conv, src, len(channels), s_in, s_out, **kw))
        channels.append(conv.out_channels // (4 if kw.get("shuffle") else 1))
        return len(channels) - 1

    i = 0
    while i < len(items):
        m = items[i]
        nxt = items[i + 1] if i + 1 < len(items) else None
        if isinstance(m, Clamp) and i == 0:
            i += 1  # applied to the input, see SparseDecoderCache
            continue
        if isinstance(m, nn.Conv2d):
            _check_conv(m)
            stride = m.stride[0]
            if isinstance(nxt, nn.PixelShuffle):
                cur, scale, i = add(m, cur, scale, scale * 2, shuffle=True), scale * 2, i + 2
            else:
                relu = isinstance(nxt, nn.ReLU)
                cur, scale, i = add(m, cur, scale, scale // stride, relu=relu), scale // stride, i + 1 + relu
            if channels[0] is None:
                channels[0] = m.in_channels
        elif isinstance(m, nn.PixelUnshuffle) and isinstance(nxt, nn.Conv2d) and m.downscale_factor == 2:
            _check_conv(nxt)
            cur, scale, i = add(nxt, cur, scale, scale // 2, unshuffle=True), scale // 2, i + 2
        elif isinstance(m, nn.Upsample) and isinstance(nxt, nn.Conv2d) and m.scale_factor == 2 and m.mode == "nearest":
            _check_conv(nxt)
            cur, scale, i = add(nxt, cur, scale, scale * 2, upsample=True), scale * 2, i + 2
            if isinstance(items[i] if i < len(items) else None, nn.ReLU):
                raise Unsupported("sparse cache: ReLU after an upsample conv")
        elif isinstance(m, Block):
            c0, c1, c2 = m.conv[0], m.conv[2], m.conv[4]
            for c in (c0, c1, c2):
                _check_conv(c)
            x = cur
            if m.pool is not None:  # taef2: x + pool(x) per cell, GroupNorm statistics frozen
                from .sparse_norm import pool_steps
                pool, pool_channels = pool_steps(m.pool, x, len(channels), scale)
                steps += pool
                channels += pool_channels
                x = len(channels) - 1
            a = add(c0, x, scale, scale, relu=True)
            b = add(c1, a, scale, scale, relu=True)
            cur = add(c2, b, scale, scale, residual=x, relu=True)
            i += 1
        else:
            raise Unsupported(f"sparse cache: layer {type(m).__name__} is not supported")
    return steps, channels


def _check_conv(m: nn.Conv2d) -> None:
    if (m.kernel_size != (3, 3) or m.padding != (1, 1) or m.dilation != (1, 1) or m.groups != 1
            or m.stride[0] != m.stride[1] or m.stride[0] not in (1, 2)
            or m.padding_mode not in ("zeros", "replicate")):
        raise Unsupported(f"sparse cache: conv {m} is not a 3x3 conv with padding 1")


@dataclass
class SparseStats(CacheStats):
    """Hit counts per input cell (``per_frame``: hit rate of each frame) and the FLOPs that ran:
    ``flops_per_frame`` is each frame's fraction of the dense model's FLOPs."""

    flops: int = 0
    dense_flops: int = 0
    flops_per_frame: list[float] = field(default_factory=list)
    deferred: int = 0  # device path: cell-steps deferred to the next frame (batch capacity exceeded)

    @property
    def flop_fraction(self) -> float:
        return self.flops / self.dense_flops if self.dense_flops else 1.0

    def add_flops(self, ran: int, dense: int) -> None:
        self.flops += ran
        self.dense_flops += dense
        self.flops_per_frame.append(ran / dense if dense else 1.0)


class _CellIndex:
    """Flat pixel indices of cells with a halo, for a (H, W) NHWC buffer cut into s x s cells."""

    def __init__(self, height: int, width: int, s: int, halo: int, device: torch.device):
        rows, cols = height // s, width // s
        p = s + 2 * halo
        y = torch.arange(rows, device=device)[:, None] * s - halo + torch.arange(p, device=device)  # (rows, p)
        x = torch.arange(cols, device=device)[:, None] * s - halo + torch.arange(p, device=device)  # (cols, p)
        valid_y, valid_x = (y >= 0) & (y < height), (x >= 0) & (x < width)
        y, x = y.clamp(0, height - 1), x.clamp(0, width - 1)  # clamped = replicated edge
        # (cells, p, p): cell (r, c) -> flat pixel index of each patch position
        self.index = (y[:, None, :, None] * width + x[None, :, None, :]).reshape(rows * cols, p * p)
        self.index_host = self.index.cpu().numpy()  # the host path picks rows in numpy (cheaper per call)
        valid = (valid_y[:, None, :, None] & valid_x[None, :, None, :]).reshape(rows * cols, p, p, 1)
        self.border = (~valid).flatten(1).any(1)  # cells whose patch reaches outside the frame
        self.border_host = self.border.cpu().numpy()
        self.valid = valid
        self.p = p


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) channels_last -> (H*W, C) view of the same memory."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


class SparseNetCache:
    """The cached activations of one network (encoder or decoder) over whole frames.

    ``rows, cols``: the cell grid (latent size); ``scale``: px per cell of the network input (8
    for an encoder, 1 for a decoder). ``threshold``: None (no cache: dense every frame), 0.0
    (exact) or T in uint8 levels.

    ``sync_free`` chooses how a sparse frame sizes its batches. False (the host path, fastest on
    the CPU, which waits for every op anyway): each step reads its cell mask on the host. True
    (the device path, for CUDA): no step reads anything; each step runs a batch of a fixed
    ``capacity`` (:meth:`plan`, from the host's one read per frame) with ``nonzero_static``; the
    first sparse frame runs the host path to measure the counts. Needed cells past the capacity
    (rare: the capacity has headroom over the last frames' counts) keep their cached values this
    frame and are recomputed first thing next frame (``pending``): that frame's output is stale
    in those cells, counted in ``SparseStats.deferred``.
    """

    def __init__(self, layers: nn.Sequential, scale: int, rows: int, cols: int, threshold: float | None,
                 device: torch.device, sync_free: bool = False):
        self.steps, self.channels = plan_steps(layers, scale)
        self.rows, self.cols, self.scale, self.threshold = rows, cols, scale, threshold
        self.device, self.sync_free = device, sync_free
        self.cells = rows * cols
        self.buffers: list[torch.Tensor | None] = [None] * len(self.channels)
        self.tau: list[torch.Tensor | None] = [None] * len(self.channels)  # per-buffer change threshold
        self.tau_stale = True  # tau not yet measured on the buffers of the last refresh
        self._index: dict[tuple[int, int], _CellIndex] = {}
        self.dense_flops = self.cells * sum(s.flops_per_cell() for s in self.steps)
        # device path: cells deferred per step, and the last sparse frame's counts (device tensors)
        self.pending: list[torch.Tensor | None] = [None] * len(self.steps)
        self.readback: torch.Tensor | None = None  # (steps + 1,): cells needed per step, deferred cells
        self.history: collections.deque[list[int]] = collections.deque(maxlen=HISTORY)  # counts per frame
        self.last_spread = 0  # the spread that the last sparse frame planned for

    def buffer_scale(self, b: int) -> int:
        if b == 0:
            return self.scale
        return next(s.scale_out for s in self.steps if s.dst == b)

    def memory_bytes(self, element_size: int) -> int:
        """Bytes of the cached activations (every buffer at its resolution)."""
        return sum(c * self.cells * self.buffer_scale(b) ** 2 * element_size for b, c in enumerate(self.channels))

    def index(self, s: int, halo: int) -> _CellIndex:
        key = (s, halo)
        if key not in self._index:
            self._index[key] = _CellIndex(self.rows * s, self.cols * s, s, halo, self.device)
        return self._index[key]

    def plan(self, spread: int) -> list[int]:
        """Device path: each step's batch size for the coming sparse frame, with HEADROOM over the
        changed input cells with a two-cell halo (``spread``) and over the most cells the step
        needed in the last HISTORY sparse frames (read back with the next frame's counts: no
        extra wait). ``self.cells``: the step runs densely (over DENSE_FRACTION expected)."""
        grow = max(1.0, spread / max(1, self.last_spread))
        expect = []
        for k in range(len(self.steps)):  # the most the step needed in the last frames, scaled by
            known = [c[k] for c in self.history if c[k] >= 0]  # the growth of the input's spread
            # not measured (it ran densely): as the step before
            expect.append(max(spread, max(known) * grow) if known else expect[-1] if expect else spread)
        return [self.cells if e > DENSE_FRACTION * self.cells else min(self.cells, bucket(int(HEADROOM * e)))
                for e in expect]

    # ---- a frame ---------------------------------------------------------------------------
    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Run the whole network densely on x (1, C, H, W) and keep every activation."""
        self.buffers[0] = x
        for st in self.steps:
            res = self.buffers[st.residual] if st.residual is not None else None
            y = _nhwc(st.dense(self.buffers[st.src], res))
            self.buffers[st.dst] = y
        self.tau_stale = True  # measured by the next sparse frame: a clip of cuts never pays for it
        self.pending = [None] * len(self.steps)
        return self.buffers[-1], self.dense_flops

    def _measure_tau(self) -> None:
        """Each buffer's change threshold from its activations at the last refresh (a cheap
        estimate of their magnitude, every 4th px): still the buffers the dense pass left."""
        for st in self.steps:
            y = self.buffers[st.dst]
            self.tau[st.dst] = ACT_FACTOR * self.threshold / 255.0 * y[..., ::4, ::4].abs().mean()
        self.tau_stale = False

    def sparse(self, x: torch.Tensor, changed: torch.Tensor, capacity: list[int] | None = None
               ) -> tuple[torch.Tensor, int]:
        """x (1, C, H, W): the new input, equal to the cached one outside the ``changed`` cells
        ((rows, cols) bool). ``capacity``: per step, the batch size of the device path (None: the
        host path). Returns the output and the FLOPs that ran."""
        # the host path keeps its cell masks on the host (numpy: a tenth of torch's cost per op on
        # arrays of a few thousand cells); the device path on the device
        host = capacity is None
        if self.threshold and self.tau_stale:
            self._measure_tau()
        masks: list = [None] * len(self.buffers)
        self.buffers[0], masks[0] = x, changed.cpu().numpy() if host else changed
        flops = 0
        self.counts = []  # cells recomputed per step (self.cells: dense); device path: tensors
        self.ran = []  # cells run per step: counts padded to a bucket size (or the capacity)
        deferred = []
        dense = False
        for k, st in enumerate(self.steps):
            if not dense and isinstance(st, NormBlockStep):
                keep, count = self._merge_dense(st), self.cells
                masks[st.dst] = keep.cpu().numpy() if host else keep
                self.counts.append(count)
                self.ran.append(count)
                flops += count * st.flops_per_cell()
                continue
            if not dense:
                src = masks[st.src]  # the halo (a step reading no neighbours adds none)
                need = (_dilate_host(src) if host else _dilate(src)) if st.halo else src.copy() if host else src.clone()
                if st.residual is not None:
                    need |= masks[st.residual]
                if host:
                    cells = np.flatnonzero(need)
                    count = cells.size
                    ran = min(bucket(count), self.cells) if count else 0
                    # the change has spread over much of the frame: the rest of the network runs
                    # densely (its cache becomes the exact dense result: nothing to compare or drift)
                    dense = count > DENSE_FRACTION * self.cells
                else:
                    if self.pending[k] is not None:
                        need |= self.pending[k]
                    count, ran = need.sum(), capacity[k]
                    dense = ran == self.cells
                if dense and capacity is not None:  # later steps: not measured (-1)
                    self.counts += [count] + [-1] * (len(self.steps) - k - 1)
                    self.pending = [None] * len(self.steps)
            if dense:
                res = self.buffers[st.residual] if st.residual is not None else None
                self.buffers[st.dst] = _nhwc(st.dense(self.buffers[st.src], res))
                ran = self.cells
                if capacity is None:
                    count = self.cells
            elif capacity is None and count == 0:
                masks[st.dst] = need
            elif capacity is None:
                # a few batch sizes: oneDNN/cuDNN plan (and CUDA graphs capture) once per shape;
                # the padding repeats the last cell (written twice with the same values)
                cells = np.concatenate([cells, np.repeat(cells[-1:], ran - count)])
                masks[st.dst] = self._sparse_step(st, torch.from_numpy(cells).to(self.device), cells)
            else:
                cells, self.pending[k] = _take(need.flatten(), ran)
                deferred.append(self.pending[k].sum())
                self.pending[k] = self.pending[k].view(self.rows, self.cols)
                masks[st.dst] = self._sparse_step(st, cells, None, count > 0)
            if len(self.counts) <= k:
                self.counts.append(count)
            self.ran.append(ran)
            flops += ran * st.flops_per_cell()
        if self.sync_free and capacity is None:  # a measuring frame: its counts plan the next ones
            self.history.append(self.counts)
        elif capacity is not None:  # read with the next frame's counts (one wait per frame)
            zero = torch.zeros((), dtype=torch.long, device=self.device)
            self.readback = torch.stack([torch.as_tensor(c, device=self.device) for c in self.counts]
                                        + [sum(deferred, zero)])
        return self.buffers[-1], flops

    def _merge_dense(self, st: NormBlockStep) -> torch.Tensor:
        """Recompute a step on the whole frame; keep the new value of the cells that moved more
        than the threshold, the cached value elsewhere. Returns the kept cells."""
        y = _nhwc(st.dense(self.buffers[st.src], None))
        old, s = self.buffers[st.dst], st.scale_out
        if self.threshold == 0:
            keep = F.max_pool2d((y != old).any(1, keepdim=True).float(), s)[0, 0] > 0
        else:
            keep = F.avg_pool2d((y - old).abs().mean(1, keepdim=True), s)[0, 0] > self.tau[st.dst]
            y = _nhwc(torch.where(_up(keep, s), y, old))
        self.buffers[st.dst] = y
        return keep

    def _sparse_step(self, st: ConvStep, cells: torch.Tensor, host_cells: np.ndarray | None,
                     any_needed: torch.Tensor | None = None):
        """Recompute ``cells`` (B,) int64 of one step; returns the (rows, cols) bool cells kept.
        Host path: ``host_cells`` the same cells in numpy, returns numpy. Device path:
        ``any_needed`` a bool tensor, False when the batch is only padding."""
        src, dst = self.buffers[st.src], self.buffers[st.dst]
        ix, ox = self.index(st.scale_in, st.halo), self.index(st.scale_out, 0)
        if host_cells is not None:
            in_ix = torch.from_numpy(ix.index_host[host_cells].ravel()).to(self.device)
            out_rows = ox.index_host[host_cells]  # (B, s * s)
            out_ix = torch.from_numpy(out_rows.ravel()).to(self.device)
        else:
            in_ix, out_ix = ix.index[cells].flatten(), ox.index[cells].flatten()
        patches = _flat(src).index_select(0, in_ix).view(cells.numel(), ix.p, ix.p, -1)
        if st.zero_pad and any_needed is not None:  # the dense conv reads zeros outside the frame
            patches = patches * ix.valid[cells]  # (every patch: picking the border ones would wait)
        elif st.zero_pad:
            edge = np.flatnonzero(ix.border_host[host_cells])
            if edge.size:
                edge = torch.from_numpy(edge).to(self.device)
                patches[edge] = patches[edge] * ix.valid[cells[edge]]
        y = st.packed(patches)
        if st.residual is not None:  # y is the step's own new tensor: add in place
            y = y.add_(_flat(self.buffers[st.residual]).index_select(0, out_ix).view_as(y))
        if st.relu:
            y = y.relu_()
        old = _flat(dst).index_select(0, out_ix).view_as(y)
        if self.threshold == 0:
            keep = (y != old).flatten(1).any(1)
        else:
            keep = (y - old).abs_().mean((1, 2, 3)) > self.tau[st.dst]
        if host_cells is not None:  # write only the kept cells (fewer bytes)
            keep = keep.cpu().numpy()
            sel = np.flatnonzero(keep)
            if 0 < sel.size < keep.size:
                y = y[torch.from_numpy(sel).to(self.device)]
                out_ix = torch.from_numpy(out_rows[sel].ravel()).to(self.device)
            if sel.size:
                _flat(dst).index_copy_(0, out_ix, y.reshape(-1, y.shape[-1]))
            mask = np.zeros(self.cells, dtype=bool)
            mask[host_cells] = keep  # padding repeats a cell with the same result: same keep
            return mask.reshape(self.rows, self.cols)
        keep &= any_needed  # no wait: write every recomputed cell, the kept ones new
        _flat(dst).index_copy_(0, out_ix, torch.where(keep[:, None, None, None], y, old).reshape(-1, y.shape[-1]))
        mask = torch.zeros(self.cells, dtype=torch.bool, device=self.device)
        mask[cells] = keep
        return mask.view(self.rows, self.cols)


def _take(need: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Device path: (cells,) bool -> the first ``capacity`` needed cells (capacity,) int64, padded
    by repeating the first one (cell 0 when none is needed), and the needed cells past the
    capacity (cells,) bool. Nothing is read back to the host."""
    cells = torch.nonzero_static(need, size=capacity, fill_value=-1).squeeze(1)
    cells = torch.where(cells >= 0, cells, cells[:1].clamp(min=0))
    return cells, need & (need.cumsum(0) > capacity)


def bucket(n: int) -> int:
    """n rounded up to one of 8 sizes per octave (at most 12.5% padding), at least 16."""
    if n <= 16:
        return 16
    q = 1 << (n.bit_length() - 4)
    return -(-n // q) * q


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool: the cells and their 8 neighbours (a 3x3 conv's one-cell halo)."""
    return F.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0] > 0


def _dilate_host(mask: np.ndarray) -> np.ndarray:
    """_dilate on the host: (rows, cols) bool numpy."""
    r = mask.copy()  # shifted ORs in place: np.pad costs ~50 us a call, ~70 calls a frame
    r[1:] |= mask[:-1]
    r[:-1] |= mask[1:]
    out = r.copy()
    out[:, 1:] |= r[:, :-1]
    out[:, :-1] |= r[:, 1:]
    return out


def _up(mask: torch.Tensor, s: int) -> torch.Tensor:
    """(rows, cols) -> (1, 1, rows*s, cols*s), each cell repeated over its s x s pixels."""
    if s == 1:
        return mask[None, None]
    rows, cols = mask.shape
    return mask[:, None, :, None].expand(rows, s, cols, s).reshape(1, 1, rows * s, cols * s)


def cell_change(current: torch.Tensor, reference: torch.Tensor, cell: int, threshold: float,
                unit: float, previous: torch.Tensor | None = None) -> torch.Tensor:
    """Which cells changed: (C, H, W) current vs reference (any dtype) -> (H/cell, W/cell) bool.

    ``threshold`` 0: any bit differs. Else a cell changed when its mean absolute change (in
    threshold units: values x ``unit``, averaged over channels) exceeds T, or one 2x2-pooled window
    (one pixel when cell is 1) changed by more than MAX_FACTOR * T, or (with the ``previous``
    frame) its change is over T/2 and PERSISTENT: less than half of it is new since the previous
    frame. Noise differs from the reference about as much as from the previous frame, so T keeps
    tolerating it; a shift that stays (the next GOP's coding, a light turned up a little) is
    content, and left in place it would cost every following frame its error.
    """
    if threshold == 0:
        diff = (current != reference).any(0, keepdim=True).float()
        return F.max_pool2d(diff[None], cell)[0, 0] > 0
    d = _abs_change(current, reference, unit)
    mean = F.avg_pool2d(d, cell)
    window = F.avg_pool2d(d, 2) if cell > 1 else d
    peak = F.max_pool2d(window, max(1, cell // 2))
    changed = (mean > threshold) | (peak > MAX_FACTOR * threshold)
    if previous is not None:
        new = F.avg_pool2d(_abs_change(current, previous, unit), cell)
        changed |= (mean > PERSIST_FACTOR * threshold) & (new < 0.5 * mean)
    return changed[0, 0]


def _abs_change(a: torch.Tensor, b: torch.Tensor, unit: float) -> torch.Tensor:
    """(C, H, W) a, b -> (1, 1, H, W) fp32: |a - b| averaged over channels, times ``unit``.
    uint8 frames subtract in int16 (one pass each way, no fp32 copies of the frames)."""
    if a.dtype == torch.uint8 and b.dtype == torch.uint8 and a.shape[0] <= 128:  # C * 255 fits int16
        d = (a.to(torch.int16) - b.to(torch.int16)).abs_().sum(0, keepdim=True, dtype=torch.int16)
        return d[None].float() * (unit / a.shape[0])
    return (a.float() - b.float()).abs().mean(0, keepdim=True)[None] * unit


def _check_family(model) -> None:
    if model.family not in ("tiny", "kl"):
        raise Unsupported(f"sparse cache: the {model.family} family is not supported (tiny and kl only)")


def _net_cache(model, decode: bool, scale: int, rows: int, cols: int, threshold: float | None,
               sync_free: bool | None) -> SparseNetCache:
    """The cache of the model's encoder or decoder (rows x cols cells of ``scale`` px at its input)."""
    sync_free = _sync_free(sync_free, model.device)
    if model.family == "kl":
        from .sparse_kl import kl_net_cache
        return kl_net_cache(model, decode, scale, rows, cols, threshold, sync_free)
    layers = model.decoder if decode else model.encoder
    if any(isinstance(m, Block) and m.pool is not None for m in layers):  # taef2: GroupNorm blocks
        from .sparse_norm import NormNetCache
        return NormNetCache(layers, scale, rows, cols, threshold, model.device, sync_free)
    return SparseNetCache(layers, scale, rows, cols, threshold, model.device, sync_free)


def _sync_free(choice: bool | None, device: torch.device) -> bool:
    return device.type == "cuda" if choice is None else choice


class _SparseCoder:
    """Reference input, scene-cut and refresh policy, and statistics around one SparseNetCache."""

    def __init__(self, net: SparseNetCache, cache: str | float | None, refresh: int | None, unit: float, cell: int):
        self.net, self.unit, self.cell = net, unit, cell
        self.threshold = parse_mode(cache)
        if refresh is not None and refresh < 1:
            raise ValueError(f"--refresh must be >= 1 frame, got {refresh}")
        self.refresh = refresh
        self.stats = SparseStats()
        self.reference: torch.Tensor | None = None  # (C, H, W) the input the cache was computed from
        self.previous: torch.Tensor | None = None  # (C, H, W) the last frame's input (persistence)
        self.age = 0

    def _frame(self, raw: torch.Tensor, prepare) -> torch.Tensor:
        """raw (C, H, W): one frame's input as compared; ``prepare(raw) -> (1, C, H, W)`` network input."""
        net = self.net
        due = self.refresh is not None and self.age + 1 >= self.refresh
        changed, reads = None, []
        if self.threshold is not None and self.reference is not None and not due:
            changed = cell_change(raw, self.reference, self.cell, self.threshold, self.unit, self.previous)
            spread = _dilate(changed)
            reads = [changed.sum(), spread.sum(), _dilate(spread).sum()]
        last = net.readback  # the device path's counts of its last sparse frame
        if last is not None:
            reads.append(last)
            net.readback = None
        if reads:  # the one wait of a frame: both counts, and the device path's last counts
            values = torch.cat([r.reshape(-1) for r in reads]).to("cpu", copy=True).tolist()
            if last is not None:
                net.history.append(values[-len(last):-1])
                deferred = values[-1]
                self.stats.deferred += deferred
            if changed is not None:
                count, spread, spread2 = values[:3]
                if spread > CUT_FRACTION * net.cells:
                    changed = None  # scene cut
        if changed is None:
            out, flops = net.dense(prepare(raw))
            self.stats.add(0, net.cells)
            if self.threshold is not None:
                self.reference, self.age = raw.clone(), 0
        else:
            self.reference = torch.where(_up(changed, self.cell)[0], raw, self.reference)
            # device path: batch sizes planned from the counts of the last frames; the first sparse
            # frame measures them on the host path (a wait per step, once)
            capacity = net.plan(spread2) if net.sync_free and net.history else None
            net.last_spread = spread2
            out, flops = net.sparse(prepare(self.reference), changed, capacity)
            self.stats.add(net.cells - count, net.cells)
            self.age += 1
        self.stats.add_flops(flops, net.dense_flops)
        if self.threshold:
            self.previous = raw.clone()
        return out.clone()  # the cache's buffer changes in place with the next frame


class SparseEncoderCache(_SparseCoder):
    """uint8 frames (already padded to multiples of 8) -> scaled latents, through the sparse cache.

    ``__call__(frames)``: (N, H, W, 3) uint8 -> (N, C, H/8, W/8) in the model's dtype, frame by
    frame in clip order. ``prepare``: (N, H, W, 3) uint8 -> (N, 3, H, W) [-1, 1] model input.
    ``sync_free``: the device path of :class:`SparseNetCache` (None: on CUDA devices only).
    """

    def __init__(self, model, height: int, width: int, cache="exact", refresh=None, prepare=None,
                 sync_free: bool | None = None):
        _check_family(model)
        self.model, self.prepare = model, prepare
        net = _net_cache(model, False, CELL, height // CELL, width // CELL, parse_mode(cache), sync_free)
        super().__init__(net, cache, refresh, unit=1.0, cell=CELL)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        m = self.model

        def prepare(raw):  # the model's own arithmetic: encoder((x + 1) / 2) (tiny), encoder(x) (kl)
            x = self.prepare(raw.permute(1, 2, 0)[None]).to(m.dtype)
            return _nhwc((x + 1) / 2 if m.family == "tiny" else x)

        out = [self._frame(f.permute(2, 0, 1), prepare) for f in frames]
        return (torch.cat(out) - m.shift_factor) * m.scaling_factor


class SparseDecoderCache(_SparseCoder):
    """scaled latents (N, C, h, w) -> images (N, 3, 8h, 8w) nominally [-1, 1], as ``model.decode``.
    ``sync_free``: as :class:`SparseEncoderCache`."""

    def __init__(self, model, rows: int, cols: int, cache="exact", refresh=None, unit: float = 127.5,
                 sync_free: bool | None = None):
        _check_family(model)
        self.model = model
        net = _net_cache(model, True, 1, rows, cols, parse_mode(cache), sync_free)
        super().__init__(net, cache, refresh, unit=unit, cell=1)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        m = self.model

        def prepare(raw):  # the model's own arithmetic: Clamp(z / scaling + shift) (tiny; kl: no clamp)
            z = (raw[None] / m.scaling_factor + m.shift_factor).to(m.dtype)
            return _nhwc(Clamp()(z) if m.family == "tiny" else z)

        out = torch.cat([self._frame(z, prepare) for z in latents])
        return out * 2 - 1 if m.family == "tiny" else out
