"""Start a tiny autoencoder as an exact linear block codec: PCA of 8x8 patches.

A linear transform of 8x8x3 patches that keeps their 16 principal components already reconstructs
Kodak at about 28.5 dB, while a tiny autoencoder trained from random weights on a CPU for an hour
stays near 22 dB. So ``codec train --pca-init`` builds the network (``resample="shuffle"``, where
pixel (un)shuffle makes block transforms expressible) with weights that compute exactly that codec,
refits its first decoder conv by least squares on 3x3 latent neighbourhoods (overlapped decoding,
less blocking), then trains the residual blocks on top: training starts at a fitted linear codec
instead of at noise.

Only the residual blocks train (``residual_parameters``); the fitted linear path stays fixed.
Measured on the shared training data (48 held crops, width 32, Adam): training everything at
lr 1e-4 took the start from 35.6 dB to 25.8 dB in 50 steps (Adam moves each of the many zero
weights of the linear path by ~lr per step, which adds up to noise at every pixel), and to
29.3 dB when only the linear path trained; the blocks alone, with their hidden convs started 10x
smaller than usual, went from 35.6 to 36.1 dB in 100 steps.

How the ReLU network stays linear: every residual block starts with its last conv at zero (the
block is then the identity on non-negative input), one channel carries the constant 1 through
every stage (the stage convs have no bias; they read their constants from it), and every signed
value travels with a positive offset that the next conv subtracts again. The offsets cover the
values the fitting data produce (with a margin), not every conceivable input: large offsets make
the weights that read them so sensitive that training at a useful learning rate breaks the start.
The block codec's convs use only their centre tap, so its borders behave like the interior (the
overlapped d6 pads by replication). Unused channels start at zero and come alive through the
residual branches during training.

Patch vectors are ordered (colour, row, column); images are in [0, 1] as the tiny encoder sees them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codec.models import Autoencoder, TinyConfig
from codec.models.tiny import Block

BRANCH_INIT_SCALE = 0.1  # residual branches start this much smaller than PyTorch's default init
LATENT_STD = 0.25  # latent std at the start: small enough that the decoder's tanh clamp is ~linear
MARGIN = 1.25  # offsets cover this multiple of the most negative value seen in the fitting data


def residual_parameters(model: Autoencoder) -> list[nn.Parameter]:
    """The parameters of the residual blocks: what trains after a PCA start."""
    return [q for m in model.modules() if isinstance(m, Block) for q in m.parameters()]


def patch_pca(images: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal components of the non-overlapping ``size`` x ``size`` patches of ``images``.

    images: (N, 3, H, W) float in [0, 1], H and W multiples of ``size``.
    Returns (mean (D,), components (D, D) as columns by decreasing variance, variances (D,)),
    float64, D = 3 * size * size, patch vectors ordered (colour, row, column).
    """
    p = _patches(images, size).T  # (L, D), D ordered (c, y, x)
    mean = p.mean(0)
    cov = torch.cov((p - mean).T)
    var, vec = torch.linalg.eigh(cov)
    order = var.argsort(descending=True)
    return mean, vec[:, order], var[order].clamp_min(1e-12)


def _index(c: int, y: int, x: int, size: int) -> int:
    """Position of pixel (colour c, row y, column x) in a size x size patch vector."""
    return (c * size + y) * size + x


def _unshuffled(c: int, dy: int, dx: int) -> int:
    """Channel that ``nn.PixelUnshuffle(2)`` gives input channel c at sub-position (dy, dx)."""
    return c * 4 + dy * 2 + dx


def _centre_conv(conv: nn.Conv2d, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Make ``conv`` compute ``matrix @ input (+ bias)`` per pixel: centre tap only, rest zero."""
    with torch.no_grad():
        conv.weight.zero_()
        rows, cols = matrix.shape
        conv.weight[:rows, :cols, 1, 1] = matrix.to(conv.weight.dtype)
        if conv.bias is not None:
            conv.bias.zero_()
            if bias is not None:
                conv.bias[: len(bias)] = bias.to(conv.bias.dtype)


def _patches(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) -> (D, L) float64: every non-overlapping size x size patch as a column."""
    p = F.unfold(images.double(), size, stride=size)
    return p.transpose(0, 1).reshape(p.shape[1], -1)


def _offset(values: torch.Tensor) -> torch.Tensor:
    """(K, L) values -> (K,) offsets that keep ``MARGIN`` times the most negative one positive."""
    return (-values.amin(1)).clamp(min=0) * MARGIN + 0.02


def pca_autoencoder(images: torch.Tensor, cfg: TinyConfig, overlap: bool = True) -> Autoencoder:
    """A tiny autoencoder (``cfg.resample == "shuffle"``) whose encoder computes the whitened
    top ``cfg.latent_channels`` principal components of each 8x8 patch (times ``LATENT_STD``) and
    whose decoder maps them back: block by block with ``overlap=False`` (then the only losses
    beyond the truncation to ``latent_channels`` components are each 4x4 quarter passing through
    its top ``width - 1`` components and the decoder's tanh clamp), or, by default, reading each
    latent's 3x3 neighbourhood (``_fit_overlapped_decoder``).

    images: (N, 3, H, W) float in [0, 1] (H, W multiples of 8): the data everything is fitted on.
    """
    C, w = cfg.latent_channels, cfg.width
    if cfg.resample != "shuffle" or cfg.midblock_groupnorm:
        raise ValueError("a PCA start needs resample='shuffle' and no middle-block GroupNorm")
    if w < max(C, 12) + 1:
        raise ValueError(f"a PCA start needs width >= {max(C, 12) + 1}, got {w}")
    k4 = min(w - 1, 48)  # components kept per 4x4 quarter (48 = all)
    mu8, u8, var8 = patch_pca(images, 8)
    mu4, p4, _ = patch_pca(images, 4)
    u, p = u8[:, :C], p4[:, :k4]  # (192, C), (48, k4)
    scale = LATENT_STD / var8[:C].sqrt()  # whitening: every latent channel starts with std LATENT_STD
    # Offsets from the values the data produce: 4x4 codes, 8x8 coefficients, reconstructed pixels.
    x4, x8 = _patches(images, 4), _patches(images, 8)
    off4 = _offset(p.T @ (x4 - mu4[:, None]))
    coef = u.T @ (x8 - mu8[:, None])
    off8 = _offset(coef)
    offp = float(_offset((u @ coef + mu8[:, None]).reshape(1, -1))[0])

    model = Autoencoder(cfg).float()
    for m in model.modules():
        if isinstance(m, Block):  # identity on non-negative input
            nn.init.zeros_(m.conv[4].weight)
            nn.init.zeros_(m.conv[4].bias)
            with torch.no_grad():  # small hidden activations: Adam's first steps on conv[4] stay small
                m.conv[0].weight.mul_(BRANCH_INIT_SCALE)
                m.conv[2].weight.mul_(BRANCH_INIT_SCALE)
    enc, dec = model.encoder, model.decoder
    f64 = dict(dtype=torch.float64)

    # Patch reconstruction from the four 4x4 codes: quarter q = (qy, qx) of an 8x8 patch.
    quarters = [(qy, qx) for qy in range(2) for qx in range(2)]

    def quarter_rows(qy, qx):  # indices in the 8x8 vector of quarter (qy, qx), in 4x4 order
        return [_index(c, 4 * qy + y, 4 * qx + x, 8) for c in range(3) for y in range(4) for x in range(4)]

    # ---- encoder --------------------------------------------------------------------------
    # e0: pixels to channels 0-2, the constant to channel 3.
    m0 = torch.zeros(4, 3, **f64)
    m0[:3] = torch.eye(3, **f64)
    _centre_conv(enc[0], m0, torch.tensor([0, 0, 0, 1.0], **f64))
    # e3 (after unshuffle): channel j < 12 is the 2x2 block value of colour j // 4 at sub-position
    # j % 4, exactly the unshuffled order; 12 is the constant. A copy.
    _centre_conv(enc[3], torch.eye(13, **f64))
    # e8 (after unshuffle): 4x4 codes. Input channel of pixel (c, y, x) of the 4x4 block:
    # inner 2x2 position (y % 2, x % 2) chooses the stage-1 channel, outer (y // 2, x // 2) the
    # unshuffled copy.
    gather4 = torch.zeros(48, 4 * 13, **f64)
    for c in range(3):
        for y in range(4):
            for x in range(4):
                inner = _unshuffled(c, y % 2, x % 2)
                gather4[_index(c, y, x, 4), _unshuffled(inner, y // 2, x // 2)] = 1
    const4 = _unshuffled(12, 0, 0)
    m8 = torch.zeros(k4 + 1, 4 * 13, **f64)
    m8[:k4] = p.T @ gather4
    m8[:k4, const4] = off4 - p.T @ mu4
    m8[k4, const4] = 1
    _centre_conv(enc[8], m8)
    # e13 (after unshuffle): 8x8 coefficients from the four codes (code = channel - offset).
    m13 = torch.zeros(C + 1, 4 * (k4 + 1), **f64)
    const8 = _unshuffled(k4, 0, 0)
    shift = -(u.T @ mu8)
    for qy, qx in quarters:
        uq = u[quarter_rows(qy, qx)]  # (48, C): the part of each component on this quarter
        a = uq.T @ p  # (C, k4): coefficient per code entry
        for k in range(k4):
            m13[:C, _unshuffled(k, qy, qx)] = a[:, k]
        shift = shift + uq.T @ mu4 - a @ off4
    m13[:C, const8] = shift + off8
    m13[C, const8] = 1
    _centre_conv(enc[13], m13)
    # e17: latents = scale * (coefficient), offsets removed by the bias.
    _centre_conv(enc[17], torch.diag(scale)[:, :C], -scale * off8)

    # ---- decoder --------------------------------------------------------------------------
    # The decoder uses the encoder's offsets (its codes are those of the reconstruction).
    off8d, off4d = off8, off4
    # d1: coefficients (+ offsets) and the constant; the ReLU after it sees non-negative values.
    m1 = torch.zeros(C + 1, C, **f64)
    m1[:C] = torch.diag(1 / scale)
    b1 = torch.cat([off8d, torch.ones(1, **f64)])
    _centre_conv(dec[1], m1, b1)
    # d6 + shuffle: quarter (qy, qx) gets its 4x4 code: p^T (patch quarter - mu4) + offset.
    m6 = torch.zeros(4 * (k4 + 1), C + 1, **f64)
    for qy, qx in quarters:
        rows = quarter_rows(qy, qx)
        a = p.T @ u[rows]  # (k4, C)
        const = p.T @ (mu8[rows] - mu4) - a @ off8d + off4d
        for k in range(k4):
            m6[_unshuffled(k, qy, qx), :C] = a[k]
            m6[_unshuffled(k, qy, qx), C] = const[k]
        m6[_unshuffled(k4, qy, qx), C] = 1
    _centre_conv(dec[6], m6)
    # d11 + shuffle: 2x2 blocks (values + offset) from the 4x4 code, channel = unshuffled order.
    m11 = torch.zeros(4 * 13, k4 + 1, **f64)
    for c in range(3):
        for y in range(4):
            for x in range(4):
                row = _unshuffled(_unshuffled(c, y % 2, x % 2), y // 2, x // 2)
                i = _index(c, y, x, 4)
                m11[row, :k4] = p[i]
                m11[row, k4] = mu4[i] - p[i] @ off4d + offp
    for q in range(4):
        m11[12 * 4 + q, k4] = 1
    _centre_conv(dec[11], m11)
    # d16 + shuffle: pixels; channel c at sub-position (dy, dx) reads 2x2 channel (c, dy, dx).
    m16 = torch.zeros(4 * 4, 13, **f64)
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                m16[_unshuffled(c, dy, dx), _unshuffled(c, dy, dx)] = 1
    for q in range(4):
        m16[3 * 4 + q, 12] = 1
    _centre_conv(dec[16], m16)
    # d19: remove the pixel offset.
    _centre_conv(dec[19], torch.eye(3, 4, **f64), torch.full((3,), -offp, **f64))
    if overlap:
        _fit_overlapped_decoder(model, images, k4, off4, p, mu4)
    return model


# ---- overlapped decoding: the first synthesis conv refitted on its 3x3 neighbourhood -------------


@torch.no_grad()
def _fit_overlapped_decoder(model: Autoencoder, images: torch.Tensor, k4: int, off4: torch.Tensor,
                            p4: torch.Tensor, mu4: torch.Tensor, chunk: int = 250) -> None:
    """Refit d6 (latents -> the 4x4 codes of the four quarters of each 8x8 block) as the least-squares
    linear map from the 3x3 neighbourhood of latents to the codes of the real image.

    The centre-tap codec rebuilds each block from its own latent only, which leaves blocking and
    ringing at strong edges; reading the neighbours fits across block edges (+1.1 dB on central
    256 px crops of four Kodak images, and visibly smoother edges). Neighbours are read centred
    (minus offset and data mean, the constant channel at the same tap cancelling both); d6 pads by
    replication, so a border block sees its own latent outside the frame. Refitting the
    finer stages (d11, d16) the same way gained nothing more (measured), so they stay centre-tap.
    """
    dec, f64, C = model.decoder, torch.float64, model.latent_channels
    latents = [model._encode_raw(images[i:i + chunk] * 2 - 1, sample=False, generator=None)
               for i in range(0, len(images), chunk)]
    feats = torch.cat([dec[:6](z)[:, :C] for z in latents]).double()  # (N, C, h, w): coefficient + offset
    centre = feats.mean((0, 2, 3))
    # Every position is a sample, the border ones with their neighbours replicated as d6 pads them:
    # fitting the interior alone extrapolated badly at the border of small crops (measured).
    padded = F.pad(feats - centre.view(1, -1, 1, 1), (1, 1, 1, 1), mode="replicate")
    cols = F.unfold(padded, 3)  # (N, 9C, h*w), rows ordered (channel, ky, kx)
    X = cols.transpose(1, 2).reshape(-1, 9 * C)
    X = torch.cat([X, torch.ones(len(X), 1, dtype=f64)], 1)
    # Targets: the codes of each quarter, channel k * 4 + quarter (d6's pre-shuffle order).
    u4 = F.pixel_unshuffle(images.double(), 4) - mu4.view(1, -1, 1, 1)
    codes = F.pixel_unshuffle(torch.einsum("dk,ndhw->nkhw", p4, u4), 2)
    Y = codes.flatten(2).transpose(1, 2).reshape(-1, 4 * k4)
    xtx = X.T @ X
    ridge = 1e-6 * xtx.diagonal().mean() * torch.eye(len(xtx), dtype=f64)
    ridge[-1, -1] = 0  # the intercept is not shrunk
    sol = torch.linalg.solve(xtx + ridge, X.T @ Y)  # (9C + 1, 4 k4), rows ordered (channel, ky, kx)
    W = sol[:-1].T.reshape(4 * k4, C, 3, 3)
    weight = dec[6].weight.double().clone()  # rows past 4 k4 carry the constant: kept
    weight[:4 * k4] = 0
    weight[:4 * k4, :C] = W
    weight[:4 * k4, C] = -torch.einsum("oikl,i->okl", W, centre)  # centring, tap by tap
    weight[:4 * k4, C, 1, 1] += sol[-1] + off4.repeat_interleave(4)
    dec[6].weight.copy_(weight.to(dec[6].weight.dtype))
