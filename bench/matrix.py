"""The standard benchmark matrix: sizes x models x cache modes, ours against diffusers per cell.

    python bench/matrix.py [--sizes 256x256,512x512,1280x720,1920x1080,3840x2160] [--models tiny,sd15]
                           [--cache off,exact] [--frames 4] [--warmup 1] [--max-seconds 600]
                           [--device auto] [--clip PATH] [--out bench/results] [--name STEM]

Frames: the first ``--frames`` frames of ``--clip`` (default ../shared/data/video/squirrel.mp4,
static camera), centre-cropped to each size's aspect and resized (bilinear, antialiased); a
synthetic moving pattern when the clip is absent. Models: ``tiny`` = TAEF2 with its real weights
(../shared/data/weights/taef2_*.pth; random weights of the same architecture when absent),
``sd15`` = the SD 1.x AutoencoderKL architecture with random weights (timing only).
Each cell is one ``codec.bench.bench_clip`` call: ours and the diffusers baseline on the same
frames in the same run, outputs verified before timing is kept, ratio = ours p50 / baseline p50.
A cell whose predicted time (from the last measured cell of the same model, scaled by pixels)
exceeds ``--max-seconds`` is recorded as skipped with the reason. Writes
``<out>/<device>-<date>.json``, ``.md`` and ``.png``, rewritten after every cell.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from codec import bench  # noqa: E402
from codec.coder import CoderOptions  # noqa: E402
from codec.models import build, load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SIZES = "256x256,512x512,1280x720,1920x1080,3840x2160"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)x(\d+)", item.strip())
        if not m:
            raise SystemExit(f"--sizes: expected WxH items, got {item!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def source_frames(clip: Path, count: int) -> tuple[np.ndarray, str]:
    """(T, H, W, 3) uint8 source frames and a description of where they came from."""
    if clip.is_file():
        frames, _ = bench.read_frames(clip, count)
        return frames, f"{clip.name}, first {len(frames)} frames, centre-cropped and resized"
    t = np.arange(count)[:, None, None]
    y, x = np.mgrid[:720, :1280]
    pattern = np.stack([(x + 7 * t) % 256, (y + 3 * t) % 256, ((x ^ y) + t) % 256], -1).astype(np.uint8)
    return pattern, f"synthetic moving pattern, {count} frames, resized ({clip} absent)"


def resized(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre crop to the target aspect, then bilinear (antialiased) resize; uint8 in and out."""
    _, h, w, _ = frames.shape
    if w * height > h * width:  # too wide
        cw = h * width // height
        frames = frames[:, :, (w - cw) // 2:(w - cw) // 2 + cw]
    else:
        ch = w * height // width
        frames = frames[:, (h - ch) // 2:(h - ch) // 2 + ch]
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def make_model(name: str, device: str, dtype: torch.dtype):
    if name == "tiny":
        path = DATA / "weights" / "taef2_encoder.pth"
        if path.is_file():
            return load_model(path, device=device, dtype=dtype), "taef2, real weights"
        torch.manual_seed(0)
        return build("taef2").to(device, dtype), "taef2 architecture, random weights (weights absent)"
    if name == "sd15":
        torch.manual_seed(0)
        return build("sd15").to(device, dtype), "SD 1.x AutoencoderKL architecture, random weights"
    raise SystemExit(f"--models: expected tiny or sd15, got {name!r}")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def markdown(doc: dict) -> str:
    lines = [f"# Benchmark matrix: {doc['device']}, {doc['date']}", "",
             f"Frames: {doc['frames_source']}; {doc['frames']} timed frames after {doc['warmup']} warm-up, "
             f"{doc['dtype']}. Ratio = ours p50 / diffusers p50 (below 1: ours is faster), both measured in "
             "the same run, alternating frame by frame; min = ratio of the fastest frames, the least "
             "disturbed by other load; cpu = ratio of the p50 process CPU time per frame (robust to other "
             "processes on a shared CPU). Agreement = least PSNR between the two sides' "
             "decoded frames.", "",
             "| model | size | cache | tile | enc p50 ms ours / diffusers | ratio p50 (min, cpu) | "
             "dec p50 ms ours / diffusers | ratio p50 (min, cpu) | agree dB | hits | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in doc["cells"]:
        head = f"| {c['model']} | {c['size']} | {c['cache']} |"
        if c.get("skipped"):
            lines.append(f"{head} | | | | | | | | skipped: {c['skipped']} |")
            continue
        r = c["report"]
        o, b, q = r["ours"], r["baseline"], r["ratio"]
        tile = r["options"]["tile"] or "whole"
        lines.append(f"{head} {tile} | {o['encode']['p50_ms']:.0f} / {b['encode']['p50_ms']:.0f} | "
                     f"{q['encode_p50']:.2f} ({q['encode_min']:.2f}, {q['encode_cpu_p50']:.2f}) | "
                     f"{o['decode']['p50_ms']:.0f} / {b['decode']['p50_ms']:.0f} | "
                     f"{q['decode_p50']:.2f} ({q['decode_min']:.2f}, {q['decode_cpu_p50']:.2f}) | "
                     f"{r['agreement_psnr_db']:.1f} | {100 * o['cache_hit_rate']:.0f}% | |")
    lines += ["", f"Models: {'; '.join(f'{k}: {v}' for k, v in doc['models'].items())}.",
              f"Versions: {', '.join(f'{k} {v}' for k, v in doc['versions'].items())}."]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in doc["cells"] if not c.get("skipped")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model in dict.fromkeys(c["model"] for c in cells):
        for cache, marker in (("off", "o"), ("exact", "s")):
            sel = [c for c in cells if c["model"] == model and c["cache"] == cache]
            if not sel:
                continue
            mp = [c["megapixels"] for c in sel]
            for stage, ls in (("encode", "-"), ("decode", "--")):
                a.plot(mp, [c["report"]["ours"][stage]["p50_ms"] for c in sel], ls, marker=marker,
                       label=f"{model} ours {stage} cache {cache}")
                b.plot(mp, [c["report"]["ratio"][f"{stage}_p50"] for c in sel], ls, marker=marker,
                       label=f"{model} {stage} cache {cache}")
        sel = [c for c in cells if c["model"] == model and c["cache"] == "off"] or \
              [c for c in cells if c["model"] == model]
        for stage, ls in (("encode", ":"), ("decode", "-.")):
            a.plot([c["megapixels"] for c in sel], [c["report"]["baseline"][stage]["p50_ms"] for c in sel], ls,
                   color="grey", marker="x", label=f"{model} diffusers {stage}")
    a.set(xscale="log", yscale="log", xlabel="megapixels per frame", ylabel="p50 ms per frame",
          title=f"latency, {doc['device']}")
    b.axhline(1, color="k", lw=0.8)
    b.set(xscale="log", xlabel="megapixels per frame", ylabel="ours p50 / diffusers p50",
          title="ratio (below 1: ours faster)")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=SIZES)
    p.add_argument("--models", default="tiny,sd15")
    p.add_argument("--cache", default="off,exact")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=600, help="skip a cell predicted to take longer")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on the CPU")
    p.add_argument("--clip", type=Path, default=DATA / "video" / "squirrel.mp4")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--name", default=None, help="file stem (default <device>-<date>)")
    args = p.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    dev_name = bench.device_name(torch.device(device))
    tag = "cpu" if device == "cpu" else slug(torch.cuda.get_device_name(torch.device(device)))
    date = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or f"{tag}-{date}")
    source, source_desc = source_frames(args.clip, args.frames)
    doc = {"device": dev_name, "date": date, "versions": bench.versions(), "frames_source": source_desc,
           "frames": args.frames, "warmup": args.warmup, "dtype": str(dtype).removeprefix("torch."),
           "max_seconds": args.max_seconds, "timed": bench.TIMED, "models": {}, "cells": []}

    for model_name in args.models.split(","):
        model, desc = make_model(model_name, device, dtype)
        doc["models"][model_name] = desc
        rate = None  # seconds per megapixel of one frame, ours + baseline, encode + decode
        for w, h in parse_sizes(args.sizes):
            mp = w * h / 1e6
            frames = resized(source, w, h)
            for cache in args.cache.split(","):
                cell = {"model": model_name, "size": f"{w}x{h}", "cache": cache, "megapixels": mp}
                doc["cells"].append(cell)
                predicted = rate * mp * (args.frames + args.warmup) if rate else None
                if predicted and predicted > args.max_seconds:
                    cell["skipped"] = (f"predicted {predicted:.0f} s > --max-seconds {args.max_seconds:g} "
                                       f"(from {rate:.1f} s per megapixel-frame measured at a smaller size)")
                    print(f"{model_name} {w}x{h} cache {cache}: skipped, {cell['skipped']}", flush=True)
                    continue
                t0 = time.perf_counter()
                r = bench.bench_clip(frames, model, options=CoderOptions(cache=cache), warmup=args.warmup,
                                     fps=25, clip=f"{source_desc.split(',')[0]} at {w}x{h}")
                cell["seconds"] = time.perf_counter() - t0
                cell["report"] = r
                rate = cell["seconds"] / mp / (args.frames + args.warmup)
                print(bench.format_table(r), f"\ncell took {cell['seconds']:.0f} s\n", flush=True)
                _write(doc, stem)
    _write(doc, stem)
    print(markdown(doc))
    return 0


def _write(doc: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
    if any(not c.get("skipped") for c in doc["cells"]):
        plot(doc, stem.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
