"""DefectDiffu's modules and equations, next to the paper ("Few-shot Defect Image Generation based on Consistency
Modeling", Qingfeng Shi, Jing Wei, Fei Shen, Zhengtao Zhang, arXiv:2408.00372; official code:
github.com/FFDD-diffusion/DefectDiffu).

Pure tensors and ``nn.Module``s: no Hydra, no file I/O.

- Text-guided Disentangled Integrated Architecture (Sec. 3.2): :class:`DefectDiT`, a DiT (:mod:`core.models.dit`)
  whose blocks are split into N background blocks conditioned on c_p ("a photo of {product}"), M defect blocks on c_d
  ("a photo of {defect}") and K fusion blocks on c_f ("a photo of {defect} {product}"); each group's adaLN gets
  t_emb + W y, y the group's (L2-normalised, pooled) text embedding, W one shared linear map (the official code's).
- Defect-block cross-attention (Sec. 3.4, Eq. 5) and the mask generation module: :class:`SpatialCrossAttention`
  and :class:`MaskHead` (the maps of the M defect blocks stacked on the channel axis -> mask features M_f).
- Adaptive attention-enhanced loss (Sec. 3.5, Eq. 7-10): :func:`attention_map`, :func:`attention_ratio`,
  :func:`clip_ratio`, :func:`defect_region_loss`; the mask loss (Eq. 6) and the objective (Eq. 11):
  :func:`defectdiffu_loss`.
- Condition dropout, Algorithm 1: :func:`drop_conditions`.
- Double-free guidance, Eq. 4 and Eq. 12 (zero-shot): :func:`double_free`; the official single-scale form:
  :func:`single_scale`.
- Mask at inference (Sec. 3.4): :func:`average_masks` (averaged over the last steps), binarised by
  :func:`core.diffusion.isodata_threshold`.
- The unified defect names (supplementary Tab. 2), data: :func:`unified_defect`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.models.dit import DiT, unpatchify

GOOD = "good"


# ------------------------------------------------------------------------------------- architecture (Sec. 3.2)
class SpatialCrossAttention(nn.Module):
    """The defect blocks' cross-attention (Eq. 5), as the official code builds it: the context is one vector per
    image (the block's condition t_emb + W y_d), so there is one key; the softmax runs over the *spatial* positions,
    each head a distribution over the patches (a softmax over one key would be 1 everywhere). Output: the
    attention-weighted value at every position, no output projection. Returns (output (N, T, D), maps (N, heads, T))."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, t, d = x.shape
        h = self.heads
        q = self.to_q(self.norm(x)).reshape(n, t, h, d // h)                    # (N, T, h, d')
        k = self.to_k(context).reshape(n, 1, h, d // h)
        v = self.to_v(context).reshape(n, 1, h, d // h)
        logits = (q * k).sum(-1) * (d // h) ** -0.5                            # (N, T, h)
        maps = logits.softmax(dim=1)                                            # over the T positions
        out = (maps[..., None] * v).reshape(n, t, d)
        return out, maps.permute(0, 2, 1)


class MaskHead(nn.Module):
    """The mask generation module: the M defect blocks' maps stacked on the channel axis, (N, T, M * heads) ->
    LayerNorm -> MLP -> linear to p * p * C per token -> unpatchify to mask features M_f (N, C, H, W), C the latent
    channels (the target is the VAE-encoded mask, Eq. 6)."""

    def __init__(self, maps: int, patch: int, channels: int):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.norm = nn.LayerNorm(maps, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(maps, 2 * maps), nn.Linear(2 * maps, maps))
        self.linear = nn.Linear(maps, patch * patch * channels)

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        return unpatchify(self.linear(self.mlp(self.norm(stacked))), self.patch, self.channels)


class DefectDiT(DiT):
    """DiT split into ``groups`` = (N, M, K) background / defect / fusion blocks (paper 10 / 10 / 8 of DiT-XL/2's 28),
    each group conditioned on its own text embedding. ``forward(x, t, y_p, y_d, y_f)`` with (batch, text_dim)
    embeddings returns (model output (N, out_channels, H, W), mask features M_f (N, in_channels, H, W), defect-block
    maps (N, M, heads, T)). The final layer is conditioned on the fusion condition (the last block's)."""

    def __init__(self, groups: Sequence[int] = (10, 10, 8), text_dim: int = 1024, **dit):
        nb, nd, nf = (int(g) for g in groups)
        if min(nb, nd, nf) < 0 or nd < 1 or nb + nd + nf < 1:
            raise ValueError(f"DefectDiT groups (background, defect, fusion) = {tuple(groups)}: each >= 0 and at "
                             f"least one defect block (the mask head reads their attention)")
        dit["depth"] = nb + nd + nf
        dit["num_classes"] = None
        super().__init__(**dit)
        self.groups, self.text_dim = (nb, nd, nf), text_dim
        self.config.update(groups=[nb, nd, nf], text_dim=text_dim)
        hidden, heads = dit.get("hidden_size", 1152), dit.get("num_heads", 16)
        self.y_embedders = nn.Linear(text_dim, hidden)
        self.cross_defect = nn.ModuleList([SpatialCrossAttention(hidden, heads) for _ in range(nd)])
        self.adapt_mask = MaskHead(heads * nd, self.patch_size, self.in_channels)
        for m in (self.y_embedders, *self.cross_defect.modules(), *self.adapt_mask.modules()):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def group_of(self, i: int) -> str:
        nb, nd, _ = self.groups
        return "background" if i < nb else "defect" if i < nb + nd else "fusion"

    def forward(self, x: torch.Tensor, t: torch.Tensor, y_p: torch.Tensor, y_d: torch.Tensor,  # type: ignore[override]
                y_f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        temb = self.t_embedder(t)
        cond = {"background": temb + self.y_embedders(y_p), "defect": temb + self.y_embedders(y_d),
                "fusion": temb + self.y_embedders(y_f)}
        h, maps = self.tokens(x), []
        c = cond["background"]
        for i, block in enumerate(self.blocks):
            group = self.group_of(i)
            c = cond[group]
            if group != "defect":
                h = block(h, c)
                continue
            mod = block.modulation(c)
            h = block.attend(h, mod)
            out, m = self.cross_defect[len(maps)](h, c)
            maps.append(m)
            h = block.feed_forward(h + out, mod)
        stacked = torch.stack(maps, 1)                                          # (N, M, heads, T)
        mask_features = self.adapt_mask(stacked.flatten(1, 2).transpose(1, 2))  # (N, T, M * heads) in
        return self.output(h, c), mask_features, stacked


# --------------------------------------------------------------------------- losses (Sec. 3.4-3.5, Eq. 6-11)
def attention_map(maps: torch.Tensor) -> torch.Tensor:
    """Eq. 7: Map = the mean of the extracted cross-attention maps, (N, M, heads, T) -> (N, T) (over blocks and
    heads; the official code sums the blocks, a factor M that Eq. 8's ratio ignores up to alpha)."""
    return maps.mean(dim=(1, 2))


def attention_ratio(attn_map: torch.Tensor, mask: torch.Tensor, alpha: float = 1e-3) -> torch.Tensor:
    """Eq. 8: Rat = sum (1 - mask) Map / (sum mask Map + alpha) per image. ``attn_map`` (N, T) or (N, h, w);
    ``mask`` the real mask on the map's grid, same shape (binary)."""
    a, m = attn_map.flatten(1), mask.flatten(1).to(attn_map.dtype)
    if a.shape != m.shape:
        raise ValueError(f"attention_ratio: map {tuple(attn_map.shape)} and mask {tuple(mask.shape)} differ")
    return ((1 - m) * a).sum(1) / ((m * a).sum(1) + alpha)


def clip_ratio(rat: torch.Tensor, low: float = 2.0, high: float = 8.0) -> torch.Tensor:
    """Eq. 9: R = 8 if Rat >= 8, Rat if 2 < Rat < 8, 2 if Rat <= 2."""
    return rat.clamp(low, high)


def defect_region_loss(eps_pred: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor, ratio: torch.Tensor
                       ) -> torch.Tensor:
    """Eq. 10 per image: R * || mask * eps_theta - mask * eps ||^2, the squared norm averaged over the latent's
    elements (the normalisation of the MSE term it is added to). ``mask`` (N, 1 or C, h, w) at the latent's size."""
    return ratio * (mask * (eps_pred - eps)).pow(2).flatten(1).mean(1)


def defectdiffu_loss(eps_pred: torch.Tensor, eps: torch.Tensor, mask_latent: torch.Tensor, maps: torch.Tensor,
                     mask_grid: torch.Tensor, mask_features: torch.Tensor, mask_target: torch.Tensor,
                     lam: float = 0.2, alpha: float = 1e-3, clip: tuple[float, float] = (2.0, 8.0),
                     detach_ratio: bool = False) -> dict[str, torch.Tensor]:
    """Eq. 11: ||eps_theta - eps||^2 + loss_d + lambda loss_m, each a batch mean of per-image values.
    ``mask_latent`` the real mask at the latent's size (Eq. 10), ``mask_grid`` at the patch grid (Eq. 8),
    ``mask_target`` the VAE-encoded mask (Eq. 6). ``detach_ratio``: stop the gradient through R (the official code
    lets it flow; the paper does not say)."""
    ratio = clip_ratio(attention_ratio(attention_map(maps), mask_grid, alpha), *clip)
    if detach_ratio:
        ratio = ratio.detach()
    mse = (eps_pred - eps).pow(2).flatten(1).mean(1)
    loss_d = defect_region_loss(eps_pred, eps, mask_latent, ratio)
    loss_m = (mask_features - mask_target).pow(2).flatten(1).mean(1)
    total = mse + loss_d + lam * loss_m
    return {"loss": total.mean(), "mse": mse.mean(), "loss_d": loss_d.mean(), "loss_m": loss_m.mean(),
            "ratio": ratio.mean()}


# ---------------------------------------------------------------------------------- Algorithm 1 (Sec. 3.3)
def drop_conditions(defects: Sequence[str], products: Sequence[str | None], p1: float, p2: float,
                    generator: torch.Generator | None = None) -> tuple[list[str], list[str | None]]:
    """Algorithm 1: with probability p1 the product condition becomes null (None); for a defect sample (its defect is
    not ``good``) then, with probability p2, the defect becomes ``good``, and with probability p1 the product is
    nulled again (as printed: a defect sample loses c_p with probability 1 - (1 - p1)^2). Draws, in this order, per
    sample: one uniform for line 1, and for a defect sample two more (lines 3 and 4)."""
    out_d, out_p = [], []
    for d, p in zip(defects, products):
        u = torch.rand(3, generator=generator)
        if u[0] < p1:
            p = None
        if d != GOOD:
            if u[1] < p2:
                d = GOOD
            if u[2] < p1:
                p = None
        out_d.append(d)
        out_p.append(p)
    return out_d, out_p


def prompts(defect: str, product: str | None, null_product: str = "") -> dict[str, str]:
    """The three conditions of Sec. 3.2 for one sample: c_p "a photo of {product}", c_d "a photo of {defect}", c_f
    "a photo of {defect} {product}". A null product (None) becomes ``null_product``: "" (the paper's empty
    condition: c_p is the empty text, c_f names the defect alone) or a word (the official code's "industry")."""
    if product is None:
        p = null_product
        c_p = f"a photo of {p}" if p else ""
        c_f = f"a photo of {defect} {p}".rstrip()
    else:
        c_p, c_f = f"a photo of {product}", f"a photo of {defect} {product}"
    return {"product": c_p, "defect": f"a photo of {defect}", "fusion": c_f}


# ----------------------------------------------------------------------------- guidance (Eq. 4, Eq. 12)
def double_free(eps_g0: torch.Tensor, eps_gp: torch.Tensor, eps_d0: torch.Tensor, w_p: float, w_d: float
                ) -> torch.Tensor:
    """Eq. 4 (and Eq. 12 with the target product's c_T and a defect learned on other products):
    eps = eps(c_g, 0) + w_p (eps(c_g, c_p) - eps(c_g, 0)) + w_d (eps(c_d, 0) - eps(c_g, 0)), two independent scales:
    w_p the background (product) direction, w_d the defect strength."""
    return eps_g0 + w_p * (eps_gp - eps_g0) + w_d * (eps_d0 - eps_g0)


def single_scale(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """The official code's guidance: its three branches (c_d, c_p), (c_d, 0), (c_g, 0) at one scale w telescope to
    plain classifier-free guidance eps_u + w (eps_c - eps_u) between the full condition and the unconditional."""
    return eps_uncond + w * (eps_cond - eps_uncond)


# ------------------------------------------------------------------------------ masks at inference (Sec. 3.4)
def average_masks(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """M_pre = the mean of the per-step mask predictions (the paper: the last 100 steps of its schedule; which steps
    are passed is the sampler's choice)."""
    if not len(masks):
        raise ValueError("average_masks: no mask predictions were recorded (is the averaging window empty?)")
    return torch.stack(list(masks)).mean(0)


def mask_grid(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A real (N, 1, H, W) binary mask on a ``size`` grid for Eq. 8 / Eq. 10: area-resized, any coverage counts (the
    official code resizes and keeps every non-zero value)."""
    return (F.adaptive_avg_pool2d(mask.float(), size) > 0).float()


# ------------------------------------------------------------------------------------ names (supp. Tab. 2)
def unified_defect(table: Mapping[str, Mapping[str, str]], product: str, defect: str) -> str:
    """The defect's unified name for training (similar defects share a name across products, e.g. poke -> hole, glue
    -> liquid): ``table[product][defect]``, ``good`` stays ``good``. A product or defect the table lacks is an error
    that names it."""
    if defect == GOOD:
        return GOOD
    if product not in table:
        raise KeyError(f"product '{product}' is not in DefectDiffu's defect-name table (products: "
                       f"{', '.join(sorted(table))}). Fix: add it under method.names.{product} with its defect "
                       f"types and their unified names.")
    names = table[product]
    if defect not in names:
        raise KeyError(f"defect type '{defect}' of '{product}' is not in DefectDiffu's defect-name table (has: "
                       f"{', '.join(sorted(names))}). Fix: add method.names.{product}.{defect}: <unified name>.")
    return str(names[defect])


__all__ = ["DefectDiT", "GOOD", "MaskHead", "SpatialCrossAttention", "attention_map", "attention_ratio",
           "average_masks", "clip_ratio", "defect_region_loss", "defectdiffu_loss", "double_free", "drop_conditions",
           "mask_grid", "prompts", "single_scale", "unified_defect"]
