"""Wan 2.1 / 2.2 causal video VAE, parameter names as in diffusers' ``AutoencoderKLWan`` layout.

Video tensors are (N, C, T, H, W). Every temporal operation is causal, so a clip can be fed in
chunks of any length and gives the same result as one call: the layers that look back in time
keep what they need in a ``state`` dict (module -> carried tensor), one dict per stream (per
clip, or per spatial tile of a clip). What each layer carries:

- ``CausalConv3d``: the last ``k_t - 1`` (two) input frames; a fresh stream starts from zeros.
- ``Downsample`` (temporal): the first frame of a stream passes through on its own; after it,
  each output frame is a stride-2 conv over three frames, so it carries the last frame it used
  and any frame still waiting for its partner.
- ``AvgDown`` (2.2 shortcut): averages frame pairs of the stream prefixed by one zero frame.
- ``Upsample`` (temporal): the first frame of a stream stays one frame; every later frame becomes
  two, from a causal conv (with its own two-frame cache) that starts at the second frame.
- ``DupUp`` (2.2 shortcut): the same one-then-two rule, by duplicating channels.

Encoder: [patchify 2x2 (2.2)] -> conv_in -> down stages (residual blocks, spatial / temporal
downsampling) -> mid block (res, per-frame attention, res) -> RMS norm + SiLU -> conv_out
(2C: mean and log-variance) -> quant_conv. Frames 1 + 4k give 1 + k latent frames. The decoder
mirrors it; one latent frame gives 1 frame (the first) or 4, clamped to [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import WanConfig

State = dict  # module -> the tensor(s) it carries from one chunk of a stream to the next


def empty_frames(x: torch.Tensor) -> bool:
    return x.shape[2] == 0


class CausalConv3d(nn.Conv3d):
    """3D conv, zero-padded in space, causal in time: output frame t sees input frames <= t.

    The ``k_t - 1`` frames before a chunk come from the stream's state (zeros at its start).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int, int] = 3):
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(c_in, c_out, (kt, kh, kw), padding=(0, kh // 2, kw // 2))
        self.context = kt - 1

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        if self.context:
            past = state.get(self)
            if past is None:
                past = x.new_zeros(*x.shape[:2], self.context, *x.shape[3:])
            x = torch.cat([past, x], dim=2)
            state[self] = x[:, :, -self.context:].clone()  # a copy: the chunk itself is freed
        return super().forward(x)


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma, per position (no statistics across space or time,
    so tiles need nothing global), with an optional fused SiLU (``kernels.rms_norm``: a Triton
    kernel on CUDA, its torch reference elsewhere). Half precision is normalized in fp32."""

    def __init__(self, c: int, images: bool = False, act: str | None = None):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(c, 1, 1) if images else torch.ones(c, 1, 1, 1))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.gamma, self.act)


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = RMSNorm(c_in, act="silu")
        self.conv1 = CausalConv3d(c_in, c_out)
        self.norm2 = RMSNorm(c_out, act="silu")
        self.conv2 = CausalConv3d(c_out, c_out)
        self.conv_shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        h = self.conv_shortcut(x, state) if self.conv_shortcut is not None else x
        x = self.conv1(self.norm1(x), state)
        x = self.conv2(self.norm2(x), state)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (no attention across time)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = RMSNorm(c, images=True)
        self.to_qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        n, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(n * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)  # (NT, HW, 3C)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (NT, HW, C)
        a = self.proj(a.transpose(1, 2).reshape(n * t, c, h, w))
        return x + a.reshape(n, t, c, h, w).transpose(1, 2)


def per_frame(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D ``layer`` to every frame of (N, C, T, H, W)."""
    n, _, t = x.shape[:3]
    y = layer(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (n, t)).transpose(1, 2)


class Downsample(nn.Module):
    """Stride-2 3x3 conv per frame (padded right/bottom); with ``temporal``, then a stride-2
    conv over time (see the module docstring for its first-frame rule)."""

    def __init__(self, c: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2))
        self.time_conv = nn.Conv3d(c, c, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        x = per_frame(self.resample, x)
        if self.time_conv is None:
            return x
        first = None
        if self not in state:  # the stream's first frame passes on its own
            first, x = x[:, :, :1], x[:, :, 1:]
            state[self] = first
        frames = torch.cat([state[self], x], dim=2)  # the last frame used, then new ones
        pairs = (frames.shape[2] - 1) // 2
        state[self] = frames[:, :, 2 * pairs:].clone()
        out = self.time_conv(frames[:, :, :2 * pairs + 1]) if pairs else frames[:, :, :0]
        return out if first is None else torch.cat([first, out], dim=2)


class Upsample(nn.Module):
    """Nearest 2x then a 3x3 conv per frame; with ``temporal``, each frame after the stream's
    first is first doubled in time by a causal conv that emits two frames' channels."""

    def __init__(self, c: int, c_out: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                      nn.Conv2d(c, c_out, 3, padding=1))
        self.time_conv = CausalConv3d(c, 2 * c, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        if self.time_conv is not None:
            first = None
            if self not in state:
                first, x = x[:, :, :1], x[:, :, 1:]
                state[self] = True
            if not empty_frames(x):
                n, c, t, h, w = x.shape
                y = self.time_conv(x, state).view(n, 2, c, t, h, w)
                x = y.permute(0, 2, 3, 1, 4, 5).reshape(n, c, 2 * t, h, w)  # frame-major pairs
            x = x if first is None else torch.cat([first, x], dim=2)
        return per_frame(self.resample, x)


class AvgDown(nn.Module):
    """2.2's parameter-free shortcut: space-to-channel by ``fs`` and time-to-channel by ``ft``
    (the stream prefixed by ft - 1 zero frames), then the mean over groups of channels."""

    def __init__(self, c_in: int, c_out: int, ft: int, fs: int):
        super().__init__()
        if c_in * ft * fs * fs % c_out:
            raise ValueError(f"AvgDown: {c_in} channels x {ft * fs * fs} do not divide into {c_out}")
        self.c_out, self.ft, self.fs = c_out, ft, fs

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        if ft > 1:
            past = state.get(self)
            if past is None:
                past = x.new_zeros(*x.shape[:2], ft - 1, *x.shape[3:])
            x = torch.cat([past, x], dim=2)
            used = x.shape[2] // ft * ft
            state[self] = x[:, :, used:].clone()
            x = x[:, :, :used]
        n, c, t, h, w = x.shape
        x = x.view(n, c, t // ft, ft, h // fs, fs, w // fs, fs)
        group = c * ft * fs * fs // self.c_out
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(n, self.c_out, group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp(nn.Module):
    """2.2's parameter-free shortcut, the inverse arrangement of AvgDown: channels repeated, then
    moved to space (``fs``) and time (``ft``); the stream's first frame keeps its last copy only."""

    def __init__(self, c_in: int, c_out: int, ft: int, fs: int):
        super().__init__()
        if c_out * ft * fs * fs % c_in:
            raise ValueError(f"DupUp: {c_out} channels x {ft * fs * fs} are not a multiple of {c_in}")
        self.repeats = c_out * ft * fs * fs // c_in
        self.c_out, self.ft, self.fs = c_out, ft, fs

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        n, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(n, self.c_out, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(n, self.c_out, t * ft, h * fs, w * fs)
        if self not in state:
            state[self] = True
            x = x[:, :, ft - 1:]
        return x


class MidBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(c, c), ResidualBlock(c, c)])
        self.attentions = nn.ModuleList([AttentionBlock(c)])

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        x = self.resnets[0](x, state)
        x = self.attentions[0](x, state)
        return self.resnets[1](x, state)


class DownBlock(nn.Module):
    """2.2: residual blocks and a downsampler, plus the AvgDown shortcut around them."""

    def __init__(self, c_in: int, c_out: int, n: int, down: bool, temporal: bool):
        super().__init__()
        self.avg_shortcut = AvgDown(c_in, c_out, 2 if temporal else 1, 2 if down else 1)
        self.resnets = nn.ModuleList(ResidualBlock(c_in if i == 0 else c_out, c_out) for i in range(n))
        self.downsampler = Downsample(c_out, temporal) if down else None

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        short = self.avg_shortcut(x, state)
        for r in self.resnets:
            x = r(x, state)
        if self.downsampler is not None:
            x = self.downsampler(x, state)
        return x + short  # both paths emit the same frames at the same calls


class UpBlock(nn.Module):
    """2.1: residual blocks then an optional upsampler (halving the channels)."""

    def __init__(self, c_in: int, c_out: int, n: int, up: bool, temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(c_in if i == 0 else c_out, c_out) for i in range(n))
        self.upsamplers = nn.ModuleList([Upsample(c_out, c_out // 2, temporal)]) if up else None

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        for r in self.resnets:
            x = r(x, state)
        return self.upsamplers[0](x, state) if self.upsamplers is not None else x


class ResidualUpBlock(nn.Module):
    """2.2: residual blocks and an upsampler, plus the DupUp shortcut around them."""

    def __init__(self, c_in: int, c_out: int, n: int, up: bool, temporal: bool):
        super().__init__()
        self.avg_shortcut = DupUp(c_in, c_out, 2 if temporal else 1, 2) if up else None
        self.resnets = nn.ModuleList(ResidualBlock(c_in if i == 0 else c_out, c_out) for i in range(n))
        self.upsampler = Upsample(c_out, c_out, temporal) if up else None

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        short = self.avg_shortcut(x, state) if self.avg_shortcut is not None else None
        for r in self.resnets:
            x = r(x, state)
        if self.upsampler is not None:
            x = self.upsampler(x, state)
        return x if short is None else x + short


class Encoder(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv_in = CausalConv3d(3 * cfg.patch_size**2, dims[0])
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            down, temporal = i != last, i != last and cfg.temperal_downsample[i]
            if cfg.is_residual:
                blocks.append(DownBlock(c_in, c_out, cfg.num_res_blocks, down, temporal))
                continue
            for j in range(cfg.num_res_blocks):  # 2.1: one flat list of blocks
                blocks.append(ResidualBlock(c_in if j == 0 else c_out, c_out))
            if down:
                blocks.append(Downsample(c_out, temporal))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1], act="silu")
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor | None:
        """None when the chunk completes no latent frame yet (frames wait in the state)."""
        x = self.conv_in(x, state)
        for block in self.down_blocks:
            x = block(x, state)
            if empty_frames(x):
                return None
        x = self.mid_block(x, state)
        return self.conv_out(self.norm_out(x), state)


class Decoder(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.decoder_dim * m for m in (mult[-1], *reversed(mult))]
        temporal_up = tuple(reversed(cfg.temperal_downsample))
        last = len(mult) - 1
        self.conv_in = CausalConv3d(cfg.latent_channels, dims[0])
        self.mid_block = MidBlock(dims[0])
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            up, temporal = i != last, i != last and temporal_up[i]
            if cfg.is_residual:
                blocks.append(ResidualUpBlock(c_in, c_out, cfg.num_res_blocks + 1, up, temporal))
            else:  # 2.1's upsamplers halve the channels, so later blocks start at half width
                blocks.append(UpBlock(c_in // 2 if i > 0 else c_in, c_out, cfg.num_res_blocks + 1, up, temporal))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1], act="silu")
        self.conv_out = CausalConv3d(dims[-1], 3 * cfg.patch_size**2)

    def forward(self, z: torch.Tensor, state: State) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z, state), state)
        for block in self.up_blocks:
            x = block(x, state)
        return self.conv_out(self.norm_out(x), state)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, T, H, W) -> (N, C*p*p, T, H/p, W/p); channel index c*p*p + col*p + row (Wan's order)."""
    if p == 1:
        return x
    n, c, t, h, w = x.shape
    x = x.view(n, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(n, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of :func:`patchify`."""
    if p == 1:
        return x
    n, cpp, t, h, w = x.shape
    x = x.view(n, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(n, cpp // (p * p), t, h * p, w * p)


class WanNetwork(nn.Module):
    """The raw network on unnormalized latents, one chunk of a stream per call."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        c = cfg.latent_channels
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv3d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv3d(c, c, 1)

    def encode_moments(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x (N, 3, t, H, W) in [-1, 1], the next t frames of the stream -> (mean, logvar), each
        (N, C, t', H/s, W/s) for the latent frames this chunk completes (None if none)."""
        h = self.encoder(patchify(x, self.config.patch_size), state)
        if h is None:
            return None
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_latents(self, z: torch.Tensor, state: State) -> torch.Tensor:
        """z (N, C, t', h, w), the next latent frames of the stream -> (N, 3, t, H, W) clamped to
        [-1, 1]: 1 frame for the stream's first latent frame, ``temporal_factor`` for each later one."""
        x = self.decoder(self.post_quant_conv(z), state)
        return unpatchify(x, self.config.patch_size).clamp(-1.0, 1.0)
