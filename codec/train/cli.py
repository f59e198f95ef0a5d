"""``codec train``: the command-line face of the trainer (``add_parser`` + ``run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  codec train images/ clips/*.mp4 --out my.safetensors --family tiny --latent-channels 16 --width 32
  codec train clips/ --out dec.safetensors --decoder-only --init taef2_encoder.pth --steps 2000
  codec train clips/ --out my.safetensors --resume my.ckpt --steps 4000"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to an ``argparse`` sub-parser set; returns its parser."""
    p = subparsers.add_parser("train", help="train a tiny autoencoder, or fine-tune a decoder",
                              description="Train an autoencoder on images and video frames. The EMA "
                              "weights are saved (fp16 safetensors that load_model reads), with a "
                              "checkpoint (<out>.ckpt) and a loss plot (<out>_loss.png) beside them.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    fill_parser(p)
    return p


def fill_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", help="image/video files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output weights, .safetensors")
    p.add_argument("--family", default="tiny", choices=["tiny"], help="architecture from scratch (default: tiny)")
    p.add_argument("--latent-channels", type=int, default=16, help="latent channels, from scratch (default 16)")
    p.add_argument("--width", type=int, default=64, help="conv width of the tiny family, 64 = TAESD (default 64)")
    p.add_argument("--resample", default="nearest", choices=["nearest", "shuffle"],
                   help="tiny family from scratch: TAESD's nearest/stride-2 resampling or pixel (un)shuffle "
                        "(default: nearest)")
    p.add_argument("--pca-init", action="store_true",
                   help="from scratch: start as the exact PCA codec of 8x8 patches and train its residual blocks "
                        "(implies --resample shuffle; default: off)")
    p.add_argument("--decoder-only", action="store_true",
                   help="freeze the encoder of --init, train the decoder (default: off)")
    p.add_argument("--init", metavar="MODEL",
                   help="start from this model, any file load_model reads (default: none, from scratch)")
    p.add_argument("--steps", type=int, default=1000, help="total optimisation steps (default 1000)")
    p.add_argument("--batch", type=int, default=8, help="crops per step (default 8)")
    p.add_argument("--crop", type=int, default=128, help="crop size in pixels, a multiple of 8 (default 128)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate "
                   "(default 5e-4 from scratch, 1e-4 with --decoder-only or --pca-init)")
    p.add_argument("--ssim-weight", type=float, default=1.0, help="weight of (1 - MS-SSIM) (default 1.0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ..., bf16 autocast on CUDA (default: cpu)")
    p.add_argument("--gan-start", type=int, default=None, metavar="N",
                   help="switch on the PatchGAN loss from step N (default: no GAN)")
    p.add_argument("--gan-weight", type=float, default=0.5, help="factor on the adaptive GAN weight (default 0.5)")
    p.add_argument("--lpips", metavar="PATH", help="LPIPS-vgg weights file (default: none, LPIPS off)")
    p.add_argument("--lpips-weight", type=float, default=1.0, help="weight of the LPIPS loss (default 1.0)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out files whose name or path matches, repeatable (default: none)")
    p.add_argument("--frames-per-clip", type=int, default=64, help="frames kept per video, evenly spread (default 64)")
    p.add_argument("--color-aug", action="store_true",
                   help="jitter colours: random channel order, saturation and channel gains (default: off)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint, its settings win (default: none)")
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint file (default: <out>.ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=500, metavar="N",
                   help="write checkpoint, --out snapshot and plot every N steps (default 500)")
    p.add_argument("--log-every", type=int, default=50, metavar="N",
                   help="without a terminal, print one progress line every N steps (default 50)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the saved weight average (default 0.999)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def config_from_args(args: argparse.Namespace):
    from .trainer import TrainConfig

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out.name}")
    return TrainConfig(
        data=list(args.data), out=str(out), family=args.family, latent_channels=args.latent_channels,
        width=args.width, resample=args.resample, pca_init=args.pca_init, decoder_only=args.decoder_only,
        init=args.init, steps=args.steps,
        batch=args.batch, crop=args.crop, lr=args.lr, ssim_weight=args.ssim_weight, gan_start=args.gan_start,
        gan_weight=args.gan_weight, lpips=args.lpips, lpips_weight=args.lpips_weight, exclude=args.exclude,
        frames_per_clip=args.frames_per_clip, color_aug=args.color_aug, device=args.device, checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, ema_decay=args.ema_decay,
        seed=args.seed, threads=args.threads)


def _check_outputs(cfg) -> None:
    """The weights, checkpoint and loss plot a run writes, checked before any work like every
    command's outputs (``codec.outputs``): never a data file, the ``--init`` model or the LPIPS
    weights, never a device or folder. Data folders are read, not written: outputs may sit in them.
    (The ``--resume`` checkpoint is meant to be written over: it is not an input here.)"""
    from ..outputs import check_outputs, model_files

    inputs = [p for p in cfg.data if Path(p).is_file()] + model_files(cfg.init) + [cfg.lpips]
    check_outputs([("--out", cfg.out, (".safetensors",)), ("--checkpoint", cfg.checkpoint_path, None),
                   ("the loss plot", cfg.plot_path, (".png",))], inputs=[p for p in inputs if p])


def run(args: argparse.Namespace) -> int:
    """Run ``codec train``; raises ValueError (one line) for bad input. Returns the exit code."""
    from .trainer import Trainer

    cfg = config_from_args(args)
    _check_outputs(cfg)
    if cfg.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine")
    trainer = Trainer(cfg, resume=args.resume)
    b = trainer.bank
    print(f"data: {len(b.files)} sources, {b.n_frames} frames, {b.nbytes / 2**20:.0f} MiB in memory"
          + (f"; upscaled to the crop: {', '.join(f.name for f in b.upscaled)}" if b.upscaled else ""),
          flush=True)
    print(f"model: {trainer.model.name} ({sum(p.numel() for p in trainer.params):,} trained parameters), "
          f"losses: {trainer.loss_names()}, start step {trainer.step_count}/{cfg.steps}", flush=True)
    out = trainer.run()
    print(f"wrote {out} (EMA weights, fp16), {trainer.cfg.checkpoint_path}, {trainer.cfg.plot_path}; "
          f"{trainer.step_count} steps, {trainer.wall / 60:.1f} min of training", flush=True)
    return 0
