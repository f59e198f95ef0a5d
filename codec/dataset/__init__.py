"""``codec dataset``: many clips to latent files plus ``index.parquet``, resumable, on the local
machine or a Ray cluster. See :func:`run_dataset`."""

from .run import Summary, run_dataset
from .sources import Clip, find_clips
from .work import ClipEncoder, EncodeSettings

__all__ = ["run_dataset", "Summary", "EncodeSettings", "ClipEncoder", "Clip", "find_clips"]
