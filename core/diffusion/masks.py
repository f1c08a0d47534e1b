"""Turning soft maps (attention, mask-head probabilities) into binary masks."""
from __future__ import annotations

import torch


def isodata_threshold(x: torch.Tensor, tol: float = 1e-4, max_iter: int = 100) -> torch.Tensor:
    """Iterative intermeans (isodata, Ridler & Calvard 1978) threshold of each map in a batch.

    Start at the mean; repeat t <- (mean of values > t + mean of values <= t) / 2 until it moves less than ``tol``.
    ``x``: (B, ...) -> thresholds (B,). A constant map gets its own value (so nothing lies above it).
    """
    flat = x.detach().flatten(1).float()
    t = flat.mean(1)
    for _ in range(max_iter):
        above = flat > t[:, None]
        n_hi, n_lo = above.sum(1), (~above).sum(1)
        m_hi = (flat * above).sum(1) / n_hi.clamp(min=1)
        m_lo = (flat * ~above).sum(1) / n_lo.clamp(min=1)
        new = torch.where((n_hi > 0) & (n_lo > 0), (m_hi + m_lo) / 2, t)
        if (new - t).abs().max() < tol:
            t = new
            break
        t = new
    hi = flat.max(1).values
    return torch.where(hi - flat.min(1).values <= 1e-6 * hi.abs().clamp(min=1), hi, t)  # constant map: nothing above


def binarize(x: torch.Tensor, threshold: float | str = 0.5) -> torch.Tensor:
    """Boolean mask: ``x > threshold`` per element, or per map with ``threshold='isodata'``."""
    if threshold == "isodata":
        t = isodata_threshold(x)
        return x > t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    if isinstance(threshold, str):
        raise ValueError(f"threshold must be a number or 'isodata', got '{threshold}'.")
    return x > threshold


def normalize_minmax(x: torch.Tensor, per_sample: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Min-max to [0, 1], per sample (dims after the first) or over the whole tensor (SeaS's official batch norm)."""
    if per_sample:
        flat = x.flatten(1)
        lo, hi = flat.min(1).values, flat.max(1).values
        shape = (-1,) + (1,) * (x.ndim - 1)
        return (x - lo.view(shape)) / (hi - lo).view(shape).clamp(min=eps)
    return (x - x.min()) / (x.max() - x.min()).clamp(min=eps)
