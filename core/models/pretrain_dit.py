"""The mini DiT prior: a small class-conditional DiT (:class:`core.models.dit.DiT`) pretrained on the mini prior's
corpus in the mini prior's VAE latent space, the product as the class; it plays ImageNet DiT-XL/2's part for
DefectDiffu (which starts from it non-strictly, as from ImageNet DiT).

Like ImageNet DiT for MVTec, it knows what each of the 13 products looks like (their normals in the web look) and
the defects of the pretraining products only (the corpus rule of :mod:`core.models.pretrain`): the same images the
mini prior learned from, rendered again from its recorded corpus config, labelled by product alone (a class-
conditional model has no caption). Classifier-free guidance: the label drops to the null class with probability
``class_dropout`` (DiT: 0.1).

Departures from DiT-XL/2, each for the 2-core / small-world budget: a narrower and shallower model (a config), no
learned variance (``learn_sigma: false``: the plain eps MSE of the mini prior instead of DiT's hybrid MSE + VB loss;
the samplers here are DDIM, which reads eps only), offset noise from the start (the mini prior's stage 3 found the
colour of a product otherwise leaks through the noise's mean; see its card).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.synthetic import ALL_PRODUCTS
from ..io import write_json
from .dit import DiT
from .loading import SDComponents, load_model
from .pretrain import corpus_from_config, corpus_record, device_name, encode_pool, train_eps_model, write_manifest


def build_mini_dit(arch: dict, comp: SDComponents, seed: int = 0) -> DiT:
    """A DiT on ``comp``'s latents (side, channels), one class per product of the world (+ the null class)."""
    torch.manual_seed(seed)
    return DiT(input_size=comp.latent_size, patch_size=int(arch["patch_size"]),
               in_channels=int(comp.unet.config.in_channels), hidden_size=int(arch["hidden_size"]),
               depth=int(arch["depth"]), num_heads=int(arch["num_heads"]), mlp_ratio=float(arch.get("mlp_ratio", 4.0)),
               num_classes=len(ALL_PRODUCTS), learn_sigma=bool(arch.get("learn_sigma", False)))


def product_labels(products) -> torch.Tensor:
    """Class index of each product name (its position in the world's product list)."""
    unknown = sorted({p for p in products if p not in ALL_PRODUCTS})
    if unknown:
        raise ValueError(f"product(s) {unknown} are not in the synthetic world ({', '.join(ALL_PRODUCTS)}).")
    return torch.tensor([ALL_PRODUCTS.index(p) for p in products])


def train_dit(dit: DiT, labels: torch.Tensor, latents: torch.Tensor, scheduler, cfg: dict, work_dir: Path, seed: int,
              device: torch.device) -> dict:
    """eps-prediction training of ``dit`` on (latent, product label) pairs, the label dropped to the null class with
    probability ``cfg["class_dropout"]`` per item (drawn over the whole batch from the step's generator). Resumable
    from ``work_dir/dit_state.pt``; the EMA weights end up in ``dit``."""
    dit.train()
    null = dit.y_embedder.num_classes
    p_drop = float(cfg["class_dropout"])

    def predict(zt, t, idx, part, rng):
        y = labels[idx].clone()
        y[torch.from_numpy(rng.random(len(idx)) < p_drop)] = null
        return dit(zt, t, y[part].to(zt.device))[:, :dit.in_channels]

    report = train_eps_model(dit, {"dit": dit}, [{"params": dit.parameters(), "lr": cfg["lr"]}], predict, len(latents),
                             latents, scheduler, cfg, work_dir, seed, device, "dit_state.pt", "mini DiT")
    dit.eval()
    return report


@torch.no_grad()
def sample_dit(dit: DiT, comp: SDComponents, labels: torch.Tensor, steps: int, guidance: float,
               generator: torch.Generator) -> torch.Tensor:
    """Images (N, 3, S, S) in [0, 1]: DDIM (eta 0, leading spacing) with classifier-free guidance on the null class,
    eps = eps_null + guidance (eps_label - eps_null), decoded by ``comp``'s VAE."""
    from ..diffusion import inference_scheduler
    sched = inference_scheduler(comp.scheduler.config, "ddim", "leading")
    sched.set_timesteps(steps)
    dev = next(dit.parameters()).device
    n = len(labels)
    z = torch.randn(n, dit.in_channels, comp.latent_size, comp.latent_size, generator=generator).to(dev)
    y = torch.cat([labels, torch.full_like(labels, dit.y_embedder.num_classes)]).to(dev)
    for t in sched.timesteps:
        out = dit(torch.cat([z, z]), torch.full((2 * n,), int(t), device=dev), y)[:, :dit.in_channels]
        cond, uncond = out.chunk(2)
        z = sched.step(uncond + guidance * (cond - uncond), t, z).prev_sample
    return comp.decode_latents(z).clamp(0, 1)


def pretrain_dit(cfg: dict, out_dir: str | Path, work_dir: str | Path) -> dict:
    """Render the mini prior's corpus again (its recorded config), encode it with the prior's VAE, train the DiT,
    save it (``DiT.save``, float16 weights when ``save_half``) with ``corpus.json`` and ``training.json`` beside it.
    Rerunning resumes from ``work_dir``."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.get("device") or "cpu")
    prior = load_model(dict(cfg["prior"]))
    prior.vae.to(device)
    prior_cfg = dict(cfg.get("corpus_config") or _prior_config(prior))
    t0 = time.perf_counter()
    pool = corpus_from_config(prior_cfg, desc="render the prior's corpus")
    manifest_sha = write_manifest(pool, work_dir / "corpus_manifest.jsonl")
    report: dict[str, Any] = {"pool_images": len(pool.images), "render_seconds": time.perf_counter() - t0,
                              "device": device_name(device)}
    t1 = time.perf_counter()
    latents = encode_pool(prior, pool)
    report["encode_seconds"] = time.perf_counter() - t1
    dit = build_mini_dit(cfg["architecture"], prior, int(cfg["seed"])).to(device)
    report["parameters"] = sum(p.numel() for p in dit.parameters())
    report["training"] = train_dit(dit, product_labels(pool.products), latents, prior.scheduler, cfg["train"],
                                   work_dir, int(cfg["seed"]), device)
    report["total_seconds"] = time.perf_counter() - t0
    dit = dit.to("cpu")
    if cfg.get("save_half", True):
        dit.half()
    dit.save(out_dir)
    dit.float()
    write_json(out_dir / "corpus.json", corpus_record(prior_cfg, pool, manifest_sha))
    write_json(out_dir / "training.json", {"config": cfg, "report": report, "classes": list(ALL_PRODUCTS)})
    return report


def _prior_config(prior: SDComponents) -> dict:
    """The corpus settings (corpus, seed, resolution) the mini prior recorded beside its weights."""
    from omegaconf import OmegaConf
    path = Path(prior.source.get("path", "")) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"The mini DiT renders the mini prior's corpus from the prior's config.yaml, but "
                                f"{path} is missing. Fix: set prior.path to a mini prior directory (with its "
                                f"config.yaml), or give corpus_config explicitly.")
    c = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return {"corpus": c["corpus"], "seed": c["seed"], "resolution": c["resolution"]}


__all__ = ["build_mini_dit", "pretrain_dit", "product_labels", "sample_dit", "train_dit"]
