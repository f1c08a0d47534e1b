"""The world CLIP: a small CLIP trained contrastively on the mini prior's corpus; the synthetic world's CLIP/Inception.

Real setting: SD's world has CLIP (zero-shot classification, CLIP scores, VLAD's image encoder) and Inception
(IS / FID / KID). Neither can be downloaded here, so the toolkit trains its own on the same corpus as the mini prior
(normals of all 13 products in the web look, defects of the pretraining products only, captions naming product and
defect) and ships it in ``core/models/world_clip`` in transformers' ``CLIPModel`` layout (``save_pretrained``:
``config.json`` + ``model.safetensors``, the tokenizer, ``preprocessor_config.json``). It loads through the same
local-only code as a real CLIP directory (:func:`load_clip`), so every consumer works with either.

- :func:`build_world_clip`: ViT image tower (patch 16 on 128 px: 64 tokens) + a ``CLIPTextModel`` of the prior's
  family (same tokenizer, same width and depth), projected to a shared embedding.
- :func:`clip_loss`: the symmetric InfoNCE of CLIP (Radford et al. 2021, arXiv 2103.00020), with one change: the
  corpus repeats captions ("a photo of a bottle" labels hundreds of images), so a batch holds several true pairs per
  row; the target of each row is uniform over all items of the same class (product, state) rather than one-hot.
  Without it, identical captions of two bottles would be pushed apart as negatives.
- :class:`ClipFeatures`: ``(features, logits)`` for ``core.metrics.generation.extract``: L2-normalised image
  embeddings (the FID / KID space) and zero-shot logits over every (product, state) class (the IS classifier).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.synthetic import ALL_PRODUCTS, PRODUCTS
from ..io import replace_dir, torch_save
from .loading import ModelNotFoundError
from .pretrain import DEFECT_PHRASES, caption, lr_lambda, product_words
from .tokenizer import build_tokenizer

WORLD_CLIP_DIR = Path(__file__).resolve().parent / "world_clip"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation, kept so a real CLIP is a drop-in
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

NORMAL_PROMPTS = ("a photo of a {p}", "a photo of a good {p}", "a photo of a flawless {p}", "a {p}")
DAMAGED_PROMPTS = ("a photo of a damaged {p}", "a photo of a defective {p}", "a photo of a {p} that is damaged",
                   "a photo of a broken {p}")


def state_prompt(product: str, state: str | None) -> str:
    """The canonical prompt of a (product, state) class: "a photo of a <p>" or "a photo of a <p> with <defect>"."""
    p = product_words(product)
    return f"a photo of a {p}" if state in (None, "good") else f"a photo of a {p} with {DEFECT_PHRASES[state]}"


def world_classes(products: Sequence[str] = ALL_PRODUCTS) -> list[tuple[str, str]]:
    """Every (product, state) of the world: "good" and each of the product's defect types."""
    return [(p, s) for p in products for s in ("good",) + PRODUCTS[p].defects]


# ============================================================================ model

def build_world_clip(arch: dict, tokenizer=None, seed: int = 0):
    """A randomly initialised ``CLIPModel``: ``arch`` holds ``image_size``, ``patch_size``, ``vision`` and ``text``
    (CLIPVisionConfig / CLIPTextConfig kwargs) and ``projection_dim``. Returns (model, tokenizer)."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tokenizer or build_tokenizer(model_max_length=int(arch["max_length"]))
    text = dict(arch["text"], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                max_position_embeddings=int(arch["max_length"]))
    vision = dict(arch["vision"], image_size=int(arch["image_size"]), patch_size=int(arch["patch_size"]))
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=int(arch["projection_dim"]))
    torch.manual_seed(seed)
    return CLIPModel(config), tokenizer


class ClipEncoder(nn.Module):
    """A CLIPModel with its tokenizer and preprocessing: images in [0, 1] and prompts in, unit embeddings out."""

    def __init__(self, model, tokenizer, image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.model, self.tokenizer, self.image_size = model, tokenizer, int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().to(self.device)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W) -> L2-normalised embeddings (B, D)."""
        out = self.model.get_image_features(pixel_values=self.preprocess(images))
        return F.normalize(_tensor(out), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        # the tokenizer's own attention mask: CLIP pads with its end-of-text token, which must stay visible once
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                           attention_mask=tok.attention_mask.to(self.device))
        return F.normalize(_tensor(out), dim=-1)

    @torch.no_grad()
    def class_embeds(self, prompt_sets: Sequence[Sequence[str]]) -> torch.Tensor:
        """One unit embedding per class: the normalised mean of its prompts' embeddings (prompt ensembling)."""
        return torch.stack([F.normalize(self.text_embeds(list(ps)).mean(0), dim=-1) for ps in prompt_sets])

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


def _tensor(out) -> torch.Tensor:
    """transformers 5 may return a model output where 4.x returned the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


class ClipFeatures(nn.Module):
    """``(features, logits)`` for the generation metrics: unit image embeddings (FID / KID) and zero-shot logits
    over ``classes`` (IS), the classes' prompts being :func:`state_prompt`."""

    num_features: int

    def __init__(self, encoder: ClipEncoder, classes: Sequence[tuple[str, str]] | None = None):
        super().__init__()
        self.encoder = encoder
        self.classes = list(classes or world_classes())
        self.register_buffer("text", encoder.class_embeds([[state_prompt(p, s)] for p, s in self.classes]),
                             persistent=False)
        self.num_features = self.text.shape[1]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encoder.image_embeds(images)
        return f, self.encoder.logit_scale * f @ self.text.T


# ============================================================================ loss

def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
              ) -> torch.Tensor:
    """Symmetric contrastive loss with multi-positive targets.

    ``logits = s * I T^T`` (unit rows, s = exp(logit_scale)); the target of row i is uniform over every j with
    ``labels[j] == labels[i]`` (one-hot when labels are all distinct, which is CLIP's loss exactly); the loss is the
    mean of the image->text and text->image cross-entropies.
    """
    logits = logit_scale.exp() * image_emb @ text_emb.T
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (i2t + t2i) / 2


# ============================================================================ training

def caption_for(product: str, defect: str | None, rng: np.random.Generator) -> str:
    """A training caption: the prior's caption templates plus CLIP's normal / damaged phrasings."""
    if rng.random() < 0.5:
        return caption(product, defect, rng)
    templates = NORMAL_PROMPTS if defect is None else DAMAGED_PROMPTS + ("a photo of a {p} with {d}",)
    t = templates[rng.integers(len(templates))]
    return t.format(p=product_words(product), d=DEFECT_PHRASES.get(defect or "", ""))


def augment(x: torch.Tensor, g: torch.Generator, blur_prob: float = 0.0, blur_sigma: Sequence[float] = (0.3, 2.0)
            ) -> torch.Tensor:
    """Random horizontal flip, a random crop of 80-100 % of the side resized back, and with probability
    ``blur_prob`` a Gaussian blur of sigma drawn from ``blur_sigma`` (web photos are not all sharp; a judge of
    generated images must not fail on softness alone). Images in [0, 1]."""
    from torchvision.transforms.functional import gaussian_blur

    B, _, H, W = x.shape
    flip = torch.rand(B, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    out = []
    for i in range(B):
        s = int(H * (0.8 + 0.2 * float(torch.rand(1, generator=g))))
        y0, x0 = (int(torch.randint(H - s + 1, (1,), generator=g)), int(torch.randint(W - s + 1, (1,), generator=g)))
        xi = F.interpolate(x[i:i + 1, :, y0:y0 + s, x0:x0 + s], size=(H, W), mode="bilinear", align_corners=False)
        if blur_prob > 0 and float(torch.rand(1, generator=g)) < blur_prob:
            sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * float(torch.rand(1, generator=g))
            xi = gaussian_blur(xi, kernel_size=2 * int(3 * sigma) + 1, sigma=sigma)
        out.append(xi)
    return torch.cat(out)


def train_world_clip(encoder: ClipEncoder, images: np.ndarray, products: Sequence[str], defects: Sequence[str | None],
                     cfg: dict, work_dir: Path, seed: int) -> dict:
    """Contrastive training, resumable from ``work_dir/clip_state.pt`` (a killed run continues bit-identically)."""
    model = encoder.model.train()
    classes = {c: i for i, c in enumerate(sorted({(p, d or "good") for p, d in zip(products, defects)}))}
    labels_all = torch.tensor([classes[(p, d or "good")] for p, d in zip(products, defects)])
    # CLIP's recipe: no weight decay on gains, biases and the temperature
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.get("weight_decay", 0.1)},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.get("warmup", 100), cfg["steps"], floor=0.05))
    ckpt, start = Path(work_dir) / "clip_state.pt", 0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        start = state["step"]
    data = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8; converted per batch
    batch, t0, losses = int(cfg["batch"]), time.perf_counter(), []
    bar = tqdm(range(start, cfg["steps"]), desc="world CLIP", initial=start, total=cfg["steps"])
    for step in bar:
        g = torch.Generator().manual_seed(seed * 1_000_037 + step)
        rng = np.random.default_rng([seed, step, 7])
        idx = torch.randint(len(data), (batch,), generator=g)
        x = augment(data[idx].float() / 255.0, g, float(cfg.get("blur_prob", 0.0)),
                    tuple(cfg.get("blur_sigma", (0.3, 2.0))))
        prompts = [caption_for(products[i], defects[i], rng) for i in idx.tolist()]
        loss = clip_loss(encoder.image_embeds(x), encoder.text_embeds(prompts), labels_all[idx],
                         model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if (step + 1) % cfg["checkpoint_every"] == 0 or step + 1 == cfg["steps"]:
            torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step + 1}, ckpt)
        if cfg.get("stop_after") and step + 1 >= cfg["stop_after"]:
            break
    model.eval()
    return {"seconds": time.perf_counter() - t0, "steps_run": cfg["steps"] - start,
            "final_loss": float(np.mean(losses[-50:])) if losses else None}


# ============================================================================ save / load

def save_clip(encoder: ClipEncoder, out_dir: str | Path) -> Path:
    """``save_pretrained`` of the model and tokenizer plus a CLIPImageProcessor config, written atomically."""
    import shutil

    from transformers import CLIPImageProcessor

    final = Path(out_dir)
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    encoder.model.save_pretrained(tmp)
    encoder.tokenizer.save_pretrained(tmp)
    CLIPImageProcessor(size={"shortest_edge": encoder.image_size},
                       crop_size={"height": encoder.image_size, "width": encoder.image_size},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(tmp)
    for f in ("README.md", "report.json", "config.yaml"):  # the card and report survive a retrain until rewritten
        if (final / f).is_file() and not (tmp / f).exists():
            shutil.copy2(final / f, tmp / f)
    return replace_dir(tmp, final)


def load_clip(path: str | Path | None = None, key: str = "metrics.clip_path") -> ClipEncoder:
    """A CLIP (the world CLIP by default, or a real one such as openai/clip-vit-large-patch14) from a local
    transformers directory, in eval mode."""
    import json

    from transformers import CLIPModel, CLIPTokenizer

    path = Path(path).expanduser() if path else WORLD_CLIP_DIR
    if not (path / "config.json").is_file():
        hint = ("It ships with the toolkit: restore it (git checkout core/models/world_clip) or rebuild it with "
                "`python scripts/train_world_clip.py`." if path == WORLD_CLIP_DIR else
                "Download e.g. openai/clip-vit-large-patch14 in transformers format.")
        raise ModelNotFoundError(f"No CLIP model at '{path}' (expected a transformers directory with config.json, "
                                 f"model.safetensors and tokenizer files). {hint} Set {key}=<directory>.")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).float().eval()
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"Could not load a CLIP model from '{path}': {e}. Set {key}.") from e
    mean, std = CLIP_MEAN, CLIP_STD
    pp = path / "preprocessor_config.json"
    if pp.is_file():
        meta = json.loads(pp.read_text())
        mean, std = meta.get("image_mean", mean), meta.get("image_std", std)
    return ClipEncoder(model, tokenizer, model.config.vision_config.image_size, mean, std)


# ============================================================================ zero-shot evaluation

@torch.no_grad()
def embed_images(encoder: ClipEncoder, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([encoder.image_embeds(images[i:i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def zero_shot_products(encoder: ClipEncoder, image_emb: torch.Tensor, products: Sequence[str] = ALL_PRODUCTS
                       ) -> torch.Tensor:
    """Product index per image: the nearest class embedding, each class the ensemble of the normal and damaged
    prompts of a product."""
    text = encoder.class_embeds([[t.format(p=product_words(p)) for t in NORMAL_PROMPTS + DAMAGED_PROMPTS]
                                 for p in products])
    return (image_emb @ text.T).argmax(1)


@torch.no_grad()
def zero_shot_defect_scores(encoder: ClipEncoder, image_emb: torch.Tensor, product: str) -> torch.Tensor:
    """P(damaged) per image from a two-way softmax between the product's normal and damaged prompt ensembles
    (WinCLIP-style zero-shot anomaly scoring, Jeong et al. 2023, arXiv 2303.14814)."""
    p = product_words(product)
    text = encoder.class_embeds([[t.format(p=p) for t in NORMAL_PROMPTS], [t.format(p=p) for t in DAMAGED_PROMPTS]])
    return torch.softmax(encoder.logit_scale * image_emb @ text.T, dim=1)[:, 1]


__all__ = ["CLIP_MEAN", "CLIP_STD", "ClipEncoder", "ClipFeatures", "DAMAGED_PROMPTS", "NORMAL_PROMPTS",
           "WORLD_CLIP_DIR", "augment", "build_world_clip", "caption_for", "clip_loss", "embed_images", "load_clip",
           "save_clip", "state_prompt", "train_world_clip", "world_classes", "zero_shot_defect_scores",
           "zero_shot_products"]
