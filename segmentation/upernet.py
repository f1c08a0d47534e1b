"""UPerNet (Xiao et al. 2018) with a ResNet-50 backbone, laid out as MMSegmentation's config that SeaS follows:
a pyramid pooling module (scales 1, 2, 3, 6) on the last stage, an FPN over the four stages, a fused 3x3
bottleneck and a 1x1 classifier (decode head, 512 channels), plus an FCN auxiliary head on stage 3 (256 channels,
loss weight 0.4). The backbone is timm's ``resnet50`` (torchvision key names); ImageNet weights load from a local
file (``weights=``), never from the hub; ``weights=None`` leaves it randomly initialised (tests, and the synthetic
world where no ImageNet weights exist - the results table says which).

``forward`` returns logits at the input size; in training mode ``(logits, [aux logits])``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bisenetv2 import FCNHead, cbr


def load_backbone_weights(module: nn.Module, path: str | Path, what: str, config_key: str) -> None:
    """Load a torchvision/timm state dict from a local file into ``module`` (classifier keys ignored)."""
    from core.metrics.extractors import MissingWeightsError

    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(
            f"{what} weights not found at '{path}'. Fix: copy torchvision's or timm's {what} ImageNet file there "
            f"(e.g. resnet50-0676ba61.pth from ~/.cache/torch/hub/checkpoints on a machine with internet) and set "
            f"{config_key}=/path/to/file, or set {config_key}=null for a randomly initialised backbone.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}  # drops the ImageNet classifier
    missing = [k for k in own if k not in state and not k.startswith(("fc.", "head.", "classifier."))]
    module.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"'{path}' does not fit the {what} backbone: missing {len(missing)} keys, e.g. {missing[:3]}.")


class UPerNet(nn.Module):
    def __init__(self, num_classes: int = 2, backbone: str = "resnet50", weights: str | None = None,
                 channels: int = 512, aux_channels: int = 256, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        import timm

        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        if weights:
            load_backbone_weights(self.backbone, weights, backbone, "downstream.weights")
        self.pretrained = bool(weights)
        widths = self.backbone.feature_info.channels()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), cbr(widths[-1], channels, k=1)) for s in pool_scales)
        self.ppm_bottleneck = cbr(widths[-1] + len(pool_scales) * channels, channels)
        self.lateral = nn.ModuleList(cbr(w, channels, k=1) for w in widths[:-1])
        self.fpn = nn.ModuleList(cbr(channels, channels) for _ in widths[:-1])
        self.fuse = cbr(len(widths) * channels, channels)
        self.cls = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))
        self.aux_head = FCNHead(widths[2], aux_channels, num_classes, num_convs=1)

    def forward(self, x):
        size = x.shape[-2:]
        feats = self.backbone(x)
        top = feats[-1]
        ppm = [top] + [F.interpolate(p(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for p in self.ppm]
        lat = [l(f) for l, f in zip(self.lateral, feats[:-1])] + [self.ppm_bottleneck(torch.cat(ppm, 1))]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        outs = [f(l) for f, l in zip(self.fpn, lat[:-1])] + [lat[-1]]
        outs = [outs[0]] + [F.interpolate(o, size=outs[0].shape[-2:], mode="bilinear", align_corners=False) for o in outs[1:]]
        logits = F.interpolate(self.cls(self.fuse(torch.cat(outs, 1))), size=size, mode="bilinear", align_corners=False)
        if not self.training:
            return logits
        return logits, [F.interpolate(self.aux_head(feats[2]), size=size, mode="bilinear", align_corners=False)]
