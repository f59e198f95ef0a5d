"""The ``codec dataset`` subcommand (registered by ``codec.cli``)."""

from __future__ import annotations

import argparse

from .run import ENGINES, run_dataset
from .work import EncodeSettings


def add_parser(sub) -> None:
    from ..cli_args import add_coder_args, add_model_args, add_range_args

    p = sub.add_parser("dataset", help="many clips -> latent files + index.parquet (resumable; local or Ray)",
                       description="Encode every clip of the inputs to OUTDIR/<path relative to its input "
                                   "folder>.safetensors and write OUTDIR/index.parquet. A clip whose latent "
                                   "file exists, verifies and has the same cache key is kept. Exit status 1 "
                                   "when some clips failed (see the index).")
    p.add_argument("inputs", nargs="+", metavar="IN",
                   help="folder (searched recursively for videos) or manifest (.txt one path a line, "
                        ".csv/.parquet with a 'path' column)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--engine", default="local", choices=ENGINES, help="local processes or Ray Data (default local)")
    p.add_argument("--workers", type=int, default=None,
                   help="local: worker processes (default 1: in this process); ray: actors "
                        "(default one per GPU of the cluster, 1 without GPUs)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    add_model_args(p)
    add_range_args(p)
    p.add_argument("--latent-dtype", default="float16", help="stored latent dtype (default float16)")
    add_coder_args(p)


def run(args: argparse.Namespace) -> int:
    from ..cli_args import parse_dtype

    dtype = str(parse_dtype(args.dtype)).removeprefix("torch.") if args.dtype else None
    settings = EncodeSettings(model=args.model, preset=args.preset, device=args.device, dtype=dtype,
                              latent_dtype=str(parse_dtype(args.latent_dtype)).removeprefix("torch."),
                              start=args.start, end=args.end, stride=args.stride,
                              allow_short=args.allow_short, batch=args.batch or 4,
                              tile=args.tile, overlap=args.overlap, max_memory=args.max_memory, norm=args.norm,
                              cache=args.cache, refresh=args.refresh, compile=args.compile,
                              cuda_graphs=args.cuda_graphs)
    s = run_dataset(args.inputs, args.output, settings, engine=args.engine, workers=args.workers,
                    address=args.address, quiet=args.quiet)
    print(f"dataset: {s.clips} clips: {s.encoded} encoded, {s.reused} kept, {s.failed} failed; "
          f"{s.frames} frames in {s.seconds:.1f} s ({s.fps:.1f} frames/s); index {s.index}")
    return 1 if s.failed else 0
