"""The training loop: AdamW, EMA weights, optional GAN/LPIPS, exact checkpoints, loss plot.

One ``Trainer`` owns the model, its EMA twin (what gets saved), the optimiser(s), the frame
bank and two sources of randomness (torch's global RNG and the data sampler's generator).
A checkpoint holds all of them, so ``Trainer(cfg, resume=ckpt).step()`` gives bit-for-bit the
step an uninterrupted run would have taken (same device, same thread count).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from codec.models import Autoencoder, TinyConfig, WanConfig, build, config_from_dict, load_model, save_model
from codec.models.config import ModelConfig

from .data import FrameBank, find_sources
from .losses import PatchDiscriminator, ReconstructionLoss, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from .pca_init import pca_autoencoder, residual_parameters

CKPT_FORMAT = "codec-train-checkpoint/1"


@dataclass
class TrainConfig:
    """Everything that decides what a run computes (stored in checkpoints)."""

    data: list[str]
    out: str
    family: str = "tiny"
    latent_channels: int = 16
    width: int = 64
    resample: str = "nearest"  # tiny family from scratch: "nearest" (TAESD) or "shuffle"
    pca_init: bool = False  # from scratch: start as the PCA block codec, train the blocks (pca_init.py)
    pca_crops: int = 2000  # random crops the PCA is fitted on
    decoder_only: bool = False
    init: str | None = None
    steps: int = 1000
    batch: int = 8
    crop: int = 128
    lr: float | None = None  # None: 5e-4 from scratch, 1e-4 for --decoder-only
    weight_decay: float = 1e-4
    warmup: int = 100
    ema_decay: float = 0.999
    ssim_weight: float = 1.0
    gan_start: int | None = None  # None: no GAN
    gan_weight: float = 0.5
    lpips: str | None = None
    lpips_weight: float = 1.0
    exclude: list[str] = field(default_factory=list)
    frames_per_clip: int = 64
    color_aug: bool = False
    device: str = "cpu"
    checkpoint: str | None = None  # None: <out without suffix>.ckpt
    checkpoint_every: int = 500
    log_every: int = 50  # a plain log line every N steps when stderr is not a terminal
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        if self.family not in ("tiny", "kl"):
            raise ValueError(f"--family must be 'tiny' or 'kl', got {self.family!r}")
        if self.decoder_only and not self.init:
            raise ValueError("--decoder-only needs --init MODEL (the model whose encoder stays frozen)")
        if not self.decoder_only and self.init is None and self.family != "tiny":
            raise ValueError("training from scratch supports --family tiny only; fine-tune a KL model "
                             "with --decoder-only --init MODEL")
        if self.init and self.resample != "nearest":
            raise ValueError("--resample applies to a model trained from scratch; --init keeps its model's layout")
        if self.pca_init:
            if self.init or self.decoder_only:
                raise ValueError("--pca-init starts a model from scratch; it excludes --init and --decoder-only")
            self.resample = "shuffle"  # the PCA start needs pixel (un)shuffle
        for name in ("steps", "batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr is None:
            self.lr = 1e-4 if self.decoder_only or self.pca_init else 5e-4

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else Path(self.out).with_suffix(".ckpt")

    @property
    def plot_path(self) -> Path:
        out = Path(self.out)
        return out.with_name(out.stem + "_loss.png")


def decoder_modules(model: Autoencoder) -> list[torch.nn.Module]:
    """The modules ``_decode_raw`` runs (what --decoder-only trains)."""
    return [m for m in (model.post_quant_conv, model.decoder) if m is not None]


def last_decoder_weight(model: Autoencoder) -> torch.Tensor:
    """Weight of the layer that produces RGB (for the adaptive GAN weight)."""
    return model.decoder[-1].weight if model.family == "tiny" else model.decoder.conv_out.weight


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | os.PathLike | None = None, log=print):
        ckpt = None
        if resume is not None:
            ckpt = _read_checkpoint(resume)
            saved = ckpt["config"]
            # The checkpoint decides the math; the command line may change length, device, paths.
            cfg = replace(saved, steps=cfg.steps, out=cfg.out, device=cfg.device, threads=cfg.threads,
                          checkpoint=cfg.checkpoint, checkpoint_every=cfg.checkpoint_every,
                          log_every=cfg.log_every)
        self.cfg, self.log = cfg, log
        init = None
        if cfg.init and ckpt is None:  # loaded before the data, so a model it cannot train is refused at once
            init = load_model(cfg.init)
            check_trainable(init.config, cfg.init)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.files = find_sources(cfg.data, cfg.exclude)
        if ckpt is not None and ckpt["files"] != [str(f) for f in self.files]:
            raise ValueError(f"{resume}: the training files differ from the checkpoint's run")
        self.bank = FrameBank(self.files, cfg.crop, cfg.frames_per_clip, cfg.color_aug)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)

        self.model = self._build_model(ckpt, resume, init).to(self.device)
        if cfg.decoder_only:
            self.model.requires_grad_(False)
            for m in decoder_modules(self.model):
                m.requires_grad_(True)
        if cfg.pca_init:  # the fitted linear path stays fixed; the residual blocks learn (pca_init.py)
            self.model.requires_grad_(False)
            for q in residual_parameters(self.model):
                q.requires_grad_(True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))

        lpips = None
        if cfg.lpips:
            from .lpips import load_lpips
            lpips = load_lpips(cfg.lpips, self.device)
        self.rec_loss = ReconstructionLoss(cfg.ssim_weight, lpips, cfg.lpips_weight)
        self.disc = self.disc_opt = None
        if cfg.gan_start is not None:
            self.disc = PatchDiscriminator().to(self.device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9),
                                              weight_decay=cfg.weight_decay)

        self.step_count, self.wall, self.history = 0, 0.0, {}
        if ckpt is not None:
            self._load_state(ckpt)

    # ---- setup ---------------------------------------------------------------------------
    def _build_model(self, ckpt: dict | None, resume: str | os.PathLike | None,
                     init: Autoencoder | None) -> Autoencoder:
        cfg = self.cfg
        if ckpt is not None:
            model = Autoencoder(ckpt["model_config"])
            try:
                model.load_state_dict(ckpt["model"])
            except RuntimeError as e:
                raise ValueError(f"{resume}: its model weights do not fit its model_config "
                                 f"({str(e).splitlines()[0][:200]})") from None
        elif init is not None:
            model = init
            # Training changes the weights: the loaded identity and hash no longer name them.
            model.model_id = model.weights_sha256 = None
        else:
            arch = TinyConfig(name=f"tiny-c{cfg.latent_channels}-w{cfg.width}" +
                              ("-shuffle" if cfg.resample == "shuffle" else ""),
                              latent_channels=cfg.latent_channels, width=cfg.width, resample=cfg.resample)
            if cfg.pca_init:
                crops = self.bank.sample(cfg.pca_crops, torch.Generator().manual_seed(cfg.seed + 2))
                model = pca_autoencoder(crops.float() / 255, arch)
            else:
                model = build(arch)
        return model.float().train()

    def _load_state(self, ckpt: dict) -> None:
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        if self.disc is not None:
            self.disc.load_state_dict(ckpt["disc"])
            self.disc_opt.load_state_dict(ckpt["disc_opt"])
        self.step_count, self.wall = int(ckpt["step"]), float(ckpt["wall"])
        self.history = {k: list(v) for k, v in ckpt["history"].items()}
        torch.set_rng_state(ckpt["rng_torch"])
        self.data_gen.set_state(ckpt["rng_data"])
        if self.device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], self.device)

    # ---- one step ------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of --lr at the last step."""
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    def step(self) -> dict[str, float]:
        """One optimisation step; returns the loss parts as floats."""
        cfg, model = self.cfg, self.model
        x = self.bank.sample(cfg.batch, self.data_gen).to(self.device).float() / 127.5 - 1
        model.train()
        autocast = torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            with torch.no_grad() if cfg.decoder_only else nullcontext():
                z = model._encode_raw(x, sample=False, generator=None)
            y = model._decode_raw(z).float()
            loss, parts = self.rec_loss(y, x)
            gan_on = self.disc is not None and self.step_count >= cfg.gan_start
            if gan_on:
                g_loss = hinge_g_loss(self.disc(y))
                w = adaptive_gan_weight(loss, g_loss, last_decoder_weight(model)) * cfg.gan_weight
                loss = loss + w * g_loss
                parts.update(g_loss=g_loss.item(), gan_w=w.item())
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step_count)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        if gan_on:
            with autocast:
                d_loss = hinge_d_loss(self.disc(x), self.disc(y.detach()))
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
            parts["d_loss"] = d_loss.item()
        self._update_ema()
        self.step_count += 1
        parts["loss"] = loss.item()
        return parts

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step_count) / (10 + self.step_count))
        for p, e in zip(self.model.parameters(), self.ema.parameters()):
            if p.requires_grad:  # frozen parts (the encoder of --decoder-only) are never touched
                e.lerp_(p, 1 - decay)
        for b, e in zip(self.model.buffers(), self.ema.buffers()):
            e.copy_(b)

    # ---- run, save -----------------------------------------------------------------------
    def run(self) -> Path:
        """Train up to ``cfg.steps``, checkpointing and snapshotting; returns the output file."""
        cfg = self.cfg
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step_count, disable=not tty, unit="step", dynamic_ncols=True)
        t_mark, s_mark = time.perf_counter(), self.step_count
        saved_at = None
        while self.step_count < cfg.steps:
            t0 = time.perf_counter()
            parts = self.step()
            self.wall += time.perf_counter() - t0
            for k, v in parts.items():
                self.history.setdefault(k, []).append(v)
            self.history.setdefault("step", []).append(self.step_count)
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}", l1=f"{parts['l1']:.4f}")
            if self.step_count % cfg.checkpoint_every == 0 or self.step_count == cfg.steps:
                self.save_checkpoint()
                self.save_output()
                saved_at = self.step_count
            if not tty and (self.step_count % cfg.log_every == 0 or self.step_count == cfg.steps):
                rate = (time.perf_counter() - t_mark) / max(1, self.step_count - s_mark)
                recent = {k: sum(v[-50:]) / len(v[-50:]) for k, v in self.history.items() if k != "step"}
                self.log(f"step {self.step_count}/{cfg.steps} " +
                         " ".join(f"{k} {v:.4f}" for k, v in recent.items()) + f" ({rate:.2f} s/step)", flush=True)
                t_mark, s_mark = time.perf_counter(), self.step_count
        bar.close()
        if saved_at != self.step_count:  # nothing left to train (a finished run resumed): write it anyway
            self.save_output()
        return Path(cfg.out)

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        path = Path(path) if path else self.cfg.checkpoint_path
        state = {
            "format": CKPT_FORMAT, "step": self.step_count, "wall": self.wall,
            "config": json.dumps(asdict(self.cfg)), "files": [str(f) for f in self.files],
            "model_config": json.dumps(asdict(self.model.config)),
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
            "disc": self.disc.state_dict() if self.disc else None,
            "disc_opt": self.disc_opt.state_dict() if self.disc_opt else None,
            "history": json.dumps(self.history),
            "rng_torch": torch.get_rng_state(), "rng_data": self.data_gen.get_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        tmp = path.with_name(f".{path.name}.partial")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def training_facts(self) -> dict[str, str]:
        cfg = self.cfg
        facts = {
            "steps": self.step_count, "batch": cfg.batch, "crop": cfg.crop, "lr": cfg.lr,
            "ema_decay": cfg.ema_decay, "seed": cfg.seed, "device": str(self.device),
            "threads": torch.get_num_threads(), "wall_s": round(self.wall, 1),
            "losses": self.loss_names(), "decoder_only": cfg.decoder_only, "init": cfg.init,
            "color_aug": cfg.color_aug, "pca_init": cfg.pca_init,
            "files": [Path(f).name for f in self.files], "frames": self.bank.n_frames,
            "torch": torch.__version__, "python": platform.python_version(),
        }
        return {"training": json.dumps(facts)}

    def loss_names(self) -> str:
        names = ["L1"]
        if self.cfg.ssim_weight:
            names.append(f"{self.cfg.ssim_weight:g}*(1-MS-SSIM)")
        if self.cfg.lpips:
            names.append(f"{self.cfg.lpips_weight:g}*LPIPS")
        if self.cfg.gan_start is not None:
            names.append(f"hinge PatchGAN from step {self.cfg.gan_start} (adaptive weight x{self.cfg.gan_weight:g})")
        return " + ".join(names)

    @torch.no_grad()
    def latent_statistics(self, crops: int = 64) -> tuple[float, float]:
        """Mean and std of the EMA model's raw latents over ``crops`` fixed training crops."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 3)
        x = self.bank.sample(crops, gen).to(self.device).float() / 127.5 - 1
        z = self.ema._encode_raw(x, sample=False, generator=None).float()
        return z.mean().item(), z.std().item()

    def save_output(self, path: str | os.PathLike | None = None) -> Path:
        """The EMA weights as fp16 safetensors (``load_model`` reads it), plus the loss plot.

        A model trained from scratch gets the shift and scaling factors that make its latents
        zero-mean and unit-variance on the training data (the convention of SD and FLUX VAEs, which
        diffusion models expect); a model started from ``--init`` keeps its latent space as it was.
        """
        model = self.ema
        if self.cfg.init is None:
            mean, std = self.latent_statistics()
            model = copy.copy(self.ema)  # shallow: the same weights under another config
            model.config = replace(model.config, shift_factor=round(mean, 5), scaling_factor=round(1 / std, 5))
        out = save_model(model, path or self.cfg.out, dtype=torch.float16, metadata=self.training_facts())
        self.save_plot()
        return out

    def save_plot(self) -> Path | None:
        if not self.history.get("step"):
            return None
        from .plot import plot_history
        return plot_history(self.history, self.cfg.plot_path)


# What a checkpoint must hold, and of which type (``save_checkpoint`` writes it).
_CKPT_ENTRIES = {"step": int, "wall": (int, float), "config": str, "files": list, "model_config": str,
                 "model": dict, "ema": dict, "opt": dict, "history": str, "rng_torch": torch.Tensor,
                 "rng_data": torch.Tensor}


def _read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path``, validated, with ``config`` parsed to a TrainConfig and
    ``model_config`` to a model config. Raises ValueError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable training checkpoint ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not a codec training checkpoint (expected format {CKPT_FORMAT})")
    missing = [k for k in _CKPT_ENTRIES if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: an incomplete training checkpoint: no {', '.join(missing)}")
    wrong = [f"{k} is a {type(ckpt[k]).__name__}" for k, t in _CKPT_ENTRIES.items() if not isinstance(ckpt[k], t)]
    if wrong:
        raise ValueError(f"{path}: a damaged training checkpoint: {', '.join(wrong)}")
    ckpt["config"] = _train_config(_json_object(ckpt["config"], f"{path}: config"), f"{path}: config")
    ckpt["model_config"] = config_from_dict(_json_object(ckpt["model_config"], f"{path}: model_config"),
                                            f"{path}: model_config")
    check_trainable(ckpt["model_config"], path)
    ckpt["history"] = _json_object(ckpt["history"], f"{path}: history")
    return ckpt


def check_trainable(cfg: ModelConfig, where) -> None:
    """Refuse (ValueError naming ``where``) a model the trainer cannot train: it trains image
    autoencoders on 2D crops; the Wan video VAEs code clips of 1 + 4k frames with causal 3D convolutions."""
    if isinstance(cfg, WanConfig):
        raise ValueError(f"{where}: a Wan video VAE ({cfg.name}); codec train trains image autoencoders "
                         "(tiny and kl families) only, not video VAEs")


def _json_object(text: str, where: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def _train_config(data: dict, where: str) -> TrainConfig:
    unknown = sorted(set(data) - {f.name for f in fields(TrainConfig)})
    if unknown or "data" not in data or "out" not in data:
        raise ValueError(f"{where}: not a training config of this codec (needs data and out; "
                         f"unknown fields: {', '.join(unknown) or 'none'})")
    try:
        return TrainConfig(**data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
