"""Command-line arguments shared by the ``codec`` sub-commands (``cli.py``) and ``codec bench``
(``bench.py``): option groups, value parsers, and turning the parsed options into a device,
dtype, coder options and a loaded model.

Parsing needs no torch: value parsers only check text, so ``codec --help`` and argument errors
stay fast; torch is imported when the options are turned into objects (``setup``/``load``).
"""

from __future__ import annotations

import argparse
import sys

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                "veryslow", "placebo")
_SCALE = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_dtype(name: str):
    """'float16', 'fp16', ... -> torch.float16 (ValueError naming the choices otherwise)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, DTYPES[name])


def parse_memory(text: str) -> int:
    """'4G', '512M', '1.5GiB', '1000000' -> bytes, > 0 (0 or less is an error, not "default")."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        value = int(float(t[:-1]) * _SCALE[t[-1]]) if t and t[-1] in _SCALE else int(float(t))
    except (ValueError, OverflowError):
        raise ValueError(f"expected a size like 4G or 512M, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"expected a positive size such as 4G (leave the option out for the default), "
                         f"got {text!r}")
    return value


def _memory_arg(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (high None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def add_model_args(p: argparse.ArgumentParser, default: str | None = "default") -> None:
    what = "the built-in model" if default == "default" else "the model recorded in the latent file"
    p.add_argument("--model", default=default,
                   help=f"preset name, checkpoint file or folder (default: {what})")
    p.add_argument("--preset", default=None,
                   help="latent convention (scaling, shift) of a checkpoint whose config.json and file name do "
                        "not tell, e.g. a KL single file: sd15, sdxl, sd3, flux1; for a Wan VAE, wan2.1 or wan2.2 "
                        "(its latent statistics) (default: from config/name)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), metavar="{float32,float16,bfloat16}",
                   help="model precision (default: float16 on CUDA, float32 on the CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model passes (default: off)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay CUDA graphs for fixed tile shapes, CUDA only (default: off)")


def add_coder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tiling and cache")
    g.add_argument("--batch", type=int_at_least(1), default=None,
                   help="frames read and coded together (default 4; fewer: lower latency, more: throughput)")
    g.add_argument("--tile", type=int_at_least(8), default=None,
                   help="largest tile side in px, a multiple of 8 (default: the whole frame if it fits the budget)")
    g.add_argument("--overlap", type=int_at_least(0), default=None, help="tile overlap in px (default: tile/4)")
    g.add_argument("--max-memory", type=_memory_arg, default=None,
                   help="memory budget, e.g. 4G (default: 70%% of free GPU memory, 4G on the CPU)")
    g.add_argument("--norm", default="auto", choices=("auto", "tile", "global"),
                   help="GroupNorm statistics per tile or over the whole frame (default: auto)")
    g.add_argument("--cache", default="exact",
                   help="temporal tile cache: off, exact, or a change threshold in uint8 units (default: exact)")
    g.add_argument("--refresh", type=int_at_least(1), default=None,
                   help="recompute every tile at least every N frames (default: never forced)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: a bar on a terminal)")


def add_range_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--start", type=int_at_least(0), default=0, help="first frame index (default 0)")
    p.add_argument("--end", type=int_at_least(1), default=None,
                   help="frame index to stop before, exclusive (default: the end of the clip)")
    p.add_argument("--stride", type=int_at_least(1), default=1, help="keep every K-th frame (default 1)")
    p.add_argument("--allow-short", action="store_true",
                   help="keep the frames of a truncated source (fewer than its container states) "
                        "with a warning, instead of failing (default: fail)")


def add_video_out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--crf", type=int_at_least(0, 51), default=18,
                   help="H.264 quality, 0-51, lower is better (default 18)")
    add_x264_preset_arg(p)
    p.add_argument("--lossless", action="store_true",
                   help="lossless H.264 (RGB), no codec loss; few players besides ffmpeg (default: off)")


def add_x264_preset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset-x264", dest="x264_preset", default="medium", choices=X264_PRESETS,
                   metavar="PRESET", help="x264 speed preset, ultrafast ... placebo (default: medium)")


def setup(args):
    """(device, dtype, CoderOptions) from the model and coder arguments; warns (stderr) when half
    precision runs on the CPU, where it is several times slower than float32."""
    import torch

    from .coder import CoderOptions

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    if torch.device(device).type == "cpu" and dtype != torch.float32:
        print(f"codec: warning: --dtype {DTYPES[args.dtype]} on the CPU runs about 3-5x slower than float32 "
              "(CPUs have no fast half-precision convolutions); leave --dtype out for float32", file=sys.stderr)
    options = CoderOptions(tile=args.tile, overlap=args.overlap, batch=args.batch, max_memory=args.max_memory,
                           norm=args.norm, cache=args.cache, refresh=args.refresh)
    return device, dtype, options


def load(args, device, dtype):
    """The model named by ``--model`` (None when it is None), accelerated for ``device``."""
    from .models import load_model
    from .models.accel import accelerate

    if args.model is None:
        return None
    model = load_model(args.model, device=device, dtype=dtype, preset_name=args.preset)
    # channels_last and cuDNN autotuning on CUDA; compile and CUDA graphs when asked.
    return accelerate(model, compile=args.compile, cuda_graphs=args.cuda_graphs)
