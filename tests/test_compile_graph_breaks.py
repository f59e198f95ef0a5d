"""torch.compile over the Triton dispatch path: no graph breaks, the codec ops in the graph.

The kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest), which sends
CPU tensors down the same path CUDA tensors take: the public kernel functions decide, then call
``torch.ops.codec.<kernel>``. Before the kernels were custom ops, dynamo traced into the launchers
(``as_strided``/``storage_offset`` in GroupNorm's layout helper, Triton's launch machinery) and
broke the graph or failed outright.
"""

import warnings

import pytest
import torch
import torch._dynamo
from triton.runtime.errors import OutOfResources

import kernels
from codec.models import build
from codec.models.layers import GroupNormAct
from kernels import _dispatch as dispatch


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    """Undo conftest's forced references (it forces them outside test_kernels*): these tests are
    about the Triton path. Fresh dynamo caches and no kernel marked unusable by another test."""
    monkeypatch.setattr(dispatch._state, "forced", 0)
    monkeypatch.setattr(dispatch, "_unusable", {})
    assert kernels.interpreting() and not kernels.reference_forced()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny():
    torch.manual_seed(0)
    return build("taesd", latent_channels=4, width=8, midblock_groupnorm=True)


def _kl():
    torch.manual_seed(0)
    return build("sd15", block_out_channels=(32, 32), norm_num_groups=8, latent_channels=4)


MODELS = {"tiny": _tiny, "kl": _kl}


class GraphRecorder:
    """A torch.compile backend that keeps every FX graph dynamo hands it and runs it eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def calls(self, name: str) -> int:
        """How many nodes of the recorded graphs call ``torch.ops.codec.<name>``."""
        wanted = {getattr(torch.ops.codec, name), getattr(torch.ops.codec, name).default}
        return sum(node.op == "call_function" and node.target in wanted
                   for gm in self.graphs for node in gm.graph.nodes)


def _passes(model):
    """(name, raw pass, its input, the GroupNormAct layers it runs) for encode and decode."""
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = model._encode_raw(x, False, None)
    norms = {part: sum(isinstance(m, GroupNormAct) for m in getattr(model, part).modules())
             for part in ("encoder", "decoder")}
    return [("encode", lambda t: model._encode_raw(t, False, None), x, norms["encoder"]),
            ("decode", model._decode_raw, z, norms["decoder"])]


@pytest.mark.parametrize("family", MODELS)
def test_raw_passes_compile_without_graph_breaks(family):
    model = MODELS[family]()
    for name, fn, inp, norms in _passes(model):
        assert norms > 0, (family, name)  # the model has GroupNorms, or this test proves nothing
        with torch.no_grad():
            eager = fn(inp)  # first: eager calls fill caches (the upconv's folded weights)
            explained = torch._dynamo.explain(fn)(inp)
            assert explained.graph_break_count == 0, (family, name, [str(r.reason)[:200]
                                                                    for r in explained.break_reasons])
            torch._dynamo.reset()
            recorder = GraphRecorder()
            compiled = torch.compile(fn, backend=recorder, fullgraph=True)(inp)
        assert len(recorder.graphs) == 1
        # Every GroupNorm of the pass is the Triton op inside the one graph (not the reference).
        assert recorder.calls("group_norm") == norms, (family, name)
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
        with kernels.force_reference():
            torch.testing.assert_close(eager, fn(inp), rtol=1e-4, atol=1e-5)


def test_aot_eager_training_step_has_no_breaks_and_the_op_gradient():
    """The trainer's path: the KL decoder under aot_eager with gradients, through the op's
    registered autograd formula, matches eager torch (the reference) in every parameter."""
    model = _kl()
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        model.zero_grad(set_to_none=True)
        fn(z).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if n.startswith("decoder.")}

    compiled = grads(torch.compile(model._decode_raw, backend="aot_eager", fullgraph=True))
    with kernels.force_reference():
        want = grads(model._decode_raw)
    assert len(compiled) > 20
    for name, g in compiled.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, want[name], rtol=1e-3, atol=1e-6, msg=name)


def _pipeline_steps(frames, gamma, tiles, origins, window):
    """One call of every kernel, chained the way the codec uses them."""
    x = kernels.frames_to_input(frames, size=(6, 8), channels_last=True)
    count, mean, m2 = kernels.group_norm_stats(x, 3)
    y = kernels.group_norm_apply(x, mean, torch.rsqrt(m2 / count + 1e-6), 3, act="silu")
    y = kernels.rms_norm(y.contiguous(), gamma, "silu")
    change = kernels.tile_change(tiles, tiles * 0.5)
    canvas = kernels.blend_tiles(tiles, origins, window, (2, 3, 6, 8))
    return kernels.output_to_frames(y + canvas[:1], 5, 7), change[0], change[1]


def test_every_kernel_is_one_op_in_one_graph():
    g = torch.Generator().manual_seed(3)
    args = (torch.randint(0, 256, (1, 5, 7, 3), dtype=torch.uint8, generator=g), torch.rand(3, generator=g),
            torch.rand(3, 3, 4, 5, generator=g), torch.tensor([[0, 0, 0], [0, 2, 3], [1, 1, 1]]),
            torch.rand(4, 5, generator=g) + 0.1)
    recorder = GraphRecorder()
    compiled = torch.compile(_pipeline_steps, backend=recorder, fullgraph=True)(*args)
    eager = _pipeline_steps(*args)
    assert len(recorder.graphs) == 1
    for name in ("frames_to_input", "group_norm_stats", "group_norm_apply", "rms_norm", "tile_change",
                 "blend_tiles", "output_to_frames"):
        assert recorder.calls(name) == 1, name
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_graph_recompiles_when_the_reference_is_forced():
    """The dispatch decision is traced Python, guarded on: forcing the reference after compiling
    must run the reference (no codec op in the new graph), not the cached Triton graph."""
    x = torch.randn(1, 6, 3, 5, generator=torch.Generator().manual_seed(4))
    recorder = GraphRecorder()
    fn = torch.compile(lambda t: kernels.group_norm(t, 3, act="silu"), backend=recorder, fullgraph=True)
    fn(x)
    assert recorder.calls("group_norm") == 1
    with kernels.force_reference():
        fn(x)
    assert len(recorder.graphs) == 2 and recorder.calls("group_norm") == 1


class NoResources:
    """A kernel that the GPU cannot launch (too much shared memory)."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise OutOfResources(232448, 101376, "shared memory")
        return launch


def test_launch_failure_inside_a_compiled_graph_falls_back_once(monkeypatch):
    import importlib

    gn = importlib.import_module("kernels.group_norm")
    monkeypatch.setattr(gn, "_gn_stats_kernel", NoResources())
    x = torch.randn(2, 6, 3, 5, generator=torch.Generator().manual_seed(5))
    fn = torch.compile(lambda t: kernels.group_norm(t, 3, act="silu") * 2, backend="aot_eager", fullgraph=True)
    want = kernels.group_norm(x, 3, act="silu", reference=True) * 2
    with pytest.warns(RuntimeWarning, match="group_norm: Triton cannot run it here .*OutOfResources"):
        torch.testing.assert_close(fn(x), want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        torch.testing.assert_close(fn(x), want, rtol=0, atol=0)
    assert "group_norm" in kernels.unusable_kernels()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_group_norm_op_fake_and_autograd_registration(fmt):
    """torch.library.opcheck: the fake implementation agrees with the real one (shape, dtype,
    strides) and the op traces under AOT with its autograd formula."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, 3, 5, generator=g).contiguous(memory_format=fmt).requires_grad_()
    w, b = torch.randn(6, generator=g).requires_grad_(), torch.randn(6, generator=g).requires_grad_()
    torch.library.opcheck(torch.ops.codec.group_norm.default, (x, 3, w, b, 1e-6, "silu"))
    torch.library.opcheck(torch.ops.codec.group_norm_apply.default,
                          (x.detach(), torch.zeros(2, 3), torch.ones(2, 3), 3, None, None, "relu"))
    torch.library.opcheck(torch.ops.codec.group_norm_stats.default, (x.detach(), 3))
