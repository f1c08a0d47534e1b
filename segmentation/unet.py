"""The U-Net of AnomalyDiffusion's localisation protocol: DRAEM's discriminative sub-network (Zavrtanik et al. 2021).

Six encoder blocks (two 3x3 conv-BN-ReLU each; widths b, 2b, 4b, 8b, 8b, 8b; 2x max-pool between them), a decoder
that upsamples, concatenates the skip of the same level and applies a block, and a 3x3 head with 2 output channels
(normal / anomaly logits; softmax over channels). Input side must be divisible by 32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.losses import focal_loss  # noqa: F401  (re-exported: the U-Net's loss)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def up_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DiscriminativeUNet(nn.Module):
    """(B, in_channels, H, W) -> (B, 2, H, W) logits. ``base`` 64 as in DRAEM; tests use smaller widths."""

    def __init__(self, in_channels: int = 3, out_channels: int = 2, base: int = 64):
        super().__init__()
        widths = [base, 2 * base, 4 * base, 8 * base, 8 * base, 8 * base]
        self.encoder = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.encoder.append(conv_block(c, w))
            c = w
        self.ups, self.decoder = nn.ModuleList(), nn.ModuleList()
        for skip, target in zip(reversed(widths[:-1]), [8 * base, 4 * base, 2 * base, base, base]):
            self.ups.append(up_conv(c, target))
            self.decoder.append(conv_block(target + skip, target))
            c = target
        self.head = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"DiscriminativeUNet needs sides divisible by 32, got {tuple(x.shape[-2:])}.")
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.ups, self.decoder):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


