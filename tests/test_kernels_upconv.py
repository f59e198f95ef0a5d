"""Upsample + conv3x3 as one 2x2 convolution on the small input: exact against the reference."""

import pytest
import torch

from kernels.upconv import upsample_conv3x3, upsample_conv3x3_reference


@pytest.mark.parametrize("shape,cout,bias,cl", [((2, 5, 7, 9), 6, True, False), ((1, 3, 1, 1), 4, False, False),
                                                 ((1, 8, 6, 5), 8, True, True)])
def test_upconv_matches_reference_fp32(shape, cout, bias, cl):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(cout, shape[1], 3, 3, dtype=torch.float64)
    b = torch.randn(cout, dtype=torch.float64) if bias else None
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    got = upsample_conv3x3(x, w, b)
    want = upsample_conv3x3_reference(x, w, b)
    assert got.shape == want.shape == (shape[0], cout, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # exact up to summation order
    assert got.is_contiguous(memory_format=torch.channels_last) == cl or shape[2:] == (1, 1)


def test_upconv_fp32_relative_error():
    torch.manual_seed(1)
    x, w = torch.randn(1, 16, 12, 10), torch.randn(16, 16, 3, 3)
    want = upsample_conv3x3_reference(x.double(), w.double())
    got = upsample_conv3x3(x, w)
    assert ((got.double() - want).norm() / want.norm()) < 1e-6
