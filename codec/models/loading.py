"""``load_model``: from a preset name, a folder, a file or a hub id to a ready Autoencoder."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .autoencoder import Autoencoder
from .checkpoint import read_json, read_state_dict
from .config import (
    PRESETS,
    KLConfig,
    ModelConfig,
    TinyConfig,
    WanConfig,
    checked_fields,
    config_from_dict,
    preset,
    presets_named_by,
)
from .identity import state_digest
from .layouts import (
    KL_SHAPE_KEYS,
    LDM_PREFIX,
    TINY_SHAPE_KEYS,
    detect_layout,
    diffusers_config,
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
from .wan_layouts import wan_layout
from .wan_layouts import with_preset as wan_with_preset

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
    latent convention where neither a config nor the file name tells (SD3 and FLUX.1 share an
    architecture; SD 1.x and SDXL too); a name hint counts only as whole tokens of the file stem
    (or folder name) that equal a preset name or an alias (``config.PRESET_ALIASES``). For a Wan
    video VAE it gives the latent statistics and must fit the weights' latent channels, temporal
    and spatial factors, and any statistics its config states (``wan_layouts.with_preset``).

    The model records ``model_id``, the portable identity that loads it again from any working
    directory (``default``, the preset name, a hub repo id, or the absolute path), and
    ``weights_sha256``, the content hash of its weights (``identity.state_digest``).
    Raises ValueError naming the file and what was expected for anything it cannot load exactly.
    """
    source = str(source)
    model = _load_cpu(source, preset_name)
    path = Path(source).expanduser()
    model.model_id = str(path.resolve()) if path.exists() and source != DEFAULT_MODEL else source  # as _load_cpu
    return model.to(device=device, dtype=dtype).eval()


def _load_cpu(source: str, preset_name: str | None) -> Autoencoder:
    if source == DEFAULT_MODEL:  # reserved: a file or folder called "default" is ./default
        if DEFAULT_FILE.is_file():
            return _load_path(DEFAULT_FILE, None)
        raise ValueError("the built-in default model is not installed in this copy of codec; "
                         "pass --model PATH to a VAE checkpoint (e.g. a taesd/taef2 *_encoder.pth)")
    path = Path(source).expanduser()
    if path.exists():
        return _load_path(path, preset_name)
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
    if CONFIG_KEY in meta:  # written by save_model: self-describing
        where = f"{path}: '{CONFIG_KEY}' metadata"
        try:
            data = json.loads(meta[CONFIG_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        cfg = config_from_dict(data, where)
        _fit(cfg, state, path)
        if preset_name and isinstance(cfg, WanConfig):
            cfg = wan_with_preset(cfg, preset_name, path)
        elif preset_name:  # it must agree with the file's own convention
            cfg = _with_convention(cfg, path, path, preset_name, asdict(cfg))
        return _finish(cfg, state, path)
    if any(k.startswith(LDM_PREFIX) for k in state):
        state = strip_prefix(state, LDM_PREFIX)
    try:
        layout = detect_layout(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if layout in ("tiny-encoder", "tiny-decoder"):
        state = _with_partner(path, state, layout)
        layout = "tiny-pair"
    return _from_layout(state, layout, path, preset_name, {}, path)


def _load_folder(folder: Path, preset_name: str | None) -> Autoencoder:
    config_file = folder / "config.json"
    if config_file.is_file():
        cfg_json = read_json(config_file)
        weights = next((folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                        if (folder / n).is_file()), None)
        if weights is None:
            raise ValueError(f"{folder}: has config.json but no diffusion_pytorch_model.safetensors")
        if isinstance(cfg_json, dict) and cfg_json.get("_class_name") == "AutoencoderKLWan":
            # The folder is the model's identity: its config.json holds the latent statistics.
            cfg, state = wan_diffusers_config(cfg_json, config_file), read_state_dict(weights)[0]
            if wan_layout(state) == "wan-original":  # the same tensors under the original names
                state = wan_original_to_diffusers(state)
            _fit(cfg, state, folder)
            return _finish(wan_with_preset(cfg, preset_name, folder) if preset_name else cfg, state, folder)
        family, declared = diffusers_config(cfg_json, str(config_file))
        state, _ = read_state_dict(weights)
        try:
            layout = detect_layout(state)
        except ValueError as e:
            raise ValueError(f"{weights}: {e}") from None
        if not layout.startswith(family):
            raise ValueError(f"{folder}: config.json describes a {family} autoencoder, the weights are "
                             f"{layout.split('-')[0]} ({layout} layout)")
        return _from_layout(state, layout, weights, preset_name, declared, folder)
    encoders = sorted(p for p in folder.iterdir() if p.stem.endswith("_encoder")
                      and p.suffix in (".pth", ".safetensors"))
    if not encoders:
        raise ValueError(f"{folder}: expected a diffusers folder (config.json) or a TAESD "
                         "*_encoder.pth/*_decoder.pth pair")
    return _load_path(encoders[0], preset_name)


def _with_partner(path: Path, state: dict, layout: str) -> dict:
    mine = layout.removeprefix("tiny-")
    for role in ("encoder", "decoder"):  # the file name decides over the keys of a partial file
        if f"_{role}" in path.stem:
            mine = role
    other = "decoder" if mine == "encoder" else "encoder"
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
    if other_layout not in ("tiny-encoder", "tiny-decoder"):
        raise ValueError(f"{partner}: expected a TAESD {other}, found layout {other_layout}")
    out = {f"{mine}.{k}": v for k, v in state.items()}
    out.update({f"{other}.{k}": v for k, v in other_state.items()})
    return out


def _from_layout(state: dict, layout: str, path: Path, preset_name: str | None, declared: dict,
                 named: Path) -> Autoencoder:
    """The model of a state dict in ``layout``: the fields a config declared first, then the shapes,
    then the latent convention (``_with_convention``; ``named`` is what a name hint is read from)."""
    if layout.startswith("wan"):  # a Wan file states its architecture in its shapes; its preset its statistics
        if layout == "wan-original":
            state = wan_original_to_diffusers(state)
        cfg = wan_shape_config(state, path)
        _fit(cfg, state, path)
        return _finish(wan_with_preset(cfg, preset_name, path) if preset_name else cfg, state, path)
    if layout.startswith("kl"):
        if layout == "kl-ldm":
            state = ldm_to_diffusers(state)
        cls, shape, needs = KLConfig, kl_shape_config(state), KL_SHAPE_KEYS
    else:
        if layout == "tiny-diffusers":
            state = tiny_diffusers_to_taesd(state)
        state = rename_pool_keys(state)
        cls, shape, needs = TinyConfig, tiny_shape_config(state), TINY_SHAPE_KEYS
    family = "kl" if cls is KLConfig else "tiny"
    fields_ = {**shape, **checked_fields(cls, declared, str(named))}
    unknown = [f"{keys} (which tells its {name})" for name, keys in needs.items() if name not in fields_]
    if unknown:
        raise ValueError(f"{path}: an incomplete {family} autoencoder: missing {' and '.join(unknown)}")
    try:
        arch = cls(name=f"{family}-c{fields_['latent_channels']}", **fields_)
    except ValueError as e:
        raise ValueError(f"{named}: {e}") from None
    _fit(arch, state, path)  # a broken file is reported as such before any question of presets
    return _finish(_with_convention(arch, path, named, preset_name, declared), state, path)


def _same_convention(a: ModelConfig, b: ModelConfig | dict) -> bool:
    get = b.get if isinstance(b, dict) else lambda k: getattr(b, k)
    return a.scaling_factor == get("scaling_factor") and a.shift_factor == get("shift_factor")


def _with_convention(arch: ModelConfig, path: Path, named: Path, preset_name: str | None,
                     declared: dict) -> ModelConfig:
    """``arch`` with its latent convention and name: an explicit preset (which must agree with
    what a config declared), else what the config declared, else the one preset whose name the
    file name holds (``presets_named_by``), else, for the tiny family, scaling 1 and shift 0.
    A KL model left without a convention is refused: ask for ``--preset``."""
    if preset_name:
        p = preset(preset_name)
        if p.family != arch.family or p.latent_channels != arch.latent_channels:
            raise ValueError(f"{path}: preset {p.name!r} is a {p.latent_channels}-channel {p.family} model; "
                             f"the file holds a {arch.latent_channels}-channel {arch.family} model")
        if "scaling_factor" in declared and not _same_convention(p, declared):
            raise ValueError(f"{path}: preset {p.name} has scaling {p.scaling_factor} and shift {p.shift_factor}, "
                             f"but the model's config says scaling {declared['scaling_factor']} and shift "
                             f"{declared['shift_factor']}; leave out --preset (the config decides) or fix the config")
        return _as_preset(arch, p, declared)
    fits = sorted(n for n in presets_named_by(named)
                  if PRESETS[n].family == arch.family and PRESETS[n].latent_channels == arch.latent_channels)
    hinted = PRESETS[fits[0]] if len(fits) == 1 else None
    if "scaling_factor" in declared:  # the config states the convention; a name hint only names it
        return _as_preset(arch, hinted, declared) if hinted and _same_convention(hinted, declared) else arch
    if hinted:
        return _as_preset(arch, hinted, declared)
    if arch.family == "tiny":
        return arch  # every tiny model emits scaled latents: scaling 1, shift 0
    same = [n for n, c in PRESETS.items() if c.family == "kl" and c.latent_channels == arch.latent_channels]
    named_as = f"its name names {' and '.join(fits)}" if fits else f"its name '{named.name}' names no preset"
    raise ValueError(f"{path}: a {arch.latent_channels}-channel AutoencoderKL without a config, and {named_as}; "
                     f"its latent scaling cannot be told from the weights: say which with --preset "
                     f"({', '.join(same) or 'a preset with its channel count'})")


def _as_preset(arch: ModelConfig, p: ModelConfig, declared: dict) -> ModelConfig:
    extra = {"force_upcast": p.force_upcast} if isinstance(p, KLConfig) and "force_upcast" not in declared else {}
    return replace(arch, name=p.name, scaling_factor=p.scaling_factor, shift_factor=p.shift_factor, **extra)


def config_to_json(cfg: ModelConfig) -> str:
    """The metadata string that makes a safetensors file self-describing for ``load_model``."""
    return json.dumps(asdict(cfg))


def _fit(cfg: ModelConfig, state: dict, path: Path) -> None:
    """Raise ValueError naming ``path`` unless ``state`` has exactly the keys and shapes of a model
    of ``cfg`` (checked on the meta device: nothing is allocated)."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in _new_model(cfg).state_dict().items()}
    except ValueError as e:  # e.g. GroupNorm groups that do not divide a width
        raise ValueError(f"{path}: the weights give a {cfg.family} model that cannot be built "
                         f"({_first_line(e)}; config {_arch_summary(cfg)})") from None
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} unexpected keys (e.g. {', '.join(extra[:3])})")
        if bad:
            k = bad[0]
            parts.append(f"{len(bad)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)}, model {expected[k]})")
        raise ValueError(f"{path}: does not fit a {cfg.family} autoencoder ({_arch_summary(cfg)}): " + "; ".join(parts))


def _arch_summary(cfg: ModelConfig) -> str:
    if isinstance(cfg, KLConfig):
        return (f"{cfg.latent_channels} latent channels, widths {list(cfg.block_out_channels)}, "
                f"{cfg.norm_num_groups} groups")
    if isinstance(cfg, WanConfig):
        return f"{cfg.latent_channels} latent channels, base width {cfg.base_dim}, multipliers {list(cfg.dim_mult)}"
    return f"{cfg.latent_channels} latent channels, width {cfg.width}"


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _finish(cfg: ModelConfig, state: dict, path: Path) -> Autoencoder:
    """The model of ``cfg`` holding ``state`` (already checked by ``_fit``). Built on the meta device
    and given float32 copies of the tensors: no random initialisation that the weights overwrite."""
    with torch.device("meta"):
        model = _new_model(cfg)
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in state.items()}, strict=True, assign=True)
    model.source = str(path)
    model.weights_sha256 = state_digest(model.state_dict())  # once per load; identity.weights_digest
    return model


def save_model(model: Autoencoder, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
               metadata: dict[str, str] | None = None) -> Path:
    """Write a self-describing safetensors file that ``load_model`` reads back exactly.

    Tensors are stored under the model's own state-dict names (diffusers names for the KL family,
    TAESD names for the tiny family), in ``dtype``; the config goes in the metadata.
    Written to a temporary name and renamed, so an interrupted save leaves no partial file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} does not exist")
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: config_to_json(model.config), **(metadata or {})}
    tmp = path.with_name(f".{path.name}.partial")
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
