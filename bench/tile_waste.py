"""Waste factor of the tile planner before and after: pixels of all tiles of a frame / its pixels.

    python bench/tile_waste.py

Writes bench/results/tile_waste.json and tile_waste.md. Pure arithmetic from the activation
estimate (`codec.tiling.activation_bytes`), nothing is run or timed, so no GPU is needed: at
1920x1080 and 3840x2160, for the SD 1.x KL config (the real widths; the network is not built)
and the built-in default tiny model, fp16 and fp32, encoder and decoder, over memory budgets
that force tiling. The estimate is the one a CPU model gets (torch GroupNorm temporaries, the
mid-block attention matrix materialized); on CUDA (Triton GroupNorm, fused attention) a budget
holds larger tiles.

"Before" is the planner as it was up to commit 1c6591d, re-implemented below ONLY as this
baseline: the largest square tile of the ladder 1024, 768, ..., 64 px that fits, overlap a
quarter of it, tiles of exactly that size spread evenly over each axis. "After" is
`codec.tiling.plan_tiles` with its default overlap, which is the overlap the old plan asked
(checked here: the same plan as with that overlap given), so both cut with the same overlap.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codec.bench import versions  # noqa: E402
from codec.models import load_model  # noqa: E402
from codec.models.config import preset  # noqa: E402
from codec.tiling import activation_bytes, plan_tiles  # noqa: E402

OUT = ROOT / "bench" / "results"
SIZES = {"1080p": (1080, 1920), "4K": (2160, 3840)}
GIB = 2**30
BUDGETS = {"sd15": [2, 4, 8, 16], "default": [0.25, 0.5, 1, 2]}  # GiB; 4 GiB is the CPU default
H200_DEFAULT = 0.7 * 139  # GiB: codec's default budget on an empty H200 (70% of free memory)
USER_TILES = [256, 512, 768, 1024]  # px, --tile T --overlap T/4


# ---- the old planner: the 'before' baseline only -------------------------------------------------

OLD_LADDER = (1024, 768, 512, 384, 256, 192, 128, 96, 64)


def old_axis_tiles(size: int, tile: int, overlap: int) -> int:
    """Tiles of exactly ``tile`` px (clipped to the frame) the old layout placed along an axis."""
    return 1 if tile >= size else math.ceil((size - tile) / (tile - overlap)) + 1


def old_waste(h: int, w: int, tile: int, overlap: int) -> tuple[int, float]:
    """(tile count, waste factor) of the old layout of square ``tile`` px tiles."""
    th, tw = min(tile, h), min(tile, w)
    n = old_axis_tiles(h, tile, overlap) * old_axis_tiles(w, tile, overlap)
    return n, n * th * tw / (h * w)


def old_plan(model, h: int, w: int, budget: int, dtype, decode: bool) -> tuple[int, int] | None:
    """(tile, overlap) px the old planner chose; None for whole frames (raises when nothing fits)."""
    def cost(th: int, tw: int) -> int:
        return activation_bytes(model, th * tw, dtype, decode=decode)

    if cost(h, w) <= budget:
        return None
    tile = next((t for t in OLD_LADDER if t < max(h, w) and cost(min(t, h), min(t, w)) <= budget), None)
    if tile is None:
        raise ValueError("no tile of the old ladder fits")
    return tile, max(model.downscale * 4, tile // 4 // model.downscale * model.downscale)


# ---- after ------------------------------------------------------------------------------------

def new_plan(model, h: int, w: int, budget: int, dtype, decode: bool, **kwargs) -> dict:
    plan = plan_tiles(model, h, w, budget, dtype, decode=decode, **kwargs)
    lay = plan.layout(h, w, model.downscale)
    return {"tile_hw": list(plan.tile_hw) if plan.tile_hw else None, "overlap": plan.overlap,
            "tiles": len(lay), "waste": round(lay.waste, 4)}


def sd15():
    cfg = preset("sd15")
    return SimpleNamespace(config=cfg, downscale=cfg.downscale, device=torch.device("cpu"))


def budget_rows(models: dict) -> list[dict]:
    rows = []
    for name, model in models.items():
        for size, (h, w) in SIZES.items():
            for dtype in (torch.float16, torch.float32):
                for gib in [*BUDGETS[name], H200_DEFAULT]:
                    for decode in (False, True):
                        budget = int(gib * GIB)
                        row = {"model": name, "size": size, "dtype": str(dtype).removeprefix("torch."),
                               "budget_gib": round(gib, 2), "direction": "decode" if decode else "encode"}
                        before = old_plan(model, h, w, budget, dtype, decode)
                        row["after"] = new_plan(model, h, w, budget, dtype, decode)
                        if before is None:
                            row["before"] = {"tile": None, "overlap": 0, "tiles": 1, "waste": 1.0}
                        else:
                            n, waste = old_waste(h, w, *before)
                            row["before"] = {"tile": before[0], "overlap": before[1], "tiles": n,
                                             "waste": round(waste, 4)}
                            same = new_plan(model, h, w, budget, dtype, decode, overlap=before[1])
                            assert same == row["after"], (row, same)  # the default overlap is the old one
                        rows.append(row)
    return rows


def user_tile_rows(model) -> list[dict]:
    """--tile T --overlap T/4, budget no limit: fixed T px tiles before, T the largest side after."""
    rows = []
    for size, (h, w) in SIZES.items():
        for t in USER_TILES:
            n, waste = old_waste(h, w, t, t // 4)
            after = new_plan(model, h, w, 1 << 50, torch.float16, True, tile=t, overlap=t // 4)
            rows.append({"size": size, "tile": t, "overlap": t // 4,
                         "before": {"tiles": n, "waste": round(waste, 4)}, "after": after})
    return rows


def hw(d: dict) -> str:
    return "whole" if d["tile_hw"] is None else "{}x{}".format(*d["tile_hw"])


def span(rows: list[dict], key: str) -> str:
    """'min-max' of the waste factors of ``rows[i][key]``."""
    return f"{min(r[key]['waste'] for r in rows):.2f}-{max(r[key]['waste'] for r in rows):.2f}"


def markdown(report: dict) -> str:
    lines = ["# Tile planner waste factor, before and after", "",
             "Waste factor = pixels of all tiles of a frame / the frame's pixels (1.0: no pixel computed",
             "twice). Arithmetic from `activation_bytes` (the estimate a CPU model gets), nothing timed;",
             "no GPU figure here. Made by `python bench/tile_waste.py` "
             f"({report['date']}, git {report['versions']['git']}).", "",
             "Before: the old ladder planner (square tile of 1024/768/.../64 px, overlap a quarter of",
             "it, tiles of exactly that size spread evenly). After: `plan_tiles`, default options; its",
             "default overlap is the old plan's, so both columns cut with the same overlap. Budget",
             f"{H200_DEFAULT:.1f} GiB = the default on an empty H200 (70% of free memory); 4 GiB is the CPU",
             "default.", "",
             "| model | size | dtype | budget GiB | direction | before: tile/overlap px | tiles | waste "
             "| after: tile HxW px | tiles | waste |",
             "| --- | --- | --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in report["budgets"]:
        b, a = r["before"], r["after"]
        old = "whole" if b["tile"] is None else f"{b['tile']}/{b['overlap']}"
        lines.append(f"| {r['model']} | {r['size']} | {r['dtype']} | {r['budget_gib']} | {r['direction']} | {old} | "
                     f"{b['tiles']} | {b['waste']:.3f} | {hw(a)} | {a['tiles']} | {a['waste']:.3f} |")
    tiled = [r for r in report["budgets"] if r["before"]["tile"] is not None]
    for size in SIZES:
        sel = [r for r in tiled if r["size"] == size]
        if sel:
            lines += ["", f"{size}, the {len(sel)} rows that tile: waste before {span(sel, 'before')}, after "
                          f"{span(sel, 'after')}; tiles per frame, summed over those rows: before "
                          f"{sum(r['before']['tiles'] for r in sel)}, after {sum(r['after']['tiles'] for r in sel)}."]
    lines += ["", "Given `--tile T --overlap T/4` (SD 1.x decoder fp16, no budget limit): before, tiles of",
              "exactly T px; after, T is the largest side and tiles shrink to what the overlap needs.", "",
              "| size | --tile/--overlap | before tiles | before waste | after tile HxW | after tiles | after waste |",
              "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in report["user_tiles"]:
        a = r["after"]
        lines.append(f"| {r['size']} | {r['tile']}/{r['overlap']} | {r['before']['tiles']} | "
                     f"{r['before']['waste']:.3f} | {hw(a)} | {a['tiles']} | {a['waste']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    models = {"sd15": sd15(), "default": load_model("default")}
    report = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "device": "none (arithmetic)",
              "estimate": "activation_bytes of a CPU model", "budgets": budget_rows(models),
              "user_tiles": user_tile_rows(models["sd15"])}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tile_waste.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (OUT / "tile_waste.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
