"""The sparse per-layer temporal cache (codec.sparse_cache): halo, counts, drift, refresh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sparse_helpers import dense_encode, dilate, prepare, static_clip
from torch.utils._python_dispatch import TorchDispatchMode

from codec.models import build
from codec.sparse_cache import SparseDecoderCache, SparseEncoderCache, Unsupported, cell_change


def small(resample="shuffle", seed=0, linear=False):
    torch.manual_seed(seed)
    model = build("taesd", width=8, latent_channels=4, resample=resample)
    if linear:  # small weights, large biases: every ReLU passes, so every change reaches its halo
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.weight.mul_(0.05)
                    if m.bias is not None:
                        m.bias.fill_(10.0)
    return model


@pytest.mark.parametrize("resample", ["shuffle", "nearest"])
def test_tolerance_zero_matches_the_dense_model(resample):
    model = small(resample)
    frames = static_clip(5, 48, 64)
    frames[2, 10:14, 20:30] = 7  # a small change, then back, then a corner change
    frames[3, 0:3, 0:5] = 200
    frames[4, 40:48, 56:64] = 0
    enc = SparseEncoderCache(model, 48, 64, "exact", prepare=prepare(model))
    z = enc(frames)
    assert torch.allclose(z, dense_encode(model, frames), atol=1e-5, rtol=1e-5)
    assert enc.stats.flops_per_frame[0] == 1.0 and enc.stats.flops_per_frame[1] == 0.0
    assert 0 < enc.stats.flops_per_frame[2] < 1.0


def test_decoder_tolerance_zero_matches_the_dense_model():
    model = small()
    torch.manual_seed(1)
    z = torch.randn(1, 4, 8, 12).repeat(4, 1, 1, 1)
    z[1:3, :, 3, 4] += 0.5  # frames 1 and 2 identical
    z[3, :, 0, 0] -= 1.0
    dec = SparseDecoderCache(model, 8, 12, "exact")
    x = dec(z)
    ref = torch.cat([model.decode(z[i:i + 1]) for i in range(4)])
    assert torch.allclose(x, ref, atol=1e-5, rtol=1e-5)
    assert dec.stats.flops_per_frame[2] == 0.0  # same as frame 1's reference
    assert dec.stats.per_frame[1] == pytest.approx(1 - 1 / 96)


def test_moving_object_recomputes_only_its_cells_and_their_halo():
    model = small(linear=True)
    h, w = 96, 128  # 12 x 16 cells
    frames = static_clip(3, h, w)
    frames[1, 40:48, 40:48] = 255  # the object covers cell (5, 5) ...
    frames[2, 40:48, 48:56] = 255  # ... then moves to cell (5, 6): (5, 5) is back to the background
    enc = SparseEncoderCache(model, h, w, "exact", prepare=prepare(model))
    net = enc.net
    for i, cells in ((1, [(5, 5)]), (2, [(5, 5), (5, 6)])):  # both differ from their reference at frame 2
        z = enc(frames[: i + 1] if i == 1 else frames[2:])
        changed = torch.zeros(12, 16, dtype=torch.bool)
        for c in cells:
            changed[c] = True
        # the first conv recomputes exactly the changed cells and their one-cell halo (3x3, 3x4) ...
        assert net.counts[0] == int(dilate(changed, 1).sum()) == 3 * (2 + len(cells))
        # ... and no step more than the halo grown by one cell per conv (or all cells: a step that
        # would recompute more than DENSE_FRACTION of the frame runs densely)
        assert all(c <= dilate(changed, k + 1).sum() or c == net.cells for k, c in enumerate(net.counts))
        assert net.counts[-1] > 0  # the change reaches the latent
        assert all(c <= r <= max(16, 1.125 * c) for c, r in zip(net.counts, net.ran) if c)  # buckets
        flops = sum(r * s.flops_per_cell() for r, s in zip(net.ran, net.steps))
        assert enc.stats.flops_per_frame[-1] == pytest.approx(flops / net.dense_flops)
        assert enc.stats.flops_per_frame[-1] < 0.75
        assert enc.stats.per_frame[-1] == pytest.approx(1 - len(cells) / 192)
        assert torch.allclose(z, dense_encode(model, frames[i:i + 1]), atol=1e-5)
    # at full resolution a change spreads 1 px per conv: the changed cells stay the 3x4 block and
    # its neighbours, so each following full-resolution conv recomputes the same 5x6 cells
    assert net.counts[1:4] == [30, 30, 30]


def test_halo_a_change_at_a_cell_edge_updates_its_neighbours():
    model = small()
    h, w = 64, 64
    frames = static_clip(2, h, w)
    frames[1, 16:24, 23] = 0  # the last pixel column of cell (2, 2): cell (2, 3) reads it
    frames[1, 16:24, 23, 0] = 255
    net_steps = SparseEncoderCache(model, h, w, "exact", prepare=prepare(model))
    z = net_steps(frames)
    first = net_steps.net.buffers[1]  # output of the first conv (full resolution)
    dense = model.encoder[0](prepare(model)(frames[1:]).add(1).div(2))
    assert torch.allclose(first, dense, atol=1e-6)
    before = model.encoder[0](prepare(model)(frames[:1]).add(1).div(2))
    # the neighbour's first pixel column changed in the dense result, and the cache has it
    assert (dense[..., 16:24, 24] - before[..., 16:24, 24]).abs().max() > 1e-3
    assert torch.allclose(z, dense_encode(model, frames), atol=1e-5)


def test_drift_is_bounded_by_the_reference_rule_over_200_frames():
    model = small()
    h, w, n, t = 32, 32, 200, 4.0
    base = static_clip(1, h, w)[0].float()
    # a slow brightness ramp: 0.25 levels per frame, never above T between consecutive frames
    frames = torch.stack([(base * 0.5 + 0.25 * i).clamp(0, 255) for i in range(n)]).round().to(torch.uint8)
    enc = SparseEncoderCache(model, h, w, str(t), prepare=prepare(model))
    errors = []
    for i in range(n):
        z = enc(frames[i:i + 1])
        ref = enc.reference.permute(1, 2, 0).float()
        cell_mean = F.avg_pool2d((frames[i].float() - ref).abs().mean(-1)[None, None], 8)
        assert cell_mean.max() <= t  # the cached input never drifts further than T from the frame
        errors.append((z - dense_encode(model, frames[i:i + 1])).abs().max().item())
    assert enc.stats.hit_rate > 0.5  # mostly reused ...
    assert 0 < sum(f > 0 for f in enc.stats.flops_per_frame[1:]) < n - 1  # ... and recomputed now and then
    assert max(errors[100:]) <= 1.5 * max(errors[:100]) + 1e-6  # no accumulation


def test_refresh_every_n_frames_and_on_a_scene_cut():
    model = small()
    frames = static_clip(12, 32, 48)
    frames[8:] = static_clip(4, 32, 48, seed=5)  # a cut at frame 8
    enc = SparseEncoderCache(model, 32, 48, "2", refresh=5, prepare=prepare(model))
    enc(frames)
    dense = [i for i, f in enumerate(enc.stats.flops_per_frame) if f == 1.0]
    assert dense == [0, 5, 8]  # first frame, the refresh 5 frames later, the cut (restarts the count)
    assert all(enc.stats.flops_per_frame[i] == 0.0 for i in range(12) if i not in dense)
    assert enc.stats.per_frame[8] == 0.0
    with pytest.raises(ValueError, match="refresh"):
        SparseEncoderCache(model, 32, 48, "2", refresh=0, prepare=prepare(model))


def test_cell_change_measure():
    ref = torch.zeros(3, 16, 16)
    cur = ref.clone()
    cur[:, 0, 0] = 40.0  # one hot pixel: mean 40/64 < 1, 2x2 window 10 > 4 * 1 ... changed
    assert cell_change(cur, ref, 8, 1.0, 1.0).tolist() == [[True, False], [False, False]]
    assert cell_change(cur, ref, 8, 3.0, 1.0).tolist() == [[False, False], [False, False]]  # 10 <= 12
    cur = ref + 0.9  # uniform noise-level change below T everywhere
    assert not cell_change(cur, ref, 8, 1.0, 1.0).any()
    assert cell_change(cur, ref, 8, 0.0, 1.0).all()  # exact: any difference
    g = torch.Generator().manual_seed(0)  # uint8 frames (subtracted in int16) decide as their fp32 values
    a, b, c = (torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8) for _ in range(3))
    amp = torch.linspace(0, 12, 64)  # change grows from left to right: some cells under T, some over
    b = (a + (torch.rand(a.shape, generator=g) * 2 - 1) * amp).round().clamp(0, 255).to(torch.uint8)
    for t, prev in ((1.0, c), (2.0, c), (4.0, b), (4.0, a)):  # previous = b: b's change persists
        got = cell_change(a, b, 8, t, 1.0, previous=prev)
        assert 0 < got.sum() < got.numel()
        assert torch.equal(got, cell_change(a.float(), b.float(), 8, t, 1.0, previous=prev.float()))


def test_a_persistent_change_below_t_counts_and_noise_of_its_size_does_not():
    """T = 4: a shift of 3 levels that stays (the previous frame has it too) is content; noise
    that moves 3 levels from the reference and as much from the previous frame is not."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 200, (3, 16, 32), generator=g).float()
    shifted = ref.clone()
    shifted[:, :, :16] += 3.0  # the left cells shift and stay
    assert not cell_change(shifted, ref, 8, 4.0, 1.0).any()  # below T, no previous frame
    assert not cell_change(shifted, ref, 8, 4.0, 1.0, previous=ref).any()  # new this frame: wait
    persistent = cell_change(shifted, ref, 8, 4.0, 1.0, previous=shifted)
    assert persistent[:, :2].all() and not persistent[:, 2:].any()

    def noisy():  # +-3 levels at random: 3 from the reference, ~4 from the last noisy frame
        return ref + 3.0 * (torch.randint(0, 2, ref.shape, generator=g).float() * 2 - 1)

    assert not cell_change(noisy(), ref, 8, 4.0, 1.0, previous=noisy()).any()


def test_unsupported_family_is_refused():
    from types import SimpleNamespace
    with pytest.raises(Unsupported, match="wan"):  # KL: codec.sparse_kl (tests/test_sparse_kl.py)
        SparseEncoderCache(SimpleNamespace(family="wan"), 16, 16, "2")


def test_coder_uses_the_sparse_cache_for_a_threshold_and_keeps_exact_bit_identical(tmp_path):
    from helpers import moving_square_frames

    from codec.coder import CoderOptions, FrameDecoder, FrameEncoder
    from codec.pipeline import roundtrip_video

    model = small()
    frames = moving_square_frames(6, 50, 70)  # padded to 56 x 72
    enc = FrameEncoder(model, 50, 70, CoderOptions(cache="2"))
    dec = FrameDecoder(model, 50, 70, CoderOptions(cache="2"))
    assert enc.sparse is not None and dec.sparse is not None and enc.plan.tile is None
    z = enc(frames)
    off = FrameEncoder(model, 50, 70, CoderOptions(cache="off"))(frames)
    assert z.dtype == torch.float32 and z.shape == off.shape
    assert (z - off).abs().max() < 0.1 * off.abs().max()
    out = dec(z)
    assert out.shape == frames.shape and out.dtype == torch.uint8
    assert 0 < enc.stats.flop_fraction < 1 and enc.stats.flops_per_frame[0] == 1.0
    exact = FrameEncoder(model, 50, 70, CoderOptions(cache="exact"))
    assert exact.sparse is None and torch.equal(exact(frames), off)  # exact: the bit-identical tile cache
    need = enc.sparse.net.memory_bytes(4)
    small_budget = FrameEncoder(model, 50, 70, CoderOptions(cache="2", max_memory=need - 1))
    assert small_budget.sparse is None  # cached activations over the budget: the tiled path
    from helpers import write_clip
    src = write_clip(tmp_path / "in.mp4", frames)
    e, d = roundtrip_video(src, tmp_path / "out.mp4", model, options=CoderOptions(cache="2"))
    assert 0 < e.flop_fraction <= 1 and 0 < d.flop_fraction <= 1
    assert len(e.flops_per_frame) == 6 and len(d.flops_per_frame) == 6


class SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: reading a value (item, nonzero,
    masked_select, bool of a tensor) and copies to the CPU (on a CPU tensor: ``.to("cpu")``)."""

    WAITS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.is_nonzero.default, torch.ops.aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.waits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_cpu = func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu")
        if func in self.WAITS or to_cpu:
            self.waits.append(func.__name__)
        return func(*args, **kwargs)


def moving_object(n, h, w):
    """A static background with an 8x12 px bright object moving right by 4 px per frame."""
    frames = static_clip(n, h, w)
    for i in range(1, n):
        frames[i, 40:48, 20 + 4 * i:32 + 4 * i] = 255
    return frames


def blinking_object(n, h, w):
    """A static background with an 8x12 px object that blinks (odd frames): the same cells every frame."""
    frames = static_clip(n, h, w)
    frames[1::2, 40:48, 44:56] = 255
    return frames


@pytest.mark.parametrize("mode", ["exact", "2"])
def test_device_path_matches_the_host_path(mode):
    """sync_free=True (the CUDA decision path: nonzero_static with a planned capacity) gives the
    host path's output when the capacity suffices, and computes at least the host path's cells."""
    model = small()
    h, w = 96, 128  # 12 x 16 cells
    frames = blinking_object(6, h, w)
    host = SparseEncoderCache(model, h, w, mode, prepare=prepare(model), sync_free=False)
    device = SparseEncoderCache(model, h, w, mode, prepare=prepare(model), sync_free=True)
    za, zb = host(frames), device(frames)
    assert device.net.sync_free and not host.net.sync_free
    assert device.stats.deferred == 0
    assert torch.allclose(za, zb, atol=1e-6)
    assert torch.allclose(zb, dense_encode(model, frames), atol=1e-5 if mode == "exact" else 0.05)
    # the first sparse frame plans for a growing halo (here: too many cells, dense), then sparse
    assert all(0 < f < 1 for f in device.stats.flops_per_frame[2:])
    assert all(a <= b for a, b in zip(host.stats.flops_per_frame, device.stats.flops_per_frame))  # ... capacity >= need
    # the same cells needed at every step both ran sparsely (-1: not measured, after a dense step)
    pairs = [(int(d), h) for d, h in zip(device.net.counts, host.net.counts) if d >= 0 and h < device.net.cells]
    assert len(pairs) >= 5 and all(d == h for d, h in pairs)
    z = dense_encode(model, frames[:1]).repeat(6, 1, 1, 1)
    z[1::2, :, 5:7, 6:8] += 0.5  # a blinking 2 x 2 latent cells
    dec_host = SparseDecoderCache(model, 12, 16, mode, sync_free=False)
    dec_device = SparseDecoderCache(model, 12, 16, mode, sync_free=True)
    assert torch.allclose(dec_host(z), dec_device(z), atol=1e-6) and dec_device.stats.deferred == 0
    assert all(0 < f < 1 for f in dec_device.stats.flops_per_frame[2:])


def test_device_path_defers_cells_past_the_capacity_and_catches_up():
    """A batch capacity below the need: the extra cells keep their cached values for one frame
    (counted), and are recomputed the next frame, which then equals the dense model."""
    model = small()
    h, w = 96, 128
    frames = moving_object(2, h, w)
    enc = SparseEncoderCache(model, h, w, "exact", prepare=prepare(model), sync_free=True)
    net = enc.net
    enc(frames[:1])
    x = prepare(model)(frames[1:]).add(1).div(2).contiguous(memory_format=torch.channels_last)
    changed = cell_change(frames[1].permute(2, 0, 1), frames[0].permute(2, 0, 1), 8, 0.0, 1.0)
    want = dense_encode(model, frames[1:]) / model.scaling_factor + model.shift_factor
    out, _ = net.sparse(x, changed, capacity=[16] * len(net.steps))  # the first conv needs 3 x 5 = 15 cells: fits
    assert not torch.allclose(out, want, atol=1e-3)  # deeper steps deferred cells: stale output
    deferred = net.readback[-1].item()
    assert deferred > 0 and [p is not None and p.any().item() for p in net.pending].count(True) > 0
    # the next frames, same input: only the deferred cells (and what they change) run, until none is
    # left (exact mode: a change spreads a cell per conv, so the catch-up may defer again)
    for _ in range(4):
        out, flops = net.sparse(x, torch.zeros_like(changed), capacity=[net.cells - 1] * len(net.steps))
        assert net.counts[0] == 0 and flops < net.dense_flops
        if net.readback[-1].item() == 0:
            break
    assert net.readback[-1].item() == 0
    assert torch.allclose(out, want, atol=1e-5)  # the deferred cells ran: the dense result


def test_device_path_waits_once_per_frame():
    model = small()
    h, w, n = 96, 128, 6
    frames = moving_object(n, h, w)
    enc = SparseEncoderCache(model, h, w, "2", prepare=prepare(model), sync_free=True)
    enc(frames[:2])  # a dense frame, then a sparse one that measures the counts (host path)
    with SyncCounter() as counter:
        enc(frames[2:])
        torch.ones(3).nonzero()  # the counter sees a wait
    assert all(f < 1 for f in enc.stats.flops_per_frame[1:]) and enc.stats.deferred == 0
    # one copy to the host per frame (the counts), nothing else
    assert counter.waits == ["_to_copy.default"] * (n - 2) + ["nonzero.default"]


def test_host_dilation_and_cell_upsampling_match_their_torch_forms():
    """The host path's halo (numpy) equals the device path's (max-pool), edges and 1-wide grids
    included; _up repeats each cell over its s x s pixels."""
    from codec.sparse_cache import _dilate, _dilate_host, _up

    rng = np.random.default_rng(0)
    for _ in range(100):
        mask = rng.random((int(rng.integers(1, 9)), int(rng.integers(1, 9)))) < 0.2
        assert (_dilate_host(mask) == _dilate(torch.from_numpy(mask)).numpy()).all()
        t, s = torch.from_numpy(mask), int(rng.integers(1, 5))
        assert torch.equal(_up(t, s), t[None, None].repeat_interleave(s, 2).repeat_interleave(s, 3))


@pytest.mark.parametrize("layers, scale", [
    (lambda: [torch.nn.Conv2d(5, 6, 3, padding=1), torch.nn.ReLU()], 1),  # one px per cell: a matmul
    (lambda: [torch.nn.Conv2d(5, 6, 3, padding=1)], 4),
    (lambda: [torch.nn.PixelUnshuffle(2), torch.nn.Conv2d(20, 6, 3, padding=1, bias=False)], 2),  # 6x6 stride 2, one px
    (lambda: [torch.nn.PixelUnshuffle(2), torch.nn.Conv2d(20, 6, 3, padding=1)], 8),
    (lambda: [torch.nn.Conv2d(5, 24, 3, padding=1, padding_mode="replicate"), torch.nn.PixelShuffle(2)], 1),
    (lambda: [torch.nn.Conv2d(5, 24, 3, padding=1), torch.nn.PixelShuffle(2)], 2),
    (lambda: [torch.nn.Conv2d(5, 6, 3, padding=1, stride=2)], 4),
], ids=["matmul", "conv", "unshuffle-matmul", "unshuffle", "shuffle-matmul-replicate", "shuffle", "stride"])
def test_each_packed_conv_form_equals_its_dense_layer(layers, scale):
    """Every way a step runs its cells (a matmul for one output px per cell, the unshuffle folded
    into a 6x6 stride-2 conv, the shuffle's channels reordered, plain and strided convs) gives the
    dense layer's values on the cells it recomputes, at the frame border too; the rest is kept."""
    from codec.sparse_cache import SparseNetCache
    torch.manual_seed(0)
    net = torch.nn.Sequential(*layers())
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_()
    rows, cols = 8, 10  # 3 changed cells with their halo: under DENSE_FRACTION of 80
    cache = SparseNetCache(net, scale, rows, cols, 0.0, torch.device("cpu"))
    x = torch.randn(1, 5, rows * scale, cols * scale).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        cache.dense(x)
        changed = torch.zeros(rows, cols, dtype=torch.bool)
        changed[0, 0] = changed[4, 5] = changed[7, 9] = True  # two corners and the middle
        x2 = x.clone()
        x2 += torch.repeat_interleave(torch.repeat_interleave(changed.float(), scale, 0), scale, 1)
        out, flops = cache.sparse(x2, changed)
        ref = net(x2)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert 0 < flops < cache.dense_flops


def test_a_step_past_dense_fraction_runs_the_rest_of_the_network_densely():
    """8 of 24 cell columns change: 10 with the halo, under CUT_FRACTION, so the first convs run
    packed; the halo grows by a column each side per conv until a step would recompute more than
    DENSE_FRACTION (14 columns): from that step on the network runs densely, and the result is the
    dense model's."""
    from codec.sparse_cache import CUT_FRACTION, DENSE_FRACTION
    model = small(linear=True)  # every change reaches its halo
    h, w = 32, 192  # 4 x 24 cells
    frames = static_clip(2, h, w)
    frames[1, :, 64:128] = 255 - frames[1, :, 64:128]  # columns 8..15 of 24 change
    enc = SparseEncoderCache(model, h, w, "exact", prepare=prepare(model))
    z = enc(frames)
    net = enc.net
    assert 10 / 24 <= CUT_FRACTION and 12 / 24 <= DENSE_FRACTION < 14 / 24
    dense = [c == net.cells for c in net.counts]
    first = dense.index(True)
    assert 0 < first and all(dense[first:])  # packed first, dense from there to the end
    assert net.counts[first - 1] == 4 * 12
    assert net.counts[0] == 4 * 10
    assert torch.allclose(z, dense_encode(model, frames), atol=1e-5)
    assert 0 < enc.stats.flops_per_frame[1] < 1
