"""The sparse per-layer cache on the KL family (codec.sparse_kl): refresh = the model, counts,
halo, frozen GroupNorm statistics and their refresh, the coder picking it up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sparse_helpers import dense_decode, dense_encode, dilate, prepare, smooth_clip, static_clip

from codec.models import build
from codec.models.kl import Attention, ResnetBlock
from codec.sparse_cache import SparseDecoderCache, SparseEncoderCache, Unsupported
from codec.sparse_kl import AttentionStep, KLNetCache
from codec.sparse_norm import STAT_FACTOR


def small(name="sd15", seed=0, tame=False):
    """A 4-level KL model (8x down, mid-block attention) of small widths. ``tame``: residual
    branches and attention output scaled by 0.1, so a local change fades with distance as in a
    trained model (a random GroupNorm network is chaotic: a change anywhere moves every cell)."""
    torch.manual_seed(seed)
    model = build(name, block_out_channels=(8, 8, 16, 16), norm_num_groups=4, layers_per_block=1)
    if tame:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, ResnetBlock):
                    m.conv2.weight.mul_(0.1)
                    m.conv2.bias.mul_(0.1)
                elif isinstance(m, Attention):
                    m.to_out[0].weight.mul_(0.1)
    return model


def reach(net, changed):
    """Per step, the cells its output may change when ``changed`` input cells changed: each step's
    source cells grown by its halo (none for GroupNorm and 1x1 steps), with its residual's, and
    every cell after the attention."""
    masks = [changed] + [None] * len(net.steps)
    for st in net.steps:
        if isinstance(st, AttentionStep):
            masks[st.dst] = torch.ones_like(changed)
            continue
        need = dilate(masks[st.src]) if st.halo else masks[st.src]
        masks[st.dst] = need | masks[st.residual] if st.residual is not None else need
    return [masks[st.dst] for st in net.steps]


@pytest.mark.parametrize("name", ["sd15", "sd3"])  # with and without quant convs (sd3: a shift too)
def test_dense_refresh_is_the_model(name):
    model = small(name)
    frames = static_clip(2, 32, 48)
    frames[1, :8] = 0
    for cache in ("off", "2"):  # off: dense every frame; 2: the first frame is a refresh
        enc = SparseEncoderCache(model, 32, 48, cache, prepare=prepare(model))
        z = enc(frames if cache == "off" else frames[:1])
        ref = dense_encode(model, frames if cache == "off" else frames[:1])
        assert z.shape == ref.shape == (len(z), model.latent_channels, 4, 6)
        assert torch.allclose(z, ref, atol=1e-5, rtol=1e-4)
        dec = SparseDecoderCache(model, 4, 6, cache)
        x = dec(ref)
        assert torch.allclose(x, dense_decode(model, ref), atol=1e-5, rtol=1e-4)
        assert all(f == 1.0 for f in enc.stats.flops_per_frame + dec.stats.flops_per_frame)


def test_every_step_packed_over_all_cells_equals_its_dense_run():
    """The halo rule of each step, the frame border included: the downsample reads one px beyond
    its cell's right/bottom edge (zeros past the frame), GroupNorm and 1x1 steps read no halo."""
    model = small(tame=True)
    rows, cols = 3, 5
    for scale, net in ((8, SparseEncoderCache(model, 24, 40, "2", prepare=prepare(model)).net),
                       (1, SparseDecoderCache(model, rows, cols, "2").net)):
        assert isinstance(net, KLNetCache)
        g = torch.Generator().manual_seed(1)
        kinds = set()
        for st in net.steps:
            if isinstance(st, AttentionStep):
                continue
            s, h = st.scale_in, st.halo
            x = torch.randn(1, net.channels[st.src], rows * s, cols * s, generator=g)
            if hasattr(st, "stats"):
                st.stats.clear()  # measured on x by the dense run
            dense = st.dense(x, None)
            xp = F.pad(x, (h, h, h, h))  # zeros around the frame, as every KL conv pads
            patches = torch.stack([xp[0, :, r * s:r * s + s + 2 * h, c * s:c * s + s + 2 * h]
                                   for r in range(rows) for c in range(cols)]).permute(0, 2, 3, 1)
            y = st.packed(patches.contiguous())  # (cells, s_out, s_out, C)
            so = st.scale_out
            y = y.view(rows, cols, so, so, -1).permute(4, 0, 2, 1, 3).reshape(1, -1, rows * so, cols * so)
            assert torch.allclose(y, dense, atol=1e-5, rtol=1e-5), type(st).__name__
            kinds.add(type(st).__name__)
        assert kinds >= {"ConvStep", "NormStep", "PointwiseStep"} | (
            {"DownsampleStep", "MeanStep"} if scale == 8 else set())


def test_moving_object_recomputes_only_the_cells_it_reaches():
    model = small(tame=True)
    h, w = 96, 128  # 12 x 16 cells
    frames = static_clip(3, h, w)
    frames[1, 40:48, 40:48] = 255  # the object covers cell (5, 5) ...
    frames[2, 40:48, 48:56] = 255  # ... then moves to (5, 6); (5, 5) is back to the background
    enc = SparseEncoderCache(model, h, w, "2", prepare=prepare(model))
    net = enc.net
    enc(frames[:1])
    for i, cells in ((1, [(5, 5)]), (2, [(5, 5), (5, 6)])):
        z = enc(frames[i:i + 1])
        changed = torch.zeros(12, 16, dtype=torch.bool)
        for c in cells:
            changed[c] = True
        assert net.counts[0] == int(dilate(changed).sum())  # conv_in: the cells and their halo
        assert net.counts[1] <= net.counts[0]  # its GroupNorm: no halo
        bound = reach(net, changed)
        assert all(c <= int(b.sum()) or c == net.cells for c, b in zip(net.counts, bound))
        assert sum(net.counts) < 0.6 * len(net.steps) * net.cells
        flops = sum(r * s.flops_per_cell() for r, s in zip(net.ran, net.steps))
        assert enc.stats.flops_per_frame[-1] == pytest.approx(flops / net.dense_flops)
        assert 0 < enc.stats.flops_per_frame[-1] < 0.6
        assert enc.stats.per_frame[-1] == pytest.approx(1 - len(cells) / 192)
        ref = dense_encode(model, frames[i:i + 1])
        assert (z - ref).abs().max() < 0.05 * ref.abs().max()
    assert net.stat_refreshes == 0


def test_decoder_latent_change_recomputes_its_cells_and_an_identical_frame_nothing():
    model = small(tame=True)
    z = dense_encode(model, smooth_clip(1, 192, 256)).repeat(4, 1, 1, 1)  # 24 x 32 latent cells
    z[1:3, :, 10, 14] += 0.05  # frames 1 and 2 identical: 6.4 levels in the threshold's units
    dec = SparseDecoderCache(model, 24, 32, "4")
    x = dec(z[:2])
    net = dec.net
    changed = torch.zeros(24, 32, dtype=torch.bool)
    changed[10, 14] = True
    assert net.counts[0] == 1 and net.counts[1] == 9  # post_quant_conv (1x1), then conv_in's halo
    assert all(c <= int(b.sum()) or c == net.cells for c, b in zip(net.counts, reach(net, changed)))
    assert dec.stats.flops_per_frame[0] == 1.0 and 0 < dec.stats.flops_per_frame[1] < 0.6
    x = torch.cat([x, dec(z[2:3])])
    assert dec.stats.flops_per_frame[2] == 0.0 and net.counts == [0] * len(net.steps)
    x = torch.cat([x, dec(z[3:])])
    assert torch.equal(x[2], x[1])  # the cached output
    ref = dense_decode(model, z)
    assert (x - ref).abs().max() < 0.1 * ref.abs().max()
    assert dec.stats.flops_per_frame[3] > 0 and net.stat_refreshes == 0  # back to frame 0's latents


def test_identical_frame_recomputes_nothing_and_returns_the_cached_output():
    model = small(tame=True)
    frames = static_clip(3, 64, 96)
    frames[1:, 20:28, 30:38] = 0  # frames 1 and 2 identical, frame 1 differs from its reference
    enc = SparseEncoderCache(model, 64, 96, "2", prepare=prepare(model))
    z = enc(frames)
    assert 0 < enc.stats.flops_per_frame[1] < 1 and enc.stats.flops_per_frame[2] == 0.0
    assert torch.equal(z[2], z[1]) and enc.stats.per_frame[2] == 1.0


def test_output_stays_close_to_the_dense_model_over_a_clip():
    from helpers import moving_square_frames

    model = small(tame=True)
    frames = torch.from_numpy(moving_square_frames(8, 96, 128))
    enc = SparseEncoderCache(model, 96, 128, "2", prepare=prepare(model))
    z = enc(frames)
    ref = dense_encode(model, frames)
    err = (z - ref).abs().amax((1, 2, 3)) / ref.abs().amax((1, 2, 3))
    assert err.max() < 0.02
    assert all(0 < f < 0.5 for f in enc.stats.flops_per_frame[1:])
    assert 0 < enc.stats.flop_fraction < 0.5
    # the decoder on a 12 x 16 cell grid: a change soon spreads past DENSE_FRACTION of it
    dec = SparseDecoderCache(model, 12, 16, "0.5")
    x = dec(ref)
    out = dense_decode(model, ref)
    assert (x - out).abs().max() < 0.1 * out.abs().max()
    assert 0 < dec.stats.flop_fraction < 1


def test_frame_statistics_beyond_the_tolerance_refresh():
    """A bright block on 4 of 96 cells: too few cells for a scene cut, but the frame's mean moves
    by ~6 levels (the frame's standard deviation is ~23): the GroupNorm statistics move beyond
    STAT_FACTOR * T/255 of theirs, the frame refreshes. The same block 10 levels brighter moves
    them less: sparse with the frozen statistics."""
    model = small(tame=True)
    frames = smooth_clip(3, 64, 96)
    frames[1, 16:32, 32:48] += 10  # 2 x 2 cells
    frames[2, 16:32, 32:48] = 255
    enc = SparseEncoderCache(model, 64, 96, "2", prepare=prepare(model))
    z = enc(frames[:2])
    assert 0 < enc.stats.flops_per_frame[1] < 1 and enc.net.stat_refreshes == 0
    z = torch.cat([z, enc(frames[2:])])
    assert enc.net.stat_refreshes == 1 and enc.net.stats_moved() == 0.0
    assert enc.stats.flops_per_frame[2] > 1.0  # the sparse pass that found it, then the dense one
    # the refresh measured this frame's statistics: the cache is the model on its input
    ref = model.encode(prepare(model)(enc.reference.permute(1, 2, 0)[None]))
    assert torch.allclose(z[2:], ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(z[1:2], dense_encode(model, frames[1:2]), atol=1e-5, rtol=1e-4)  # frozen


def test_tolerance_zero_refreshes_on_any_change():
    model = small(tame=True)
    frames = static_clip(3, 32, 48)
    frames[1, 0, 0] = 0
    enc = SparseEncoderCache(model, 32, 48, "exact", prepare=prepare(model))
    z = enc(frames)
    assert enc.stats.flops_per_frame == [1.0, 1.0, 1.0]  # frames 1 and 2 differ from their reference
    assert torch.allclose(z, dense_encode(model, frames), atol=1e-5, rtol=1e-4)


def test_unsupported_kl_layout_is_refused():
    torch.manual_seed(0)
    model = build("sd15", block_out_channels=(8, 8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
    with pytest.raises(Unsupported, match="downsample"):  # 16x down: cells of 8 px cannot halve 4 times
        SparseEncoderCache(model, 32, 32, "2", prepare=prepare(model))


def test_coder_uses_the_sparse_cache_for_kl_and_falls_back_when_it_does_not_fit():
    from helpers import moving_square_frames

    from codec.coder import CoderOptions, FrameDecoder, FrameEncoder

    model = small(tame=True)
    frames = moving_square_frames(4, 50, 70)  # padded to 56 x 72
    enc = FrameEncoder(model, 50, 70, CoderOptions(cache="2"))
    dec = FrameDecoder(model, 50, 70, CoderOptions(cache="2"))
    assert isinstance(enc.sparse.net, KLNetCache) and isinstance(dec.sparse.net, KLNetCache)
    z = enc(frames)
    off = FrameEncoder(model, 50, 70, CoderOptions(cache="off"))(frames)
    assert z.shape == off.shape and (z - off).abs().max() < 0.05 * off.abs().max()
    assert dec(z).shape == frames.shape
    assert 0 < enc.stats.flop_fraction < 1
    need = enc.sparse.net.memory_bytes(4)
    cached = sum(c * 63 * enc.sparse.net.buffer_scale(b) ** 2 * 4 for b, c in enumerate(enc.sparse.net.channels))
    assert need == cached + 4 * 63 ** 2  # 7 x 9 cells; the attention matrix over its 63 tokens
    assert FrameEncoder(model, 50, 70, CoderOptions(cache="2", max_memory=need - 1)).sparse is None


def test_statistics_check_on_large_buffers_compares_the_same_sampled_pixels():
    """Full-resolution buffers of 2^16+ px are probed on every 4th pixel: right after a refresh
    nothing moved, and a one-cell change moves the probed statistics a little, within tolerance."""
    model = small(tame=True)
    frames = smooth_clip(2, 256, 256)
    frames[1, 96:104, 96:104] = 0
    enc = SparseEncoderCache(model, 256, 256, "2", prepare=prepare(model))
    enc(frames[:1])
    assert enc.net.stats_moved() == 0.0
    enc(frames[1:])
    assert 0 < enc.net.stats_moved() <= STAT_FACTOR * 2 / 255 and enc.net.stat_refreshes == 0
    assert 0 < enc.stats.flops_per_frame[1] < 0.5  # the attention (dense, 1024 tokens) is most of it


def test_device_path_matches_the_host_path():
    """sync_free=True (CUDA's decision path, run here on the CPU) on a KL model (frozen GroupNorms,
    the mid-block attention merged per cell, downsample steps): the host path's output and cells,
    one wait per frame for the counts and one for the statistics check."""
    from test_sparse_cache import SyncCounter, blinking_object

    model = small(tame=True)
    frames = blinking_object(6, 96, 128)
    host = SparseEncoderCache(model, 96, 128, "2", prepare=prepare(model), sync_free=False)
    device = SparseEncoderCache(model, 96, 128, "2", prepare=prepare(model), sync_free=True)
    za = host(frames)
    zb = device(frames[:3])  # a dense frame, then sparse ones (the first measures the counts on the host)
    with SyncCounter() as counter:
        zb = torch.cat([zb, device(frames[3:])])
    assert device.net.sync_free and device.stats.deferred == 0
    assert torch.allclose(za, zb, atol=1e-6)
    assert counter.waits == ["_to_copy.default", "_local_scalar_dense.default"] * 3
    assert all(0 < f < 1 for f in device.stats.flops_per_frame[1:])
    assert all(a <= b for a, b in zip(host.stats.flops_per_frame, device.stats.flops_per_frame))  # capacity >= need
    pairs = [(int(d), h) for d, h in zip(device.net.counts, host.net.counts) if d >= 0 and h < device.net.cells]
    assert len(pairs) >= 5 and all(d == h for d, h in pairs)  # the same cells needed at every step
    z = dense_encode(model, smooth_clip(1, 192, 256)).repeat(6, 1, 1, 1)  # 24 x 32 latent cells
    z[1::2, :, 10, 14] += 0.05  # a blinking latent cell (the statistics stay within tolerance)
    dec_host = SparseDecoderCache(model, 24, 32, "4", sync_free=False)
    dec_device = SparseDecoderCache(model, 24, 32, "4", sync_free=True)
    assert torch.allclose(dec_host(z), dec_device(z), atol=1e-5) and dec_device.stats.deferred == 0
    assert all(0 < f < 1 for f in dec_device.stats.flops_per_frame[1:]) and dec_device.net.stat_refreshes == 0
