"""uint8 frames <-> model tensors: kernels against their references and plain torch."""

import pytest
import torch
import torch.nn.functional as F

import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INPUT_CASES = [(1, 1, 1, (3, 2)), (3, 5, 7, None), (2, 5, 7, (8, 9)), (1, 4, 3, (4, 6))]
OUTPUT_CASES = [(1, 1, 1, None), (3, 5, 7, None), (2, 8, 9, (5, 7)), (1, 4, 6, (1, 6))]


def interpreter_cast(t, dtype):
    """float32 -> dtype as the kernel stores it here: the interpreter truncates to bfloat16."""
    if dtype == torch.bfloat16 and kernels.interpreting():
        return (t.view(torch.int32) & -65536).view(torch.float32).bfloat16()
    return t.to(dtype)


def _frames(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)
    f[0, 0, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)  # both ends and the middle
    return f


def _plain_input(frames, h2, w2):
    x = (frames.double() / 127.5 - 1).permute(0, 3, 1, 2)
    h, w = frames.shape[1:3]
    return F.pad(x, (0, w2 - w, 0, h2 - h), mode="replicate")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,h,w,size", INPUT_CASES)
def test_frames_to_input(n, h, w, size, dtype, channels_last):
    frames = _frames(n, h, w)
    out = kernels.frames_to_input(frames, size=size, dtype=dtype, channels_last=channels_last)
    ref = kernels.frames_to_input(frames, size=size, dtype=dtype, channels_last=channels_last, reference=True)
    h2, w2 = size or (h, w)
    assert out.shape == (n, 3, h2, w2) and out.dtype == dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and ref.is_contiguous(memory_format=fmt)
    ref32 = kernels.frames_to_input(frames, size=size, reference=True)
    assert torch.equal(out, interpreter_cast(ref32, dtype))
    assert torch.equal(ref, ref32.to(dtype))
    # Within one float32 ulp of v / 127.5 - 1 with edge padding, and exact at both ends.
    torch.testing.assert_close(ref32.double(), _plain_input(frames, h2, w2), rtol=0, atol=1.2e-7)
    assert ref32.min() >= -1 and ref32.max() <= 1


def test_frames_to_input_strided_source():
    frames = _frames(2, 6, 10)[:, ::2, 1::3]  # non-contiguous view, like a crop of a decoded frame
    out = kernels.frames_to_input(frames, size=(4, 5))
    assert torch.equal(out, kernels.frames_to_input(frames.contiguous(), size=(4, 5), reference=True))


def _model_output(n, h, w, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 2.6 - 1.3  # past both clamps
    # Values whose scaled form lands exactly on k + 0.5: the round-half-to-even cases.
    halves = (torch.arange(x[0, 0, 0].numel(), dtype=torch.float64) % 255 + 0.5) / 127.5 - 1
    x[0, 0, 0] = halves
    return x.to(dtype)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,h,w,crop", OUTPUT_CASES)
def test_output_to_frames(n, h, w, crop, dtype, channels_last):
    x = _model_output(n, h, w, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    height, width = crop or (h, w)
    out = kernels.output_to_frames(x, *(crop or (None, None)))
    ref = kernels.output_to_frames(x, height, width, reference=True)
    assert out.shape == (n, height, width, 3) and out.dtype == torch.uint8 and out.is_contiguous()
    assert torch.equal(out, ref)
    plain = torch.round((x.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    assert torch.equal(ref, plain[:, :, :height, :width].permute(0, 2, 3, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_lossless(dtype):
    frames = _frames(2, 3, 5, seed=1)
    x = kernels.frames_to_input(frames, size=(4, 8), dtype=dtype, channels_last=True)
    assert torch.equal(kernels.output_to_frames(x, 3, 5), frames)


def test_bad_arguments_raise():
    frames = _frames(1, 4, 4)
    with pytest.raises(ValueError):
        kernels.frames_to_input(frames, size=(3, 4))
    with pytest.raises(TypeError):
        kernels.frames_to_input(frames.float())
    with pytest.raises(ValueError):
        kernels.output_to_frames(torch.zeros(1, 3, 4, 4), 5, 4)
    with pytest.raises(TypeError):
        kernels.output_to_frames(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
