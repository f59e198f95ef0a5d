"""The ``codec`` command: encode, decode, roundtrip, info, models, bench, train.

Errors reach the user as one line and a non-zero exit (2 for bad input, 130 for Ctrl-C);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, DTYPES[name])


def _memory(text: str) -> int:
    """'4G', '512M', '1.5GiB' -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        return int(float(t[:-1]) * scale[t[-1]]) if t and t[-1] in scale else int(float(t))
    except ValueError:
        raise ValueError(f"--max-memory must look like 4G or 512M, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser, default: str | None = "default") -> None:
    p.add_argument("--model", default=default,
                   help="preset name, checkpoint file or folder (default: %(default)s)")
    p.add_argument("--preset", default=None, help="latent convention when shapes cannot tell (sd3/flux1, sdxl)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model passes")
    p.add_argument("--cuda-graphs", action="store_true", help="replay CUDA graphs for fixed tile shapes (CUDA)")


def _add_coder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tiling and cache")
    g.add_argument("--batch", type=int, default=None,
                   help="frames read and coded together (default 4; fewer: lower latency, more: throughput)")
    g.add_argument("--tile", type=int, default=None, help="tile size in px, a multiple of 8 (default: from the budget)")
    g.add_argument("--overlap", type=int, default=None, help="tile overlap in px (default: tile/4)")
    g.add_argument("--max-memory", type=_memory_arg, default=None, help="memory budget, e.g. 4G (default: free memory)")
    g.add_argument("--norm", default="auto", choices=("auto", "tile", "global"),
                   help="GroupNorm statistics per tile or over the whole frame (default: auto)")
    g.add_argument("--cache", default="exact",
                   help="temporal tile cache: off, exact, or a change threshold in uint8 units (default: exact)")
    g.add_argument("--refresh", type=int, default=None, help="recompute every tile at least every N frames")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _memory_arg(text: str) -> int:
    try:
        return _memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_range_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--start", type=int, default=0, help="first frame index (default 0)")
    p.add_argument("--end", type=int, default=None, help="frame index to stop before (exclusive)")
    p.add_argument("--stride", type=int, default=1, help="keep every K-th frame")


def _add_video_out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--crf", type=int, default=18, help="H.264 quality, 0-51, lower is better (default 18)")
    p.add_argument("--preset-x264", dest="x264_preset", default="medium", help="x264 speed preset")
    p.add_argument("--lossless", action="store_true", help="lossless H.264 (RGB), no codec loss")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codec", description="Video <-> diffusion latents, fast and streaming.")
    parser.add_argument("--version", action="version", version=f"codec {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode", help="video -> latent file (.safetensors)")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    _add_model_args(p)
    _add_range_args(p)
    p.add_argument("--latent-dtype", default="float16", help="stored latent dtype (default float16)")
    _add_coder_args(p)

    p = sub.add_parser("decode", help="latent file -> mp4")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    _add_model_args(p, default=None)
    _add_video_out_args(p)
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    _add_coder_args(p)

    p = sub.add_parser("roundtrip", help="encode + decode, with PSNR/SSIM per frame")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--report", default=None, help="write a JSON report here")
    p.add_argument("--plot", default=None, help="write a PNG of quality over time here")
    _add_model_args(p)
    _add_range_args(p)
    _add_video_out_args(p)
    _add_coder_args(p)

    p = sub.add_parser("info", help="describe a latent file or a video")
    p.add_argument("file")

    sub.add_parser("models", help="list the model presets")

    from .bench import add_parser as add_bench
    from .train.cli import add_parser as add_train

    add_bench(sub)
    add_train(sub)
    return parser


def _setup(args):
    """(model source, device, dtype, CoderOptions) from the common arguments."""
    import torch

    from .coder import CoderOptions

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    dtype = _dtype(args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    options = CoderOptions(tile=args.tile, overlap=args.overlap, batch=args.batch, max_memory=args.max_memory,
                           norm=args.norm, cache=args.cache, refresh=args.refresh)
    return device, dtype, options


def _load(args, device, dtype):
    from .models import load_model
    from .models.accel import accelerate

    if args.model is None:
        return None
    model = load_model(args.model, device=device, dtype=dtype, preset_name=args.preset)
    # channels_last and cuDNN autotuning on CUDA; compile and CUDA graphs when asked.
    return accelerate(model, compile=args.compile, cuda_graphs=args.cuda_graphs)


def _print_run(name: str, r) -> None:
    s = r.summary()
    cache = f", cache hits {100 * s['cache_hit_rate']:.1f}%" if r.cache_per_frame else ""
    if s.get("flop_fraction") is not None:
        cache += f", {100 * s['flop_fraction']:.1f}% of the FLOPs"
    print(f"{name}: {s['frames']} frames in {s['seconds']:.2f} s ({s['fps']:.2f} fps), latency p50 "
          f"{s['p50_ms']:.1f} ms p95 {s['p95_ms']:.1f} ms{cache}, peak host {s['peak_host_mb']:.0f} MiB"
          + (f", peak device {s['peak_device_mb']:.0f} MiB" if s["peak_device_mb"] else "")
          + (f", tiles {s['tile']}px/{s['overlap']}px norm={s['norm']}" if s["tile"] else ""))
    if r.fp32_fallbacks:
        print(f"  note: {r.fp32_fallbacks} batches overflowed in half precision and were recomputed in float32")


def run(args) -> int:
    from . import pipeline

    if args.command == "models":
        from .models import PRESETS

        print(f"{'preset':<10} {'family':<6} {'channels':>8} {'scaling':>9} {'shift':>7}")
        for name, c in PRESETS.items():
            print(f"{name:<10} {c.family:<6} {c.latent_channels:>8} {c.scaling_factor:>9g} {c.shift_factor:>7g}")
        from .models.loading import DEFAULT_FILE

        state = "installed" if DEFAULT_FILE.is_file() else "not installed"
        print(f"default: the built-in tiny model ({state}); pass --model PRESET|PATH for another")
        return 0
    if args.command == "info":
        import json

        path = Path(args.file)
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        desc = pipeline.describe_latents(path) if path.suffix == ".safetensors" else pipeline.describe_video(path)
        print(json.dumps(desc, indent=2, default=str))
        return 0
    if args.command == "bench":
        from .bench import run as run_bench

        return run_bench(args)
    if args.command == "train":
        from .train.cli import run as run_train

        return run_train(args)

    device, dtype, options = _setup(args)
    model = _load(args, device, dtype)
    if args.command == "encode":
        r = pipeline.encode_video(args.input, args.output, model, device=device, dtype=dtype, options=options,
                                  start=args.start, end=args.end, stride=args.stride,
                                  latent_dtype=_dtype(args.latent_dtype), batch=args.batch or 4, quiet=args.quiet)
        _print_run("encode", r)
    elif args.command == "decode":
        r = pipeline.decode_video(args.input, args.output, model, device=device, dtype=dtype, options=options,
                                  crf=args.crf, preset=args.x264_preset, lossless=args.lossless,
                                  verify=not args.no_verify, batch=args.batch or 4, quiet=args.quiet)
        _print_run("decode", r)
    elif args.command == "roundtrip":
        enc, dec = pipeline.roundtrip_video(args.input, args.output, model, device=device, dtype=dtype,
                                            options=options, start=args.start, end=args.end, stride=args.stride,
                                            crf=args.crf, preset=args.x264_preset, lossless=args.lossless,
                                            batch=args.batch or 4, quiet=args.quiet)
        _print_run("encode", enc)
        _print_run("decode", dec)
        s = dec.summary()
        print(f"quality: mean PSNR {s['mean_psnr']:.2f} dB, mean SSIM {s['mean_ssim']:.4f} "
              f"(min PSNR {min(dec.psnr):.2f} dB)")
        if args.report:
            pipeline.write_json(args.report, {"input": args.input, "output": args.output, "model": model.name,
                                              "encode": enc.summary(), "decode": s,
                                              "psnr": dec.psnr, "ssim": dec.ssim})
        if args.plot:
            pipeline.plot_quality(args.plot, dec, f"{Path(args.input).name} via {model.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("codec: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"codec: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
