"""What a mini prior knows, judged by the world CLIP: does "a photo of a <product>" give that product, how far are
its samples from the benchmark's normals (world-FID), and do defect prompts give defects?

Per product (all 13): ``n_per_product`` samples of "a photo of a <product>" -> the share the world CLIP classifies as
that product (13-way zero-shot), beside the share for as many real web-look renders (the judge's own ceiling: a
prior that sampled its corpus perfectly would score that), and the share it calls damaged (the false-alarm rate of
the defect check).
Per held-out product: world-FID of those samples against the benchmark tree's real ``train/good``, beside two real
references at the same sample count: fresh benchmark-look normals from the world's oracle stream (the floor: what a
perfect sampler of the benchmark would score) and web-look normals (what a perfect sampler of the corpus would
score). Per held-out product and defect type: ``n_per_defect`` samples of "a photo of a <product> with <defect>" ->
the share the world CLIP calls damaged. None of the prior's samples or the references is a test image.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.synthetic import ALL_PRODUCTS, BENCHMARK_PRODUCTS, PRODUCTS, OracleSampler, render_web
from ..diffusion import cfg_eps, inference_scheduler, sample
from ..metrics.generation import fid
from .loading import SDComponents
from .world_clip import (ClipEncoder, embed_images, state_prompt, zero_shot_defect_scores, zero_shot_products)


@torch.no_grad()
def sample_prompt(comp: SDComponents, prompt: str, n: int, steps: int, guidance: float, seed: int,
                  batch: int = 32) -> torch.Tensor:
    """``n`` samples of ``prompt`` (DDIM, SD's leading spacing, CFG), images in [0, 1] (n, 3, R, R)."""
    sched = inference_scheduler(comp.scheduler.config, "ddim", "leading")
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        cond = comp.encode_prompt([prompt] * m)
        uncond = comp.encode_prompt([""] * m)
        sched.set_timesteps(int(steps))
        g = torch.Generator().manual_seed(seed * 7919 + start)
        # drawn on the CPU, so a sample is the same on any device (up to its floating point)
        z = torch.randn(m, comp.unet.config.in_channels, comp.latent_size, comp.latent_size, generator=g)
        z0 = sample(cfg_eps(comp.unet, cond, uncond, float(guidance)), sched, z.to(comp.device), progress=False)
        out.append(comp.decode_latents(z0).float().cpu())
    return torch.cat(out)


def _to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def evaluate_prior(comp: SDComponents, clip: ClipEncoder, real_normals: dict[str, torch.Tensor],
                   n_per_product: int = 64, n_per_defect: int = 16, steps: int = 25, guidance: float = 4.0,
                   seed: int = 0, products: Sequence[str] = ALL_PRODUCTS,
                   held_out: Sequence[str] = BENCHMARK_PRODUCTS, resolution: int = 128) -> dict:
    """The numbers described in the module docstring. ``real_normals[p]``: the benchmark tree's train/good of each
    held-out product, images in [0, 1]."""
    t0 = time.perf_counter()
    comp.unet.eval(), comp.vae.eval(), comp.text_encoder.eval()
    per: dict[str, dict] = {}
    jobs = [(p, None) for p in products] + [(p, d) for p in held_out for d in PRODUCTS[p].defects]
    for k, (p, d) in enumerate(tqdm(jobs, desc="prior samples", leave=False)):
        n = n_per_product if d is None else n_per_defect
        x = sample_prompt(comp, state_prompt(p, d), n, steps, guidance, seed + 1000 * k)
        emb = embed_images(clip, x)
        damaged = float((zero_shot_defect_scores(clip, emb, p) > 0.5).float().mean())
        row = per.setdefault(p, {})
        if d is None:
            row["product_accuracy"] = float((zero_shot_products(clip, emb, products) == products.index(p))
                                            .float().mean())
            # the ceiling: the same judge on as many real renders of the corpus's (web) look
            web = embed_images(clip, _to_tensor([render_web(p, seed + 13, "good", i, resolution)[0].image
                                                 for i in range(n)]))
            row["product_accuracy_real_web_look"] = float((zero_shot_products(clip, web, products)
                                                           == products.index(p)).float().mean())
            row["damaged_share_normal_prompt"] = damaged
            if p in held_out and p in real_normals:
                real = embed_images(clip, real_normals[p]).double().numpy()
                row["world_fid"] = fid(real, emb.double().numpy())
        else:
            row.setdefault("damaged_share_defect_prompt", {})[d] = damaged
    for p in held_out:
        if p not in real_normals:
            continue
        n = n_per_product
        real = embed_images(clip, real_normals[p]).double().numpy()
        oracle = OracleSampler(p, seed=seed + 11, resolution=resolution)
        floor = _to_tensor([oracle.normal(i).image for i in range(n)])
        web = _to_tensor([render_web(p, seed + 11, "good", i, resolution)[0].image for i in range(n)])
        per[p]["world_fid_real_benchmark_look"] = fid(real, embed_images(clip, floor).double().numpy())
        per[p]["world_fid_real_web_look"] = fid(real, embed_images(clip, web).double().numpy())
        shares = per[p].get("damaged_share_defect_prompt", {})
        per[p]["damaged_share_defect_prompt_mean"] = float(np.mean(list(shares.values()))) if shares else None
    return {"per_product": per, "samples": {"n_per_product": n_per_product, "n_per_defect": n_per_defect,
                                            "steps": steps, "guidance": guidance, "sampler": "DDIM (leading)"},
            "product_accuracy_mean": float(np.mean([per[p]["product_accuracy"] for p in products])),
            "product_accuracy_min": float(np.min([per[p]["product_accuracy"] for p in products])),
            "seconds": time.perf_counter() - t0}


def load_real_normals(root: str, products: Sequence[str], seed: int, resolution: int) -> dict[str, torch.Tensor]:
    """The benchmark tree's real ``train/good`` images per product (built at ``root`` if absent)."""
    from PIL import Image

    from ..data import load_synthetic

    table = load_synthetic(root, list(products), seed=seed, resolution=resolution)
    out = {}
    for p in products:
        paths = [s.path for s in table if s.product == p and s.split == "train" and s.label == 0]
        out[p] = _to_tensor([np.asarray(Image.open(f).convert("RGB")) for f in sorted(paths)])
    return out


__all__ = ["evaluate_prior", "load_real_normals", "sample_prompt"]
