"""Training losses: L1 + multi-scale SSIM, a PatchGAN discriminator with hinge loss, and the
adaptive generator weight of the usual VAE recipes (taming-transformers / Stable Diffusion).

Images here are (N, 3, H, W) float in [-1, 1]; losses are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003


def _gauss_blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, 'valid' region only: (N,C,H,W) -> (N,C,H-size+1,W-size+1).

    Written as two matmuls with banded matrices (faster than depthwise convs on the CPU).
    """
    r = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()

    def band(n: int) -> torch.Tensor:  # (n-size+1, n), row i holds g at columns i..i+size-1
        idx = torch.arange(n - size + 1, device=x.device)[:, None] + torch.arange(size, device=x.device)
        return torch.zeros(n - size + 1, n, dtype=x.dtype, device=x.device).scatter_(
            1, idx, g.expand(n - size + 1, size))

    return band(x.shape[-2]) @ x @ band(x.shape[-1]).T


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, size: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image-and-channel mean SSIM and contrast-structure term, (N, C) each; x, y in [0, 1]."""
    c1, c2 = 0.01**2, 0.03**2
    stats = _gauss_blur(torch.cat([x, y, x * x, y * y, x * y], 1), size, sigma)
    mx, my, xx, yy, xy = stats.chunk(5, dim=1)
    vx, vy, cov = xx - mx * mx, yy - my * my, xy - mx * my
    cs = (2 * cov + c2) / (vx + vy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return (lum * cs).mean((2, 3)), cs.mean((2, 3))


def ms_ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Multi-scale SSIM of (N,3,H,W) images in [-1, 1], a scalar in (0, 1] (1 = identical).

    Uses as many of the 5 standard scales as the image allows (the coarsest must still be at
    least ``size`` pixels), with the standard weights renormalised to sum to 1. Terms are
    clamped to >= 1e-6 before the powers so the gradient stays finite.
    """
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    if min(x.shape[-2:]) < size:
        raise ValueError(f"ms_ssim: images must be at least {size}x{size}, got {tuple(x.shape[-2:])}")
    levels = 1
    while levels < len(MS_SSIM_WEIGHTS) and min(x.shape[-2:]) // 2**levels >= size:
        levels += 1
    w = torch.tensor(MS_SSIM_WEIGHTS[:levels], device=x.device)
    w = w / w.sum()
    value = torch.ones(x.shape[:2], device=x.device)
    for i in range(levels):
        s, cs = _ssim_terms(x, y, size, sigma)
        term = s if i == levels - 1 else cs
        value = value * term.clamp_min(1e-6) ** w[i]
        if i < levels - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return value.mean()


class PatchDiscriminator(nn.Sequential):
    """PatchGAN (pix2pix) discriminator: 4x4 convs with spectral norm and LeakyReLU(0.2).

    (N,3,H,W) in [-1, 1] -> (N,1,H/2**layers - 2, W/2**layers - 2) real/fake logits per patch.
    """

    def __init__(self, channels: int = 64, layers: int = 3):
        sn = nn.utils.parametrizations.spectral_norm
        mods: list[nn.Module] = [sn(nn.Conv2d(3, channels, 4, 2, 1)), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers):
            c_next = channels * min(2**i, 8)
            mods += [sn(nn.Conv2d(c, c_next, 4, 2, 1)), nn.LeakyReLU(0.2)]
            c = c_next
        mods += [sn(nn.Conv2d(c, c, 4, 1, 1)), nn.LeakyReLU(0.2), sn(nn.Conv2d(c, 1, 4, 1, 1))]
        super().__init__(*mods)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return F.relu(1 - logits_real.float()).mean() + F.relu(1 + logits_fake.float()).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -mean(D(fake))."""
    return -logits_fake.float().mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_weight: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """||d rec / d W|| / (||d gan / d W|| + 1e-4), clamped to [0, max_weight], detached.

    ``last_weight``: the decoder's last layer weight (the layer that produces RGB).
    """
    g_rec = torch.autograd.grad(rec_loss, last_weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_weight, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class ReconstructionLoss(nn.Module):
    """L1 + ``ssim_weight`` * (1 - MS-SSIM) [+ ``lpips_weight`` * LPIPS when an LPIPS net is given].

    ``forward(y, x)``: reconstruction and target, (N,3,H,W) in [-1, 1] ->
    (scalar loss, dict of float parts for logging).
    """

    def __init__(self, ssim_weight: float = 1.0, lpips: nn.Module | None = None, lpips_weight: float = 1.0):
        super().__init__()
        self.ssim_weight, self.lpips_weight = ssim_weight, lpips_weight
        self.lpips = lpips

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        y, x = y.float(), x.float()
        l1 = (y - x).abs().mean() / 2  # in [0, 1] units
        parts = {"l1": l1.item()}
        loss = l1
        if self.ssim_weight:
            s = ms_ssim(y, x)
            loss = loss + self.ssim_weight * (1 - s)
            parts["ms_ssim"] = s.item()
        if self.lpips is not None:
            p = self.lpips(y, x).mean()
            loss = loss + self.lpips_weight * p
            parts["lpips"] = p.item()
        return loss, parts
