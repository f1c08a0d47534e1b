"""SeaS (Dai et al.): the Unbalanced Abnormal prompt, the DA / NA losses (Eq. 3-6) and the Refined Mask Prediction
branch with its focal loss (Eq. 7). Pure tensors and modules: no Hydra, no file I/O (loops: ``seas/method.py``).

Paper notation kept in comments: A (cross-attention map), M^l (mask at the layer's resolution r), N (anomaly tokens per
type, 4), <ob> / <df_n> (normal / anomaly tokens), F_1, F_2 (U-Net decoder features), F^ (coarse feature).
Every size below is derived from the U-Net / VAE configs, so the same code runs on SD v1-4 at 512 px
(latent 64, DA at 32 and 16, RMP coarse 64 -> refined 512) and on the mini prior at 128 px (latent 32, DA at 16 and 8,
coarse 32 -> refined 128).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.diffusion import AttentionStore, layers_at, normalize_minmax
from core.losses import focal_loss

Convention = Literal["paper", "official"]


# ------------------------------------------------------------------------------------------ Sec. 3.2, A.3: UA prompt
@dataclass(frozen=True)
class UAPrompt:
    """The Unbalanced Abnormal text prompt of one product: one normal token, ``n_tokens`` anomaly tokens per type.

    P_k = "a <ob> with <df_{4k+1}> <df_{4k+2}> <df_{4k+3}> <df_{4k+4}>" for the k-th type (types sorted by name);
    the normal prompt is "a <ob>". Placeholder strings follow the official code: ``ob1`` and ``sks1``, ``sks2``, ...
    """

    types: tuple[str, ...]
    n_tokens: int = 4
    normal_token: str = "ob1"
    anomaly_prefix: str = "sks"
    normal_init: str = "object"    # <ob> starts from the embedding of "object"
    anomaly_init: str = "defect"   # each <df_n> starts from the embedding of "defect"
    ids: dict[str, int] = field(default_factory=dict, compare=False)  # token string -> id, once added

    def __post_init__(self):
        object.__setattr__(self, "types", tuple(sorted(self.types)))
        if not self.types:
            raise ValueError("The UA prompt needs at least one anomaly type.")

    def anomaly_tokens(self, anomaly_type: str) -> list[str]:
        k = self.type_index(anomaly_type)
        return [f"{self.anomaly_prefix}{self.n_tokens * k + n}" for n in range(1, self.n_tokens + 1)]

    def type_index(self, anomaly_type: str) -> int:
        if anomaly_type not in self.types:
            raise KeyError(f"Anomaly type '{anomaly_type}' is not one this model was trained on: {', '.join(self.types)}.")
        return self.types.index(anomaly_type)

    @property
    def all_anomaly_tokens(self) -> list[str]:
        return [t for ty in self.types for t in self.anomaly_tokens(ty)]

    def anomaly_prompt(self, anomaly_type: str) -> str:
        return f"a {self.normal_token} with {' '.join(self.anomaly_tokens(anomaly_type))}"

    @property
    def normal_prompt(self) -> str:
        return f"a {self.normal_token}"

    def prompt(self, anomaly_type: str | None) -> str:
        """The anomaly prompt of ``anomaly_type``, or the normal prompt for ``None``."""
        return self.normal_prompt if anomaly_type is None else self.anomaly_prompt(anomaly_type)

    def to_dict(self) -> dict:
        return {"types": list(self.types), "n_tokens": self.n_tokens, "normal_token": self.normal_token,
                "anomaly_prefix": self.anomaly_prefix, "normal_init": self.normal_init,
                "anomaly_init": self.anomaly_init}


def add_ua_tokens(prompt: UAPrompt, tokenizer, text_encoder) -> dict[str, int]:
    """Insert <ob> and every <df_n> into the tokenizer and the embedding table (A.3: U -> U'), initialised from the
    embeddings of ``prompt.normal_init`` and ``prompt.anomaly_init``. Returns token string -> id (also kept in
    ``prompt.ids``)."""
    from core.models import add_placeholder_tokens

    ids = dict(zip([prompt.normal_token],
                   add_placeholder_tokens(tokenizer, text_encoder, [prompt.normal_token], prompt.normal_init)))
    toks = prompt.all_anomaly_tokens
    ids.update(zip(toks, add_placeholder_tokens(tokenizer, text_encoder, toks, prompt.anomaly_init)))
    prompt.ids.clear()
    prompt.ids.update(ids)
    return ids


def token_positions(prompt: UAPrompt, input_ids: torch.Tensor, anomaly_types: Sequence[str]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where <ob> and the N <df_n> of each row's type sit in the encoded prompts.

    input_ids: (B, L) of anomaly prompts; returns ob (B,) and df (B, N) positions along L.
    """
    if not prompt.ids:
        raise RuntimeError("add_ua_tokens(prompt, tokenizer, text_encoder) must run before token_positions.")
    ob, df = [], []
    for row, ty in zip(input_ids.tolist(), anomaly_types):
        try:
            ob.append(row.index(prompt.ids[prompt.normal_token]))
            df.append([row.index(prompt.ids[t]) for t in prompt.anomaly_tokens(ty)])
        except ValueError:
            raise ValueError(f"A token of the '{ty}' prompt was truncated or split by the tokenizer: "
                             f"{prompt.anomaly_prompt(ty)!r}.") from None
    return torch.tensor(ob), torch.tensor(df)


# --------------------------------------------------------------------------------------------- Eq. 3: the DA loss
def da_layers(unet: nn.Module, latent_size: int, levels: Sequence[int] = (1, 2)) -> dict[int, list[str]]:
    """The cross-attention layers of the U-Net ENCODER that the DA loss reads, grouped by resolution.

    Paper Tab. 13 (l = 2, 3): the encoder blocks at 1/2 and 1/4 of the latent side, i.e. ``down_blocks.1`` and
    ``down_blocks.2`` (32 and 16 on SD v1-4 at 512; 16 and 8 on the mini prior).
    """
    out = {}
    for lv in levels:
        r = latent_size // 2 ** lv
        out[r] = layers_at(unet, latent_size, [r], parts=("down_blocks",))
    return out


def downsample_mask(mask: torch.Tensor, r: int, convention: Convention, latent_size: int) -> torch.Tensor:
    """M^l: the (B, 1, H, W) mask at the layer's r x r resolution, (B, r, r).

    paper: binary, a cell is anomalous when any of its pixels is (area average > 0), so small defects survive.
    official: bilinear resize to the latent side, then max-pooling down to r; soft values kept.
    """
    if convention == "paper":
        return (F.adaptive_avg_pool2d(mask.float(), r) > 0).float()[:, 0]
    m = F.interpolate(mask.float(), size=(latent_size, latent_size), mode="bilinear", align_corners=False)
    k = latent_size // r
    return (F.max_pool2d(m, k) if k > 1 else m)[:, 0]


NormalTarget = Literal["one_minus_m", "zero"]


def da_loss_at(A: torch.Tensor, M: torch.Tensor, ob_pos: torch.Tensor, df_pos: torch.Tensor,
               convention: Convention = "paper", normal_region: Literal["eq1", "gt0"] = "eq1",
               normal_target: NormalTarget = "one_minus_m") -> torch.Tensor:
    """One resolution's term of Eq. 3: || 1/N sum_n A_df^n - M ||^2 + || A_ob (.) M ||^2.

    A: (B, r, r, L) cross-attention averaged over the block's layers and heads; M: (B, r, r) mask at r;
    ob_pos (B,), df_pos (B, N): token positions.

    paper: A is the layer's token softmax; both squared norms are means over the r x r cells (the printed ||.||^2
        would scale with r^2; the mean keeps the resolutions comparable).
    official: A is the spatial softmax (each token's distribution over positions); the normal map and the mean of the
        anomaly maps are each min-max normalised over the whole batch tensor; first term = mean over all cells;
        second = mean of A_ob^2 over the cells where M == 1 (``normal_region='gt0'``: M > 0, the official choice for
        VisA / MVTec 3D), 0 when there is no such cell (the official code returns NaN there). The target of the normal
        map there is 1 - M (``normal_target='one_minus_m'``, the official code: 0 where M == 1, the soft complement
        on the cells that only ``gt0`` adds) or 0 (``'zero'``, Eq. 3's || A_ob (.) M ||).
    """
    B = A.shape[0]
    rows = torch.arange(B, device=A.device)
    A_ob = A[rows, :, :, ob_pos.to(A.device)]                          # (B, r, r) -- advanced index moves B first
    A_df = A.permute(0, 3, 1, 2)[rows[:, None], df_pos.to(A.device)]  # (B, N, r, r)
    A_df = A_df.mean(1)                                                # 1/N sum_n A_df^n
    if convention == "paper":
        return ((A_df - M) ** 2).mean() + ((A_ob * M) ** 2).mean()
    if convention != "official":
        raise ValueError(f"DA loss convention must be 'paper' or 'official', got '{convention}'.")
    A_df, A_ob = normalize_minmax(A_df, per_sample=False), normalize_minmax(A_ob, per_sample=False)
    first = ((A_df - M) ** 2).mean()
    region = M == 1 if normal_region == "eq1" else M > 0
    if normal_target not in ("one_minus_m", "zero"):
        raise ValueError(f"DA normal target must be 'one_minus_m' or 'zero', got '{normal_target}'.")
    target = (1 - M) if normal_target == "one_minus_m" else torch.zeros_like(M)
    second = ((A_ob[region] - target[region]) ** 2).mean() if region.any() else A_ob.sum() * 0
    return first + second


def da_loss(store: AttentionStore, layers: dict[int, list[str]], mask: torch.Tensor, ob_pos: torch.Tensor,
            df_pos: torch.Tensor, latent_size: int, convention: Convention = "paper",
            normal_region: Literal["eq1", "gt0"] = "eq1", n: int | None = None,
            normal_target: NormalTarget = "one_minus_m") -> torch.Tensor:
    """Eq. 3, L_DA = sum over the resolutions l of :func:`da_loss_at`, from the maps recorded in ``store`` (the
    forward pass that just ran). Only the first ``n`` rows of the batch (the anomaly half) count."""
    n = mask.shape[0] if n is None else n
    total = mask.new_zeros(())
    for r, names in layers.items():
        A = store.mean_map(names)[:n]                  # (n, r, r, L): mean over the block's layers and heads
        M = downsample_mask(mask[:n], r, convention, latent_size)
        total = total + da_loss_at(A, M, ob_pos[:n], df_pos[:n], convention, normal_region, normal_target)
    return total


# ----------------------------------------------------------------------------------------- Eq. 4-6: the objective
@dataclass
class SeaSLoss:
    """The terms of Eq. 6, L = L_df + L_ob with L_df = L_DA + L_SD (Eq. 4) and L_ob the NA loss (Eq. 5)."""

    sd: torch.Tensor   # || eps_df - eps_theta(z_df, t_df, e_df) ||^2 on the anomaly half
    na: torch.Tensor   # || eps_ob - eps_theta(z_ob, t_ob, e_ob) ||^2 on the normal half, normal prompt "a <ob>"
    da: torch.Tensor   # Eq. 3 on the anomaly half

    @property
    def total(self) -> torch.Tensor:
        return self.sd + self.da + self.na


def seas_loss(eps_pred: torch.Tensor, eps: torch.Tensor, n_anomaly: int, da: torch.Tensor,
              da_weight: float = 1.0) -> SeaSLoss:
    """Split the mixed batch ``[anomalies; normals]`` of one forward pass into the terms of Eq. 4-6."""
    sd = F.mse_loss(eps_pred[:n_anomaly].float(), eps[:n_anomaly].float())
    na = F.mse_loss(eps_pred[n_anomaly:].float(), eps[n_anomaly:].float()) if eps.shape[0] > n_anomaly \
        else eps_pred.sum() * 0
    return SeaSLoss(sd=sd, na=na, da=da_weight * da)


# ------------------------------------------------------------------------- Sec. 3.3: Refined Mask Prediction (RMP)
# Built as the official code builds it (HUST-SLOW/SeaS, models/modules/_RMP.py); the paper's Fig. 4 leaves widths,
# block internals and the head unstated.
def conv_bn_relu(c_in: int, c_out: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def bottleneck(c: int) -> nn.Sequential:
    """1x1 - 3x3 - 1x1, each conv-BN-ReLU, width kept."""
    return nn.Sequential(conv_bn_relu(c, c, 1), conv_bn_relu(c, c, 3), conv_bn_relu(c, c, 1))


class CoarseFeatureExtraction(nn.Module):
    """F_1 (up_blocks.1 output) and F_2 (up_blocks.2 output) -> plain 1x1 convs to c_1 / c_2 channels, F_1 upsampled
    bilinearly to F_2's size, concatenated, four self-attention transformer layers -> F^ (B, c_1 + c_2, h, w).

    The transformer is diffusers' ``Transformer2DModel`` (GroupNorm, 1x1 proj_in / proj_out, pre-norm self-attention
    + GEGLU blocks, residual), ``heads`` x (dim / heads), as the official code's ``mid_attn_block``."""

    def __init__(self, in_channels: tuple[int, int], channels: tuple[int, int] = (128, 64), layers: int = 4,
                 heads: int = 8, norm_groups: int = 32):
        super().__init__()
        from diffusers import Transformer2DModel

        dim = sum(channels)
        if dim % heads or dim % norm_groups:
            raise ValueError(f"The RMP transformer width {dim} (coarse_channels {list(channels)}) must be divisible by "
                             f"heads={heads} and norm_groups={norm_groups}.")
        self.proj1 = nn.Conv2d(in_channels[0], channels[0], 1, bias=False)
        self.proj2 = nn.Conv2d(in_channels[1], channels[1], 1, bias=False)
        self.transformer = Transformer2DModel(num_attention_heads=heads, attention_head_dim=dim // heads,
                                              in_channels=dim, num_layers=layers, norm_num_groups=norm_groups)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.interpolate(self.proj1(f1), size=f2.shape[-2:], mode="bilinear", align_corners=False),
                       self.proj2(f2)], dim=1)
        return self.transformer(x, return_dict=False)[0]                             # F^: (B, c_1 + c_2, h, w)


class MaskRefinementModule(nn.Module):
    """MRM (Fig. 4): x = F^ (or the previous MRM's output) upsampled to the VAE feature's size (x2 on SD);
    a = B_1(x), s = a + P(x) + B_2(a) with B_1, B_2 1x1-3x3-1x1 bottlenecks and P a 1x1 conv block;
    out = V(f_vae) (.) s + x, V a 1x1 conv-BN-ReLU projection of the VAE feature. Width kept throughout.

    (The official module also defines a ninth conv, ``conv6``, that its forward never uses: not built here.)"""

    def __init__(self, c_vae: int, c: int):
        super().__init__()
        self.chain1, self.chain2 = bottleneck(c), bottleneck(c)
        self.skip = conv_bn_relu(c, c, 1)
        self.vae_proj = conv_bn_relu(c_vae, c, 1)

    def forward(self, x: torch.Tensor, vae_feat: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=vae_feat.shape[-2:], mode="bilinear", align_corners=True)
        a = self.chain1(x)
        s = a + self.skip(x) + self.chain2(a)
        return self.vae_proj(vae_feat) * s + x


class RefinedMaskPrediction(nn.Module):
    """The RMP branch: coarse feature extraction on U-Net features, three MRMs on VAE-decoder features, and one head
    (BN-ReLU-3x3 conv to 2 classes) shared by the coarse and the refined predictions.

    unet_channels: channels of U-Net ``up_blocks.1`` / ``.2`` outputs (SD v1: 1280, 640);
    vae_channels: channels of VAE decoder ``up_blocks.0/1/2`` outputs (SD v1: 512, 512, 256).
    At SD size (coarse 128 + 64): 5.45 M parameters (the official 6.45 M include 1.00 M in the unused conv6).
    """

    def __init__(self, unet_channels: tuple[int, int], vae_channels: Sequence[int],
                 coarse_channels: tuple[int, int] = (128, 64), transformer_layers: int = 4, heads: int = 8,
                 norm_groups: int = 32):
        super().__init__()
        if len(vae_channels) != 3:
            raise ValueError(f"The RMP branch has 3 MRMs; got {len(vae_channels)} VAE features.")
        dim = sum(coarse_channels)
        self.coarse = CoarseFeatureExtraction(unet_channels, coarse_channels, transformer_layers, heads, norm_groups)
        self.mrms = nn.ModuleList(MaskRefinementModule(v, dim) for v in vae_channels)
        self.head = nn.Sequential(nn.BatchNorm2d(dim), nn.ReLU(), nn.Conv2d(dim, 2, 3, padding=1))

    @staticmethod
    def feature_names(unet: nn.Module, vae: nn.Module) -> tuple[list[str], list[str]]:
        """The U-Net decoder blocks (up-2, up-3 in the paper's 1-based naming) and VAE decoder blocks read."""
        return ["up_blocks.1", "up_blocks.2"], [f"decoder.up_blocks.{i}" for i in range(3)]

    @classmethod
    def for_models(cls, unet_config, vae_config, **kw) -> "RefinedMaskPrediction":
        """Sizes from the U-Net / VAE configs: up_blocks.i outputs reversed(block_out_channels)[i] channels."""
        u = list(reversed(unet_config["block_out_channels"]))
        v = list(reversed(vae_config["block_out_channels"]))
        if len(v) < 3:
            raise ValueError(f"The VAE decoder has {len(v)} up-blocks; the RMP branch needs 3.")
        return cls((u[1], u[2]), v[:3], **kw)

    def forward(self, unet_feats: Sequence[torch.Tensor], vae_feats: Sequence[torch.Tensor] | None = None,
                rest_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> coarse logits (B, 2, h, w) at F_2's size, and refined logits at the last VAE feature's size.

        The first b rows (b = the VAE features' batch) are refined through the MRMs. With ``rest_size``, the other
        B - b rows (the normal images of Eq. 7, which have no VAE features in training) get F^ upsampled to
        ``rest_size`` through the same head, and the refined output has all B rows, as the official training does.
        Softmax channel 1 = anomaly."""
        f_hat = self.coarse(*unet_feats)
        if vae_feats is None:
            return self.head(f_hat), None
        x = f_hat[:vae_feats[0].shape[0]]
        for mrm, v in zip(self.mrms, vae_feats):
            x = mrm(x, v)
        if rest_size is not None and x.shape[0] < f_hat.shape[0]:
            rest = F.interpolate(f_hat[x.shape[0]:], size=rest_size, mode="bilinear", align_corners=False)
            x = torch.cat([x, rest])
        refined = self.head(x)  # before the coarse call, as the official code: the BN running statistics follow
        return self.head(f_hat), refined


TargetRule = Literal["official", "area"]


def rmp_targets(mask: torch.Tensor, size: tuple[int, int], rule: TargetRule = "official",
                normalize: bool = False) -> torch.Tensor:
    """The class targets (B, h, w) of Eq. 7 from (soft) masks (B, 1, S, S) in [0, 1].

    official: bilinear resampling to ``size`` (identity at the mask's own size), then truncation to an integer:
        only cells whose value is exactly 1 are anomalous. ``normalize`` (official for VisA / MVTec 3D, whose tiny
        defects leave no exact 1 after resizing): the resampled masks are divided by their batch maximum. (The
        official code divides before resampling too; resampling is linear, so that first division changes nothing.)
    area: the area average over each cell > 0.5 (the toolkit's earlier rule: tiny defects vanish at coarse sizes).
    """
    m = mask.float()
    if rule == "area":
        return (F.interpolate(m, size=size, mode="area") > 0.5)[:, 0].long()
    if rule != "official":
        raise ValueError(f"RMP target rule must be 'official' or 'area', got '{rule}'.")
    r = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    if normalize and r.max() > 0:
        r = r / r.max()
    return r[:, 0].long()  # truncation toward zero, as the official focal loss's .long()


def rmp_loss(coarse: torch.Tensor, refined: torch.Tensor, mask_df: torch.Tensor, gamma: float = 2.0,
             rule: TargetRule = "official", normalize: bool = False) -> torch.Tensor:
    """Eq. 7: F(M^_df, M_df) + F(M^_ob, 0) + F(M^'_df, M'_df) + F(M^'_ob, 0), F = focal loss (gamma 2).

    coarse (B, 2, h, w) and refined (B, 2, H, W) logits of [anomalies; normals] (the normals' refined rows are the
    upsampled coarse features, :meth:`RefinedMaskPrediction.forward` with ``rest_size``); mask_df (Ba, 1, S, S).
    As in the official code each of the two focal losses is one mean over the whole [anomalies; normals] batch,
    i.e. Eq. 7's four terms / 2 when the halves have equal size.
    """
    Ba, B = mask_df.shape[0], coarse.shape[0]
    zeros = lambda x: x.new_zeros(B - Ba, *x.shape[-2:], dtype=torch.long)  # noqa: E731
    t_low = torch.cat([rmp_targets(mask_df, tuple(coarse.shape[-2:]), rule, normalize), zeros(coarse)])
    t_high = torch.cat([rmp_targets(mask_df, tuple(refined.shape[-2:]), rule, normalize), zeros(refined)])
    return focal_loss(coarse, t_low, gamma) + focal_loss(refined, t_high, gamma)


def anomaly_probability(logits: torch.Tensor) -> torch.Tensor:
    """Softmax channel 1 of 2-class logits (B, 2, H, W) -> (B, H, W)."""
    return logits.float().softmax(1)[:, 1]


def official_start_signal(scaling_factor: float = 0.18215, T: int = 1500, beta_start: float = 0.00085,
                          beta_end: float = 0.012) -> float:
    """The official inference start (A.3, "t = 1500") as a signal coefficient on the *scaled* latent.

    The official code builds a 1500-point scaled-linear schedule between SD's beta endpoints and noises the UNSCALED
    VAE latent with its last abar: x_T = sqrt(abar_1500) z / s + sqrt(1 - abar_1500) eps, i.e. 0.098 z + 0.9998 eps for
    SD (s = 0.18215), then runs the full 25-step schedule from t = 999.
    """
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    return float(torch.cumprod(1 - betas, 0)[-1].sqrt() / scaling_factor)


__all__ = ["CoarseFeatureExtraction", "MaskRefinementModule", "RefinedMaskPrediction", "SeaSLoss", "UAPrompt",
           "add_ua_tokens", "anomaly_probability", "da_layers", "da_loss", "da_loss_at", "downsample_mask",
           "official_start_signal", "rmp_loss", "rmp_targets", "seas_loss", "token_positions"]
