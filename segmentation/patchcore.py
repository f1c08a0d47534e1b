"""PatchCore (Roth et al., CVPR 2022): a memory bank of locally aware patch features of normal images.

- Features: ``layer2`` and ``layer3`` of an ImageNet wide-ResNet-50 (timm ``wide_resnet50_2``; weights from a local
  file, never the hub), each averaged over its 3x3 neighbourhood, layer3 upsampled to layer2's grid, each reduced to
  ``preprocess_dim`` channels and then jointly to ``target_dim`` by adaptive average pooling over channels (the
  reference implementation's aggregation).
- Memory bank: greedy k-center coreset (``coreset_ratio`` of all patches) selected on a random projection to
  ``projection_dim`` dimensions.
- Score of a test patch: Euclidean distance to its nearest memory-bank patch. Anomaly map: patch scores upsampled
  to the image and Gaussian-smoothed (sigma 4); image score: the largest patch score.

The memory bank can include generated normal images (SeaS's use: more normal variation for unsupervised methods).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) blurred with a normalised Gaussian of ``sigma`` (kernel 2*ceil(4 sigma)+1, reflect padding)."""
    if sigma <= 0:
        return x
    r = int(math.ceil(4 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    y = F.pad(x[:, None], (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    return F.conv2d(y, k.view(1, 1, -1, 1))[:, 0]


def greedy_coreset(features: torch.Tensor, n: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` rows chosen by greedy k-center (each pick maximises the distance to the chosen set)."""
    N = features.shape[0]
    if n >= N:
        return torch.arange(N)
    g = torch.Generator().manual_seed(seed)
    x = features
    if projection_dim and features.shape[1] > projection_dim:
        x = features @ torch.randn(features.shape[1], projection_dim, generator=g) / math.sqrt(projection_dim)
    chosen = [int(torch.randint(0, N, (1,), generator=g))]
    dist = torch.cdist(x, x[chosen[-1]][None]).squeeze(1)
    for _ in range(n - 1):
        i = int(dist.argmax())
        chosen.append(i)
        dist = torch.minimum(dist, torch.cdist(x, x[i][None]).squeeze(1))
    return torch.tensor(chosen)


@torch.no_grad()
def patch_embedding(backbone: nn.Module, x: torch.Tensor, preprocess_dim: int, target_dim: int
                    ) -> tuple[torch.Tensor, tuple[int, int]]:
    """PatchCore's locally aware patch features (GLASS uses them too): each stage averaged over its 3x3
    neighbourhood, the later stages upsampled to the first one's grid, each reduced to ``preprocess_dim`` channels and
    then jointly to ``target_dim`` by adaptive average pooling over channels. (B * h * w, target_dim) and (h, w)."""
    feats = backbone(x)
    feats = [F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False) for f in feats]
    h, w = feats[0].shape[-2:]
    feats = [feats[0]] + [F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False) for f in feats[1:]]
    per_layer = [F.adaptive_avg_pool1d(f.permute(0, 2, 3, 1).reshape(-1, 1, f.shape[1]), preprocess_dim)
                 for f in feats]  # each (N, 1, preprocess_dim)
    stacked = torch.cat(per_layer, 1).reshape(per_layer[0].shape[0], 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_dim)[:, 0], (h, w)


class PatchCore(nn.Module):
    def __init__(self, backbone: str = "wide_resnet50_2", weights: str | None = None, layers=(2, 3),
                 preprocess_dim: int = 1024, target_dim: int = 1024, coreset_ratio: float = 0.1,
                 projection_dim: int = 128, blur_sigma: float = 4.0, seed: int = 0):
        super().__init__()
        import timm

        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=tuple(layers))
        if weights:
            from .upernet import load_backbone_weights
            load_backbone_weights(self.backbone, weights, backbone, "downstream.weights")
        self.backbone.eval()
        self.preprocess_dim, self.target_dim = preprocess_dim, target_dim
        self.coreset_ratio, self.projection_dim, self.blur_sigma, self.seed = coreset_ratio, projection_dim, blur_sigma, seed
        self.register_buffer("memory", torch.zeros(0, target_dim))

    @torch.no_grad()
    def patch_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) normalised images -> (B * h * w, target_dim) features and the grid (h, w)."""
        return patch_embedding(self.backbone, x, self.preprocess_dim, self.target_dim)

    @torch.no_grad()
    def fit(self, batches, progress: bool = True) -> int:
        """Build the memory bank from an iterable of normalised normal-image batches; returns its size."""
        feats = [self.patch_features(x)[0] for x in tqdm(batches, desc="patchcore memory", leave=False,
                                                         disable=not progress)]
        bank = torch.cat(feats)
        n = max(1, int(round(self.coreset_ratio * bank.shape[0])))
        self.memory = bank[greedy_coreset(bank, n, self.projection_dim, self.seed)]
        return self.memory.shape[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (anomaly maps (B, H, W), image scores (B,))."""
        if self.memory.shape[0] == 0:
            raise RuntimeError("PatchCore: call fit() with normal images before scoring.")
        f, (h, w) = self.patch_features(x)
        d = torch.cdist(f, self.memory).min(1).values.view(x.shape[0], h, w)
        maps = F.interpolate(d[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return gaussian_blur(maps, self.blur_sigma), d.flatten(1).max(1).values
