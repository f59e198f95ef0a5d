"""Peak host memory of the Wan streaming encode + decode against clip length (9, 33, 81 frames).

    python bench/wan_memory.py [--lengths 9,33,81] [--size 96x128] [--base-dim 16] [--out bench/results]

For each length a fresh Python process runs the real pipeline (``encode_video`` then
``decode_video``, default options) on a synthetic moving pattern of that many frames, with a
Wan 2.1-shaped model (16 latent channels, 2 residual blocks per stage, random weights, seed 0,
float32) saved by ``save_model``. It reports ``ru_maxrss`` and anonymous / file-backed RSS sampled
every 0.1 s (the child and the plots are ``bench/memory_flat.py``'s). A causal cache that grew
with the clip, or latents or frames kept in memory, would show as a peak rising with the length.
Writes wan_memory.json and wan_memory.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from memory_flat import measure, plot  # noqa: E402


def synthetic_clip(path: Path, frames: int, height: int, width: int) -> None:
    from codec.video import VideoWriter

    y, x = np.mgrid[:height, :width]
    with VideoWriter(path, width, height, 25, crf=18, preset="ultrafast") as out:
        for t in range(frames):
            out.write(np.stack([(x + 3 * t) % 256, (y + t) % 256, (x + y + 5 * t) % 256], -1).astype(np.uint8)[None])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="9,33,81")
    p.add_argument("--size", default="96x128", help="HxW of the synthetic clip")
    p.add_argument("--base-dim", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)

    from codec import bench
    from codec.models import build, save_model
    from codec.models.config import WanConfig

    h, w = (int(v) for v in args.size.split("x"))
    lengths = sorted(int(n) for n in args.lengths.split(","))
    runs = []
    with tempfile.TemporaryDirectory(prefix="codec-wan-memory-") as tmp:
        torch.manual_seed(0)
        model = build(WanConfig(name="wan-bench", base_dim=args.base_dim))
        save_model(model, Path(tmp, "wan.safetensors"), dtype=torch.float32)
        for n in lengths:
            clip = Path(tmp, f"clip{n}.mp4")
            synthetic_clip(clip, n, h, w)
            run = measure(clip, Path(tmp, "wan.safetensors"), n)
            run["samples"] = run["samples"][::5]  # every 0.5 s is enough to see a trend; keeps the file small
            runs.append(run)
            e, d = run["phases"]["encode"], run["phases"]["decode"]
            print(f"{n:>4} frames: peak RSS {run['peak_rss_mb']:.0f} MiB (at start {run['rss_before_mb']:.0f}); "
                  f"peak anonymous: encode {e['peak_anon_mb']:.0f}, decode {d['peak_anon_mb']:.0f} MiB; "
                  f"{run['seconds']:.0f} s", flush=True)
    peaks = [r["peak_rss_mb"] for r in runs]
    anon = [max(r["phases"][p]["peak_anon_mb"] or 0 for p in ("encode", "decode")) for r in runs]
    doc = {"device": "cpu", "versions": bench.versions(),
           "clip": f"synthetic moving pattern {w}x{h}, 25 fps",
           "model": f"Wan 2.1 architecture, base_dim {args.base_dim}, 16 latent channels, random weights (seed 0), "
                    "float32",
           "measured": "ru_maxrss of a fresh process running encode_video then decode_video on N frames (default "
                       "options), plus anonymous and file-backed RSS sampled every 0.1 s",
           "runs": runs, "peak_growth_mb": max(peaks) - min(peaks), "peak_anon_growth_mb": max(anon) - min(anon)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wan_memory.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, args.out / "wan_memory.png")
    print(f"spread over lengths {lengths}: peak RSS {doc['peak_growth_mb']:.1f} MiB, "
          f"peak anonymous RSS {doc['peak_anon_growth_mb']:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
