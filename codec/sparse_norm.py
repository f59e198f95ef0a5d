"""Frozen GroupNorm statistics for the sparse per-layer cache (codec.sparse_cache), shared by the
KL family (codec.sparse_kl) and the tiny family's GroupNorm blocks (taef2's middle blocks).

GroupNorm statistics span the whole frame, so a cell cannot be recomputed alone with fresh ones.
Instead a dense pass (a refresh) measures every GroupNorm's statistics and records them
(:class:`FrozenStats`); until the next refresh each GroupNorm is a per-channel multiply-add and
its activation, elementwise per cell (:class:`NormStep`), and the 1x1 convs around it run per cell
too (:class:`PointwiseStep`). Dense runs of a step between refreshes (the rest of a frame whose
change spread too far) apply the recorded statistics as well, so dense and packed cells agree.

The frozen statistics stand while the statistics of every GroupNorm's input, as a sparse pass
leaves it, stay within tolerance of those at the refresh: per group, the mean moved by at most
``STAT_FACTOR * T / 255`` of the frozen standard deviation and the standard deviation by at most
that fraction of itself (on every 4th pixel of the large buffers, the same pixels at the refresh
and now, see ``NormNetCache._probe``). With ``STAT_FACTOR`` 4 this is about T levels of footage
whose standard deviation is 64 levels: the rule the tile cache applies to replayed global-norm
statistics (codec.coder), in each layer's own units. Checking only the network input does not
bound the deeper layers: in a small random KL decoder, one latent px of 768 changed by 13 levels
(the input's statistics within T = 4) moved the deep statistics enough for an output error of
0.57. Beyond the tolerance :class:`NormNetCache` refreshes: a dense pass that measures every
GroupNorm again (the sparse pass that found it counts in the frame's FLOPs too). With tolerance 0
frozen statistics are exact only for an identical frame, so any change refreshes at once. A
refresh of this kind keeps the coder's reference (the cache is the dense result for that input):
the hit rate counts input cells taken from the reference, the FLOP fraction the work.

Why frozen statistics for taef2 too (measured on smpte-2997, 480x272, T = 4, first sparse frame):
recomputed densely with the frame's own statistics and merged per cell, its decoder's three middle
blocks kept 39%, 54% and 95% of the cells (every cell shifts a little with fresh statistics),
so everything after them ran densely, although the statistics had moved by only 0.4-0.65 T/255.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .models.layers import GroupNormAct
from .models.tiny import GroupNormReLUBranch
from .sparse_cache import SparseNetCache, Unsupported

STAT_FACTOR = 4.0  # frozen GroupNorm statistics hold while they move by <= STAT_FACTOR * T/255 (see above)


class FrozenStats:
    """The GroupNorm statistics of one layer recorded at the last refresh: ``mean``, ``rstd``
    (1, G) fp32, or None before the first refresh (the next dense run measures them).

    With the statistics fixed, GroupNorm and its affine are one per-channel map x * a + b
    (``a = rstd w``, ``b = bias - mean rstd w``, fp32 (C,)), applied as one multiply-add and the
    layer's activation (SiLU for KL, ReLU for taef2, or none): the same on every device and
    layout, where the CPU reference of ``kernels.group_norm_apply`` regroups a channels_last
    tensor through copies.
    """

    def __init__(self, norm: GroupNormAct):
        if norm.act not in ("silu", "relu", None):
            raise Unsupported(f"sparse cache: GroupNorm activation {norm.act!r} is not supported (silu, relu, none)")
        self.norm = norm
        self.mean: torch.Tensor | None = None
        self.rstd: torch.Tensor | None = None
        self._affine: tuple[torch.Tensor, torch.Tensor] | None = None

    def clear(self) -> None:
        self.mean = self.rstd = self._affine = None

    def measure(self, x: torch.Tensor) -> None:
        """Record the statistics of x (1, C, H, W): a whole frame."""
        gn = self.norm
        count, mean, m2 = kernels.group_norm_stats(x, gn.num_groups)
        self.mean, self.rstd = mean, torch.rsqrt(m2 / count + gn.eps)
        per_group = gn.num_channels // gn.num_groups
        rstd, mean = self.rstd[0].repeat_interleave(per_group), mean[0].repeat_interleave(per_group)
        a = rstd * gn.weight.float() if gn.weight is not None else rstd
        b = (gn.bias.float() if gn.bias is not None else 0) - mean * a
        self._affine = (a, b)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm (+ the layer's activation) of x (N, C, H, W) with the recorded statistics,
        measured on x (N == 1: a whole frame) first when none are recorded. Same dtype and layout."""
        if self._affine is None:
            self.measure(x)
        a, b = (t.to(x.dtype).view(1, -1, 1, 1) for t in self._affine)
        y = torch.addcmul(b, x, a)
        if self.norm.act == "silu":
            return F.silu(y)
        return F.relu(y) if self.norm.act == "relu" else y


@dataclass
class CellStep:
    """What the per-cell steps share: buffers ``src`` -> ``dst``, px per cell at both ends, no
    residual or ReLU of their own; per cell with no halo unless a subclass says otherwise, so a
    packed batch runs :meth:`dense` on its patches."""

    src: int
    dst: int
    scale_in: int
    scale_out: int
    halo = 0
    zero_pad = False
    residual = None
    relu = False

    def dense(self, x: torch.Tensor, res) -> torch.Tensor:
        raise NotImplementedError

    def packed(self, patches: torch.Tensor) -> torch.Tensor:
        return self.dense(patches.permute(0, 3, 1, 2), None).permute(0, 2, 3, 1)


@dataclass
class NormStep(CellStep):
    """GroupNorm + activation with frozen statistics: elementwise per cell, no halo."""

    stats: FrozenStats

    def flops_per_cell(self) -> int:
        return 0  # elementwise: a few operations per element against hundreds for a conv

    def dense(self, x: torch.Tensor, res) -> torch.Tensor:
        return self.stats.apply(x)


@dataclass
class PointwiseStep(CellStep):
    """A 1x1 conv (KL's ResNet shortcut and post_quant_conv, taef2's expand and project): per
    cell, no halo. ``residual``: a buffer added to its output (taef2's ``x + project(...)``)."""

    conv: nn.Conv2d
    residual: int | None = None

    def flops_per_cell(self) -> int:
        return 2 * self.conv.weight.numel() * self.scale_out ** 2

    def dense(self, x: torch.Tensor, res: torch.Tensor | None) -> torch.Tensor:
        y = self.conv(x)
        return y if res is None else y + res  # the sparse path adds the residual after packed()


def pool_steps(pool: GroupNormReLUBranch, src: int, dst: int, scale: int) -> tuple[list[CellStep], list[int]]:
    """The steps of taef2's ``x + pool(x)`` (``x`` buffer ``src``, the new buffers numbered from
    ``dst`` on): expand (1x1), GroupNorm+ReLU with frozen statistics, project (1x1) plus ``x``.
    Returns the steps and the channel count of each new buffer (the last one holds the sum)."""
    if not isinstance(pool, GroupNormReLUBranch) or not isinstance(pool.norm, GroupNormAct):
        raise Unsupported(f"sparse cache: block branch {type(pool).__name__} is not supported")
    for conv in (pool.expand, pool.project):
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
            raise Unsupported(f"sparse cache: branch conv {conv} is not a 1x1 conv")
    steps = [PointwiseStep(src, dst, scale, scale, conv=pool.expand),
             NormStep(dst, dst + 1, scale, scale, stats=FrozenStats(pool.norm)),
             PointwiseStep(dst + 1, dst + 2, scale, scale, conv=pool.project, residual=src)]
    return steps, [pool.expand.out_channels, pool.norm.num_channels, pool.project.out_channels]


class NormNetCache(SparseNetCache):
    """``SparseNetCache`` whose GroupNorm steps (any step with a :class:`FrozenStats` ``stats``)
    keep the statistics of the last refresh while they stay within tolerance (see the module
    docstring). It owns the check's state: ``probes``, the input statistics of each GroupNorm at
    the refresh; ``stat_refreshes``, dense passes forced by the statistics. The check reads one
    value on the host after each sparse pass: on the device path (``sync_free``) a second wait per
    frame besides the counts."""

    def __init__(self, layers, scale: int, rows: int, cols: int, threshold: float | None, device: torch.device,
                 sync_free: bool = False):
        super().__init__(layers, scale, rows, cols, threshold, device, sync_free)
        self.norms = [st for st in self.steps if isinstance(getattr(st, "stats", None), FrozenStats)]
        self.probes: list[tuple[torch.Tensor, torch.Tensor]] = []  # per norm: _probe() at the refresh
        self.stat_refreshes = 0

    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A refresh: every GroupNorm measures the statistics of this frame and records them."""
        for st in self.norms:
            st.stats.clear()
        out = super().dense(x)
        if self.threshold:
            self.probes = [self._probe(st) for st in self.norms]
        return out

    def sparse(self, x: torch.Tensor, changed: torch.Tensor, capacity: list[int] | None = None
               ) -> tuple[torch.Tensor, int]:
        n = len(self.steps)
        # nothing changed: the cache is the result for this input (a dense merged step included);
        # the device path (capacity) does not read the mask and runs its deferred cells instead
        if (capacity is None or self.threshold == 0) and not changed.any():
            self.counts, self.ran = [0] * n, [0] * n
            return self.buffers[-1], 0
        flops = 0
        if self.threshold > 0:
            out, flops = super().sparse(x, changed, capacity)
            if self.stats_moved() <= STAT_FACTOR * self.threshold / 255:
                return out, flops
        self.stat_refreshes += 1  # frozen statistics no longer fit this frame
        self.counts, self.ran = [self.cells] * n, [self.cells] * n
        self.readback = None  # the device path: no deferred cells are left, no counts to plan from
        out, dense = self.dense(x)
        return out, flops + dense

    def _probe(self, st) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) (1, G) fp32 of the GroupNorm input; on buffers of 4+ px per cell and at
        least 2^16 px, of every 4th pixel in each direction (every cell sampled alike, 4096+
        samples): compared between the same pixels at two times, a static region adds no
        difference, and the large buffers are read at 1/16 (reading them whole cost about a third
        of a dense pass on the CPU). Smaller buffers are read whole: few samples are noisy."""
        x, norm = self.buffers[st.src], st.stats.norm
        if st.scale_in >= 4 and x.shape[-2] * x.shape[-1] >= 1 << 16:
            x = x[..., ::4, ::4]
        count, mean, m2 = kernels.group_norm_stats(x, norm.num_groups)
        return mean, (m2 / count + norm.eps).sqrt()

    def stats_moved(self) -> float:
        """The largest move of a GroupNorm's input statistics since the refresh, over every layer
        and group, in units of the frozen statistics: |mean - mean0| / std0 and |std / std0 - 1|
        (on the probed pixels, see :meth:`_probe`; one host sync). 0.0 for a net with none."""
        moves = [torch.zeros((), device=self.device)]
        for st, (mean0, std0) in zip(self.norms, self.probes):
            mean, std = self._probe(st)
            moves.append(torch.maximum((mean - mean0).abs() * st.stats.rstd, (std / std0 - 1).abs()).max())
        return torch.stack(moves).max().item()
