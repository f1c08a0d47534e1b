"""DiT ("Scalable Diffusion Models with Transformers", Peebles & Xie, arXiv:2212.09748; code facebookresearch/DiT):
a class-conditional latent diffusion transformer, written here so that its parameter names are the original
checkpoint's (``DiT-XL-2-256x256.pt``: ``x_embedder.proj``, ``t_embedder.mlp``, ``y_embedder.embedding_table``,
``blocks.<i>.attn.qkv`` / ``adaLN_modulation.1`` ..., ``final_layer``). DefectDiffu starts from those weights
non-strictly (:func:`load_matching`), and the toolkit's mini DiT prior is this class at a small size.

Structure (DiT paper, Sec. 3.2, adaLN-Zero):
- patchify the latent (patch p) into tokens, add fixed 2-D sin-cos position embeddings;
- condition c = t_emb + y_emb (sinusoidal timestep -> MLP; class label -> embedding table with one extra row, the
  null class of classifier-free guidance);
- each block: x += gate1 * Attn(modulate(LN(x), shift1, scale1)); x += gate2 * MLP(modulate(LN(x), shift2, scale2)),
  the six vectors from a zero-initialised linear map of SiLU(c), so every block starts as the identity;
- final layer: modulate(LN(x)) -> linear to p * p * out channels, unpatchify. ``learn_sigma`` doubles the output
  channels (eps, then the variance interpolation of improved DDPM), as DiT-XL/2.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, the (N, D) vectors broadcast over the (N, T, D) tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N, dim) sinusoidal embedding of (possibly fractional) timesteps: [cos(t f_k), sin(t f_k)],
    f_k = max_period^(-k / (dim / 2)) (GLIDE / DiT order: cosines first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; row ``num_classes`` is the null class (classifier-free guidance's unconditional)."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """One adaLN-Zero block. :meth:`attend` and :meth:`feed_forward` are its two halves, so that a model may insert
    a module between them (DefectDiffu's defect-block cross-attention)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden, hidden_features=int(hidden * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def attend(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        shift, scale, gate = mod[0], mod[1], mod[2]
        return x + gate.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift, scale))

    def feed_forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        shift, scale, gate = mod[3], mod[4], mod[5]
        return x + gate.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift, scale))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.modulation(c)
        return self.feed_forward(self.attend(x, mod), mod)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(N, T, p * p * C) tokens of a square grid -> (N, C, H, W), token (i, j) filling pixels [i p, (i+1) p) x
    [j p, (j+1) p), its vector laid out (p, p, C)."""
    n, tokens = x.shape[0], x.shape[1]
    h = int(round(tokens ** 0.5))
    if h * h != tokens:
        raise ValueError(f"unpatchify needs a square token grid, got {tokens} tokens")
    x = x.reshape(n, h, h, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, h * patch, h * patch)


class DiT(nn.Module):
    """Class-conditional DiT. ``num_classes=None`` builds it without the label embedder (a model that brings its
    own condition, as DefectDiffu does). ``forward(x, t, y)`` -> (N, out_channels, H, W)."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int | None = 1000,
                 learn_sigma: bool = True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"DiT: input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.config = {"input_size": input_size, "patch_size": patch_size, "in_channels": in_channels,
                       "hidden_size": hidden_size, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
                       "num_classes": num_classes, "learn_sigma": learn_sigma}
        self.in_channels, self.patch_size = in_channels, patch_size
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes is not None else None
        grid = input_size // patch_size
        pos = get_2d_sincos_pos_embed(hidden_size, grid, base_size=grid, interpolation_scale=1.0, output_type="pt")
        self.pos_embed = nn.Parameter(pos.float()[None], requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linear maps (the patch projection too), N(0, 0.02) label table and
        timestep MLP, and zeros for every adaLN modulation and the output layer (adaLN-Zero: each block starts as
        the identity, the model predicts 0)."""
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(basic)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.x_embedder(x) + self.pos_embed

    def output(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.y_embedder is None:
            raise ValueError("this DiT has no label embedder (num_classes=None): its owner conditions it")
        c = self.t_embedder(t) + self.y_embedder(y)
        h = self.tokens(x)
        for block in self.blocks:
            h = block(h, c)
        return self.output(h, c)

    # -- files -----------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` (written to temporary names, then renamed)."""
        from safetensors.torch import save_file

        from ..io import write_json
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (WEIGHTS_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(d / WEIGHTS_FILE)
        write_json(d / CONFIG_FILE, {"class": type(self).__name__, **self.config})
        return d

    @classmethod
    def load(cls, directory: str | Path, key: str = "model.dit_path") -> "DiT":
        from safetensors.torch import load_file

        from .loading import ModelNotFoundError
        d = Path(directory).expanduser()
        if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
            raise ModelNotFoundError(f"No DiT at '{d}' (expected {CONFIG_FILE} and {WEIGHTS_FILE}, as DiT.save "
                                     f"writes them). Set {key} to such a directory.")
        cfg = json.loads((d / CONFIG_FILE).read_text())
        saved = cfg.pop("class", "DiT")
        if saved != cls.__name__:
            raise ValueError(f"{d} holds a {saved}, not a {cls.__name__}: load it with {saved}.load.")
        model = cls(**cfg)
        model.load_state_dict(load_file(str(d / WEIGHTS_FILE)))
        return model


def load_matching(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy every tensor of ``state_dict`` whose name and shape ``model`` has; the rest is left as initialised.
    Returns (loaded names, model names left as they were). DefectDiffu starts from ImageNet DiT this way (its own
    cross-attention, text projection and mask head are new; the official code passes strict=False)."""
    own = model.state_dict()
    take = {k: v for k, v in state_dict.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    model.load_state_dict(take, strict=False)
    return sorted(take), sorted(k for k in own if k not in take)


__all__ = ["DiT", "DiTBlock", "FinalLayer", "LabelEmbedder", "TimestepEmbedder", "load_matching", "modulate",
           "timestep_embedding", "unpatchify"]
