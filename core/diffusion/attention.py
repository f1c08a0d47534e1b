"""Cross-attention capture and editing on a diffusers U-Net, layer by layer.

``attention_control(unet, layers, store=..., edit=...)`` swaps the processor of the named attention modules for a
:class:`ControlledAttnProcessor` and restores the originals in ``finally``; every other layer keeps its own
processor (SDPA). A controlled layer computes attention explicitly:

    logits = Q K^T / sqrt(d)                    (B, heads, N, L)      N query positions, L keys (text tokens)
    logits <- edit.edit_logits(layer, logits)   masking / re-weighting before the softmax (bgdefect, AnomalyDiffusion)
    P      = softmax(logits, dim=-1)            the attention the layer uses (softmax over tokens)
    store.record(layer, logits, P)              token softmax, or softmax over positions (dim=-2) as in SeaS's code
    P      <- edit.edit_probs(layer, P)         multiplying maps after the softmax (AnomalyDiffusion paper, CUT)
    out    = P V

Stored maps keep their autograd graph when ``AttentionStore(keep_grad=True)`` (SeaS's DA loss, CUT's latent
optimisation differentiate through them), and can keep only the conditional half of a classifier-free-guidance
batch (``cond_half=True``: the batch is ``[unconditional; conditional]`` as diffusers stacks it).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator, Literal, Protocol, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

Softmax = Literal["token", "spatial"]


# ----------------------------------------------------------------------------------------------- layer selection
def cross_attention_layers(unet: torch.nn.Module, blocks: Sequence[str] | None = None) -> list[str]:
    """Names of the cross-attention modules (``...attn2``) under the given block prefixes, in forward order.

    ``blocks`` are prefixes such as ``"down_blocks.1"`` or ``"up_blocks.1"``; ``None`` selects every one.
    """
    names = [n for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]
    if blocks is None:
        return names
    chosen = [n for n in names if any(n == b or n.startswith(b + ".") for b in blocks)]
    unknown = [b for b in blocks if not any(n == b or n.startswith(b + ".") for n in names)]
    if unknown:
        have = sorted({".".join(n.split(".")[:2]) if not n.startswith("mid") else "mid_block" for n in names})
        raise KeyError(f"No cross-attention layers under {unknown}. Blocks with cross-attention: {', '.join(have)}.")
    return chosen


def block_resolution(name: str, latent_size: int, n_levels: int) -> int:
    """Spatial side at which the layer ``name`` runs, for a square latent of side ``latent_size``.

    U-Net layout: ``down_blocks.i`` at latent / 2^i, ``mid_block`` at the lowest level, ``up_blocks.j`` at
    latent / 2^(n_levels - 1 - j).
    """
    parts = name.split(".")
    if parts[0] == "down_blocks":
        level = int(parts[1])
    elif parts[0] == "up_blocks":
        level = n_levels - 1 - int(parts[1])
    elif parts[0] == "mid_block":
        level = n_levels - 1
    else:
        raise ValueError(f"'{name}' is not inside a U-Net block.")
    return latent_size // 2 ** level


def layers_at(unet: torch.nn.Module, latent_size: int, resolutions: Iterable[int],
              parts: Sequence[str] = ("down_blocks", "mid_block", "up_blocks")) -> list[str]:
    """Cross-attention layers in the given parts of the U-Net that run at one of ``resolutions``."""
    n = len(unet.config.block_out_channels)
    res = set(resolutions)
    names = [name for name in cross_attention_layers(unet) if name.split(".")[0] in parts
             and block_resolution(name, latent_size, n) in res]
    if not names:
        raise KeyError(f"No cross-attention layer of {parts} runs at {sorted(res)} for a {latent_size}x{latent_size} "
                       f"latent. Cross-attention runs at: "
                       f"{sorted({block_resolution(x, latent_size, n) for x in cross_attention_layers(unet)})}.")
    return names


# --------------------------------------------------------------------------------------------------- the store
class AttentionStore:
    """Records attention maps of the controlled layers, one entry per layer call, averaged over heads.

    softmax: ``"token"`` (each position's distribution over tokens; the layer's own attention) or ``"spatial"``
        (each token's distribution over positions, softmax over dim -2 of the logits, as SeaS's official code).
    cond_half: keep only the second half of the batch (the conditional branch of a CFG batch).
    keep_grad: keep the autograd graph of the maps (losses on attention); otherwise they are detached.
    """

    def __init__(self, softmax: Softmax = "token", cond_half: bool = False, keep_grad: bool = False,
                 average_heads: bool = True):
        if softmax not in ("token", "spatial"):
            raise ValueError(f"softmax must be 'token' or 'spatial', got '{softmax}'.")
        self.softmax, self.cond_half, self.keep_grad, self.average_heads = softmax, cond_half, keep_grad, average_heads
        self.maps: dict[str, list[torch.Tensor]] = {}

    def reset(self) -> None:
        self.maps = {}

    def record(self, layer: str, logits: torch.Tensor, probs: torch.Tensor) -> None:
        m = probs if self.softmax == "token" else logits.softmax(dim=-2)
        if self.cond_half:
            m = m[m.shape[0] // 2:]
        if self.average_heads:
            m = m.mean(dim=1)  # (B, N, L)
        self.maps.setdefault(layer, []).append(m if self.keep_grad else m.detach())

    def latest(self, layer: str) -> torch.Tensor:
        if layer not in self.maps:
            raise KeyError(f"No map recorded for '{layer}'. Recorded: {', '.join(self.maps) or 'none'}.")
        return self.maps[layer][-1]

    def mean_map(self, layers: Sequence[str] | None = None, calls: slice = slice(-1, None)) -> torch.Tensor:
        """Mean over ``layers`` (all recorded if None) and over the selected calls of each, as (B, h, w, L).

        All selected layers must share one resolution (square latents)."""
        layers = list(self.maps) if layers is None else list(layers)
        stacked = [torch.stack(self.maps[name][calls]).mean(0) for name in layers]
        sizes = {s.shape[-2] for s in stacked}
        if len(sizes) != 1:
            raise ValueError(f"Layers {layers} have different resolutions ({sorted(sizes)} positions); "
                             f"average them per resolution.")
        m = torch.stack(stacked).mean(0)  # (B, N, L) or (B, heads, N, L)
        side = math.isqrt(m.shape[-2])
        return m.reshape(*m.shape[:-2], side, side, m.shape[-1])


# ---------------------------------------------------------------------------------------------------- editing
class AttentionEdit(Protocol):
    """Either method may be absent. ``logits``/``probs``: (B, heads, N, L); return a tensor of the same shape."""

    def edit_logits(self, layer: str, logits: torch.Tensor) -> torch.Tensor: ...

    def edit_probs(self, layer: str, probs: torch.Tensor) -> torch.Tensor: ...


def resize_to_queries(region: torch.Tensor, n_queries: int) -> torch.Tensor:
    """A (B, H, W) region map resized (area / nearest for binary) to the square grid of ``n_queries`` -> (B, N)."""
    side = math.isqrt(n_queries)
    if side * side != n_queries:
        raise ValueError(f"{n_queries} query positions are not a square grid; pass square latents.")
    r = F.interpolate(region[:, None].float(), size=(side, side), mode="area")
    return r.flatten(1)


class RegionTokenMask:
    """Masked cross-attention: each token group attends only inside (or only outside) its region.

    groups: list of ``(token_indices, region, inside)``; ``region`` is (B, H, W) in [0, 1] at any resolution, resized
    per layer by area averaging and binarised at ``threshold``. Logits of the group's tokens at positions where the
    token must not attend are set to the dtype's minimum, so they get zero probability; tokens not in any group
    (start, end, padding) stay unrestricted, so no row is empty.
    """

    def __init__(self, groups: Sequence[tuple[Sequence[int], torch.Tensor, bool]], threshold: float = 0.5):
        self.groups, self.threshold = groups, threshold

    def edit_logits(self, layer: str, logits: torch.Tensor) -> torch.Tensor:
        B, _, N, L = logits.shape
        blocked = torch.zeros(B, N, L, dtype=torch.bool, device=logits.device)
        for tokens, region, inside in self.groups:
            r = resize_to_queries(region.to(logits.device), N)
            if r.shape[0] != B:  # a CFG batch: the same region for both halves
                r = r.repeat(B // r.shape[0], 1)
            allowed = r >= self.threshold if inside else r < self.threshold  # (B, N)
            idx = torch.as_tensor(list(tokens), device=logits.device)
            blocked[:, :, idx] |= ~allowed[:, :, None]
        return logits.masked_fill(blocked[:, None], torch.finfo(logits.dtype).min)


class TokenReweight:
    """Multiply the attention of some tokens by a per-position weight, on logits or on probabilities.

    weight: a scalar or (B, H, W) map, resized per layer by area averaging; ``on='probs'`` multiplies P (paper-style
    map re-weighting), ``on='logits'`` the pre-softmax scores (AnomalyDiffusion's official code).
    """

    def __init__(self, tokens: Sequence[int], weight: float | torch.Tensor, on: Literal["logits", "probs"] = "probs",
                 layers: Sequence[str] | None = None):
        self.tokens, self.weight, self.on = list(tokens), weight, on
        self.layers = None if layers is None else set(layers)

    def _apply(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        if self.layers is not None and layer not in self.layers:
            return x
        B, _, N, _ = x.shape
        w = self.weight
        if torch.is_tensor(w) and w.ndim == 3:
            w = resize_to_queries(w.to(x.device, x.dtype), N)
            if w.shape[0] != B:
                w = w.repeat(B // w.shape[0], 1)
            w = w[:, None, :, None]  # (B, 1, N, 1)
        scale = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        scale[self.tokens] = 0
        keep = scale.view(1, 1, 1, -1)
        return x * keep + x * (1 - keep) * w

    def edit_logits(self, layer: str, logits: torch.Tensor) -> torch.Tensor:
        return self._apply(layer, logits) if self.on == "logits" else logits

    def edit_probs(self, layer: str, probs: torch.Tensor) -> torch.Tensor:
        return self._apply(layer, probs) if self.on == "probs" else probs


# ---------------------------------------------------------------------------------------------- the processor
class ControlledAttnProcessor:
    """Explicit attention for one layer, with recording and editing (see the module docstring)."""

    def __init__(self, name: str, store: AttentionStore | None = None, edit: AttentionEdit | None = None):
        self.name, self.store, self.edit = name, store, edit

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        B = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        d = k.shape[-1] // attn.heads
        q, k, v = (x.view(B, -1, attn.heads, d).transpose(1, 2) for x in (q, k, v))  # (B, heads, N|L, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        logits = (q @ k.transpose(-1, -2)) * attn.scale  # (B, heads, N, L)
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], B)
            logits = logits + mask.view(B, attn.heads, -1, mask.shape[-1])
        if self.edit is not None and hasattr(self.edit, "edit_logits"):
            logits = self.edit.edit_logits(self.name, logits)
        probs = logits.softmax(dim=-1)
        if self.store is not None:
            self.store.record(self.name, logits, probs)
        if self.edit is not None and hasattr(self.edit, "edit_probs"):
            probs = self.edit.edit_probs(self.name, probs)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, -1, attn.heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def attention_control(unet: torch.nn.Module, layers: Sequence[str], store: AttentionStore | None = None,
                      edit: AttentionEdit | None = None) -> Iterator[AttentionStore | None]:
    """Control the attention modules named in ``layers`` for the duration of the block; restore on exit or error."""
    modules = dict(unet.named_modules())
    bad = [n for n in layers if not isinstance(modules.get(n), Attention)]
    if bad:
        raise KeyError(f"Not attention modules of this U-Net: {bad}. See cross_attention_layers(unet).")
    originals = {}
    try:
        for name in layers:
            originals[name] = modules[name].processor
            modules[name].set_processor(ControlledAttnProcessor(name, store, edit))
        yield store
    finally:
        for name, proc in originals.items():
            modules[name].set_processor(proc)
