"""Speed switches for an :class:`Autoencoder`: channels_last, cuDNN autotuning, torch.compile, CUDA graphs.

    model = accelerate(load_model(..., device="cuda", dtype=torch.float16), cuda_graphs=True)

``accelerate`` replaces the two raw passes of one model instance, ``_encode_raw`` and
``_decode_raw``, by instance attributes (an instance attribute shadows the method), so
``Autoencoder`` itself is unchanged and works as before without it: no submodule is registered,
the state dict keeps its keys, and the public ``encode``/``decode`` keep their checks, scaling and
the fp16 -> fp32 fallback (the finiteness check runs outside any graph, on the replayed output).

- On CUDA: weights in channels_last, ``torch.backends.cudnn.benchmark = True`` (process-wide).
- ``compile=True``: the raw passes go through ``torch.compile`` (CPU too, slow to compile);
  ``compile_kwargs`` are passed on (``backend``, ``mode``, ``dynamic`` ...). Do not combine
  ``mode="reduce-overhead"`` with ``cuda_graphs=True``: that is inductor's own graph capture.
- ``cuda_graphs=True`` (CUDA only): one CUDA graph per input signature (shape, dtype, stride of
  each tensor argument, the other arguments, and whether the torch kernel references are forced),
  for the fixed tile shapes the codec feeds (its partial batches are padded to a few bucket sizes).
  Every graph of both passes shares ONE memory pool (:class:`GraphPool`): they replay one at a
  time on one stream and each output is cloned before the next replay, so their activations may
  share memory; the pool keeps the peak of the largest captured shape reserved, and
  :func:`planning_budget` sets that much of the memory budget aside. Calls that cannot be
  replayed run eagerly: inputs not on CUDA, a ``torch.Generator`` argument, gradients enabled, an
  active frame normalizer (tiling's global normalization, ``layers.frame_normalizer``), or a
  capture already in progress.

A deep copy of an accelerated model (``fp32_twin`` makes one for the fallback) gets the plain
passes, never the original's graphs or compiled code. Undo with :func:`deaccelerate`; call it
before pickling a whole model object (state dicts are unaffected).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

import kernels

from .layers import frame_normalizer_active

RAW_PASSES = ("_encode_raw", "_decode_raw")
_SIMPLE = (bool, int, float, str, type(None), torch.dtype, torch.device)


# ---- CUDA graphs ------------------------------------------------------------------------------

def _map_tensors(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map_tensors(o, fn) for o in out)
    return out


def capture_cuda_graph(fn: Callable, args: tuple, pool=None, warmup: int = 2) -> Callable[[tuple], Any]:
    """Capture ``fn(*args)`` in a CUDA graph (in the memory pool ``pool``, a
    ``torch.cuda.graph_pool_handle()``; None: a pool of its own); returns ``replay(args) -> output``.

    The tensor arguments are copied into static buffers of the same strides; ``fn`` is run
    ``warmup`` times on a side stream first (Triton compilation, cuDNN autotuning, lazy caches),
    then captured with ``torch.cuda.graph``. Each replay copies the new arguments in and returns
    a clone of the static output, so results never alias the graph's memory.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cuda", torch.cuda.current_device())

    def static_like(a: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)

    with torch.cuda.device(device):
        static = tuple(static_like(a) if isinstance(a, torch.Tensor) else a for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn(*static)

    def replay(new_args: tuple) -> Any:
        for s, a in zip(static, new_args):
            if isinstance(s, torch.Tensor):
                s.copy_(a)
        graph.replay()
        return _map_tensors(out, torch.Tensor.clone)

    replay.graph = graph  # kept reachable for inspection
    return replay


class GraphPool:
    """One CUDA-graph memory pool for several runners: ``handle()`` makes it on first use with
    ``make`` (``torch.cuda.graph_pool_handle`` by default; tests inject a stand-in)."""

    def __init__(self, make: Callable[[], Any] | None = None):
        self._make = make or torch.cuda.graph_pool_handle
        self._handle = None

    def handle(self):
        if self._handle is None:
            self._handle = self._make()
        return self._handle


class CudaGraphRunner:
    """Call ``fn`` through one captured CUDA graph per input signature (see :meth:`signature`).

    capture: ``capture(fn, args, pool_handle) -> replay(args)``; :func:`capture_cuda_graph` by
    default (tests inject a fake). pool: the :class:`GraphPool` every graph is captured into
    (shared with other runners when given; else one of its own). device_type: tensor arguments
    must all be on this device type to replay (None: any). eligible: a check run on every call;
    False runs ``fn`` eagerly. extra_key: added to every signature (by default whether the torch
    kernel references are forced, so an A/B of ``kernels.force_reference()`` captures each
    variant). max_graphs: least recently used graphs beyond this are dropped.
    """

    def __init__(self, fn: Callable, *, capture: Callable | None = None, device_type: str | None = "cuda",
                 eligible: Callable[[], bool] | None = None, extra_key: Callable[[], Hashable] | None = None,
                 max_graphs: int = 8, warmup: int = 2, pool: GraphPool | None = None):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.fn = fn
        self.capture = capture or (lambda f, a, p: capture_cuda_graph(f, a, pool=p, warmup=warmup))
        self.pool = pool or GraphPool()
        self.device_type = device_type
        self.eligible = eligible
        self.extra_key = extra_key if extra_key is not None else kernels.reference_forced
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Hashable, Callable] = OrderedDict()
        self.captures = 0  # graphs captured so far (evicted ones included)
        self.replays = 0
        self.eager_calls = 0

    def signature(self, args: tuple) -> Hashable | None:
        """The cache key of a call, or None when the call must run eagerly."""
        if torch.is_grad_enabled():
            return None
        if self.eligible is not None and not self.eligible():
            return None
        key = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if self.device_type is not None and a.device.type != self.device_type:
                    return None
                key.append(("tensor", tuple(a.shape), a.dtype, tuple(a.stride()), str(a.device)))
            elif isinstance(a, _SIMPLE):
                key.append(("value", type(a).__name__, a))
            else:  # a torch.Generator, a list ...: not part of a replayable call
                return None
        if not any(k[0] == "tensor" for k in key):
            return None
        if self.device_type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        return tuple(key), self.extra_key()

    def __call__(self, *args, **kwargs):
        key = None if kwargs else self.signature(args)
        if key is None:
            self.eager_calls += 1
            return self.fn(*args, **kwargs)
        replay = self.graphs.get(key)
        if replay is None:
            replay = self.capture(self.fn, args, self.pool.handle())
            self.captures += 1
            self.graphs[key] = replay
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        self.replays += 1
        return replay(args)

    def clear(self) -> None:
        """Drop every captured graph (the shared pool's memory goes once no graph holds it)."""
        self.graphs.clear()


# ---- installing on a model ----------------------------------------------------------------------

class _Plain:
    """The unaccelerated raw pass of a model (what a deep copy of an accelerated model gets)."""

    def __init__(self, model: torch.nn.Module | None, name: str):
        self.name = name
        self._model = weakref.ref(model) if model is not None else None

    def __call__(self, *args, **kwargs):
        model = self._model() if self._model is not None else None
        if model is None:
            raise RuntimeError(f"{self.name}: the model this pass belonged to is gone")
        return getattr(type(model), self.name)(model, *args, **kwargs)

    def __deepcopy__(self, memo):
        model = self._model() if self._model is not None else None
        return _Plain(memo.get(id(model)) if model is not None else None, self.name)


class Accelerated(_Plain):
    """An accelerated raw pass installed on one model instance (``model.__dict__[name]``)."""

    def __init__(self, model: torch.nn.Module, name: str, fn: Callable, options: dict):
        super().__init__(model, name)
        self.fn, self.options = fn, options

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    @property
    def runner(self) -> CudaGraphRunner | None:
        return self.fn if isinstance(self.fn, CudaGraphRunner) else None

    def __repr__(self) -> str:
        return f"Accelerated({self.name}, {self.options})"


def deaccelerate(model: torch.nn.Module) -> torch.nn.Module:
    """Remove what :func:`accelerate` installed on ``model`` (weights stay in their memory format)."""
    for name in RAW_PASSES:
        if isinstance(model.__dict__.get(name), _Plain):
            del model.__dict__[name]
    return model


def accelerated(model: torch.nn.Module) -> dict[str, Accelerated]:
    """The accelerated passes installed on ``model``, by name (empty when none)."""
    return {n: p for n in RAW_PASSES if isinstance(p := model.__dict__.get(n), Accelerated)}


def planning_budget(model: torch.nn.Module, budget: int) -> int:
    """The bytes of ``budget`` a tile plan may give one model call: all of them for eager passes;
    half when CUDA graphs replay them. The graphs' shared pool keeps the peak activations of the
    largest captured shape reserved, which is at most what the plan allows one call, while eager
    calls (global normalization's measure, the float32 fallback) still need their own."""
    graphs = any(p.runner is not None for p in accelerated(model).values())
    return budget // 2 if graphs else budget


def accelerate(model: torch.nn.Module, compile: bool = False, cuda_graphs: bool = False, *,
               compile_kwargs: dict | None = None, max_graphs: int = 8) -> torch.nn.Module:
    """Speed up ``model`` (an :class:`Autoencoder`) in place and return it; see the module docstring.
    A video VAE (``VideoAutoencoder``) is returned as it is: its streams hold causal caches that
    graphs and compiled passes do not know about (its GPU path is not tuned yet).

    Calling it again replaces what an earlier call installed. On the CPU only ``compile`` has an
    effect; ``cuda_graphs`` is ignored there, and the runner also falls back to eager calls for
    CPU inputs if the model is moved later.
    """
    if getattr(model, "family", None) == "wan":  # video VAEs stream through their own causal caches
        return model
    for name in RAW_PASSES:
        if not callable(getattr(type(model), name, None)):
            raise TypeError(f"accelerate expects an Autoencoder (with {name}), got {type(model).__name__}")
    deaccelerate(model)
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    graphs = cuda_graphs and cuda
    options = dict(compile=compile, cuda_graphs=graphs, channels_last=cuda,
                   compile_kwargs=dict(compile_kwargs or {}))
    if not compile and not graphs:
        return model

    def no_frame_normalizer() -> bool:  # global normalization supplies statistics per call
        return not frame_normalizer_active()

    pool = GraphPool()  # one pool for the graphs of both passes
    for name in RAW_PASSES:
        fn: Callable = getattr(type(model), name).__get__(model)
        if compile:
            fn = torch.compile(fn, **options["compile_kwargs"])
        if graphs:
            fn = CudaGraphRunner(fn, eligible=no_frame_normalizer, max_graphs=max_graphs, pool=pool)
        model.__dict__[name] = Accelerated(model, name, fn, options)
    return model
