"""HVQ-Trans ("Hierarchical Vector Quantized Transformer for Multi-class Unsupervised Anomaly Detection", Lu et al.,
NeurIPS 2023, arXiv:2310.14228; code github.com/RuiyingLu/HVQ-Trans), one of SeaS's unsupervised detectors (Tab. 3):
trained on normal images only; the generated arm adds generated normals.

The official "switch" model:
- a frozen EfficientNet-B4's first four stages (strides 2, 4, 8, 16; 24 + 32 + 56 + 160 = 272 channels), each resized
  to the stride-16 grid and concatenated; a 1 x 1 convolution to the hidden width; learned row / column positions;
- a transformer encoder (4 post-norm layers) whose input and every layer's output are kept (5 levels);
- hierarchical vector quantisation with one set of codebooks per class (the "switch": the product picks them): the top
  level alone, then each lower level concatenated with the quantised top (twice the width), each a nearest-codeword
  lookup with EMA codebook updates (decay 0.99), the straight-through gradient and the commitment term
  mean((sg[q] - z)^2);
- a hierarchical decoder (4 layers at twice the width: self-attention, then cross-attention to level i's quantised
  memory), a class-switched output projection back to the feature width;
- loss: MSE(reconstructed, original features) + 0.25 x the summed commitment terms; map: the L2 distance between
  them per position, upsampled; image score: its maximum. (The official repository's optimal-transport scoring variant
  is not implemented here.)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class Quantize(nn.Module):
    """A codebook of ``n_embed`` vectors of width ``dim``, updated by exponential moving averages (VQ-VAE-2)."""

    def __init__(self, dim: int, n_embed: int = 512, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.dim, self.n_embed, self.decay, self.eps = dim, n_embed, decay, eps
        embed = torch.randn(dim, n_embed)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.zeros(n_embed))
        self.register_buffer("embed_avg", embed.clone())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., dim) -> (quantised with the straight-through gradient, commitment mean((sg[q] - z)^2), indices)."""
        flat = z.reshape(-1, self.dim)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed + self.embed.pow(2).sum(0, keepdim=True)
        idx = dist.argmin(1)
        q = F.embedding(idx, self.embed.t()).view_as(z)
        if self.training:
            with torch.no_grad():
                onehot = F.one_hot(idx, self.n_embed).to(flat.dtype)
                self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
                self.embed_avg.mul_(self.decay).add_(flat.detach().t() @ onehot, alpha=1 - self.decay)
                n = self.cluster_size.sum()
                size = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n
                self.embed.copy_(self.embed_avg / size[None])
        diff = (q.detach() - z).pow(2).mean()
        return z + (q - z).detach(), diff, idx.view(z.shape[:-1])


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (positions added to queries and keys)."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float = 0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:     # (L, B, C)
        q = x + pos
        x = self.norm1(x + self.drop1(self.attn(q, q, x)[0]))
        return self.norm2(x + self.drop2(self.ff(x)))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention on the running output, cross-attention to this level's memory."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, dim))
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])
        self.drops = nn.ModuleList([nn.Dropout(dropout) for _ in range(3)])

    def forward(self, out: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = out + pos
        x = self.norms[0](out + self.drops[0](self.self_attn(q, q, out)[0]))
        x = self.norms[1](x + self.drops[1](self.cross_attn(x + pos, memory + pos, memory)[0]))
        return self.norms[2](x + self.drops[2](self.ff(x)))


class HVQTrans(nn.Module):
    """``forward(images, classes)`` -> dict(feature, reconstruction, map (B, h, w), loss, commitment)."""

    def __init__(self, backbone: nn.Module, channels: int, grid: int, n_classes: int, hidden: int = 256,
                 heads: int = 8, ff: int = 1024, layers: int = 4, n_embed: int = 512, latent_weight: float = 0.25,
                 dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.grid, self.n_classes, self.latent_weight = grid, n_classes, latent_weight
        self.input_conv = nn.Conv2d(channels, hidden, 1)
        self.row_embed, self.col_embed = nn.Embedding(grid, hidden // 2), nn.Embedding(grid, hidden - hidden // 2)
        nn.init.uniform_(self.row_embed.weight), nn.init.uniform_(self.col_embed.weight)
        self.encoder = nn.ModuleList([EncoderLayer(hidden, heads, ff, dropout) for _ in range(layers)])
        # one codebook set per class: the top level (width hidden), then one per lower level (width 2 hidden)
        self.top_codebooks = nn.ModuleList([Quantize(hidden, n_embed) for _ in range(n_classes)])
        self.level_codebooks = nn.ModuleList([nn.ModuleList([Quantize(2 * hidden, n_embed) for _ in range(n_classes)])
                                              for _ in range(layers)])
        self.decoder = nn.ModuleList([DecoderLayer(2 * hidden, heads, ff, dropout) for _ in range(layers)])
        self.decoder_norm = nn.LayerNorm(2 * hidden)
        self.output_proj = nn.ModuleList([nn.Linear(2 * hidden, channels) for _ in range(n_classes)])

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's stages resized to the ``grid`` x ``grid`` stride-16 map and concatenated: (B, C, g, g)."""
        with torch.no_grad():
            feats = self.backbone(x)
            return torch.cat([F.interpolate(f, size=(self.grid, self.grid), mode="bilinear", align_corners=True)
                              for f in feats], 1)

    def positions(self) -> torch.Tensor:
        g = self.grid
        col = self.col_embed.weight[None].expand(g, g, -1)
        row = self.row_embed.weight[:, None].expand(g, g, -1)
        return torch.cat([col, row], -1).reshape(g * g, 1, -1)                       # (L, 1, hidden)

    @staticmethod
    def switch(modules: Sequence[nn.Module], x: torch.Tensor, classes: torch.Tensor):
        """Apply ``modules[classes[b]]`` to item b of ``x`` (B, ...); returns the stacked outputs (and summed extras)."""
        outs = [modules[int(c)](x[b]) for b, c in enumerate(classes)]
        if isinstance(outs[0], tuple):
            return torch.stack([o[0] for o in outs]), sum(o[1] for o in outs) / len(outs)
        return torch.stack(outs)

    def forward(self, x: torch.Tensor, classes: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.features(x)
        B = x.shape[0]
        tokens = self.input_conv(feat).flatten(2).permute(2, 0, 1)                  # (L, B, hidden)
        pos = self.positions().expand(-1, B, -1)
        levels = [tokens]
        h = tokens
        for layer in self.encoder:
            h = layer(h, pos)
            levels.append(h)
        lv = [level.transpose(0, 1) for level in levels]                            # (B, L, hidden) each
        q_top, diff = self.switch(self.top_codebooks, lv[-1], classes)
        memories = []
        for i, books in enumerate(self.level_codebooks):                            # levels -2, -3, ... with q_top
            q, d = self.switch(books, torch.cat([lv[-2 - i], q_top], -1), classes)
            memories.append(q.transpose(0, 1))
            diff = diff + d
        pos2 = torch.cat([pos, pos], -1)
        out = memories[0]
        for layer, mem in zip(self.decoder, memories):
            out = layer(out, mem, pos2)
        out = self.decoder_norm(out).transpose(0, 1)                                # (B, L, 2 hidden)
        rec = self.switch(self.output_proj, out, classes).transpose(1, 2).reshape_as(feat)
        amap = (rec - feat).pow(2).sum(1).sqrt()
        loss = F.mse_loss(rec, feat) + self.latent_weight * diff
        return {"feature": feat, "reconstruction": rec, "map": amap, "loss": loss, "commitment": diff}

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor, classes: torch.Tensor, size: int) -> torch.Tensor:
        m = self(x, classes)["map"]
        return F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=True)[:, 0]


__all__ = ["DecoderLayer", "EncoderLayer", "HVQTrans", "Quantize"]
