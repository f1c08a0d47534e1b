"""Losses that several packages use identically."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) over the class channel: mean of -alpha_t (1 - p_t)^gamma log p_t.

    logits: (B, C, H, W); target: (B, H, W) class indices (binary mask -> 0/1). Used by DRAEM's discriminative
    network, the downstream U-Net and SeaS's mask branch (Eq. 7).
    """
    logp = F.log_softmax(logits, dim=1)
    logp_t = logp.gather(1, target.long().unsqueeze(1)).squeeze(1)
    loss = -((1 - logp_t.exp()) ** gamma) * logp_t
    if alpha is not None:
        loss = loss * alpha.to(loss)[target.long()]
    return loss.mean()
