"""MambaAD ("MambaAD: Exploring State Space Models for Multi-class Unsupervised Anomaly Detection", He et al.,
NeurIPS 2024, arXiv:2404.06564; code github.com/lewandofskee/MambaAD), one of SeaS's unsupervised detectors (Tab. 3):
trained on normal images only, the generated arm adds generated normals.

The reverse-distillation frame of RD4AD with a state-space decoder:
- a frozen teacher (ResNet-34, stages 1-3: 64 / 128 / 256 channels at strides 4 / 8 / 16; timm, local weights only);
- MFF_OCE: the three stages fused and squeezed to one 512-channel map at stride 32 (RD4AD's multi-scale feature fusion
  and one-class embedding);
- the decoder MambaUPNet: four levels (512, 256, 128, 64 channels; depths 3, 4, 6, 3), each a patch expansion
  (x2, except the first) and Locality-Enhanced State Space (LSS) blocks: a chain of VSS blocks (the Hybrid State Space
  module, HSS: a 2-D selective scan over ``num_direction`` scan paths) beside two depth-wise convolution branches
  (5 x 5 and 7 x 7), fused by a 1 x 1 convolution, residual;
- training: the decoder's three outputs are pulled onto the teacher's (official: L2, weight 5);
- anomaly map: sum over the scales of 1 - cos(teacher, decoder), upsampled, Gaussian sigma 4; image score its max.

The selective scan is written here in PyTorch (:func:`selective_scan`, a loop over the sequence), so the model runs on
a CPU and in the tests; when the ``mamba_ssm`` package is installed its CUDA kernel is used on GPU tensors instead
(:func:`scan_fn`). Scan paths: sweep, scan (snake), zigzag, zorder, hilbert (:func:`scan_order`; official default
hilbert, 8 directions).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SCAN_TYPES = ("sweep", "scan", "zigzag", "zorder", "hilbert")


# ------------------------------------------------------------------------------------------- the selective scan
def _scan_chunk(h: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over one chunk of T steps from state h (b, K, d, N): u, delta (b, K d, T), A (K d, N), B, C
    (b, K, N, T). Returns (y (b, K d, T) without the D term, the last state). Time is the leading dimension of every
    per-step tensor, so that each step reads contiguous memory (a slice along the last dimension is strided and made
    each step several times slower)."""
    b, K, d, N = h.shape
    T = u.shape[-1]
    dt = delta.permute(2, 0, 1).reshape(T, b, K, d, 1)
    dA = torch.exp(dt * A.reshape(1, 1, K, d, N))                                  # (T, b, K, d, N)
    dBu = (dt * u.permute(2, 0, 1).reshape(T, b, K, d, 1)) * B.permute(3, 0, 1, 2).unsqueeze(3)
    hs = []
    for dA_t, dBu_t in zip(dA.unbind(0), dBu.unbind(0)):   # unbind, not dA[t]: the backward of T selects would
        h = torch.addcmul(dBu_t, dA_t, h)                   # write T full-size zero gradients
        hs.append(h)
    y = (torch.stack(hs) * C.permute(3, 0, 1, 2).unsqueeze(3)).sum(-1)            # (T, b, K, d)
    return y.reshape(T, b, K * d).permute(1, 2, 0), h


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                   delta_softplus: bool = True, chunk: int = 64) -> torch.Tensor:
    """The S6 recurrence, per channel c (of K groups of d channels) and state n:
    h_t = exp(delta_t A_cn) h_{t-1} + delta_t B_{k,n,t} u_t,  y_t = sum_n C_{k,n,t} h_t + D_c u_t,
    delta = softplus(delta + delta_bias). Shapes: u, delta (b, K d, L); A (K d, N); B, C (b, K, N, L); D (K d,).
    Returns y (b, K d, L) in float32.

    The sequence runs in chunks of ``chunk`` steps; under autograd each chunk is checkpointed (its per-step states
    are recomputed in the backward pass), so memory grows with b K d N (chunk + L / chunk), not with b K d N L: the
    (b, Kd, N, L) tensors of a whole sequence are 1 GB for one 32 x 32 decoder level at batch 16, and a training step
    held several of them per block. Same values and gradients as one chunk."""
    u, delta = u.float(), delta.float()
    b, kd, L = u.shape
    k = B.shape[1]
    if kd % k:
        raise ValueError(f"selective_scan: {kd} channels do not split into {k} groups")
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A, B, C = A.float(), B.float(), C.float()
    h = u.new_zeros(b, k, kd // k, A.shape[1])
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (u, delta, A, B, C))
    ys = []
    for s in range(0, L, max(1, int(chunk))):
        part = slice(s, s + max(1, int(chunk)))
        args = (h, u[..., part], delta[..., part], A, B[..., part], C[..., part])
        y, h = checkpoint(_scan_chunk, *args, use_reentrant=False) if grad else _scan_chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=-1)
    return y if D is None else y + u * D.float()[None, :, None]


def scan_fn(*args, **kwargs) -> torch.Tensor:
    """:func:`selective_scan`, or mamba_ssm's CUDA kernel for CUDA tensors when that package is installed."""
    u = args[0]
    if u.is_cuda:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            return selective_scan_fn(*args, **kwargs)
        except ImportError:
            pass
    return selective_scan(*args, **kwargs)


# ----------------------------------------------------------------------------------------------- scan paths
def _hilbert_d2xy(order: int, d: int) -> tuple[int, int]:
    """Position (x, y) of step d along the Hilbert curve filling a 2^order square (the classic iterative form)."""
    x = y = 0
    s, t = 1, d
    while s < (1 << order):
        rx = 1 & (t // 2)
        ry = 1 & (t ^ rx)
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        x, y = x + s * rx, y + s * ry
        t //= 4
        s *= 2
    return x, y


def scan_order(size: int, kind: str = "scan") -> np.ndarray:
    """The order in which a ``size`` x ``size`` grid (row-major flat positions) is read: ``order[p]`` is the flat
    position visited p-th. sweep: row by row; scan: a snake (odd rows reversed); zigzag: anti-diagonals, alternating;
    zorder: Morton order; hilbert: the Hilbert curve (``size`` a power of 2 for the last two)."""
    if kind not in SCAN_TYPES:
        raise ValueError(f"scan type must be one of {SCAN_TYPES}, got '{kind}'")
    idx = np.arange(size * size).reshape(size, size)
    if kind == "sweep":
        return idx.reshape(-1)
    if kind == "scan":
        out = idx.copy()
        out[1::2] = out[1::2, ::-1]
        return out.reshape(-1)
    if kind == "zigzag":
        seq = []
        for s in range(2 * size - 1):
            cells = [(r, s - r) for r in range(max(0, s - size + 1), min(s, size - 1) + 1)]
            seq += [idx[r, c] for r, c in (cells[::-1] if s % 2 == 0 else cells)]
        return np.array(seq)
    bits = int(round(math.log2(size)))
    if 1 << bits != size:
        raise ValueError(f"scan type '{kind}' needs a power-of-two side, got {size}")
    if kind == "zorder":
        def morton(r: int, c: int) -> int:
            return sum(((r >> i) & 1) << (2 * i + 1) | ((c >> i) & 1) << (2 * i) for i in range(bits))
        return np.array(sorted(range(size * size), key=lambda p: morton(p // size, p % size)))
    return np.array([y * size + x for x, y in (_hilbert_d2xy(bits, d) for d in range(size * size))])


def direction_sequences(x: torch.Tensor, order: torch.Tensor, num_direction: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, K, C, L): the grid read along ``order`` as is, transposed, rotated by 90 degrees and
    rotated + transposed (as many as K / 2), then each of those reversed (the other K / 2)."""
    if num_direction not in (2, 4, 8):
        raise ValueError(f"num_direction must be 2, 4 or 8, got {num_direction}")
    B, C, H, W = x.shape
    views = [x, x.transpose(2, 3), torch.rot90(x, 1, (2, 3)), torch.rot90(x, 1, (2, 3)).transpose(2, 3)]
    seqs = torch.stack([v.reshape(B, C, H * W)[..., order] for v in views[:num_direction // 2]], 1)
    return torch.cat([seqs, seqs.flip(-1)], 1)


def merge_directions(y: torch.Tensor, order: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The inverse of :func:`direction_sequences` for each of the K outputs, summed: (B, K, C, L) -> (B, C, H W)."""
    B, K, C, L = y.shape
    half = K // 2
    ys = torch.cat([y[:, :half], y[:, half:].flip(-1)], 1)          # undo the reversal
    inv = torch.empty_like(order)
    inv[order] = torch.arange(L, device=order.device)
    grids = ys[..., inv].reshape(B, K, C, H, W)                      # undo the scan order (views are square)
    undo = [lambda g: g, lambda g: g.transpose(-2, -1), lambda g: torch.rot90(g, -1, (-2, -1)),
            lambda g: torch.rot90(g.transpose(-2, -1), -1, (-2, -1))]
    return sum(undo[i % half](grids[:, i]) for i in range(K)).reshape(B, C, H * W)


# --------------------------------------------------------------------------------------------------- modules
class SS2D(nn.Module):
    """The 2-D selective scan of a VSS block (VMamba's SS2D with MambaAD's scan paths): in-projection to x and a gate
    z, a depth-wise conv + SiLU on x, per direction data-dependent delta, B, C, the selective scan, the directions
    merged back, LayerNorm, gated by SiLU(z), out-projection."""

    def __init__(self, d_model: int, size: int, d_state: int = 16, d_conv: int = 3, expand: int = 2,
                 scan_type: str = "scan", num_direction: int = 4, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_floor: float = 1e-4):
        super().__init__()
        self.d_inner, self.d_state, self.K = int(expand * d_model), d_state, num_direction
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, d_conv, padding=(d_conv - 1) // 2, groups=self.d_inner)
        self.x_proj_weight = nn.Parameter(torch.empty(self.K, self.dt_rank + 2 * d_state, self.d_inner))
        nn.init.kaiming_uniform_(self.x_proj_weight, a=math.sqrt(5))
        std = self.dt_rank ** -0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(self.K, self.d_inner, self.dt_rank).uniform_(-std, std))
        dt = torch.exp(torch.rand(self.K, self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))      # softplus^-1: softplus(bias) = dt
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.K * self.d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(A))                                   # S4D-real: A = -[1 .. N]
        self.Ds = nn.Parameter(torch.ones(self.K * self.d_inner))
        self.out_norm = nn.LayerNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.register_buffer("order", torch.from_numpy(scan_order(size, scan_type)).long(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                              # (B, H, W, C)
        B, H, W, _ = x.shape
        xz = self.in_proj(x)
        xs, z = xz.chunk(2, dim=-1)
        xs = F.silu(self.conv2d(xs.permute(0, 3, 1, 2)))                             # (B, d, H, W)
        L, K, d = H * W, self.K, self.d_inner
        seq = direction_sequences(xs, self.order, K)                                 # (B, K, d, L)
        dbl = torch.einsum("bkdl,kcd->bkcl", seq, self.x_proj_weight)
        dts, Bs, Cs = torch.split(dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        y = scan_fn(seq.reshape(B, K * d, L), dts.reshape(B, K * d, L), -torch.exp(self.A_logs.float()), Bs, Cs,
                    self.Ds, delta_bias=self.dt_projs_bias.reshape(-1), delta_softplus=True)
        y = merge_directions(y.reshape(B, K, d, L), self.order, H, W)                # (B, d, L)
        y = self.out_norm(y.transpose(1, 2).reshape(B, H, W, d).to(x.dtype))
        return self.out_proj(y * F.silu(z))


class VSSBlock(nn.Module):
    def __init__(self, dim: int, size: int, **ss2d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = SS2D(dim, size, **ss2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.self_attention(self.ln_1(x))


def _conv_branch(dim: int, kernel: int) -> nn.Sequential:
    def unit(conv):
        return nn.Sequential(conv, nn.InstanceNorm2d(dim), nn.SiLU())
    return nn.Sequential(unit(nn.Conv2d(dim, dim, 1)),
                         unit(nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False)),
                         unit(nn.Conv2d(dim, dim, 1)))


class LSSBlock(nn.Module):
    """Locality-Enhanced State Space block: ``depth`` VSS blocks in series beside depth-wise 5 x 5 and 7 x 7
    convolution branches; the three concatenated, fused by a 1 x 1 convolution, added to the input."""

    def __init__(self, dim: int, size: int, depth: int, **ss2d):
        super().__init__()
        self.smm_blocks = nn.ModuleList([VSSBlock(dim, size, **ss2d) for _ in range(depth)])
        self.conv5, self.conv7 = _conv_branch(dim, 5), _conv_branch(dim, 7)
        self.finalconv11 = nn.Conv2d(3 * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                               # (B, H, W, C)
        s = x
        for blk in self.smm_blocks:
            s = blk(s)
        c = x.permute(0, 3, 1, 2)
        out = self.finalconv11(torch.cat([s.permute(0, 3, 1, 2), self.conv5(c), self.conv7(c)], 1))
        return out.permute(0, 2, 3, 1) + x


class PatchExpand(nn.Module):
    """(B, H, W, 2 dim) -> (B, 2H, 2W, dim): a linear map to 4 dim, each token unfolded into a 2 x 2 patch, LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.expand = nn.Linear(2 * dim, 4 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        x = self.expand(x).reshape(B, H, W, 2, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, -1)
        return self.norm(x)


class MambaUPNet(nn.Module):
    """The decoder: level i (dims[i] channels at ``size`` * 2^i) = patch expansion (not at level 0) + LSS blocks
    (depth // 3 blocks of 3 VSS when depth is a multiple of 3, else depth // 2 of 2). Returns the outputs of levels
    3, 2, 1 (largest first), matched to the teacher's stages 1, 2, 3."""

    def __init__(self, dims: Sequence[int] = (512, 256, 128, 64), depths: Sequence[int] = (3, 4, 6, 3), size: int = 8,
                 **ss2d):
        super().__init__()
        self.levels = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            per = 3 if depth % 3 == 0 else 2
            blocks = [LSSBlock(dim, size * 2 ** i, per, **ss2d) for _ in range(max(1, depth // per))]
            self.levels.append(nn.Sequential(*([PatchExpand(dim)] if i else []), *blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:                         # (B, C, h, w)
        x = x.permute(0, 2, 3, 1)
        outs = []
        for i, level in enumerate(self.levels):
            x = level(x)
            if i:
                outs.insert(0, x.permute(0, 3, 1, 2))
        return outs


class MFFOCE(nn.Module):
    """RD4AD's multi-scale feature fusion and one-class embedding: the teacher's stages (c, 2c, 4c channels at strides
    4, 8, 16) brought to stride 16 and summed, then a stage of ``blocks`` bottlenecks with stride 2 to ``out`` channels
    (ResNet-34 teacher: 64, 128, 256 -> 512 at stride 32)."""

    def __init__(self, c: int = 64, out: int = 512, blocks: int = 3):
        super().__init__()
        from timm.models.resnet import Bottleneck

        def cbr(i, o, k, s):
            return nn.Sequential(nn.Conv2d(i, o, k, s, padding=k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU())
        self.down0 = cbr(c, 2 * c, 3, 2)
        self.lat1 = cbr(2 * c, 2 * c, 1, 1)
        self.down1 = cbr(2 * c, 4 * c, 3, 2)
        self.lat2 = cbr(4 * c, 4 * c, 1, 1)
        self.fuse = cbr(4 * c, 4 * c, 1, 1)
        planes = out // Bottleneck.expansion
        down = nn.Sequential(nn.Conv2d(4 * c, out, 1, 2, bias=False), nn.BatchNorm2d(out))
        layers = [Bottleneck(4 * c, planes, stride=2, downsample=down)]
        layers += [Bottleneck(out, planes) for _ in range(blocks - 1)]
        self.oce = nn.Sequential(*layers)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        f1 = self.lat1(feats[1]) + self.down0(feats[0])
        f2 = self.down1(f1) + self.lat2(feats[2])
        return self.oce(self.fuse(f2))


class MambaAD(nn.Module):
    """Teacher (frozen) -> MFF_OCE -> MambaUPNet; ``forward`` returns (teacher features, decoder features)."""

    def __init__(self, teacher: nn.Module, image_size: int, channels: Sequence[int] = (64, 128, 256),
                 dims: Sequence[int] = (512, 256, 128, 64), depths: Sequence[int] = (3, 4, 6, 3), **ss2d):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"MambaAD needs an image side divisible by 32, got {image_size}")
        if tuple(dims[1:][::-1]) != tuple(channels):
            raise ValueError(f"MambaAD's decoder levels 3, 2, 1 ({list(dims[1:][::-1])} channels) must match the "
                             f"teacher's stages 1, 2, 3 ({list(channels)})")
        self.teacher = teacher.eval().requires_grad_(False)
        self.mff_oce = MFFOCE(int(channels[0]), int(dims[0]))
        self.decoder = MambaUPNet(dims, depths, image_size // 32, **ss2d)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            ft = [f.detach() for f in self.teacher(x)]
        return ft, self.decoder(self.mff_oce(ft))


def distillation_loss(ft: Sequence[torch.Tensor], fs: Sequence[torch.Tensor], weight: float = 5.0,
                      kind: str = "l2") -> torch.Tensor:
    """The official objective: ``weight`` x the sum over scales of the MSE between teacher and decoder features
    (``kind="cosine"``: RD4AD's mean 1 - cos over positions instead)."""
    if kind == "l2":
        return weight * sum(F.mse_loss(s, t) for t, s in zip(ft, fs))
    if kind == "cosine":
        return weight * sum((1 - F.cosine_similarity(s, t, dim=1)).mean() for t, s in zip(ft, fs))
    raise ValueError(f"MambaAD loss kind must be l2 or cosine, got '{kind}'")


def anomaly_map(ft: Sequence[torch.Tensor], fs: Sequence[torch.Tensor], size: int, sigma: float = 4.0
                ) -> torch.Tensor:
    """(B, size, size): the sum over scales of 1 - cos(teacher, decoder) (channel axis), bilinearly upsampled, then a
    Gaussian blur of ``sigma`` (the official evaluator's 'add' mode)."""
    m = sum(F.interpolate((1 - F.cosine_similarity(t, s, dim=1))[:, None], size=(size, size), mode="bilinear",
                          align_corners=True) for t, s in zip(ft, fs))[:, 0]
    if sigma > 0:
        from torchvision.transforms.functional import gaussian_blur
        k = 2 * int(4 * sigma + 0.5) + 1
        m = gaussian_blur(m[:, None], [k, k], [sigma, sigma])[:, 0]
    return m


__all__ = ["LSSBlock", "MambaAD", "MambaUPNet", "MFFOCE", "PatchExpand", "SCAN_TYPES", "SS2D", "VSSBlock",
           "anomaly_map", "direction_sequences", "distillation_loss", "merge_directions", "scan_fn", "scan_order",
           "selective_scan"]
