"""Encoding one clip of a dataset: the work every engine runs, in whatever process it runs.

A :class:`ClipEncoder` loads the model once; calling it with a :class:`~.sources.Clip` returns
that clip's index row. It keeps an existing latent file when the file holds this clip's cache
key and its checksum verifies, and otherwise encodes with :func:`codec.pipeline.encode_video`
(the function behind ``codec encode``, so the latents are bit-identical to it). Any failure of
the clip (unreadable video, bad frame range, out of memory) becomes a ``failed`` row.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..coder import CoderOptions
from ..latents import LatentReader
from ..models import weights_digest
from ..stages import now
from .keys import cache_key, file_digest, options_digest
from .sources import Clip

KEY_FIELD = "dataset_key"  # the latent file's metadata entry holding the clip's cache key


@dataclass(frozen=True)
class EncodeSettings:
    """The ``codec encode`` options of a dataset run (picklable, sent to every worker).

    device None: CUDA where the worker has it, else the CPU. dtype None: float16 on CUDA,
    float32 on the CPU. The other fields mean what the ``codec encode`` options of that name do.
    """

    model: str = "default"
    preset: str | None = None
    device: str | None = None
    dtype: str | None = None
    latent_dtype: str = "float16"
    start: int = 0
    end: int | None = None
    stride: int = 1
    allow_short: bool = False
    batch: int = 4
    tile: int | None = None
    overlap: int | None = None
    max_memory: int | None = None
    norm: str = "auto"
    cache: str = "exact"
    refresh: int | None = None
    compile: bool = False
    cuda_graphs: bool = False


# The coder's rules (tile planner, caches) as of this version: the same settings gave other tiles
# before (2: the planner that minimizes covered pixels; --tile is the largest side), so files of an
# older revision are encoded again. Bump it when a change makes the same settings give other latents.
CODER_RULES = 2


class ClipEncoder:
    """Holds the model; ``encoder(clip)`` writes ``outdir/clip.latents`` and returns its row."""

    def __init__(self, outdir: str | os.PathLike, settings: EncodeSettings):
        from ..cli_args import load

        self.outdir, self.settings = Path(outdir), settings
        self.device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = self.device.startswith("cuda")
        self.dtype = getattr(torch, settings.dtype) if settings.dtype else (torch.float16 if cuda else torch.float32)
        self.latent_dtype = getattr(torch, settings.latent_dtype)
        self.model = model = load(settings, self.device, self.dtype)  # reads model, preset, compile, cuda_graphs
        self.weights = weights_digest(model)
        # What changes the latents besides the source and the weights; the model's path does not.
        opts = {k: v for k, v in asdict(settings).items() if k not in ("model", "device", "dtype", "cuda_graphs")}
        opts.update(rules=CODER_RULES, device=torch.device(self.device).type,
                    dtype=str(self.dtype).removeprefix("torch."),
                    family=model.family, latent_channels=model.latent_channels,
                    scaling_factor=model.scaling_factor, shift_factor=model.shift_factor)
        self.options = options_digest(opts)
        self.coder_options = CoderOptions(tile=settings.tile, overlap=settings.overlap, batch=settings.batch,
                                          max_memory=settings.max_memory, norm=settings.norm,
                                          cache=settings.cache, refresh=settings.refresh)

    def __call__(self, clip: Clip) -> dict:
        from ..pipeline import encode_video

        s, t0 = self.settings, now()
        dst = self.outdir / clip.latents
        row = {"source": clip.rel, "latents": clip.latents, "reused": False,
               "weights_sha256": self.weights, "options_sha256": self.options}
        try:
            if not Path(clip.path).is_file():
                raise ValueError(f"{clip.path}: no such file (expected a video file)")
            row["source_sha256"] = file_digest(clip.path)
            row["key"] = key = cache_key(row["source_sha256"], self.weights, self.options)
            if is_complete(dst, key):
                row.update(describe(dst), status="ok", error="", reused=True)
                return row
            dst.parent.mkdir(parents=True, exist_ok=True)
            encode_video(clip.path, dst, self.model, device=self.device, dtype=self.dtype,
                         options=self.coder_options, start=s.start, end=s.end, stride=s.stride,
                         batch=s.batch, latent_dtype=self.latent_dtype, allow_short=s.allow_short, quiet=True,
                         metadata={KEY_FIELD: key})
            row.update(describe(dst), status="ok", error="", seconds=now() - t0)
        except Exception as e:  # the clip fails, the run goes on
            row.update(status="failed", error=" ".join(str(e).split()) or type(e).__name__, seconds=now() - t0)
        return row


def is_complete(path: Path, key: str) -> bool:
    """True when ``path`` is a finished latent file made with ``key`` whose checksum verifies.
    (Unfinished files live under a temporary name, so they are never looked at.)"""
    if not path.is_file():
        return False
    try:
        with LatentReader(path) as reader:
            if reader.metadata.get(KEY_FIELD) != key:
                return False
            reader.verify()
    except ValueError:
        return False
    return True


def describe(path: Path) -> dict:
    """The index fields a latent file tells: frames, latent shape (T, C, h, w), fps."""
    with LatentReader(path) as reader:
        return {"frames": reader.num_frames, "shape": list(reader.shape), "fps": float(reader.fps)}
