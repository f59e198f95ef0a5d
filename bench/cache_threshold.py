"""Temporal cache threshold -> hit rate -> PSNR against the uncached output -> time against ``off``.

    python bench/cache_threshold.py [--clip ../shared/data/video/squirrel.mp4] [--frames 24]
                                    [--crop 640x360+160+200 | --crop none] [--modes off,exact,0.5,1,2,4,8]
                                    [--tile 256] [--device auto] [--out bench/results]

Model: TAEF2 with its real weights (../shared/data/weights). Every row uses
``CoderOptions(cache=mode, tile=--tile)`` with the same overlap and normalization, so the only
difference between rows is the cache. Rows take turns frame by frame (row 1 encodes and decodes
frame t, then row 2, ...), so drifts in background load hit every row alike; one untimed
warm-up frame runs first. Per row: encode and decode hit rates, PSNR (mean and min over frames)
of the decoded frames against the ``off`` row's, PSNR against the source frames, and the ratio of
the row's mean per-frame time to the ``off`` row's. Writes cache_threshold.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from codec import bench  # noqa: E402
from codec.coder import CoderOptions  # noqa: E402
from codec.models import load_model  # noqa: E402
from codec.quality import psnr  # noqa: E402
from codec.stages import now  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def crop(frames: np.ndarray, spec: str) -> np.ndarray:
    """'WxH+X+Y' (pixels) or 'none'."""
    if spec == "none":
        return frames
    m = re.fullmatch(r"(\d+)x(\d+)\+(\d+)\+(\d+)", spec)
    if not m:
        raise SystemExit(f"--crop: expected WxH+X+Y or none, got {spec!r}")
    w, h, x, y = map(int, m.groups())
    if y + h > frames.shape[1] or x + w > frames.shape[2]:
        raise SystemExit(f"--crop {spec} does not fit {frames.shape[2]}x{frames.shape[1]} frames")
    return np.ascontiguousarray(frames[:, y:y + h, x:x + w])


def run_rows(frames: np.ndarray, model, modes: list[str], tile: int) -> dict[str, dict]:
    h, w = frames.shape[1:3]
    coders = {m: bench.OursCoder(model, h, w, CoderOptions(cache=m, tile=tile)) for m in modes}
    layouts = {(c.enc.plan.tile, c.enc.plan.overlap, c.enc.global_norm) for c in coders.values()}
    assert len(layouts) == 1, f"rows differ in layout: {layouts}"
    warm = bench.OursCoder(model, h, w, CoderOptions(cache="off", tile=tile))
    warm.decode(warm.encode(frames[:1]))
    rows = {m: {"enc_ms": [], "dec_ms": [], "out": []} for m in modes}
    for t in range(len(frames)):
        for m, c in coders.items():
            t0 = now()
            z = c.encode(frames[t:t + 1])
            t1 = now()
            rows[m]["out"].append(c.decode(z))
            t2 = now()
            rows[m]["enc_ms"].append((t1 - t0) * 1000)
            rows[m]["dec_ms"].append((t2 - t1) * 1000)
    plan = next(iter(coders.values())).enc
    for m, c in coders.items():
        rows[m].update(enc_hits=c.enc.stats.hit_rate, dec_hits=c.dec.stats.hit_rate,
                       enc_hits_per_frame=c.enc.stats.per_frame, dec_hits_per_frame=c.dec.stats.per_frame)
    rows["_layout"] = {"tile": plan.plan.tile, "overlap": plan.plan.overlap,
                       "norm": "global" if plan.global_norm else "tile"}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", type=Path, default=DATA / "video" / "squirrel.mp4")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--crop", default="640x360+160+200", help="WxH+X+Y of the source frames, or none")
    p.add_argument("--modes", default="off,exact,0.5,1,2,4,8")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    weights = DATA / "weights" / "taef2_encoder.pth"
    if not weights.is_file() or not args.clip.is_file():
        print(f"skipped: needs {weights} and {args.clip} (../shared/data)")
        return 0
    modes = args.modes.split(",")
    if modes[0] != "off":
        raise SystemExit("--modes must start with off (the reference row)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = load_model(weights, device=device, dtype=dtype)
    source, _ = bench.read_frames(args.clip, args.frames)
    frames = crop(source, args.crop)
    rows = run_rows(frames, model, modes, args.tile)
    layout = rows.pop("_layout")

    ref = np.concatenate(rows["off"]["out"])
    off_enc, off_dec = np.mean(rows["off"]["enc_ms"]), np.mean(rows["off"]["dec_ms"])
    table = []
    for m in modes:
        r = rows[m]
        out = np.concatenate(r["out"])
        vs_off = np.atleast_1d(psnr(out, ref))
        table.append({"mode": m, "encode_hit_rate": r["enc_hits"], "decode_hit_rate": r["dec_hits"],
                      "psnr_vs_off_mean_db": float(vs_off.mean()), "psnr_vs_off_min_db": float(vs_off.min()),
                      "psnr_vs_source_mean_db": float(np.mean(psnr(out, frames))),
                      "encode_ms_mean": float(np.mean(r["enc_ms"])), "decode_ms_mean": float(np.mean(r["dec_ms"])),
                      "encode_ratio_vs_off": float(np.mean(r["enc_ms"]) / off_enc),
                      "decode_ratio_vs_off": float(np.mean(r["dec_ms"]) / off_dec),
                      "encode_ms": r["enc_ms"], "decode_ms": r["dec_ms"],
                      "encode_hits_per_frame": r["enc_hits_per_frame"],
                      "decode_hits_per_frame": r["dec_hits_per_frame"]})
    h, w = frames.shape[1:3]
    doc = {"device": bench.device_name(model.device), "versions": bench.versions(),
           "clip": f"{args.clip.name}, first {len(frames)} frames, crop {args.crop} -> {w}x{h}",
           "model": f"taef2 ({weights.name}), {str(dtype).removeprefix('torch.')}", "layout": layout,
           "timed": "per frame, per row: FrameEncoder call (uint8 frame -> latents on the host) and FrameDecoder "
                    "call (latents -> uint8 frame on the host), no file writes; rows alternate frame by frame; "
                    "one warm-up frame excluded; ratio = row mean / off mean",
           "rows": table}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cache_threshold.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    (args.out / "cache_threshold.md").write_text(md)
    plot(doc, args.out / "cache_threshold.png")
    print(md)
    return 0


def markdown(doc: dict) -> str:
    lo = doc["layout"]
    lines = [f"# Cache threshold: {doc['clip']}", "",
             f"{doc['model']} on {doc['device']}; tile {lo['tile']} px, overlap {lo['overlap']} px, norm {lo['norm']} "
             "for every row. PSNR vs off: decoded frames of the row against the uncached row's (100 = identical). "
             "Time ratio: mean per-frame time of the row / of `off`, measured in the same run.", "",
             "| cache | enc hits | dec hits | PSNR vs off mean / min dB | PSNR vs source dB | enc time / off | "
             "dec time / off |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["rows"]:
        lines.append(f"| {r['mode']} | {100 * r['encode_hit_rate']:.0f}% | {100 * r['decode_hit_rate']:.0f}% | "
                     f"{r['psnr_vs_off_mean_db']:.1f} / {r['psnr_vs_off_min_db']:.1f} | "
                     f"{r['psnr_vs_source_mean_db']:.2f} | {r['encode_ratio_vs_off']:.2f} | "
                     f"{r['decode_ratio_vs_off']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"][1:]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    labels = [r["mode"] for r in rows]
    a.bar(x - 0.2, [100 * r["encode_hit_rate"] for r in rows], 0.4, label="encode hits %")
    a.bar(x + 0.2, [100 * r["decode_hit_rate"] for r in rows], 0.4, label="decode hits %")
    a2 = a.twinx()
    a2.plot(x, [r["psnr_vs_off_mean_db"] for r in rows], "k.-", label="PSNR vs off (dB)")
    a2.set_ylabel("PSNR vs off, dB")
    a.set(xticks=x, xticklabels=labels, xlabel="cache threshold (uint8 units)", ylabel="hit rate %",
          title="hits and agreement with the uncached output")
    a.legend(loc="upper left", fontsize=7)
    a2.legend(loc="lower right", fontsize=7)
    b.plot(x, [r["encode_ratio_vs_off"] for r in rows], "o-", label="encode")
    b.plot(x, [r["decode_ratio_vs_off"] for r in rows], "s--", label="decode")
    b.axhline(1, color="k", lw=0.8)
    b.set(xticks=x, xticklabels=labels, xlabel="cache threshold (uint8 units)", ylabel="mean time / off",
          title=doc["device"])
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
