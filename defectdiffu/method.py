"""DefectDiffu's training and generation loops (defectdiffu/model.py holds the equations).

``train``: one :class:`DefectDiT` for every product of the run (``method.products``; the paper trains all of MVTec AD
in one model), on the ``half`` split (the first half of each type's anomalies by file name, with their masks) plus
normal images, each labelled (unified defect name, product). The backbone starts from a DiT where names and shapes
match (the toolkit's mini DiT, or ImageNet DiT-XL/2 from a local file), the VAE and noise schedule come from
``model=``, the text from a CLIP (``method.text_encoder.clip_path``; the world CLIP by default). Algorithm 1 drops
the conditions; the objective is Eq. 11. Resumable; the run keeps the model, its record and nothing else.

``generate``: for the run's product, N images per defect type (its own types, or ``method.generate.defects``: any
defect the model learned on other products, zero-shot, Eq. 12) by DDIM with double-free guidance (Eq. 4; the
official single-scale form as an option); the mask is the mask head's output averaged over the last steps, decoded
by the VAE and binarised with isodata; optionally normal images (w_d = 0). Output through ``GeneratedWriter``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from core.data import DatasetError, Sample, load_from_config, read_image, read_mask, require_masks, \
    split_from_config
from core.data.torch_dataset import PairedTransform, to_tensor
from core.diffusion import inference_scheduler, isodata_threshold
from core.engine import Engine, EngineSpec
from core.export import GeneratedWriter, to_uint8
from core.io import read_run_json, write_json
from core.models import SDComponents, load_model
from core.models.dit import DiT, load_matching
from core.models.slim import weights_hash
from core.runs import item_generator, positive_int, resolve_device, run_identity

from .model import (GOOD, DefectDiT, average_masks, defectdiffu_loss, double_free, drop_conditions, mask_grid, prompts,
                    single_scale, unified_defect)

META, MODEL_DIR, STATE = "defectdiffu.json", "model", "train_state.pt"
MINI_DIT_DIR = Path(__file__).resolve().parents[1] / "core" / "models" / "mini_dit"
GUIDANCE = ("double_free", "single_scale")


# ----------------------------------------------------------------------------------------------------- data
def run_products(cfg: DictConfig) -> list[str]:
    """``method.products`` (null: every product of the dataset): one model for all of them."""
    if cfg.method.get("products"):
        return [str(p) for p in cfg.method.products]
    return sorted({s.product for s in load_from_config(cfg.dataset)})


def training_items(cfg: DictConfig, products: Sequence[str]) -> list[tuple[Sample, str, str]]:
    """(sample, unified defect name or ``good``, product) for every training image: each product's training
    anomalies under ``cfg.split`` (``half``) with their masks, and its first ``method.train.normals_per_product``
    normal training images by file name (``match``: as many as its training anomalies; a product without any, such
    as one in ``method.train.exclude_defects_of``, the zero-shot setting of Sec. 3.6, as many as the product with
    the most). Unified names come from ``method.names`` (supp. Tab. 2); an empty table keeps the folder names."""
    table = OmegaConf.to_container(cfg.method.names, resolve=True) if cfg.method.get("names") else None
    excluded = {str(p) for p in (cfg.method.train.get("exclude_defects_of") or [])}
    unknown = sorted(excluded - set(products))
    if unknown:
        raise ValueError(f"method.train.exclude_defects_of names {unknown}, which are not trained products "
                         f"({', '.join(products)}).")
    split = split_from_config(load_from_config(cfg.dataset, list(products)), cfg.split)
    items: list[tuple[Sample, str, str]] = []
    anomalies_of = {p: [s for s in split.train if s.product == p and s.label == 1 and p not in excluded]
                    for p in products}
    most = max(len(v) for v in anomalies_of.values())
    for p in products:
        anomalies = anomalies_of[p]
        require_masks(anomalies, p, "DefectDiffu learns the mask head and the defect-region loss from them")
        normals = sorted((s for s in split.train if s.product == p and s.label == 0), key=lambda s: (s.name, s.path))
        n = cfg.method.train.normals_per_product
        n = (len(anomalies) or most) if str(n) == "match" else len(normals) if n is None else int(n)
        if not normals and n:
            raise DatasetError(f"Product '{p}' has no normal training images under split '{cfg.split.name}'.")
        items += [(s, unified_defect(table, p, s.anomaly_type) if table is not None else s.anomaly_type, p)
                  for s in anomalies]
        items += [(s, GOOD, p) for s in normals[:n]]
    if not any(d != GOOD for _, d, _ in items):
        raise DatasetError(f"No training anomaly in products {list(products)} under split '{cfg.split.name}': "
                           f"DefectDiffu learns defects from them.")
    return items


def load_items(items: Sequence[tuple[Sample, str, str]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, S, S) images in [0, 1] and (n, 1, S, S) binary masks (zeros for normal images)."""
    tf = PairedTransform(size=size)
    imgs, masks = [], []
    for s, d, _ in items:
        imgs.append(tf.resize(to_tensor(read_image(s.path)), False).clamp(0, 1))
        m = torch.from_numpy(read_mask(s.mask_paths).astype("float32"))[None] if d != GOOD else \
            torch.zeros(1, *imgs[-1].shape[-2:])
        masks.append((tf.resize(m, True) > 0.5).float())
    return torch.stack(imgs), torch.stack(masks)


# --------------------------------------------------------------------------------------------------- models
def noise_schedule(cfg: DictConfig, comp: SDComponents):
    """The training noise schedule: ``model``'s own, or DiT's linear one (``dit_linear``: betas 1e-4 .. 0.02, 1000
    steps, the schedule ImageNet DiT was trained with)."""
    from diffusers import DDPMScheduler
    kind = str(cfg.method.get("schedule", "model"))
    if kind == "model":
        return comp.scheduler
    if kind == "dit_linear":
        return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    raise ValueError(f"method.schedule must be model or dit_linear, got '{kind}'.")


def load_clip_text(cfg: DictConfig):
    from core.models.world_clip import load_clip
    return load_clip(cfg.method.text_encoder.get("clip_path"), key="method.text_encoder.clip_path")


@torch.no_grad()
def text_table(clip, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """L2-normalised CLIP text embedding of every distinct text (the empty text included), once."""
    uniq = sorted(set(texts))
    emb = clip.text_embeds(uniq).float().cpu()
    return dict(zip(uniq, emb))


def all_texts(defects: Sequence[str], products: Sequence[str], null_product: str) -> list[str]:
    out = []
    for d in (*defects, GOOD):
        for p in (*products, None):
            out += list(prompts(d, product_words(p), null_product).values())
    return out


def product_words(product: str | None) -> str | None:
    return None if product is None else product.replace("_", " ")


def build_model(cfg: DictConfig, comp: SDComponents, text_dim: int) -> tuple[DefectDiT, dict]:
    """DefectDiT on ``comp``'s latents, its backbone started from ``method.backbone`` (``dit``: a DiT's weights where
    names and shapes match, as the official code starts from ImageNet DiT; ``random``)."""
    b = cfg.method.backbone
    init = str(b.init)
    if init not in ("dit", "random"):
        raise ValueError(f"method.backbone.init must be dit or random, got '{init}'.")
    src: dict | None = None
    arch = dict(OmegaConf.to_container(b.architecture, resolve=True))
    if init == "dit":
        path = Path(b.path).expanduser() if b.get("path") else MINI_DIT_DIR
        if path.is_dir() and (path / "config.json").is_file():
            dit = DiT.load(path, key="method.backbone.path")
            arch = {k: dit.config[k] for k in ("patch_size", "hidden_size", "num_heads", "mlp_ratio", "learn_sigma")}
            src = dit.state_dict()
        else:
            from core.models import load_dit_state_dict
            if path == MINI_DIT_DIR:
                raise FileNotFoundError(f"The mini DiT prior is not at {path}: pretrain it with "
                                        f"`python scripts/pretrain_dit.py` (or set method.backbone.path to a DiT "
                                        f"directory or DiT-XL-2-256x256.pt, or method.backbone.init=random).")
            src = load_dit_state_dict(path, key="method.backbone.path")
    torch.manual_seed(int(cfg.seed))   # the new parts' initialisation: a pure function of the seed
    model = DefectDiT(groups=[int(g) for g in cfg.method.groups], text_dim=text_dim, input_size=comp.latent_size,
                      in_channels=int(comp.unet.config.in_channels), **arch)
    report = {"init": init}
    if src is not None:
        loaded, left = load_matching(model, src)
        report.update(loaded=len(loaded), new=len(left))
        if not any(k.startswith("blocks.") for k in loaded):
            raise ValueError(f"method.backbone.path={b.get('path')}: no block of that DiT matches this DefectDiT "
                             f"({arch}, latent {comp.latent_size}); is it the backbone of another size?")
    return model, report


# ---------------------------------------------------------------------------------------------------- train
def train(cfg: DictConfig, run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    products = run_products(cfg)
    items = training_items(cfg, products)                        # data errors before any model loads
    t = cfg.method.train
    engine = Engine(EngineSpec.from_config(t), resolve_device(str(cfg.device)))
    dev = engine.device
    comp = load_model(cfg.model).to(dev)
    comp.vae.requires_grad_(False), comp.unet.requires_grad_(False), comp.text_encoder.requires_grad_(False)
    clip = load_clip_text(cfg).to(dev)
    null_product = str(cfg.method.null_product)
    defects = sorted({d for _, d, _ in items if d != GOOD})
    texts = text_table(clip, all_texts(defects, products, null_product))
    text_dim = next(iter(texts.values())).shape[0]
    model, init_report = build_model(cfg, comp, text_dim)
    model.to(dev).train()
    meta = {"products": products, "defects": defects, "base_model": weights_hash(comp), "text_dim": text_dim,
            "items": [{"path": str(Path(s.path).resolve()), "defect": d, "product": p, "type": s.anomaly_type}
                      for s, d, p in items],
            "types": {p: sorted({s.anomaly_type for s, d, q in items if q == p and d != GOOD}) for p in products},
            "names": {p: {s.anomaly_type: d for s, d, q in items if q == p and d != GOOD} for p in products},
            "null_product": null_product, "init": init_report}
    if (run_dir / META).is_file():
        old = read_run_json(run_dir / META, "the run's record", "train into a new folder (hydra.run.dir=...).")
        if old.get("items") != meta["items"] or old.get("base_model") != meta["base_model"]:
            raise ValueError(f"{run_dir} was trained on other images or another base model than this config gives. "
                             f"Fix: train into a new folder (hydra.run.dir=...).")
    if (run_dir / MODEL_DIR / "config.json").is_file():
        return run_dir
    images, masks = load_items(items, comp.resolution)
    with torch.no_grad():
        z0 = torch.cat([comp.encode_images(images[i:i + 16].to(dev)) for i in range(0, len(images), 16)])
        mask_target = torch.cat([comp.encode_images(masks[i:i + 16].expand(-1, 3, -1, -1).to(dev))
                                 for i in range(0, len(masks), 16)])
    m_latent = mask_grid(masks, comp.latent_size).to(dev)
    m_grid = mask_grid(masks, comp.latent_size // model.patch_size).flatten(1).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=float(t.lr), weight_decay=float(t.weight_decay))
    state, start = run_dir / STATE, 0
    if state.is_file():
        start = engine.load(state, {"model": model}, {"opt": opt}, "DefectDiffu training")[0]
    elif engine.is_main:
        write_json(run_dir / META, meta)
    noise = noise_schedule(cfg, comp)
    T = noise.config.num_train_timesteps
    steps, batch, seed = positive_int(t.steps, "method.train.steps"), int(t.batch), int(cfg.seed)
    C = model.in_channels
    names = [(d, p) for _, d, p in items]
    bar = tqdm(range(start, steps), desc="DefectDiffu", initial=start, total=steps, disable=not engine.is_main)
    for step in bar:
        g = torch.Generator().manual_seed(seed * 1_000_033 + step)
        idx = torch.randint(len(items), (batch,), generator=g)
        ds, ps = drop_conditions([names[i][0] for i in idx], [product_words(names[i][1]) for i in idx],
                                 float(t.p1), float(t.p2), g)
        pr = [prompts(d, p, null_product) for d, p in zip(ds, ps)]
        y = {k: torch.stack([texts[x[k]] for x in pr]).to(dev) for k in ("product", "defect", "fusion")}
        eps = torch.randn(batch, *z0.shape[1:], generator=g).to(dev)
        tt = torch.randint(T, (batch,), generator=g).to(dev)
        i = idx.to(dev)
        zt = noise.add_noise(z0[i], eps, tt)
        with engine.autocast():
            out, mask_f, maps = model(zt, tt, y["product"], y["defect"], y["fusion"])
            losses = defectdiffu_loss(out[:, :C].float(), eps, m_latent[i], maps.float(), m_grid[i], mask_f.float(),
                                      mask_target[i], float(t.mask_weight), float(t.alpha),
                                      tuple(float(x) for x in t.ratio_clip), bool(t.detach_ratio))
        engine.backward(losses["loss"], 1)
        engine.step(opt)
        bar.set_postfix(loss=f"{losses['loss'].item():.4f}", R=f"{losses['ratio'].item():.2f}")
        if (step + 1) % int(t.checkpoint_every) == 0 or step + 1 == steps:
            engine.save(state, step + 1, {"model": model}, {"opt": opt})
        if t.get("stop_after") and step + 1 >= int(t.stop_after):
            return run_dir
    if engine.is_main:
        model.to("cpu").save(run_dir / MODEL_DIR)
        state.unlink(missing_ok=True)
    return run_dir


# ------------------------------------------------------------------------------------------------- generate
def load_run(run_dir: Path, comp: SDComponents) -> tuple[dict, DefectDiT]:
    fix = f"train it with scripts/train.py method=defectdiffu ... hydra.run.dir={run_dir} (a rerun resumes)."
    if not (run_dir / META).is_file() or not (run_dir / MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished DefectDiffu run ({META} and {MODEL_DIR}/). Fix: {fix}")
    meta = read_run_json(run_dir / META, "the run's record", fix)
    if meta.get("base_model") != weights_hash(comp):
        raise ValueError(f"{run_dir} was trained with another VAE / base model (weights hash {meta.get('base_model')})"
                         f" than the one loaded now. Fix: generate with the run's model= setting.")
    return meta, DefectDiT.load(run_dir / MODEL_DIR)


def guided_eps(model: DefectDiT, z: torch.Tensor, t: torch.Tensor, y: dict[str, torch.Tensor], rule: str,
               w_p: float, w_d: float, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One guided prediction for a batch z (B, ...): ``double_free`` (Eq. 4) runs the branches (c_g, 0), (c_g, c_p),
    (c_d, 0) in one call; ``single_scale`` (the official test script) (c_d, c_p) and (c_g, c_p). ``y``: the branch
    texts, each (branches * B, D) in that order. Returns (eps, the mask features of the defect branch)."""
    k = 3 if rule == "double_free" else 2
    C = model.in_channels
    out, mask_f, _ = model(z.repeat(k, 1, 1, 1), t.repeat(k), y["product"], y["defect"], y["fusion"])
    parts, masks = out[:, :C].chunk(k), mask_f.chunk(k)
    if rule == "double_free":
        return double_free(parts[0], parts[1], parts[2], w_p, w_d), masks[2]
    return single_scale(parts[0], parts[1], w), masks[0]


def branch_texts(rule: str, defect: str, product: str, null_product: str) -> list[dict[str, str]]:
    pw = product_words(product)
    if rule == "double_free":
        return [prompts(GOOD, None, null_product), prompts(GOOD, pw, null_product), prompts(defect, None, null_product)]
    return [prompts(defect, pw, null_product), prompts(GOOD, pw, null_product)]


def generate(cfg: DictConfig, checkpoint: Path | None, out_dir: Path) -> Path:
    if checkpoint is None:
        raise FileNotFoundError("DefectDiffu generates with a trained run: pass checkpoint=<the run directory of "
                                "scripts/train.py method=defectdiffu ...>.")
    g = cfg.method.generate
    rule = str(g.guidance)
    if rule not in GUIDANCE:
        raise ValueError(f"method.generate.guidance must be one of {', '.join(GUIDANCE)}, got '{rule}'.")
    dev = resolve_device(str(cfg.device))
    comp = load_model(cfg.model).to(dev)
    meta, model = load_run(Path(checkpoint), comp)
    model.to(dev).eval()
    product = str(cfg.product)
    if product not in meta["products"]:
        raise DatasetError(f"checkpoint={checkpoint} was trained on {meta['products']}, not '{product}'.")
    own = meta["types"].get(product, [])
    wanted = [str(d) for d in (g.get("defects") or [])]
    unknown = sorted(set(wanted) - set(meta["defects"]))
    if unknown:
        raise ValueError(f"method.generate.defects {unknown} were never learned by this run (it knows "
                         f"{', '.join(meta['defects'])}).")
    # (folder name, unified defect): the product's own types, or any learned defect zero-shot (Eq. 12)
    jobs = [(tp, meta["names"][product][tp]) for tp in own] if not wanted else [(d, d) for d in wanted]
    if not jobs and not int(g.n_normals):
        raise ValueError(f"'{product}' has no defect type in this run (trained with its defects excluded?): name the "
                         f"defects to transfer to it with method.generate.defects=[...] (zero-shot, Eq. 12).")
    null_product = meta["null_product"]
    clip = load_clip_text(cfg).to(dev)
    n = positive_int(g.n_per_type if cfg.get("n_per_type") is None else cfg.n_per_type, "n_per_type", 100_000)
    steps, last = int(g.num_inference_steps), int(g.mask_last_steps)
    sched = inference_scheduler(noise_schedule(cfg, comp).config, "ddim", str(g.timestep_spacing))
    sched.set_timesteps(steps)
    gen_cfg = {"method": "defectdiffu", "product": product, "seed": int(cfg.seed),
               "generate": OmegaConf.to_container(g, resolve=True), "checkpoint": run_identity(checkpoint)}
    writer = GeneratedWriter(out_dir, product, "defectdiffu", gen_cfg, str(checkpoint), int(cfg.seed))
    bs = int(g.batch_size)
    try:
        for folder, defect in jobs + ([(None, GOOD)] if int(g.n_normals) else []):
            count = n if folder is not None else int(g.n_normals)
            todo = [i for i in range(count) if not writer.is_done(folder, i)]
            if not todo:
                continue
            r = rule if folder is not None else "double_free"
            texts = branch_texts(r, defect, product, null_product)
            emb = text_table(clip, [v for x in texts for v in x.values()])
            w_p, w_d = float(g.w_p), (float(g.w_d) if folder is not None else 0.0)
            for b0 in tqdm(range(0, len(todo), bs), desc=f"DefectDiffu ({product}/{folder or 'good'})"):
                idx = todo[b0:b0 + bs]
                gens = [item_generator(int(cfg.seed), product, folder or GOOD, i) for i in idx]
                z = torch.stack([torch.randn(model.in_channels, comp.latent_size, comp.latent_size, generator=q)
                                 for q in gens]).to(dev)
                y = {k: torch.stack([emb[x[k]] for x in texts for _ in idx]).to(dev)
                     for k in ("product", "defect", "fusion")}
                recorded = []
                with torch.no_grad():
                    for j, tstep in enumerate(sched.timesteps):
                        tt = torch.full((len(idx),), int(tstep), device=dev)
                        eps, mf = guided_eps(model, z, tt, y, r, w_p, w_d, float(g.w))
                        if j >= steps - last:
                            recorded.append(mf.float())
                        z = sched.step(eps, tstep, z).prev_sample
                    images = comp.decode_latents(z).float().clamp(0, 1)
                    masks = binary_masks(comp, average_masks(recorded)) if folder is not None else None
                arr = to_uint8(images)
                for k, i in enumerate(idx):
                    if folder is None:
                        writer.write_normal(i, arr[k], guidance="double_free", w_p=w_p, w_d=0.0)
                    else:
                        writer.write_anomaly(folder, i, arr[k], masks[k], defect=defect, guidance=r,
                                             w_p=w_p, w_d=w_d, zero_shot=bool(wanted) and folder not in own,
                                             mask_fraction=round(float(masks[k].mean()), 5))
        writer.finish()
    finally:
        writer.close()
    return Path(out_dir)


@torch.no_grad()
def binary_masks(comp: SDComponents, mask_features: torch.Tensor) -> np.ndarray:
    """Sec. 3.4: the averaged mask features decoded by the VAE, to grey (0.299 R + 0.587 G + 0.114 B), binarised per
    image with the isodata threshold (the official code's iterative method). (B, H, W) bool."""
    rgb = comp.decode_latents(mask_features.to(comp.vae.dtype)).float()
    grey = (rgb * torch.tensor([0.299, 0.587, 0.114], device=rgb.device)[None, :, None, None]).sum(1)
    return (grey > isodata_threshold(grey)[:, None, None]).cpu().numpy()


__all__ = ["binary_masks", "branch_texts", "build_model", "generate", "guided_eps", "load_items", "load_run",
           "run_products", "train", "training_items"]
