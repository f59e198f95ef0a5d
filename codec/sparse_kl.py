"""The sparse per-layer cache (codec.sparse_cache) for the KL family (SD/SDXL/SD3/FLUX VAEs).

A KL encoder or decoder is cut into the steps that ``SparseNetCache`` runs cell by cell:

- 3x3 convs (conv_in, ResNet convs, conv_out, upsample convs): ``sparse_cache.ConvStep``;
  a ResNet's ``conv2`` adds its skip (the input, or the 1x1 shortcut's output) as the residual;
- GroupNorm(+SiLU) with FROZEN statistics and 1x1 convs (ResNet shortcut, post_quant_conv):
  ``sparse_norm.NormStep`` and ``sparse_norm.PointwiseStep``, per cell with no halo;
- the encoder's downsample (:class:`DownsampleStep`: right/bottom zero pad then a 3x3 stride-2
  conv): an output cell reads its input cell and one px beyond its right/bottom edge;
- the mid-block attention (:class:`AttentionStep`): recomputed densely on the whole frame every
  frame (at the latent resolution: global, cheap next to the full-resolution convs), with its
  GroupNorm's statistics frozen too, and merged cell by cell (``SparseNetCache._merge_dense``);
- the posterior mean (:class:`MeanStep`, what ``Autoencoder.encode`` returns): the first C
  outputs of quant_conv, or the first C channels of conv_out without quant convs.

The frozen statistics and their check (a refresh when a GroupNorm's input statistics move beyond
tolerance) are ``codec.sparse_norm``'s, which taef2's GroupNorm blocks use too.

FLOPs counted: convolutions and the attention's projections and matmuls (multiply-adds x 2);
GroupNorm and additions are left out (a few per element against hundreds for a conv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models.kl import Attention, Decoder, Downsample, Encoder, ResnetBlock, Upsample
from .models.layers import GroupNormAct, frame_normalizer
from .sparse_cache import ConvStep, NormBlockStep, Unsupported, _check_conv
from .sparse_norm import CellStep, FrozenStats, NormNetCache, NormStep, PointwiseStep


@dataclass(frozen=True)
class KLPath:
    """One direction of a KL model as the cache runs it: the Encoder then ``quant`` (quant_conv),
    or ``quant`` (post_quant_conv) then the Decoder; None when the model has none (SD3, FLUX).
    ``rows`` x ``cols`` cells per frame (the attention's cost depends on the frame size)."""

    net: Encoder | Decoder
    quant: nn.Conv2d | None
    rows: int
    cols: int


@dataclass
class MeanStep(CellStep):
    """The posterior mean (``Autoencoder._encode_raw`` with ``sample=False``): the first
    ``channels`` outputs of ``quant`` (1x1) over the moments, or the first ``channels`` moments
    when the model has no quant_conv (SD3, FLUX). The log-variance is never computed."""

    quant: nn.Conv2d | None
    channels: int

    def flops_per_cell(self) -> int:
        if self.quant is None:
            return 0
        return 2 * self.channels * self.quant.in_channels * self.scale_out ** 2

    def dense(self, x: torch.Tensor, res) -> torch.Tensor:
        if self.quant is None:
            return x[:, :self.channels]
        c = self.channels
        return F.conv2d(x, self.quant.weight[:c], self.quant.bias[:c])


@dataclass
class DownsampleStep(CellStep):
    """SD's downsample: zero pad right/bottom by one px, then a 3x3 stride-2 conv, no padding.

    Output px i reads input px 2i .. 2i+2, so an output cell (s_out px) reads its input cell (2
    s_out px) and one px beyond its right/bottom edge, nothing left/top: of the gathered patch
    (one px of halo all round, zeros outside the frame) the first row and column are dropped.
    """

    conv: nn.Conv2d
    halo = 1
    zero_pad = True  # the dense path pads zeros (right/bottom: the only side it reads beyond)

    def flops_per_cell(self) -> int:
        return 2 * self.conv.weight.numel() * self.scale_out ** 2

    def dense(self, x: torch.Tensor, res) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # as Downsample.forward

    def packed(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.permute(0, 3, 1, 2)[:, :, 1:, 1:]
        return F.conv2d(x, self.conv.weight, self.conv.bias, stride=2).permute(0, 2, 3, 1)


@dataclass
class AttentionStep(NormBlockStep):
    """The mid-block self-attention (its residual included) on the whole frame, with its
    GroupNorm's statistics frozen: recomputed densely every frame and merged cell by cell
    (``SparseNetCache._merge_dense``, as for every ``NormBlockStep``). ``block``: the Attention;
    ``tokens``: pixels of the frame at its resolution (the matmuls' cost per pixel)."""

    tokens: int = 0
    stats: FrozenStats | None = None

    def flops_per_cell(self) -> int:
        c = self.block.to_q.in_features
        per_px = 4 * c * c + 2 * self.tokens * c  # q, k, v, out projections; q k^T and a v
        return 2 * per_px * self.scale_out ** 2

    def dense(self, x: torch.Tensor, res) -> torch.Tensor:
        # the model's own Attention.forward, its GroupNorm through the frozen statistics
        with frame_normalizer(lambda name, layer, t: self.stats.apply(t), self.block):
            return self.block(x)


class _Plan:
    """Steps appended one by one; buffer 0 is the network input."""

    def __init__(self, in_channels: int, scale: int):
        self.steps: list = []
        self.channels = [in_channels]
        self.cur, self.scale = 0, scale

    def add(self, make, out_channels: int, src: int | None = None, scale_out: int | None = None, **kw) -> int:
        """Append ``make(src=, dst=, scale_in=, scale_out=, **kw)`` writing a buffer of
        ``out_channels``; it becomes the current buffer."""
        src = self.cur if src is None else src
        s_out = self.scale if scale_out is None else scale_out
        self.steps.append(make(src=src, dst=len(self.channels), scale_in=self.scale, scale_out=s_out, **kw))
        self.channels.append(out_channels)
        self.cur, self.scale = len(self.channels) - 1, s_out
        return self.cur

    def conv(self, conv: nn.Conv2d, **kw) -> int:
        _check_conv(conv)
        return self.add(ConvStep, conv.out_channels, conv=conv, **kw)

    def norm(self, norm: GroupNormAct) -> int:
        if not isinstance(norm, GroupNormAct):
            raise Unsupported(f"sparse cache: norm layer {type(norm).__name__} is not supported")
        return self.add(NormStep, norm.num_channels, stats=FrozenStats(norm))

    def resnet(self, r: nn.Module) -> None:
        if not isinstance(r, ResnetBlock):
            raise Unsupported(f"sparse cache: layer {type(r).__name__} is not a KL ResnetBlock")
        x = self.cur
        self.norm(r.norm1)
        self.conv(r.conv1)
        h = self.norm(r.norm2)
        skip = x
        if r.conv_shortcut is not None:
            skip = self.add(PointwiseStep, r.conv_shortcut.out_channels, src=x, conv=r.conv_shortcut)
        self.conv(r.conv2, src=h, residual=skip)  # h + shortcut(x), as ResnetBlock.forward

    def mid(self, m: nn.Module, rows: int, cols: int) -> None:
        self.resnet(m.resnets[0])
        if m.attentions is not None:
            a = m.attentions[0]
            if not isinstance(a, Attention):
                raise Unsupported(f"sparse cache: attention {type(a).__name__} is not supported")
            self.add(AttentionStep, a.to_q.in_features, block=a, stats=FrozenStats(a.group_norm),
                     tokens=rows * cols * self.scale ** 2)
        self.resnet(m.resnets[1])


def plan_kl_steps(path: KLPath, scale: int) -> tuple[list, list[int]]:
    """The steps of a KL encoder (``scale`` 8: px per cell of the input) or decoder (``scale`` 1)
    and the channel count of each buffer (buffer 0 is the network input): the order
    ``Encoder.forward`` / ``Decoder.forward`` run them in. Raises :class:`Unsupported`."""
    net = path.net
    if isinstance(net, Encoder):
        p = _Plan(net.conv_in.in_channels, scale)
        p.conv(net.conv_in)
        for stage in net.down_blocks:
            for r in stage.resnets:
                p.resnet(r)
            for d in getattr(stage, "downsamplers", None) or ():
                if not isinstance(d, Downsample) or p.scale % 2:
                    raise Unsupported(f"sparse cache: downsample {d} at {p.scale} px per cell")
                p.add(DownsampleStep, d.conv.out_channels, scale_out=p.scale // 2, conv=d.conv)
        p.mid(net.mid_block, path.rows, path.cols)
        p.norm(net.conv_norm_out)
        p.conv(net.conv_out)
        moments = net.conv_out.out_channels
        if path.quant is not None and (path.quant.kernel_size != (1, 1) or path.quant.in_channels != moments):
            raise Unsupported(f"sparse cache: quant_conv {path.quant} is not a 1x1 conv over the moments")
        p.add(MeanStep, moments // 2, quant=path.quant, channels=moments // 2)
    elif isinstance(net, Decoder):
        p = _Plan(net.conv_in.in_channels, scale)
        if path.quant is not None:
            if path.quant.kernel_size != (1, 1):
                raise Unsupported(f"sparse cache: post_quant_conv {path.quant} is not a 1x1 conv")
            p.add(PointwiseStep, path.quant.out_channels, conv=path.quant)
        p.conv(net.conv_in)
        p.mid(net.mid_block, path.rows, path.cols)
        for stage in net.up_blocks:
            for r in stage.resnets:
                p.resnet(r)
            for u in getattr(stage, "upsamplers", None) or ():
                if not isinstance(u, Upsample):
                    raise Unsupported(f"sparse cache: upsample {type(u).__name__} is not supported")
                p.conv(u.conv, upsample=True, scale_out=p.scale * 2)
        p.norm(net.conv_norm_out)
        p.conv(net.conv_out)
    else:
        raise Unsupported(f"sparse cache: {type(net).__name__} is not a KL Encoder or Decoder")
    return p.steps, p.channels


class KLNetCache(NormNetCache):
    """``NormNetCache`` over a :class:`KLPath`: its GroupNorms and the attention's keep the
    statistics of the last refresh while they stay within tolerance (``codec.sparse_norm``)."""

    def __init__(self, path: KLPath, scale: int, threshold: float | None, device: torch.device,
                 sync_free: bool = False):
        super().__init__(path, scale, path.rows, path.cols, threshold, device, sync_free)

    def memory_bytes(self, element_size: int) -> int:
        """The cached activations, plus the attention matrix a dense pass may materialize on the
        CPU (tokens x tokens fp32, as ``tiling.activation_bytes`` counts it; CUDA's does not)."""
        attn = sum(4 * st.tokens ** 2 for st in self.steps if isinstance(st, AttentionStep))
        return super().memory_bytes(element_size) + (attn if self.device.type == "cpu" else 0)


def kl_net_cache(model, decode: bool, scale: int, rows: int, cols: int, threshold: float | None,
                 sync_free: bool = False) -> KLNetCache:
    """The cache of one direction of a KL ``Autoencoder`` over rows x cols cells of ``scale`` px:
    the encoder (input (1, 3, H, W) in [-1, 1], output the unscaled posterior mean) or the decoder
    (input the unscaled latents, output images nominally [-1, 1]). ``sync_free``: the device
    decision path (``SparseNetCache``)."""
    path = (KLPath(model.decoder, model.post_quant_conv, rows, cols) if decode
            else KLPath(model.encoder, model.quant_conv, rows, cols))
    return KLNetCache(path, scale, threshold, model.device, sync_free)
