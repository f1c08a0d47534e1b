"""Which normal image a target mask goes onto.

Methods that put a defect *where a mask says* on a real normal image (background-aware generation, AnomalyDiffusion)
draw the mask and the normal image independently in their papers. On MVTec AD that is harmless: an object is
photographed centred at one size, so a mask drawn on one bottle lies on every bottle. Where objects vary in size or
position (the synthetic world's bottles, VisA's PCBs), an independent draw puts many masks off the object, onto the
backdrop, where no such defect occurs.

:func:`nearest_normals` pairs each mask with the normal images that look most like the anomaly image the mask was
drawn on, compared outside the defect: the same pose and size, so the mask lands where its defect was. No foreground
segmentation and no threshold is involved, and on an aligned dataset it reduces to a draw among similar normals.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest_normals(anomalies: torch.Tensor, masks: torch.Tensor, normals: torch.Tensor, k: int,
                    side: int = 32) -> torch.Tensor:
    """(n, k) indices into ``normals``: for each anomaly image, the ``k`` normal images nearest to it outside its
    defect, nearest first (ties by index).

    ``anomalies`` (n, C, H, W) and ``normals`` (N, C, H', W') are images on one scale; ``masks`` (n, 1, H, W) or
    (n, H, W) the anomalies' defect masks. The distance is the mean squared difference over the pixels of a
    ``side`` x ``side`` grid that the defect does not touch (a cell touched by any defect pixel is left out), so the
    defect itself does not pull its image towards any normal. An anomaly whose defect touches every cell is compared
    over the whole image."""
    if anomalies.ndim != 4 or normals.ndim != 4 or anomalies.shape[1] != normals.shape[1]:
        raise ValueError(f"nearest_normals needs (n, C, H, W) anomalies and (N, C, H', W') normals with the same C, "
                         f"got {tuple(anomalies.shape)} and {tuple(normals.shape)}")
    m = masks if masks.ndim == 4 else masks[:, None]
    if m.shape[0] != anomalies.shape[0] or m.shape[-2:] != anomalies.shape[-2:]:
        raise ValueError(f"nearest_normals: masks {tuple(masks.shape)} do not match anomalies "
                         f"{tuple(anomalies.shape)}")
    if not 1 <= k <= normals.shape[0]:
        raise ValueError(f"nearest_normals: k={k} must be between 1 and the number of normal images "
                         f"({normals.shape[0]})")
    a = F.interpolate(anomalies.float(), size=(side, side), mode="area")
    b = F.interpolate(normals.float(), size=(side, side), mode="area")
    keep = 1 - F.adaptive_max_pool2d((m.float() > 0.5).float(), side)          # (n, 1, side, side)
    keep = torch.where(keep.flatten(1).sum(1, keepdim=True)[..., None, None] > 0, keep, torch.ones_like(keep))
    diff = (a[:, None] - b[None]).pow(2).mean(2)                               # (n, N, side, side)
    dist = (diff * keep).flatten(2).sum(2) / keep.flatten(1).sum(1, keepdim=True)
    order = torch.sort(dist, dim=1, stable=True).indices
    return order[:, :k]


__all__ = ["nearest_normals"]
