"""Background-aware defect generation: the equations, next to the paper ("Background-Aware Defect Generation for
Robust Industrial Anomaly Detection", arXiv:2411.16767; no official code was released).

Pure tensors and attention edits: no Hydra, no file I/O (the loops will live in ``bgdefect/method.py``).

- Text conditions C1 = [C_def, C_bg] and C2 = [C_m, C_bg] (Sec. 3.1): :func:`two_part_condition`. Each part is a
  separately encoded prompt (its own start / end / padding tokens); the parts are concatenated along the token axis,
  so the cross-attention keys of C1 are the def part's L tokens, then the background part's L tokens.
- Masked cross-attention, Eq. 10-11: :func:`masked_cross_attention` (a ``core.diffusion.RegionTokenMask``): inside the
  resized mask m' the query attends only to the first part (softmax over its tokens: M_def V_def), outside only to the
  background part (M_bg V_bg).
- Masked latent and noise, Eq. 6-7: :func:`noised_pair`; the disentanglement loss, Eq. 5: :func:`disentanglement_loss`;
  Lemma 3.1's background reconstruction: :func:`background_from_masked`.
- Masked DDIM inversion, Eq. 8: :func:`inversion_step`; the start z_T* and the sampling step, Eq. 9:
  :func:`start_latent`, :func:`sampling_step`, with the C2 branch's input a choice (:func:`c2_input`).
- Mask refinement, Eq. 13: :func:`refine_mask`, on the map :class:`DefectAttention` records during sampling
  (:func:`token_positions` finds the defect words' tokens).

Notation: abar_t = ``alphas_cumprod[t]`` (the paper's alpha_t), m the binary latent mask (1 on the defect).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from core.diffusion import RegionTokenMask
from core.diffusion.attention import resize_to_queries
from core.models.tokenizer import token_runs

C2_INPUTS = ("masked", "literal")


# ------------------------------------------------------------------------------------------------ conditions
def two_part_condition(encode, first: Sequence[str], background: Sequence[str]) -> tuple[torch.Tensor, int]:
    """[E(first), E(background)] along the token axis: C1 with ``first`` the defect prompts, C2 with the mask prompts.
    ``encode``: prompts -> (B, L, D) (``SDComponents.encode_prompt``). Returns the (B, 2L, D) condition and L."""
    a, b = encode(list(first)), encode(list(background))
    if a.shape != b.shape:
        raise ValueError(f"The two parts encode to different shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    return torch.cat([a, b], dim=1), a.shape[1]


def masked_cross_attention(mask: torch.Tensor, part_length: int) -> RegionTokenMask:
    """Eq. 10-11 as an attention edit: tokens [0, L) (C_def or C_m) may be attended only where the layer's resized
    mask m' is 1, tokens [L, 2L) (C_bg) only where it is 0. Every key belongs to one part, so each position's softmax
    runs over one part alone: m' * softmax(Q K_def^T) V_def + (1 - m') * softmax(Q K_bg^T) V_bg.
    ``mask``: (B, H, W) in {0, 1} at any resolution (area-resized per layer, then >= 0.5)."""
    L = int(part_length)
    return RegionTokenMask([(range(0, L), mask, True), (range(L, 2 * L), mask, False)])


# ------------------------------------------------------------------------------------------------ Eq. 5-7, Lemma 3.1
def noised_pair(abar_t: torch.Tensor, z0: torch.Tensor, m: torch.Tensor, eps: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6-7: z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps and, for the masked latent z_0^m = (1 - m) z_0 with the
    same noise masked, z_t^m = sqrt(abar_t) z_0^m + sqrt(1 - abar_t) (1 - m) eps; so (1 - m) z_t = z_t^m.
    ``abar_t``: (B,) or a scalar."""
    a = torch.as_tensor(abar_t, dtype=z0.dtype, device=z0.device).reshape(-1, *([1] * (z0.dim() - 1)))
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    z_t_m = a.sqrt() * (1 - m) * z0 + (1 - a).sqrt() * (1 - m) * eps
    return z_t, z_t_m


def disentanglement_loss(eps: torch.Tensor, eps_c1: torch.Tensor, eps_c2: torch.Tensor, m: torch.Tensor
                         ) -> torch.Tensor:
    """Eq. 5: ||m (eps - eps_theta(z_t, t, C1))||^2 + ||(1 - m)(eps - eps_theta(z_t^m, t, C2))||^2, the matching
    loss inside the mask plus the regulariser outside it, averaged over the latent's elements and the batch (SD's
    MSE scale); for a binary m it equals the mean of (eps - m eps_c1 - (1 - m) eps_c2)^2."""
    inside = (m * (eps.float() - eps_c1.float())) ** 2
    outside = ((1 - m) * (eps.float() - eps_c2.float())) ** 2
    return (inside + outside).mean()


def background_from_masked(z_t_m: torch.Tensor, eps_c2: torch.Tensor, abar_t: torch.Tensor | float,
                           m: torch.Tensor) -> torch.Tensor:
    """Lemma 3.1: (1 - m) z_0 = (1 - m) sqrt(1 / abar_t) [z_t^m - sqrt(1 - abar_t) eps_theta(z_t^m, t, C2)] when the
    loss is zero: the background is read from the masked latent alone, without the defect area."""
    a = torch.as_tensor(abar_t, dtype=z_t_m.dtype, device=z_t_m.device).reshape(-1, *([1] * (z_t_m.dim() - 1)))
    return (1 - m) * (z_t_m - (1 - a).sqrt() * eps_c2) / a.sqrt()


# ------------------------------------------------------------------------------------------------ Eq. 8-9
def _coefficient(a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    return (1 / a_to - 1).sqrt() - (1 / a_from - 1).sqrt()


def inversion_step(z_prev: torch.Tensor, eps_c2: torch.Tensor, abar_prev: float | torch.Tensor,
                   abar_t: float | torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eq. 8, one step of the masked DDIM inversion from abar_{t-1} to abar_t (abar_t < abar_{t-1}):
    z~_t^m = sqrt(abar_t) [ z~_{t-1}^m / sqrt(abar_{t-1}) + (1 - m) (sqrt(1/abar_t - 1) - sqrt(1/abar_{t-1} - 1))
    eps_theta(z~_{t-1}^m, t-1, C2) ]: the noise prediction acts only outside the mask, so the mask area of the masked
    normal latent stays 0 along the path."""
    a_p, a_t = (torch.as_tensor(x, dtype=torch.float64) for x in (abar_prev, abar_t))
    c = _coefficient(a_p, a_t).to(z_prev.dtype)
    return a_t.sqrt().to(z_prev.dtype) * (z_prev / a_p.sqrt().to(z_prev.dtype) + (1 - m) * c * eps_c2)


def start_latent(z_T_m: torch.Tensor, m: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The start of generation (Theorem 3.2): z_T* = z~_T^m + m * eps, fresh noise on the defect area."""
    return z_T_m + m * noise


def c2_input(z_t: torch.Tensor, m: torch.Tensor, mode: str = "masked") -> torch.Tensor:
    """The latent the C2 branch of Eq. 9 reads. ``literal``: z_t* as Eq. 9 is printed; ``masked`` (default):
    (1 - m) z_t*, the latent the regulariser trained the C2 branch on (Eq. 7) and the one the proof of
    Proposition 3.3 (appendix Eq. 26-30) uses; only it makes the background's path independent of the defect."""
    if mode == "masked":
        return (1 - m) * z_t
    if mode == "literal":
        return z_t
    raise ValueError(f"method.generate.c2_input must be one of {C2_INPUTS}, got '{mode}'.")


def sampling_step(z_t: torch.Tensor, eps_c1: torch.Tensor, eps_c2: torch.Tensor, abar_t: float | torch.Tensor,
                  abar_prev: float | torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eq. 9, one deterministic DDIM step from abar_t to abar_{t-1} with the combined noise prediction
    (1 - m) eps_theta(., t, C2) + m eps_theta(z_t*, t, C1):
    z*_{t-1} = sqrt(abar_{t-1}) [ z*_t / sqrt(abar_t) + (sqrt(1/abar_{t-1} - 1) - sqrt(1/abar_t - 1)) eps ]."""
    a_t, a_p = (torch.as_tensor(x, dtype=torch.float64) for x in (abar_t, abar_prev))
    c = _coefficient(a_t, a_p).to(z_t.dtype)
    eps = (1 - m) * eps_c2 + m * eps_c1
    return a_p.sqrt().to(z_t.dtype) * (z_t / a_t.sqrt().to(z_t.dtype) + c * eps)


# ------------------------------------------------------------------------------------------------ Eq. 13
def refine_mask(attention: torch.Tensor, m_prime: torch.Tensor, size: int | tuple[int, int],
                threshold: float = 0.5) -> torch.Tensor:
    """Eq. 13: m* = [Resize(m' * A_def) >= 1/2], with A_def (B, h, w) the defect token's cross-attention map
    (softmax over the defect part's tokens; which tokens, layers and steps are averaged is the caller's choice),
    m' (B, h, w) the mask at the map's resolution, Resize bilinear to ``size``. Returns (B, H, W) bool."""
    if attention.shape != m_prime.shape:
        raise ValueError(f"The attention map {tuple(attention.shape)} and the resized mask {tuple(m_prime.shape)} "
                         f"must have one shape.")
    size = (size, size) if isinstance(size, int) else tuple(size)
    up = F.interpolate((m_prime * attention)[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return up[:, 0] >= threshold


def token_positions(tokenizer, prompt: str, words: str) -> list[int]:
    """Positions (in the tokenized ``prompt``, start token at 0) of the tokens of ``words``, which must occur in it
    once as a contiguous run of tokens: the defect word(s) of C_def whose attention Eq. 13 reads."""
    hits = token_runs(tokenizer, prompt, words)
    if len(hits) != 1:
        raise ValueError(f"The words '{words}' occur {len(hits)} times as tokens of the prompt '{prompt}'; the mask "
                         f"refinement reads their attention, so they must occur exactly once. Fix: a "
                         f"method.prompt.defect template with {{defect}} once, or method.generate.refine.tokens=non_start.")
    return list(hits[0])


class DefectAttention:
    """The attention map Eq. 13 refines with, recorded during sampling: for each recorded layer call, the C1 branch's
    attention (rows ``rows`` of the batch) summed over the C_def tokens ``tokens``, averaged over heads; per layer
    the mean over the calls made while :attr:`active`. Under :func:`masked_cross_attention` these probabilities are
    already zero outside each layer's m', so the map is m' * softmax(Q K_def^T) of Eq. 13.

    Duck-types :class:`core.diffusion.AttentionStore` (``record``) for ``attention_control``; keeps running sums, not
    every call's map."""

    def __init__(self, tokens: Sequence[int], rows: slice, layers: Sequence[str]):
        self.tokens, self.rows, self.layers = list(tokens), rows, set(layers)
        self.active = True
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def record(self, layer: str, logits: torch.Tensor, probs: torch.Tensor) -> None:
        if not self.active or layer not in self.layers:
            return
        m = probs[self.rows][..., self.tokens].sum(-1).mean(1).float()   # (B, N)
        self.sums[layer] = self.sums[layer] + m if layer in self.sums else m
        self.counts[layer] = self.counts.get(layer, 0) + 1

    def mean_map(self) -> torch.Tensor:
        """(B, h, w) at the largest recorded side: each layer's mean over its calls, bilinear-resized there, then
        averaged over layers."""
        if not self.sums:
            raise ValueError("No attention was recorded for the mask refinement (no chosen layer ran while recording).")
        maps = []
        for layer, total in self.sums.items():
            m = total / self.counts[layer]
            side = math.isqrt(m.shape[1])
            maps.append(m.reshape(-1, side, side))
        top = max(x.shape[-1] for x in maps)
        maps = [x if x.shape[-1] == top else F.interpolate(x[:, None], size=(top, top), mode="bilinear",
                                                           align_corners=False)[:, 0] for x in maps]
        return torch.stack(maps).mean(0)


def resized_mask(mask: torch.Tensor, side: int, threshold: float = 0.5) -> torch.Tensor:
    """m' of a (B, H, W) mask at a map of ``side`` x ``side``: area average >= ``threshold``, the rule
    :class:`core.diffusion.RegionTokenMask` masks each layer with."""
    return (resize_to_queries(mask, side * side) >= threshold).float().reshape(-1, side, side)


__all__ = ["C2_INPUTS", "DefectAttention", "background_from_masked", "c2_input", "disentanglement_loss",
           "inversion_step", "masked_cross_attention", "noised_pair", "refine_mask", "resized_mask", "sampling_step",
           "start_latent", "token_positions", "two_part_condition"]
