"""Feature extractors for generation metrics, loaded only from local weight files.

No code path here downloads. Where a file is absent the error names the file, where to get it, and
the config key (or cache folder) that points the toolkit at it. Tests pass tiny random extractors.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

TORCHVISION_FILES = {
    "inception": "inception_v3_google-0cc3c7bd.pth",
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
}


class MissingWeightsError(FileNotFoundError):
    """A feature extractor's weight file is not on disk."""


def resolve_weights(path: str | os.PathLike | None, kind: str, config_key: str) -> Path:
    """An explicit ``path``, else torchvision's cache file ``$TORCH_HOME/hub/checkpoints/<file>``."""
    fname = TORCHVISION_FILES[kind]
    candidates = [Path(path).expanduser()] if path else []
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / fname)
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(f"'{c}'" for c in candidates)
    raise MissingWeightsError(
        f"Weights for the {kind} feature extractor not found (looked at {tried}).\n"
        f"Fix: on a machine with internet, get torchvision's '{fname}' (the file torchvision caches under "
        f"~/.cache/torch/hub/checkpoints/), copy it here and set {config_key}=/path/to/{fname}, "
        f"or put it into $TORCH_HOME/hub/checkpoints/."
    )


class InceptionFeatures(nn.Module):
    """torchvision Inception-v3: returns (pool features (N, 2048), class logits (N, 1000)).

    Input: images in [0, 1], any size (resized to 299 bilinearly, ImageNet-normalised). The values
    differ slightly from the TF-Inception used by the original FID/IS code; report them as such.
    """

    num_features = 2048

    def __init__(self, weights: str | os.PathLike | None = None, config_key: str = "metrics.inception_weights"):
        super().__init__()
        from torchvision.models import inception_v3

        path = resolve_weights(weights, "inception", config_key)
        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.fc_ = net.fc
        net.fc = nn.Identity()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.net((x - self.mean) / self.std)
        return feats, self.net.fc_(feats)


def load_lpips(net: str = "vgg", backbone_weights: str | os.PathLike | None = None,
               config_key: str = "metrics.lpips_backbone"):
    """LPIPS v0.1 with its linear heads from the lpips wheel and the backbone from a local torchvision file.

    The lpips package would fetch the AlexNet/VGG backbone from the internet; here it is built with random
    weights (``pnet_rand``) and the local file is loaded into it.
    """
    import lpips

    if net not in ("vgg", "alex"):
        raise ValueError(f"LPIPS backbone must be 'vgg' or 'alex', got '{net}'.")
    path = resolve_weights(backbone_weights, net, config_key)
    # pretrained=True loads only the linear heads shipped in the wheel (local); pnet_rand=True stops the backbone download
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    # lpips slices torchvision's `features` Sequential keeping its indices: sliceK.<i>.weight <- features.<i>.weight
    own = model.net.state_dict()
    mapped = {}
    for k in own:
        src = "features." + k.split(".", 1)[1]
        if src not in sd:
            raise ValueError(f"'{path}' does not look like torchvision's {TORCHVISION_FILES[net]}: key '{src}' is missing.")
        mapped[k] = sd[src]
    model.net.load_state_dict(mapped)
    return model.eval()
