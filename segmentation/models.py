"""Build a downstream model from its ``downstream/*.yaml`` node.

Every supervised model maps (B, 3, H, W) in [0, 1] (after its own ``normalize``) to (B, 2, H, W) logits (segmenters)
or (B, num_classes) logits (classifiers).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

SEGMENTERS = ("unet", "bisenetv2", "upernet", "lfd")
CLASSIFIERS = ("resnet34", "resnet50")


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - IMAGENET_MEAN.to(x)) / IMAGENET_STD.to(x)


def normalizer(node) -> Callable[[torch.Tensor], torch.Tensor] | None:
    kind = node.get("normalize", "none")
    if kind == "imagenet":
        return imagenet_normalize
    if kind in (None, "none"):
        return None
    raise ValueError(f"downstream.normalize must be imagenet or none, got '{kind}'.")


def build_segmenter(node) -> nn.Module:
    name = node["name"]
    if name == "unet":
        from .unet import DiscriminativeUNet
        return DiscriminativeUNet(3, 2, base=int(node.get("base", 64)))
    if name == "bisenetv2":
        from .bisenetv2 import BiSeNetV2
        return BiSeNetV2(2, head_channels=int(node.get("head_channels", 1024)),
                         aux_channels=tuple(node.get("aux_channels", (16, 64, 256, 1024))))
    if name == "upernet":
        from .upernet import UPerNet
        return UPerNet(2, backbone=node.get("backbone", "resnet50"), weights=node.get("weights"),
                       channels=int(node.get("channels", 512)), aux_channels=int(node.get("aux_channels", 256)))
    if name == "lfd":
        from .lfd import LFD
        return LFD(2, scale_factor=int(node.get("scale_factor", 2)), weights=node.get("weights"))
    raise ValueError(f"Unknown segmenter '{name}'. Available: {', '.join(SEGMENTERS)}.")


def build_classifier(node, num_classes: int) -> nn.Module:
    import timm

    name = node["name"]
    if name not in CLASSIFIERS:
        raise ValueError(f"Unknown classifier '{name}'. Available: {', '.join(CLASSIFIERS)}.")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if node.get("weights"):
        from .upernet import load_backbone_weights
        load_backbone_weights(model, node["weights"], name, "downstream.weights")  # the head stays fresh
    return model
