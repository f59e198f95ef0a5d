"""The ``codec`` command: encode, decode, roundtrip, info, models, sample, bench, train.

Errors reach the user as one line and a non-zero exit (2 for bad input or arguments, 130 for
Ctrl-C, 143 for SIGTERM; an interrupted run leaves no partial output); ``--debug``, anywhere on
the line, shows the traceback instead. Every output path is checked before any work starts.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import __version__
from .cli_args import (
    add_coder_args,
    add_model_args,
    add_range_args,
    add_video_out_args,
    int_at_least,
    load,
    parse_dtype,
    setup,
)
from .stages import Terminated, sigterm_raises


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors as one line (``codec: error: ...``) and exit 2, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"codec: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .bench import add_parser as add_bench
    from .dataset.cli import add_parser as add_dataset
    from .outputs import LATENT_SUFFIXES
    from .sample import FPS, FRAMES, HEIGHT, WIDTH
    from .train.cli import add_parser as add_train
    from .video import VideoWriter

    videos = ", ".join(VideoWriter.SUFFIXES)
    parser = OneLineParser(prog="codec", description="Video <-> diffusion latents, fast and streaming.")
    parser.add_argument("--version", action="version", version=f"codec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("encode", help="video -> latent file (.safetensors)")
    p.add_argument("input", help="a video file")
    p.add_argument("-o", "--output", required=True, help=f"the latent file to write ({LATENT_SUFFIXES[0]})")
    add_model_args(p)
    add_range_args(p)
    p.add_argument("--latent-dtype", default="float16", choices=("float32", "float16", "bfloat16"),
                   help="stored latent dtype (default: float16)")
    add_coder_args(p)

    p = sub.add_parser("decode", help="latent file -> video (H.264)")
    p.add_argument("input", help="a latent file written by codec encode")
    p.add_argument("-o", "--output", required=True, help=f"the video to write ({videos})")
    add_model_args(p, default=None)
    add_video_out_args(p)
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check (default: verify)")
    p.add_argument("--force-convention", action="store_true",
                   help="decode with --model's latent convention (family, scaling, shift) even where it differs "
                        "from the one recorded in the file (default: refuse)")
    add_coder_args(p)

    p = sub.add_parser("roundtrip", help="encode + decode, with PSNR/SSIM per frame")
    p.add_argument("input", help="a video file")
    p.add_argument("-o", "--output", required=True, help=f"the decoded video to write ({videos})")
    p.add_argument("--report", default=None, help="write a JSON report here (default: none)")
    p.add_argument("--plot", default=None, help="write a PNG of quality over time here (default: none)")
    add_model_args(p)
    add_range_args(p)
    add_video_out_args(p)
    add_coder_args(p)

    p = sub.add_parser("info", help="describe a latent file or a video (JSON)")
    p.add_argument("file", help="a latent file (.safetensors) or a video")

    sub.add_parser("models", help="list the model presets")

    p = sub.add_parser("sample", help="write a short synthetic test clip (moving shapes and texture)")
    p.add_argument("output", help=f"the clip to write ({videos})")
    p.add_argument("--frames", type=int_at_least(1), default=FRAMES, help=f"number of frames (default {FRAMES})")
    p.add_argument("--size", default=f"{WIDTH}x{HEIGHT}", help=f"WIDTHxHEIGHT (default {WIDTH}x{HEIGHT})")
    p.add_argument("--fps", type=int_at_least(1), default=FPS, help=f"frame rate (default {FPS})")

    add_bench(sub)
    add_train(sub)
    add_dataset(sub)
    parser.add_argument("--debug", action="store_true", help="show tracebacks (default: off; accepted anywhere)")
    for command in sub.choices.values():  # --debug after the sub-command too; SUPPRESS keeps a leading one
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks (default: off)")
    return parser


def check_output_paths(args) -> None:
    """Every output path of the command, checked before any work (see ``codec.outputs``)."""
    from .outputs import LATENT_SUFFIXES, PLOT_SUFFIXES, check_outputs, model_files
    from .video import VideoWriter

    video = VideoWriter.SUFFIXES
    if args.command == "sample":
        outputs = [("output", args.output, video)]
    elif args.command == "encode":
        outputs = [("-o", args.output, LATENT_SUFFIXES)]
    elif args.command == "decode":
        outputs = [("-o", args.output, video)]
    elif args.command == "roundtrip":
        outputs = [("-o", args.output, video), ("--report", args.report, None),
                   ("--plot", args.plot, PLOT_SUFFIXES)]
    elif args.command == "bench":
        outputs = [("--json", args.json, None), ("--plot", args.plot, PLOT_SUFFIXES)]
    else:
        return
    check_outputs(outputs, inputs=[getattr(args, "input", None), *model_files(getattr(args, "model", None))])


def _print_run(name: str, r) -> None:
    s = r.summary()
    cache = f", cache hits {100 * s['cache_hit_rate']:.1f}%" if r.cache_per_frame else ""
    if s.get("flop_fraction") is not None:
        cache += f", {100 * s['flop_fraction']:.1f}% of the FLOPs"
    print(f"{name}: {s['frames']} frames in {s['seconds']:.2f} s ({s['fps']:.2f} fps), latency p50 "
          f"{s['p50_ms']:.1f} ms p95 {s['p95_ms']:.1f} ms{cache}, peak host {s['peak_host_mb']:.0f} MiB"
          + (f", peak device {s['peak_device_mb']:.0f} MiB" if s["peak_device_mb"] else "")
          + (f", tiles up to {s['tile']}px/{s['overlap']}px, waste {s['tile_waste']:.2f}x, norm={s['norm']}"
             if s["tile"] else ""))
    if r.fp32_fallbacks:
        print(f"  note: {r.fp32_fallbacks} batches overflowed in half precision and were recomputed in float32")
    if r.missing_frames:
        print(f"  note: the source is short by {r.missing_frames} frames of what its container states (--allow-short)")


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
    check_output_paths(args)
    if args.command == "sample":
        from .sample import parse_size, write_sample

        width, height = parse_size(args.size)
        write_sample(args.output, args.frames, width, height, args.fps)
        print(f"sample: {args.output}, {args.frames} frames of {width}x{height} at {args.fps} fps")
        return 0
    if args.command == "bench":
        from .bench import run as run_bench

        return run_bench(args)
    if args.command == "train":
        from .train.cli import run as run_train

        return run_train(args)
    if args.command == "dataset":
        from .dataset.cli import run as run_dataset

        return run_dataset(args)

    device, dtype, options = setup(args)
    model = load(args, device, dtype)
    if args.command == "encode":
        r = pipeline.encode_video(args.input, args.output, model, device=device, dtype=dtype, options=options,
                                  start=args.start, end=args.end, stride=args.stride,
                                  latent_dtype=parse_dtype(args.latent_dtype), batch=args.batch or 4,
                                  allow_short=args.allow_short, quiet=args.quiet)
        _print_run("encode", r)
    elif args.command == "decode":
        r = pipeline.decode_video(args.input, args.output, model, device=device, dtype=dtype, options=options,
                                  crf=args.crf, preset=args.x264_preset, lossless=args.lossless,
                                  verify=not args.no_verify, batch=args.batch or 4, quiet=args.quiet,
                                  force_convention=args.force_convention)
        _print_run("decode", r)
    elif args.command == "roundtrip":
        enc, dec = pipeline.roundtrip_video(args.input, args.output, model, device=device, dtype=dtype,
                                            options=options, start=args.start, end=args.end, stride=args.stride,
                                            crf=args.crf, preset=args.x264_preset, lossless=args.lossless,
                                            batch=args.batch or 4, allow_short=args.allow_short,
                                            quiet=args.quiet)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # until the arguments are parsed (a Ctrl-C may come first)
    try:
        with sigterm_raises(), warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            args = build_parser().parse_args(argv)
            debug = args.debug
            return run(args)
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        if debug:
            raise
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"codec: {what}; no partial output was kept", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:
        if debug or not _expected(e):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__  # FFmpeg's and x264's multi-line texts too
        print(f"codec: error: {msg}", file=sys.stderr)
        return 2


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings of a command run as one line, like its errors (no source line under them)."""
    print(f"codec: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _expected(e: Exception) -> bool:
    """Errors of the input, the settings or the machine (one line); anything else is a bug (traceback)."""
    av = sys.modules.get("av")  # FFmpeg's errors, when PyAV was imported at all
    ffmpeg = (av.FFmpegError,) if av is not None else ()
    return isinstance(e, (ValueError, TypeError, OSError, RuntimeError, *ffmpeg))


if __name__ == "__main__":
    sys.exit(main())
