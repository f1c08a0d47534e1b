"""DRAEM (Zavrtanik et al., ICCV 2021): a reconstructive sub-network learns to remove anomalies, a discriminative
sub-network (:class:`segmentation.unet.DiscriminativeUNet` on the image concatenated with its reconstruction)
segments them. Trained on normal images with simulated anomalies:

- mask: Perlin noise (scales 2^0..2^5 per axis, rotated) thresholded at 0.5;
- source: a texture image (a folder such as DTD via ``anomaly_source``; without one, procedural colour Perlin
  textures), randomly augmented;
- blend: I_a = (1 - M) I + (1 - beta) M A + beta M I, beta ~ U(0, 0.8); half of the images stay normal;
- loss: L2 + (1 - SSIM) on the reconstruction, focal loss on the segmentation.

Generated (or oracle) anomalies *replace* the simulated ones: the anomaly half of each batch is drawn from the
generated pairs, their masks supervise the segmentation, and as no anomaly-free twin of a generated image exists the
reconstruction loss on those images counts only the pixels outside the mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .unet import DiscriminativeUNet, conv_block, focal_loss


class ReconstructiveNet(nn.Module):
    """DRAEM's encoder-decoder (widths b, 2b, 4b, 8b, 8b; no skips) mapping an image to its anomaly-free version."""

    def __init__(self, channels: int = 3, base: int = 128):
        super().__init__()
        widths = [base, 2 * base, 4 * base, 8 * base, 8 * base]
        self.enc = nn.ModuleList()
        c = channels
        for w in widths:
            self.enc.append(conv_block(c, w))
            c = w
        self.dec = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.dec.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                          nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                          conv_block(c, w)))
            c = w
        self.out = nn.Conv2d(c, channels, 3, padding=1)

    def forward(self, x):
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
        for block in self.dec:
            x = block(x)
        return self.out(x)


class DRAEM(nn.Module):
    def __init__(self, recon_base: int = 128, seg_base: int = 64):
        super().__init__()
        self.reconstructive = ReconstructiveNet(3, recon_base)
        self.discriminative = DiscriminativeUNet(6, 2, seg_base)

    def forward(self, x, return_reconstruction: bool = False):
        rec = self.reconstructive(x)
        seg = self.discriminative(torch.cat([x, rec], 1))
        return (seg, rec) if return_reconstruction else seg


# ----------------------------------------------------------------------------- anomaly simulation


def perlin_2d(h: int, w: int, res: tuple[int, int]) -> torch.Tensor:
    """Gradient (Perlin) noise of shape (h, w) with ``res`` lattice cells per axis, from the global torch RNG."""
    ry, rx = res
    angles = 2 * math.pi * torch.rand(ry + 1, rx + 1)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    ys = torch.linspace(0, ry, h + 1)[:-1]
    xs = torch.linspace(0, rx, w + 1)[:-1]
    Y, X = torch.meshgrid(ys, xs, indexing="ij")
    y0, x0 = Y.floor().long().clamp(max=ry - 1), X.floor().long().clamp(max=rx - 1)
    fy, fx = Y - y0, X - x0

    def dot(dy, dx):
        g = grads[y0 + dy, x0 + dx]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3  # noqa: E731
    u, v = fade(fx), fade(fy)
    top = torch.lerp(dot(0, 0), dot(0, 1), u)
    bottom = torch.lerp(dot(1, 0), dot(1, 1), u)
    return math.sqrt(2) * torch.lerp(top, bottom, v)


def perlin_mask(size: int, threshold: float = 0.5, max_scale: int = 6) -> torch.Tensor:
    """DRAEM's anomaly mask: Perlin noise with 2^a x 2^b cells (a, b < ``max_scale``), rotated, thresholded."""
    for _ in range(10):
        a, b = torch.randint(0, max_scale, (2,)).tolist()
        noise = perlin_2d(size, size, (2 ** a, 2 ** b))
        k = int(torch.randint(0, 4, (1,)))
        m = (torch.rot90(noise, k) > threshold).float()
        if m.sum() > 0:
            return m
    return m


def procedural_texture(size: int) -> torch.Tensor:
    """A colour texture (3, S, S) in [0, 1]: three octaves of Perlin noise mixing two random colours."""
    n = sum(0.5 ** o * perlin_2d(size, size, (2 ** (o + 1), 2 ** (o + 1))) for o in range(3))
    t = ((n - n.min()) / (n.max() - n.min() + 1e-6))[None]
    c0, c1 = torch.rand(3, 1, 1), torch.rand(3, 1, 1)
    return c0 * (1 - t) + c1 * t


def augment_source(a: torch.Tensor) -> torch.Tensor:
    """Three of DRAEM's source augmentations, chosen at random: brightness, gamma contrast, invert, posterize,
    solarize, channel shuffle."""
    ops = [lambda x: (x * (0.5 + torch.rand(1))).clamp(0, 1),
           lambda x: x.clamp(1e-4, 1) ** (0.5 + 1.5 * torch.rand(1)),
           lambda x: 1 - x,
           lambda x: torch.floor(x * 8) / 8,
           lambda x: torch.where(x > 0.5, 1 - x, x),
           lambda x: x[torch.randperm(3)]]
    for i in torch.randperm(len(ops))[:3].tolist():
        a = ops[i](a)
    return a


def blend(image: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """DRAEM's Eq. 1: I_a = (1 - M) * I + (1 - beta) * (M * A) + beta * (M * I)."""
    return image * (1 - mask) + (1 - beta) * source * mask + beta * image * mask


def simulate(image: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One simulated anomaly on ``image`` (3, S, S): returns (augmented image, mask (S, S))."""
    m = perlin_mask(image.shape[-1])
    return blend(image, augment_source(source), m, 0.8 * torch.rand(1)), m


# ----------------------------------------------------------------------------- losses


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity (Gaussian window) of two (B, C, H, W) batches in [0, 1]."""
    t = torch.arange(window, dtype=x.dtype) - window // 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    k = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window).contiguous()
    f = lambda z: F.conv2d(z, k, padding=window // 2, groups=x.shape[1])  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))).mean()


def reconstruction_loss(rec: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DRAEM's L_rec = l2 + (1 - SSIM), counted only where ``weight`` (B, H, W) is 1: pixels with weight 0 (the
    anomaly of a generated image, whose anomaly-free twin is unknown) take the target's value before SSIM."""
    w = weight[:, None]
    l2 = ((rec - target) ** 2 * w).sum() / (w.sum() * rec.shape[1]).clamp(min=1)
    return l2 + 1 - ssim(rec * w + target * (1 - w), target)


def make_step(anomaly_source: list[torch.Tensor] | None = None, gamma: float = 2.0):
    """The loss function for :func:`segmentation.train.train`: simulated anomalies on half of the normal images when
    the batch has no anomaly-pool items (plain DRAEM), generated pairs as the anomalies otherwise."""

    def step(model: DRAEM, batch: dict, spec) -> torch.Tensor:
        x, m, src = batch["image"], batch["mask"], batch["source"]
        target, weight = x.clone(), torch.ones_like(m)
        aug, mask = x.clone(), m.clone()
        if not bool((src == 1).any()):
            for i in range(x.shape[0]):
                if torch.rand(1) < 0.5:
                    size = x.shape[-1]
                    s = anomaly_source[int(torch.randint(0, len(anomaly_source), (1,)))] if anomaly_source \
                        else procedural_texture(size)
                    aug[i], mask[i] = simulate(x[i], s)
        else:
            weight = 1 - m * (src == 1).view(-1, 1, 1).float()  # no anomaly-free twin of a generated image
        seg, rec = model(aug, return_reconstruction=True)
        return reconstruction_loss(rec, target, weight) + focal_loss(seg, mask, gamma)

    return step
