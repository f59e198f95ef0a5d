"""codec.models.accel: accelerate() on the CPU changes nothing observable; the graph runner's keying."""

from __future__ import annotations

import copy

import pytest
import torch

from codec.models import build
from codec.models.accel import (
    Accelerated,
    CudaGraphRunner,
    GraphPool,
    _Plain,
    accelerate,
    accelerated,
    deaccelerate,
    planning_budget,
)
from codec.models.layers import frame_normalizer_active

EAGER = {"backend": "eager"}  # dynamo tracing without inductor: fast, and bit-identical


def small_kl(seed: int = 0):
    torch.manual_seed(seed)
    model = build("sd15", block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    return model


def small_tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build("taef2", width=8)


@pytest.mark.parametrize("make", [small_kl, small_tiny], ids=["kl", "tiny"])
def test_accelerate_on_cpu_is_bit_identical_and_keeps_state_keys(make):
    plain = make()
    model = copy.deepcopy(plain)
    keys = list(plain.state_dict())
    assert accelerate(model, compile=True, cuda_graphs=True, compile_kwargs=EAGER) is model
    assert list(model.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert set(accelerated(model)) == {"_encode_raw", "_decode_raw"}
    assert not accelerated(model)["_encode_raw"].options["cuda_graphs"]  # CPU: graphs are a no-op
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    z = torch.randn(2, plain.latent_channels, 4, 3)
    for _ in range(2):  # second call: the compiled code, not the first trace
        assert torch.equal(model.encode(x), plain.encode(x))
        assert torch.equal(model.decode(z), plain.decode(z))
    deaccelerate(model)
    assert not accelerated(model) and "_encode_raw" not in model.__dict__
    assert torch.equal(model.encode(x), plain.encode(x))


def test_accelerate_without_switches_installs_nothing():
    model = small_kl()
    accelerate(model)
    assert not accelerated(model)


def test_sample_path_and_generator_still_work():
    plain = small_kl()
    model = accelerate(copy.deepcopy(plain), compile=True, compile_kwargs=EAGER)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    a = model.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    b = plain.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_deepcopy_and_fp32_fallback_use_plain_passes():
    plain = small_kl()
    with torch.no_grad():  # conv_in overflows fp16 (not fp32) on a constant input
        plain.encoder.conv_in.weight.fill_(100.0)
        plain.encoder.conv_in.bias.fill_(6.5e4)
    plain = plain.half()
    model = accelerate(copy.deepcopy(plain), compile=True, compile_kwargs=EAGER)
    twin = copy.deepcopy(model)
    for name in ("_encode_raw", "_decode_raw"):
        assert type(twin.__dict__[name]) is _Plain  # not the original's compiled code
    x = -torch.ones(1, 3, 16, 16)  # stays finite in fp16
    assert torch.equal(twin.encode(x), plain.encode(x))
    assert twin.fp32_fallbacks == plain.fp32_fallbacks == 0
    # fp16 overflow -> the batch is recomputed by the fp32 twin, through the plain passes.
    big = torch.ones(1, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match="recomputing in float32"):
        got = model.encode(big)
    assert model.fp32_fallbacks == 1 and got.dtype == torch.float32 and torch.isfinite(got).all()
    assert isinstance(model._twin.__dict__["_encode_raw"], _Plain)
    with pytest.warns(RuntimeWarning):
        want = plain.encode(big)
    assert torch.equal(got, want)


def test_accelerate_rejects_other_modules():
    with pytest.raises(TypeError, match="Autoencoder"):
        accelerate(torch.nn.Linear(2, 2))


# ---- the graph runner, with a fake capture --------------------------------------------------

class FakeCapture:
    """Stands in for capture_cuda_graph: records each capture; replays by calling fn."""

    def __init__(self):
        self.captured: list[tuple] = []
        self.pools: list = []

    def __call__(self, fn, args, pool):
        self.captured.append(tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args))
        self.pools.append(pool)
        return lambda new_args: fn(*new_args)


def make_runner(**kwargs):
    fake = FakeCapture()
    calls = []

    def fn(x, flag=False, gen=None):
        calls.append(x.shape)
        return x * 2

    runner = CudaGraphRunner(fn, capture=fake, device_type="cpu", pool=GraphPool(object), **kwargs)
    return runner, fake, calls


@torch.no_grad()
def test_runner_captures_once_per_shape_dtype_stride_and_arguments():
    runner, fake, _ = make_runner()
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(runner(x, False, None), x * 2)
    runner(torch.randn(1, 3, 8, 8), False, None)  # same signature: replayed
    assert runner.captures == 1 and runner.replays == 2
    runner(x.to(memory_format=torch.channels_last), False, None)  # new strides
    runner(x.half(), False, None)  # new dtype
    runner(torch.randn(2, 3, 8, 8), False, None)  # new shape
    runner(x, True, None)  # another value of a plain argument
    assert runner.captures == 5 and len(runner.graphs) == 5
    runner(x.to(memory_format=torch.channels_last), False, None)
    assert runner.captures == 5


@torch.no_grad()
def test_runner_runs_eagerly_when_it_cannot_replay():
    hooks = {"active": False}
    runner, fake, calls = make_runner(eligible=lambda: not hooks["active"])
    x = torch.randn(1, 3, 4, 4)
    runner(x, False, torch.Generator())  # a generator is no replayable argument
    hooks["active"] = True
    runner(x, False, None)  # e.g. a frame normalizer active (global norm)
    hooks["active"] = False
    with torch.enable_grad():
        runner(x, False, None)
    assert runner.captures == 0 and runner.eager_calls == 3 and len(calls) == 3
    cuda_only = CudaGraphRunner(lambda t: t + 1, capture=fake)  # default device_type="cuda"
    assert torch.equal(cuda_only(x), x + 1) and cuda_only.eager_calls == 1 and not fake.captured


@torch.no_grad()
def test_runner_keys_on_forced_reference_and_evicts_least_recent(monkeypatch):
    import kernels
    from kernels import _dispatch

    monkeypatch.setattr(_dispatch._state, "forced", 0)  # conftest forces the references here
    monkeypatch.delenv("CODEC_KERNELS", raising=False)
    runner, _, _ = make_runner(max_graphs=2)
    a, b, c = (torch.randn(1, 3, s, s) for s in (2, 3, 4))
    runner(a)
    with kernels.force_reference():
        runner(a)  # the torch references would be baked into a graph: another capture
    assert runner.captures == 2
    runner(a)  # most recent now; the forced one is the oldest
    runner(b)
    assert len(runner.graphs) == 2 and runner.captures == 3
    with kernels.force_reference():
        runner(a)  # was evicted: captured again
    assert runner.captures == 4
    runner.clear()
    assert not runner.graphs
    with pytest.raises(ValueError):
        CudaGraphRunner(lambda t: t, max_graphs=0)
    del c


@torch.no_grad()
def test_runner_on_a_model_with_fake_capture_matches_eager():
    plain = small_kl()
    model = copy.deepcopy(plain)
    fake = FakeCapture()
    for name in ("_encode_raw", "_decode_raw"):
        fn = getattr(type(model), name).__get__(model)
        runner = CudaGraphRunner(fn, capture=fake, device_type="cpu", pool=GraphPool(object),
                                 eligible=lambda: not frame_normalizer_active())
        model.__dict__[name] = Accelerated(model, name, runner, {})
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for _ in range(2):
        assert torch.equal(model.encode(x), plain.encode(x))
        assert torch.equal(model.decode(plain.encode(x)), plain.decode(plain.encode(x)))
    assert fake.captured == [((1, 3, 16, 16), False, None), ((1, 4, 8, 8),)]  # downscale 2
    assert accelerated(model)["_encode_raw"].runner.replays == 2


@torch.no_grad()
def test_graphs_of_both_passes_share_one_pool():
    handles = []

    def make_handle():  # stands in for torch.cuda.graph_pool_handle
        handles.append(object())
        return handles[-1]

    pool, fake = GraphPool(make_handle), FakeCapture()
    enc = CudaGraphRunner(lambda t: t * 2, capture=fake, device_type="cpu", pool=pool)
    dec = CudaGraphRunner(lambda t: t + 1, capture=fake, device_type="cpu", pool=pool)
    for n in (1, 2, 4):
        enc(torch.zeros(n, 3, 8, 8))
        dec(torch.zeros(n, 4, 2, 2))
    assert enc.captures == dec.captures == 3 and len(handles) == 1
    assert fake.pools == [handles[0]] * 6  # every capture went into the one pool
    alone = CudaGraphRunner(lambda t: t, capture=fake, device_type="cpu", pool=GraphPool(make_handle))
    alone(torch.zeros(1))
    assert fake.pools[-1] is handles[1] and fake.pools[-1] is not handles[0]


def test_plan_sets_the_graph_pool_aside_from_the_budget():
    from codec.coder import CoderOptions, FrameDecoder
    from codec.tiling import activation_bytes

    plain = small_kl()
    graphed = copy.deepcopy(plain)
    for name in ("_encode_raw", "_decode_raw"):
        runner = CudaGraphRunner(getattr(type(graphed), name).__get__(graphed), capture=FakeCapture(),
                                 device_type="cpu", pool=GraphPool(object))
        graphed.__dict__[name] = Accelerated(graphed, name, runner, {})
    budget = 64 << 20
    assert planning_budget(plain, budget) == budget and planning_budget(graphed, budget) == budget // 2
    opts = CoderOptions(max_memory=budget, tile=64, overlap=16, cache="off")
    eager, graph = FrameDecoder(plain, 256, 256, opts).plan, FrameDecoder(graphed, 256, 256, opts).plan
    per_tile = activation_bytes(plain, 64 * 64, plain.dtype, decode=True)
    assert eager.batch == min(16, budget // per_tile)
    assert graph.batch == min(16, budget // 2 // per_tile) < eager.batch  # room kept for the pool
    assert graph.batch * per_tile <= budget // 2


# ---- CUDA ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_graphs_match_eager_and_keep_the_fallback():
    plain = small_kl().cuda().half()
    model = accelerate(copy.deepcopy(plain), cuda_graphs=True)
    assert next(p for p in model.parameters() if p.ndim == 4).is_contiguous(memory_format=torch.channels_last)
    runner = accelerated(model)["_encode_raw"].runner
    assert runner is not None
    for _ in range(3):
        x = torch.rand(2, 3, 32, 48, device="cuda", dtype=torch.float16) * 2 - 1
        got, want = model.encode(x), plain.encode(x)
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
        z = torch.randn(2, 4, 4, 6, device="cuda", dtype=torch.float16)
        got, want = model.decode(z), plain.decode(z)
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    assert runner.captures == 1 and runner.replays == 3
    big = torch.full((1, 3, 16, 16), 6e4, device="cuda", dtype=torch.float16)
    with pytest.warns(RuntimeWarning):
        out = model.encode(big)
    assert model.fp32_fallbacks == 1 and out.dtype == torch.float32 and torch.isfinite(out).all()
