"""SeaS loops: ``train`` (Separation and Sharing fine-tuning, Sec. 3.2, then the RMP branch, Sec. 3.3) and
``generate`` (Sec. 3.4). Modules and losses live in ``seas/model.py``; options in ``configs/method/seas.yaml``.

Run directory written by ``train`` (``scripts/train.py``)::

    config.yaml          the resolved Hydra config (core.runs)
    generator/           fine-tuned U-Net + text encoder (with the UA tokens) + VAE, tokenizer, scheduler (diffusers)
    seas.json            the UA prompt (types, tokens), product, training images
    rmp.safetensors      the Refined Mask Prediction branch, rmp.json its constructor arguments
    train_state.pt       only while a stage runs: the resumable state, removed when the stage's result is saved
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from tqdm.auto import tqdm

from core.data import (DatasetError, Sample, load_from_config, read_image, read_mask, screen_empty_masks,
                       split_from_config)
from core.data.torch_dataset import PairedTransform, to_tensor
from core.diffusion import (AttentionStore, attention_control, capture_outputs, cfg_eps, img2img_start,
                            inference_scheduler, previous_latent, sample)
from core.engine import Engine, EngineSpec, inference_dtype, make_adamw
from core.export import GeneratedWriter, to_uint8
from core.io import atomic_write, load_weights, read_run_json, read_run_safetensors, write_json
from core.models import SDComponents, load_diffusers_dir, load_model
from core.models.slim import is_slim, load_slim, save_slim, weights_hash
from core.runs import item_generator as core_item_generator, positive_int, resolve_device, run_identity
from core.shard import current_shard

from .model import (RefinedMaskPrediction, SeaSLoss, UAPrompt, add_ua_tokens, anomaly_probability, da_layers, da_loss,
                    official_start_signal, rmp_loss, seas_loss, token_positions)

STATE = "train_state.pt"


# ------------------------------------------------------------------------------------------------------- data
@dataclass
class TrainingImages:
    """X_df (anomalies with masks, their types) and X_ob (normals) of one product, as tensors at the model's size."""

    anomalies: torch.Tensor      # (H, 3, S, S) in [0, 1]
    masks: torch.Tensor          # (H, 1, S, S) in [0, 1] (soft edges under the official preprocessing)
    types: list[str]             # type of each anomaly
    normals: torch.Tensor        # (P, 3, S, S)
    anomaly_paths: list[str]
    normal_paths: list[str]


def training_samples(cfg: DictConfig, product: str) -> tuple[list[Sample], list[Sample]]:
    """The split's training anomalies of ``product`` (one_third: first max(n/3, 1) per type by name) and its first
    ``n_normal`` training normals by file name (the paper's 60; the official code's min(#anomalies, 60) is a bug)."""
    split = split_from_config(load_from_config(cfg.dataset, [product]), cfg.split)
    anomalies = sorted((s for s in split.train if s.label == 1 and s.product == product), key=lambda s: s.path)
    normals = sorted((s for s in split.train if s.label == 0 and s.product == product), key=lambda s: s.path)
    normals = normals[:int(cfg.method.train.n_normal)]
    anomalies = screen_empty_masks(anomalies, str(cfg.method.train.get("empty_masks", "error")),
                                   "method.train.empty_masks")
    if not anomalies:
        raise DatasetError(f"Product '{product}' has no training anomalies under split '{cfg.split.name}' in "
                           f"{cfg.dataset.root}. SeaS needs a few masked anomaly images per type.")
    if not normals:
        raise DatasetError(f"Product '{product}' has no normal training images (train/good) in {cfg.dataset.root}.")
    return anomalies, normals


def resize_short_side_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> (C, size, size): the short side resized to ``size`` (bilinear with antialiasing, as
    PIL's), the long side to int(size * long / short), then a centre crop; rounded to 8 bits as a PIL image is."""
    h, w = x.shape[-2:]
    new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if new != (h, w):
        x = F.interpolate(x[None].float(), size=new, mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
    x = x[..., top:top + size, left:left + size]
    return (x.clamp(0, 1) * 255).round() / 255


def preprocess(image: np.ndarray, mask: np.ndarray | None, size: int, mode: str = "official"
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An (H, W, 3) uint8 image and its (H, W) mask -> tensors at ``size`` x ``size``.

    official: short side to ``size`` and a centre crop for image and mask alike, the mask resized bilinearly and
        kept soft (the DA loss reads the soft edge; the RMP targets keep only exact 1s);
    squash: both sides to ``size`` (the aspect ratio is lost), the mask nearest-neighbour and binary.
    """
    x = to_tensor(image)
    if mode == "official":
        m = None if mask is None else resize_short_side_crop(torch.from_numpy(mask)[None].float(), size)
        return resize_short_side_crop(x, size), m
    if mode != "squash":
        raise ValueError(f"method.train.preprocess must be 'official' or 'squash', got '{mode}'.")
    resize = PairedTransform(size=size)
    m = None if mask is None else (resize.resize(torch.from_numpy(mask)[None].float(), True) > 0.5).float()
    return resize.resize(x, False), m


def load_images(anomalies: Sequence[Sample], normals: Sequence[Sample], size: int,
                mode: str = "official") -> TrainingImages:
    imgs, masks = [], []
    for s in anomalies:
        x = read_image(s.path)
        img, m = preprocess(x, read_mask(s.mask_paths, x.shape[:2]), size, mode)
        imgs.append(img)
        masks.append(m)
    norm = [preprocess(read_image(s.path), None, size, mode)[0] for s in normals]
    return TrainingImages(torch.stack(imgs), torch.stack(masks), [s.anomaly_type for s in anomalies],
                          torch.stack(norm), [str(Path(s.path).resolve()) for s in anomalies],
                          [str(Path(s.path).resolve()) for s in normals])  # absolute: generate may run elsewhere


@dataclass
class Batch:
    images: torch.Tensor        # (Ba + Bn, 3, S, S): [anomalies; normals]
    masks: torch.Tensor         # (Ba, 1, S, S)
    types: list[str]            # (Ba,)
    n_anomaly: int


def mixed_batch(data: TrainingImages, seed: int, step: int, n_anomaly: int, n_normal: int, augment: bool) -> Batch:
    """Mixed training (Sec. 3.2): ``n_anomaly`` images of X_df and ``n_normal`` of X_ob, a pure function of
    (seed, step) so that a resumed run sees the same batches. Augmentation (A.3 / official): one random flip /
    90-degree rotation per pair, applied alike to an anomaly image, its mask and its paired normal image."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ia = torch.randint(len(data.types), (n_anomaly,), generator=g).tolist()
    io = torch.randint(data.normals.shape[0], (n_normal,), generator=g).tolist()
    tf = PairedTransform(hflip=augment, vflip=augment, rot90=augment)
    anoms, masks, norms = [], [], []
    for j in range(max(n_anomaly, n_normal)):
        p = tf.sample_params(g)
        if j < n_anomaly:
            anoms.append(tf.geometric(data.anomalies[ia[j]], p))
            masks.append(tf.geometric(data.masks[ia[j]], p))
        if j < n_normal:
            norms.append(tf.geometric(data.normals[io[j]], p))
    return Batch(torch.stack(anoms + norms), torch.stack(masks), [data.types[i] for i in ia], n_anomaly)


def batch_noise(seed: int, step: int, shape: tuple[int, ...], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps t ~ U{0..T-1} and noise eps ~ N(0, I) for a step (own stream, independent of the images)."""
    g = torch.Generator().manual_seed((seed + 7919) * 1_000_003 + step)
    return torch.randint(0, T, (shape[0],), generator=g), torch.randn(shape, generator=g)


# ------------------------------------------------------------------------------------------------ generator
def build_prompt(types: Sequence[str], comp: SDComponents, cfg_prompt: DictConfig | dict | None = None) -> UAPrompt:
    opts = dict(cfg_prompt or {})
    prompt = UAPrompt(tuple(types), **{k: v for k, v in opts.items() if v is not None})
    add_ua_tokens(prompt, comp.tokenizer, comp.text_encoder)
    return prompt


def make_optimizer(params: list[dict], kind: str, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW or 8-bit AdamW (``method.train.optimizer``); :func:`core.engine.make_adamw`."""
    return make_adamw(params, kind, weight_decay)


def total_steps(stage_cfg: DictConfig, n_types: int, limits: DictConfig | None) -> int:
    """800 x G optimizer updates (A.3), unless ``steps`` is set; ``limits.max_train_steps`` caps it."""
    steps = stage_cfg.get("steps") or int(stage_cfg.steps_per_type) * n_types
    cap = limits.get("max_train_steps") if limits is not None else None
    return int(min(steps, cap) if cap else steps)


def accumulate_gradients(loss_fn: Callable, items: Sequence, engine: Engine | None = None,
                         units: int | None = None) -> list:
    """Gradient accumulation: backward of loss_fn(item) / units for each item (``units``: the global batch's
    micro-batch count, default ``len(items)``), so the accumulated gradient, summed over processes, is that of the
    mean loss (what accelerate's ``accumulate`` + ``backward`` do in the official code). The forward passes run under
    ``engine``'s autocast. Returns the losses (a :class:`seas.model.SeaSLoss` counts by its ``total``)."""
    losses = []
    for item in items:
        with engine.autocast() if engine is not None else contextlib.nullcontext():
            loss = loss_fn(item)
        total = loss.total if isinstance(loss, SeaSLoss) else loss
        if engine is not None:
            engine.backward(total, units or len(items))
        else:
            (total / (units or len(items))).backward()
        losses.append(loss)
    return losses


class SeaSTrainer:
    """One optimizer update of Eq. 6 on a mixed batch; the pieces ``train_generator`` and the benchmark share."""

    def __init__(self, comp: SDComponents, prompt: UAPrompt, tcfg: DictConfig, engine: Engine | None = None):
        self.comp, self.prompt, self.cfg = comp, prompt, tcfg
        self.engine = engine or Engine(EngineSpec.from_config(tcfg), comp.device)
        self.layers = da_layers(comp.unet, comp.latent_size)
        self.engine.prepare_unet(comp.unet, [n for v in self.layers.values() for n in v])
        self.convention = str(tcfg.da_convention)
        self.store = AttentionStore(softmax="token" if self.convention == "paper" else "spatial", keep_grad=True)
        comp.vae.requires_grad_(False)
        comp.text_encoder.requires_grad_(False)
        self.table = comp.text_encoder.get_input_embeddings().weight
        self.table.requires_grad_(True)
        comp.unet.requires_grad_(True)
        comp.unet.train()
        new_ids = torch.tensor(sorted(prompt.ids.values()))
        self.row_mask = None
        if tcfg.embeddings == "new":  # paper: only the new rows learn; official ("table"): the whole table does
            self.row_mask = torch.zeros(self.table.shape[0], 1, dtype=self.table.dtype, device=self.table.device)
            self.row_mask[new_ids] = 1
            self.frozen_rows = self.table.detach().clone()
        elif tcfg.embeddings != "table":
            raise ValueError(f"method.train.embeddings must be 'table' or 'new', got '{tcfg.embeddings}'.")
        self.optimizer = make_optimizer(
            [{"params": list(comp.unet.parameters()), "lr": float(tcfg.lr_unet)},
             {"params": [self.table], "lr": float(tcfg.lr_embeddings)}],
            str(tcfg.optimizer), float(tcfg.weight_decay))

    def loss(self, batch: Batch, t: torch.Tensor, eps: torch.Tensor) -> SeaSLoss:
        comp, dev = self.comp, self.comp.device
        with torch.no_grad():
            z0 = comp.encode_images(batch.images.to(dev))
        z_t = comp.scheduler.add_noise(z0, eps.to(dev), t.to(dev))
        prompts = [self.prompt.anomaly_prompt(ty) for ty in batch.types] + \
                  [self.prompt.normal_prompt] * (batch.images.shape[0] - batch.n_anomaly)
        ids = comp.tokenize(prompts)
        e = comp.text_encoder(ids)[0]                                     # (B, L, D), grad reaches the table
        ob, df = token_positions(self.prompt, ids[:batch.n_anomaly].cpu(), batch.types)
        self.store.reset()
        with attention_control(comp.unet, [n for v in self.layers.values() for n in v], store=self.store):
            eps_pred = comp.unet(z_t, t.to(dev), encoder_hidden_states=e).sample
        da = da_loss(self.store, self.layers, batch.masks.to(dev), ob, df, comp.latent_size, self.convention,
                     str(self.cfg.da_normal_region), n=batch.n_anomaly,
                     normal_target=str(self.cfg.get("da_normal_target", "one_minus_m")))
        self.store.reset()
        return seas_loss(eps_pred, eps.to(dev), batch.n_anomaly, da, float(self.cfg.da_weight))

    def backward(self, batches: Sequence[tuple[Batch, torch.Tensor, torch.Tensor]], units: int | None = None
                 ) -> dict[str, float]:
        """Gradients of the mean of Eq. 6 over the global batch (gradient accumulation; ``batches`` are this
        process's micro-batches of ``units``); returns the mean terms over all processes."""
        terms = accumulate_gradients(lambda item: self.loss(*item), batches, self.engine, units)
        return {k: self.engine.reduce_mean(sum(float(getattr(t, a).detach()) for t in terms) / len(terms))
                for k, a in (("loss", "total"), ("sd", "sd"), ("na", "na"), ("da", "da"))}

    def step(self, batches: Sequence[tuple[Batch, torch.Tensor, torch.Tensor]], units: int | None = None
             ) -> dict[str, float]:
        """One optimizer update over the global batch (this process's ``batches`` of ``units`` micro-batches)."""
        self.optimizer.zero_grad(set_to_none=True)
        logs = self.backward(batches, units)
        if self.row_mask is not None and self.table.grad is not None:
            self.table.grad.mul_(self.row_mask)   # linear, so masking before the sum over processes is the same
        self.engine.step(self.optimizer)
        if self.row_mask is not None:  # AdamW's weight decay moves every row: put the frozen ones back
            with torch.no_grad():
                self.table.copy_(torch.where(self.row_mask.bool(), self.table, self.frozen_rows))
        return logs


@dataclass
class BaseModel:
    """What a slim generator records of the model it was fine-tuned from, taken before the UA tokens are added."""
    config: dict
    sha256: str
    table: torch.Tensor

    @classmethod
    def of(cls, comp: SDComponents, model_cfg) -> "BaseModel":
        cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
        return cls(cfg, weights_hash(comp), comp.text_encoder.get_input_embeddings().weight.detach().cpu().clone())


def train_generator(cfg: DictConfig, run_dir: Path, comp: SDComponents, data: TrainingImages,
                    prompt: UAPrompt, base: BaseModel, on_step: Callable[[int], None] | None = None,
                    engine: Engine | None = None) -> Path:
    """Separation and Sharing fine-tuning (Eq. 6) for 800 x G updates; resumable from ``run_dir/train_state.pt``.

    Each update: ``grad_accum`` mixed batches of ``batch_anomaly`` anomaly + ``batch_normal`` normal images (each
    batch in one forward pass), shared among the processes of a multi-process launch; the whole U-Net (lr 4e-6) and
    the token embeddings (lr 4e-5) learn; the checkpoint is written atomically every ``checkpoint_every`` updates.
    Returns the saved ``generator/`` directory: a slim checkpoint (the U-Net, or its difference to the base with
    ``save_unet=diff``, the changed embedding rows and the added tokens, against ``base``; :mod:`core.models.slim`).
    """
    tcfg, seed = cfg.method.train, int(cfg.seed)
    steps = total_steps(tcfg, len(prompt.types), cfg.get("limits"))
    engine = engine or Engine(EngineSpec.from_config(tcfg), comp.device)
    trainer = SeaSTrainer(comp, prompt, tcfg, engine)
    state_path = run_dir / STATE
    modules, optimizers = {"unet": comp.unet, "table": trainer.table}, {"optimizer": trainer.optimizer}
    start = engine.load(state_path, modules, optimizers, "SeaS fine-tuning")[0] if state_path.is_file() else 0
    T = comp.scheduler.config.num_train_timesteps
    accum, every = int(tcfg.grad_accum), int(tcfg.checkpoint_every)
    mine = engine.mine(accum, "mixed batches (method.train.grad_accum)")
    bar = tqdm(range(start, steps), desc=f"SeaS fine-tuning ({cfg.product})", initial=start, total=steps,
               disable=not engine.is_main)
    for step in bar:
        batches = []
        for a in mine:
            b = mixed_batch(data, seed, step * accum + a, int(tcfg.batch_anomaly), int(tcfg.batch_normal),
                            bool(tcfg.augment))
            latent = (b.images.shape[0], comp.unet.config.in_channels, comp.latent_size, comp.latent_size)
            t, eps = batch_noise(seed, step * accum + a, latent, T)
            batches.append((b, t, eps))
        logs = trainer.step(batches, accum)
        bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        done = step + 1
        if done % every == 0 and done < steps:
            engine.save(state_path, done, modules, optimizers)
        if on_step is not None:
            on_step(done)
    comp.unet.eval()
    out = run_dir / "generator"
    if engine.is_main:
        save_slim(comp, out, base.config, base.sha256, base.table, unet=str(tcfg.get("save_unet", "full")),
                  config=OmegaConf.to_container(cfg, resolve=True))
        if state_path.exists():
            state_path.unlink()
    engine.barrier()
    return out


# ------------------------------------------------------------------------------------------------------ RMP
def build_rmp(comp: SDComponents, rcfg: DictConfig | dict) -> tuple[RefinedMaskPrediction, dict]:
    kw = dict(coarse_channels=tuple(rcfg["coarse_channels"]), transformer_layers=int(rcfg["transformer_layers"]),
              heads=int(rcfg["heads"]), norm_groups=int(rcfg.get("norm_groups", 32)))
    return RefinedMaskPrediction.for_models(comp.unet.config, comp.vae.config, **kw), kw


def rmp_features(comp: SDComponents, rmp: RefinedMaskPrediction, z_t: torch.Tensor, t: torch.Tensor,
                 e: torch.Tensor, n_refine: int, prev_step: str = "ddpm", noise: torch.Tensor | None = None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """U-Net decoder features at (z_t, t) and VAE-decoder features of x_{t-1} for the first ``n_refine`` rows
    (A.5: "the VAE features come from decoding x_{t-1}"). x_{t-1} is one DDPM step (``prev_step='ddpm'``, a sample of
    the posterior with variance noise ``noise``, as the official ``DDPMScheduler.step``) or the deterministic DDIM
    step (``'ddim'``). Generator frozen, no grad. Returns U-Net features, VAE features and the decoded x_{t-1}."""
    names_u, names_v = rmp.feature_names(comp.unet, comp.vae)
    with torch.no_grad(), capture_outputs(comp.unet, names_u) as fu:
        eps = comp.unet(z_t, t, encoder_hidden_states=e).sample
    k = slice(0, n_refine)
    z_prev = previous_latent(comp.scheduler, z_t[k], eps[k], t[k], prev_step, None if noise is None else noise[k])
    with torch.no_grad(), capture_outputs(comp.vae, names_v) as fv:
        img = comp.decode_latents(z_prev)
    return [fu[n] for n in names_u], [fv[n] for n in names_v], img


def rmp_batch(data: TrainingImages, rcfg: DictConfig, seed: int, index: int, augment: bool, t_range: Sequence[int],
              latent_shape: tuple[int, ...]) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``index``-th mixed batch of the RMP stage with its timesteps, forward noise and x_{t-1} step noise: a pure
    function of (seed, index), so that a resumed run sees the same batches."""
    b = mixed_batch(data, seed + 1, index, int(rcfg.batch_anomaly), int(rcfg.batch_normal), augment)
    g = torch.Generator().manual_seed((seed + 104729) * 1_000_003 + index)
    n = b.images.shape[0]
    t = torch.randint(int(t_range[0]), int(t_range[1]), (n,), generator=g)
    return b, t, torch.randn((n, *latent_shape), generator=g), torch.randn((n, *latent_shape), generator=g)


def rmp_batch_loss(comp: SDComponents, rmp: RefinedMaskPrediction, batch: Batch, t: torch.Tensor, eps: torch.Tensor,
                   step_noise: torch.Tensor, e_cache: dict, rcfg: DictConfig) -> torch.Tensor:
    """Eq. 7 on one mixed batch: features at a noised z_t, VAE features of x_{t-1} for the anomaly rows, the branch's
    coarse and refined predictions (the normal rows refined by upsampling), focal loss against the masks / zeros."""
    dev = comp.device
    with torch.no_grad():
        z0 = comp.encode_images(batch.images.to(dev))
    t = t.to(dev)
    z_t = comp.scheduler.add_noise(z0, eps.to(dev), t)
    n = batch.images.shape[0]
    e = torch.cat([e_cache[ty] for ty in batch.types] + [e_cache[None]] * (n - batch.n_anomaly))
    fu, fv, _ = rmp_features(comp, rmp, z_t, t, e, batch.n_anomaly, str(rcfg.get("prev_step", "ddpm")),
                             step_noise.to(dev))
    coarse, refined = rmp(fu, fv, rest_size=tuple(fv[-1].shape[-2:]))
    return rmp_loss(coarse, refined, batch.masks.to(dev), float(rcfg.focal_gamma), str(rcfg.get("target", "official")),
                    bool(rcfg.get("target_normalize", False)))


def train_rmp(cfg: DictConfig, run_dir: Path, comp: SDComponents, data: TrainingImages, prompt: UAPrompt,
              on_step: Callable[[int], None] | None = None, engine: Engine | None = None) -> Path:
    """The RMP branch (Sec. 3.3) on the frozen fine-tuned generator: Eq. 7 with 2 anomaly + 2 normal images per
    mini-batch (normals: all-zero targets, upsampled coarse features), gradient accumulation ``grad_accum`` (official
    2, shared among processes), AdamW lr 5e-4, 800 x G updates; resumable."""
    rcfg, seed = cfg.method.rmp, int(cfg.seed)
    steps = total_steps(rcfg, len(prompt.types), cfg.get("limits"))
    engine = engine or Engine(EngineSpec.from_config(cfg.method.train), comp.device)
    comp.unet.eval(), comp.vae.eval(), comp.text_encoder.eval()
    for m in (comp.unet, comp.vae, comp.text_encoder):
        m.requires_grad_(False)
    torch.manual_seed(seed)
    rmp, kw = build_rmp(comp, rcfg)
    rmp.to(comp.device).train()
    opt = torch.optim.AdamW(rmp.parameters(), lr=float(rcfg.lr), weight_decay=float(cfg.method.train.weight_decay))
    state_path = run_dir / STATE
    start = engine.load(state_path, {"rmp": rmp}, {"optimizer": opt}, "RMP training")[0] if state_path.is_file() else 0
    accum = int(rcfg.get("grad_accum", 1))
    mine = engine.mine(accum, "mini-batches (method.rmp.grad_accum)")
    latent_shape = (comp.unet.config.in_channels, comp.latent_size, comp.latent_size)
    with torch.no_grad():
        e_cache = {ty: comp.encode_prompt([prompt.prompt(ty)]) for ty in (*prompt.types, None)}
    bar = tqdm(range(start, steps), desc=f"SeaS mask branch ({cfg.product})", initial=start, total=steps,
               disable=not engine.is_main)
    for step in bar:
        items = [rmp_batch(data, rcfg, seed, step * accum + a, bool(cfg.method.train.augment), rcfg.t_range,
                           latent_shape) for a in mine]
        opt.zero_grad(set_to_none=True)
        losses = accumulate_gradients(lambda it: rmp_batch_loss(comp, rmp, *it, e_cache, rcfg), items, engine, accum)
        engine.step(opt)
        engine.sync_buffers(rmp)   # BatchNorm running statistics of the whole global batch
        loss = engine.reduce_mean(sum(float(x.detach()) for x in losses) / len(losses))
        bar.set_postfix(loss=f"{loss:.4f}")
        done = step + 1
        if done % int(rcfg.checkpoint_every) == 0 and done < steps:
            engine.save(state_path, done, {"rmp": rmp}, {"optimizer": opt})
        if on_step is not None:
            on_step(done)
    rmp.eval()
    if engine.is_main:
        atomic_write(run_dir / "rmp.safetensors", lambda p: save_file({k: v.contiguous().cpu()
                                                                        for k, v in rmp.state_dict().items()}, str(p)))
        write_json(run_dir / "rmp.json", {**{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
                                          "steps": steps})
        if state_path.exists():
            state_path.unlink()
    engine.barrier()
    return run_dir / "rmp.safetensors"


# ---------------------------------------------------------------------------------------------------- train
def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Fit SeaS to ``cfg.product``: the generator (skipped when ``generator/`` exists), then the RMP branch (skipped
    when ``rmp.safetensors`` exists). ``method.train.stages`` may restrict it to [generator] or [rmp]."""
    run_dir = Path(run_dir)
    product = str(cfg.product)
    engine = Engine(EngineSpec.from_config(cfg.method.train), resolve_device(str(cfg.device)))
    device = engine.device
    torch.manual_seed(int(cfg.seed))
    anomalies, normals = training_samples(cfg, product)
    stages = list(cfg.method.train.get("stages") or ["generator", "rmp"])
    gen_dir = run_dir / "generator"
    if "generator" in stages and not generator_saved(gen_dir):
        comp = load_model(cfg.model).to(device)
        base = BaseModel.of(comp, cfg.model)
        data = load_images(anomalies, normals, comp.resolution, str(cfg.method.train.get("preprocess", "official")))
        prompt = build_prompt(sorted({s.anomaly_type for s in anomalies}), comp, cfg.method.get("prompt"))
        if engine.is_main:
            write_json(run_dir / "seas.json", {"product": product, "prompt": prompt.to_dict(),
                                               "train_anomalies": data.anomaly_paths,
                                               "train_normals": data.normal_paths, "resolution": comp.resolution})
        t0 = time.time()
        train_generator(cfg, run_dir, comp, data, prompt, base, engine=engine)
        if engine.is_main:
            _log_time(run_dir, "generator", time.time() - t0)
        del comp
    if "rmp" in stages and not (run_dir / "rmp.safetensors").is_file():
        comp, prompt = load_generator(run_dir, device, cfg.model)
        data = load_images(anomalies, normals, comp.resolution, str(cfg.method.train.get("preprocess", "official")))
        t0 = time.time()
        train_rmp(cfg, run_dir, comp, data, prompt, engine=engine)
        if engine.is_main:
            _log_time(run_dir, "rmp", time.time() - t0)
    return run_dir


def _log_time(run_dir: Path, stage: str, seconds: float) -> None:
    path = run_dir / "timings.json"
    try:   # a log, not a result: an unreadable one starts again
        times = json.loads(path.read_text()) if path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        times = {}
    times[stage] = round(seconds, 1)
    write_json(path, times)


def generator_saved(gen_dir: Path) -> bool:
    """A finished generator: slim (this version) or a full diffusers directory (runs of earlier versions)."""
    return is_slim(gen_dir) or (gen_dir / "model_index.json").is_file()


def _retrain_fix(run_dir: Path) -> str:
    return (f"restore the run directory from a copy, or train it again into a new folder (scripts/train.py method=seas "
            f"... hydra.run.dir=<new folder>); {run_dir} is not usable as it is.")


def load_generator(run_dir: Path, device: torch.device | str = "cpu", base_model=None
                   ) -> tuple[SDComponents, UAPrompt]:
    """The fine-tuned components and the UA prompt (ids from the tokenizer) of a training run. A slim generator is
    rebuilt on its base model: the recorded one, or ``base_model`` (a model config node, e.g. when the base moved);
    a base whose content hash differs is refused (:class:`core.models.slim.BaseModelMismatchError`)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "seas.json"
    if not generator_saved(run_dir / "generator") or not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no trained SeaS generator (expected generator/ and seas.json). "
                                f"Fix: run scripts/train.py method=seas ... hydra.run.dir={run_dir} to finish it.")
    meta = read_run_json(meta_path, "the SeaS run's prompt and training images", _retrain_fix(run_dir))
    if is_slim(run_dir / "generator"):
        comp = load_slim(run_dir / "generator", base_model)
    else:
        comp = load_diffusers_dir(run_dir / "generator", "SeaS generator", "checkpoint", "nothing (train it)",
                                  resolution=meta.get("resolution"))
    comp.to(device)
    p = meta["prompt"]
    prompt = UAPrompt(tuple(p.pop("types")), **p)
    vocab = comp.tokenizer.get_vocab()
    prompt.ids.update({t: vocab[t] for t in [prompt.normal_token, *prompt.all_anomaly_tokens]})
    return comp, prompt


def load_rmp(run_dir: Path, comp: SDComponents) -> RefinedMaskPrediction:
    path = Path(run_dir) / "rmp.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the mask branch was not trained. Fix: rerun scripts/train.py "
                                f"with hydra.run.dir={run_dir} (it trains only what is missing).")
    fix = (f"delete {path} and {Path(run_dir) / 'rmp.json'}, then rerun scripts/train.py with "
           f"hydra.run.dir={run_dir} (it retrains only the mask branch).")
    kw = read_run_json(Path(run_dir) / "rmp.json", "the mask branch's constructor arguments", fix)
    kw.pop("steps", None)
    if "mrm_channels" in kw:
        raise ValueError(f"{path} holds the mask branch of an earlier toolkit version (MRM widths "
                         f"{kw['mrm_channels']}); "
                         f"the branch is now built as the official code builds it. Fix: delete {path} and rerun "
                         f"scripts/train.py with hydra.run.dir={run_dir} (it retrains only the mask branch).")
    try:
        if not isinstance(kw, dict):
            raise TypeError(f"a JSON {type(kw).__name__}, not an object")
        rmp = RefinedMaskPrediction.for_models(comp.unet.config, comp.vae.config,
                                               **{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
    except TypeError as e:
        raise ValueError(f"{Path(run_dir) / 'rmp.json'} does not hold the mask branch's constructor arguments ({e}). "
                         f"Fix: {fix}") from None
    load_weights(rmp, read_run_safetensors(path, "the mask branch's weights", fix), path,
                 "this run's mask branch", fix)
    return rmp.to(comp.device).eval()  # eval: the official code leaves BatchNorm in training mode here (a bug)


# ------------------------------------------------------------------------------------------------- generate
def make_scheduler(comp: SDComponents, kind: str, timestep_spacing: str = "linspace"):
    """The inference sampler on the generator's training schedule: DPM-Solver++ (2nd order multistep, the official
    one) or DDIM. ``linspace`` spacing is what the official code gets from SD v1-4's scheduler file (25 steps: 999,
    959, ..., 40); it is set explicitly, so a generator reloaded from its saved DDPM config samples the same."""
    if kind not in ("dpmsolver++", "ddim"):
        raise ValueError(f"Unknown method.generate.sampler '{kind}'. Use dpmsolver++ or ddim.")
    return inference_scheduler(comp.scheduler.config, kind, timestep_spacing)


def start_signal(gcfg: DictConfig | dict) -> float:
    """Signal coefficient of the noised-normal start on the scaled latent: ``official`` = SD's 1500-step start
    (about 0.098, :func:`seas.model.official_start_signal`), or a number."""
    s = gcfg["start_signal"]
    return official_start_signal() if s == "official" else float(s)


@torch.no_grad()
def sample_with_masks(comp: SDComponents, scheduler, z_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                      guidance: float, num_steps: int, rmp: RefinedMaskPrediction | None = None,
                      mask_steps: int = 3, progress: bool = False, timesteps: torch.Tensor | None = None,
                      mask_latent: str = "input") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sec. 3.4: denoise ``z_T`` with CFG over the full ``num_steps`` schedule; with ``rmp``, the anomaly probability
    of each of the last ``mask_steps`` steps, averaged: the conditional-branch U-Net features of the step with the VAE
    features of the step's input latent x_t (``mask_latent='input'``, the official pipeline, which decodes before
    ``scheduler.step``) or of its output x_{t-1} (``'output'``). ``timesteps``: a tail of the schedule (an img2img
    start); default the full schedule. Returns images (B, 3, S, S) in [0, 1] and probabilities (B, S, S) or None."""
    if mask_latent not in ("input", "output"):
        raise ValueError(f"method.generate.mask_latent must be 'input' or 'output', got '{mask_latent}'.")
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    first_masked = len(timesteps) - mask_steps
    z_T = z_T.to(comp.unet.dtype)   # a noised start in float32 next to bf16 / fp16 weights (method.generate.dtype)
    cond, uncond = cond.to(comp.unet.dtype), uncond.to(comp.unet.dtype)
    names_u, names_v = (rmp.feature_names(comp.unet, comp.vae) if rmp is not None else ([], []))
    B = z_T.shape[0]
    eps_cfg = cfg_eps(comp.unet, cond, uncond, guidance)
    feats: list[list[torch.Tensor]] = []    # per masked step: U-Net features of the conditional branch
    inputs: list[torch.Tensor] = []         # per masked step: its input latent x_t
    masked = {"now": False}

    def eps_fn(z, t):
        if not masked["now"]:
            return eps_cfg(z, t)
        with capture_outputs(comp.unet, names_u) as found:
            eps = eps_cfg(z, t)
        feats.append([found[k][-B:] for k in names_u])  # the conditional half of [uncond; cond]
        return eps

    def callback(step):
        masked["now"] = rmp is not None and step.index >= first_masked
        if masked["now"]:
            inputs.append(step.latents)

    z = sample(eps_fn, scheduler, z_T, timesteps, callback=callback, progress=progress, desc="SeaS sampling")
    if rmp is None:
        return comp.decode_latents(z).float(), None
    outputs = inputs[1:] + [z]
    probs, images = [], None
    for f_u, z_in, z_out in zip(feats, inputs, outputs):
        z_read = z_in if mask_latent == "input" else z_out
        with capture_outputs(comp.vae, names_v) as fv:
            img = comp.decode_latents(z_read)
        if z_read is z:
            images = img
        probs.append(anomaly_probability(rmp(f_u, [fv[k] for k in names_v])[1]).float())
    if images is None:
        images = comp.decode_latents(z)
    return images.float(), torch.stack(probs).mean(0)


THRESHOLD_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))   # 0.05, 0.10, ..., 0.95


def choose_threshold(probs: torch.Tensor, masks: torch.Tensor, grid: Sequence[float] = THRESHOLD_GRID
                     ) -> tuple[float, dict[float, dict[str, float]]]:
    """The tau of ``grid`` with the highest mean per-image IoU between ``probs > tau`` and the binary ``masks``
    (both (N, S, S)); ties go to the smallest tau. Also returns, per tau, that IoU and the mean ratio of predicted to
    true mask area."""
    true = masks > 0.5
    area = true.flatten(1).sum(1).float().clamp_min(1)
    table = {}
    for tau in grid:
        pred = probs > tau
        inter = (pred & true).flatten(1).sum(1).float()
        union = (pred | true).flatten(1).sum(1).float().clamp_min(1)
        table[float(tau)] = {"iou": float((inter / union).mean()),
                             "area_ratio": float((pred.flatten(1).sum(1).float() / area).mean())}
    best = max(table, key=lambda tau: (round(table[tau]["iou"], 12), -tau))
    return best, table


def mask_threshold_setting(value) -> float | str:
    """``method.generate.mask_threshold``: a number in (0, 1) or ``auto``."""
    if str(value) == "auto":
        return "auto"
    try:
        if 0 < float(value) < 1:
            return float(value)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"method.generate.mask_threshold must be a number in (0, 1) or 'auto' (chosen on the product's "
                     f"training anomalies), got {value!r}.")


def calibrate_mask_threshold(cfg: DictConfig, checkpoint: Path, comp: SDComponents, rmp: RefinedMaskPrediction,
                             prompt: UAPrompt, scheduler) -> dict:
    """``method.generate.mask_threshold: auto``: tau chosen on the product's *training* anomalies, never a test
    image. Each training anomaly (X_df, as the run trained on it) is noised with the forward process onto the first
    of the last ``mask_steps`` steps of the generation schedule and denoised through them with its own anomaly prompt,
    its mask read exactly as a generated pair's is; the tau of :data:`THRESHOLD_GRID` with the highest mean IoU
    against the true masks is kept. The branch was fit on these images, so the IoU is optimistic; what matters is the
    tau it picks. Cached in ``<checkpoint>/mask_calibration.json`` (recomputed when the settings differ)."""
    g = cfg.method.generate
    steps, mask_steps = int(g.num_inference_steps), int(g.mask_steps)
    settings = {"steps": steps, "mask_steps": mask_steps, "guidance": float(g.guidance), "sampler": str(g.sampler),
                "timestep_spacing": str(g.get("timestep_spacing", "linspace")), "seed": int(cfg.seed),
                "mask_latent": str(g.get("mask_latent", "input")), "grid": list(THRESHOLD_GRID),
                "dtype": str(g.get("dtype", "fp32"))}
    path = Path(checkpoint) / "mask_calibration.json"
    if path.is_file():   # a cache of the calibration: an unreadable one is computed again and replaced
        try:
            saved = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            saved = {}
        if isinstance(saved, dict) and saved.get("settings") == settings:
            return saved
    anomalies, normals = training_samples(cfg, str(cfg.product))
    data = load_images(anomalies, normals[:1], comp.resolution, str(cfg.method.train.get("preprocess", "official")))
    trained_on = read_run_json(Path(checkpoint) / "seas.json", "the SeaS run's prompt and training images",
                               _retrain_fix(checkpoint))["train_anomalies"]
    if data.anomaly_paths != trained_on:
        raise ValueError(f"mask_threshold=auto calibrates on the run's training anomalies, but the dataset and split "
                         f"of this config give {len(data.anomaly_paths)} other images than the {len(trained_on)} "
                         f"listed in {Path(checkpoint) / 'seas.json'}. Fix: generate with the dataset and split the "
                         f"run was trained with, or set method.generate.mask_threshold to a number.")
    device = comp.device
    scheduler.set_timesteps(steps)
    tail = scheduler.timesteps[-mask_steps:]
    probs = []
    with torch.no_grad():
        uncond1 = comp.encode_prompt([str(g.negative_prompt)])
        for i, (x, ty) in enumerate(zip(data.anomalies, data.types)):
            z0 = comp.encode_images(x[None].to(device))
            noise = torch.randn(z0.shape[1:], generator=item_generator(int(cfg.seed), f"calibrate/{ty}", i))
            z_t = comp.scheduler.add_noise(z0, noise[None].to(device), tail[:1].to(device))
            _, p = sample_with_masks(comp, scheduler, z_t, comp.encode_prompt([prompt.prompt(ty)]), uncond1,
                                     float(g.guidance), steps, rmp, mask_steps, timesteps=tail,
                                     mask_latent=settings["mask_latent"])
            probs.append(p[0].cpu())
    tau, table = choose_threshold(torch.stack(probs), data.masks[:, 0] >= 1.0 - 1e-6)
    out = {"mask_threshold": tau, "settings": settings, "n_images": len(probs), "train_anomalies": data.anomaly_paths,
           "per_threshold": {str(k): v for k, v in table.items()},
           "rule": "highest mean IoU on the training anomalies (noised onto the mask-reading steps), ties: smallest"}
    write_json(path, out)
    return out


def source_index(rule: str, n_sources: int, index: int, gen: torch.Generator, batch: int = 10) -> int:
    """Which training normal (of X_ob, sorted by name) starts item ``index``: ``random`` (the paper: a random normal
    image of X_ob per item, drawn from the item's own generator) or ``first_batch`` (the official script: the first
    ``batch`` images, reused for every batch, so item i starts from image i mod batch)."""
    drawn = int(torch.randint(n_sources, (1,), generator=gen))  # always drawn: the start noise stream stays the same
    if rule == "random":
        return drawn
    if rule == "first_batch":
        return index % min(batch, n_sources)
    raise ValueError(f"method.generate.sources must be 'random' or 'first_batch', got '{rule}'.")


def item_generator(seed: int, anomaly_type: str | None, index: int) -> torch.Generator:
    """Per-item randomness (source normal image, start noise), :func:`core.runs.item_generator` of the item."""
    return core_item_generator(seed, anomaly_type or "good", index)


def generation_config(cfg: DictConfig) -> dict:
    g = cfg.method.generate
    return {"method": "seas", "product": str(cfg.product), "seed": int(cfg.seed),
            "generate": {k: g.get(k) for k in ("num_inference_steps", "sampler", "timestep_spacing", "guidance",
                                               "start_signal", "start_noise", "start_strength", "mask_steps",
                                               "mask_latent", "mask_threshold", "negative_prompt", "sources",
                                               "source_batch", "dtype")},
            "steps_cap": (cfg.get("limits") or {}).get("num_inference_steps"),
            "checkpoint": run_identity(cfg.checkpoint) if cfg.get("checkpoint") else None}


def generate(cfg: DictConfig, checkpoint: Path | None, out_dir: Path) -> Path:
    """N image-mask pairs per anomaly type and N normal images (prompt "a <ob>") for ``cfg.product``, each from a
    noised real normal training image, written through :class:`core.export.GeneratedWriter` (resumable)."""
    threshold = mask_threshold_setting(cfg.method.generate.get("mask_threshold", 0.2))  # before any work
    if checkpoint is None:
        raise FileNotFoundError("SeaS generates from a trained model: pass checkpoint=<the run directory of "
                                "scripts/train.py method=seas ...>.")
    g = cfg.method.generate
    shard = current_shard(resolve_device(str(cfg.device)))  # torchrun / accelerate launch: this process's share
    device = shard.device
    dtype = inference_dtype(str(g.get("dtype", "fp32")), device)
    comp, prompt = load_generator(checkpoint, device, cfg.model)
    comp.unet.eval(), comp.vae.eval(), comp.text_encoder.eval()
    rmp = load_rmp(checkpoint, comp)
    if dtype != torch.float32:   # official inference: fp16 weights (bf16 where fp16 is unavailable, e.g. a CPU)
        comp.to(dtype=dtype), rmp.to(dtype=dtype)
    meta = read_run_json(Path(checkpoint) / "seas.json", "the SeaS run's prompt and training images",
                         _retrain_fix(checkpoint))
    sources = meta["train_normals"]
    limits = cfg.get("limits") or {}
    n = positive_int(g.n_per_type if cfg.get("n_per_type") is None else cfg.n_per_type, "n_per_type", 100_000)
    n = min(n, int(limits["n_per_type"])) if limits.get("n_per_type") else n
    n_normals = n if g.get("n_normals") is None else int(g.n_normals)
    n_normals = min(n_normals, n) if limits.get("n_per_type") else n_normals
    steps = int(g.num_inference_steps)
    steps = min(steps, int(limits["num_inference_steps"])) if limits.get("num_inference_steps") else steps
    scheduler = make_scheduler(comp, str(g.sampler), str(g.get("timestep_spacing", "linspace")))
    signal, noise_scale = start_signal(g), float(g.start_noise)
    gen_config = generation_config(cfg)
    if str(threshold) == "auto":  # shard 0 calibrates and caches; the others read its cache
        if not shard.is_main:
            shard.barrier()
        calib = calibrate_mask_threshold(cfg, Path(checkpoint), comp, rmp, prompt, scheduler)
        if shard.is_main:
            shard.barrier()
        threshold = calib["mask_threshold"]
        gen_config["mask_threshold_chosen"] = threshold
        print(f"mask threshold chosen on the {calib['n_images']} training anomalies: tau = {threshold} "
              f"(IoU {calib['per_threshold'][str(threshold)]['iou']:.3f})")
    open_writer = lambda: GeneratedWriter(out_dir, str(cfg.product), "seas", gen_config, str(checkpoint),  # noqa
                                          int(cfg.seed), shard.index, shard.count)
    writer = open_writer() if shard.is_main else None  # shard 0 repairs the folder before the others open it
    shard.barrier()
    writer = writer or open_writer()
    try:
        items = [(ty, i) for ty in prompt.types for i in range(n)] + [(None, i) for i in range(n_normals)]
        bs = int(g.batch_size)
        # anomalies and normals are never mixed in a batch (only anomalies need the mask branch); the batches are cut
        # from the whole item list, so every shard count runs the same batches, and each shard takes every N-th
        batches = [group[i:i + bs] for group in ([it for it in items if it[0] is not None],
                                                 [it for it in items if it[0] is None])
                   for i in range(0, len(group), bs)]
        # a partly written batch runs whole again (only its missing items are written): a batch's numbers can depend on
        # its composition, so the same batches give the same bytes however the work was cut or resumed
        batches = [b for b in shard.take(batches) if not all(writer.is_done(*it) for it in b)]
        todo = [it for b in batches for it in b if not writer.is_done(*it)]
        sources_rule, source_batch = str(g.get("sources", "random")), int(g.get("source_batch", 10))
        preprocessing = str(cfg.method.train.get("preprocess", "official"))
        src_cache: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            uncond1 = comp.encode_prompt([str(g.negative_prompt)])
            cond_cache = {ty: comp.encode_prompt([prompt.prompt(ty)]) for ty in (*prompt.types, None)}
        latent_shape = (comp.unet.config.in_channels, comp.latent_size, comp.latent_size)
        for b in tqdm(batches, desc=f"SeaS generation ({cfg.product}, {len(todo)} images)"):
            src_idx, noises = [], []
            for ty, i in b:
                gen = item_generator(int(cfg.seed), ty, i)
                src_idx.append(source_index(sources_rule, len(sources), i, gen, source_batch))
                noises.append(torch.randn(latent_shape, generator=gen))
            for j in src_idx:
                if j not in src_cache:
                    src_cache[j] = preprocess(read_image(sources[j]), None, comp.resolution, preprocessing)[0]
            with torch.no_grad():
                z0 = comp.encode_images(torch.stack([src_cache[j] for j in src_idx]).to(device))
            noise = torch.stack(noises).to(device)
            timesteps = None
            if g.get("start_strength") is not None:  # img2img: noise to t = strength * T on the schedule, run the rest
                z_T, timesteps = img2img_start(scheduler, z0, steps, noise, strength=float(g.start_strength))
            else:  # the official start: signal * z_0 + noise, then the full schedule
                z_T = signal * z0 + noise_scale * noise
            cond = torch.cat([cond_cache[ty] for ty, _ in b])
            uncond = uncond1.expand(len(b), -1, -1)
            is_anomaly = b[0][0] is not None
            images, probs = sample_with_masks(comp, scheduler, z_T, cond, uncond, float(g.guidance), steps,
                                              rmp if is_anomaly else None, int(g.mask_steps), timesteps=timesteps,
                                              mask_latent=str(g.get("mask_latent", "input")))
            images = to_uint8(images)
            for k, (ty, i) in enumerate(b):
                if writer.is_done(ty, i):
                    continue
                source = {"source": sources[src_idx[k]]}
                if ty is None:
                    writer.write_normal(i, images[k], **source)
                else:
                    mask = (probs[k] > float(threshold)).cpu().numpy()
                    writer.write_anomaly(ty, i, images[k], mask, mask_fraction=round(float(mask.mean()), 5), **source)
        shard.barrier()
        if shard.is_main:
            writer.finish()
    finally:
        writer.close()  # the folder's write lock
    return Path(out_dir)


__all__ = ["THRESHOLD_GRID", "Batch", "SeaSTrainer", "calibrate_mask_threshold", "choose_threshold", "TrainingImages", "BaseModel", "build_prompt", "generator_saved", "build_rmp", "generate", "load_generator",
           "load_images", "load_rmp", "make_scheduler", "mixed_batch", "preprocess", "rmp_batch", "rmp_batch_loss",
           "rmp_features", "sample_with_masks", "source_index", "accumulate_gradients",
           "train", "train_generator", "train_rmp", "training_samples"]
