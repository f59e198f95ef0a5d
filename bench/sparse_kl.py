"""Sparse temporal cache on a small KL model (CPU): threshold -> FLOP fraction -> time against
`off` -> PSNR against `off` and against the source.

No trained KL weights are available here, so the model is random, at a fraction of SD's widths
(``--widths``), in two variants: ``random`` as initialised (a random GroupNorm network is chaotic:
a local change moves every cell a little, so the per-layer delta thresholds rarely stop it), and
``tamed`` (ResNet residual branches and the attention output scaled by 0.1, so a local change
fades with distance, closer to a trained VAE). Neither stands for SD's real figures.

Frames of each clip (a centre crop) go through FrameEncoder then FrameDecoder (whole frames: the
sparse cache for a threshold), all modes interleaved frame by frame; times are sums per mode and
same-run ratios to `off`.

    PYTHONPATH=$PWD python bench/sparse_kl.py --frames 12 --out bench/results/sparse_kl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from codec.bench import versions
from codec.coder import CoderOptions, FrameDecoder, FrameEncoder
from codec.models import build
from codec.models.kl import Attention, ResnetBlock
from codec.quality import psnr
from codec.sparse_kl import KLNetCache
from codec.video import FrameReader


def model_variant(widths: tuple[int, ...], tamed: bool):
    torch.manual_seed(0)
    model = build("sd15", block_out_channels=widths, norm_num_groups=min(32, widths[0] // 2))
    if tamed:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, ResnetBlock):
                    m.conv2.weight.mul_(0.1)
                    m.conv2.bias.mul_(0.1)
                elif isinstance(m, Attention):
                    m.to_out[0].weight.mul_(0.1)
    return model


def read_crop(path: Path, frames: int, size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: the first frames, centre-cropped (8-aligned)."""
    with FrameReader(path, start=0, end=frames, batch=frames) as r:
        x = np.concatenate([b.frames for b in r])
    y0, x0 = (x.shape[1] - size) // 2 // 8 * 8, (x.shape[2] - size) // 2 // 8 * 8
    return np.ascontiguousarray(x[:, y0:y0 + size, x0:x0 + size])


def run(model, clip: np.ndarray, modes: list[str]) -> dict:
    n, h, w, _ = clip.shape
    coders = {m: (FrameEncoder(model, h, w, CoderOptions(cache=m)), FrameDecoder(model, h, w, CoderOptions(cache=m)))
              for m in modes}
    for m in modes[1:]:
        assert isinstance(coders[m][0].sparse.net, KLNetCache), "the sparse cache did not take the KL model"
    coders["off"][1](coders["off"][0](clip[:1]))  # warm-up (oneDNN plans)
    out = {m: {"enc_s": 0.0, "dec_s": 0.0, "frames": []} for m in modes}
    for i in range(n):
        k = i % len(modes)
        for m in modes[k:] + modes[:k]:
            enc, dec = coders[m]
            t0 = time.perf_counter()
            z = enc(clip[i:i + 1])
            t1 = time.perf_counter()
            out[m]["frames"].append(dec(z).numpy())
            out[m]["enc_s"] += t1 - t0
            out[m]["dec_s"] += time.perf_counter() - t1
    table = {}
    off = np.concatenate(out["off"]["frames"])
    for m in modes:
        enc, dec = coders[m]
        frames = np.concatenate(out[m]["frames"])
        r = out[m]
        table[m] = {
            "time_ratio": (r["enc_s"] + r["dec_s"]) / (out["off"]["enc_s"] + out["off"]["dec_s"]),
            "encode_ratio": r["enc_s"] / out["off"]["enc_s"], "decode_ratio": r["dec_s"] / out["off"]["dec_s"],
            "encode_s_per_frame": r["enc_s"] / n, "decode_s_per_frame": r["dec_s"] / n,
            "flop_fraction_encode": enc.stats.flop_fraction if enc.sparse else 1.0,
            "flop_fraction_decode": dec.stats.flop_fraction if dec.sparse else 1.0,
            "stat_refreshes": [c.sparse.net.stat_refreshes if c.sparse else 0 for c in (enc, dec)],
            "psnr_vs_source": float(np.mean(psnr(frames, clip))),
            "psnr_vs_off": float(np.mean(np.minimum(psnr(frames, off), 100.0))),
        }
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/video")
    p.add_argument("--clips", nargs="*", default=["squirrel.mp4", "chaplin.mp4"])
    p.add_argument("--widths", default="32,64,128,128", help="block_out_channels (SD: 128,256,512,512)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--size", type=int, default=256, help="square centre crop, px")
    p.add_argument("--modes", nargs="*", default=["2", "4", "8"])
    p.add_argument("--out", default="bench/results/sparse_kl")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    widths = tuple(int(v) for v in args.widths.split(","))
    modes = ["off", *args.modes]
    results = {"widths": widths, "frames": args.frames, "size": args.size, "device": "cpu",
               "threads": torch.get_num_threads(), "versions": versions(), "runs": {}}
    for variant in ("random", "tamed"):
        model = model_variant(widths, variant == "tamed")
        for name in args.clips:
            clip = read_crop(Path(args.data) / name, args.frames, args.size)
            print(variant, name, clip.shape, flush=True)
            results["runs"][f"{variant} {name}"] = run(model, clip, modes)
            write(results, Path(args.out))


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# Sparse cache on a small random KL model, CPU ({results['threads']} threads, shared machine)", "",
             f"Widths {results['widths']}, first {results['frames']} frames, centre crop {results['size']} px, "
             "encode + decode per frame, modes interleaved. Random weights: not SD's figures (see the script).", "",
             "| model, clip | mode | FLOPs enc | FLOPs dec | time vs off (enc / dec) | stat refreshes | "
             "PSNR vs off | PSNR vs source |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run_name, table in results["runs"].items():
        for m, r in table.items():
            lines.append(f"| {run_name} | {m} | {r['flop_fraction_encode']:.2f} | {r['flop_fraction_decode']:.2f} | "
                         f"{r['time_ratio']:.2f} ({r['encode_ratio']:.2f} / {r['decode_ratio']:.2f}) | "
                         f"{r['stat_refreshes'][0]} / {r['stat_refreshes'][1]} | {r['psnr_vs_off']:.1f} | "
                         f"{r['psnr_vs_source']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
