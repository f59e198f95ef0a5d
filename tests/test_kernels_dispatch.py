"""The dispatch rule: which calls reach the Triton launchers and which the torch reference."""

import importlib
import warnings

import pytest
import torch
from triton.runtime.errors import OutOfResources

import kernels
from kernels import _dispatch as dispatch

# Every Triton kernel object, by module; replaced by Boom so a launch is detectable.
LAUNCHERS = {
    "kernels.group_norm": ["_gn_stats_kernel", "_gn_apply_kernel"],
    "kernels.frames": ["_to_input_kernel", "_to_frames_kernel"],
    "kernels.tile_change": ["_tile_change_kernel"],
    "kernels.blend": ["_blend_scatter_kernel"],
    "kernels.rms_norm": ["_rms_norm_kernel"],
}


class Launched(Exception):
    pass


class Boom:
    def __getitem__(self, grid):
        raise Launched


@pytest.fixture
def boom(monkeypatch):
    for module, names in LAUNCHERS.items():
        mod = importlib.import_module(module)
        for name in names:
            monkeypatch.setattr(mod, name, Boom())


def _calls(reference=False):
    x = torch.randn(1, 6, 2, 3, generator=torch.Generator().manual_seed(0))
    frames = torch.zeros(1, 2, 3, 3, dtype=torch.uint8)
    tiles = torch.zeros(2, 3, 2, 2)
    mean, rstd = torch.zeros(1, 3), torch.ones(1, 3)
    return [
        lambda: kernels.group_norm(x, 3, act="silu", reference=reference),
        lambda: kernels.group_norm_stats(x, 3, reference=reference),
        lambda: kernels.group_norm_apply(x, mean, rstd, 3, reference=reference),
        lambda: kernels.frames_to_input(frames, reference=reference),
        lambda: kernels.output_to_frames(x[:, :3], reference=reference),
        lambda: kernels.tile_change(tiles, tiles, reference=reference),
        lambda: kernels.blend_tiles(tiles, torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 2),
                                    (1, 3, 2, 2), reference=reference),
        lambda: kernels.rms_norm(x, torch.ones(6), "silu", reference=reference),
    ]


def test_interpreter_sends_cpu_tensors_to_triton(boom):
    assert kernels.interpreting()
    for call in _calls():
        with pytest.raises(Launched):
            call()


def test_reference_keyword_forces_torch(boom):
    for call in _calls(reference=True):
        call()


def test_force_reference_context(boom):
    with kernels.force_reference():
        for call in _calls():
            call()
    assert not kernels.reference_forced()


def test_environment_switch(boom, monkeypatch):
    monkeypatch.setenv("CODEC_KERNELS", "reference")
    for call in _calls():
        call()


def test_cpu_without_interpreter_goes_to_reference(boom, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels.use_triton(torch.zeros(1))
    for call in _calls():
        call()


class NoResources:
    """A kernel that the GPU cannot launch (too much shared memory), counting its launches."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise OutOfResources(232448, 101376, "shared memory")
        return launch


def test_a_kernel_triton_cannot_launch_falls_back_to_its_reference(monkeypatch):
    monkeypatch.setattr(dispatch, "_unusable", {})
    broken = {}
    for module, names in LAUNCHERS.items():
        mod = importlib.import_module(module)
        for name in names:
            broken[name] = NoResources()
            monkeypatch.setattr(mod, name, broken[name])
    expected = [call() for call in _calls(reference=True)]
    with pytest.warns(RuntimeWarning, match="Triton cannot run it here .*OutOfResources"):
        first = [call() for call in _calls()]
    launches = sum(k.launches for k in broken.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per kernel, not per call
        second = [call() for call in _calls()]
    assert sum(k.launches for k in broken.values()) == launches  # no second try
    assert set(kernels.unusable_kernels()) == {"group_norm", "group_norm_stats", "group_norm_apply",
                                               "frames_to_input", "output_to_frames", "tile_change",
                                               "blend_tiles", "rms_norm"}
    for want, a, b in zip(expected, first, second):
        for w, x, y in zip(*(v if isinstance(v, tuple) else (v,) for v in (want, a, b))):
            torch.testing.assert_close(x, w, rtol=0, atol=0)
            torch.testing.assert_close(y, w, rtol=0, atol=0)


def test_other_errors_are_not_swallowed(monkeypatch):
    monkeypatch.setattr(dispatch, "_unusable", {})
    with pytest.raises(ZeroDivisionError):
        dispatch.launch_or_fallback("k", lambda: 1 / 0, lambda: 0)
    assert "k" not in kernels.unusable_kernels()
    assert dispatch.triton_ready("k", torch.zeros(1))


class GridSpy:
    """Wraps a Triton kernel object, recording the grid of every launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


def test_every_launcher_loops_within_a_capped_grid(monkeypatch):
    """With the grid capped at 2 programs every kernel loops over its units of work (the path that
    keeps any frame size within CUDA's grid limits) and still matches its reference."""
    spies = {}
    for module, names in LAUNCHERS.items():
        mod = importlib.import_module(module)
        for name in names:
            spies[name] = GridSpy(getattr(mod, name))
            monkeypatch.setattr(mod, name, spies[name])
    monkeypatch.setattr(dispatch, "MAX_PROGRAMS", 2)
    monkeypatch.setattr(dispatch, "_unusable", {})
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 5, 7, generator=g)
    frames = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8, generator=g)
    tiles = torch.rand(3, 2, 4, 5, generator=g)
    origins = torch.tensor([[0, 0, 0], [0, 1, 2], [1, 0, 1]])
    window = torch.rand(4, 5, generator=g) + 0.1
    gamma = torch.rand(3, generator=g)
    calls = [
        lambda ref: kernels.group_norm(x, 3, act="silu", reference=ref),
        lambda ref: kernels.frames_to_input(frames, size=(6, 9), reference=ref),
        lambda ref: kernels.output_to_frames(x[:, :3], reference=ref),
        lambda ref: kernels.tile_change(tiles, tiles.flip(0), reference=ref),
        lambda ref: kernels.blend_tiles(tiles, origins, window, (2, 2, 6, 8), reference=ref),
        lambda ref: kernels.rms_norm(x.reshape(4, 3, 5, 7), gamma, "silu", reference=ref),  # 4 units
    ]
    for call in calls:
        for got, want in zip(*(v if isinstance(v, tuple) else (v,) for v in (call(False), call(True)))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, spy in spies.items():
        assert spy.grids and all(grid == (2,) for grid in spy.grids), (name, spy.grids)
    assert not kernels.unusable_kernels()


def test_a_launch_the_driver_refuses_falls_back(monkeypatch):
    """A grid over the device's limits fails at launch with Triton's RuntimeError text."""
    monkeypatch.setattr(dispatch, "_unusable", {})

    def refused():
        raise RuntimeError("Triton Error [CUDA]: invalid argument")

    with pytest.warns(RuntimeWarning, match="invalid argument"):
        assert dispatch.launch_or_fallback("k2", refused, lambda: "reference") == "reference"
    assert "k2" in kernels.unusable_kernels()
    assert not dispatch.triton_ready("k2", torch.zeros(1))  # later calls no longer reach the op
    with pytest.raises(RuntimeError, match="out of memory"):  # other runtime errors propagate
        dispatch.launch_or_fallback("k3", lambda: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")),
                                    lambda: 0)
    assert "k3" not in kernels.unusable_kernels()
