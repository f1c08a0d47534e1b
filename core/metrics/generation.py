"""Generation metrics: IS, FID, KID from extracted features; LPIPS-based IC-LPIPS and IC-LPIPS(a).

The formulas work on features / probabilities, so they are tested on hand-worked values; feature
extraction (``extract``) runs any module returning ``(features, logits)`` — InceptionFeatures
from a local file in real runs, a tiny random network in tests.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from tqdm import tqdm


@torch.no_grad()
def extract(model: Callable, images: torch.Tensor, batch_size: int = 32, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` on images in [0, 1] (N, 3, H, W) in batches -> (features, logits) as float64 arrays."""
    feats, logits = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress):
        f, lg = model(images[i:i + batch_size])
        feats.append(f.double().cpu())
        logits.append(lg.double().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def _features(x, what: str, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{what}: {name} must be a non-empty (N, D) array, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: {name} hold NaN or infinite values (a broken extractor or image).")
    return x


def _two_sets(real, fake, what: str) -> tuple[np.ndarray, np.ndarray]:
    real, fake = _features(real, what, "real features"), _features(fake, what, "generated features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"{what}: real features have {real.shape[1]} dimensions and generated ones {fake.shape[1]}; "
                         f"extract both with the same network.")
    return real, fake


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` consecutive chunks (Salimans et al. 2016).
    ``probs``: class probabilities, rows summing to 1 (for logits use :func:`inception_score_from_logits`)."""
    probs = _features(probs, "inception_score", "probs")
    if (probs < 0).any() or not np.allclose(probs.sum(1), 1, atol=1e-3):
        raise ValueError("inception_score: each row of probs must be a probability distribution (non-negative, "
                         "summing to 1). Fix: pass logits to inception_score_from_logits instead.")
    splits = max(1, min(splits, len(probs)))
    scores = []
    for chunk in np.array_split(probs, splits):
        py = chunk.mean(axis=0, keepdims=True)
        kl = (chunk * (np.log(chunk + 1e-12) - np.log(py + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_from_logits(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    logits = _features(logits, "inception_score_from_logits", "logits")
    return inception_score(torch.softmax(torch.as_tensor(logits), dim=1).numpy(), splits)


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) between Gaussian fits (Heusel et al. 2017)."""
    real, fake = _two_sets(real, fake, "fid")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("fid needs at least two images in each set.")
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.atleast_2d(np.cov(real, rowvar=False)), np.atleast_2d(np.cov(fake, rowvar=False))
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@dataclasses.dataclass
class KIDResult:
    mean: float
    std: float
    subset_size: int      # the size actually used
    requested_subset_size: int

    @property
    def shrunk(self) -> bool:
        return self.subset_size < self.requested_subset_size


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> float:
    """Unbiased MMD^2 with the kernel k(a, b) = (gamma a.b + coef)^degree, gamma = 1/dim by default (Bińkowski et al. 2018)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    kxx = (gamma * x @ x.T + coef) ** degree
    kyy = (gamma * y @ y.T + coef) ** degree
    kxy = (gamma * x @ y.T + coef) ** degree
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> KIDResult:
    """Kernel Inception Distance: mean/std of the unbiased polynomial MMD^2 over random subsets.

    When a set is smaller than ``subset_size`` the subset shrinks to min(n_real, n_fake), as the
    StyleGAN / DFMGAN code does (torchmetrics would raise); the size used is reported.
    """
    real, fake = _two_sets(real, fake, "kid")
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError("kid needs at least two images in each set.")
    rng = np.random.default_rng(seed)
    vals = [polynomial_mmd2(real[rng.choice(len(real), m, replace=False)], fake[rng.choice(len(fake), m, replace=False)],
                            degree, gamma, coef) for _ in range(subsets)]
    return KIDResult(float(np.mean(vals)), float(np.std(vals)), m, subset_size)


# ----------------------------------------------------------------------------- IC-LPIPS

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lpips_distance(model: torch.nn.Module, resize: int | None = 256, batch_size: int = 16) -> Distance:
    """Batched LPIPS between image pairs in [0, 1] (resized to ``resize``); returns (B,) distances."""
    @torch.no_grad()
    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(a), batch_size):
            x, y = a[i:i + batch_size].float(), b[i:i + batch_size].float()
            if resize:
                x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
                y = F.interpolate(y, size=(resize, resize), mode="bilinear", align_corners=False)
            out.append(model(x * 2 - 1, y * 2 - 1).flatten())
        return torch.cat(out)
    return distance


@dataclasses.dataclass(frozen=True)
class ICLPIPSVariant:
    """The choices on which published IC-LPIPS implementations differ. Default: SeaS's setting.

    cluster_cap: images kept per cluster (SeaS 140; DFMGAN 50; others 200), first ones in generation order.
    pairs: "i<j" mean over distinct unordered pairs; "all" mean over the full n x n matrix (self-pairs count 0).
    empty: clusters with fewer than 2 images are "skip"ped or count as "zero".
    """

    backbone: str = "vgg"
    resize: int = 256
    cluster_cap: int = 140
    pairs: str = "i<j"
    empty: str = "skip"


@dataclasses.dataclass
class ICLPIPSResult:
    value: float
    cluster_sizes: list[int]
    variant: ICLPIPSVariant


def ic_lpips(generated: torch.Tensor, targets: torch.Tensor, distance: Distance,
             variant: ICLPIPSVariant = ICLPIPSVariant()) -> ICLPIPSResult:
    """Intra-cluster pairwise LPIPS (Ojha et al. 2021): assign each generated image to its nearest target
    (the real training anomalies) by ``distance``, average the pairwise distance inside each cluster,
    average over clusters."""
    if variant.pairs not in ("i<j", "all") or variant.empty not in ("skip", "zero"):
        raise ValueError(f"ICLPIPSVariant: pairs in ('i<j','all'), empty in ('skip','zero'); got {variant}.")
    n, m = len(generated), len(targets)
    d_to_target = torch.stack([distance(generated, targets[j:j + 1].expand(n, *targets.shape[1:])) for j in range(m)], 1)
    assign = d_to_target.argmin(1)
    values, sizes = [], []
    for j in range(m):
        members = torch.nonzero(assign == j).flatten()[: variant.cluster_cap]
        sizes.append(len(members))
        k = len(members)
        if k < 2:
            if variant.empty == "zero":
                values.append(0.0)
            continue
        ii, jj = torch.triu_indices(k, k, offset=1)
        d = distance(generated[members[ii]], generated[members[jj]])
        total = d.sum().item()
        values.append(total / len(d) if variant.pairs == "i<j" else 2 * total / (k * k))
    if not values:
        raise ValueError("ic_lpips: no cluster holds two generated images; generate more images.")
    return ICLPIPSResult(float(np.mean(values)), sizes, variant)


def ic_lpips_anomaly(generated: torch.Tensor, generated_masks: torch.Tensor, targets: torch.Tensor,
                     target_masks: torch.Tensor, distance: Distance, variant: ICLPIPSVariant = ICLPIPSVariant()) -> ICLPIPSResult:
    """IC-LPIPS(a) (SeaS): IC-LPIPS on images multiplied by their masks, i.e. the diversity of the anomalies alone."""
    return ic_lpips(generated * generated_masks, targets * target_masks, distance, variant)


def ic_lpips_with_model(generated, targets, variant: ICLPIPSVariant = ICLPIPSVariant(), backbone_weights=None,
                        masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> ICLPIPSResult:
    """IC-LPIPS (or IC-LPIPS(a) with ``masks=(generated_masks, target_masks)``) with LPIPS from local weights."""
    from .extractors import load_lpips

    dist = lpips_distance(load_lpips(variant.backbone, backbone_weights), variant.resize)
    if masks is None:
        return ic_lpips(generated, targets, dist, variant)
    return ic_lpips_anomaly(generated, masks[0], targets, masks[1], dist, variant)



def mask_alignment(generated: torch.Tensor, source: torch.Tensor, masks: torch.Tensor, threshold: float = 0.1
                   ) -> torch.Tensor:
    """How well a generated anomaly stays inside its mask: of the pixels that changed from the normal image it was made
    from (largest channel difference > ``threshold`` on [0, 1]), the share inside the mask. ``generated`` and ``source``:
    (B, 3, H, W) in [0, 1]; ``masks``: (B, 1 or none, H, W). Returns (B,); NaN where nothing changed. A generator that
    edits only inside the mask scores 1; one that repaints the whole image scores about the mask's area fraction."""
    changed = (generated.float() - source.float()).abs().amax(1) > threshold          # (B, H, W)
    m = masks.reshape(changed.shape).bool()
    n = changed.flatten(1).sum(1).float()
    inside = (changed & m).flatten(1).sum(1).float()
    return torch.where(n > 0, inside / n.clamp(min=1), torch.full_like(n, float("nan")))
