"""Tile blending and ramp windows against the reference and simple facts."""

import pytest
import torch

import kernels


def _case(tile_dtype=torch.float32, per_tile_window=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    tiles = torch.randn(6, 3, 4, 6, generator=g).to(tile_dtype)
    # Overlapping tiles in two frames; some stick out past the bottom/right (and top/left) edge.
    origins = torch.tensor([[0, 0, 0], [0, 0, 4], [0, 3, 0], [0, 3, 4], [1, -1, 5], [1, 2, 7]])
    window = kernels.ramp_window(4, 6, 2, 3)
    if per_tile_window:
        window = window * (1 + torch.rand(6, 1, 1, generator=g))
    return tiles, origins, window, (2, 3, 7, 9)


@pytest.mark.parametrize("per_tile_window", [False, True])
@pytest.mark.parametrize("tile_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_blend_matches_reference(tile_dtype, per_tile_window):
    tiles, origins, window, shape = _case(tile_dtype, per_tile_window)
    out = kernels.blend_tiles(tiles, origins, window, shape)
    ref = kernels.blend_tiles(tiles, origins, window, shape, reference=True)
    assert out.shape == shape and out.dtype == torch.float32 and out.is_contiguous()
    # Both compute in float32 from the same inputs; only the order of additions differs.
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_blend_weighted_mean_by_hand():
    tiles = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 4.0)])
    origins = torch.tensor([[0, 0, 0], [0, 1, 1]])
    window = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 3.0)])
    for reference in (False, True):
        out = kernels.blend_tiles(tiles, origins, window, (1, 1, 3, 4), reference=reference)[0, 0]
        want = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 3.25, 4.0, 0.0], [0.0, 4.0, 4.0, 0.0]])
        torch.testing.assert_close(out, want)


def test_blend_constant_tiles_give_constant_canvas():
    tiles = torch.full((4, 2, 5, 5), 0.25)
    origins = torch.tensor([[0, 0, 0], [0, 0, 3], [0, 3, 0], [0, 3, 3]])  # covers 8 x 8 exactly
    out = kernels.blend_tiles(tiles, origins, kernels.ramp_window(5, 5, 2, 2), (1, 2, 8, 8))
    torch.testing.assert_close(out, torch.full((1, 2, 8, 8), 0.25))


def test_ramp_window():
    w = kernels.ramp_window(6, 8, 3, 2, edges=(True, False, False, True))
    assert w.shape == (6, 8) and w.dtype == torch.float32
    assert w.min() > 0 and w.max() <= 1
    assert torch.equal(w[0], w[1]) and torch.equal(w[:, -1], w[:, -2])  # flat on border sides
    assert w[-1, 0] < w[-2, 1] < w[2, 3] == 1.0  # ramps down to the sides with neighbours
    # Facing ramps of two neighbours sum to one across the overlap.
    a = kernels.ramp_window(1, 8, 0, 3, edges=(True, True, True, False))[0, -3:]
    b = kernels.ramp_window(1, 8, 0, 3, edges=(True, True, False, True))[0, :3]
    torch.testing.assert_close(a + b, torch.ones(3))
    assert torch.equal(kernels.ramp_window(3, 3, 0, 0), torch.ones(3, 3))
