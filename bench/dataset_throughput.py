"""`codec dataset` throughput: clips/s and frames/s of each engine, in one run, on real clips.

    python bench/dataset_throughput.py [--frames 8] [--clips a.mp4,b.mp4] [--repeats 1]

Engines: local with 1 worker (this process: the baseline of the ratios), local with 2 worker
processes, Ray Data with 1 and 2 actors on a local Ray cluster started once for the run (its
start-up is timed apart; each run's time includes starting its workers/actors and loading the
model there, as a user's run does). Every run writes a fresh output folder from a manifest of the
clips (first ``--frames`` frames of each, the built-in default model); before any figure is
reported, every clip must be ``ok`` and its latents bit-identical to the baseline's. With
``--repeats`` > 1 the engines run in alternating order (ABCD DCBA ...) and the best time counts.
Also timed: a rerun of the baseline that finds everything done (the cost of resuming).
Writes ``bench/results/dataset_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codec.bench import versions  # noqa: E402
from codec.dataset import EncodeSettings, run_dataset  # noqa: E402
from codec.latents import LatentReader  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "video"
CLIPS = ("chaplin.mp4", "clip_01_tears_of_steel.mp4", "clip_02_caminandes.mp4", "clip_03_sintel.mp4",
         "nasa_13013.mp4", "realshort.mp4")
ENGINES = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))


def latents_of(outdir: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(outdir.rglob("*.safetensors")):
        with LatentReader(path) as r:
            r.verify()
            out[str(path.relative_to(outdir))] = r.read().view(torch.uint8).numpy().tobytes()
    return out


def one_run(manifest: Path, outdir: Path, settings: EncodeSettings, engine: str, workers: int) -> dict:
    t0 = time.perf_counter()
    s = run_dataset([manifest], outdir, settings, engine=engine, workers=workers)
    seconds = time.perf_counter() - t0
    if s.failed or s.encoded != s.clips:
        raise SystemExit(f"{engine} x{workers}: {s.failed} clips failed, {s.encoded} of {s.clips} encoded")
    return {"engine": engine, "workers": workers, "clips": s.clips, "frames": s.frames, "seconds": seconds,
            "clips_per_s": s.clips / seconds, "frames_per_s": s.frames / seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=8, help="first N frames of each clip (default 8)")
    ap.add_argument("--clips", default=",".join(CLIPS), help="clip names in ../shared/data/video")
    ap.add_argument("--repeats", type=int, default=1, help="runs per engine, alternating order (default 1)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dataset_throughput"))
    args = ap.parse_args(argv)
    if not DATA.is_dir():
        print(f"{DATA} is absent: nothing to measure", file=sys.stderr)
        return 0
    import ray

    clips = [DATA / name for name in args.clips.split(",")]
    settings = EncodeSettings(end=args.frames)
    best: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = tmp / "clips.txt"
        manifest.write_text("\n".join(map(str, clips)) + "\n")
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        baseline = None
        try:
            for rep in range(args.repeats):
                for engine, workers in ENGINES if rep % 2 == 0 else ENGINES[::-1]:
                    outdir = tmp / f"{engine}{workers}-{rep}"
                    r = one_run(manifest, outdir, settings, engine, workers)
                    data = latents_of(outdir)
                    baseline = baseline or data
                    if data != baseline:
                        raise SystemExit(f"{engine} x{workers}: latents differ from the first run's")
                    key = (engine, workers)
                    if key not in best or r["seconds"] < best[key]["seconds"]:
                        best[key] = r
                    print(f"{engine} x{workers}: {r['clips']} clips, {r['frames']} frames in {r['seconds']:.1f} s",
                          flush=True)
            t0 = time.perf_counter()
            again = run_dataset([manifest], tmp / "local1-0", settings)
            rerun = time.perf_counter() - t0
            assert again.encoded == 0 and again.reused == len(clips), again
        finally:
            ray.shutdown()
    base = best[("local", 1)]
    rows = [dict(r, ratio=r["frames_per_s"] / base["frames_per_s"]) for r in best.values()]
    doc = {"what": "codec dataset, default model, fp32, CPU", "device": "cpu", "cpu_count": os.cpu_count(),
           "load_average": os.getloadavg(), "clips": [c.name for c in clips], "frames_per_clip": args.frames,
           "ray_cluster_start_s": ray_start, "rerun_all_kept_s": rerun, "repeats": args.repeats,
           "versions": {**versions(), "ray": ray.__version__}, "runs": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# codec dataset throughput ({doc['what']}, {os.cpu_count()} cores, load average "
             f"{doc['load_average'][0]:.1f} at the end)", "",
             f"{len(clips)} clips ({', '.join(doc['clips'])}), first {args.frames} frames each; "
             f"Ray cluster start {ray_start:.1f} s (not in the runs); a rerun that keeps every clip "
             f"{rerun:.1f} s.", "",
             "| engine | workers | seconds | clips/s | frames/s | vs local x1 |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['engine']} | {r['workers']} | {r['seconds']:.1f} | {r['clips_per_s']:.2f} | "
              f"{r['frames_per_s']:.2f} | {r['ratio']:.2f}x |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
