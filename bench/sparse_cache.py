"""Sparse temporal cache: threshold -> FLOP fraction -> encode/decode time against `off` -> PSNR.

For each clip, the first ``--frames`` frames (a centre crop of ``--crop`` px when the frame is
larger: the sensor and compression noise stay native) go through FrameEncoder then FrameDecoder
with each cache mode, one frame at a time, all modes interleaved frame by frame (the CPU is
shared and its load swings within seconds); times are same-run ratios to `off` (median over
repetitions, each a fresh pass over the clip), both wall time and the process's CPU time (with
``--threads 1`` the CPU time is the work done, whatever else the machine runs).
PSNR of the decoded frames against `off`'s decoded frames and against the source.

The tables in bench/results (a small crop raises the share of the frame that moves and of the
fixed cost per layer: 480x272 is the hard case, 1280x720 the usual one):

    PYTHONPATH=$PWD python bench/sparse_cache.py --frames 16 --reps 2 --crop 1280x720 \
        --modes exact 2 4 8 --out bench/results/sparse_cache
    PYTHONPATH=$PWD python bench/sparse_cache.py --frames 32 --reps 2 --crop 480x272 \
        --modes exact 2 3 4 8 16 --out bench/results/sparse_cache_480x272
    PYTHONPATH=$PWD python bench/sparse_cache.py --clips smpte-2997.mp4 --frames 16 --reps 2 \
        --crop 1920x1080 --modes 4 --out bench/results/sparse_cache_smpte_1080p
    PYTHONPATH=$PWD python bench/sparse_cache.py --model ../shared/data/weights/taef2_encoder.pth \
        --frames 16 --reps 2 --crop 480x272 --modes exact 2 4 8 --out bench/results/sparse_cache_taef2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from codec.bench import versions
from codec.coder import CoderOptions, FrameDecoder, FrameEncoder
from codec.models import load_model
from codec.quality import psnr
from codec.video import FrameReader

CLIPS = {"squirrel.mp4": "static", "smpte-2997.mp4": "static",
         "clip_01_tears_of_steel.mp4": "moving", "chaplin.mp4": "moving"}


def read_clip(path: Path, frames: int, crop: tuple[int, int]) -> np.ndarray:
    """(N, h, w, 3) uint8: the first frames, centre-cropped to at most crop (w, h)."""
    with FrameReader(path, start=0, end=frames, batch=frames) as r:
        x = np.concatenate([b.frames for b in r])
    h, w = min(crop[1], x.shape[1]), min(crop[0], x.shape[2])
    y0, x0 = (x.shape[1] - h) // 2 // 8 * 8, (x.shape[2] - w) // 2 // 8 * 8
    return np.ascontiguousarray(x[:, y0:y0 + h, x0:x0 + w])


def run_clip(model, clip: np.ndarray, modes: list[str], reps: int) -> dict:
    """Encode then decode the clip with every cache mode, interleaved frame by frame (each mode
    keeps its own cache state; the order of the modes rotates per frame and repetition) so that
    the load of a shared CPU falls on all modes alike. Returns per mode: summed times (s) per
    repetition (wall ``enc_s``/``dec_s``, CPU ``enc_cpu``/``dec_cpu``), decoded frames and the cache
    statistics of the first repetition."""
    n, h, w, _ = clip.shape
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)  # time the device's work

    def pair(mode):
        return FrameEncoder(model, h, w, CoderOptions(cache=mode)), FrameDecoder(model, h, w, CoderOptions(cache=mode))

    enc, dec = pair("off")
    dec(enc(clip[:1]))  # warm-up
    out = {m: {k: [0.0] * reps for k in ("enc_s", "dec_s", "enc_cpu", "dec_cpu")} | {"frames": []} for m in modes}
    for rep in range(reps):
        coders = {m: pair(m) for m in modes}
        for i in range(n):
            k = (i + rep) % len(modes)
            for m in modes[k:] + modes[:k]:
                enc, dec = coders[m]
                c0, t0 = time.process_time(), time.perf_counter()
                z = enc(clip[i:i + 1])
                sync()
                c1, t1 = time.process_time(), time.perf_counter()
                frame = dec(z).cpu().numpy()
                c2, t2 = time.process_time(), time.perf_counter()
                out[m]["enc_s"][rep] += t1 - t0
                out[m]["dec_s"][rep] += t2 - t1
                out[m]["enc_cpu"][rep] += c1 - c0
                out[m]["dec_cpu"][rep] += c2 - c1
                if rep == 0:
                    out[m]["frames"].append(frame)
        if rep == 0:
            for m, (enc, dec) in coders.items():
                out[m]["stats"] = {}
                for name, c in (("enc", enc), ("dec", dec)):
                    s = c.stats
                    sparse = c.sparse is not None
                    out[m]["stats"][name] = (s.flops, s.dense_flops, list(s.flops_per_frame)) if sparse else None
                    out[m]["stats"][name + "_hits"] = s.hit_rate
        print(f"rep {rep}: " + ", ".join(f"{m} {out[m]['enc_s'][rep]:.1f}+{out[m]['dec_s'][rep]:.1f} s" for m in modes),
              flush=True)
    for m in modes:
        out[m]["frames"] = np.concatenate(out[m]["frames"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/video")
    p.add_argument("--clips", nargs="*", default=list(CLIPS))
    p.add_argument("--model", default="default")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--crop", default="640x360", help="W x H centre crop of larger frames")
    p.add_argument("--modes", nargs="*", default=["exact", "4", "8", "16"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--out", default="bench/results/sparse_cache")
    args = p.parse_args()
    crop = tuple(int(v) for v in args.crop.split("x"))
    model = load_model(args.model, device=args.device)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"model": args.model, "frames": args.frames, "crop": args.crop, "reps": args.reps,
               "threads": torch.get_num_threads(), "device": str(model.device), "versions": versions(), "clips": {}}
    modes = ["off", *args.modes]
    for name in args.clips:
        clip = read_clip(Path(args.data) / name, args.frames, crop)
        print(name, clip.shape, flush=True)
        runs = run_clip(model, clip, modes, args.reps)
        off = runs["off"]
        table = {}
        for mode in modes:
            r = runs[mode]
            ratios = [((e + d) / (oe + od), e / oe, d / od)
                      for e, d, oe, od in zip(r["enc_s"], r["dec_s"], off["enc_s"], off["dec_s"])]
            f = r["stats"]
            frac = {k: (f[k][0] / f[k][1] if f[k] else 1.0) for k in ("enc", "dec")}
            sparse = f["enc"] and f["dec"]
            table[mode] = {
                "time_ratio": statistics.median(x[0] for x in ratios),
                "encode_ratio": statistics.median(x[1] for x in ratios),
                "decode_ratio": statistics.median(x[2] for x in ratios),
                "time_ratio_per_rep": [x[0] for x in ratios],
                "cpu_ratio": statistics.median((e + d) / (oe + od) for e, d, oe, od in
                                               zip(r["enc_cpu"], r["dec_cpu"], off["enc_cpu"], off["dec_cpu"])),
                "encode_s_per_frame": statistics.median(r["enc_s"]) / len(clip),
                "decode_s_per_frame": statistics.median(r["dec_s"]) / len(clip),
                "flop_fraction_encode": frac["enc"], "flop_fraction_decode": frac["dec"],
                "flop_fraction": (f["enc"][0] + f["dec"][0]) / (f["enc"][1] + f["dec"][1]) if sparse else 1.0,
                "flops_per_frame_encode": f["enc"][2] if f["enc"] else None,
                "flops_per_frame_decode": f["dec"][2] if f["dec"] else None,
                "hit_rate_encode": f["enc_hits"], "hit_rate_decode": f["dec_hits"],
                "psnr_vs_source": float(np.mean(psnr(r["frames"], clip))),
                # frames identical to off's have infinite PSNR: capped at 100 dB for the mean
                "psnr_vs_off": float(np.mean(np.minimum(psnr(r["frames"], off["frames"]), 100.0))),
            }
        results["clips"][name] = {"kind": CLIPS.get(name, "?"), "size": list(clip.shape[1:3]), "modes": table}
        write(results, Path(args.out))


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# Sparse temporal cache, CPU ({results['threads']} threads, shared machine)", "",
             f"Model `{results['model']}`, first {results['frames']} frames, centre crop {results['crop']} "
             f"(native pixels), modes interleaved frame by frame, {results['reps']} repetitions; times are "
             "the median same-run ratio to `off` (one frame per call).", "",
             "| clip | kind | mode | FLOPs enc / dec | time enc+dec vs off | enc | dec | CPU time vs off "
             "| s/frame enc+dec | PSNR vs source (dB) | loss vs off's (dB) | PSNR vs off (dB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, c in results["clips"].items():
        off = c["modes"]["off"]
        for mode, r in c["modes"].items():
            lines.append(
                f"| {name} | {c['kind']} | {mode} | {r['flop_fraction_encode']:.3f} / {r['flop_fraction_decode']:.3f} "
                f"| {r['time_ratio']:.2f}x | {r['encode_ratio']:.2f}x | {r['decode_ratio']:.2f}x "
                f"| {r['cpu_ratio']:.2f}x "
                f"| {r['encode_s_per_frame'] + r['decode_s_per_frame']:.2f} | {r['psnr_vs_source']:.2f} "
                f"| {off['psnr_vs_source'] - r['psnr_vs_source']:.2f} | {r['psnr_vs_off']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(results, out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    fig.suptitle(f"model {results['model']}, CPU, {results['threads']} thread(s)")
    for name, c in results["clips"].items():
        modes = [m for m in c["modes"] if m not in ("off", "exact")]
        ts = [float(m) for m in modes]
        r = [c["modes"][m] for m in modes]
        flops = [(x["flop_fraction_encode"] + x["flop_fraction_decode"]) / 2 for x in r]
        axes[0].plot(ts, flops, "o-", label=name)
        line, = axes[1].plot(ts, [x["time_ratio"] for x in r], "o-", label=name)
        axes[1].plot(ts, [x["cpu_ratio"] for x in r], "x--", c=line.get_color())
        axes[2].plot(ts, [c["modes"]["off"]["psnr_vs_source"] - x["psnr_vs_source"] for x in r], "o-", label=name)
    axes[0].set_ylabel("FLOP fraction (mean of encode, decode)")
    axes[1].set_ylabel("time encode+decode / off (o: wall, x: CPU)")
    axes[1].axhline(0.35, ls=":", c="k")
    axes[1].axhline(1.1, ls=":", c="r")
    axes[2].set_ylabel("PSNR loss vs source (dB)")
    axes[2].axhline(0.2, ls=":", c="k")
    for ax in axes:
        ax.set_xlabel("threshold T (uint8 levels)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
