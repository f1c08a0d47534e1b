"""Report of a pretrained mini prior: VAE reconstruction error on held-out products and a sample grid.

Written beside the prior (``report.json``, ``sample_grid.png``) so the model card can point at them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..data.synthetic import BENCHMARK_PRODUCTS, PRODUCTS, render, sample_rng
from ..data.visualize import labelled_grid
from ..diffusion import cfg_eps, inference_scheduler, sample
from .loading import load_diffusers_dir
from .pretrain import DEFECT_PHRASES, product_words, vae_reconstruction

DEBUG_OVERRIDES = {
    "architecture": "tiny", "resolution": 64, "checkpoint_every": 2,
    "corpus": {"normal_products": ["metal_nut", "grid", "bottle"], "defect_products": ["metal_nut", "grid"],
               "normal_per_product": 3, "defect_per_product": 3},
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
        "vae_reconstruction_pretraining": vae_reconstruction(comp, tuple(cfg["corpus"]["defect_products"]),
                                                             max(2, rcfg["held_out_images"] // 4),
                                                             cfg["resolution"], cfg["seed"]),
    }
    for key in ("vae_reconstruction_held_out", "vae_reconstruction_pretraining"):
        vals = report[key].values()
        report[key]["mean"] = {"mse": float(np.mean([v["mse"] for v in vals])),
                               "psnr": float(np.mean([v["psnr"] for v in vals]))}
    # SD's DDIM spacing, which the report has always used
    sched = inference_scheduler(comp.scheduler.config, "ddim", "leading")
    uncond = comp.encode_prompt([""])
    n = int(rcfg["samples_per_prompt"])
    rows = []
    shown = list(cfg["corpus"]["defect_products"])[:4]
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
        rest = prompt.replace(f"a photo of a {product_words(product)}", "").strip()
        rows.append(((group, product, f"+ {rest}" if rest else "(normal prompt)"), [ref] + list(imgs)))
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
    (out_dir / "README.md").write_text(model_card(cfg, report, comp))
    print(json.dumps({k: v for k, v in report.items() if k.startswith("vae")}, indent=2))
    print(f"sample grid: {grid}")
    return report


def _params(m: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f} M"


def model_card(cfg: dict, report: dict, comp) -> str:
    """The prior's README, filled from its config and report (regenerated by every ``stage=report`` run)."""
    tr = report.get("training", {})
    held = report["vae_reconstruction_held_out"]
    pre = report["vae_reconstruction_pretraining"]
    rows = "\n".join(f"| {p} | {v['mse']:.5f} | {v['psnr']:.2f} |" for p, v in held.items() if p != "mean")
    minutes = lambda s: f"{s / 60:.1f} min" if s else "n/a"
    return f"""# Mini prior (model card)

Small models of Stable Diffusion's classes, trained from scratch by this toolkit so that its methods have a
pretrained text-to-image prior on a machine without downloads. It plays the part of SD v1.x in the synthetic world.

| part | class | size |
|---|---|---|
| VAE | `AutoencoderKL`, downsampling {comp.vae_scale_factor}, 4 latent channels, scaling factor {comp.vae.config.scaling_factor:.4f} | {_params(comp.vae)} |
| text encoder | `CLIPTextModel` (hidden {comp.text_encoder.config.hidden_size}, {comp.text_encoder.config.num_hidden_layers} layers), tokenizer built locally ({len(comp.tokenizer)} tokens, max length {comp.tokenizer.model_max_length}) | {_params(comp.text_encoder)} |
| denoiser | `UNet2DConditionModel` (channels {'-'.join(map(str, comp.unet.config.block_out_channels))}, cross-attention at 1/2 and 1/4 of the latent) | {_params(comp.unet)} |
| schedule | `DDPMScheduler`, SD v1's scaled-linear betas (0.00085-0.012), 1000 steps, epsilon prediction | |

Images: {cfg['resolution']} x {cfg['resolution']} RGB, latents {comp.latent_size} x {comp.latent_size} x 4. Weights are stored in float16 and
load as float32 (`load_model({{"kind": "mini"}})`, or `model=mini` in the Hydra configs).

## Training data
Renders of the synthetic world's pretraining products only ({', '.join(cfg['products'])}), drawn from the world
generator's own "prior" stream (never the benchmark tree): {cfg['pool']['normal_per_product']} normal and
{cfg['pool']['defect_per_product']} defective images per product, defect types in turn. Captions: "a photo of a
<product>", "a photo of a good <product>", "a photo of a <product> with <defect>", "a photo of a <product> that is
damaged", "a photo of a damaged / defective <product>", ...; 10 % dropped to "" for classifier-free guidance. The
benchmark products (bottle, pill, cable, carpet, leather) were never rendered for it: every few-shot or
training-free result on them is a transfer, as with SD on MVTec.

## Reproduce
```
python scripts/pretrain_prior.py                 # trains both stages and writes this directory (resumes if killed)
python scripts/pretrain_prior.py stage=report    # report.json, sample_grid.png and this card only
```
The exact configuration is `config.yaml` here (= `configs/pretrain_prior.yaml`): seed {cfg['seed']}; VAE
{cfg['vae']['steps']} steps of batch {cfg['vae']['batch']} random {cfg['vae']['crop']} px crops, L1 + MSE + {cfg['vae']['kl_weight']} KL, AdamW
{cfg['vae']['lr']}; then text encoder + U-Net jointly, {cfg['unet']['steps']} steps of batch {cfg['unet']['batch']}, AdamW {cfg['unet']['lr']} (text
{cfg['unet']['text_lr']}), warm-up {cfg['unet']['warmup']} and cosine decay to 10 %, EMA {cfg['unet']['ema']}.

Training time on 2 CPU cores, as logged by the last invocation (a stage resumed from its checkpoint only counts
the steps it ran): rendering {minutes(tr.get('render_seconds'))}; VAE {tr.get('vae', {}).get('steps_run')} steps in
{minutes(tr.get('vae', {}).get('seconds'))}; U-Net + text {tr.get('denoiser', {}).get('steps_run')} steps in
{minutes(tr.get('denoiser', {}).get('seconds'))}, final loss {tr.get('denoiser', {}).get('final_loss')}.
{cfg.get('timing_note', '')}

## VAE reconstruction on held-out products
Fresh renders ({cfg['report']['held_out_images']} per product, half defective), images in [0, 1]:

| product | MSE | PSNR (dB) |
|---|---|---|
{rows}
| **mean (held out)** | **{held['mean']['mse']:.5f}** | **{held['mean']['psnr']:.2f}** |
| mean (pretraining products) | {pre['mean']['mse']:.5f} | {pre['mean']['psnr']:.2f} |

## Samples
`sample_grid.png`: {report['sample_grid_layout']}.
Rows 1-8: pretraining products (normal prompt, defect prompt); the rest: held-out products, which the prior has
never seen; they show what a prompt alone yields before any few-shot fine-tuning.

## Limits
A toy: it knows 8 procedural products and 7 defect kinds at 128 px. It is not a substitute for SD when judging a
method's absolute quality on real data; it makes the workflows, the relative comparisons and the tests runnable
on a CPU.
"""
