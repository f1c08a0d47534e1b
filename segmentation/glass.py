"""GLASS ("A Unified Anomaly Synthesis Strategy with Gradient Ascent for Industrial Anomaly Detection and
Localization", Chen et al., ECCV 2024, arXiv:2407.09359; code github.com/cqylunlun/GLASS), SeaS's second
synthesis-based detector (Tab. 2, beside DRAEM).

On a frozen backbone's locally aware patch features (PatchCore's, :func:`segmentation.patchcore.patch_embedding`),
a trainable projection and a discriminator (an MLP with a sigmoid: the probability that a patch is anomalous) are
trained with two kinds of synthetic anomalies:
- **global anomaly synthesis (GAS)**, in feature space: normal features plus Gaussian noise (sigma ``noise``), moved
  by ``steps`` normalised gradient-ascent steps of size ``eta`` on the discriminator's loss of calling them anomalous
  (towards the normal side, so they become hard), and every 5 steps projected back into a ring around the normal
  feature: distance in [r, 2r] (manifold: around each normal feature itself, r = 0.5; hypersphere: around the
  patch position's centre c, r = the ``radius`` quantile of the normal distances to c);
- **local anomaly synthesis (LAS)**, in image space: DRAEM-style textures pasted with Perlin masks; their features
  are scored against the mask on the patch grid with a focal loss on the hardest ``p`` share.
Loss: BCE(normal -> 0) + BCE(GAS -> 1) + focal(LAS). Map: the discriminator's patch scores upsampled and smoothed;
image score: their maximum.

SeaS's generated arm replaces the LAS anomalies with generated image-mask pairs (``generated`` here).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Projection(nn.Module):
    """``layers`` linear maps d -> d with LeakyReLU between them (official ``pre_proj=1``: one linear map)."""

    def __init__(self, dim: int, layers: int = 1):
        super().__init__()
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dim, dim))
            if i < layers - 1:
                mods.append(nn.LeakyReLU(0.2))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Discriminator(nn.Module):
    """Patch feature -> probability of being anomalous: (Linear, BatchNorm, LeakyReLU) x (layers - 1), a linear map to
    one logit without bias, a sigmoid."""

    def __init__(self, dim: int, layers: int = 2, hidden: int = 1024):
        super().__init__()
        body: list[nn.Module] = []
        d = dim
        for _ in range(layers - 1):
            body += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2)]
            d = hidden
        self.body, self.tail = nn.Sequential(*body), nn.Linear(d, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.tail(self.body(x)))


def ascent_step(feats: torch.Tensor, grad: torch.Tensor, eta: float = 1e-3) -> torch.Tensor:
    """One normalised gradient-ascent step: every feature moves by exactly ``eta`` along its gradient's direction."""
    return feats + eta * grad / (grad.norm(dim=1, keepdim=True) + 1e-10)


def project_to_ring(points: torch.Tensor, anchors: torch.Tensor, r_low: torch.Tensor | float,
                    r_high: torch.Tensor | float) -> torch.Tensor:
    """Each point moved along its ray from its anchor so that its distance to the anchor lies in [r_low, r_high]."""
    h = points - anchors
    n = h.norm(dim=1, keepdim=True)
    alpha = torch.clamp(n, min=torch.as_tensor(r_low).to(n), max=torch.as_tensor(r_high).to(n))
    return anchors + alpha / (n + 1e-10) * h


def binary_focal(p: torch.Tensor, y: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    p = p.clamp(eps, 1 - eps)
    pt = torch.where(y > 0.5, p, 1 - p)
    return (-(1 - pt) ** gamma * pt.log()).mean()


def global_synthesis(disc: Discriminator, true_feats: torch.Tensor, centre: torch.Tensor, noise: float, steps: int,
                     eta: float, distribution: str, r_t: torch.Tensor, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAS: returns (the BCE of normal -> 0 and synthesized -> 1 at the final features, the synthesized features).
    ``centre`` (N, D) is each feature's position centre (hypersphere); ``r_t`` the normal radius there."""
    gaus = (true_feats + noise * torch.randn(true_feats.shape, generator=generator).to(true_feats)).detach()
    for step in range(steps + 1):
        gaus.requires_grad_(True)
        scores = disc(torch.cat([true_feats, gaus]))
        t_s, g_s = scores[:len(true_feats)], scores[len(true_feats):]
        g_loss = F.binary_cross_entropy(g_s, torch.ones_like(g_s))
        bce = F.binary_cross_entropy(t_s, torch.zeros_like(t_s)) + g_loss
        if step == steps:
            break
        grad = torch.autograd.grad(g_loss, [gaus], retain_graph=False)[0]
        with torch.no_grad():
            gaus = ascent_step(gaus, grad, eta)
            if (step + 1) % 5 == 0:
                if distribution == "hypersphere":
                    gaus = project_to_ring(gaus, centre, r_t, 2 * r_t)
                else:
                    gaus = project_to_ring(gaus, true_feats.detach(), 0.5, 1.0)
    return bce, gaus.detach()


def local_loss(disc: Discriminator, fake_feats: torch.Tensor, mask: torch.Tensor, p: float = 0.5,
               gamma: float = 2.0) -> torch.Tensor:
    """LAS: the focal loss of the discriminator's scores against the mask on the patch grid, on the hardest ``p``
    share of patches (those whose squared error is at least its ``p`` quantile; all when p = 0)."""
    s = disc(fake_feats)[:, 0]
    if p > 0:
        err = (s - mask) ** 2
        keep = err >= torch.quantile(err.detach(), p)
        s, mask = s[keep], mask[keep]
    return binary_focal(s, mask, gamma)


class GLASS(nn.Module):
    """Frozen features -> projection -> discriminator. ``features(x)`` gives (B * h * w, D) and the grid."""

    def __init__(self, backbone: str = "wide_resnet50_2", weights: str | None = None, layers=(2, 3),
                 preprocess_dim: int = 1536, target_dim: int = 1536, proj_layers: int = 1, dsc_layers: int = 2,
                 dsc_hidden: int = 1024):
        super().__init__()
        import timm
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=tuple(layers))
        if weights:
            from .upernet import load_backbone_weights
            load_backbone_weights(self.backbone, weights, backbone, "downstream.weights")
        self.backbone.eval().requires_grad_(False)
        self.preprocess_dim, self.target_dim = preprocess_dim, target_dim
        self.projection = Projection(target_dim, proj_layers) if proj_layers else nn.Identity()
        self.discriminator = Discriminator(target_dim, dsc_layers, dsc_hidden)
        # the centre c of the normal features and the steps since it was computed: buffers, so that a checkpoint
        # carries them and a resumed run continues exactly (set_centre gives them their shape before training)
        self.register_buffer("centre", torch.zeros(0))
        self.register_buffer("centre_age", torch.zeros((), dtype=torch.long))

    def set_centre(self, centre: torch.Tensor) -> None:
        self.centre = centre.detach().clone()
        self.centre_age.zero_()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        from .patchcore import patch_embedding
        with torch.no_grad():
            f, grid = patch_embedding(self.backbone, x, self.preprocess_dim, self.target_dim)
        return self.projection(f), grid

    @torch.no_grad()
    def forward(self, x: torch.Tensor, sigma: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), image scores (B,)): the discriminator's patch scores, upsampled and smoothed; the max."""
        from .patchcore import gaussian_blur
        f, (h, w) = self.features(x)
        s = self.discriminator(f)[:, 0].view(x.shape[0], h, w)
        maps = F.interpolate(s[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return gaussian_blur(maps, sigma), s.flatten(1).amax(1)


def glass_step(model: GLASS, normals: torch.Tensor, aug: torch.Tensor, aug_mask: torch.Tensor, centre: torch.Tensor,
               cfg, generator: torch.Generator | None = None) -> torch.Tensor:
    """One GLASS loss: ``normals`` and ``aug`` (B, 3, H, W) normalised images, ``aug_mask`` (B, H, W) their anomaly
    masks (LAS or generated), ``centre`` (h * w, D) the patch positions' mean normal feature."""
    true_feats, (h, w) = model.features(normals)
    fake_feats, _ = model.features(aug)
    B = normals.shape[0]
    grid = (F.adaptive_max_pool2d(aug_mask[:, None].float(), (h, w))[:, 0] > 0).float().reshape(-1)
    c = centre.repeat(B, 1)
    with torch.no_grad():
        pts = torch.cat([fake_feats[grid == 0], true_feats])
        anchors = torch.cat([c[grid == 0], c])
        r_t = torch.quantile((pts - anchors).norm(dim=1), float(cfg.radius))
    bce, _ = global_synthesis(model.discriminator, true_feats, c, float(cfg.noise), int(cfg.gas_steps),
                              float(cfg.eta), str(cfg.distribution), r_t, generator)
    if str(cfg.distribution) == "hypersphere" and bool((grid == 1).any()):   # LAS points pushed to [2 r, 4 r]
        fake_feats = fake_feats.clone()
        fake_feats[grid == 1] = project_to_ring(fake_feats[grid == 1], c[grid == 1], 2 * r_t, 4 * r_t)
    return bce + local_loss(model.discriminator, fake_feats, grid, float(cfg.p), float(cfg.get("focal_gamma", 2.0)))


__all__ = ["Discriminator", "GLASS", "Projection", "ascent_step", "binary_focal", "glass_step", "global_synthesis",
           "local_loss", "project_to_ring"]
