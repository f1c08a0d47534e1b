"""CUT's equations, next to the paper ("CUT: A Controllable, Universal, and Training-Free Visual Anomaly Generation
Framework", Han Sun, Yunkang Cao, Olga Fink, arXiv:2406.01078; no code under CUT's name, its generation lives on in
the successor AnomalyAny, github.com/EPFL-IMOS/AnomalyAny; built on Attend-and-Excite, arXiv:2301.13826).

Pure tensors: no Hydra, no file I/O (the loop is in ``cut/method.py``).

- Attention aggregation, Eq. 3: :func:`token_maps` (the 16 x 16 cross-attention maps of the conditional branch,
  averaged over layers and heads; Attend-and-Excite's convention: the start token dropped, x100, softmax over the
  remaining tokens) and :func:`smooth` (the Gaussian, in Attend-and-Excite's or the textbook form).
- The attention loss and latent update, Eq. 4: :func:`attention_loss`, :func:`masked_update`.
- The localisation-aware scheduler, Eq. 5, and the early stop: :func:`activated_pixels`, :func:`step_size`,
  :func:`stop_early`; the per-step thresholds of the iterative refinement: :func:`refinement_threshold`.
- The foreground mask ("simple binary thresholding"): :func:`foreground_mask`.
- The coarse pixel annotation: :func:`annotation`.
- VLAD's adapted Dice loss, Eq. 6: :func:`adapted_dice_loss`.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from core.diffusion import isodata_threshold

KERNELS = ("attend_and_excite", "gaussian")


# ------------------------------------------------------------------------------------------------ Eq. 3
def token_maps(maps: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """(B, h, w, L) attention probabilities (the layers' own softmax over tokens, averaged) -> (B, h, w, L - 1):
    the start token dropped, the rest x ``scale`` and softmaxed over the tokens again (Attend-and-Excite), so that
    column k is token k + 1's map."""
    return (maps[..., 1:] * scale).softmax(dim=-1)


def gaussian_kernel(size: int = 3, sigma: float = 0.5, kind: str = "attend_and_excite") -> torch.Tensor:
    """(size, size) kernel summing to 1. ``gaussian``: exp(-d^2 / (2 sigma^2)) per axis. ``attend_and_excite``: that
    code's formula exp(-(d / (2 sigma))^2), i.e. a Gaussian of standard deviation sqrt(2) sigma."""
    if kind not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got '{kind}'")
    d = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(d / (2 * sigma)) ** 2) if kind == "attend_and_excite" else torch.exp(-d ** 2 / (2 * sigma ** 2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def smooth(a: torch.Tensor, size: int = 3, sigma: float = 0.5, kind: str = "attend_and_excite") -> torch.Tensor:
    """(B, h, w) maps convolved with :func:`gaussian_kernel` after reflection padding (the map keeps its size)."""
    k = gaussian_kernel(size, sigma, kind).to(a)
    pad = size // 2
    x = F.pad(a[:, None], (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(x, k[None, None])[:, 0]


# ------------------------------------------------------------------------------------------------ Eq. 4
def attention_loss(a_j: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_att = 1 - max(A_j * mask) per image; ``a_j`` (B, h, w), ``mask`` (B, h, w) at the map's side."""
    return 1 - (a_j * mask).flatten(1).amax(1)


def masked_update(z: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor | float, mask: torch.Tensor
                  ) -> torch.Tensor:
    """z <- z - alpha * grad * mask; ``mask`` (B, 1, h, w) at the latent's side, ``alpha`` a scalar or (B,)."""
    a = torch.as_tensor(alpha, dtype=z.dtype, device=z.device)
    a = a.view(-1, *[1] * (z.ndim - 1)) if a.ndim else a
    return z - a * grad * mask


# ------------------------------------------------------------------------------------------------ Eq. 5
def activated_pixels(a_j: torch.Tensor) -> torch.Tensor:
    """n_t: the number of pixels of each (B, h, w) map above that map's mean."""
    return (a_j > a_j.flatten(1).mean(1)[:, None, None]).flatten(1).sum(1)


def step_size(t: int | float | torch.Tensor, n_t: torch.Tensor, n_start: torch.Tensor, lam: float = 10.0,
              delta: float = 1.0 / 1000) -> torch.Tensor:
    """alpha_t = lambda (1 + Delta_t t) n_t / n_start (Eq. 5): larger early (t large) and while the attention is
    spread over many pixels; ``delta`` = 1 / T."""
    return lam * (1 + delta * float(t)) * n_t.float() / n_start.float().clamp(min=1)


def stop_early(step_index: int, n_t: torch.Tensor, after: int = 10, low: int = 10, high: int = 50) -> torch.Tensor:
    """The early stop of the optimisation (A.1): from step index ``after`` on, once low < n_t < high."""
    if step_index < after:
        return torch.zeros_like(n_t, dtype=torch.bool)
    return (n_t > low) & (n_t < high)


def refinement_threshold(step_index: int, thresholds: Mapping[int, float], rule: str = "attend_and_excite"
                         ) -> float | None:
    """The max-attention threshold the iterative refinement must reach at this step, or None (a single update).
    ``attend_and_excite`` (A.1: "as implemented in [28]"): only at the listed step indices; ``every_step``: at every
    step, the value of the last listed index at or before it (Sec. 4.1: "at each time step, we repeat...")."""
    keys = sorted(int(k) for k in thresholds)
    if rule == "attend_and_excite":
        return float(thresholds[step_index]) if step_index in thresholds else None
    if rule == "every_step":
        past = [k for k in keys if k <= step_index]
        return float(thresholds[past[-1]]) if past else None
    raise ValueError(f"refinement rule must be attend_and_excite or every_step, got '{rule}'")


# ------------------------------------------------------------------------------------------ masks and labels
def foreground_mask(image: torch.Tensor) -> torch.Tensor:
    """Binary foreground of each (B, 3, H, W) image in [0, 1] by thresholding its grey level at the isodata threshold;
    the side holding most of the border pixels is the background. (B, H, W) float."""
    grey = (image * torch.tensor([0.299, 0.587, 0.114], device=image.device)[None, :, None, None]).sum(1)
    above = grey > isodata_threshold(grey)[:, None, None]
    border = torch.cat([above[:, 0], above[:, -1], above[:, :, 0], above[:, :, -1]], dim=1).float().mean(1)
    fg = torch.where((border > 0.5)[:, None, None], ~above, above)
    return fg.float()


def annotation(a_j: torch.Tensor, size: int) -> torch.Tensor:
    """The coarse pixel annotation from the final smoothed map: (B, h, w) -> (B, size, size) in [0, 1], bilinearly
    upsampled and divided by each map's maximum."""
    up = F.interpolate(a_j[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return up / up.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]


# ----------------------------------------------------------------------------------------------------- VLAD
def adapted_dice_loss(target: torch.Tensor, pred: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Eq. 6 per image: Dice = (2 sum(y y_hat) + 1) / (sum(y) + sum(y_hat) + 1), L = 1 - Dice / (Dice + beta)."""
    y, p = target.flatten(1).float(), pred.flatten(1).float()
    dice = (2 * (y * p).sum(1) + 1) / (y.sum(1) + p.sum(1) + 1)
    return 1 - dice / (dice + beta)


__all__ = ["KERNELS", "activated_pixels", "adapted_dice_loss", "annotation", "attention_loss", "foreground_mask",
           "gaussian_kernel", "masked_update", "refinement_threshold", "smooth", "step_size", "stop_early",
           "token_maps"]
