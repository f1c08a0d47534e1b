"""LFD-RoadSeg ("Exploiting Low-level Representations for Ultra-Fast Road Segmentation", Zhou et al., T-ITS 2024,
arXiv:2402.02430; code github.com/zhouhuan-hust/LFD_RoadSeg), SeaS's third supervised segmenter (Tab. 4, 26-27):
0.94 M parameters, beside BiSeNet V2 (3.3 M) and UPerNet (64 M).

A bilateral network:
- spatial detail branch: ResNet-18's stem and first stage on the full image (stride 4, 64 channels), a 1 x 1
  convolution to 128;
- context semantic branch: the image downsampled asymmetrically to (H / s, W / 2s), ResNet-18's stem and first two
  stages (stride 8 of that, 128 channels), then the aggregation module: two residual units of depth-wise 1 x 5 and
  5 x 1 convolutions (the first 1 x 5 dilated by 2) and a 1 x 1 convolution;
- selective fusion: the context upsampled to the detail grid, a pixel-wise attention
  a = sigmoid(conv(BNReLU(conv([context, detail])))), output a * detail + context;
- a 1 x 1 head to two classes, upsampled to the input.
Loss (official): online hard example mining cross-entropy with class weights (1, 4) (``segmentation.train``,
``loss: ohem``). The two ResNet-18 parts are separate networks; ``weights`` loads a local torchvision / timm ResNet-18
state dict into both (null = random init).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def bn_relu(c: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())


def _resnet18_stages(stages: int, weights: str | None) -> nn.Module:
    import timm
    m = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(stages,))
    if weights:
        from .upernet import load_backbone_weights
        load_backbone_weights(m, weights, "resnet18", "downstream.weights")
    return m


class Fusion(nn.Module):
    """Selective fusion: a = sigmoid(point_conv([high, low])), out = a * low + high (high upsampled to low's grid)."""

    def __init__(self, c: int = 128):
        super().__init__()
        self.point_conv = nn.Sequential(nn.Conv2d(2 * c, c, 1), bn_relu(c), nn.Conv2d(c, 1, 1))

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        a = torch.sigmoid(self.point_conv(torch.cat([high, low], 1)))
        return a * low + high


def _aggregation(c: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, (1, 5), dilation=dilation, padding=(0, 2 * dilation), groups=c),
                         nn.Conv2d(c, c, (5, 1), padding=(2, 0), groups=c), nn.Conv2d(c, c, 1), bn_relu(c))


class LFD(nn.Module):
    def __init__(self, num_classes: int = 2, scale_factor: int = 2, weights: str | None = None):
        super().__init__()
        self.scale_factor = scale_factor
        self.semantic = _resnet18_stages(2, weights)      # stem + layer1 + layer2: stride 8, 128 channels
        self.context1, self.context2 = _aggregation(128, 2), _aggregation(128, 1)
        self.detail = _resnet18_stages(1, weights)        # stem + layer1: stride 4, 64 channels
        self.channel_adjust = nn.Sequential(nn.Conv2d(64, 128, 1), bn_relu(128))
        self.fusion = Fusion(128)
        self.cls_head = nn.Sequential(nn.Conv2d(128, 128, 1), bn_relu(128), nn.Conv2d(128, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        small = F.interpolate(x, size=(H // self.scale_factor, W // (2 * self.scale_factor)), mode="bilinear",
                              align_corners=False)
        c = self.semantic(small)[0]
        c = self.context1(c) + c
        c = self.context2(c) + c
        d = self.channel_adjust(self.detail(x)[0])
        out = self.cls_head(self.fusion(d, c))
        return F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)


def ohem_ce(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7, min_kept: int = 100_000,
            weight: tuple[float, float] = (1.0, 4.0)) -> torch.Tensor:
    """LFD's loss: weighted cross-entropy over the pixels whose probability of their own class is below
    max(thresh, the min_kept-th smallest such probability) (all of them when fewer than min_kept pixels exist)."""
    t = target.long()
    prob = logits.softmax(1).gather(1, t[:, None]).reshape(-1)
    loss = F.cross_entropy(logits, t, weight=torch.tensor(weight, device=logits.device, dtype=logits.dtype),
                           reduction="none").reshape(-1)
    sorted_p, order = prob.sort()
    k = min(min_kept, sorted_p.numel() - 1)
    threshold = max(float(sorted_p[k]), thresh) if sorted_p.numel() else thresh
    keep = loss[order][sorted_p < threshold]
    return keep.mean() if keep.numel() else keep.sum()


__all__ = ["Fusion", "LFD", "ohem_ce"]
