"""Kodak round-trip quality and CPU latency for any list of models, same code for all.

    python bench/eval_kodak.py                      # the built-in default and taef2
    python bench/eval_kodak.py --model a.safetensors --model taesd_encoder.pth --threads 2

Each of the 24 Kodak images (768x512 PNG, uint8 RGB) goes through ``encode`` then ``decode``
(fp32, CPU); the output is rounded to uint8 and compared with the input: mean PSNR (dB, peak
255, all channels) and mean SSIM (luma, Gaussian 11x11). Encode and decode are timed per image
(ms, one image per call, after one warm-up image that is not counted). Writes
``bench/results/kodak_<date>.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codec.models import load_model  # noqa: E402

KODAK = ROOT.parent / "shared" / "data" / "images" / "kodak"
DEFAULT_MODELS = ["default", str(ROOT.parent / "shared" / "data" / "weights" / "taef2_encoder.pth")]


def metrics():
    """(psnr, ssim) on uint8 (H, W, 3) arrays: codec.quality if present, else a local PSNR/SSIM."""
    try:
        from codec.quality import psnr, ssim
        return psnr, ssim, "codec.quality"
    except ImportError:
        return _psnr, _ssim, "bench/eval_kodak.py (local)"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 100.0 if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    import torch.nn.functional as F

    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    x, y = (torch.from_numpy(v).double() @ luma for v in (a, b))
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    blur = lambda t: F.conv2d(F.conv2d(t[None, None], g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def read_images(folder: Path) -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    files = sorted(folder.glob("kodim*.png"))
    if not files:
        raise ValueError(f"{folder}: no kodim*.png images (the Kodak set lives in ../shared/data/images/kodak)")
    return [(f.stem, np.array(Image.open(f).convert("RGB"))) for f in files]


def round_trip(model, image: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(H, W, 3) uint8 -> reconstructed (H, W, 3) uint8, encode ms, decode ms."""
    h, w = image.shape[:2]
    m = model.downscale
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
    t0 = time.perf_counter()
    z = model.encode(x)
    t1 = time.perf_counter()
    y = model.decode(z)
    t2 = time.perf_counter()
    out = ((y[0, :, :h, :w].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return out.permute(1, 2, 0).numpy(), (t1 - t0) * 1e3, (t2 - t1) * 1e3


def evaluate(source: str, images, psnr, ssim) -> dict:
    model = load_model(source)
    params = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        round_trip(model, images[0][1])  # warm-up, not counted
        rows = []
        for name, img in images:
            rec, enc_ms, dec_ms = round_trip(model, img)
            rows.append({"image": name, "psnr": float(psnr(img, rec)), "ssim": float(ssim(img, rec)),
                         "encode_ms": enc_ms, "decode_ms": dec_ms})
    mean = lambda k: statistics.fmean(r[k] for r in rows)
    median = lambda k: statistics.median(r[k] for r in rows)
    return {"model": source, "name": model.name, "source": model.source, "latent_channels": model.latent_channels,
            "parameters": params, "psnr": mean("psnr"), "ssim": mean("ssim"),
            "encode_ms_mean": mean("encode_ms"), "encode_ms_median": median("encode_ms"),
            "decode_ms_mean": mean("decode_ms"), "decode_ms_median": median("decode_ms"), "images": rows}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def markdown(results: list[dict], env: dict) -> str:
    lines = [f"# Kodak round trip ({env['date']})", "",
             f"{env['images']} Kodak images (768x512), fp32 on the CPU ({env['cpu']}, {env['threads']} thread(s), "
             f"torch {env['torch']}); metrics from {env['metrics']}. Latency: ms per image, one image per "
             "call, median (mean), after one warm-up image.", "",
             "| model | latent ch | params | PSNR dB | SSIM | encode ms | decode ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['name']} (`{Path(r['source']).name}`) | {r['latent_channels']} | "
                     f"{r['parameters'] / 1e6:.2f} M | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{r['encode_ms_median']:.0f} ({r['encode_ms_mean']:.0f}) | "
                     f"{r['decode_ms_median']:.0f} ({r['decode_ms_mean']:.0f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="model for load_model (repeatable); "
                   "default: the built-in default and taef2")
    p.add_argument("--images", type=Path, default=KODAK, help="folder of kodim*.png")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--tag", default=None, help="file name tag (default: today's date)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        images = read_images(args.images)
        psnr, ssim, metric_src = metrics()
        results = []
        for source in args.model or DEFAULT_MODELS:
            print(f"evaluating {source} ...", flush=True)
            results.append(evaluate(source, images, psnr, ssim))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    date = datetime.date.today().isoformat()
    env = {"date": date, "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "images": len(images), "metrics": metric_src,
           "image_folder": str(args.images)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"kodak_{args.tag or date}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    table = markdown(results, env)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
