"""The trainer on tiny synthetic data (width-8 models, 32 px crops): fast, no shared data needed."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import av
import numpy as np
import pytest
import torch
from PIL import Image

from codec.cli import main as codec_main
from codec.models import Autoencoder, build, load_model, save_model, weights_digest
from codec.models.config import KLConfig, TinyConfig, WanConfig
from codec.train import TrainConfig, Trainer
from codec.train.__main__ import main as train_main
from codec.train.data import FrameBank, find_sources, jitter_colors, read_clip
from codec.train.losses import ms_ssim
from codec.train.lpips import LPIPS, load_lpips


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and are not slowed by a busy machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _smooth_image(i: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 0.5 + 0.5 * np.sin(xx / (4 + i) + i)
    g = yy / h
    b = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (h / (3 + i % 3)) ** 2).astype(np.float32) * 0.8 + 0.1
    return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    for i in range(8):
        Image.fromarray(_smooth_image(i, 40, 48)).save(root / f"img_{i}.png")
    Image.fromarray(_smooth_image(9, 20, 24)).save(root / "small.png")  # below the crop: upscaled
    Image.fromarray(_smooth_image(3, 40, 40)).save(root / "skimage_motorcycle_left.png")
    with av.open(str(root / "clip.mp4"), "w") as box:
        stream = box.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for t in range(12):
            frame = np.roll(_smooth_image(t % 4, 48, 64), 2 * t, axis=1)
            box.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        box.mux(stream.encode())
    return root


def _cfg(data_dir, tmp_path, **kw) -> TrainConfig:
    base = dict(data=[str(data_dir)], out=str(tmp_path / "m.safetensors"), width=8, latent_channels=4,
                crop=32, batch=4, steps=30, lr=3e-3, warmup=2, checkpoint_every=1000,
                exclude=["skimage_motorcycle_*"], frames_per_clip=6, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_sources_exclude_and_frames(data_dir):
    files = find_sources([data_dir], ["skimage_motorcycle_*"])
    assert len(files) == 10 and not any("motorcycle" in f.name for f in files)
    frames = read_clip(data_dir / "clip.mp4", 5)
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8
    bank = FrameBank(files, crop=32, frames_per_clip=5)
    assert [f.name for f in bank.upscaled] == ["small.png"] and bank.n_frames == 9 + 5
    batch = bank.sample(3, torch.Generator().manual_seed(0))
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.uint8
    colored = FrameBank(files, crop=32, frames_per_clip=5, color_aug=True)
    a = colored.sample(16, torch.Generator().manual_seed(0)).float().mean((2, 3))
    b = bank.sample(16, torch.Generator().manual_seed(0)).float().mean((2, 3))
    assert not torch.equal(a, b)  # some crops had their colours jittered
    with pytest.raises(ValueError, match="multiple of 8"):
        FrameBank(files, crop=30)
    with pytest.raises(ValueError, match="no such"):
        find_sources([data_dir / "nope"])


def test_jitter_colors_reaches_new_colours():
    gen = torch.Generator().manual_seed(0)
    grey = torch.full((3, 8, 8), 128, dtype=torch.uint8)
    tints = torch.stack([jitter_colors(grey, gen).float().mean((1, 2)) for _ in range(32)])
    assert (tints.max(1).values - tints.min(1).values).max() > 30  # grey input, coloured output
    red = torch.zeros(3, 8, 8, dtype=torch.uint8)
    red[0] = 200
    outs = [jitter_colors(red, gen) for _ in range(32)]
    assert all(o.dtype == torch.uint8 and o.shape == red.shape for o in outs)
    dominant = {int(o.float().mean((1, 2)).argmax()) for o in outs}
    assert dominant == {0, 1, 2}  # the red crop came back red, green and blue


def test_ms_ssim_identity_and_order():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert ms_ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert ms_ssim(x, x + 0.05).item() > ms_ssim(x, x + 0.3 * torch.randn_like(x)).item()


def test_loss_falls(data_dir, tmp_path):
    trainer = Trainer(_cfg(data_dir, tmp_path))
    losses = [trainer.step()["loss"] for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_pca_init_starts_far_ahead_of_random_weights(data_dir, tmp_path):
    kw = dict(width=16, latent_channels=8, lr=1e-5)
    random_start = Trainer(_cfg(data_dir, tmp_path, resample="shuffle", **kw))
    pca_start = Trainer(_cfg(data_dir, tmp_path / "p", pca_init=True, **kw))
    assert pca_start.cfg.resample == "shuffle" and pca_start.model.config.resample == "shuffle"
    before = {k: v.clone() for k, v in pca_start.model.state_dict().items()}
    first_random, first_pca = random_start.step(), pca_start.step()
    assert first_pca["l1"] < 0.25 * first_random["l1"] and first_pca["ms_ssim"] > 0.9
    pca_start.step()
    after = pca_start.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".conv." in k for k in changed)  # only the residual blocks train
    with pytest.raises(ValueError, match="pca-init"):
        _cfg(data_dir, tmp_path, pca_init=True, init="x.safetensors")
    with pytest.raises(ValueError, match="--resample applies"):
        _cfg(data_dir, tmp_path, resample="shuffle", init="x.safetensors")


def test_resume_is_exact(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path, steps=4, gan_start=1)
    a = Trainer(cfg)
    a.step(), a.step()
    ckpt = a.save_checkpoint(tmp_path / "mid.ckpt")
    want = [a.step(), a.step()]
    b = Trainer(cfg, resume=ckpt)
    assert b.step_count == 2
    got = [b.step(), b.step()]
    assert got == want  # every loss part, bit for bit
    assert not (tmp_path / "m.safetensors").exists()
    done = Trainer(replace(cfg, steps=2), resume=ckpt)  # resumed where it already ends: still writes
    done.run()
    assert done.step_count == 2 and load_model(tmp_path / "m.safetensors").latent_channels == 4
    for mine, theirs in ((a.model, b.model), (a.ema, b.ema), (a.disc, b.disc)):
        sa, sb = mine.state_dict(), theirs.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_from_damaged_checkpoints_is_one_line(data_dir, tmp_path, capsys):
    cfg = _cfg(data_dir, tmp_path, steps=1)
    good = torch.load(Trainer(cfg).save_checkpoint(tmp_path / "good.ckpt"), weights_only=True)
    cases = {"config": None, "model_config": None, "model": None}  # each entry left out
    cases = [({k: v for k, v in good.items() if k != drop}, f"no {drop}") for drop in cases]
    cases += [(good | {"config": "[1]"}, "config: expected a JSON object"),
              (good | {"config": '{"data": ["x"]}'}, "needs data and out"),
              (good | {"model_config": '{"family": "tiny", "width": "wide"}'}, "width: expected a positive integer"),
              (good | {"step": "3"}, "step is a str")]
    for i, (ckpt, needle) in enumerate(cases):
        path = tmp_path / f"bad{i}.ckpt"
        torch.save(ckpt, path)
        code = codec_main(["train", str(data_dir), "--out", str(tmp_path / "r.safetensors"), "--resume", str(path)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and str(path) in err and len(err.splitlines()) == 1, err


def test_wan_models_are_refused_up_front(data_dir, tmp_path, capsys):
    """The trainer trains image autoencoders: a Wan checkpoint (--resume) or model (--init) is one
    line and exit 2 before any data is read, never a traceback."""
    cfg = _cfg(data_dir, tmp_path, steps=1)
    good = torch.load(Trainer(cfg).save_checkpoint(tmp_path / "good.ckpt"), weights_only=True)
    wan = build(WanConfig(name="wan-test", base_dim=8, latent_channels=4, num_res_blocks=1))
    bad = tmp_path / "wan.ckpt"
    torch.save(good | {"model_config": json.dumps(asdict(wan.config)), "model": wan.state_dict(),
                       "ema": wan.state_dict()}, bad)
    init = save_model(wan, tmp_path / "wan.safetensors", dtype=torch.float32)
    out = str(tmp_path / "r.safetensors")
    for extra, where in ((["--resume", str(bad)], bad), (["--init", str(init), "--decoder-only"], init)):
        code = codec_main(["train", str(data_dir), "--out", out, *extra])
        cap = capsys.readouterr()
        err = cap.err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"{where}: a Wan video VAE (wan-test)" in err and "image autoencoders" in err
        assert "data:" not in cap.out and not (tmp_path / "r.safetensors").exists()
    with pytest.raises(ValueError, match="a Wan video VAE"):
        Trainer(cfg, resume=bad)


def test_outputs_checked_before_training(data_dir, tmp_path, capsys):
    """--out, --checkpoint and the loss plot never replace an input, a device or a folder."""
    model = tmp_path / "init.safetensors"
    save_model(Autoencoder(TinyConfig(name="t", latent_channels=4, width=8)), model)
    before = model.read_bytes()
    image = data_dir / "img_0.png"
    cases = [(["--out", str(model), "--init", str(model), "--decoder-only"], "is also an input"),
             (["--out", str(tmp_path / "m.safetensors"), "--checkpoint", str(image)], "is also an input"),
             (["--out", "/dev/null"], ".safetensors"),
             (["--out", str(tmp_path / "m.safetensors"), "--checkpoint", "/dev/null"], "not a regular file"),
             (["--out", str(tmp_path / "no" / "m.safetensors")], "does not exist")]
    for extra, needle in cases:
        code = codec_main(["train", str(image), *extra, "--steps", "1"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert model.read_bytes() == before and image.is_file()
    assert not list(tmp_path.glob("m*"))  # nothing trained, nothing written


@pytest.mark.parametrize("cfg", [TinyConfig(name="t", latent_channels=4, width=8),
                                 KLConfig(name="k", latent_channels=4, block_out_channels=(8, 16),
                                          layers_per_block=1, norm_num_groups=4)], ids=["tiny", "kl"])
def test_decoder_only_keeps_encoder(data_dir, tmp_path, cfg):
    init = tmp_path / "init.safetensors"
    save_model(build(cfg), init)
    before = load_model(init)
    trainer = Trainer(_cfg(data_dir, tmp_path, decoder_only=True, init=str(init), steps=3, lr=1e-3))
    trainer.run()
    # The trained weights are not the loaded ones: no stale identity or hash goes with them.
    assert trainer.ema.model_id is None and weights_digest(trainer.ema) != before.weights_sha256
    trained = load_model(trainer.cfg.out)
    changed = 0
    for k, v in before.state_dict().items():
        is_encoder = not k.startswith(("decoder.", "post_quant_conv."))
        for model in (trainer.model, trainer.ema):
            if is_encoder:
                assert torch.equal(v, model.state_dict()[k]), k
        if is_encoder:  # the saved file is fp16: the encoder is what it was, rounded the same way
            assert torch.equal(v.half(), trained.state_dict()[k].half()), k
        else:
            changed += not torch.equal(v, trainer.model.state_dict()[k])
    assert changed > 0
    with pytest.raises(ValueError, match="--init"):
        _cfg(data_dir, tmp_path, decoder_only=True)


def test_cli_writes_a_loadable_model(data_dir, tmp_path):
    out = tmp_path / "cli.safetensors"
    rc = train_main([str(data_dir), "--out", str(out), "--width", "8", "--latent-channels", "4",
                     "--crop", "32", "--batch", "2", "--steps", "3", "--checkpoint-every", "2",
                     "--exclude", "skimage_motorcycle_*", "--threads", "1"])
    assert rc == 0 and (tmp_path / "cli.ckpt").is_file() and (tmp_path / "cli_loss.png").is_file()
    model = load_model(out)
    assert model.latent_channels == 4 and model.dtype == torch.float32
    # From scratch: latents published zero-mean, unit-variance (measured on other crops here).
    bank = FrameBank(find_sources([data_dir], ["skimage_motorcycle_*"]), 32, 6)
    crops = bank.sample(32, torch.Generator().manual_seed(9))
    z_all = model.encode(crops.float() / 127.5 - 1)
    assert model.scaling_factor != 1.0 and abs(z_all.mean().item()) < 0.3 and 0.7 < z_all.std().item() < 1.3
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    z = model.encode(x)
    assert z.shape == (1, 4, 4, 6) and model.decode(z).shape == x.shape
    assert train_main([str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_gan_and_lpips_step(data_dir, tmp_path):
    # Random LPIPS weights: this checks the plumbing, not perceptual quality.
    from safetensors.torch import save_file

    torch.manual_seed(0)
    lp_file = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in LPIPS().state_dict().items()}, str(lp_file))
    trainer = Trainer(_cfg(data_dir, tmp_path, batch=2, gan_start=0, lpips=str(lp_file)))
    parts = trainer.step()
    assert {"l1", "ms_ssim", "lpips", "g_loss", "gan_w", "d_loss", "loss"} <= set(parts)
    assert all(math.isfinite(v) for v in parts.values())


def test_lpips_accepts_package_key_names(tmp_path):
    state = LPIPS().state_dict()
    renamed = {}
    for k, v in state.items():
        if k.startswith("features."):
            i = int(k.split(".")[1])
            s = 1 + sum(i > t for t in (3, 8, 15, 22))
            k = f"net.slice{s}.{k.removeprefix('features.')}"
        else:
            k = f"lin{k.split('.')[1]}.model.1.weight"
        renamed[k] = v
    torch.save(renamed, tmp_path / "lpips.pth")
    net = load_lpips(tmp_path / "lpips.pth")
    assert torch.equal(net.lins[4].weight, state["lins.4.weight"])
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an LPIPS"):
        load_lpips(tmp_path / "bad.pth")
