"""Image-level anomaly scores from a pixel anomaly map, as each paper's protocol computes them."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def max_score(anomaly_map: torch.Tensor) -> torch.Tensor:
    """SeaS: the maximum of the segmentation map. (B, H, W) -> (B,)."""
    return anomaly_map.flatten(1).max(1).values


def pooled_max_score(anomaly_map: torch.Tensor, kernel: int = 21) -> torch.Tensor:
    """AnomalyDiffusion / DRAEM: the maximum of the map after a ``kernel`` x ``kernel`` average pool (stride 1, zero
    padding counted), which discounts isolated hot pixels. (B, H, W) -> (B,)."""
    pooled = F.avg_pool2d(anomaly_map[:, None], kernel, stride=1, padding=kernel // 2)
    return pooled.flatten(1).max(1).values
