"""Tiled against untiled: PSNR, relative error and difference images; a 4K frame in a budget.

    python bench/tiling_report.py [--skip-4k]

Writes bench/results/tiling.json, tiling.md and tiling_diff_<mode>.png (|tiled - untiled| x 10,
so a seam would show as a bright line along the tile cuts). Uses the real taef2 weights from
../shared/data (skips with a message when absent) and a small random KL model for the two
normalization modes. CPU figures on this machine; nothing here is a GPU figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codec.coder import CoderOptions, FrameDecoder, FrameEncoder  # noqa: E402
from codec.models import build, load_model  # noqa: E402
from codec.quality import psnr  # noqa: E402
from codec.video import FrameReader  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "results"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def save_diff(path: Path, a: np.ndarray, b: np.ndarray) -> None:
    from PIL import Image

    diff = np.clip(np.abs(a.astype(np.int16) - b.astype(np.int16)) * 10, 0, 255).astype(np.uint8)
    Image.fromarray(diff).save(path)


def taef2_section(tile: int, overlap: int) -> dict:
    model = load_model(DATA / "weights" / "taef2_encoder.pth")
    rows = {}
    for clip, index in (("clip_03_sintel.mp4", 100), ("squirrel.mp4", 10)):
        with FrameReader(DATA / "video" / clip, start=index, end=index + 1) as r:
            frames = next(iter(r)).frames
        h, w = frames.shape[1:3]
        z0 = FrameEncoder(model, h, w, CoderOptions(cache="off"))(frames)
        f0 = FrameDecoder(model, h, w, CoderOptions(cache="off"))(z0).numpy()
        for norm in ("tile", "global"):
            opts = CoderOptions(tile=tile, overlap=overlap, norm=norm, cache="off")
            enc, dec = FrameEncoder(model, h, w, opts), FrameDecoder(model, h, w, opts)
            z = enc(frames)
            f = dec(z).numpy()
            key = f"{clip}:{norm}"
            rows[key] = {"size": f"{w}x{h}", "tiles": len(enc.layout), "norm": norm,
                         "latent_rel_err": rel(z, z0), "psnr_vs_untiled_db": float(np.mean(psnr(f, f0))),
                         "psnr_vs_source_db": float(np.mean(psnr(f, frames))),
                         "untiled_psnr_vs_source_db": float(np.mean(psnr(f0, frames)))}
            save_diff(OUT / f"tiling_diff_{Path(clip).stem}_{norm}.png", f[0], f0[0])
            print(key, rows[key])
    return rows


def kl_section() -> dict:
    rows = {}
    for attention in (True, False):
        torch.manual_seed(0)
        model = build("sd15", block_out_channels=(16, 32), norm_num_groups=8, mid_block_add_attention=attention)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.GroupNorm):
                    m.weight.normal_(1, 0.3)
                    m.bias.normal_(0, 0.3)
        yy, xx = np.mgrid[0:96, 0:128]
        frames = np.stack([128 + 60 * np.sin(xx / 9), 255 * xx / 128, 255 * yy / 96], -1)[None].astype(np.uint8)
        z0 = FrameEncoder(model, 96, 128, CoderOptions(cache="off"))(frames)
        x0 = FrameDecoder(model, 96, 128, CoderOptions(cache="off"))(z0).float()
        for norm in ("tile", "global"):
            opts = CoderOptions(tile=64, overlap=32, norm=norm, cache="off")
            z = FrameEncoder(model, 96, 128, opts)(frames)
            x = FrameDecoder(model, 96, 128, opts)(z0).float()
            rows[f"attention={attention}:{norm}"] = {"encode_rel_err": rel(z, z0), "decode_rel_err": rel(x, x0)}
            print(f"KL attention={attention} {norm}", rows[f"attention={attention}:{norm}"])
    return rows


FOUR_K = r"""
import resource, sys, time, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from codec.models import load_model
from codec.coder import FrameEncoder, FrameDecoder, CoderOptions
budget = int(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # interpreter, torch, the codec
model = load_model(sys.argv[2])
frame = np.empty((1, 2160, 3840, 3), np.uint8)  # built row by row: no large float temporaries
x = np.arange(3840)
for y in range(2160):
    frame[0, y] = np.stack([128 + 60 * np.sin(x / 37), 255 * x / 3840, np.full(3840, 255 * y / 2160)], -1)
opts = CoderOptions(max_memory=budget, cache="off")
t = time.perf_counter()
enc = FrameEncoder(model, 2160, 3840, opts)
z = enc(frame)
t_enc = time.perf_counter() - t
dec = FrameDecoder(model, 2160, 3840, opts)
out = dec(z)
t_dec = time.perf_counter() - t - t_enc
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(enc.plan.tile, enc.plan.overlap, enc.plan.batch, int(enc.global_norm), peak, base, t_enc, t_dec)
"""


def four_k_section(budget: int) -> dict:
    res = subprocess.run([sys.executable, "-c", FOUR_K, str(ROOT), str(DATA / "weights" / "taef2_encoder.pth"),
                          str(budget)], capture_output=True, text=True, timeout=3000)
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    tile, overlap, batch, glob, peak, base, t_enc, t_dec = res.stdout.split()
    row = {"size": "3840x2160", "model": "taef2", "budget_mb": budget / 2**20, "tile": int(tile),
           "overlap": int(overlap), "batch": int(batch), "global_norm": bool(int(glob)),
           "peak_rss_mb": int(peak) / 2**20, "rss_after_imports_mb": int(base) / 2**20,
           "encode_s": float(t_enc), "decode_s": float(t_dec)}
    print("4K", row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--budget", default=str(1 << 30), help="4K activation budget in bytes")
    ap.add_argument("--skip-4k", action="store_true")
    ap.add_argument("--only-4k", action="store_true", help="rerun the 4K section, keep the rest of tiling.json")
    args = ap.parse_args()
    if not (DATA / "weights" / "taef2_encoder.pth").is_file():
        raise SystemExit("../shared/data is absent: this report needs the real taef2 weights")
    OUT.mkdir(parents=True, exist_ok=True)
    if args.only_4k:
        report = json.loads((OUT / "tiling.json").read_text())
    else:
        report = {"device": f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d"), "tile": args.tile, "overlap": args.overlap,
                  "taef2": taef2_section(args.tile, args.overlap), "kl_random_small": kl_section()}
    if not args.skip_4k:
        report["four_k"] = four_k_section(int(args.budget))
    report["peak_rss_mb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (OUT / "tiling.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Tiled against untiled (CPU)", "", f"taef2, tile {args.tile} px, overlap {args.overlap} px:", "",
             "| frame | norm | tiles | PSNR vs untiled (dB) | latent rel. err | PSNR vs source, tiled / untiled |",
             "| --- | --- | --- | --- | --- | --- |"]
    for k, r in report["taef2"].items():
        lines.append(f"| {k.split(':')[0]} ({r['size']}) | {r['norm']} | {r['tiles']} "
                     f"| {r['psnr_vs_untiled_db']:.2f} | {r['latent_rel_err']:.4f} "
                     f"| {r['psnr_vs_source_db']:.2f} / {r['untiled_psnr_vs_source_db']:.2f} |")
    lines += ["", "Small random KL model (16/32 channels, 8 groups), tile 64 px, overlap 32 px, relative error:", "",
              "| mid-block attention | norm | encode | decode |", "| --- | --- | --- | --- |"]
    for k, r in report["kl_random_small"].items():
        att, norm = k.split(":")
        lines.append(f"| {att.split('=')[1]} | {norm} | {r['encode_rel_err']:.4f} | {r['decode_rel_err']:.4f} |")
    if "four_k" in report:
        r = report["four_k"]
        lines += ["", f"4K frame with taef2 under a {r['budget_mb']:.0f} MiB activation budget: tile {r['tile']} px, "
                  f"overlap {r['overlap']}, batch {r['batch']}, global norm {r['global_norm']}, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MiB of which {r['rss_after_imports_mb']:.0f} MiB before the model and "
                  f"frame existed, encode {r['encode_s']:.1f} s, "
                  f"decode {r['decode_s']:.1f} s (CPU)."]
    lines += ["", "Difference images (|tiled - untiled| x 10): `tiling_diff_*.png`."]
    (OUT / "tiling.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
