"""Per-tile change (max and mean |a - b|) against its reference and plain torch."""

import pytest
import torch

import kernels


def _plain(a, b):
    d = (a.double() - b.double()).abs().reshape(a.shape[0], -1)
    return d.amax(1), d.mean(1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 3, 5, 7), (5, 17), (4,), (2, 4, 33, 65)], ids=str)
def test_tile_change(shape, dtype):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        a = torch.randint(0, 256, shape, generator=g, dtype=dtype)
        b = torch.randint(0, 256, shape, generator=g, dtype=dtype)
    else:
        a = torch.randn(shape, generator=g).to(dtype)
        b = (a.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    mx, mean = kernels.tile_change(a, b)
    rmx, rmean = kernels.tile_change(a, b, reference=True)
    assert mx.shape == mean.shape == (shape[0],) and mx.dtype == mean.dtype == torch.float32
    assert torch.equal(mx, rmx)  # max of exact differences: no rounding to disagree on
    torch.testing.assert_close(mean, rmean, rtol=1e-6, atol=1e-7)
    pmx, pmean = _plain(a, b)
    torch.testing.assert_close(mx.double(), pmx, rtol=1e-7, atol=0)
    torch.testing.assert_close(mean.double(), pmean, rtol=1e-6, atol=1e-7)


def test_uint8_does_not_wrap():
    a = torch.tensor([[0, 255, 10], [7, 7, 7]], dtype=torch.uint8)
    b = torch.tensor([[255, 0, 10], [7, 7, 7]], dtype=torch.uint8)
    for reference in (False, True):
        mx, mean = kernels.tile_change(a, b, reference=reference)
        assert mx.tolist() == [255.0, 0.0] and mean.tolist() == [170.0, 0.0]


def test_many_tiles_strided_input():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (9, 3, 8, 12), generator=g, dtype=torch.uint8)[..., ::2]  # not contiguous
    b = torch.randint(0, 256, (9, 3, 8, 6), generator=g, dtype=torch.uint8)
    for got, want in zip(kernels.tile_change(a, b), kernels.tile_change(a, b, reference=True)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_mismatch_raises():
    with pytest.raises(ValueError):
        kernels.tile_change(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        kernels.tile_change(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16))
