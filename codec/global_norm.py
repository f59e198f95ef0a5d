"""Frame-wide GroupNorm statistics for tiled runs ("global" normalization mode).

Per-tile GroupNorm normalizes each tile by its own statistics, so a dark tile and a bright tile of
one frame are normalized differently and tiles drift in tone. In global mode the tiles of one
frame go through the model as one batch; at every GroupNorm each tile contributes the partial
statistics of the region it owns (its core: the cores partition the frame, so each pixel counts
once), the partials are merged into the frame's statistics, and every tile is normalized with
them (``kernels.group_norm_stats`` / ``merge_group_stats`` / ``group_norm_apply``).

The statistics are kept per layer, keyed by the layer's qualified name in the model, so a later
call can replay them for any subset of the tiles in any number of batches: the temporal cache
recomputes only the changed tiles of a frame with the recorded frame statistics (see
``codec.coder``). Attention stays per tile.

Usage (the normalizer is passed per call; nothing is installed on the model)::

    gn = GlobalNorm(layout.core_boxes(), layout.tile_hw)
    z = model.encode(all_tiles_of_a_frame, norm=gn.measure)  # records gn.stats
    z_some = model.encode(some_tiles, norm=gn.replay)          # any tiles, any batch size
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from codec.models.layers import GroupNormAct


@dataclass(frozen=True)
class LayerStats:
    """One GroupNorm layer's frame statistics: mean and rstd = 1/sqrt(var + eps), each (1, G) fp32."""

    mean: torch.Tensor
    rstd: torch.Tensor


class GlobalNorm:
    """Frame statistics of every GroupNorm layer of a model, for one tile layout.

    boxes: per tile of a frame (layout order), its core (y0, y1, x0, x1) in latent units relative
    to the tile; tile_hw: the tile's latent size (each layer's scale is read from it).
    ``stats``: layer name -> :class:`LayerStats` of the last :meth:`measure` of that layer.

    :meth:`measure` and :meth:`replay` are normalizers, ``(name, layer, x) -> normalized x``: pass
    one as ``norm=`` to ``Autoencoder.encode``/``decode``.
    """

    def __init__(self, boxes: list[tuple[int, int, int, int]], tile_hw: tuple[int, int]):
        self.boxes, self.tile_hw = list(boxes), tuple(tile_hw)
        self.stats: dict[str, LayerStats] = {}

    def measure(self, name: str, layer: GroupNormAct, x: torch.Tensor) -> torch.Tensor:
        """x (K, C, h, w): the K tiles of one frame in layout order, at any of the model's scales.
        Merges the statistics of the tiles' cores, records them as ``stats[name]``, applies them."""
        if x.shape[0] != len(self.boxes):
            raise RuntimeError(f"global norm: batch of {x.shape[0]} is not the {len(self.boxes)} tiles of a frame")
        ry, rx = x.shape[-2] / self.tile_hw[0], x.shape[-1] / self.tile_hw[1]  # this layer's scale
        parts = []
        for k, (y0, y1, x0, x1) in enumerate(self.boxes):
            core = x[k:k + 1, :, round(y0 * ry):round(y1 * ry), round(x0 * rx):round(x1 * rx)]
            parts.append(kernels.group_norm_stats(core, layer.num_groups))
        count, mean, m2 = kernels.merge_group_stats(parts)
        self.stats[name] = LayerStats(mean, torch.rsqrt(m2 / count + layer.eps))
        return self._apply(name, layer, x)

    def replay(self, name: str, layer: GroupNormAct, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, h, w): any tiles of the measured frame layout; normalized with ``stats[name]``."""
        if name not in self.stats:
            raise RuntimeError(f"global norm: no statistics recorded for layer {name!r} (replay before measure)")
        return self._apply(name, layer, x)

    def _apply(self, name: str, layer: GroupNormAct, x: torch.Tensor) -> torch.Tensor:
        s, n = self.stats[name], x.shape[0]
        return kernels.group_norm_apply(x, s.mean.expand(n, -1), s.rstd.expand(n, -1), layer.num_groups,
                                        layer.weight, layer.bias, act=layer.act)
