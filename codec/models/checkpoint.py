"""Reading checkpoint files safely: safetensors, or pickles through ``weights_only=True`` only."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of one checkpoint file, on the CPU.

    Raises ValueError naming the file for anything that is not a readable checkpoint: a truncated
    or foreign file, or a pickle holding objects that ``weights_only=True`` refuses to build.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the checkpoint file is empty")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    raise ValueError(f"{path}: expected a .safetensors file (or {'/'.join(PICKLE_SUFFIXES)}), "
                     f"got a '{path.suffix}' file")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError and friends: truncated, not safetensors, bad header
        raise ValueError(f"{path}: not a readable safetensors file ({_short(e)})") from None
    return tensors, meta


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load: the pickle holds objects that weights_only=True does "
                         f"not allow (it could run code). Convert it to .safetensors. ({_short(e)})") from None
    except Exception as e:  # truncated zip, not a torch file at all
        raise ValueError(f"{path}: not a readable torch checkpoint ({_short(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({_short(e)})") from None


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
