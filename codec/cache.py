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

import numpy as np
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
        self.valid: torch.Tensor | None = None  # (K,) bool: ref_out is finite (may be reused)
        self.age: torch.Tensor | None = None  # (K,) frames since each tile was computed
        self.computed: list[int] = []  # per frame of the last schedule: tiles it computes
        self._pending: torch.Tensor | None = None  # (K,) index into this batch's computed tiles, or -1

    def hits(self, tiles: torch.Tensor) -> torch.Tensor:
        """(K,) bool on the device, no host sync: which tiles of one frame (K, ...) may reuse
        the cached result."""
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
        if self.valid is not None and self.valid.shape[0] == k:
            ok &= self.valid  # a non-finite cached result (fp16 overflow) is never reused
        return ok

    def schedule(self, tiles: torch.Tensor, gate=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decide a batch of N frames, (N, K, ...) tiles, in frame order.

        ``gate(t, hit) -> hit``: called per frame with its (K,) bool device hits, returns the
        hits it keeps (the coder's global-norm replay rule); device tensors only, no host read.

        Returns ``compute`` (M,) flat indices (n*K + k) of the tiles to run through the model, and
        ``source`` (N, K): for each tile, i >= 0 = the i-th computed tile, or -1 - k = the cached
        result of position k; ``computed`` holds each frame's count of computed tiles. Then
        :meth:`gather` the tiles, then :meth:`commit` the M results (in that order: commit
        overwrites the older results that gather may still need).

        Every decision stays on the device; the one host sync is reading which tiles to compute
        (their count sizes the model's batches), once per call; none with ``off``.
        """
        n, k = tiles.shape[:2]
        dev = tiles.device
        positions = torch.arange(k, device=dev)
        if self.age is None or self.age.shape[0] != k:
            self.age = torch.zeros(k, dtype=torch.long, device=dev)
        if not self.enabled:  # every tile is computed, known without looking at the device
            self.computed = [k] * n
            for _ in range(n):
                self.stats.add(0, k)
            self._pending = (n - 1) * k + positions
            return torch.arange(n * k, device=dev), torch.arange(n * k, device=dev).view(n, k)
        miss = torch.empty((n, k), dtype=torch.bool, device=dev)
        for t in range(n):
            hit = self.hits(tiles[t])
            if gate is not None:
                hit = gate(t, hit)
            miss[t] = ~hit
            self._remember(tiles[t], hit)
        host = np.array(miss.tolist(), dtype=bool).reshape(n, k)  # the one host sync
        self.computed = host.sum(1).tolist()
        for m in self.computed:
            self.stats.add(k - m, k)
        compute = torch.from_numpy(np.flatnonzero(host))
        if dev.type == "cuda":  # pinned: the upload does not wait for the device
            compute = compute.pin_memory().to(dev, non_blocking=True)
        # The i-th computed tile: its rank among the misses; a hit takes the newest result of its
        # position, computed earlier in this batch (pending >= 0) or cached (-1 - k).
        rank = (torch.cumsum(miss.flatten(), 0) - 1).view(n, k)
        pending = torch.full((k,), -1, dtype=torch.long, device=dev)
        source = torch.empty((n, k), dtype=torch.long, device=dev)
        for t in range(n):
            pending = torch.where(miss[t], rank[t], pending)
            source[t] = torch.where(pending >= 0, pending, -1 - positions)
        self._pending = pending
        return compute, source

    def _remember(self, tiles: torch.Tensor, hit: torch.Tensor | None) -> None:
        """After one frame: its computed tiles (``hit`` False, None = all) become the stored
        inputs, the tiles' ages advance (device ops only)."""
        if hit is None:
            self.age.zero_()
        else:
            self.age = torch.where(hit, self.age + 1, 0)
        if not self.enabled:
            return
        if hit is None or self.ref_in is None or self.ref_in.shape != tiles.shape:
            self.ref_in = tiles.clone()
        else:
            keep = hit.view(-1, *[1] * (tiles.dim() - 1))
            self.ref_in = torch.where(keep, self.ref_in, tiles)

    def commit(self, outputs: torch.Tensor) -> None:
        """Store the newest result of each position from the M ``outputs`` (``compute`` order),
        and whether it is finite (device ops only)."""
        if not self.enabled or outputs.shape[0] == 0:
            return
        pending = self._pending
        fresh = pending >= 0
        newest = outputs[pending.clamp_min(0)]  # (K, ...): garbage where not fresh, masked below
        finite = torch.isfinite(newest).flatten(1).all(1)
        if self.ref_out is None or self.ref_out.shape[0] != pending.shape[0]:
            self.ref_out, self.valid = newest, finite  # the first batch computes every position
            return
        self.ref_out = torch.where(fresh.view(-1, *[1] * (outputs.dim() - 1)), newest.to(self.ref_out.dtype),
                                   self.ref_out)
        self.valid = torch.where(fresh, finite, self.valid)

    def gather(self, source: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """(N*K, ...) results in tile order from the computed ``outputs`` and the cache."""
        flat = source.flatten()
        if outputs.shape[0] == 0:  # everything reused
            return self.ref_out[-1 - flat]
        if self.ref_out is None:  # nothing cached: every source is a computed tile
            return outputs[flat]
        pool = torch.cat([outputs, self.ref_out.to(outputs.dtype)])
        idx = torch.where(flat >= 0, flat, outputs.shape[0] - 1 - flat)  # -1 - k -> M + k
        return pool[idx]
