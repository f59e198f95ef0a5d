"""Temporal tile cache: reuse a tile's result while its input has not changed.

Per tile position the cache keeps the input that produced the cached result, and the result.
A new frame's tile is compared with that stored input, never with the previous frame, so small
changes cannot accumulate into drift: a tile is recomputed as soon as it has moved away from the
input its result came from by more than the threshold.

Modes:
- ``off``: every tile is computed.
- ``exact``: reuse only on bit-identical input; the output is bit-identical to ``off``.
- a threshold ``t`` >= 0 (uint8 units for pixels; see ``unit``): reuse when the tile's mean
  absolute change is <= t and its largest change <= MAX_FACTOR * t (a small object moving into
  a static tile changes few pixels a lot: the max catches it where the mean would not).
``refresh``: a tile is recomputed at least every ``refresh`` frames, whatever its change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import kernels

MAX_FACTOR = 8.0


def parse_mode(mode: str | float | None) -> float | None:
    """'off' -> None, 'exact' -> 0.0, a number (or its text) -> that threshold."""
    if mode is None or mode == "off":
        return None
    if mode == "exact":
        return 0.0
    try:
        t = float(mode)
    except (TypeError, ValueError):
        raise ValueError(f"--cache must be off, exact or a threshold in uint8 units, got {mode!r}") from None
    if not t >= 0:  # also rejects NaN
        raise ValueError(f"--cache threshold must be >= 0 (uint8 units), got {mode!r}")
    return t


@dataclass
class CacheStats:
    """Hit counts: ``per_frame`` holds each frame's hit rate in [0, 1]."""

    tiles: int = 0
    hits: int = 0
    per_frame: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.tiles if self.tiles else 0.0

    def add(self, hits: int, tiles: int) -> None:
        self.tiles += tiles
        self.hits += hits
        self.per_frame.append(hits / tiles if tiles else 0.0)


class TemporalCache:
    """Cache over K tile positions. ``unit`` converts input values to threshold units (1 for
    uint8 pixels; 127.5 for latents, read as if they spanned [-1, 1] like pixels do)."""

    def __init__(self, mode: str | float | None = "exact", refresh: int | None = None, unit: float = 1.0):
        self.threshold = parse_mode(mode)
        if refresh is not None and refresh < 1:
            raise ValueError(f"--refresh must be >= 1 frame, got {refresh}")
        self.refresh, self.unit = refresh, unit
        self.stats = CacheStats()
        self.reset()

    @property
    def enabled(self) -> bool:
        return self.threshold is not None

    def reset(self) -> None:
        self.ref_in: torch.Tensor | None = None  # (K, ...) inputs that produced ref_out
        self.ref_out: torch.Tensor | None = None  # (K, ...) results
        self.age: torch.Tensor | None = None  # (K,) frames since each tile was computed
        self._pending: torch.Tensor | None = None  # (K,) index into this batch's computed tiles, or -1

    def hits(self, tiles: torch.Tensor) -> torch.Tensor:
        """(K,) bool: which tiles of one frame (K, ...) may reuse the cached result."""
        k = tiles.shape[0]
        if not self.enabled or self.ref_in is None or self.ref_in.shape != tiles.shape:
            return torch.zeros(k, dtype=torch.bool, device=tiles.device)
        max_abs, mean_abs = kernels.tile_change(tiles, self.ref_in)
        max_abs, mean_abs = max_abs * self.unit, mean_abs * self.unit
        if self.threshold == 0:
            ok = max_abs == 0
        else:
            ok = (mean_abs <= self.threshold) & (max_abs <= MAX_FACTOR * self.threshold)
        if self.refresh is not None:
            ok &= self.age.to(ok.device) + 1 < self.refresh
        return ok

    def schedule(self, tiles: torch.Tensor, force: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Decide a batch of N frames, (N, K, ...) tiles, in frame order (``force``: no reuse).

        Returns ``compute`` (M,) flat indices (n*K + k) of the tiles to run through the model, and
        ``source`` (N, K): for each tile, i >= 0 = the i-th computed tile, or -1 - k = the cached
        result of position k. Then :meth:`gather` the tiles, then :meth:`commit` the M results
        (in that order: commit overwrites the older results that gather may still need).
        """
        n, k = tiles.shape[:2]
        dev = tiles.device
        pending = torch.full((k,), -1, dtype=torch.long, device=dev)
        source = torch.empty((n, k), dtype=torch.long, device=dev)
        compute: list[torch.Tensor] = []
        count = 0
        if self.age is None or self.age.shape[0] != k:
            self.age = torch.zeros(k, dtype=torch.long, device=dev)
        for t in range(n):
            hit = torch.zeros(k, dtype=torch.bool, device=dev) if force else self.hits(tiles[t])
            miss = (~hit).nonzero().flatten()
            new = torch.arange(count, count + miss.numel(), device=dev)
            count += miss.numel()
            compute.append(t * k + miss)
            pending[miss] = new
            # A hit reuses the newest result of its position: computed in this batch, or cached.
            src = torch.where(pending >= 0, pending, -1 - torch.arange(k, device=dev))
            source[t] = src
            if self.enabled:
                if self.ref_in is None:
                    self.ref_in = tiles[t].clone()
                else:
                    self.ref_in[miss] = tiles[t][miss]
            self.age += 1
            self.age[miss] = 0
            self.stats.add(int(hit.sum()), k)
        self._pending = pending
        return torch.cat(compute), source

    def commit(self, outputs: torch.Tensor) -> None:
        """Store the newest result of each position from the M ``outputs`` (``compute`` order)."""
        if not self.enabled or outputs.shape[0] == 0:
            return
        pending = self._pending
        fresh = (pending >= 0).nonzero().flatten()
        if self.ref_out is None:
            self.ref_out = torch.empty((pending.shape[0], *outputs.shape[1:]), dtype=outputs.dtype,
                                       device=outputs.device)
        self.ref_out[fresh] = outputs[pending[fresh]]

    def gather(self, source: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """(N*K, ...) results in tile order from the computed ``outputs`` and the cache."""
        flat = source.flatten()
        if outputs.shape[0] == 0:  # everything reused
            return self.ref_out[-1 - flat]
        if self.ref_out is None or (flat >= 0).all():
            return outputs[flat]
        pool = torch.cat([outputs, self.ref_out.to(outputs.dtype)])
        idx = torch.where(flat >= 0, flat, outputs.shape[0] - 1 - flat)  # -1 - k -> M + k
        return pool[idx]
