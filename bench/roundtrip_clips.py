"""Round trips of the real clips: frames, size, frame rate and duration preserved; PSNR/SSIM.

    python bench/roundtrip_clips.py [--model PATH] [--frames N] [--lossless]

For every clip in ../shared/data/video (and video/edge with --edge), runs ``roundtrip_video`` on
the first N frames (all with --frames 0), reads the mp4 back with PyAV and checks that frame
count, size and frame rate match the source selection; writes bench/results/roundtrip_clips.json
and .md. CPU figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codec.models import load_model  # noqa: E402
from codec.pipeline import roundtrip_video  # noqa: E402
from codec.video import probe_video  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DATA / "weights" / "taef2_encoder.pth"))
    ap.add_argument("--frames", type=int, default=48, help="frames per clip (0: the whole clip)")
    ap.add_argument("--lossless", action="store_true", help="lossless H.264 output (no codec loss)")
    ap.add_argument("--edge", action="store_true", help="also the files of video/edge")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "roundtrip_clips"))
    args = ap.parse_args()
    if not (DATA / "video").is_dir():
        raise SystemExit("../shared/data is absent")
    model = load_model(args.model)
    clips = sorted(p for p in (DATA / "video").iterdir() if p.is_file())
    if args.edge:
        clips += sorted((DATA / "video" / "edge").iterdir())
    tmp = Path("/tmp/codec-roundtrip")
    tmp.mkdir(exist_ok=True)
    rows = []
    for clip in clips:
        info = probe_video(clip)
        end = args.frames or None
        t = time.perf_counter()
        out = tmp / (clip.stem + ".mp4")
        enc, dec = roundtrip_video(clip, out, model, end=end, lossless=args.lossless)
        back = probe_video(out)
        want = min(end or info.num_frames or dec.frames, info.num_frames or dec.frames)
        row = {"clip": clip.name, "size": f"{info.width}x{info.height}", "fps": str(info.fps),
               "frames": dec.frames, "frames_back": back.num_frames, "size_back": f"{back.width}x{back.height}",
               "fps_back": str(back.fps), "duration_back_s": back.duration,
               "duration_expected_s": float(dec.frames / Fraction(info.fps)),
               "preserved": back.num_frames == dec.frames == want and (back.width, back.height) == (
                   info.width + info.width % 2, info.height + info.height % 2) and back.fps == info.fps,
               "psnr_db": sum(dec.psnr) / len(dec.psnr), "min_psnr_db": min(dec.psnr),
               "ssim": sum(dec.ssim) / len(dec.ssim), "seconds": time.perf_counter() - t,
               "encode_p50_ms": enc.percentile(50), "decode_p50_ms": dec.percentile(50)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": model.name, "model_source": args.model, "frames_per_clip": args.frames,
              "lossless": args.lossless, "device": "cpu", "date": time.strftime("%Y-%m-%d"), "clips": rows}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Round trips with {model.name} ({'all' if not args.frames else args.frames} frames per clip, "
             f"CPU, {'lossless' if args.lossless else 'crf 18'} H.264)", "",
             "| clip | size | fps | frames in/out | size out | duration out (s) | preserved | PSNR (dB) | min | SSIM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['clip']} | {r['size']} | {r['fps']} | {r['frames']}/{r['frames_back']} | {r['size_back']} "
                     f"| {r['duration_back_s'] or float('nan'):.3f} | {'yes' if r['preserved'] else 'NO'} "
                     f"| {r['psnr_db']:.2f} "
                     f"| {r['min_psnr_db']:.2f} | {r['ssim']:.4f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
