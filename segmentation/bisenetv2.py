"""BiSeNet V2 (Yu et al., IJCV 2021) as SeaS configures it (appendix A.4, following MMSegmentation's layout).

- Detail branch: three stages of 64, 64, 128 channels (strides 2, 2, 2: output at 1/8).
- Semantic branch: a stem (16 channels, 1/4) and stages of 32 (1/8), 64 (1/16), 128 (1/32) channels built from
  gather-and-expand (GE) layers, closed by a context-embedding block.
- Bilateral guided aggregation (BGA) fuses the two branches at 1/8 into 128 channels.
- A decode head (FCN: one 3x3 conv-BN-ReLU, dropout, 1x1 classifier) and four auxiliary heads, one per semantic
  stage (stem, stages 3, 4, 5 with context), used only in training.

``forward`` returns the decode head's logits upsampled to the input size; in training mode it returns
``(logits, [aux logits ...])``, every map at the input size. Input sides must be divisible by 32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DetailBranch(nn.Module):
    def __init__(self, channels=(64, 64, 128), in_channels: int = 3):
        super().__init__()
        stages, c = [], in_channels
        for i, w in enumerate(channels):
            convs = [cbr(c, w, stride=2), cbr(w, w)] + ([cbr(w, w)] if i > 0 else [])
            stages.append(nn.Sequential(*convs))
            c = w
        self.stages = nn.Sequential(*stages)

    def forward(self, x):
        return self.stages(x)


class StemBlock(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 16):
        super().__init__()
        self.conv_first = cbr(in_channels, out_channels, stride=2)
        self.left = nn.Sequential(cbr(out_channels, out_channels // 2, k=1), cbr(out_channels // 2, out_channels, stride=2))
        self.right = nn.MaxPool2d(3, 2, 1)
        self.fuse = cbr(2 * out_channels, out_channels)

    def forward(self, x):
        x = self.conv_first(x)
        return self.fuse(torch.cat([self.left(x), self.right(x)], 1))


class GELayer(nn.Module):
    """Gather-and-expand layer, expansion ratio 6; stride 2 adds a second depthwise conv and a projected shortcut."""

    def __init__(self, c_in: int, c_out: int, expand: int = 6, stride: int = 1):
        super().__init__()
        mid = c_in * expand
        self.conv1 = cbr(c_in, c_in)
        if stride == 1:
            self.dwconv = cbr(c_in, mid, groups=c_in, act=False)
            self.shortcut = None
        else:
            self.dwconv = nn.Sequential(cbr(c_in, mid, stride=2, groups=c_in, act=False),
                                        cbr(mid, mid, groups=mid, act=False))
            self.shortcut = nn.Sequential(cbr(c_in, c_in, stride=2, groups=c_in, act=False), cbr(c_in, c_out, k=1, act=False))
        self.conv2 = cbr(mid, c_out, k=1, act=False)
        if stride == 1 and c_in != c_out:
            raise ValueError("a stride-1 GE layer keeps its width")

    def forward(self, x):
        y = self.conv2(self.dwconv(self.conv1(x)))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ContextEmbedding(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.gap_conv = cbr(c, c, k=1)
        self.conv_last = cbr(c, c)

    def forward(self, x):
        g = self.gap_conv(self.bn(F.adaptive_avg_pool2d(x, 1)))
        return self.conv_last(x + g)


class SemanticBranch(nn.Module):
    """Returns the four stage outputs (stem 1/4, 1/8, 1/16, context-embedded 1/32)."""

    def __init__(self, channels=(16, 32, 64, 128), in_channels: int = 3, expand: int = 6):
        super().__init__()
        self.stem = StemBlock(in_channels, channels[0])
        self.stages = nn.ModuleList()
        for i in range(1, len(channels)):
            layers = [GELayer(channels[i - 1], channels[i], expand, stride=2), GELayer(channels[i], channels[i], expand)]
            if i == len(channels) - 1:
                layers += [GELayer(channels[i], channels[i], expand), GELayer(channels[i], channels[i], expand)]
            self.stages.append(nn.Sequential(*layers))
        self.context = ContextEmbedding(channels[-1])

    def forward(self, x):
        outs = [self.stem(x)]
        for stage in self.stages:
            outs.append(stage(outs[-1]))
        outs[-1] = self.context(outs[-1])
        return outs


class BGA(nn.Module):
    """Bilateral guided aggregation: detail (1/8) and semantic (1/32) branches guide each other."""

    def __init__(self, c: int = 128):
        super().__init__()
        self.detail_keep = nn.Sequential(cbr(c, c, groups=c, act=False), nn.Conv2d(c, c, 1))
        self.detail_down = nn.Sequential(cbr(c, c, stride=2, act=False), nn.AvgPool2d(3, 2, 1))
        self.semantic_keep = nn.Sequential(cbr(c, c, groups=c, act=False), nn.Conv2d(c, c, 1))
        self.semantic_up = cbr(c, c, act=False)
        self.fuse = cbr(c, c)

    def forward(self, detail, semantic):
        size = detail.shape[-2:]
        left = self.detail_keep(detail) * torch.sigmoid(
            F.interpolate(self.semantic_up(semantic), size=size, mode="bilinear", align_corners=False))
        right = self.detail_down(detail) * torch.sigmoid(self.semantic_keep(semantic))
        right = F.interpolate(right, size=size, mode="bilinear", align_corners=False)
        return self.fuse(left + right)


class FCNHead(nn.Module):
    def __init__(self, c_in: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        convs = [cbr(c_in if i == 0 else channels, channels) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        return self.cls(self.dropout(self.convs(x)))


class BiSeNetV2(nn.Module):
    """Decode head width and auxiliary widths default to MMSegmentation's (1024; 16, 64, 256, 1024)."""

    def __init__(self, num_classes: int = 2, in_channels: int = 3, detail_channels=(64, 64, 128),
                 semantic_channels=(16, 32, 64, 128), head_channels: int = 1024, aux_channels=(16, 64, 256, 1024),
                 expand: int = 6):
        super().__init__()
        if detail_channels[-1] != semantic_channels[-1]:
            raise ValueError("the last detail and semantic widths must match (BGA fuses them)")
        self.detail = DetailBranch(detail_channels, in_channels)
        self.semantic = SemanticBranch(semantic_channels, in_channels, expand)
        self.bga = BGA(detail_channels[-1])
        self.decode_head = FCNHead(detail_channels[-1], head_channels, num_classes, num_convs=1)
        self.aux_heads = nn.ModuleList(
            FCNHead(c, a, num_classes, num_convs=2) for c, a in zip(semantic_channels, aux_channels))

    def forward(self, x):
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"BiSeNetV2 needs sides divisible by 32, got {tuple(x.shape[-2:])}.")
        size = x.shape[-2:]
        sem = self.semantic(x)
        out = F.interpolate(self.decode_head(self.bga(self.detail(x), sem[-1])), size=size, mode="bilinear",
                            align_corners=False)
        if not self.training:
            return out
        aux = [F.interpolate(h(s), size=size, mode="bilinear", align_corners=False) for h, s in zip(self.aux_heads, sem)]
        return out, aux
