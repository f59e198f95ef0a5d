"""Tiled against untiled coding for the Wan video VAEs (small random models, CPU, fp32).

    python bench/wan_tiling.py [--size 96x128] [--frames 5] [--tiles 64/16,64/32] [--out bench/results]

A smooth synthetic clip (a bilinear-upsampled random pattern scrolling sideways) goes through
``VideoEncoder`` / ``VideoDecoder`` untiled and with tiles of several sizes and overlaps (each
tile its own causal cache). Reported: the relative error of the tiled latents against the untiled
ones (Frobenius), and the PSNR of the tiled decode against the untiled decode of the same latents.
Two variants per model: as built, and with the mid-block attention switched off (its output
projection zeroed), which separates what per-tile attention costs (a tile cannot attend to the
rest of the frame) from what the convolutions' zero padding at tile borders costs. Random
weights: the figures bound the method, real Wan weights are not on this machine.
Writes wan_tiling.json and wan_tiling.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clip(frames: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, h // 8, w // 8, generator=g)
    img = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)[0]
    moving = torch.stack([torch.roll(img, 2 * t, dims=2) for t in range(frames)])
    return moving.permute(0, 2, 3, 1).mul(255).round().to(torch.uint8)


def run(model, frames, h, w, options):
    from codec.video_coder import VideoEncoder

    enc = VideoEncoder(model, h, w, options)
    z = torch.cat([enc(frames), enc.finish()])
    return z, enc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="96x128")
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--tiles", default="64/16,64/32", help="tile/overlap pairs in px")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)

    from codec import bench
    from codec.coder import CoderOptions
    from codec.models.config import WanConfig
    from codec.models.video_autoencoder import VideoAutoencoder
    from codec.video_coder import VideoDecoder

    h, w = (int(v) for v in args.size.split("x"))
    frames = clip(args.frames, h, w)
    configs = {"wan2.1-shape": WanConfig(name="t21", base_dim=16),
               "wan2.2-shape": WanConfig(name="t22", base_dim=16, decoder_base_dim=24, latent_channels=48,
                                         is_residual=True, patch_size=2)}
    rows = []
    for label, cfg in configs.items():
        for attention in (True, False):
            torch.manual_seed(0)
            model = VideoAutoencoder(cfg).eval()
            with torch.no_grad():
                model.decoder.conv_out.weight.mul_(0.3)  # decoded values mostly inside [-1, 1]
                if not attention:
                    for net in (model.encoder, model.decoder):
                        net.mid_block.attentions[0].proj.weight.zero_()
                        net.mid_block.attentions[0].proj.bias.zero_()
            z0, _ = run(model, frames, h, w, CoderOptions())
            x0 = VideoDecoder(model, h, w)(z0).float()
            s = model.downscale
            for tile, overlap in (tuple(int(v) for v in t.split("/")) for t in args.tiles.split(",")):
                if tile % s or overlap % s:
                    continue
                opts = CoderOptions(tile=tile, overlap=overlap)
                z1, enc = run(model, frames, h, w, opts)
                x1 = VideoDecoder(model, h, w, opts)(z0).float()
                row = {"model": label, "attention": attention, "tile_px": tile, "overlap_px": overlap,
                       "tiles": len(enc.layout),
                       "encode_rel_error": ((z1 - z0).norm() / z0.norm()).item(),
                       "decode_psnr_db": (10 * torch.log10(255**2 / ((x1 - x0) ** 2).mean().clamp_min(1e-10))).item(),

                       "decode_max_abs_uint8": (x1 - x0).abs().max().item()}
                rows.append(row)
                print(json.dumps(row), flush=True)
    doc = {"device": "cpu", "versions": bench.versions(),
           "clip": f"synthetic smooth pattern {w}x{h}, {args.frames} frames",
           "models": {k: str(v) for k, v in configs.items()}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wan_tiling.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["| model | attention | tile px | overlap px | tiles | encode rel. error | decode PSNR dB | "
             "decode max abs |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {'on' if r['attention'] else 'off'} | {r['tile_px']} | {r['overlap_px']} | "
              f"{r['tiles']} | {r['encode_rel_error']:.4f} | {r['decode_psnr_db']:.1f} | "
              f"{r['decode_max_abs_uint8']:.0f} |" for r in rows]
    title = f"# Wan tiled vs untiled ({doc['clip']}, CPU fp32, random weights)\n\n"
    (args.out / "wan_tiling.md").write_text(title + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
