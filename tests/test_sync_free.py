"""No host sync per frame on the model thread; few batch shapes; the copies' buffer rotation.

On the CPU the sync counter (codec.sync_count) stands in for CUDA: it counts the operations that
would make the host wait for the device. Counts are taken over the steady state (after a warm-up
call) for runs of 2 and 6 frames: a per-frame term shows as a difference.
"""

from __future__ import annotations

import copy
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import moving_square_frames, tiny_model_file, write_clip

import kernels
from codec.coder import CoderOptions, FrameDecoder, FrameEncoder, batch_bucket
from codec.latents import LatentReader
from codec.models import build
from codec.pipeline import decode_video, encode_video, roundtrip_video
from codec.sync_count import SyncCounter
from codec.transfer import HostCopy, Slots, Uploader

H, W = 48, 64
TILED = dict(tile=32, overlap=16, max_memory=1 << 30)


def tiny():
    torch.manual_seed(0)
    return build("taesd", width=8)


def kl():
    torch.manual_seed(0)
    return build("sd15", block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1)


@pytest.fixture
def count_blend_apart(monkeypatch):
    """The blend's torch reference (the CPU path) reads its tile origins on the host; on CUDA the
    Triton kernel reads them on the device. Set it aside so the count is the coder's own."""
    counters: list[SyncCounter] = []
    real = kernels.blend_tiles

    def blend(*args, **kwargs):
        if not counters:
            return real(*args, **kwargs)
        with counters[-1].paused():
            return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "blend_tiles", blend)
    return counters


def test_counter_counts_the_ops_that_sync():
    x = torch.arange(6.0)
    with SyncCounter() as c:
        y = (x * 2 + 1).sum(0, keepdim=True)  # device work only
        torch.where(x > 2, x, 0.0)
    assert c.total == 0 and y.shape == (1,)
    with SyncCounter() as c:
        x.sum().item()
        bool(x[0] > 1)
        (x > 2).nonzero()
        x[x > 2]
        x.tolist()
        x.cpu()
        x.numpy()
        torch.repeat_interleave(x, torch.tensor([1] * 6))
        with c.paused():
            x.tolist()
    assert c.by_op == {"aten._local_scalar_dense.default": 2, "aten.nonzero.default": 1,
                       "aten.index.Tensor": 1, "Tensor.tolist": 1, "Tensor.cpu": 1, "Tensor.numpy": 1,
                       "aten.repeat_interleave.Tensor": 1}


def _steady_counts(coder, data, frames_per_call: int, counters) -> list[int]:
    """Counts over 2 and 6 frames after a warm-up call, ``frames_per_call`` frames a call."""
    coder.submit(data[:1])
    out = []
    for n in (2, 6):
        with SyncCounter() as c:
            counters.append(c)
            for i in range(1, 1 + n, frames_per_call):
                coder.submit(data[i:i + frames_per_call])
        out.append(c.total)
    return out


@pytest.mark.parametrize("make,norm", [(tiny, "tile"), (kl, "global")], ids=["tiny", "kl-global"])
@pytest.mark.parametrize("direction", ["encode", "decode"])
@torch.no_grad()
def test_no_sync_per_frame_through_the_coders(make, norm, direction, count_blend_apart):
    model = make()
    frames = moving_square_frames(13, H, W)
    data = frames if direction == "encode" else FrameEncoder(model, H, W, CoderOptions(cache="off", **TILED))(frames)
    kind = FrameEncoder if direction == "encode" else FrameDecoder
    for cache in ("off", "exact", "3"):
        coder = kind(model, H, W, CoderOptions(cache=cache, norm=norm, **TILED))
        assert len(coder.layout) > 1 and coder.global_norm == (norm == "global")
        two, six = _steady_counts(coder, data, 1, count_blend_apart)
        if cache == "off":
            assert (two, six) == (0, 0), cache
        else:  # the tile cache reads which tiles to compute once per call, not per frame of it
            assert (two, six) == (2, 6), cache
            two, six = _steady_counts(kind(model, H, W, CoderOptions(cache=cache, norm=norm, **TILED)),
                                      data, 3, count_blend_apart)
            assert (two, six) == (1, 2), cache


@torch.no_grad()
def test_half_precision_checks_finiteness_where_the_result_is_read(count_blend_apart):
    model = kl()
    with torch.no_grad():  # conv_in overflows fp16 (not fp32) on bright input
        model.encoder.conv_in.weight.fill_(100.0)
        model.encoder.conv_in.bias.fill_(6.5e4)
    half = copy.deepcopy(model).half()
    dark = np.zeros((1, H, W, 3), np.uint8)
    bright = np.full((3, H, W, 3), 255, np.uint8)
    enc = FrameEncoder(half, H, W, CoderOptions(cache="exact", **TILED))
    enc.submit(dark).result()
    with SyncCounter() as c:
        count_blend_apart.append(c)
        pending = enc.submit(bright[:1])
    assert c.total == 1  # the cache's read; none for the finiteness flag
    with SyncCounter() as c:
        with pytest.warns(RuntimeWarning, match="recomputing in float32"):
            got = pending.result()
    assert c.total >= 1  # reading the flag waits (then the fp32 recompute)
    fp32 = copy.deepcopy(half).float()  # what the fallback runs: the fp16 weights in fp32
    want = FrameEncoder(fp32, H, W, CoderOptions(cache="off", **TILED))(bright[:1])
    assert half.fp32_fallbacks == 1 and got.dtype == torch.float32 and torch.equal(got, want)
    # The non-finite tiles were not kept for reuse: the same frame again is recomputed, falls back again.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        again = enc.submit(bright[1:]).to_host(torch.float16).wait()
    assert half.fp32_fallbacks == 2 and enc.stats.per_frame[-2:] == [0.0, 0.0]  # one recompute per call
    assert again.dtype == torch.float16 and torch.equal(again, want.half().expand(2, -1, -1, -1))


@torch.no_grad()
def test_partial_batches_are_padded_to_few_shapes():
    assert [batch_bucket(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert batch_bucket(5, 6) == 6 and batch_bucket(1, 1) == 1
    model = tiny()
    shapes = []
    raw = model._encode_raw

    def recording(x, *args):
        shapes.append(x.shape[0])
        return raw(x, *args)

    model.__dict__["_encode_raw"] = recording  # an instance attribute shadows the method
    frames = moving_square_frames(17, 24, 32)
    for n in range(1, 18):
        enc = FrameEncoder(model, 24, 32, CoderOptions(batch=8, cache="off"))
        z = enc(frames[:n])
        assert z.shape[0] == n
    assert set(shapes) == {1, 2, 4, 8}  # 8 distinct sizes without padding
    del model.__dict__["_encode_raw"]
    torch.testing.assert_close(z[16:], model.encode(kernels.frames_to_input(torch.from_numpy(frames[16:]))),
                               rtol=1e-5, atol=1e-5)  # the padding does not leak into the results


def test_slots_rotate_and_wait_for_the_last_use():
    waited = []
    slots = Slots(2, wait=waited.append)
    made = []

    def make():
        made.append(object())
        return made[-1]

    same = lambda b: True  # noqa: E731
    i0, b0 = slots.take(make, same)
    slots.done(i0, "copy0")
    i1, b1 = slots.take(make, same)
    slots.done(i1, "copy1")
    assert (i0, i1) == (0, 1) and b0 is not b1 and not waited
    i2, b2 = slots.take(make, same)  # slot 0 again: waits for its copy of two calls ago
    assert i2 == 0 and b2 is b0 and waited == ["copy0"]
    i3, b3 = slots.take(make, lambda b: False)  # another shape: a new buffer for slot 1
    assert i3 == 1 and waited == ["copy0", "copy1"] and b3 is made[-1] and len(made) == 3
    with pytest.raises(ValueError):
        Slots(0)


def test_copies_on_the_cpu_are_plain():
    x = np.arange(12, dtype=np.uint8).reshape(3, 4)
    up = Uploader("cpu")(x)
    assert up.dtype == torch.uint8 and torch.equal(up, torch.from_numpy(x))
    t = torch.linspace(-1, 1, 5)
    back = HostCopy(t, torch.float16).wait()
    assert back.dtype == torch.float16 and torch.equal(back, t.half())


# ---- the pipeline's model thread ----------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(7, 40, 56), fps=Fraction(25))
    return clip, tiny_model_file(tmp_path / "tiny.safetensors")


def _main_thread_syncs(run, counters) -> int:
    with SyncCounter() as c:  # counts this (the model) thread only: the writers run on their own
        counters.append(c)
        run()
    return c.total


def test_pipeline_model_thread_has_no_sync_per_frame(files, tmp_path, monkeypatch):
    clip, model = files
    counters: list[SyncCounter] = []
    read = LatentReader.read

    def read_uncounted(self, *args):  # file data sliced on the host (safetensors), no device there
        with counters[-1].paused():
            return read(self, *args)

    monkeypatch.setattr(LatentReader, "read", read_uncounted)
    opts = CoderOptions(cache="off")
    counts = {}
    for n in (2, 6):
        lat = tmp_path / f"{n}.safetensors"
        runs = {"encode": lambda n=n, lat=lat: encode_video(clip, lat, str(model), end=n, batch=1, options=opts),
                "decode": lambda n=n, lat=lat: decode_video(lat, tmp_path / f"{n}.mp4", batch=1, options=opts),
                "roundtrip": lambda n=n: roundtrip_video(clip, tmp_path / f"rt{n}.mp4", str(model), end=n,
                                                         batch=1, options=opts)}
        for what, run in runs.items():
            counts[what, n] = _main_thread_syncs(run, counters)
    for what in ("encode", "decode", "roundtrip"):
        assert counts[what, 2] == counts[what, 6], (what, counts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_steady_state_raises_no_sync_error():
    """Whole frames: a tiled layout's blend still uploads its tile origins per call from pageable
    memory (TileLayout.blend builds them with torch.tensor), which syncs."""
    model = kl().cuda().half()
    frames = moving_square_frames(5, H, W)
    enc = FrameEncoder(model, H, W, CoderOptions(cache="off"))
    dec = FrameDecoder(model, H, W, CoderOptions(cache="off"))
    latents = enc(frames[:1])
    dec(latents)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 5):
            z = enc.submit(frames[i:i + 1])
            dec.submit(z.out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(z.result()).all()
