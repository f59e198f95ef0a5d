"""Frame-wide GroupNorm statistics for tiled runs ("global" normalization mode).

Per-tile GroupNorm normalizes each tile by its own statistics, so a dark tile and a bright tile of
one frame are normalized differently and tiles drift in tone. In global mode the tiles of one
frame go through the model as one batch; at every GroupNorm each tile contributes the partial
statistics of the region it owns (its core: the cores partition the frame, so each pixel counts
once), the partials are merged into the frame's statistics, and every tile is normalized with
them (``kernels.group_norm_stats`` / ``merge_group_stats`` / ``group_norm_apply``).

The statistics of each GroupNorm call are recorded in call order, so a later frame can replay
them: the temporal cache recomputes only the changed tiles of a frame with the recorded frame
statistics (see ``codec.coder``). Attention stays per tile.
"""

from __future__ import annotations

import contextlib

import torch

import kernels
from codec.models.layers import GroupNormAct


class GlobalNorm:
    """Install with ``with GlobalNorm(module, boxes).sync():`` or ``.replay():`` around a forward.

    boxes: per tile of the batch, its core (y0, y1, x0, x1) in latent units relative to the tile;
    tile_hw: the tile's latent size (the resolution of each GroupNorm input is read from it).
    """

    def __init__(self, module: torch.nn.Module, boxes: list[tuple[int, int, int, int]], tile_hw: tuple[int, int]):
        self.norms = [m for m in module.modules() if isinstance(m, GroupNormAct)]
        self.boxes, self.tile_hw = boxes, tile_hw
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._i = 0

    @contextlib.contextmanager
    def sync(self):
        """Compute frame statistics from the batch (one frame's tiles) and record them."""
        self.recorded = []
        with self._installed(self._sync_hook):
            yield self

    @contextlib.contextmanager
    def replay(self):
        """Normalize with the statistics recorded by the last :meth:`sync`."""
        if not self.recorded:
            raise RuntimeError("GlobalNorm.replay before any sync")
        self._i = 0
        with self._installed(self._replay_hook):
            yield self

    @contextlib.contextmanager
    def _installed(self, hook):
        for m in self.norms:
            m.stats_hook = hook
        try:
            yield
        finally:
            for m in self.norms:
                m.stats_hook = None

    def _sync_hook(self, m: GroupNormAct, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.boxes):
            raise RuntimeError(f"global norm: batch of {x.shape[0]} is not the {len(self.boxes)} tiles of a frame")
        r = x.shape[-2] // self.tile_hw[0], x.shape[-1] // self.tile_hw[1]  # this layer's scale
        parts = []
        for k, (y0, y1, x0, x1) in enumerate(self.boxes):
            core = x[k:k + 1, :, y0 * r[0]:y1 * r[0], x0 * r[1]:x1 * r[1]]
            parts.append(kernels.group_norm_stats(core, m.num_groups))
        count, mean, m2 = kernels.merge_group_stats(parts)
        rstd = torch.rsqrt(m2 / count + m.eps)
        self.recorded.append((mean, rstd))
        return self._apply(m, x, mean, rstd)

    def _replay_hook(self, m: GroupNormAct, x: torch.Tensor) -> torch.Tensor:
        mean, rstd = self.recorded[self._i]
        self._i += 1
        return self._apply(m, x, mean, rstd)

    @staticmethod
    def _apply(m: GroupNormAct, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return kernels.group_norm_apply(x, mean.expand(n, -1), rstd.expand(n, -1), m.num_groups,
                                        m.weight, m.bias, act=m.act)
