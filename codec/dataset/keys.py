"""The cache key of one clip: what must be equal for an existing latent file to be kept.

key = sha256 over the hashes of three things: the source file's bytes, the model's weights
(``codec.models.weights_digest``), and
the encode settings that change the latents (frame range, tiling, cache, dtypes, device kind,
latent convention). Any of them changing makes the clip be encoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

_CHUNK = 4 * 2**20


def file_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def options_digest(options: Mapping[str, object]) -> str:
    """``sha256:<hex>`` of the settings as canonical JSON (sorted keys; values str/int/float/None)."""
    text = json.dumps(dict(options), sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def cache_key(source: str, weights: str, options: str) -> str:
    """One key from the three digests above."""
    return "sha256:" + hashlib.sha256(f"{source}\n{weights}\n{options}".encode()).hexdigest()
