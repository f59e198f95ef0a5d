"""Peak host memory of the streaming encode + decode against clip length: it should stay flat.

    python bench/memory_flat.py [--clip ../shared/data/video/nasa_13013.mp4] [--lengths 100,300,1000]
                                [--width 16] [--out bench/results]

The clip (320x180, 325 frames) is looped into a temporary H.264 file of at least the longest
length (``VideoWriter``, x264 ultrafast; a synthetic moving pattern when the clip is absent). For
each length a fresh Python process runs the real pipeline on the first N frames:
``encode_video`` (file -> latent file) then ``decode_video`` (latent file -> mp4), with the
default options (cache exact, tiles from the budget). It reports ``ru_maxrss`` (the process's
peak resident memory, which includes Python, torch and the model) and RSS sampled every 0.1 s.
Model: the TAEF2 architecture at width 16 with random weights (seed 0): the pipeline's memory
does not depend on what the weights are, and width 16 keeps 1400 frames within minutes on a CPU.
Writes memory_flat.json and memory_flat.png.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def rss_mb() -> tuple[float, float]:
    """(anonymous, file-backed) resident memory of this process, MiB, from /proc/self/status.

    File-backed pages include the memory-mapped latent file that decoding reads: the kernel can
    drop them at any time, so the anonymous part is what must stay flat. Without /proc: (peak RSS, 0).
    """
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return tuple(int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile"))
    except (OSError, KeyError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 0.0


def child(clip: str, model_path: str, frames: int) -> None:
    """Run in a fresh process: encode + decode the first ``frames`` frames, print a JSON line."""
    from codec.pipeline import decode_video, encode_video

    samples, stop = [], threading.Event()
    t0 = time.perf_counter()

    def sample():
        while not stop.wait(0.1):
            anon, file = rss_mb()
            samples.append((round(time.perf_counter() - t0, 2), round(anon, 1), round(file, 1)))

    threading.Thread(target=sample, daemon=True).start()
    before = sum(rss_mb())
    with tempfile.TemporaryDirectory() as tmp:
        enc = encode_video(clip, Path(tmp, "z.safetensors"), model_path, end=frames)
        t_enc = time.perf_counter() - t0
        dec = decode_video(Path(tmp, "z.safetensors"), Path(tmp, "out.mp4"), model_path, preset="ultrafast")
    stop.set()
    print(json.dumps({"frames": enc.frames, "decoded": dec.frames, "rss_before_mb": before,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                      "encode_seconds": t_enc, "seconds": time.perf_counter() - t0, "samples": samples}))


def phases(run: dict) -> dict:
    """Peak anonymous and file-backed RSS (MiB) during encoding and during decoding."""
    out, cut = {}, run["encode_seconds"]
    for phase in ("encode", "decode"):
        sel = [s for s in run["samples"] if (s[0] < cut) == (phase == "encode")]
        out[phase] = {"peak_anon_mb": max((s[1] for s in sel), default=None),
                      "median_anon_mb": float(np.median([s[1] for s in sel])) if sel else None,
                      "peak_file_mb": max((s[2] for s in sel), default=None)}
    return out


def looped_clip(clip: Path, frames: int, dst: Path) -> str:
    from codec.video import FrameReader, VideoWriter

    if clip.is_file():
        with FrameReader(clip) as reader:
            src = np.concatenate([b.frames for b in reader])
            fps = reader.info.fps
        desc = f"{clip.name} ({src.shape[2]}x{src.shape[1]}, {len(src)} frames) looped"
    else:
        t = np.arange(120)[:, None, None]
        y, x = np.mgrid[:180, :320]
        src = np.stack([(x + 3 * t) % 256, (y + t) % 256, (x + y) % 256], -1).astype(np.uint8)
        fps, desc = 25, f"synthetic 320x180 pattern looped ({clip} absent)"
    with VideoWriter(dst, src.shape[2], src.shape[1], fps, crf=18, preset="ultrafast") as out:
        for i in range(0, frames, 50):
            out.write(src[np.arange(i, min(frames, i + 50)) % len(src)])
    return f"{desc} to {frames} frames"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", type=Path, default=DATA / "video" / "nasa_13013.mp4")
    p.add_argument("--lengths", default="100,300,1000")
    p.add_argument("--width", type=int, default=16, help="tiny model width (random weights)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--child", nargs=3, metavar=("CLIP", "MODEL", "FRAMES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0

    from codec import bench
    from codec.models import build, save_model

    lengths = sorted(int(n) for n in args.lengths.split(","))
    runs = []
    with tempfile.TemporaryDirectory(prefix="codec-memory-") as tmp:
        clip = Path(tmp, "looped.mp4")
        desc = looped_clip(args.clip, lengths[-1], clip)
        torch.manual_seed(0)
        model = build("taef2", width=args.width)
        save_model(model, Path(tmp, "model.safetensors"), dtype=torch.float32)
        for n in lengths:
            run = measure(clip, Path(tmp, "model.safetensors"), n)
            runs.append(run)
            e, d = run["phases"]["encode"], run["phases"]["decode"]
            print(f"{n:>6} frames: peak RSS {run['peak_rss_mb']:.0f} MiB (at start {run['rss_before_mb']:.0f}); "
                  f"peak anonymous: encode {e['peak_anon_mb']:.0f}, decode {d['peak_anon_mb']:.0f} MiB; "
                  f"peak file-backed: encode {e['peak_file_mb']:.0f}, decode {d['peak_file_mb']:.0f} MiB; "
                  f"{run['seconds']:.0f} s", flush=True)
    peaks = [r["peak_rss_mb"] for r in runs]
    anon = [max(r["phases"][p]["peak_anon_mb"] for p in ("encode", "decode")) for r in runs]
    doc = {"device": "cpu", "versions": bench.versions(), "clip": desc,
           "model": f"taef2 architecture, width {args.width}, random weights (seed 0), float32",
           "measured": "ru_maxrss of a fresh process running encode_video then decode_video on the first N "
                       "frames (default options), plus anonymous and file-backed RSS sampled every 0.1 s "
                       "(file-backed includes the memory-mapped latent file read while decoding)",
           "runs": runs, "peak_growth_mb": max(peaks) - min(peaks), "peak_anon_growth_mb": max(anon) - min(anon),
           "peak_growth_per_1000_frames_mb": (peaks[-1] - peaks[0]) / (lengths[-1] - lengths[0]) * 1000
           if len(lengths) > 1 else None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_flat.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, args.out / "memory_flat.png")
    print(f"spread over lengths {lengths}: peak RSS {doc['peak_growth_mb']:.1f} MiB, "
          f"peak anonymous RSS {doc['peak_anon_growth_mb']:.1f} MiB")
    return 0


def measure(clip: Path, model: Path, frames: int) -> dict:
    """Encode then decode ``frames`` frames of ``clip`` in a fresh process (``--child``); its run with phases."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(clip), str(model), str(frames)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"child for {frames} frames failed:\n{res.stderr[-2000:]}")
    run = json.loads(res.stdout.strip().splitlines()[-1])
    run["phases"] = phases(run)
    return run


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    runs = doc["runs"]
    n = [r["frames"] for r in runs]
    a.plot(n, [r["peak_rss_mb"] for r in runs], "o-", label="peak RSS (ru_maxrss)")
    for phase, marker in (("encode", "s"), ("decode", "^")):
        a.plot(n, [r["phases"][phase]["peak_anon_mb"] for r in runs], marker + "--", label=f"peak anonymous, {phase}")
        a.plot(n, [r["phases"][phase]["peak_file_mb"] for r in runs], marker + ":", label=f"peak file-backed, {phase}")
    a.set(xlabel="frames encoded and decoded", ylabel="MiB", title="peak host memory vs clip length",
          ylim=(0, max(r["peak_rss_mb"] for r in runs) * 1.2))
    a.legend(fontsize=7)
    for r in runs:
        t, anon, file = zip(*r["samples"]) if r["samples"] else ((), (), ())
        line, = b.plot(t, anon, lw=1, label=f"{r['frames']} frames, anonymous")
        b.plot(t, file, lw=1, ls=":", color=line.get_color())
    b.set(xlabel="seconds (encode, then decode)", ylabel="RSS, MiB", title="RSS during each run (dotted: file-backed)")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(doc["clip"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
