"""The activation-memory estimate, per direction, against the live tensor bytes of real runs."""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from codec.coder import CoderOptions, FrameDecoder, FrameEncoder
from codec.models import build
from codec.models.config import preset
from codec.tiling import WORKSPACE, activation_bytes, plan_tiles


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops create inside the block and that are alive at
    once (a storage counts until the last tensor that views it is gone). Buffers an op allocates
    and frees internally (convolution workspaces) are not seen: WORKSPACE covers them."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.refs:
                    self.refs[key], self.size[key] = 0, storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def measured_peak(fn) -> int:
    fn()  # warm-up: cached folded weights and the like are not activations
    with torch.no_grad(), LiveBytes() as live:
        fn()
    return live.peak


MODELS = {
    "kl": lambda: build("sd15", block_out_channels=(32, 64, 128, 128), norm_num_groups=8,
                        mid_block_add_attention=False),
    "tiny": lambda: build("taesd", width=16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", MODELS)
def test_estimate_bounds_the_measured_peak_of_each_direction(family, dtype):
    torch.manual_seed(0)
    model = MODELS[family]().to(dtype)
    px, f = 256, model.downscale
    x = (torch.rand(1, 3, px, px) * 2 - 1).to(dtype)
    z = torch.randn(1, model.latent_channels, px // f, px // f).to(dtype)
    for decode, fn in ((False, lambda: model.encode(x)), (True, lambda: model.decode(z))):
        live = measured_peak(fn)
        estimate = activation_bytes(model, px * px, dtype, decode=decode)
        ratio = estimate / WORKSPACE / live
        print(f"{family} {dtype} {'decode' if decode else 'encode'}: measured {live / 2**20:.1f} MiB, "
              f"estimate without workspace {estimate / WORKSPACE / 2**20:.1f} MiB ({ratio:.2f}x)")
        assert 0.97 <= ratio <= 1.25, (decode, ratio)  # never short, never far over


def sd(name="sd15"):
    """The real SD-family configs, without building the 80M-parameter networks."""
    cfg = preset(name)
    return SimpleNamespace(config=cfg, downscale=cfg.downscale, device=torch.device("cpu"))


def test_sd_decoder_needs_more_than_its_encoder():
    """Both end at 128 channels at full resolution, but the decoder's last stage reads 256."""
    model, px = sd(), 512 * 512
    enc, dec = (activation_bytes(model, px, torch.float32, decode=d) for d in (False, True))
    assert dec > 1.15 * enc
    assert activation_bytes(model, 4 * px, torch.float32, decode=True) > 3.9 * dec  # ~linear in pixels
    flux = activation_bytes(sd("flux1"), px, torch.float32, decode=True)
    assert flux == pytest.approx(dec, rel=0.01)  # same widths: the latent channels barely count


def test_encoder_and_decoder_are_planned_from_their_own_estimates():
    torch.manual_seed(0)
    model = MODELS["kl"]()
    h, w = 128, 192
    enc_cost, dec_cost = (activation_bytes(model, h * w, torch.float32, decode=d) for d in (False, True))
    budget = (enc_cost + dec_cost) // 2  # a whole frame fits the encoder, not the decoder
    opts = CoderOptions(max_memory=budget, cache="off")
    enc, dec = FrameEncoder(model, h, w, opts), FrameDecoder(model, h, w, opts)
    assert enc.plan.tile is None and dec.plan.tile is not None


@pytest.mark.parametrize("decode", [False, True])
def test_a_planned_batch_fits_its_budget(decode):
    torch.manual_seed(0)
    model = MODELS["kl"]()
    budget = 40 << 20
    plan = plan_tiles(model, 512, 768, budget, torch.float32, decode=decode)
    assert plan.tile is not None and plan.batch >= 1
    (th, tw), f = plan.tile_hw, model.downscale
    if decode:
        z = torch.randn(plan.batch, 4, th // f, tw // f)
        live = measured_peak(lambda: model.decode(z))
    else:
        x = torch.rand(plan.batch, 3, th, tw) * 2 - 1
        live = measured_peak(lambda: model.encode(x))
    print(f"{'decode' if decode else 'encode'} plan {plan}: measured {live / 2**20:.1f} MiB of {budget >> 20} MiB")
    assert live <= budget


def test_no_tile_fits_says_so_in_one_line():
    model = build("taesd", width=8)
    # A frame smaller than every tile of the ladder: main raised a comparison TypeError here.
    with pytest.raises(ValueError, match=r"too small for one 48x48 frame .*decoder needs about .*--max-memory"):
        plan_tiles(model, 48, 48, 1000, torch.float32, decode=True)
    with pytest.raises(ValueError, match=r"\(1000 bytes\) is too small for one 64x64 tile: the encoder"):
        plan_tiles(model, 720, 1280, 1000, torch.float32, decode=False)
    with pytest.raises(ValueError, match=r"too small for one \d+x\d+ tile"):  # the smallest of at most 256 px
        plan_tiles(model, 720, 1280, 1000, torch.float32, decode=False, tile=256)
