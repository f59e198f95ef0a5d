"""Global normalization: frame statistics keyed by layer, passed per call, replayable in any batches."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import moving_square_frames

from codec.coder import CoderOptions, FrameDecoder, FrameEncoder
from codec.global_norm import GlobalNorm
from codec.models import build
from codec.models.accel import Accelerated, CudaGraphRunner
from codec.models.layers import GroupNormAct, frame_normalizer_active
from codec.tiling import TileLayout


def kl_small(seed=0):
    """A small KL model (downscale 2) with random GroupNorm affines, as a trained model has."""
    torch.manual_seed(seed)
    model = build("sd15", block_out_channels=(16, 32), norm_num_groups=8, latent_channels=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return model


def norm_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, GroupNormAct)}


LAYOUT = TileLayout(16, 24, 8, 4)  # latent units: 3 x 5 = 15 tiles of 8 x 8 (16 x 16 px at downscale 2)


def frame_tiles():
    frame = torch.from_numpy(moving_square_frames(1, 32, 48)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return LAYOUT.extract(frame, scale=2)  # (15, 3, 16, 16)


@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_replay_in_any_batches_equals_the_measured_pass(direction):
    model = kl_small()
    x = frame_tiles()
    if direction == "decode":
        x = model.encode(x) + 0.3 * torch.randn(x.shape[0], 4, 8, 8, generator=torch.Generator().manual_seed(1))
    run = getattr(model, direction)
    gn = GlobalNorm(LAYOUT.core_boxes(), LAYOUT.tile_hw)
    measured = run(x, norm=gn.measure)
    # Keyed by layer: one entry per GroupNorm of the encoder (or decoder).
    assert set(gn.stats) == {n for n in norm_names(model) if direction + "r" in n.split(".")}
    plain = run(x)
    assert (measured - plain).abs().max() > 1e-3  # frame statistics differ from per-tile ones
    subset = torch.tensor([0, 3, 4, 7, 9, 11, 14])
    for batch in (1, 2, 3, 7):
        replayed = torch.cat([run(x[subset[i:i + batch]], norm=gn.replay) for i in range(0, len(subset), batch)])
        torch.testing.assert_close(replayed, measured[subset], rtol=1e-5, atol=1e-5)


def test_measure_needs_a_whole_frame_and_replay_a_measure():
    model = kl_small()
    x = frame_tiles()
    gn = GlobalNorm(LAYOUT.core_boxes(), LAYOUT.tile_hw)
    with pytest.raises(RuntimeError, match="replay before measure"):
        model.encode(x[:2], norm=gn.replay)
    with pytest.raises(RuntimeError, match="not the 15 tiles"):
        model.encode(x[:2], norm=gn.measure)
    assert not frame_normalizer_active()  # left by the error too


def test_a_normalizer_leaves_nothing_on_the_model():
    model = kl_small()
    before = {n: dict(vars(m)) for n, m in model.named_modules()}
    gn = GlobalNorm(LAYOUT.core_boxes(), LAYOUT.tile_hw)
    seen = []

    def spy(name, layer, x):
        seen.append(frame_normalizer_active())
        return gn.measure(name, layer, x)

    model.encode(frame_tiles(), norm=spy)
    assert seen and all(seen) and not frame_normalizer_active()
    after = {n: dict(vars(m)) for n, m in model.named_modules()}
    assert before.keys() == after.keys()
    for n in before:
        assert before[n].keys() == after[n].keys(), n


@pytest.mark.parametrize("batch", [1, 2])
def test_threshold_cache_with_global_norm_replays_more_tiles_than_a_batch(batch):
    """Main crashed (IndexError) as soon as a frame recomputed more tiles than one model batch."""
    model = kl_small()
    frames = moving_square_frames(3, 64, 96)
    opts = dict(tile=32, overlap=16, norm="global", cache=2.0)
    ref = FrameEncoder(model, 64, 96, CoderOptions(**opts))
    enc = FrameEncoder(model, 64, 96, CoderOptions(batch=batch, **opts))
    assert enc.global_norm and enc.plan.batch == batch
    z = enc(frames)
    misses = [round((1 - h) * len(enc.layout)) for h in enc.stats.per_frame]
    assert misses[0] == len(enc.layout) and max(misses[1:]) > batch  # replayed in several batches
    torch.testing.assert_close(z, ref(frames), rtol=1e-5, atol=1e-5)  # whatever the batch split
    assert enc.stats.per_frame == ref.stats.per_frame
    dec_ref = FrameDecoder(model, 64, 96, CoderOptions(**opts))
    dec = FrameDecoder(model, 64, 96, CoderOptions(batch=batch, **opts))
    zs = z + 0.002 * torch.arange(3).view(3, 1, 1, 1)  # drifts, within the threshold
    out = dec(zs)
    assert 0 < dec.stats.hit_rate < 1
    assert torch.equal(out, dec_ref(zs))


def overflowing_half_model():
    model = kl_small()
    conv_in = next(m for n, m in model.named_modules() if n.endswith("encoder.conv_in"))
    with torch.no_grad():  # conv_in overflows fp16 (not fp32) for inputs near 1
        conv_in.weight.fill_(100.0)
        conv_in.bias.fill_(6.5e4)
    return model.half()


def test_fp32_fallback_under_global_norm_gives_the_fp32_global_result():
    half = overflowing_half_model()
    fp32 = copy.deepcopy(half).float()
    x = 1 + 0.05 * torch.rand(len(LAYOUT), 3, 16, 16, generator=torch.Generator().manual_seed(2))
    gn16, gn32 = (GlobalNorm(LAYOUT.core_boxes(), LAYOUT.tile_hw) for _ in range(2))
    want = fp32.encode(x, norm=gn32.measure)
    with pytest.warns(RuntimeWarning, match="recomputing in float32"):
        got = half.encode(x, norm=gn16.measure)
    assert half.fp32_fallbacks == 1 and got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.equal(got, want)
    assert gn16.stats.keys() == gn32.stats.keys()  # the twin re-measured every layer in fp32
    for name in gn32.stats:
        assert torch.equal(gn16.stats[name].mean, gn32.stats[name].mean), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        replayed = half.encode(x[[1, 5, 6]], norm=gn16.replay)
    assert half.fp32_fallbacks == 2
    torch.testing.assert_close(replayed, fp32.encode(x[[1, 5, 6]], norm=gn32.replay), rtol=0, atol=0)
    # The twin is a clean copy: no hooks, nothing of the normalizer in any layer's attributes.
    twin = half._twin
    for m in twin.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks)
        assert not any(isinstance(getattr(v, "__self__", v), GlobalNorm) for v in vars(m).values())
    assert torch.equal(twin.encode(x), fp32.encode(x))  # without a normalizer: per-tile statistics


def test_graph_runner_runs_eagerly_under_a_frame_normalizer():
    model = kl_small()
    captured = []

    def capture(fn, args):
        captured.append(args)
        return lambda new_args: fn(*new_args)

    fn = type(model)._encode_raw.__get__(model)
    runner = CudaGraphRunner(fn, capture=capture, device_type="cpu", eligible=lambda: not frame_normalizer_active())
    model.__dict__["_encode_raw"] = Accelerated(model, "_encode_raw", runner, {})
    x = frame_tiles()
    gn = GlobalNorm(LAYOUT.core_boxes(), LAYOUT.tile_hw)
    with torch.no_grad():
        got = model.encode(x, norm=gn.measure)
    assert runner.eager_calls == 1 and not captured  # per-call statistics are never baked into a graph
    del model.__dict__["_encode_raw"]
    assert torch.equal(got, model.encode(x, norm=GlobalNorm(LAYOUT.core_boxes(), LAYOUT.tile_hw).measure))
