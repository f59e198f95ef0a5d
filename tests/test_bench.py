"""``codec bench``: report fields, percentiles, the ratio, and the agreement check."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from codec import bench
from codec.cli import main
from codec.models import build, save_model
from codec.models.config import TinyConfig
from codec.video import VideoWriter

pytest.importorskip("diffusers", reason="diffusers (dev extra) is the baseline")

STAGE_KEYS = {"p50_ms", "p95_ms", "p99_ms", "fps"}


def moving_frames(n=6, h=48, w=64) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([np.stack([(x * 4 + 9 * t) % 256, (y * 5) % 256, ((x + y) * 3 + 5 * t) % 256], -1)
                     for t in range(n)]).astype(np.uint8)


def randomized(model, seed=0):
    """He-scaled random weights: outputs vary with the input (so disagreement shows) and activations
    keep their size through the layers (shrinking ones reach denormals, which are slow on CPUs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:  # conv weights
                p.copy_(noise * (2 / p[0].numel()) ** 0.5)
            else:  # biases; GroupNorm scales around 1
                p.copy_(noise * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "clip.mp4"
    with VideoWriter(path, 64, 48, 25, crf=10) as out:
        out.write(moving_frames())
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(randomized(build("taesd", width=8)), path, dtype=torch.float32)
    return path


def test_cli_report_has_every_field(clip, model_file, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", str(clip), "--model", str(model_file), "--device", "cpu", "--frames", "4",
               "--warmup", "1", "--json", str(out), "--plot", str(png), "--quiet", "--preset-x264", "ultrafast"])
    assert rc == 0
    assert "ratio ours/baseline" in capsys.readouterr().out
    r = json.loads(out.read_text())
    for key in ("device", "versions", "clip", "model", "frames", "ours", "baseline", "ratio", "agreement_psnr_db",
                "timed"):
        assert key in r
    assert set(r["versions"]) >= {"torch", "diffusers", "av", "python", "codec"}
    assert r["frames"] == 4 and r["clip"] == "clip.mp4"
    for side in ("ours", "baseline"):
        assert set(r[side]) >= {"encode", "decode", "peak_device_mb", "peak_host_mb", "cache_hit_rate"}
        for stage in ("encode", "decode"):
            s = r[side][stage]
            assert set(s) >= STAGE_KEYS and len(s["latency_ms"]) == 4
            assert 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"]
            assert s["fps"] > 0
    for stage in ("encode", "decode"):
        ours, base = r["ours"][stage], r["baseline"][stage]
        assert r["ratio"][f"{stage}_p50"] == pytest.approx(ours["p50_ms"] / base["p50_ms"])
        assert r["ratio"][f"{stage}_cpu_p50"] == pytest.approx(ours["cpu_p50_ms"] / base["cpu_p50_ms"])
        assert r["ratio"][f"{stage}_min"] == pytest.approx(min(ours["latency_ms"]) / min(base["latency_ms"]), rel=1e-3)
    assert r["agreement_psnr_db"] >= bench.MIN_PSNR and r["verified"]
    assert png.stat().st_size > 0


@pytest.mark.parametrize("name,kw", [("taef2", {"width": 8}), ("taesd", {"width": 8}),
                                     ("sd15", {"block_out_channels": (16, 32), "norm_num_groups": 8,
                                               "layers_per_block": 1})])
def test_baseline_is_the_same_function(name, kw):
    """The diffusers twin (with TAEF2's grafted GroupNorm branch) reproduces our model."""
    model = randomized(build(name, **kw))
    r = bench.bench_clip(moving_frames(3), model, warmup=0, x264_preset="ultrafast")
    assert r["latent_rel_err"] < 1e-4
    assert r["agreement_psnr_db"] > 45
    assert r["ours"]["peak_host_mb"] is None  # no warm-up, no memory figure


def test_disagreement_fails_loudly(monkeypatch):
    model = randomized(build("taesd", width=8))
    rng = np.random.default_rng(0)
    monkeypatch.setattr(bench.BaselineCoder, "decode",
                        lambda self, z: rng.integers(0, 256, (len(z), 48, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="outputs disagree: .* dB"):
        bench.bench_clip(moving_frames(3), model, warmup=1, x264_preset="ultrafast")
    r = bench.bench_clip(moving_frames(3), model, warmup=0, verify=False, x264_preset="ultrafast")
    assert r["agreement_psnr_db"] < 20 and not r["verified"] and r["ratio"] is not None


def test_perturbed_weights_disagree(monkeypatch):
    model = randomized(build("taesd", width=8))
    make = bench.make_baseline

    def perturbed(kind, m, h, w):
        coder, desc = make(kind, m, h, w)
        with torch.no_grad():
            for p in coder.net.decoder.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        return coder, desc

    monkeypatch.setattr(bench, "make_baseline", perturbed)
    with pytest.raises(ValueError, match="outputs disagree"):
        bench.bench_clip(moving_frames(3), model, warmup=0, x264_preset="ultrafast")


def test_no_baseline_and_chunks():
    r = bench.bench_clip(moving_frames(4), randomized(build("taesd", width=8)), baseline="none", warmup=1, chunk=3,
                         x264_preset="ultrafast")
    assert r["baseline"] is None and r["ratio"] is None and r["agreement_psnr_db"] is None
    assert len(r["ours"]["encode"]["latency_ms"]) == 4 and r["chunk"] == 3


def test_without_diffusers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ValueError, match="pip install diffusers"):
        bench.bench_clip(moving_frames(2), build("taesd", width=8), baseline="diffusers", warmup=0)
    assert bench.resolve_baseline("auto", build("taesd", width=8)) == "torch"  # auto: what can run


def test_auto_baseline_and_the_plain_torch_loop():
    taesd = build("taesd", width=8)
    shuffle = build(TinyConfig(name="s", latent_channels=4, width=8, resample="shuffle"))
    assert bench.resolve_baseline("auto", taesd) == "diffusers"
    assert bench.resolve_baseline("auto", shuffle) == "torch"
    r = bench.bench_clip(moving_frames(3), randomized(shuffle), warmup=1, x264_preset="ultrafast")
    assert "plain PyTorch" in r["baseline_impl"] and r["verified"]
    assert r["agreement_psnr_db"] >= 60  # the same network both sides: only float noise differs
    assert len(r["baseline"]["decode"]["latency_ms"]) == 3 and r["ratio"]["encode_p50"] > 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing.mp4"), "--model", "taesd", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("codec: error:") and "missing.mp4" in err and err.count("\n") == 1


def test_no_diffusers_twin_for_the_shuffle_variant():
    model = build(TinyConfig(name="s", latent_channels=4, width=8, resample="shuffle"))
    with pytest.raises(ValueError, match="pixel-shuffle"):
        bench.diffusers_twin(model, torch.float32)
