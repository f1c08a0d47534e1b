"""Background-aware defect generation, the training loop (Sec. 3.1, 3.3.1, A.1): one U-Net fine-tuned per defect
type with the disentanglement loss (Eq. 5) under masked cross-attention (Eq. 10-11). Generation (masked DDIM inversion,
Eq. 8-9, and the mask refinement, Eq. 13) is not written yet (issue 16); ``generate`` says so.

One run is one product and one fold of the two-fold protocol (``split.fold``: the generator of fold f must never
see fold f's test anomalies). Run directory::

    config.yaml                    the resolved Hydra config (core.runs)
    bgdefect.json                  product, fold, types, prompts, training images
    types/<type>/generator/        the type's fine-tuned U-Net as a slim checkpoint (core.models.slim)
    types/<type>/train_state.pt    only while that type trains: its resumable state
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from core.data import DatasetError, Sample, load_from_config, read_image, read_mask, require_masks, \
    screen_empty_masks, split_from_config
from core.data.torch_dataset import PairedTransform, to_tensor
from core.diffusion import attention_control, cross_attention_layers
from core.engine import Engine, EngineSpec, make_adamw
from core.io import read_run_json, write_json
from core.models import SDComponents, load_model
from core.models.slim import is_slim, save_slim, weights_hash
from core.runs import resolve_device

from .model import disentanglement_loss, masked_cross_attention, noised_pair, two_part_condition

STATE, META = "train_state.pt", "bgdefect.json"


# ------------------------------------------------------------------------------------------------------- data
def training_anomalies(cfg: DictConfig, product: str) -> dict[str, list[Sample]]:
    """The fold's training anomalies of ``product`` per type (sorted by path). Every type the product has must have
    some in this fold, and every one a mask."""
    split = split_from_config(load_from_config(cfg.dataset, [product]), cfg.split)
    fold = cfg.split.get("fold")
    anomalies = sorted((s for s in split.train if s.label == 1 and s.product == product), key=lambda s: s.path)
    require_masks(anomalies, product, "Background-aware generation masks the latent and the attention with them")
    anomalies = screen_empty_masks(anomalies, str(cfg.method.train.get("empty_masks", "error")),
                                   "method.train.empty_masks")
    by_type: dict[str, list[Sample]] = {}
    for s in anomalies:
        by_type.setdefault(s.anomaly_type, []).append(s)
    every = sorted({s.anomaly_type for s in split.train + split.test if s.label == 1 and s.product == product})
    missing = [t for t in every if t not in by_type]
    if missing:
        raise DatasetError(f"Fold {fold} of split '{cfg.split.name}' leaves type(s) {missing} of '{product}' without a "
                           f"training anomaly (a type with one image has none in fold 1). Fix: train the other fold "
                           f"(split.fold=...), or add examples of those types.")
    if not by_type:
        raise DatasetError(f"Product '{product}' has no training anomalies under split '{cfg.split.name}' in "
                           f"{cfg.dataset.root}.")
    return dict(sorted(by_type.items()))


def load_pairs(samples: Sequence[Sample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, S, S) images in [0, 1] and (n, 1, S, S) binary masks at the model's side."""
    resize = PairedTransform(size=size)
    imgs, masks = [], []
    for s in samples:
        x = read_image(s.path)
        imgs.append(resize.resize(to_tensor(x), False))
        m = torch.from_numpy(read_mask(s.mask_paths, x.shape[:2]).astype("float32"))[None]
        masks.append((resize.resize(m, True) > 0.5).float())
    return torch.stack(imgs), torch.stack(masks)


def prompts(cfg_prompt, product: str, anomaly_type: str) -> dict[str, str]:
    """The three prompt parts: ``defect`` (C_def), ``background`` (C_bg), ``mask`` (C_m). The paper does not say how
    they are built; here fixed templates with {product} and {defect} (the type's name, underscores as spaces)."""
    words = {"product": product.replace("_", " "), "defect": anomaly_type.replace("_", " ")}
    return {k: str(cfg_prompt[k]).format(**words) for k in ("defect", "background", "mask")}


def latent_region(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, H, W) binary -> (B, 1, size, size): area average >= 0.5, the rule the masked attention uses per layer."""
    return (F.interpolate(masks.float(), size=(size, size), mode="area") >= 0.5).float()


def step_batch(images: torch.Tensor, masks: torch.Tensor, seed: int, step: int, batch: int, flip: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``step``-th batch of one type: ``batch`` of its images (with their masks), a pure function of
    (seed, step) so that a resumed run sees the same batches; optional joint horizontal flips."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(images.shape[0], (batch,), generator=g)
    x, m = images[idx], masks[idx]
    if flip:
        f = torch.rand(batch, generator=g) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
        m = torch.where(f[:, None, None, None], m.flip(-1), m)
    return x, m


# ------------------------------------------------------------------------------------------------------ train
def train_type(cfg: DictConfig, out: Path, comp: SDComponents, images: torch.Tensor, masks: torch.Tensor,
               parts: dict[str, str], seed: int, on_step: Callable[[int], None] | None = None,
               engine: Engine | None = None) -> None:
    """Eq. 5 for one defect type: the U-Net (only it, DreamBooth-style) learns from the matching loss on z_t with
    C1 = [C_def, C_bg] and the regulariser on the masked latent z_t^m with C2 = [C_m, C_bg], both in one forward
    pass under the masked cross-attention of Eq. 10-11 with the image's mask; resumable from ``out/train_state.pt``;
    the result is a slim checkpoint in ``out/generator``."""
    tcfg = cfg.method.train
    engine = engine or Engine(EngineSpec.from_config(tcfg), comp.device)
    base_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    base_hash, base_table = weights_hash(comp), comp.text_encoder.get_input_embeddings().weight.detach().cpu().clone()
    comp.vae.requires_grad_(False), comp.text_encoder.requires_grad_(False)
    layers = cross_attention_layers(comp.unet)
    engine.prepare_unet(comp.unet, layers)
    comp.unet.requires_grad_(True)
    comp.unet.train()
    opt = make_adamw([{"params": list(comp.unet.parameters()), "lr": float(tcfg.lr)}], str(tcfg.optimizer),
                     float(tcfg.weight_decay))
    state = out / STATE
    start = engine.load(state, {"unet": comp.unet}, {"optimizer": opt}, "bgdefect training")[0] \
        if state.is_file() else 0
    cap = (cfg.get("limits") or {}).get("max_train_steps")
    steps = min(int(tcfg.steps_per_type), int(cap)) if cap else int(tcfg.steps_per_type)
    B, T = int(tcfg.batch), comp.scheduler.config.num_train_timesteps
    dev = comp.device
    with torch.no_grad():
        c1, L = two_part_condition(comp.encode_prompt, [parts["defect"]], [parts["background"]])
        c2, _ = two_part_condition(comp.encode_prompt, [parts["mask"]], [parts["background"]])
    ctx = torch.cat([c1.expand(B, -1, -1), c2.expand(B, -1, -1)])
    latent = (B, comp.unet.config.in_channels, comp.latent_size, comp.latent_size)
    abar = comp.scheduler.alphas_cumprod
    bar = tqdm(range(start, steps), desc=f"bgdefect ({out.name})", initial=start, total=steps,
               disable=not engine.is_main)
    for step in bar:
        x, mask = step_batch(images, masks, seed, step, B, bool(tcfg.flip))
        g = torch.Generator().manual_seed((seed + 7919) * 1_000_003 + step)
        t, eps = torch.randint(0, T, (B,), generator=g), torch.randn(latent, generator=g)
        opt.zero_grad(set_to_none=True)
        with engine.autocast():
            with torch.no_grad():
                z0 = comp.encode_images(x.to(dev))
            m = latent_region(mask, comp.latent_size).to(dev)
            z_t, z_t_m = noised_pair(abar[t].to(dev), z0, m, eps.to(dev))
            with attention_control(comp.unet, layers, edit=masked_cross_attention(mask[:, 0].to(dev), L)):
                pred = comp.unet(torch.cat([z_t, z_t_m]), torch.cat([t, t]).to(dev), encoder_hidden_states=ctx).sample
            e1, e2 = pred.chunk(2)
            loss = disentanglement_loss(eps.to(dev), e1, e2, m)
        engine.backward(loss, 1)
        engine.step(opt)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        done = step + 1
        if done % int(tcfg.checkpoint_every) == 0 and done < steps:
            engine.save(state, done, {"unet": comp.unet}, {"optimizer": opt})
        if on_step is not None:
            on_step(done)
    comp.unet.eval()
    if engine.is_main:
        save_slim(comp, out / "generator", base_cfg, base_hash, base_table, unet=str(tcfg.get("save_unet", "diff")),
                  config=OmegaConf.to_container(cfg, resolve=True))
        if state.exists():
            state.unlink()
    engine.barrier()


def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Fine-tune one U-Net per defect type of ``cfg.product`` on the fold's training anomalies (types already saved
    are skipped; the one in progress resumes)."""
    run_dir = Path(run_dir)
    product, seed = str(cfg.product), int(cfg.seed)
    by_type = training_anomalies(cfg, product)
    engine = Engine(EngineSpec.from_config(cfg.method.train), resolve_device(str(cfg.device)))
    meta = {"product": product, "fold": cfg.split.get("fold"), "split": cfg.split.name, "types": list(by_type),
            "prompts": {t: prompts(cfg.method.prompt, product, t) for t in by_type},
            "train_anomalies": {t: [str(Path(s.path).resolve()) for s in v] for t, v in by_type.items()}}
    path = run_dir / META
    if path.is_file():
        old = read_run_json(path, "the run's types and training images",
                            f"train into a new folder (hydra.run.dir=...); {run_dir} is not usable as it is.")
        if old.get("train_anomalies") != meta["train_anomalies"]:
            raise ValueError(f"{run_dir} was trained on other images than this config gives (another fold or "
                             f"dataset?). Fix: train into a new folder (hydra.run.dir=...).")
    elif engine.is_main:
        write_json(path, meta)
    for i, (t, samples) in enumerate(by_type.items()):
        out = run_dir / "types" / t
        if is_slim(out / "generator"):
            continue
        out.mkdir(parents=True, exist_ok=True)
        comp = load_model(cfg.model).to(engine.device)   # every type starts from the base model
        torch.manual_seed(seed)
        images, masks = load_pairs(samples, comp.resolution)
        train_type(cfg, out, comp, images, masks, meta["prompts"][t], seed + 101 * i, engine=engine)
        del comp
    return run_dir


def generate(cfg: DictConfig, checkpoint: Path | None, out_dir: Path) -> Path:
    from core.registry import MethodNotImplementedError
    raise MethodNotImplementedError("bgdefect's generation (masked DDIM inversion, Eq. 8-9, and the mask refinement, "
                                    "Eq. 13) is not implemented yet: it is the open part of its issue. Training works.")


__all__ = ["generate", "latent_region", "load_pairs", "prompts", "step_batch", "train", "train_type",
           "training_anomalies"]
