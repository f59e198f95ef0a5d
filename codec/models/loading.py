"""``load_model``: from a preset name, a folder, a file or a hub id to a ready Autoencoder."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from .autoencoder import Autoencoder
from .checkpoint import read_json, read_state_dict
from .config import PRESETS, KLConfig, ModelConfig, TinyConfig, WanConfig, preset
from .layouts import (
    LDM_PREFIX,
    detect_layout,
    kl_shape_config,
    ldm_to_diffusers,
    strip_prefix,
    tiny_diffusers_to_taesd,
    tiny_shape_config,
)
from .tiny import rename_pool_keys
from .video_autoencoder import VideoAutoencoder
from .wan_layouts import diffusers_config as wan_diffusers_config
from .wan_layouts import original_to_diffusers as wan_original_to_diffusers
from .wan_layouts import shape_config as wan_shape_config

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_MODEL = "default"
DEFAULT_FILE = WEIGHTS_DIR / "default.safetensors"
CONFIG_KEY = "codec_config"  # metadata key holding our own config JSON

# Where a preset's weights live on the Hugging Face hub (used only if already in the local cache).
HUB_IDS = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "vae"),
    "sd2": ("stabilityai/stable-diffusion-2-1", "vae"),
    "sdxl": ("madebyollin/sdxl-vae-fp16-fix", None),
    "sd3": ("stabilityai/stable-diffusion-3-medium-diffusers", "vae"),
    "flux1": ("black-forest-labs/FLUX.1-dev", "vae"),
    "taesd": ("madebyollin/taesd", None),
    "taesdxl": ("madebyollin/taesdxl", None),
    "taesd3": ("madebyollin/taesd3", None),
    "taef1": ("madebyollin/taef1", None),
    "wan2.1": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae"),
    "wan2.2": ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "vae"),
}


def build(name: str | ModelConfig, **overrides) -> Autoencoder | VideoAutoencoder:
    """An untrained (randomly initialised) model of a preset's architecture, for tests and benchmarks."""
    cfg = name if isinstance(name, (KLConfig, TinyConfig, WanConfig)) else preset(name, **overrides)
    return _new_model(cfg).eval()


def _new_model(cfg: ModelConfig) -> Autoencoder | VideoAutoencoder:
    return VideoAutoencoder(cfg) if isinstance(cfg, WanConfig) else Autoencoder(cfg)


def load_model(source: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, preset_name: str | None = None) -> Autoencoder:
    """Load an autoencoder with real weights.

    source: ``"default"`` (the built-in model), a preset name (``sd15``, ``taef1`` ...: resolved
    to the built-in weights or the local Hugging Face cache), a diffusers folder (``config.json``
    + ``diffusion_pytorch_model.safetensors``; AutoencoderKL or AutoencoderTiny), an original
    single-file SD checkpoint (optionally under ``first_stage_model.``), a TAESD encoder or
    decoder file (its partner is found beside it), a folder holding such a pair, a file written
    by ``codec train``, or a hub repo id present in the local cache. ``preset_name`` names the
    latent convention where shapes cannot tell (SD3 and FLUX.1 share an architecture).
    Raises ValueError naming the file and what was expected for anything it cannot load exactly.
    """
    model = _load_cpu(str(source), preset_name)
    return model.to(device=device, dtype=dtype).eval()


def _load_cpu(source: str, preset_name: str | None) -> Autoencoder:
    path = Path(source).expanduser()
    if path.exists():
        return _load_path(path, preset_name)
    if source == DEFAULT_MODEL:
        if DEFAULT_FILE.is_file():
            return _load_path(DEFAULT_FILE, None)
        raise ValueError("the built-in default model is not installed in this copy of codec; "
                         "pass --model PATH to a VAE checkpoint (e.g. a taesd/taef2 *_encoder.pth)")
    if source in PRESETS:
        if source in HUB_IDS:
            repo, sub = HUB_IDS[source]
            folder = _hub_cached(repo, sub)
            if folder is not None:
                return _load_path(folder, source)
        raise ValueError(f"no local weights for preset {source!r}: pass a local file or folder, e.g. "
                         f"--model path/to/vae.safetensors --preset {source}, or download "
                         f"{HUB_IDS.get(source, ('the VAE', ''))[0]} into the Hugging Face cache first")
    if "/" in source and not source.startswith((".", "/")) and source.count("/") == 1:
        folder = _hub_cached(source, None)
        if folder is not None:
            return _load_path(folder, preset_name)
        raise ValueError(f"{source}: not a local path, and not in the local Hugging Face cache "
                         "(this tool never downloads); pass a local file or folder")
    raise ValueError(f"{source}: no such file or folder, and not a preset ({', '.join(PRESETS)})")


def _hub_cached(repo: str, subfolder: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:  # HF_HUB_CACHE read at call time, so a changed environment is honoured
        root = Path(snapshot_download(repo, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except Exception:  # not cached (offline): the caller explains how to pass a local file
        return None
    folder = root / subfolder if subfolder else root
    return folder if folder.exists() else None


def _load_path(path: Path, preset_name: str | None) -> Autoencoder:
    if path.is_dir():
        return _load_folder(path, preset_name)
    state, meta = read_state_dict(path)
    if CONFIG_KEY in meta:
        return _finish(_config_from_json(meta[CONFIG_KEY], path), state, path)
    if any(k.startswith(LDM_PREFIX) for k in state):
        state = strip_prefix(state, LDM_PREFIX)
    try:
        layout = detect_layout(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if layout in ("tiny-encoder", "tiny-decoder"):
        state = _with_partner(path, state, layout)
        layout = "tiny-pair"
    return _from_layout(state, layout, path, preset_name)


def _load_folder(folder: Path, preset_name: str | None) -> Autoencoder:
    config_file = folder / "config.json"
    if config_file.is_file():
        cfg_json = read_json(config_file)
        weights = next((folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                        if (folder / n).is_file()), None)
        if weights is None:
            raise ValueError(f"{folder}: has config.json but no diffusion_pytorch_model.safetensors")
        state, _ = read_state_dict(weights)
        if cfg_json.get("_class_name") == "AutoencoderKLWan":
            # The folder is the model's identity: its config.json holds the latent statistics.
            return _finish(wan_diffusers_config(cfg_json, config_file), state, folder)
        try:
            layout = detect_layout(state)
        except ValueError as e:
            raise ValueError(f"{weights}: {e}") from None
        model = _from_layout(state, layout, weights, preset_name)
        return _apply_diffusers_config(model, cfg_json)
    encoders = sorted(p for p in folder.iterdir() if p.stem.endswith("_encoder")
                      and p.suffix in (".pth", ".safetensors"))
    if not encoders:
        raise ValueError(f"{folder}: expected a diffusers folder (config.json) or a TAESD "
                         "*_encoder.pth/*_decoder.pth pair")
    return _load_path(encoders[0], preset_name)


def _with_partner(path: Path, state: dict, layout: str) -> dict:
    mine, other = ("encoder", "decoder") if layout == "tiny-encoder" else ("decoder", "encoder")
    if f"_{mine}" not in path.stem:
        raise ValueError(f"{path}: a TAESD {mine} file, but its name has no '_{mine}' to find the "
                         f"{other} beside it (expected e.g. taesd_{mine}{path.suffix})")
    partner = path.with_name(path.name.replace(f"_{mine}", f"_{other}"))
    if not partner.is_file():
        raise ValueError(f"{path}: its {other} {partner.name} was not found beside it")
    other_state, _ = read_state_dict(partner)
    try:
        other_layout = detect_layout(other_state)
    except ValueError as e:
        raise ValueError(f"{partner}: {e}") from None
    if other_layout != f"tiny-{other}":
        raise ValueError(f"{partner}: expected a TAESD {other}, found layout {other_layout}")
    out = {f"{mine}.{k}": v for k, v in state.items()}
    out.update({f"{other}.{k}": v for k, v in other_state.items()})
    return out


def _from_layout(state: dict, layout: str, path: Path, preset_name: str | None) -> Autoencoder:
    if layout.startswith("wan"):
        if layout == "wan-original":
            state = wan_original_to_diffusers(state)
        return _finish(wan_shape_config(state, path), state, path)
    if layout.startswith("kl"):
        if layout == "kl-ldm":
            state = ldm_to_diffusers(state)
        shape = kl_shape_config(state)
        cfg = replace(_kl_preset(shape, path, preset_name), **shape)
    else:
        if layout == "tiny-diffusers":
            state = tiny_diffusers_to_taesd(state)
        state = rename_pool_keys(state)
        shape = tiny_shape_config(state)
        cfg = replace(_tiny_preset(shape, path, preset_name), **shape)
    return _finish(cfg, state, path)


def _name_hint(path: Path, candidates: list[str]) -> str | None:
    text = str(path).lower().replace("-", "").replace("_", "")
    for name in sorted(candidates, key=len, reverse=True):
        if name in text:
            return name
    return None


def _kl_preset(shape: dict, path: Path, preset_name: str | None) -> KLConfig:
    if preset_name:
        return _checked(preset(preset_name), KLConfig, path)
    same = [n for n, c in PRESETS.items() if isinstance(c, KLConfig)
            and c.latent_channels == shape["latent_channels"] and c.use_quant_conv == shape["use_quant_conv"]]
    hint = _name_hint(path, same + (["ae"] if "flux1" in same else []))
    if hint == "ae":
        hint = "flux1"  # FLUX.1's VAE ships as ae.safetensors
    if hint:
        return PRESETS[hint]
    if shape["latent_channels"] == 4:
        return PRESETS["sd15"]  # SD 1.x/2.x; SDXL differs only in scaling: name it with preset
    raise ValueError(f"{path}: a {shape['latent_channels']}-channel AutoencoderKL fits presets "
                     f"{', '.join(same) or 'none'}; say which with --preset NAME (latent scaling differs)")


def _tiny_preset(shape: dict, path: Path, preset_name: str | None) -> TinyConfig:
    if preset_name:
        return _checked(preset(preset_name), TinyConfig, path)
    same = [n for n, c in PRESETS.items()
            if isinstance(c, TinyConfig) and c.latent_channels == shape["latent_channels"]]
    hint = _name_hint(path, same)
    return replace(PRESETS[hint], name=hint) if hint else TinyConfig(name=f"tiny-c{shape['latent_channels']}")


def _checked(cfg: ModelConfig, kind: type, path: Path) -> ModelConfig:
    if not isinstance(cfg, kind):
        raise ValueError(f"{path}: preset {cfg.name!r} is a {cfg.family} model, the file holds another family")
    return cfg


def _apply_diffusers_config(model: Autoencoder, cfg: dict) -> Autoencoder:
    """Latent conventions and group count from a diffusers config.json."""
    updates = {}
    if cfg.get("scaling_factor") is not None:
        updates["scaling_factor"] = float(cfg["scaling_factor"])
    if cfg.get("shift_factor") is not None:
        updates["shift_factor"] = float(cfg["shift_factor"])
    if isinstance(model.config, KLConfig) and cfg.get("norm_num_groups"):
        updates["norm_num_groups"] = int(cfg["norm_num_groups"])
    if updates:
        new = Autoencoder(replace(model.config, **updates))
        new.load_state_dict(model.state_dict())
        new.source = model.source
        return new
    return model


def _config_from_json(text: str, path: Path) -> ModelConfig:
    try:
        data = json.loads(text)
        cls = {"kl": KLConfig, "tiny": TinyConfig, "wan": WanConfig}[data.pop("family")]
        names = {f.name for f in fields(cls) if f.init}
        for k in ("block_out_channels", "dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            if data.get(k) is not None:
                data[k] = tuple(data[k])
        return cls(**{k: v for k, v in data.items() if k in names})
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: bad '{CONFIG_KEY}' metadata ({e})") from None


def config_to_json(cfg: ModelConfig) -> str:
    """The metadata string that makes a safetensors file self-describing for ``load_model``."""
    return json.dumps(asdict(cfg))


def _finish(cfg: ModelConfig, state: dict, path: Path) -> Autoencoder:
    model = _new_model(cfg)
    expected = model.state_dict()
    if isinstance(cfg, (KLConfig, WanConfig)):  # the KL and Wan networks sit under .net
        state = {f"net.{k}": v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(_plain(missing[:3]))})")
        if extra:
            parts.append(f"{len(extra)} unexpected keys (e.g. {', '.join(_plain(extra[:3]))})")
        if bad:
            k = bad[0]
            parts.append(f"{len(bad)} shape mismatches (e.g. {_plain([k])[0]}: file {tuple(state[k].shape)}, "
                         f"model {tuple(expected[k].shape)})")
        raise ValueError(f"{path}: does not fit a {cfg.family} autoencoder ({cfg.name}): " + "; ".join(parts))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.source = str(path)
    return model


def _plain(keys: list[str]) -> list[str]:
    return [k.removeprefix("net.") for k in keys]


def save_model(model: Autoencoder, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
               metadata: dict[str, str] | None = None) -> Path:
    """Write a self-describing safetensors file that ``load_model`` reads back exactly.

    Tensors are stored under the names ``load_model`` expects (diffusers names for the KL family,
    TAESD names for the tiny family), in ``dtype``; the config goes in the metadata.
    Written to a temporary name and renamed, so an interrupted save leaves no partial file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} does not exist")
    state = {k.removeprefix("net."): v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: config_to_json(model.config), **(metadata or {})}
    tmp = path.with_name(f".{path.name}.partial")
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
