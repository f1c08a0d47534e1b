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


def da_loss_at(A: torch.Tensor, M: torch.Tensor, ob_pos: torch.Tensor, df_pos: torch.Tensor,
               convention: Convention = "paper", normal_region: Literal["eq1", "gt0"] = "eq1") -> torch.Tensor:
    """One resolution's term of Eq. 3: || 1/N sum_n A_df^n - M ||^2 + || A_ob (.) M ||^2.

    A: (B, r, r, L) cross-attention averaged over the block's layers and heads; M: (B, r, r) mask at r;
    ob_pos (B,), df_pos (B, N): token positions.

    paper: A is the layer's token softmax; both squared norms are means over the r x r cells (the printed ||.||^2
        would scale with r^2; the mean keeps the resolutions comparable).
    official: A is the spatial softmax (each token's distribution over positions); the normal map and the mean of the
        anomaly maps are each min-max normalised over the whole batch tensor; first term = mean over all cells;
        second = mean of A_ob^2 over the cells where M == 1 (``normal_region='gt0'``: M > 0, the official choice for
        VisA / MVTec 3D), 0 when there is no such cell (the official code returns NaN there).
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
    second = (A_ob[region] ** 2).mean() if region.any() else A_ob.sum() * 0
    return first + second


def da_loss(store: AttentionStore, layers: dict[int, list[str]], mask: torch.Tensor, ob_pos: torch.Tensor,
            df_pos: torch.Tensor, latent_size: int, convention: Convention = "paper",
            normal_region: Literal["eq1", "gt0"] = "eq1", n: int | None = None) -> torch.Tensor:
    """Eq. 3, L_DA = sum over the resolutions l of :func:`da_loss_at`, from the maps recorded in ``store`` (the
    forward pass that just ran). Only the first ``n`` rows of the batch (the anomaly half) count."""
    n = mask.shape[0] if n is None else n
    total = mask.new_zeros(())
    for r, names in layers.items():
        A = store.mean_map(names)[:n]                  # (n, r, r, L): mean over the block's layers and heads
        M = downsample_mask(mask[:n], r, convention, latent_size)
        total = total + da_loss_at(A, M, ob_pos[:n], df_pos[:n], convention, normal_region)
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
def conv_bn_relu(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class TransformerLayer(nn.Module):
    """Pre-norm self-attention + MLP over the positions of a feature map (SDPA, so it also runs on the meta device)."""

    def __init__(self, dim: int, heads: int = 8, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, HW, C)
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class CoarseFeatureExtraction(nn.Module):
    """F_1 (up_blocks.1 output) and F_2 (up_blocks.2 output) -> 1x1 conv blocks to c_1 / c_2 channels, F_1 upsampled to
    F_2's size, concatenated, four transformer layers -> F^ (B, c_1 + c_2, h, w), plus the coarse 2-class logits."""

    def __init__(self, in_channels: tuple[int, int], channels: tuple[int, int] = (128, 64), layers: int = 4,
                 heads: int = 8):
        super().__init__()
        self.proj1 = conv_bn_relu(in_channels[0], channels[0], 1)
        self.proj2 = conv_bn_relu(in_channels[1], channels[1], 1)
        dim = sum(channels)
        self.blocks = nn.ModuleList(TransformerLayer(dim, heads) for _ in range(layers))
        self.head = nn.Conv2d(dim, 2, 1)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = f2.shape[-2:]
        x = torch.cat([F.interpolate(self.proj1(f1), size=(h, w), mode="bilinear", align_corners=False),
                       self.proj2(f2)], dim=1)
        B, C = x.shape[:2]
        t = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        for blk in self.blocks:
            t = blk(t)
        f_hat = t.transpose(1, 2).reshape(B, C, h, w)
        return f_hat, self.head(f_hat)


class MaskRefinementModule(nn.Module):
    """MRM (Fig. 4): upsample the discriminative feature to the VAE feature's size; two chained conv blocks plus a 1x1
    branch, summed; multiplied element-wise with the (projected) VAE feature; a 3x3 fusion conv; residual."""

    def __init__(self, c_in: int, c_vae: int, c_out: int):
        super().__init__()
        self.chain = nn.Sequential(conv_bn_relu(c_in, c_out), conv_bn_relu(c_out, c_out))
        self.local = nn.Conv2d(c_in, c_out, 1)
        self.vae_proj = nn.Conv2d(c_vae, c_out, 1)
        self.fuse = conv_bn_relu(c_out, c_out)

    def forward(self, x: torch.Tensor, vae_feat: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=vae_feat.shape[-2:], mode="bilinear", align_corners=False)
        s = self.chain(x) + self.local(x)
        return self.fuse(s * self.vae_proj(vae_feat)) + s


class RefinedMaskPrediction(nn.Module):
    """The RMP branch: coarse feature extraction on U-Net features, three MRMs on VAE-decoder features, a 3x3 head.

    unet_channels: channels of U-Net ``up_blocks.1`` / ``.2`` outputs (SD v1: 1280, 640);
    vae_channels: channels of VAE decoder ``up_blocks.0/1/2`` outputs (SD v1: 512, 512, 256).
    """

    def __init__(self, unet_channels: tuple[int, int], vae_channels: Sequence[int],
                 coarse_channels: tuple[int, int] = (128, 64), mrm_channels: Sequence[int] = (128, 64, 32),
                 transformer_layers: int = 4, heads: int = 8):
        super().__init__()
        if len(vae_channels) != len(mrm_channels):
            raise ValueError(f"{len(vae_channels)} VAE features but {len(mrm_channels)} MRM widths.")
        self.coarse = CoarseFeatureExtraction(unet_channels, coarse_channels, transformer_layers, heads)
        c_in = [sum(coarse_channels), *mrm_channels[:-1]]
        self.mrms = nn.ModuleList(MaskRefinementModule(a, v, o) for a, v, o in zip(c_in, vae_channels, mrm_channels))
        self.head = nn.Conv2d(mrm_channels[-1], 2, 3, padding=1)

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

    def forward(self, unet_feats: Sequence[torch.Tensor], vae_feats: Sequence[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> coarse logits (B, 2, h, w) at F_2's size and refined logits (b, 2, H, W) at the last VAE feature's
        size for the first b rows, b = the VAE features' batch (None without VAE features: the normal-image path of
        Eq. 7 needs only the coarse prediction). Softmax channel 1 = anomaly."""
        x, coarse = self.coarse(*unet_feats)
        if vae_feats is None:
            return coarse, None
        x = x[:vae_feats[0].shape[0]]
        for mrm, v in zip(self.mrms, vae_feats):
            x = mrm(x, v)
        return coarse, self.head(x)


def rmp_loss(coarse_df: torch.Tensor, refined_df: torch.Tensor, mask_df: torch.Tensor,
             coarse_ob: torch.Tensor | None, size: tuple[int, int], gamma: float = 2.0) -> torch.Tensor:
    """Eq. 7: F(M^_df, M_df) + F(M^_ob, 0) + F(M^'_df, M'_df) + F(M^'_ob, 0), F = focal loss (gamma 2).

    coarse_df (Ba, 2, h, w), refined_df (Ba, 2, H, W) logits of the anomaly images, mask_df (Ba, 1, H, W) binary;
    coarse_ob (Bn, 2, h, w) of the normal images, whose refined prediction M^'_ob is the coarse one upsampled to
    ``size`` (the paper's normal path). The low-resolution target M_df is the mask area-averaged to h x w and
    thresholded at 0.5.
    """
    h, w = coarse_df.shape[-2:]
    m_low = (F.adaptive_avg_pool2d(mask_df.float(), (h, w)) > 0.5)[:, 0]
    m_high = F.interpolate(mask_df.float(), size=refined_df.shape[-2:], mode="nearest")[:, 0] > 0.5
    loss = focal_loss(coarse_df, m_low, gamma) + focal_loss(refined_df, m_high, gamma)
    if coarse_ob is not None and coarse_ob.shape[0]:
        up = F.interpolate(coarse_ob, size=size, mode="bilinear", align_corners=False)
        zeros_low = coarse_ob.new_zeros(coarse_ob.shape[0], *coarse_ob.shape[-2:], dtype=torch.long)
        zeros_high = coarse_ob.new_zeros(coarse_ob.shape[0], *size, dtype=torch.long)
        loss = loss + focal_loss(coarse_ob, zeros_low, gamma) + focal_loss(up, zeros_high, gamma)
    return loss


def anomaly_probability(logits: torch.Tensor) -> torch.Tensor:
    """Softmax channel 1 of 2-class logits (B, 2, H, W) -> (B, H, W)."""
    return logits.float().softmax(1)[:, 1]


def official_start_signal(scaling_factor: float = 0.18215, T: int = 1500, beta_start: float = 0.00085,
                          beta_end: float = 0.012) -> float:
    """The official inference start (A.3, "t = 1500") as a signal coefficient on the *scaled* latent.

    The official code extends SD's scaled-linear betas to 1500 steps and noises the UNSCALED VAE latent:
    x_T = sqrt(abar_1500) z / s + sqrt(1 - abar_1500) eps, i.e. about 0.098 z + 1.0 eps for SD (s = 0.18215).
    """
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    return float(torch.cumprod(1 - betas, 0)[-1].sqrt() / scaling_factor)


__all__ = ["CoarseFeatureExtraction", "MaskRefinementModule", "RefinedMaskPrediction", "SeaSLoss", "UAPrompt",
           "add_ua_tokens", "anomaly_probability", "da_layers", "da_loss", "da_loss_at", "downsample_mask",
           "official_start_signal", "rmp_loss", "seas_loss", "token_positions"]
