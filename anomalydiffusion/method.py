"""AnomalyDiffusion loops: ``train`` (the spatial anomaly embedding, Sec. 3.2 / Eq. 6, then the mask embeddings,
Sec. 3.4 / Eq. 9) and ``generate`` (blended diffusion, Eq. 1, with Adaptive Attention Re-weighting, Sec. 3.3).
Modules and equations live in ``anomalydiffusion/model.py``; options in ``configs/method/anomalydiffusion.yaml``.

The diffusion prior stays frozen: only e_a (one k-token embedding per (product, anomaly type)), the spatial encoder E
and the mask embeddings e_m learn. One run covers every (product, type) pair of ``method.products`` (default: the
run's ``product``), as the paper trains one model for a dataset.

Run directory written by ``train``::

    config.yaml                       the resolved Hydra config (core.runs)
    anomalydiffusion.json             products, keys "<product>/<type>", training images, prompt, sizes
    embeddings.safetensors            e_a: (pairs, k, D) in key order
    spatial_encoder.safetensors       E
    mask_embeddings.safetensors       e_m per key (k' tokens each)
    train_state.pt / mask_state.pt    only while a stage runs: its resumable state
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from tqdm.auto import tqdm

from core.data import DatasetError, Sample, given_mask_files, load_from_config, read_image, read_mask, \
    require_masks, screen_empty_masks, split_from_config, training_normals as core_training_normals
from core.data.torch_dataset import to_tensor
from core.diffusion import TokenReweight, attention_control, cfg_eps, cross_attention_layers, \
    inference_scheduler, noise_to, sample
from core.engine import Engine, EngineSpec, inference_dtype, make_adamw
from core.export import GeneratedWriter, to_uint8, item_masks
from core.io import atomic_write, load_weights, read_run_json, read_run_safetensors, write_json
from core.models import SDComponents, load_model
from core.models.slim import weights_hash
from core.runs import item_generator as core_item_generator, positive_int, resolve_device, run_identity
from core.shard import current_shard

from .model import (AnomalyEmbeddings, EmbeddingPrompt, aar_weights_official, aar_weights_paper,
                    binarize_generated_mask, blend, build_spatial_encoder, hugs_border, latent_mask,
                    masked_diffusion_loss)

STATE, MASK_STATE, META = "train_state.pt", "mask_state.pt", "anomalydiffusion.json"
AAR_KINDS = ("none", "paper", "official")


class MaskGenerationError(ValueError):
    """The mask embedding of a type draws no usable mask (a user error: train it longer, or use the training masks)."""


# ------------------------------------------------------------------------------------------------------- data
def key_of(product: str, anomaly_type: str) -> str:
    return f"{product}/{anomaly_type}"


def run_products(cfg: DictConfig) -> list[str]:
    """``method.products`` (one model for all their pairs) or the run's ``product``."""
    products = cfg.method.get("products")
    return [str(cfg.product)] if not products else [str(p) for p in products]


def training_anomalies(cfg: DictConfig, products: Sequence[str]) -> dict[str, list[Sample]]:
    """The split's training anomalies (one_third: the lowest ids, a third of each type) per "<product>/<type>" key,
    sorted by path. Errors name what is missing: a dataset without masks, a product without training anomalies."""
    split = split_from_config(load_from_config(cfg.dataset, list(products)), cfg.split)
    by_key: dict[str, list[Sample]] = {}
    for p in products:
        anomalies = sorted((s for s in split.train if s.label == 1 and s.product == p), key=lambda s: s.path)
        require_masks(anomalies, p, "AnomalyDiffusion learns from image-mask pairs")
        anomalies = screen_empty_masks(anomalies, str(cfg.method.train.get("empty_masks", "error")),
                                       "method.train.empty_masks")
        if not anomalies:
            raise DatasetError(f"Product '{p}' has no training anomalies under split '{cfg.split.name}' in "
                               f"{cfg.dataset.root}. AnomalyDiffusion needs a few masked anomaly images per type.")
        for s in anomalies:
            by_key.setdefault(key_of(p, s.anomaly_type), []).append(s)
        # a type the test split holds but the training split does not: nothing to learn it from
        check_types(sorted({s.anomaly_type for s in split.test if s.label == 1 and s.product == p}), by_key, p)
    return dict(sorted(by_key.items()))


def check_types(wanted: Sequence[str], have: dict[str, list], product: str) -> None:
    missing = [t for t in wanted if key_of(product, t) not in have]
    if missing:
        raise DatasetError(f"Anomaly type(s) {missing} of '{product}' have no training anomaly in this split: there is "
                           f"nothing to learn them from. Fix: add masked examples of them to the training split.")


def load_pair(sample: Sample, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, S, S) image in [0, 1] and (1, S, S) binary mask, both resized to the model's side (image bilinear with
    antialiasing, mask nearest)."""
    x = read_image(sample.path)
    m = torch.from_numpy(read_mask(sample.mask_paths, x.shape[:2]).astype(np.float32))[None]
    img = F.interpolate(to_tensor(x)[None], size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)[0].clamp(0, 1)
    m = (F.interpolate(m[None], size=(size, size), mode="nearest")[0] > 0.5).float()
    return img, m


@dataclass
class PairBank:
    """The training pairs of every key, at the model's resolution."""
    keys: list[str]
    images: dict[str, torch.Tensor]   # key -> (n, 3, S, S)
    masks: dict[str, torch.Tensor]    # key -> (n, 1, S, S)
    paths: dict[str, list[str]]

    @classmethod
    def load(cls, by_key: dict[str, list[Sample]], size: int) -> "PairBank":
        images, masks, paths = {}, {}, {}
        for k, samples in by_key.items():
            pairs = [load_pair(s, size) for s in samples]
            images[k] = torch.stack([p[0] for p in pairs])
            masks[k] = torch.stack([p[1] for p in pairs])
            paths[k] = [str(Path(s.path).resolve()) for s in samples]
        return cls(list(by_key), images, masks, paths)


def augment_pair(image: torch.Tensor, mask: torch.Tensor, g: torch.Generator, flip: bool = True,
                 rotate: float = 20.0, crop_min: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """Appendix B's augmentation, applied alike to a (C, S, S) image and its (1, S, S) mask: random horizontal and
    vertical flips (p = 0.5 each), a rotation by a whole number of degrees in [0, ``rotate``] (official: randint(0,
    20)) unless it would turn part of the anomaly out of the frame, then a random square crop of side s * S (s
    uniform in [``crop_min``, 1]) placed so that the anomaly's bounding box stays inside it (the crop grows to the
    box when the box is larger), resized back to S x S. The mask stays binary (nearest neighbour)."""
    S = image.shape[-1]
    r = torch.rand(4, generator=g)
    if flip and r[0] < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if flip and r[1] < 0.5:
        image, mask = image.flip(-2), mask.flip(-2)
    angle = float(torch.randint(0, int(rotate) + 1, (1,), generator=g)) if rotate > 0 else 0.0
    if angle:
        a = math.radians(angle)
        theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])[None]
        grid = F.affine_grid(theta, (1, 1, S, S), align_corners=False)
        turned = (F.grid_sample(mask[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
                  > 0.5).to(mask.dtype)
        if turned.sum() >= 0.95 * mask.sum():   # a rotation that would turn part of the anomaly out of the frame is
            image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros",   # not applied
                                  align_corners=False)[0]
            mask = turned
    side = int(round(S * (crop_min + (1 - crop_min) * float(r[2]))))
    ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
    if len(ys):
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        side = min(S, max(side, y1 - y0, x1 - x0))
        lo_y, hi_y = max(0, y1 - side), min(y0, S - side)
        lo_x, hi_x = max(0, x1 - side), min(x0, S - side)
    else:
        lo_y, hi_y, lo_x, hi_x = 0, S - side, 0, S - side
    u = torch.rand(2, generator=g)
    top = lo_y + int(float(u[0]) * (hi_y - lo_y + 1)) if hi_y >= lo_y else lo_y
    left = lo_x + int(float(u[1]) * (hi_x - lo_x + 1)) if hi_x >= lo_x else lo_x
    top, left = min(top, hi_y) if hi_y >= lo_y else top, min(left, hi_x) if hi_x >= lo_x else left
    if side < S:
        image = F.interpolate(image[None, :, top:top + side, left:left + side], size=(S, S), mode="bilinear",
                              align_corners=False)[0].clamp(0, 1)
        mask = F.interpolate(mask[None, :, top:top + side, left:left + side], size=(S, S), mode="nearest")[0]
    return image, mask


def embedding_batch(bank: PairBank, seed: int, step: int, batch: int, aug: dict
                    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The ``step``-th batch: ``batch`` pairs, each from a key drawn uniformly (so rare types are not starved; the
    paper: "4 pairs sampled from all the anomaly categories"), then an image of it, augmented. A pure function of
    (seed, step), so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    keys, imgs, masks = [], [], []
    for _ in range(batch):
        k = bank.keys[int(torch.randint(len(bank.keys), (1,), generator=g))]
        i = int(torch.randint(bank.images[k].shape[0], (1,), generator=g))
        x, m = augment_pair(bank.images[k][i], bank.masks[k][i], g, **aug)
        keys.append(k)
        imgs.append(x)
        masks.append(m)
    return keys, torch.stack(imgs), torch.stack(masks)


def noised_latents(comp: SDComponents, images: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t of images in [0, 1]: the frozen VAE's latents, noised to ``t`` with ``eps`` (the forward process)."""
    dev = comp.device
    with torch.no_grad():
        z0 = comp.encode_images(images.to(dev))
    return comp.scheduler.add_noise(z0, eps.to(dev), t.to(dev))


def batch_noise(seed: int, step: int, shape: tuple[int, ...], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed((seed + 7919) * 1_000_003 + step)
    return torch.randint(0, T, (shape[0],), generator=g), torch.randn(shape, generator=g)


# ------------------------------------------------------------------------------------------------ the model
def prompt_for(comp: SDComponents, cfg_prompt, n_vectors: int, product: str | None = None) -> EmbeddingPrompt:
    template = str(cfg_prompt.template)
    if "{product}" in template:
        template = template.replace("{product}", str(product).replace("_", " "))
    return EmbeddingPrompt(comp.tokenizer, template, n_vectors, str(cfg_prompt.placeholder))


def word_embedding(comp: SDComponents, word: str) -> torch.Tensor:
    ids = comp.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"method.prompt.init_word '{word}' encodes to no token.")
    table = comp.text_encoder.get_input_embeddings().weight
    return table[torch.tensor(ids, device=table.device)].mean(0).detach().float().cpu()


def build_models(comp: SDComponents, mcfg, keys: Sequence[str], init: torch.Tensor | None
                 ) -> tuple[AnomalyEmbeddings, torch.nn.Module]:
    dim = comp.text_encoder.get_input_embeddings().weight.shape[1]
    emb = AnomalyEmbeddings(keys, int(mcfg.anomaly_tokens), dim, init)
    enc = build_spatial_encoder(str(mcfg.spatial_encoder), int(mcfg.spatial_tokens), dim, comp.resolution,
                                backbone=mcfg.get("backbone"), fpn_channels=mcfg.get("fpn_channels"),
                                head_channels=mcfg.get("head_channels"), head_grid=mcfg.get("head_grid"),
                                units=mcfg.get("ir_units"), widths=mcfg.get("ir_widths"))
    return emb, enc


def condition(comp: SDComponents, prompt: EmbeddingPrompt, emb: AnomalyEmbeddings, enc: torch.nn.Module,
              keys: Sequence[str], masks: torch.Tensor) -> torch.Tensor:
    """The text condition of e = {e_a, e_s}: e_a of each key, e_s = E(mask), spliced into the prompt."""
    vectors = torch.cat([emb(keys), enc(masks)], dim=1)
    return prompt.encode(comp.text_encoder, vectors)


def batch_condition(comp: SDComponents, prompts: dict[str, EmbeddingPrompt], emb: AnomalyEmbeddings,
                    enc: torch.nn.Module, keys: Sequence[str], masks: torch.Tensor) -> torch.Tensor:
    """:func:`condition` for a batch whose keys may use different prompts (a template naming the product): one
    batched call per prompt, rows put back in order."""
    groups: dict[str, list[int]] = {}
    for r, k in enumerate(keys):
        groups.setdefault(prompts[k].template, []).append(r)
    if len(groups) == 1:
        return condition(comp, prompts[keys[0]], emb, enc, keys, masks)
    out: list[torch.Tensor | None] = [None] * len(keys)
    for rows in groups.values():
        ctx = condition(comp, prompts[keys[rows[0]]], emb, enc, [keys[r] for r in rows], masks[rows])
        for r, c in zip(rows, ctx):
            out[r] = c
    return torch.stack(out)


def freeze(comp: SDComponents) -> None:
    for m in (comp.unet, comp.vae, comp.text_encoder):
        m.requires_grad_(False)
        m.eval()


def total_steps(node, limits) -> int:
    steps = int(node.steps)
    cap = (limits or {}).get("max_train_steps")
    return min(steps, int(cap)) if cap else steps


def train_embeddings(cfg: DictConfig, run_dir: Path, comp: SDComponents, bank: PairBank,
                     on_step: Callable[[int], None] | None = None, engine: Engine | None = None) -> None:
    """Eq. 6: e_a (per key) and the spatial encoder E, jointly, by the masked diffusion loss (Eq. 5) on the frozen
    prior; batches of ``batch`` pairs across all keys; AdamW; resumable from ``run_dir/train_state.pt``."""
    mcfg, tcfg, seed = cfg.method.model, cfg.method.train, int(cfg.seed)
    engine = engine or Engine(EngineSpec.from_config(tcfg), comp.device)
    freeze(comp)
    torch.manual_seed(seed)
    init = word_embedding(comp, str(cfg.method.prompt.init_word))
    emb, enc = build_models(comp, mcfg, bank.keys, init)
    emb.to(comp.device).train()
    enc.to(comp.device).train()
    n_vec = int(mcfg.anomaly_tokens) + int(mcfg.spatial_tokens)
    prompts = {k: prompt_for(comp, cfg.method.prompt, n_vec, k.split("/")[0]) for k in bank.keys}
    opt = make_adamw([{"params": list(emb.parameters()) + list(enc.parameters()), "lr": float(tcfg.lr)}],
                     str(tcfg.get("optimizer", "adamw")), float(tcfg.weight_decay))
    state = run_dir / STATE
    modules, optimizers = {"embeddings": emb, "spatial_encoder": enc}, {"optimizer": opt}
    start = engine.load(state, modules, optimizers, "AnomalyDiffusion embedding training")[0] if state.is_file() else 0
    steps = total_steps(tcfg, cfg.get("limits"))
    T = comp.scheduler.config.num_train_timesteps
    aug = dict(flip=bool(tcfg.augment.flip), rotate=float(tcfg.augment.rotate), crop_min=float(tcfg.augment.crop_min))
    B, every = int(tcfg.batch), int(tcfg.checkpoint_every)
    mine = engine.mine(B, "pairs (method.train.batch)")
    latent = (comp.unet.config.in_channels, comp.latent_size, comp.latent_size)
    bar = tqdm(range(start, steps), desc="AnomalyDiffusion embeddings", initial=start, total=steps,
               disable=not engine.is_main)
    for step in bar:
        keys, images, masks = embedding_batch(bank, seed, step, B, aug)
        t, eps = batch_noise(seed, step, (B, *latent), T)
        idx = list(mine)
        opt.zero_grad(set_to_none=True)
        with engine.autocast():
            dev = comp.device
            z_t = noised_latents(comp, images[idx], eps[idx], t[idx])
            ctx = batch_condition(comp, prompts, emb, enc, [keys[i] for i in idx], masks[idx].to(dev))
            eps_pred = comp.unet(z_t, t[idx].to(dev), encoder_hidden_states=ctx).sample
            m = latent_mask(masks[idx].to(dev), comp.latent_size)
            loss = masked_diffusion_loss(eps_pred, eps[idx].to(dev), m, str(tcfg.loss_normalize))
        engine.backward(loss * len(idx), B)   # the global batch's mean over processes
        engine.step(opt)
        engine.sync_buffers(enc)
        bar.set_postfix(loss=f"{engine.reduce_mean(float(loss.detach())):.4f}")
        done = step + 1
        if done % every == 0 and done < steps:
            engine.save(state, done, modules, optimizers)
        if on_step is not None:
            on_step(done)
    if engine.is_main:
        save_tensors(run_dir / "embeddings.safetensors", {"weight": emb.weight})
        save_tensors(run_dir / "spatial_encoder.safetensors", enc.state_dict())
        if state.exists():
            state.unlink()
    engine.barrier()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(p)))


def train_mask_embeddings(cfg: DictConfig, run_dir: Path, comp: SDComponents, bank: PairBank,
                          on_step: Callable[[int], None] | None = None, engine: Engine | None = None) -> None:
    """Eq. 9 (Sec. 3.4): per key, textual inversion of k' tokens e_m on the key's training masks (as 3-channel
    images), the plain diffusion loss; keys one after the other, each resumable (``mask_state.pt``)."""
    mk, seed = cfg.method.masks, int(cfg.seed)
    engine = engine or Engine(EngineSpec.from_config(cfg.method.train), comp.device)
    freeze(comp)
    out_path = run_dir / "mask_embeddings.safetensors"
    done_keys = read_run_safetensors(out_path, "the mask embeddings", _retrain_fix(run_dir)) if out_path.is_file() \
        else {}
    k_tokens = int(mk.tokens)
    prompt = EmbeddingPrompt(comp.tokenizer, str(mk.template), k_tokens, str(cfg.method.prompt.placeholder))
    init = word_embedding(comp, str(mk.init_word))
    steps = total_steps(mk, cfg.get("limits"))
    T = comp.scheduler.config.num_train_timesteps
    latent = (comp.unet.config.in_channels, comp.latent_size, comp.latent_size)
    aug = dict(flip=True, rotate=float(cfg.method.train.augment.rotate), crop_min=1.0)
    B = int(mk.batch)
    mine = engine.mine(B, "masks (method.masks.batch)")
    for ki, key in enumerate(bank.keys):
        if key in done_keys:
            continue
        e_m = torch.nn.Parameter(init.to(comp.device).view(1, -1).repeat(k_tokens, 1).clone())
        opt = make_adamw([{"params": [e_m], "lr": float(mk.lr)}], "adamw", float(cfg.method.train.weight_decay))
        state = run_dir / MASK_STATE
        start = 0
        if state.is_file():
            start, extra = engine.load(state, {"e_m": e_m}, {"optimizer": opt}, "AnomalyDiffusion mask embeddings")
            if extra.get("key") != key:   # the state of another key: cannot happen unless keys changed
                raise ValueError(f"{state} belongs to key {extra.get('key')}, not {key}. Fix: delete it and rerun.")
        masks = bank.masks[key]
        bar = tqdm(range(start, steps), desc=f"mask embedding {key}", initial=start, total=steps,
                   disable=not engine.is_main)
        for step in bar:
            g = torch.Generator().manual_seed((seed + 31 * (ki + 1)) * 1_000_003 + step)
            batch = []
            for _ in range(B):
                i = int(torch.randint(masks.shape[0], (1,), generator=g))
                batch.append(augment_pair(masks[i].expand(3, -1, -1), masks[i], g, **aug)[0])
            x = torch.stack(batch)
            t, eps = batch_noise(seed + 31 * (ki + 1), step, (B, *latent), T)
            idx = list(mine)
            opt.zero_grad(set_to_none=True)
            with engine.autocast():
                dev = comp.device
                z_t = noised_latents(comp, x[idx], eps[idx], t[idx])
                ctx = prompt.encode(comp.text_encoder, e_m[None].expand(len(idx), -1, -1))
                pred = comp.unet(z_t, t[idx].to(dev), encoder_hidden_states=ctx).sample
                loss = F.mse_loss(pred.float(), eps[idx].to(dev).float())
            engine.backward(loss * len(idx), B)
            engine.step(opt)
            bar.set_postfix(loss=f"{engine.reduce_mean(float(loss.detach())):.4f}")
            done = step + 1
            if done % int(mk.checkpoint_every) == 0 and done < steps:
                engine.save(state, done, {"e_m": e_m}, {"optimizer": opt}, extra={"key": key})
            if on_step is not None:
                on_step(done)
        done_keys[key] = e_m.detach().cpu()
        if engine.is_main:
            save_tensors(out_path, done_keys)   # after each key: a kill loses at most the key in progress
            if state.exists():
                state.unlink()
        engine.barrier()


def _retrain_fix(run_dir: Path) -> str:
    return (f"restore the run directory from a copy, or train it again into a new folder (scripts/train.py "
            f"method=anomalydiffusion ... hydra.run.dir=<new folder>); {run_dir} is not usable as it is.")


# ---------------------------------------------------------------------------------------------------- train
def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Fit AnomalyDiffusion to every (product, type) pair of ``method.products`` (default: ``product``): the
    spatial anomaly embedding (skipped when its files exist), then the mask embeddings (``method.train.stages``)."""
    run_dir = Path(run_dir)
    products = run_products(cfg)
    stages = [str(s) for s in cfg.method.train.stages]
    bad = [s for s in stages if s not in ("embedding", "masks")]
    if bad:
        raise ValueError(f"method.train.stages may hold 'embedding' and 'masks', got {bad}.")
    by_key = training_anomalies(cfg, products)       # data errors before the model loads
    engine = Engine(EngineSpec.from_config(cfg.method.train), resolve_device(str(cfg.device)))
    comp = load_model(cfg.model).to(engine.device)
    bank = PairBank.load(by_key, comp.resolution)
    meta = {"products": products, "keys": bank.keys, "train_anomalies": bank.paths,
            "train_normals": {p: training_normals(cfg, p) for p in products},
            "resolution": comp.resolution, "base_model": weights_hash(comp),
            # what generation rebuilds the trained modules and prompts from (a generate config cannot change them)
            "model": OmegaConf.to_container(cfg.method.model, resolve=True),
            "prompt": OmegaConf.to_container(cfg.method.prompt, resolve=True),
            "mask_prompt": {"template": str(cfg.method.masks.template), "tokens": int(cfg.method.masks.tokens)}}
    meta_path = run_dir / META
    if meta_path.is_file():
        old = read_run_json(meta_path, "the run's keys and training images", _retrain_fix(run_dir))
        if old.get("keys") != meta["keys"] or old.get("base_model") != meta["base_model"]:
            raise ValueError(f"{run_dir} was trained on other pairs or another base model than this config gives. "
                             f"Fix: train into a new folder (hydra.run.dir=...).")
    elif engine.is_main:
        write_json(meta_path, meta)
    if "embedding" in stages and not ((run_dir / "embeddings.safetensors").is_file()
                                      and (run_dir / "spatial_encoder.safetensors").is_file()):
        train_embeddings(cfg, run_dir, comp, bank, engine=engine)
    if "masks" in stages:
        done = (read_run_safetensors(run_dir / "mask_embeddings.safetensors", "the mask embeddings",
                                     _retrain_fix(run_dir)) if (run_dir / "mask_embeddings.safetensors").is_file()
                else {})
        if set(done) != set(bank.keys):
            train_mask_embeddings(cfg, run_dir, comp, bank, engine=engine)
    return run_dir


def training_normals(cfg: DictConfig, product: str) -> list[str]:
    """The product's normal training images (absolute paths): the images the anomalies are blended onto."""
    return core_training_normals(cfg, product, "AnomalyDiffusion blends its anomalies onto them")


# ------------------------------------------------------------------------------------------------- loading
@dataclass
class Trained:
    meta: dict
    emb: AnomalyEmbeddings
    enc: torch.nn.Module
    mask_embeddings: dict[str, torch.Tensor]


def load_trained(run_dir: Path, comp: SDComponents) -> Trained:
    """The run's e_a, E and mask embeddings, rebuilt from the architecture the run recorded, on the base model it was
    trained on (a base with other weights is refused)."""
    run_dir = Path(run_dir)
    fix = _retrain_fix(run_dir)
    meta_path = run_dir / META
    if not meta_path.is_file() or not (run_dir / "embeddings.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir} holds no trained AnomalyDiffusion embedding (expected {META} and "
                                f"embeddings.safetensors). Fix: run scripts/train.py method=anomalydiffusion ... "
                                f"hydra.run.dir={run_dir} to finish it.")
    meta = read_run_json(meta_path, "the run's keys and training images", fix)
    if meta.get("base_model") != weights_hash(comp):
        raise ValueError(f"{run_dir} was trained on another base model (weights hash {meta.get('base_model')}) than "
                         f"the one loaded now ({weights_hash(comp)}). Fix: generate with the run's model= setting.")
    emb, enc = build_models(comp, OmegaConf.create(meta["model"]), meta["keys"], None)
    load_weights(emb, read_run_safetensors(run_dir / "embeddings.safetensors", "the anomaly embeddings", fix),
                 run_dir / "embeddings.safetensors", "this run's anomaly embeddings", fix)
    load_weights(enc, read_run_safetensors(run_dir / "spatial_encoder.safetensors", "the spatial encoder", fix),
                 run_dir / "spatial_encoder.safetensors", "this run's spatial encoder", fix)
    path = run_dir / "mask_embeddings.safetensors"
    masks = read_run_safetensors(path, "the mask embeddings", fix) if path.is_file() else {}
    return Trained(meta, emb.to(comp.device).eval(), enc.to(comp.device).eval(), masks)


# ------------------------------------------------------------------------------------------------- generate
def item_generator(seed: int, key: str, index: int, what: str = "image") -> torch.Generator:
    """Per-item randomness (normal image, mask, start and step noise), :func:`core.runs.item_generator` of the item
    and of what it draws."""
    return core_item_generator(seed, key, index, what)


def ddim(comp: SDComponents):
    """DDIM on the prior's training schedule, the LDM code's "uniform" timesteps (leading spacing, offset 1)."""
    return inference_scheduler(comp.scheduler.config, "ddim", "leading")


@torch.no_grad()
def sample_masks(comp: SDComponents, prompt: EmbeddingPrompt, e_m: torch.Tensor, gens: Sequence[torch.Generator],
                 steps: int, eta: float, guidance: float, threshold: float, border: float, tries: int,
                 progress: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Sec. 3.4: masks from the mask embedding e_m with CFG (scale 5, Eq. 10), DDIM with ``eta``; each decoded image
    becomes a binary mask (:func:`binarize_generated_mask`), and one that hugs the border (or is empty) is drawn
    again from the item's own generator, up to ``tries`` times. Returns (B, S, S) masks and each item's number of
    draws (a mask still rejected after ``tries`` draws raises)."""
    B = len(gens)
    latent = (comp.unet.config.in_channels, comp.latent_size, comp.latent_size)
    cond = prompt.encode(comp.text_encoder, e_m.to(comp.device)[None].expand(B, -1, -1).to(comp.unet.dtype))
    uncond = comp.encode_prompt([""] * B)
    out = torch.zeros(B, comp.resolution, comp.resolution, dtype=torch.bool)
    draws = [0] * B
    todo = list(range(B))
    sched = ddim(comp)
    while todo:
        sched.set_timesteps(steps)
        z = torch.stack([torch.randn(latent, generator=gens[i]) for i in todo]).to(comp.device, comp.unet.dtype)
        noises = [torch.stack([torch.randn(latent, generator=gens[i]) for i in todo]) for _ in range(steps)]
        idx = torch.tensor(todo)
        z = sample(cfg_eps(comp.unet, cond[idx], uncond[idx], guidance), sched, z,
                   step_kwargs=lambda i: {"eta": eta, "variance_noise": noises[i].to(comp.device, comp.unet.dtype)},
                   progress=progress, desc="mask sampling")
        masks = binarize_generated_mask(comp.decode_latents(z).float(), threshold).cpu()
        bad = hugs_border(masks, border)
        left = []
        for j, i in enumerate(todo):
            draws[i] += 1
            if not bad[j]:
                out[i] = masks[j]
            elif draws[i] >= tries:
                raise MaskGenerationError(
                    f"{tries} masks in a row were empty or hugged the image border: the mask embedding does not "
                    f"produce usable masks. Fix: train the mask embeddings longer (method.masks.steps), or generate "
                    f"from the training masks (method.generate.masks=train).")
            else:
                left.append(i)
        todo = left
    return out, draws


class AARCallback:
    """The per-step callback of blended sampling (Eq. 1) with the chosen re-weighting.

    Before each denoiser call at timestep t: the weight map for the embedding's attention columns is computed
    (paper: Eq. 7 from the decoded x0_hat of the previous step and the normal image, on the attention maps; official:
    inverse latent distance with a dilated mask, on the pre-softmax logits), then the latent outside the (dilated,
    for the official AAR) mask is replaced by the forward-noised normal latent q(y_t | y_0) with fresh noise."""

    def __init__(self, comp: SDComponents, kind: str, edit: TokenReweight | None, z_y: torch.Tensor, y: torch.Tensor,
                 mask: torch.Tensor, q_noise: Callable[[int], torch.Tensor], num_steps: int,
                 clamp: Sequence[float] = (1.0, 1.5)):
        self.comp, self.kind, self.edit = comp, kind, edit
        self.z_y, self.y, self.mask = z_y, y, mask
        self.m_lat = latent_mask(mask, comp.latent_size).to(z_y.dtype)
        self.q_noise, self.num_steps, self.clamp = q_noise, num_steps, tuple(clamp)
        self.blended: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []   # tests: (z, z_y_t, m) per step
        self.record = False

    def __call__(self, step) -> torch.Tensor:
        t = int(step.t)
        m = self.m_lat
        if self.kind == "official":
            w, m = aar_weights_official(step.latents, self.z_y, self.m_lat, t, self.num_steps, *self.clamp)
            self.edit.weight = w
        elif self.kind == "paper":
            if step.prev_x0 is None:
                self.edit.weight = 1.0
            else:
                x0_hat = self.comp.decode_latents(step.prev_x0) * 2 - 1
                self.edit.weight = aar_weights_paper(x0_hat.float(), self.y * 2 - 1, self.mask)
        z_y_t = noise_to(self.comp.scheduler, self.z_y, t, self.q_noise(step.index).to(self.z_y))
        z = blend(step.latents, z_y_t, m.to(step.latents.dtype))
        if self.record:
            self.blended.append((z.detach().clone(), z_y_t.detach().clone(), m.detach().clone()))
        return z


@torch.no_grad()
def blended_generate(comp: SDComponents, cond: torch.Tensor, uncond: torch.Tensor | None, normals: torch.Tensor,
                     masks: torch.Tensor, gens: Sequence[torch.Generator], steps: int, eta: float = 1.0,
                     guidance: float = 1.0, aar: str = "none", columns: Sequence[int] = (),
                     clamp: Sequence[float] = (1.0, 1.5), official_start_column: bool = True,
                     progress: bool = False, record: bool = False) -> tuple[torch.Tensor, AARCallback]:
    """Eq. 1 on a batch: start from noise (official ``x_T = randn``), DDIM with ``eta`` (official 1) over ``steps``
    (official 200), the latent blended with the forward-noised normal latent before every step (fresh noise each
    step), no final paste; CFG with ``guidance`` > 1 (official: none). AAR ``paper`` / ``official`` / ``none``
    (the official variant only without CFG, as the official sampler). ``normals``: (B, 3, S, S) in [0, 1];
    ``masks``: (B, 1, S, S) binary. Returns images (B, 3, S, S) in [0, 1] and the callback (its record)."""
    if aar not in AAR_KINDS:
        raise ValueError(f"method.generate.aar must be one of {AAR_KINDS}, got '{aar}'.")
    if aar == "official" and guidance != 1.0:
        warnings.warn("The official AAR is applied only without classifier-free guidance (its sampler passes the "
                      "weights only there); with guidance != 1 it is off, as in the official code.")
        aar = "none"
    dev, dtype = comp.device, comp.unet.dtype
    latent = (comp.unet.config.in_channels, comp.latent_size, comp.latent_size)
    sched = ddim(comp)
    sched.set_timesteps(steps)
    z_y = comp.encode_images(normals.to(dev)).to(dtype)
    z_T = torch.stack([torch.randn(latent, generator=g) for g in gens]).to(dev, dtype)
    q, v = [], []
    for _ in range(steps):   # per item and step: the blend's forward noise, the DDIM step's variance noise
        q.append(torch.stack([torch.randn(latent, generator=g) for g in gens]))
        v.append(torch.stack([torch.randn(latent, generator=g) for g in gens]))
    cols = list(columns) + ([0] if aar == "official" and official_start_column else [])
    edit = TokenReweight(cols, 1.0, on="logits" if aar == "official" else "probs") if aar != "none" else None
    cb = AARCallback(comp, aar, edit, z_y, normals.to(dev), masks.to(dev).float(), lambda i: q[i], steps, clamp)
    cb.record = record
    eps_fn = cfg_eps(comp.unet, cond.to(dtype), None if uncond is None else uncond.to(dtype), guidance)
    kwargs = lambda i: {"eta": eta, "variance_noise": v[i].to(dev, dtype)}  # noqa: E731
    if edit is None:
        z = sample(eps_fn, sched, z_T, callback=cb, step_kwargs=kwargs, progress=progress, desc="AnomalyDiffusion")
    else:
        with attention_control(comp.unet, cross_attention_layers(comp.unet), edit=edit):
            z = sample(eps_fn, sched, z_T, callback=cb, step_kwargs=kwargs, progress=progress,
                       desc="AnomalyDiffusion")
    return comp.decode_latents(z).float(), cb


def generation_config(cfg: DictConfig) -> dict:
    g = cfg.method.generate
    return {"method": "anomalydiffusion", "product": str(cfg.product), "seed": int(cfg.seed),
            "generate": OmegaConf.to_container(g, resolve=True), "prompt": OmegaConf.to_container(cfg.method.prompt),
            "steps_cap": (cfg.get("limits") or {}).get("num_inference_steps"),
            "checkpoint": run_identity(cfg.checkpoint) if cfg.get("checkpoint") else None}


def generate(cfg: DictConfig, checkpoint: Path | None, out_dir: Path) -> Path:
    """N image-mask pairs per anomaly type of ``cfg.product``: a mask (sampled from the type's mask embedding, or
    one of its training masks augmented) and a random real normal training image, blended (Eq. 1) with the spatial
    anomaly embedding of the type and the mask as the condition; written through :class:`core.export.GeneratedWriter`
    (resumable)."""
    if checkpoint is None:
        raise FileNotFoundError("AnomalyDiffusion generates from trained embeddings: pass checkpoint=<the run "
                                "directory of scripts/train.py method=anomalydiffusion ...>.")
    g = cfg.method.generate
    aar = str(g.aar)
    if aar not in AAR_KINDS:
        raise ValueError(f"method.generate.aar must be one of {AAR_KINDS}, got '{aar}'.")
    mask_source = str(g.masks)
    if mask_source not in ("generated", "train", "dir", "folder"):
        raise ValueError(f"method.generate.masks must be 'generated' (the mask embeddings), 'train' (the type's "
                         f"training masks, augmented), 'dir' (given masks, method.generate.mask_dir) or 'folder' "
                         f"(item by item from an earlier generated folder, method.generate.mask_folder), got "
                         f"'{mask_source}'.")
    shard = current_shard(resolve_device(str(cfg.device)))
    device = shard.device
    dtype = inference_dtype(str(g.get("dtype", "fp32")), device)
    comp = load_model(cfg.model).to(device)
    freeze(comp)
    run = load_trained(Path(checkpoint), comp)
    product = str(cfg.product)
    keys = [k for k in run.meta["keys"] if k.split("/", 1)[0] == product]
    if not keys:
        raise ValueError(f"The run {checkpoint} was trained on {run.meta['products']}, not on '{product}'. Fix: "
                         f"product=<one of those>, or train a run on {product}.")
    if mask_source == "generated":
        missing = [k for k in keys if k not in run.mask_embeddings]
        if missing:
            raise FileNotFoundError(f"{checkpoint} has no mask embedding for {missing}. Fix: rerun scripts/train.py "
                                    f"with hydra.run.dir={checkpoint} (it trains only the missing stage), or "
                                    f"method.generate.masks=train.")
    given_masks = given_mask_files(g.get("mask_dir"), [k.split("/", 1)[1] for k in keys]) \
        if mask_source == "dir" else {}
    if dtype != torch.float32:
        comp.to(dtype=dtype)
        run.emb.to(dtype=dtype), run.enc.to(dtype=dtype)
    limits = cfg.get("limits") or {}
    n = positive_int(g.n_per_type if cfg.get("n_per_type") is None else cfg.n_per_type, "n_per_type", 100_000)
    n = min(n, int(limits["n_per_type"])) if limits.get("n_per_type") else n
    cap = limits.get("num_inference_steps")
    steps = min(int(g.num_inference_steps), int(cap)) if cap else int(g.num_inference_steps)
    mask_steps = min(int(g.mask_steps), int(cap)) if cap else int(g.mask_steps)
    sources = run.meta["train_normals"][product]
    n_vec = run.emb.k + int(run.meta["model"]["spatial_tokens"])
    prompt = prompt_for(comp, OmegaConf.create(run.meta["prompt"]), n_vec, product)
    mprompt = EmbeddingPrompt(comp.tokenizer, str(run.meta["mask_prompt"]["template"]),
                              int(run.meta["mask_prompt"]["tokens"]), str(run.meta["prompt"]["placeholder"]))
    folder_masks = item_masks(g.get("mask_folder"), product, [(k.split("/", 1)[1], i) for k in keys
                                                              for i in range(n)], "method.generate.mask_folder") \
        if mask_source == "folder" else {}
    train_masks: dict[str, torch.Tensor] = {}   # method.generate.masks=train: each key's masks, loaded when needed
    open_writer = lambda: GeneratedWriter(out_dir, product, "anomalydiffusion", generation_config(cfg),  # noqa
                                          str(checkpoint), int(cfg.seed), shard.index, shard.count)
    writer = open_writer() if shard.is_main else None
    shard.barrier()
    writer = writer or open_writer()
    try:
        items = [(k.split("/", 1)[1], i) for k in keys for i in range(n)]
        bs = int(g.batch_size)
        batches = [items[i:i + bs] for i in range(0, len(items), bs)]
        batches = [b for b in shard.take(batches) if not all(writer.is_done(*it) for it in b)]
        todo = sum(1 for b in batches for it in b if not writer.is_done(*it))
        src_cache: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            uncond1 = comp.encode_prompt([""]) if float(g.guidance) != 1.0 else None
        for b in tqdm(batches, desc=f"AnomalyDiffusion generation ({product}, {todo} images)"):
            # a batch holds one type at a time only if bs divides n; mixed types are fine (one condition per item)
            gens = [item_generator(int(cfg.seed), key_of(product, ty), i) for ty, i in b]
            src_idx = [int(torch.randint(len(sources), (1,), generator=gen)) for gen in gens]
            masks: list[torch.Tensor | None] = [None] * len(b)
            if mask_source == "train":
                aug = cfg.method.train.augment
                for r, ((ty, i), gen) in enumerate(zip(b, gens)):
                    key = key_of(product, ty)
                    if key not in train_masks:
                        train_masks[key] = torch.stack([load_pair(s, comp.resolution)[1]
                                                        for s in _samples_of(cfg, run.meta, key)])
                    bank = train_masks[key]
                    j = int(torch.randint(bank.shape[0], (1,), generator=gen))
                    masks[r] = augment_pair(bank[j], bank[j], gen, True, float(aug.rotate), float(aug.crop_min))[1]
            elif mask_source in ("dir", "folder"):
                for r, ((ty, i), gen) in enumerate(zip(b, gens)):
                    if mask_source == "folder":
                        path = folder_masks[(ty, i)]
                    else:
                        files = given_masks[ty]
                        path = files[int(torch.randint(len(files), (1,), generator=gen))]
                    m = torch.from_numpy(read_mask([path]).astype(np.float32))[None, None]
                    masks[r] = (F.interpolate(m, size=(comp.resolution,) * 2, mode="nearest")[0] > 0.5).float()
            else:
                for key in sorted({key_of(product, ty) for ty, _ in b}):
                    rows = [r for r, (ty, _) in enumerate(b) if key_of(product, ty) == key]
                    mgens = [item_generator(int(cfg.seed), key, b[r][1], "mask") for r in rows]
                    got, _ = sample_masks(comp, mprompt, run.mask_embeddings[key], mgens, mask_steps,
                                          float(g.mask_eta), float(g.mask_guidance), float(g.mask_threshold),
                                          float(g.mask_border), int(g.mask_tries))
                    for r, m in zip(rows, got):
                        masks[r] = m.float()[None]
            mask_t = torch.stack(masks).float()
            for j in src_idx:
                if j not in src_cache:
                    x = read_image(sources[j])
                    src_cache[j] = F.interpolate(to_tensor(x)[None], size=(comp.resolution, comp.resolution),
                                                 mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
            normals = torch.stack([src_cache[j] for j in src_idx])
            with torch.no_grad():
                cond = condition(comp, prompt, run.emb, run.enc, [key_of(product, ty) for ty, _ in b],
                                 mask_t.to(device, comp.unet.dtype))
                uncond = None if uncond1 is None else uncond1.expand(len(b), -1, -1)
            images, _ = blended_generate(comp, cond, uncond, normals, mask_t, gens, steps, float(g.eta),
                                         float(g.guidance), aar, prompt.columns(), tuple(g.aar_clamp),
                                         bool(g.official_start_column))
            images = to_uint8(images)
            for k, (ty, i) in enumerate(b):
                if writer.is_done(ty, i):
                    continue
                m = mask_t[k, 0].numpy() > 0.5
                writer.write_anomaly(ty, i, images[k], m, source=sources[src_idx[k]], masks=mask_source, aar=aar,
                                     mask_fraction=round(float(m.mean()), 5))
        shard.barrier()
        if shard.is_main:
            writer.finish()
    finally:
        writer.close()
    return Path(out_dir)


def _samples_of(cfg: DictConfig, meta: dict, key: str) -> list[Sample]:
    """The training anomalies of ``key`` the run recorded (their masks are read from the dataset again)."""
    product = key.split("/", 1)[0]
    by_key = training_anomalies(cfg, [product])
    samples = by_key.get(key, [])
    recorded = meta["train_anomalies"].get(key, [])
    if [str(Path(s.path).resolve()) for s in samples] != recorded:
        raise ValueError(f"method.generate.masks=train reads the run's training masks of {key}, but this config's "
                         f"dataset and split give other images than the {len(recorded)} the run recorded. Fix: "
                         f"generate with the run's dataset and split, or method.generate.masks=generated.")
    return samples


__all__ = ["AARCallback", "PairBank", "augment_pair", "blended_generate", "condition", "embedding_batch", "generate",
           "item_generator", "load_trained", "sample_masks", "train", "train_embeddings", "train_mask_embeddings",
           "training_anomalies"]
