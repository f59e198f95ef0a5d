"""taef2's GroupNorm middle blocks in the sparse per-layer cache: per cell with frozen GroupNorm
statistics (codec.sparse_norm), refresh = the model, counts, statistics refresh, tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sparse_helpers import dense_decode, dense_encode, dilate, prepare, smooth_clip, static_clip

from codec.models import build
from codec.models.tiny import Block
from codec.sparse_cache import ConvStep, NormBlockStep, SparseDecoderCache, SparseEncoderCache
from codec.sparse_norm import STAT_FACTOR, NormNetCache, NormStep, PointwiseStep


def small(seed=0, tame=False):
    """A taef2-layout model of width 8 (GroupNorm branch in the three middle blocks of each
    direction, nearest resampling), its GroupNorm affine random. ``tame``: each block's last conv
    and branch projection scaled by 0.1, so a local change fades with distance as in a trained
    model (a random network carries a change to every cell it reaches)."""
    torch.manual_seed(seed)
    model = build("taef2", width=8, latent_channels=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Block) and m.pool is not None:
                m.pool.norm.weight.uniform_(0.5, 1.5)
                m.pool.norm.bias.uniform_(-0.5, 0.5)
            if tame and isinstance(m, Block):
                m.conv[4].weight.mul_(0.1)
                if m.pool is not None:
                    m.pool.project.weight.mul_(0.1)
    return model


def cells_changed(new, old, s):
    """(1, C, H, W) buffers -> (H/s, W/s) bool: cells with any element different."""
    return F.max_pool2d((new != old).any(1, keepdim=True).float(), s)[0, 0] > 0


def mid_steps(net):
    """Indices of the steps of the GroupNorm blocks: their branch (1x1, GroupNorm, 1x1) and the
    three 3x3 convs after each branch."""
    first = [k for k, st in enumerate(net.steps) if isinstance(st, PointwiseStep) and st.residual is None]
    return sorted({k + j for k in first for j in range(6)})


def test_plan_cuts_the_groupnorm_blocks_into_per_cell_steps():
    model = small()
    for net in (SparseEncoderCache(model, 32, 48, "2", prepare=prepare(model)).net,
                SparseDecoderCache(model, 4, 6, "2").net):
        assert isinstance(net, NormNetCache) and len(net.norms) == 3
        assert not any(isinstance(st, NormBlockStep) for st in net.steps)
        for k in mid_steps(net)[::6]:  # expand -> GroupNorm -> project + x -> 3 convs with skip x + pool(x)
            expand, norm, project, c0, c1, c2 = net.steps[k:k + 6]
            x = expand.src
            assert isinstance(norm, NormStep) and norm.stats.norm.act == "relu"
            assert (norm.src, project.src, project.residual, c0.src) == (expand.dst, norm.dst, x, project.dst)
            assert all(st.halo == 0 for st in (expand, norm, project))
            assert isinstance(c2, ConvStep) and c2.residual == project.dst and c2.relu
            assert net.channels[expand.dst] == net.channels[norm.dst] == 4 * net.channels[x]
        # the FLOPs of a dense pass are the model's convs, the branch's 1x1 convs included
        convs = [m for m in (model.decoder if net.scale == 1 else model.encoder).modules()
                 if isinstance(m, torch.nn.Conv2d)]
        assert sum(st.flops_per_cell() for st in net.steps if isinstance(st, PointwiseStep)) == \
            2 * sum(c.weight.numel() for c in convs if c.kernel_size == (1, 1))  # at 1 px per cell


@pytest.mark.parametrize("cache", ["off", "2"])  # off: dense every frame; 2: the first frame is a refresh
def test_dense_refresh_is_the_model(cache):
    model = small()
    frames = static_clip(2, 32, 48)
    frames[1, :8] = 0
    n = 2 if cache == "off" else 1
    enc = SparseEncoderCache(model, 32, 48, cache, prepare=prepare(model))
    z = enc(frames[:n])
    ref = dense_encode(model, frames[:n])
    assert torch.allclose(z, ref, atol=1e-5, rtol=1e-4)
    dec = SparseDecoderCache(model, 4, 6, cache)
    x = dec(ref)
    assert torch.allclose(x, dense_decode(model, ref), atol=1e-5, rtol=1e-4)
    assert enc.stats.flops_per_frame == dec.stats.flops_per_frame == [1.0] * n
    # the statistics recorded are the frame's: what the model's GroupNorm computes
    for net in (enc.net, dec.net):
        st = net.norms[0]
        fresh = st.stats.norm(net.buffers[st.src])
        assert torch.allclose(net.buffers[st.dst], fresh, atol=1e-5, rtol=1e-4)


def test_real_taef2_dense_refresh_is_the_model(shared_data):
    from codec.models import load_model
    from codec.video import FrameReader

    model = load_model(shared_data / "weights" / "taef2_encoder.pth")
    with FrameReader(shared_data / "video" / "squirrel.mp4", start=0, end=3, batch=3) as r:
        frames = torch.from_numpy(next(iter(r)).frames[:, 320:384, 560:656].copy())  # 64 x 96 crop
    enc = SparseEncoderCache(model, 64, 96, "4", prepare=prepare(model))
    z = enc(frames[:1])
    ref = dense_encode(model, frames[:1])
    assert isinstance(enc.net, NormNetCache) and len(enc.net.norms) == 3
    assert torch.allclose(z, ref, atol=1e-4, rtol=1e-4)
    dec = SparseDecoderCache(model, 8, 12, "4")
    assert torch.allclose(dec(ref), dense_decode(model, ref), atol=1e-4, rtol=1e-4)
    # the next frames of the clip: close to the model on the input the cache stands for (the
    # reference; taef2's latents move by more than T between frames of this static shot)
    for i in (1, 2):
        z = enc(frames[i:i + 1])
        want = model.encode(prepare(model)(enc.reference.permute(1, 2, 0)[None]))
        assert (z - want).abs().max() < 0.05 * want.abs().max()
    assert enc.net.stat_refreshes == 0 and enc.stats.flops_per_frame[1] == 0.0


def test_moving_object_recomputes_only_the_cells_it_reaches_in_the_groupnorm_blocks():
    """Per step, the cells recomputed are exactly the cells the step's input changed (the cells
    its source kept), grown by one cell for a 3x3 conv and by none for the branch's 1x1 convs and
    GroupNorm, plus the cells its residual changed; none of the middle blocks runs densely."""
    model = small(tame=True)
    z = dense_encode(model, smooth_clip(1, 192, 192)).repeat(3, 1, 1, 1)  # 24 x 24 latent cells
    z[1, :, 11, 11] += 0.5  # an object on one latent cell (64 levels in the threshold's units) ...
    z[2, :, 11, 12] += 0.5  # ... moves to the next: both cells differ from their reference
    dec = SparseDecoderCache(model, 24, 24, "4")
    net = dec.net
    out = dec(z[:1])
    for i, cells in ((1, [(11, 11)]), (2, [(11, 11), (11, 12)])):
        before = [b.clone() for b in net.buffers]
        out = torch.cat([out, dec(z[i:i + 1])])
        changed = [cells_changed(b, a, net.buffer_scale(k)) for k, (b, a) in enumerate(zip(net.buffers, before))]
        want = torch.zeros(24, 24, dtype=torch.bool)
        for c in cells:
            want[c] = True
        assert torch.equal(changed[0], want)
        assert net.counts[0] == int(dilate(want).sum()) == 3 * (2 + len(cells))  # conv_in: cells + halo
        mid = mid_steps(net)
        for k in mid:
            st = net.steps[k]
            need = dilate(changed[st.src]) if st.halo else changed[st.src]
            if st.residual is not None:
                need = need | changed[st.residual]
            assert net.counts[k] == int(need.sum()) < 0.3 * net.cells, (i, k, type(st).__name__)
        if i == 1:  # here every recomputed cell of the first block moved past its threshold: the
            # branch keeps to conv_in's 3 x 3 cells, each 3x3 conv grows them by one cell all round
            assert [net.counts[k] for k in mid[:6]] == [9, 9, 9, 25, 49, 81]
        flops = sum(r * s.flops_per_cell() for r, s in zip(net.ran, net.steps))
        assert dec.stats.flops_per_frame[-1] == pytest.approx(flops / net.dense_flops)
        assert dec.stats.flops_per_frame[-1] < 0.5
        assert net.stat_refreshes == 0
    ref = dense_decode(model, z)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_identical_frame_recomputes_nothing_and_returns_the_cached_output():
    model = small(tame=True)
    frames = static_clip(3, 64, 96)
    frames[1:, 20:28, 30:38] = 0  # frames 1 and 2 identical, frame 1 differs from its reference
    enc = SparseEncoderCache(model, 64, 96, "2", prepare=prepare(model))
    z = enc(frames)
    assert 0 < enc.stats.flops_per_frame[1] < 1 and enc.stats.flops_per_frame[2] == 0.0
    assert torch.equal(z[2], z[1]) and enc.net.counts == [0] * len(enc.net.steps)
    dec = SparseDecoderCache(model, 8, 12, "2")
    x = dec(z)
    assert dec.stats.flops_per_frame[2] == 0.0 and torch.equal(x[2], x[1])


def test_statistics_beyond_the_tolerance_refresh():
    """Latents raised on 2 x 2 of 16 x 24 cells: too few cells for a scene cut. By 0.2 the middle
    blocks' GroupNorm input statistics move within STAT_FACTOR * T/255: sparse, with the statistics
    of frame 0. By 1.0 they move beyond it: the frame refreshes (the model's output for it)."""
    model = small(tame=True)
    z = dense_encode(model, smooth_clip(1, 128, 192)).repeat(3, 1, 1, 1)
    z[1, :, 6:8, 10:12] += 0.2
    z[2, :, 6:8, 10:12] += 1.0
    dec = SparseDecoderCache(model, 16, 24, "2")
    x = dec(z[:1])
    recorded = [st.stats.mean for st in dec.net.norms]
    x = torch.cat([x, dec(z[1:2])])
    assert 0 < dec.stats.flops_per_frame[1] < 0.5 and dec.net.stat_refreshes == 0
    assert 0 < dec.net.stats_moved() <= STAT_FACTOR * 2 / 255
    assert all(st.stats.mean is m for st, m in zip(dec.net.norms, recorded))  # frozen: frame 0's
    x = torch.cat([x, dec(z[2:])])
    assert dec.net.stat_refreshes == 1 and dec.net.stats_moved() == 0.0
    assert not any(torch.equal(st.stats.mean, m) for st, m in zip(dec.net.norms, recorded))  # measured again
    assert dec.stats.flops_per_frame[2] > 1.0  # the sparse pass that found it, then the dense one
    assert torch.allclose(x[2:], dense_decode(model, z[2:]), atol=1e-5, rtol=1e-4)
    assert (x[1:2] - dense_decode(model, z[1:2])).abs().max() < 0.05


def test_global_brightness_change_beyond_the_threshold_runs_densely_with_new_statistics():
    """Every cell brighter by more than T: a scene cut (dense), whose statistics are measured
    afresh, so the output is the model's; a change of T or less everywhere reuses everything."""
    model = small(tame=True)
    frames = smooth_clip(3, 64, 96)
    frames[1] += 2  # within T = 2: nothing recomputed, the frame 0 output reused
    frames[2] += 12
    enc = SparseEncoderCache(model, 64, 96, "2", prepare=prepare(model))
    z = enc(frames[:2])
    recorded = [st.stats.mean for st in enc.net.norms]
    z = torch.cat([z, enc(frames[2:])])
    assert enc.stats.flops_per_frame == [1.0, 0.0, 1.0] and torch.equal(z[1], z[0])
    assert torch.allclose(z[2:], dense_encode(model, frames[2:]), atol=1e-5, rtol=1e-4)
    assert not any(torch.equal(st.stats.mean, m) for st, m in zip(enc.net.norms, recorded))


def test_tolerance_zero_refreshes_on_any_change_and_matches_the_model():
    model = small()
    frames = static_clip(3, 32, 48)
    frames[1, 0, 0] = 0
    enc = SparseEncoderCache(model, 32, 48, "exact", prepare=prepare(model))
    z = enc(frames)
    assert enc.stats.flops_per_frame == [1.0, 1.0, 1.0] and enc.net.stat_refreshes == 2
    assert torch.allclose(z, dense_encode(model, frames), atol=1e-5, rtol=1e-4)


def test_output_stays_close_to_the_dense_model_over_a_clip():
    from helpers import moving_square_frames

    model = small(tame=True)
    frames = torch.from_numpy(moving_square_frames(6, 96, 128))
    enc = SparseEncoderCache(model, 96, 128, "2", prepare=prepare(model))
    z = enc(frames)
    ref = dense_encode(model, frames)
    err = (z - ref).abs().amax((1, 2, 3)) / ref.abs().amax((1, 2, 3))
    assert err.max() < 0.02
    assert all(0 < f < 0.5 for f in enc.stats.flops_per_frame[1:]) and enc.net.stat_refreshes == 0
    # the decoder: latents with a 2 x 2 cell object moving one cell per frame (this model's encoder
    # barely moves its latents), on 16 x 24 cells
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 16, 24, generator=g).repeat(6, 1, 1, 1)
    for i in range(6):
        z[i, :, 7:9, 4 + i:6 + i] += 0.3
    dec = SparseDecoderCache(model, 16, 24, "2")
    x = dec(z)
    out = dense_decode(model, z)
    assert ((x - out).abs().amax((1, 2, 3)) < 0.02 * out.abs().amax((1, 2, 3))).all()
    assert all(0 < f < 0.5 for f in dec.stats.flops_per_frame[1:]) and dec.net.stat_refreshes == 0
    # upsample convs ran sparsely (packed like the other convs)
    assert any(0 < c < dec.net.cells for c, st in zip(dec.net.counts, dec.net.steps) if getattr(st, "upsample", False))


def test_device_path_matches_the_host_path_and_waits_twice_per_frame():
    """sync_free=True (CUDA's decision path, run here on the CPU): the host path's output and
    cells, one wait per frame for the counts as for the plain tiny model, and one more for the
    statistics check. Its refresh by the statistics works there too."""
    from test_sparse_cache import SyncCounter, blinking_object

    model = small(tame=True)
    frames = blinking_object(6, 96, 128)
    host = SparseEncoderCache(model, 96, 128, "2", prepare=prepare(model), sync_free=False)
    device = SparseEncoderCache(model, 96, 128, "2", prepare=prepare(model), sync_free=True)
    za = host(frames)
    zb = device(frames[:3])  # a dense frame, then sparse ones (the first measures the counts on the host)
    with SyncCounter() as counter:
        zb = torch.cat([zb, device(frames[3:])])
    assert isinstance(device.net, NormNetCache) and device.net.sync_free and device.stats.deferred == 0
    assert torch.allclose(za, zb, atol=1e-6)
    assert all(0 < f < 1 for f in device.stats.flops_per_frame[1:])
    assert counter.waits == ["_to_copy.default", "_local_scalar_dense.default"] * 3
    # latents on 2 x 2 of 16 x 24 cells raised beyond the statistics' tolerance: refreshed
    z = dense_encode(model, smooth_clip(1, 128, 192)).repeat(4, 1, 1, 1)
    z[1:3, :, 6:8, 10:12] += 0.2  # frames 1 and 2 identical: frame 2 keeps every cached value
    z[3, :, 6:8, 10:12] += 1.0
    dec = SparseDecoderCache(model, 16, 24, "2", sync_free=True)
    x = dec(z)
    assert dec.net.stat_refreshes == 1 and torch.equal(x[2], x[1])
    assert torch.allclose(x[3:], dense_decode(model, z[3:]), atol=1e-5, rtol=1e-4)
