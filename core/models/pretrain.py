"""Pretraining of the mini prior: SD-class models learned from scratch on a corpus drawn from the synthetic world.

Two stages, each resumable from its own checkpoint in ``work_dir``:
1. VAE (``AutoencoderKL``): L1 + MSE reconstruction and a small KL term on random crops (the VAE is fully
   convolutional, so crops cost a quarter of full images and cover the same statistics). Afterwards the latent
   scaling factor is set to 1 / std of the latents, as SD did for its VAE.
2. Text encoder + U-Net, jointly, with the epsilon-prediction loss of SD on the cached latents; captions drop to
   "" with probability ``caption_dropout`` so that classifier-free guidance works; EMA of the U-Net weights.

The corpus (v2, :func:`render_corpus`) stands in for SD's web data: normal images of all 13 products, photographed
more widely than the benchmark shows them (``core.data.synthetic.appearance``), and defect images of the
``PRETRAIN_PRODUCTS`` only, captioned with product and defect ("a photo of a screw with a crack"). No defect of a
benchmark product is ever rendered for it (:func:`check_corpus_products`; the manifest records every image). So,
like SD, the prior knows what a bottle looks like and has never seen a defective one. It is drawn from the world's
generator (streams "prior" and "web"), never from the on-disk benchmark tree.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.synthetic import (ALL_PRODUCTS, BENCHMARK_PRODUCTS, PRETRAIN_PRODUCTS, PRODUCTS, render, render_web,
                              sample_rng)
from ..data.synthetic.appearance import KEEP_BENCHMARK
from ..engine import Engine, EngineSpec
from ..io import write_json, write_text
from .loading import SDComponents, build_random, load_model

DEFECT_PHRASES: dict[str, str] = {
    "scratch": "a scratch", "crack": "a crack", "hole": "a hole", "stain": "a stain",
    "contamination": "contamination", "missing": "a missing part", "bent": "a bent part",
}
NORMAL_TEMPLATES = ("a photo of a {p}", "a photo of a good {p}", "a {p}", "a photo of a flawless {p}")
DEFECT_TEMPLATES = ("a photo of a {p} with {d}", "a {p} with {d}", "a photo of a {p} that is damaged",
                    "a photo of a damaged {p}", "a photo of a defective {p}")


def product_words(product: str) -> str:
    return product.replace("_", " ")


def caption(product: str, defect: str | None, rng: np.random.Generator) -> str:
    """One caption for an image of ``product`` (with ``defect`` or normal), template drawn from ``rng``."""
    p = product_words(product)
    if defect is None:
        return NORMAL_TEMPLATES[rng.integers(len(NORMAL_TEMPLATES))].format(p=p)
    return DEFECT_TEMPLATES[rng.integers(len(DEFECT_TEMPLATES))].format(p=p, d=DEFECT_PHRASES[defect])


@dataclass
class Pool:
    images: np.ndarray  # (N, H, W, 3) uint8
    products: list[str]
    defects: list[str | None]
    entries: list[dict] = field(default_factory=list)  # the manifest: one dict per image (see render_corpus)

    def summary(self) -> dict:
        """Image counts per product and state ("good" or the defect type): what the corpus holds, in brief."""
        counts: dict[str, dict[str, int]] = {}
        for p, d in zip(self.products, self.defects):
            counts.setdefault(p, {}).setdefault(d or "good", 0)
            counts[p][d or "good"] += 1
        return counts


APPEARANCES = ("web", "benchmark")


def check_corpus_products(normal_products, defect_products) -> None:
    """The corpus rule: normals of any product, defects of the pretraining products only."""
    unknown = [p for p in (*normal_products, *defect_products) if p not in PRODUCTS]
    if unknown:
        raise ValueError(f"Unknown product(s) {unknown} in the pretraining corpus. Available: {', '.join(PRODUCTS)}.")
    leaked = [p for p in defect_products if p in BENCHMARK_PRODUCTS]
    if leaked:
        raise ValueError(
            f"corpus.defect_products includes benchmark product(s) {leaked}: their defects are what the few-shot "
            f"methods must learn, so no defect image of them may enter the prior's corpus (as no MVTec defect is in "
            f"SD's). Use defect products from {', '.join(PRETRAIN_PRODUCTS)}.")


def render_corpus(normal_products, defect_products, normal_per_product: int, defect_per_product: int,
                  resolution: int, seed: int, appearance: str = "web", keep: float = KEEP_BENCHMARK,
                  desc: str = "render corpus") -> Pool:
    """The pretraining corpus, drawn from the world's generator (stream "prior"), never from the benchmark tree.

    For each product in world order: ``normal_per_product`` normal images if it is in ``normal_products``, then
    ``defect_per_product`` defective ones (defect types in turn) if it is in ``defect_products``, which may hold
    pretraining products only. ``appearance="web"`` photographs each sample with a wider look (pose, colour,
    background, light; ``core.data.synthetic.appearance``), ``"benchmark"`` with the benchmark's own (the v1 corpus).
    ``Pool.entries`` is the manifest: product, defect, stream, index and the appearance of every image.
    """
    check_corpus_products(normal_products, defect_products)
    if appearance not in APPEARANCES:
        raise ValueError(f"corpus.appearance must be one of {APPEARANCES}, got '{appearance}'.")
    jobs = []
    for p in ALL_PRODUCTS:
        if p in normal_products:
            jobs += [(p, None, i) for i in range(normal_per_product)]
        if p in defect_products:
            types = PRODUCTS[p].defects
            jobs += [(p, types[i % len(types)], i) for i in range(defect_per_product)]
    images, prods, defects, entries = [], [], [], []
    for p, d, i in tqdm(jobs, desc=desc, leave=False):
        if appearance == "web":
            r, app = render_web(p, seed, d or "good", i, resolution, keep)
        else:
            r, app = render(p, sample_rng(seed, p, "prior", d or "good", i), resolution, d), None
        images.append(r.image)
        prods.append(p)
        defects.append(d)
        entries.append({"product": p, "defect": d, "stream": "prior", "seed": seed, "index": i,
                        "appearance": None if app is None else dataclasses.asdict(app)})
    return Pool(np.stack(images), prods, defects, entries)


def render_pool(products: tuple[str, ...], normal_per_product: int, defect_per_product: int, resolution: int,
                seed: int, desc: str = "render pool") -> Pool:
    """Normal and defective renders of any ``products`` in the benchmark's look, for evaluation (not a corpus:
    the corpus rule is not applied, so nothing rendered here may be trained on)."""
    images, prods, defects = [], [], []
    for p in products:
        types = PRODUCTS[p].defects
        jobs = [(None, i) for i in range(normal_per_product)] + [(types[i % len(types)], i)
                                                                  for i in range(defect_per_product)]
        for d, i in tqdm(jobs, desc=desc, leave=False):
            images.append(render(p, sample_rng(seed, p, "prior", d or "good", i), resolution, d).image)
            prods.append(p)
            defects.append(d)
    return Pool(np.stack(images), prods, defects)


def corpus_from_config(cfg: dict, desc: str = "render corpus") -> Pool:
    c = cfg["corpus"]
    return render_corpus(tuple(c["normal_products"]), tuple(c["defect_products"]), int(c["normal_per_product"]),
                         int(c["defect_per_product"]), int(cfg["resolution"]), int(cfg["seed"]),
                         c.get("appearance", "web"), float(c.get("keep_benchmark", KEEP_BENCHMARK)), desc)


def write_manifest(pool: Pool, path: Path) -> str:
    """The full manifest as JSON lines (atomically); returns its sha256."""
    text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in pool.entries)
    write_text(path, text)
    return hashlib.sha256(text.encode()).hexdigest()


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Linear warm-up, then cosine decay from 1 to ``floor`` (a multiplier of the base learning rate)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


def _engine(cfg: dict, device: torch.device) -> Engine:
    """The stage's engine: its config node's engine keys, gradient clipping at 1.0 unless it says otherwise."""
    return Engine(EngineSpec.from_config({"grad_clip": 1.0, **cfg}), device)


def train_vae(comp: SDComponents, pool: Pool, cfg: dict, work_dir: Path, seed: int) -> dict:
    """Stage 1. Returns timing and the final losses; sets ``vae.config.scaling_factor``. Each step's batch (crops,
    flips, latent noise) is drawn whole from (seed, step); the processes of a multi-process launch share its items."""
    vae = comp.vae.train()
    engine = _engine(cfg, comp.device)
    dev = comp.device
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.get("warmup", 100), cfg["steps"]))
    ckpt, start = work_dir / "vae_state.pt", 0
    if ckpt.is_file():
        start = engine.load(ckpt, {"model": vae}, {"opt": opt, "sched": sched}, "the VAE stage")[0]
    images = _to_tensor(pool.images)
    crop, batch = int(cfg["crop"]), int(cfg["batch"])
    mine = engine.mine(batch, "images (vae.batch)")
    res = images.shape[-1]
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(start, cfg["steps"]), desc="VAE", initial=start, total=cfg["steps"], disable=not engine.is_main)
    for step in bar:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(images), (batch,), generator=g)
        ys = torch.randint(res - crop + 1, (batch,), generator=g)
        xs = torch.randint(res - crop + 1, (batch,), generator=g)
        x = torch.stack([images[i, :, y:y + crop, x_:x_ + crop] for i, y, x_ in zip(idx, ys, xs)]) * 2 - 1
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)[mine.start:mine.stop].to(dev)
        with engine.autocast():
            dist = vae.encode(x).latent_dist
            # the latent noise of the whole batch, from the step's CPU generator (what diffusers' sample(g) draws)
            noise = torch.randn((batch, *dist.mean.shape[1:]), generator=g)[mine.start:mine.stop]
            rec = vae.decode(dist.mean + dist.std * noise.to(dev, dist.mean.dtype)).sample
            rec_loss = F.l1_loss(rec.float(), x) + F.mse_loss(rec.float(), x)
            loss = rec_loss + cfg["kl_weight"] * dist.kl().mean()
        engine.backward(loss, engine.world)   # the mean over this process's items; the processes' sum / world
        engine.step(opt, sched)
        losses.append(engine.reduce_mean(rec_loss.item()))
        bar.set_postfix(rec=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % cfg["checkpoint_every"] == 0 or step + 1 == cfg["steps"]:
            engine.save(ckpt, step + 1, {"model": vae}, {"opt": opt, "sched": sched})
        if cfg.get("stop_after") and step + 1 >= cfg["stop_after"]:  # as if killed here (tests of resuming)
            break
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 64].to(dev) * 2 - 1).latent_dist.mean
                       for i in range(0, min(len(images), 512), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return {"seconds": time.perf_counter() - t0, "steps_run": cfg["steps"] - start,
            "final_rec_loss": float(np.mean(losses[-50:])) if losses else None,
            "scaling_factor": vae.config.scaling_factor}


@torch.no_grad()
def encode_pool(comp: SDComponents, pool: Pool, batch: int = 64) -> torch.Tensor:
    images = _to_tensor(pool.images)
    comp.vae.eval()
    return torch.cat([comp.encode_images(images[i:i + batch].to(comp.device)) for i in range(0, len(images), batch)])


def train_eps_model(model: torch.nn.Module, saved: dict[str, Any], param_groups: list[dict], predict, n_items: int,
                    latents: torch.Tensor, scheduler, cfg: dict, work_dir: Path, seed: int, device: torch.device,
                    ckpt_name: str, desc: str, prepare=None) -> dict:
    """The noise-prediction loop every prior stage shares: per step a batch of ``cfg["batch"]`` latents drawn from
    (seed, step), eps (+ offset noise), t, the loss ``MSE(predict(zt, t, idx, part, rng), eps)``; AdamW with warm-up
    + cosine; an EMA of ``model``'s weights that replaces them at the end; resumable from ``work_dir/ckpt_name``
    (``saved``: the modules checkpointed beside the EMA). ``predict`` gets the whole batch's indices, this process's
    ``part`` of it and the step's numpy generator (for captions or label dropout drawn over the whole batch)."""
    engine = _engine(cfg, device)
    if prepare is not None:
        prepare(engine)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups, weight_decay=cfg.get("weight_decay", 0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg["warmup"], cfg["steps"]))
    ckpt, start = work_dir / ckpt_name, 0
    if ckpt.is_file():
        start = engine.load(ckpt, {**saved, "ema": ema}, {"opt": opt, "sched": sched}, desc)[0]
    T = scheduler.config.num_train_timesteps
    batch, t0, losses = int(cfg["batch"]), time.perf_counter(), []
    mine = engine.mine(batch, "images (batch)")
    bar = tqdm(range(start, cfg["steps"]), desc=desc, initial=start, total=cfg["steps"], disable=not engine.is_main)
    for step in bar:
        # the whole batch from (seed, step), then this process's items of it
        g = torch.Generator().manual_seed(seed * 1_000_033 + step)
        rng = np.random.default_rng([seed, step])
        idx = torch.randint(n_items, (batch,), generator=g)
        z0 = latents[idx.to(latents.device)].to(device)
        eps = torch.randn(z0.shape, generator=g)   # all randomness from the CPU generator, on any device
        if cfg.get("offset_noise"):  # a constant per image and channel: the noise can hide the image's mean colour
            eps = eps + float(cfg["offset_noise"]) * torch.randn(*z0.shape[:2], 1, 1, generator=g)
        eps = eps.to(device)
        t = torch.randint(T, (batch,), generator=g).to(device)
        part = slice(mine.start, mine.stop)
        zt = scheduler.add_noise(z0[part], eps[part], t[part])
        with engine.autocast():
            loss = F.mse_loss(predict(zt, t[part], idx, part, rng).float(), eps[part])
        engine.backward(loss, engine.world)   # the mean over this process's items; the processes' sum / world
        engine.step(opt, sched)
        decay = min(cfg["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            cur = model.state_dict()
            floats = [k for k, v in cur.items() if v.dtype.is_floating_point]
            torch._foreach_lerp_([ema[k] for k in floats], [cur[k].detach() for k in floats], 1 - decay)
            for k, v in cur.items():
                if not v.dtype.is_floating_point:
                    ema[k].copy_(v)
        losses.append(engine.reduce_mean(loss.item()))
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (step + 1) % cfg["checkpoint_every"] == 0 or step + 1 == cfg["steps"]:
            engine.save(ckpt, step + 1, {**saved, "ema": ema}, {"opt": opt, "sched": sched})
        if cfg.get("stop_after") and step + 1 >= cfg["stop_after"]:
            break
    model.load_state_dict(ema)
    return {"seconds": time.perf_counter() - t0, "steps_run": cfg["steps"] - start,
            "final_loss": float(np.mean(losses[-100:])) if losses else None}


def train_denoiser(comp: SDComponents, pool: Pool, latents: torch.Tensor, cfg: dict, work_dir: Path,
                   seed: int) -> dict:
    """Stage 2: text encoder + U-Net with SD's noise-prediction loss; EMA weights end up in ``comp.unet``."""
    unet, text = comp.unet.train(), comp.text_encoder.train()
    params = [{"params": unet.parameters(), "lr": cfg["lr"]}, {"params": text.parameters(), "lr": cfg["text_lr"]}]

    def predict(zt, t, idx, part, rng):
        captions = ["" if rng.random() < cfg["caption_dropout"] else caption(pool.products[i], pool.defects[i], rng)
                    for i in idx.tolist()]
        return unet(zt, t, comp.encode_prompt(captions[part])).sample

    report = train_eps_model(unet, {"unet": unet, "text": text}, params, predict, len(latents), latents,
                             comp.scheduler, cfg, work_dir, seed, comp.device, "denoiser_state.pt", "U-Net + text",
                             prepare=lambda engine: engine.prepare_unet(unet))
    unet.eval(), text.eval()
    return report


@torch.no_grad()
def vae_reconstruction(comp: SDComponents, products: tuple[str, ...], n_per_product: int, resolution: int,
                       seed: int) -> dict[str, dict[str, float]]:
    """Per-product MSE and PSNR (images in [0, 1]) of encode -> decode on fresh renders (normal and defective)."""
    out = {}
    for p in products:
        pool = render_pool((p,), n_per_product - n_per_product // 2, n_per_product // 2, resolution, seed + 1,
                           desc=f"eval {p}")
        x = _to_tensor(pool.images)
        rec = comp.decode_latents(comp.encode_images(x.to(comp.device))).cpu()
        mse = float(((rec - x) ** 2).mean())
        out[p] = {"mse": mse, "psnr": float(10 * math.log10(1.0 / max(mse, 1e-12)))}
    return out


def pretrain(cfg: dict, out_dir: str | Path, work_dir: str | Path) -> dict:
    """Both stages, then ``comp.save(out_dir)`` with the config beside it. Returns the training report."""
    torch.manual_seed(cfg["seed"])
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    comp = build_random(cfg["architecture"], seed=cfg["seed"]).to(cfg.get("device") or "cpu")
    if comp.resolution != cfg["resolution"]:
        raise ValueError(f"Architecture '{cfg['architecture']}' is built for {comp.resolution} px, "
                         f"but resolution={cfg['resolution']}.")
    t0 = time.perf_counter()
    pool = corpus_from_config(cfg)
    manifest_sha = write_manifest(pool, work_dir / "corpus_manifest.jsonl")
    report: dict[str, Any] = {"pool_images": len(pool.images), "render_seconds": time.perf_counter() - t0}
    report["vae"] = train_vae(comp, pool, {**cfg["vae"], "checkpoint_every": cfg["checkpoint_every"]}, work_dir,
                              cfg["seed"])
    latents = encode_pool(comp, pool)
    report["denoiser"] = train_denoiser(comp, pool, latents, {**cfg["unet"], "checkpoint_every": cfg["checkpoint_every"]},
                                        work_dir, cfg["seed"])
    report["total_seconds"] = time.perf_counter() - t0
    comp.source = {"kind": "mini_prior", "version": cfg.get("version", 2), "architecture": cfg["architecture"],
                   "seed": cfg["seed"], "normal_products": list(cfg["corpus"]["normal_products"]),
                   "defect_products": list(cfg["corpus"]["defect_products"]),
                   "held_out": [p for p in BENCHMARK_PRODUCTS]}
    save_prior(comp.to("cpu"), out_dir, cfg, half=cfg.get("save_half", True))
    write_json(out_dir / "corpus.json", corpus_record(cfg, pool, manifest_sha))
    return report


def finetune(cfg: dict, out_dir: str | Path, work_dir: str | Path) -> dict:
    """Stage 3 (``finetune.steps`` > 0): the prior in ``out_dir`` as saved (float16 weights, loaded as float32)
    trains on for ``finetune.steps`` more U-Net + text-encoder steps with the ``finetune`` overrides of the ``unet``
    settings (offset noise, learning rates, warm-up, seed; a fresh optimiser and EMA), then replaces itself.
    Resumable from ``<work_dir>/finetune/``. Returns the stage's report (empty when there is no stage 3)."""
    ft = dict(cfg.get("finetune") or {})
    if not int(ft.get("steps") or 0):
        return {}
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    out_dir, work = Path(out_dir), Path(work_dir) / "finetune"
    work.mkdir(parents=True, exist_ok=True)
    comp = load_model({"kind": "mini", "path": str(out_dir)}).to(cfg.get("device") or "cpu")
    source = dict(comp.source)
    if source.get("finetune") and not (work / "denoiser_state.pt").is_file():
        raise ValueError(f"The prior in {out_dir} has already had stage 3 ({source['finetune']}) and {work} holds no "
                         f"stage-3 checkpoint to resume, so running it again would fine-tune twice. Start from the "
                         f"stage-2 prior (python scripts/pretrain_prior.py stage=train, then stage=finetune) or set "
                         f"finetune.steps=0.")
    t0 = time.perf_counter()
    pool = corpus_from_config(cfg)
    latents = encode_pool(comp, pool)
    seed = int(ft.pop("seed", cfg["seed"]))
    report = {"encode_seconds": time.perf_counter() - t0, "device": device_name(comp.device)}
    report["denoiser"] = train_denoiser(comp, pool, latents, {**cfg["unet"], **ft,
                                                             "checkpoint_every": cfg["checkpoint_every"]}, work, seed)
    comp.source = {**{k: v for k, v in source.items() if k not in ("path",)}, "finetune": {**ft, "seed": seed}}
    corpus = (out_dir / "corpus.json").read_bytes() if (out_dir / "corpus.json").is_file() else None
    save_prior(comp.to("cpu"), out_dir, cfg, half=cfg.get("save_half", True))
    if corpus is not None:   # the same corpus trained stage 3; the report and card describe the old weights and go
        (out_dir / "corpus.json").write_bytes(corpus)
    return report


def device_name(device: torch.device) -> str:
    """Where a stage ran, for its report and the model card: "cpu (N threads)" or "cuda (<GPU name>)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def corpus_record(cfg: dict, pool: Pool, manifest_sha: str) -> dict:
    """What the corpus held (counts per product and state) and the sha256 of its full manifest; shipped beside the
    model so that anyone can check which defects it has seen (``corpus_manifest.jsonl`` in the work dir is the
    manifest itself; rerendering from the config reproduces it)."""
    return {"config": cfg["corpus"], "seed": cfg["seed"], "resolution": cfg["resolution"], "images": len(pool.images),
            "counts": pool.summary(), "manifest_sha256": manifest_sha,
            "defect_products": sorted({p for p, d in zip(pool.products, pool.defects) if d is not None})}


def save_prior(comp: SDComponents, out_dir: Path, cfg: dict, half: bool) -> None:
    """Save in float16 (half the repository size; loading casts back to float32)."""
    if half:
        comp.unet.half(), comp.vae.half(), comp.text_encoder.half()
    comp.save(out_dir, cfg)
    comp.unet.float(), comp.vae.float(), comp.text_encoder.float()


__all__ = ["DEFECT_PHRASES", "Pool", "caption", "check_corpus_products", "corpus_from_config", "encode_pool", "finetune",
           "pretrain",
           "render_corpus", "render_pool", "train_denoiser", "train_eps_model", "train_vae", "vae_reconstruction",
           "write_manifest",
           "PRETRAIN_PRODUCTS", "BENCHMARK_PRODUCTS"]
