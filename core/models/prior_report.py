"""Report of a pretrained mini prior: VAE reconstruction error on held-out products and a sample grid.

Written beside the prior (``report.json``, ``sample_grid.png``) so the model card can point at them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

from ..data.synthetic import BENCHMARK_PRODUCTS, PRODUCTS, render, sample_rng
from ..data.visualize import labelled_grid
from ..diffusion import cfg_eps, sample
from .loading import load_diffusers_dir
from .pretrain import DEFECT_PHRASES, product_words, vae_reconstruction

DEBUG_OVERRIDES = {
    "architecture": "tiny", "resolution": 64, "products": ["metal_nut", "grid"], "checkpoint_every": 2,
    "pool": {"normal_per_product": 3, "defect_per_product": 3},
    "vae": {"steps": 3, "batch": 2, "crop": 32, "warmup": 1},
    "unet": {"steps": 3, "batch": 2, "warmup": 1},
    "report": {"held_out_images": 2, "sample_steps": 2, "samples_per_prompt": 1},
}


def _prompts(pretrain: list[str], held_out: list[str]) -> list[tuple[str, str, str, str | None]]:
    """(group, product, prompt, defect shown in the reference column)."""
    rows = []
    for p in pretrain:
        d = PRODUCTS[p].defects[0]
        rows.append(("pretraining", p, f"a photo of a {product_words(p)}", None))
        rows.append(("pretraining", p, f"a photo of a {product_words(p)} with {DEFECT_PHRASES[d]}", d))
    for p in held_out:
        rows.append(("held out", p, f"a photo of a {product_words(p)}", None))
        rows.append(("held out", p, f"a photo of a {product_words(p)} that is damaged", PRODUCTS[p].defects[0]))
    return rows


@torch.no_grad()
def write_report(cfg: dict, out_dir: Path, work_dir: Path) -> dict:
    rcfg = cfg["report"]
    comp = load_diffusers_dir(out_dir, "mini prior")
    comp.unet.eval(), comp.vae.eval(), comp.text_encoder.eval()
    t0 = time.perf_counter()
    held_out = [p for p in BENCHMARK_PRODUCTS if p in PRODUCTS]
    report = {
        "vae_reconstruction_held_out": vae_reconstruction(comp, tuple(held_out), rcfg["held_out_images"],
                                                          cfg["resolution"], cfg["seed"]),
        "vae_reconstruction_pretraining": vae_reconstruction(comp, tuple(cfg["products"]),
                                                             max(2, rcfg["held_out_images"] // 4),
                                                             cfg["resolution"], cfg["seed"]),
    }
    for key in ("vae_reconstruction_held_out", "vae_reconstruction_pretraining"):
        vals = report[key].values()
        report[key]["mean"] = {"mse": float(np.mean([v["mse"] for v in vals])),
                               "psnr": float(np.mean([v["psnr"] for v in vals]))}
    sched = DDIMScheduler.from_config(comp.scheduler.config)
    uncond = comp.encode_prompt([""])
    n = int(rcfg["samples_per_prompt"])
    rows = []
    shown = list(cfg["products"])[:4]
    for i, (group, product, prompt, defect) in enumerate(_prompts(shown, held_out)):
        ref = render(product, sample_rng(cfg["seed"] + 7, product, "prior", defect or "good", 0), cfg["resolution"],
                     defect).image
        cond = comp.encode_prompt([prompt] * n)
        sched.set_timesteps(int(rcfg["sample_steps"]))
        g = torch.Generator().manual_seed(cfg["seed"] * 100 + i)
        z = torch.randn(n, 4, comp.latent_size, comp.latent_size, generator=g)
        z0 = sample(cfg_eps(comp.unet, cond, uncond.expand(n, -1, -1), float(rcfg["guidance"])), sched, z,
                    progress=False)
        imgs = (comp.decode_latents(z0).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        words = prompt.replace("a photo of a ", "")
        rows.append(((f"{group}: {product}", words[:18], words[18:36]), [ref] + list(imgs)))
    grid = labelled_grid(rows, out_dir / "sample_grid.png", cell=cfg["resolution"])
    report["sample_grid"] = grid.name
    report["sample_grid_layout"] = ("one row per prompt; first column: a real render of the product (with the "
                                    "product's first defect type for defect prompts), then samples (DDIM "
                                    f"{rcfg['sample_steps']} steps, CFG {rcfg['guidance']})")
    report["report_seconds"] = time.perf_counter() - t0
    training = work_dir / "training_report.json"
    if training.is_file():
        report["training"] = json.loads(training.read_text())
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k.startswith("vae")}, indent=2))
    print(f"sample grid: {grid}")
    return report
