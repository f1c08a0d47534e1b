"""AnomalyDiffusion's modules and equations, next to the paper ("AnomalyDiffusion: Few-Shot Anomaly Image Generation
with Diffusion Model", Hu et al., AAAI 2024, arXiv:2312.05767; official code: github.com/sjtuplayer/anomalydiffusion).

Pure tensors and ``nn.Module``s: no Hydra, no file I/O (the loops are in ``anomalydiffusion/method.py``).

- Spatial anomaly embedding e = {e_a, e_s} (Sec. 3.2): :class:`AnomalyEmbeddings` (e_a: k tokens per (product,
  anomaly type)), the spatial encoder E (mask -> n tokens e_s): :class:`FPNSpatialEncoder` (the paper: ResNet + FPN +
  one fully connected head per token) or :class:`PSPSpatialEncoder` (the official code: a pSp-style IR-50 encoder);
  :class:`EmbeddingPrompt` splices [e_a, e_s] into the text encoder's input embeddings in place of "*".
- The masked diffusion loss, Eq. 5: :func:`masked_diffusion_loss`.
- Blended diffusion, Eq. 1: :func:`blend`.
- Adaptive Attention Re-weighting (Sec. 3.3): the paper's Eq. 7-8 (:func:`aar_weights_paper`) and the official
  variant (:func:`aar_weights_official`), both applied through :class:`core.diffusion.TokenReweight`.
- The mask generator's filter (Sec. 3.4): :func:`binarize_generated_mask`, :func:`hugs_border`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------- the prompt (Sec. 3.2)
class AnomalyEmbeddings(nn.Module):
    """e_a: one learned embedding of ``k`` tokens per (product, anomaly type) key ("bottle/crack"), in the text
    encoder's input-embedding space (textual inversion). Initialised from an initializer word's embedding (the
    official code: "sculpture"), as textual inversion does."""

    def __init__(self, keys: Sequence[str], k: int, dim: int, init: torch.Tensor | None = None):
        super().__init__()
        if k < 1:
            raise ValueError(f"The anomaly embedding needs at least one token, got k={k}.")
        self.keys = list(keys)
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"Duplicate (product, type) keys: {self.keys}.")
        w = torch.randn(len(self.keys), k, dim) * 0.02 if init is None else init.detach().reshape(1, 1, dim).repeat(
            len(self.keys), k, 1).clone()
        self.weight = nn.Parameter(w.float())

    @property
    def k(self) -> int:
        return self.weight.shape[1]

    def index(self, keys: Sequence[str]) -> torch.Tensor:
        missing = [x for x in keys if x not in self.keys]
        if missing:
            raise KeyError(f"No anomaly embedding for {missing}; this model has {self.keys}.")
        return torch.tensor([self.keys.index(x) for x in keys], device=self.weight.device)

    def forward(self, keys: Sequence[str]) -> torch.Tensor:
        """(B, k, D): the embeddings of ``keys``; they do not depend on where the anomaly is."""
        return self.weight[self.index(keys)]


def mask_to_encoder_input(mask: torch.Tensor) -> torch.Tensor:
    """A (B, 1, H, W) mask in [0, 1] -> (B, 3, H, W) in [-1, 1], the spatial encoder's input (official: x * 2 - 1,
    repeated to three channels)."""
    return (mask.float() * 2 - 1).expand(-1, 3, -1, -1)


class _TokenHead(nn.Module):
    """One token of e_s from a fused feature map: 1x1 conv to ``channels``, adaptive average pooling to a ``grid`` x
    ``grid`` map (which keeps *where* the mask is), flatten, a fully connected layer to the embedding width."""

    def __init__(self, in_channels: int, dim: int, channels: int = 32, grid: int = 8):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.ReLU())
        self.grid = grid
        self.fc = nn.Linear(channels * grid * grid, dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.reduce(f), self.grid).flatten(1))


class FPNSpatialEncoder(nn.Module):
    """The paper's spatial encoder E (Sec. 3.2): a ResNet (ResNet-50 in the paper; timm, randomly initialised: no
    weights are downloaded) extracts features at strides 4-32, a Feature Pyramid Network (Lin et al. 2017: lateral 1x1
    convs, top-down nearest upsampling and sums, 3x3 smoothing) fuses them, and ``n_tokens`` fully connected heads
    each predict one token of e_s from the finest fused map."""

    def __init__(self, n_tokens: int, dim: int, backbone: str = "resnet50", fpn_channels: int = 256,
                 head_channels: int = 32, head_grid: int = 8):
        super().__init__()
        import timm

        self.body = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        chans = self.body.feature_info.channels()
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_channels, 1) for c in chans)
        self.smooth = nn.Conv2d(fpn_channels, fpn_channels, 3, padding=1)
        self.heads = nn.ModuleList(_TokenHead(fpn_channels, dim, head_channels, head_grid) for _ in range(n_tokens))

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) binary mask -> e_s (B, n, D)."""
        feats = self.body(mask_to_encoder_input(mask))
        p = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            p = F.interpolate(p, size=f.shape[-2:], mode="nearest") + lat(f)
        p = self.smooth(p)
        return torch.stack([h(p) for h in self.heads], dim=1)


class IRBottleneck(nn.Module):
    """The IR unit of ArcFace's IR-50 (the pSp encoder's backbone): BN, 3x3 conv, PReLU, 3x3 conv (stride), BN, plus a
    shortcut (identity, subsampled by a 1x1 max-pool, or a strided 1x1 conv + BN when the width changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.shortcut = (nn.MaxPool2d(1, stride) if c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))
        self.res = nn.Sequential(nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.PReLU(c_out),
                                 nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(x) + self.shortcut(x)


class _StyleHead(nn.Module):
    """pSp's GradualStyleBlock: stride-2 3x3 convs (LeakyReLU) down to 1x1, then a linear layer (pSp's EqualLinear
    with lr_mul 1 is a linear layer with a scaled initialisation; a plain one here)."""

    def __init__(self, c_in: int, dim: int, side: int):
        super().__init__()
        n = max(int(math.ceil(math.log2(max(side, 1)))), 1)
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv2d(c_in if i == 0 else dim, dim, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).flatten(1))


class PSPSpatialEncoder(nn.Module):
    """The official spatial encoder: pSp's GradualStyleEncoder on an IR-50 body (units 3/4/14/3, widths
    64/128/256/512, every stage starting with a stride-2 unit), randomly initialised. The outputs of stages 2, 3 and 4
    (c1, c2, c3) are merged FPN-style to ``widths[-1]`` channels at stage 2's resolution (p1 = c3 upsampled + 1x1(c2),
    upsampled + 1x1(c1), bilinear, align_corners) and each of the ``n_tokens`` heads maps p1 to one token. The
    defaults are the official sizes; ``units`` / ``widths`` shrink it for small priors."""

    def __init__(self, n_tokens: int, dim: int, resolution: int, units: Sequence[int] = (3, 4, 14, 3),
                 widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        if len(units) != 4 or len(widths) != 4:
            raise ValueError(f"The IR body has four stages: got units={list(units)}, widths={list(widths)}.")
        self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                         nn.PReLU(widths[0]))
        stages, c = [], widths[0]
        for n, w in zip(units, widths):
            blocks = [IRBottleneck(c, w, 2)] + [IRBottleneck(w, w, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c = w
        self.stages = nn.ModuleList(stages)
        self.lat2 = nn.Conv2d(widths[2], widths[3], 1)
        self.lat1 = nn.Conv2d(widths[1], widths[3], 1)
        side = resolution // 4   # p1: stage 2's output
        self.heads = nn.ModuleList(_StyleHead(widths[3], dim, side) for _ in range(n_tokens))

    @staticmethod
    def _up_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(mask_to_encoder_input(mask))
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        c1, c2, c3 = outs[1], outs[2], outs[3]
        p1 = self._up_add(self._up_add(c3, self.lat2(c2)), self.lat1(c1))
        return torch.stack([h(p1) for h in self.heads], dim=1)


def build_spatial_encoder(kind: str, n_tokens: int, dim: int, resolution: int, **options) -> nn.Module:
    """``fpn`` (the paper) or ``psp`` (the official code); options are the class's keyword arguments."""
    if n_tokens < 1:
        raise ValueError(f"The spatial embedding needs at least one token, got n={n_tokens}.")
    if kind == "fpn":
        keys = ("backbone", "fpn_channels", "head_channels", "head_grid")
        return FPNSpatialEncoder(n_tokens, dim, **{k: v for k, v in options.items() if k in keys and v is not None})
    if kind == "psp":
        kw = {k: tuple(options[k]) for k in ("units", "widths") if options.get(k) is not None}
        return PSPSpatialEncoder(n_tokens, dim, resolution, **kw)
    raise ValueError(f"method.model.spatial_encoder must be 'fpn' (paper: ResNet + FPN) or 'psp' (official: pSp "
                     f"IR-50), got '{kind}'.")


class EmbeddingPrompt:
    """The text condition with e = [e_a, e_s] in place of the template's "*" (the official embedding manager
    inserts the vectors into the token-embedding sequence, before the text transformer).

    ``ids(B)``: the template's token ids with ``span`` placeholder positions where "*" was; :meth:`encode` runs the
    text encoder with the input embeddings of those positions replaced by the given vectors (gradients reach them).
    """

    def __init__(self, tokenizer, template: str, n_vectors: int, placeholder_word: str):
        if template.count("*") != 1:
            raise ValueError(f"The prompt template must hold exactly one '*' (where the embedding goes), got "
                             f"'{template}'.")
        before, after = template.split("*")
        enc = lambda s: tokenizer(s.strip(), add_special_tokens=False).input_ids if s.strip() else []  # noqa: E731
        word = enc(placeholder_word)
        if len(word) != 1:
            raise ValueError(f"The placeholder word '{placeholder_word}' must be one token of the tokenizer "
                             f"({len(word)} tokens).")
        # CLIP: <|startoftext|> ... <|endoftext|>; BERT (the LDM text encoder): [CLS] ... [SEP], padded with [PAD]
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        pre, post = enc(before), enc(after)
        ids = [bos, *pre, *(word * n_vectors), *post, eos]
        L = tokenizer.model_max_length
        if len(ids) > L:
            raise ValueError(f"The prompt '{template}' with {n_vectors} embedding vectors needs {len(ids)} tokens; the "
                             f"text encoder takes {L}. Fix: a shorter template or fewer tokens.")
        self.template, self.n_vectors = template, n_vectors
        self.start = 1 + len(pre)
        self.span = slice(self.start, self.start + n_vectors)
        self._ids = torch.tensor(ids + [pad] * (L - len(ids)))

    def ids(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return self._ids.to(device).expand(batch, -1).clone()

    def columns(self) -> list[int]:
        """The key positions (cross-attention columns) of the embedding tokens."""
        return list(range(self.span.start, self.span.stop))

    def encode(self, text_encoder: nn.Module, vectors: torch.Tensor) -> torch.Tensor:
        """(B, n_vectors, D) input embeddings -> the cross-attention context (B, L, D_ctx)."""
        B = vectors.shape[0]
        if vectors.shape[1] != self.n_vectors:
            raise ValueError(f"Expected {self.n_vectors} vectors, got {vectors.shape[1]}.")
        with inject_embeddings(text_encoder, self.span, vectors):
            return text_encoder(self.ids(B, vectors.device))[0]


@contextmanager
def inject_embeddings(text_encoder: nn.Module, span: slice, vectors: torch.Tensor) -> Iterator[None]:
    """Replace the token embeddings at ``span`` by ``vectors`` for the forwards inside the block (a forward hook on
    the input-embedding table, removed on exit)."""
    def hook(_module, _inputs, out):
        out = out.clone()
        out[:, span] = vectors.to(out.dtype)
        return out

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- Eq. 5 and Eq. 1
def latent_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A (B, 1, H, W) mask -> (B, 1, size, size) in {0, 1}: bilinear resize, then >= 0.5 (official)."""
    m = F.interpolate(mask.float(), size=(size, size), mode="bilinear", align_corners=False)
    return (m >= 0.5).to(mask.dtype if mask.is_floating_point() else torch.float32)


def masked_diffusion_loss(eps_pred: torch.Tensor, eps: torch.Tensor, m: torch.Tensor,
                          normalize: str = "mask") -> torch.Tensor:
    """Eq. 5: L = || m * (eps - eps_theta(z_t, t, e)) ||_2^2 with m the binary latent mask, averaged over the batch.

    normalize: ``mask`` divides each sample's sum by the number of masked latent elements (C x ||m||_1), so a small
    defect weighs as much as a large one; ``latent`` (official) divides by all latent elements (C x h x w). Nothing
    outside the mask enters either."""
    d = (m * (eps.float() - eps_pred.float())) ** 2
    per = d.flatten(1).sum(1)
    if normalize == "mask":
        per = per / (m.expand_as(d).flatten(1).sum(1)).clamp(min=1)
    elif normalize == "latent":
        per = per / d[0].numel()
    else:
        raise ValueError(f"method.train.loss_normalize must be 'mask' (over the mask area) or 'latent' (official: over "
                         f"the whole latent), got '{normalize}'.")
    return per.mean()


def blend(z: torch.Tensor, z_y_t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eq. 1: the latent keeps the model's own values inside the mask and the forward-noised normal latent
    q(y_t | y_0) outside it: z * m + z_y_t * (1 - m)."""
    return z * m + z_y_t * (1 - m)


# ---------------------------------------------------------------------------------------------- AAR (Sec. 3.3)
def aar_weights_paper(x0_hat: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eq. 7, the adaptive attention weight map w_m = ||m||_1 * Softmax(f(-||m * y - m * x0_hat||_2^2)).

    x0_hat: the decoded prediction of the clean image, y: the normal image (both (B, 3, H, W), [-1, 1] as the LDM
    decoder outputs), m: (B, 1, H, W) binary. The squared difference is summed over channels; f keeps the mask's
    positions and sends the rest to -inf, so the softmax runs over the mask region only and w is 0 outside it; the
    weights inside sum to ||m||_1 (mean 1). The text of Sec. 3.3 gives *more* weight where the generated anomaly is
    less noticeable (x0_hat close to y), and the official code uses the inverse distance: the softmax is therefore
    taken of the negative distance (the printed equation shows no sign). A sample with an empty mask gets w = 1.
    Returns (B, H, W)."""
    inside = m[:, 0] > 0.5
    d = ((m * y - m * x0_hat).float() ** 2).sum(1)
    logits = (-d).masked_fill(~inside, float("-inf")).flatten(1)
    area = inside.flatten(1).sum(1)
    empty = area == 0
    logits = torch.where(empty[:, None], torch.zeros_like(logits), logits)
    w = logits.softmax(dim=1) * area.clamp(min=1)[:, None].float()
    w = torch.where(empty[:, None], torch.ones_like(w), w)
    return w.view_as(d)


def dilation_radius(t: int, num_steps: int) -> int:
    """The official code's dilation radius of the mask at timestep ``t``: int((t + 100) * 16 // 1000) for a 50-step
    schedule, int((t + 100) * 8 // 1000) otherwise (its 200 steps): 8 at t = 999, shrinking to 0 near t = 0."""
    return int((int(t) + 100) * (16 if num_steps == 50 else 8) // 1000)


def dilate(m: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation with a (2r+1) x (2r+1) square (a stride-1 max-pool; radius 0 leaves the mask as it is)."""
    return m if radius <= 0 else F.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)


def aar_weights_official(z_t: torch.Tensor, z_y: torch.Tensor, m: torch.Tensor, t: int, num_steps: int,
                         low: float = 1.0, high: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The official re-weighting (ldm/models/diffusion/ddim.py of the official code), at latent resolution.

    m' = dilate(m, r(t)); d = mean over channels of (m' * (z_t - z_y))^2 with z_t the current noisy latent and z_y the
    *clean* normal latent; d = -1 where it is 0; w = ||m'||_1 * (m' / d) / sum(m' / d) (inverse-distance
    normalisation instead of the softmax); w = 1 where it is 0, then clamped to [1, 1.5]; all 1 for a sample whose
    sum is 0. Returns (w (B, h, w), m') -- the official sampler also blends with the dilated mask m'."""
    md = dilate(m.float(), dilation_radius(t, num_steps))
    d = ((md * (z_t.float() - z_y.float())) ** 2).mean(1)
    d = torch.where(d == 0, torch.full_like(d, -1.0), d)
    inv = md[:, 0] / d
    s = inv.flatten(1).sum(1).view(-1, 1, 1)
    w = md[:, 0].flatten(1).sum(1).view(-1, 1, 1) * inv / torch.where(s == 0, torch.ones_like(s), s)
    w = torch.where(w == 0, torch.ones_like(w), w).clamp(low, high)
    w = torch.where(s == 0, torch.ones_like(w), w)
    return w, md.to(m.dtype)


# ------------------------------------------------------------------------------------------- masks (Sec. 3.4)
def binarize_generated_mask(image: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """A decoded mask image (B, 3, H, W) in [0, 1] -> (B, H, W) binary: channel mean > ``threshold`` (the official
    code: > 0.8 on [-1, 1], i.e. 0.9 on [0, 1])."""
    return image.float().mean(1) > threshold


def hugs_border(mask: torch.Tensor, max_fraction: float = 1 / 3) -> torch.Tensor:
    """(B, H, W) binary -> (B,) bool: a mask whose first or last row or column has more than ``max_fraction`` of its
    pixels set (the official check_mask: more than W / 3) runs along the image border, which real defect masks of
    objects rarely do; such masks are rejected. An empty mask is rejected too (the official code keeps it)."""
    m = mask.bool()
    W, H = m.shape[-1], m.shape[-2]
    lines = torch.stack([m[:, 0, :].sum(-1) / W, m[:, -1, :].sum(-1) / W, m[:, :, 0].sum(-1) / H,
                         m[:, :, -1].sum(-1) / H], dim=1)
    return (lines > max_fraction).any(1) | (m.flatten(1).sum(1) == 0)


__all__ = ["AnomalyEmbeddings", "EmbeddingPrompt", "FPNSpatialEncoder", "IRBottleneck", "PSPSpatialEncoder",
           "aar_weights_official", "aar_weights_paper", "binarize_generated_mask", "blend", "build_spatial_encoder",
           "dilate", "dilation_radius", "hugs_border", "inject_embeddings", "latent_mask", "mask_to_encoder_input",
           "masked_diffusion_loss"]
