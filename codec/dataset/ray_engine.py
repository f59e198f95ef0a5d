"""The Ray engine: Ray Data over the clip list, ``map_batches`` with an actor class that loads
the model once per actor. One GPU per actor where the cluster has GPUs, one CPU otherwise. Ray
does the placement, restarts an actor that dies and retries its clip; a clip that fails inside
the actor is a ``failed`` row and the run goes on.

Cluster: ``address`` joins an existing one (``ray start --head`` ...); without it a local one
is started and stopped; a process that already called ``ray.init`` keeps its cluster.
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

from .sources import Clip
from .work import ClipEncoder, EncodeSettings

RETRIES = 3  # restarts of a dead actor, and retries of the clip it held


class RayClipEncoder:
    """The Ray Data actor: a batch ``{"path": [...], "rel": [...]}`` in, ``{"row": [json]}`` out
    (one JSON row per clip, so no column type depends on whether a clip failed)."""

    def __init__(self, outdir: str, settings: EncodeSettings):
        self.encoder = ClipEncoder(outdir, settings)

    def __call__(self, batch: dict) -> dict:
        rows = [self.encoder(Clip(str(p), str(r))) for p, r in zip(batch["path"], batch["rel"])]
        return {"row": [json.dumps(row) for row in rows]}


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--engine ray needs Ray, which is not installed; pip install 'codec[ray]'") from None
    return ray


def run_ray(clips: list[Clip], outdir: Path, settings: EncodeSettings, workers: int | None,
            address: str | None, on_row: Callable[[dict], None]) -> None:
    """Encode ``clips`` into ``outdir`` (which every node must see at the same path) with
    ``workers`` actors (default: one per GPU of the cluster, or 1 on a CPU-only cluster),
    calling ``on_row(row)`` here as each clip finishes."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # ours is the progress report
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = workers or max(gpus, 1)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        # A clip whose actor died RETRIES times is given up (its block errored): the run goes on.
        ctx.max_errored_blocks = len(clips)
        # One block per clip (up to 10k blocks) so that idle actors can take any clip left.
        blocks = {_blocks_arg(ray): max(1, min(len(clips), 10_000))}
        ds = ray.data.from_items([{"path": c.path, "rel": c.rel} for c in clips], **blocks)
        with warnings.catch_warnings():  # Ray >= 2.60 warns about max_restarts as a remote arg
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
            out = ds.map_batches(RayClipEncoder, fn_constructor_kwargs={"outdir": str(outdir), "settings": settings},
                                 batch_size=1, batch_format="numpy",
                                 compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
                                 num_gpus=1 if gpus else 0, num_cpus=1,
                                 max_restarts=RETRIES, max_task_retries=RETRIES)
        seen = set()
        for item in out.iter_rows():
            row = json.loads(item["row"])
            seen.add(row["latents"])
            on_row(row)
    except ray.exceptions.RayError as e:
        raise RuntimeError(f"ray: {_last_line(e)}") from e
    finally:
        if started:
            ray.shutdown()
    for clip in clips:
        if clip.latents not in seen:
            on_row({"source": clip.rel, "latents": clip.latents, "status": "failed", "reused": False,
                    "error": f"the worker encoding it died {RETRIES + 1} times"})


def _blocks_arg(ray) -> str:
    params = inspect.signature(ray.data.from_items).parameters
    return "override_num_blocks" if "override_num_blocks" in params else "parallelism"  # Ray < 2.10


def _last_line(e: Exception) -> str:
    """The innermost message of a Ray error (its text ends with the cause's traceback)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
