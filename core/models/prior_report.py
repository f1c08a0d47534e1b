"""Report of a pretrained mini prior: VAE reconstruction error on held-out products, a sample grid, and what the world
CLIP says about its samples (``prior_eval``), beside the shipped v1 for comparison.

Written beside the prior (``report.json``, ``sample_grid.png``, ``README.md``) so the model card can point at them.
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
    "finetune": {"steps": 2, "batch": 2, "warmup": 1},
    "report": {"held_out_images": 2, "sample_steps": 2, "samples_per_prompt": 1, "clip_eval": {"enabled": False}},
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
    comp = load_diffusers_dir(out_dir, "mini prior").to(cfg.get("device") or "cpu")
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
        z0 = sample(cfg_eps(comp.unet, cond, uncond.expand(n, -1, -1), float(rcfg["guidance"])), sched,
                    z.to(comp.device), progress=False)
        imgs = (comp.decode_latents(z0).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        rest = prompt.replace(f"a photo of a {product_words(product)}", "").strip()
        rows.append(((group, product, f"+ {rest}" if rest else "(normal prompt)"), [ref] + list(imgs)))
    grid = labelled_grid(rows, out_dir / "sample_grid.png", cell=cfg["resolution"])
    report["sample_grid"] = grid.name
    report["sample_grid_layout"] = ("one row per prompt; first column: a real render of the product (with the "
                                    "product's first defect type for defect prompts), then samples (DDIM "
                                    f"{rcfg['sample_steps']} steps, CFG {rcfg['guidance']})")
    ce = rcfg.get("clip_eval") or {}
    if ce.get("enabled"):
        report["clip_eval"] = clip_evaluation(cfg, comp)
    report["report_seconds"] = time.perf_counter() - t0
    for key, name in (("training", "training_report.json"), ("finetune", "finetune_report.json")):
        if (work_dir / name).is_file():
            report[key] = json.loads((work_dir / name).read_text())
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "README.md").write_text(model_card(cfg, report, comp))
    print(json.dumps({k: v for k, v in report.items() if k.startswith("vae")}, indent=2))
    print(f"sample grid: {grid}")
    return report


def rewrite_card(cfg: dict, out_dir: Path) -> Path:
    """The model card again from the saved ``report.json`` (no sampling): after a change to the card's layout."""
    report = json.loads((out_dir / "report.json").read_text())
    comp = load_diffusers_dir(out_dir, "mini prior")
    (out_dir / "README.md").write_text(model_card(cfg, report, comp))
    return out_dir / "README.md"


def clip_evaluation(cfg: dict, comp) -> dict:
    """``prior_eval.evaluate_prior`` for this prior and for each shipped version in ``clip_eval.compare``."""
    from .loading import load_model
    from .prior_eval import evaluate_prior, load_real_normals
    from .world_clip import load_clip

    ce = cfg["report"]["clip_eval"]
    clip = load_clip(ce.get("clip_path"), "report.clip_eval.clip_path")
    real = load_real_normals(ce["dataset_root"], BENCHMARK_PRODUCTS, int(ce.get("world_seed", 0)), cfg["resolution"])
    kw = dict(n_per_product=int(ce["n_per_product"]), n_per_defect=int(ce["n_per_defect"]), steps=int(ce["steps"]),
              guidance=float(cfg["report"]["guidance"]), seed=int(cfg["seed"]), resolution=int(cfg["resolution"]))
    out = {f"v{cfg.get('version', 2)}": evaluate_prior(comp, clip, real, **kw)}
    for v in ce.get("compare") or []:
        other = load_model({"kind": "mini", "version": int(v)}).to(comp.device)
        out[f"v{v}"] = evaluate_prior(other, clip, real, **kw)
    return out


def _params(m: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f} M"


def _clip_tables(report: dict, version: str) -> str:
    ce = report.get("clip_eval")
    if not ce:
        return "Not computed (`report.clip_eval.enabled=false`, or no world CLIP)."
    versions = [version] + [v for v in ce if v != version]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}"  # noqa: E731
    num = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    s0 = ce[version]["samples"]
    head = " / ".join(versions)
    lines = [f"{s0['n_per_product']} samples per product prompt, {s0['n_per_defect']} per defect prompt, {s0['sampler']} "
             f"{s0['steps']} steps, CFG {s0['guidance']}; judged by the world CLIP (`core/models/world_clip`).", "",
             "**Product named by the prompt \"a photo of a <product>\": share of samples the world CLIP classifies as "
             "that product (13-way), and share it calls damaged (false alarms)**", "",
             f"| product | group | product accuracy (%): {head} | real web-look renders (ceiling) | "
             f"called damaged (%): {head} |", "|---|---|---|---|---|"]
    for p in ce[version]["per_product"]:
        group = "held out" if p in BENCHMARK_PRODUCTS else "pretraining"
        acc = " / ".join(pct(ce[v]["per_product"].get(p, {}).get("product_accuracy")) for v in versions)
        dam = " / ".join(pct(ce[v]["per_product"].get(p, {}).get("damaged_share_normal_prompt")) for v in versions)
        ceiling = pct(ce[version]["per_product"][p].get("product_accuracy_real_web_look"))
        lines.append(f"| {p} | {group} | {acc} | {ceiling} | {dam} |")
    lines.append(f"| **mean** | | {' / '.join(pct(ce[v]['product_accuracy_mean']) for v in versions)} | | |")
    lines += ["", "**Held-out products: world-FID of \"a photo of a <product>\" samples against the benchmark's real "
              "train/good (lower is closer), with two real references at the same sample count; share of \"a photo "
              "of a <product> with <defect>\" samples the world CLIP calls damaged**", "",
              f"| product | world-FID: {head} | real, benchmark look (floor) | real, web look | "
              f"defect prompts called damaged (%): {head} |", "|---|---|---|---|---|"]
    for p in BENCHMARK_PRODUCTS:
        r = ce[version]["per_product"].get(p, {})
        if "world_fid" not in r:
            continue
        f = " / ".join(num(ce[v]["per_product"].get(p, {}).get("world_fid")) for v in versions)
        d = " / ".join(pct(ce[v]["per_product"].get(p, {}).get("damaged_share_defect_prompt_mean")) for v in versions)
        lines.append(f"| {p} | {f} | {num(r.get('world_fid_real_benchmark_look'))} | "
                     f"{num(r.get('world_fid_real_web_look'))} | {d} |")
    return "\n".join(lines)


def _finetune_text(cfg: dict) -> str:
    ft = cfg.get("finetune") or {}
    if not int(ft.get("steps") or 0):
        return ""
    return (f"\nStage 3 (`stage=finetune`, also part of the first command): the saved prior (float16) trains on for "
            f"{ft['steps']} steps of batch {ft.get('batch', cfg['unet']['batch'])} with offset noise "
            f"{ft.get('offset_noise', cfg['unet'].get('offset_noise'))} (one "
            f"N(0, offset) constant per image and channel added to the training noise), AdamW {ft.get('lr')} (text "
            f"{ft.get('text_lr')}), warm-up {ft.get('warmup')}, seed {ft.get('seed')}, a fresh optimiser and EMA; "
            f"`toolkit.json` records it under `source.finetune`.")


def _finetune_time(report: dict, minutes) -> str:
    ft = report.get("finetune") or {}
    d = ft.get("denoiser") or {}
    if not d:
        return ""
    where = f" on {ft['device']}" if ft.get("device") else ""
    return (f" Stage 3{where}: encoding the corpus {minutes(ft.get('encode_seconds'))}, {d.get('steps_run')} steps in "
            f"{minutes(d.get('seconds'))}, final loss {d.get('final_loss')}.")


def model_card(cfg: dict, report: dict, comp) -> str:
    """The prior's README, filled from its config and report (regenerated by every ``stage=report`` run)."""
    tr = report.get("training", {})
    held = report["vae_reconstruction_held_out"]
    pre = report["vae_reconstruction_pretraining"]
    rows = "\n".join(f"| {p} | {v['mse']:.5f} | {v['psnr']:.2f} |" for p, v in held.items() if p != "mean")
    minutes = lambda s: f"{s / 60:.1f} min" if s else "n/a"  # noqa: E731
    c = cfg["corpus"]
    version = f"v{cfg.get('version', 2)}"
    config_name = "pretrain_prior" if version == "v2" else f"pretrain_prior_{version}"
    return f"""# Mini prior {version} (model card)

Small models of Stable Diffusion's classes, trained from scratch by this toolkit so that its methods have a
pretrained text-to-image prior on a machine without downloads. It plays the part of SD v1.x in the synthetic world:
like SD, it has seen ordinary photos of every product (bottles, pills, cables, carpets, leather, ...) and has never
seen a defective bottle, pill, cable, carpet or leather; few-shot methods must learn those defects.

| part | class | size |
|---|---|---|
| VAE | `AutoencoderKL`, downsampling {comp.vae_scale_factor}, 4 latent channels, scaling factor {comp.vae.config.scaling_factor:.4f} | {_params(comp.vae)} |
| text encoder | `CLIPTextModel` (hidden {comp.text_encoder.config.hidden_size}, {comp.text_encoder.config.num_hidden_layers} layers), tokenizer built locally ({len(comp.tokenizer)} tokens, max length {comp.tokenizer.model_max_length}) | {_params(comp.text_encoder)} |
| denoiser | `UNet2DConditionModel` (channels {'-'.join(map(str, comp.unet.config.block_out_channels))}, cross-attention at 1/2 and 1/4 of the latent) | {_params(comp.unet)} |
| schedule | `DDPMScheduler`, SD v1's scaled-linear betas (0.00085-0.012), 1000 steps, epsilon prediction | |

Images: {cfg['resolution']} x {cfg['resolution']} RGB, latents {comp.latent_size} x {comp.latent_size} x 4. Weights are stored in float16 and
load as float32 (`model=mini`; the first prior, v1, stays loadable as `model=mini_v1` for comparison).

## Training data (the corpus)
Drawn from the synthetic world's generator (streams "prior" and "web"), never from the benchmark tree
(`core/models/pretrain.py` `render_corpus`; `corpus.json` here lists the counts and the manifest's sha256):
- normal images of {', '.join(c['normal_products'])}: {c['normal_per_product']} each;
- defect images of {', '.join(c['defect_products'])} only: {c['defect_per_product']} each, defect types in turn;
- appearance: `{c['appearance']}`{' (pose, colour and material, background, lighting and noise, colour mode drawn wider than the benchmark; each factor keeps the benchmark look with probability ' + str(c['keep_benchmark']) + ', so the benchmark look is inside the distribution but almost never all of it at once)' if c['appearance'] == 'web' else ' (the benchmark look)'}.

Captions name product and defect: "a photo of a <product>", "a photo of a good <product>", "a photo of a <product>
with <defect>", "a photo of a damaged / defective <product>", ...; 10 % dropped to "" for classifier-free guidance.
No defect image of a benchmark product was rendered for it (the corpus refuses one; a test checks the manifest).

## Reproduce
```
python scripts/pretrain_prior.py{'' if version == 'v2' else ' --config-name ' + config_name}                 # trains all stages (VAE, U-Net, stage 3) and writes this directory (resumes if killed)
python scripts/pretrain_prior.py{'' if version == 'v2' else ' --config-name ' + config_name} stage=report    # report.json, sample_grid.png and this card only
```
The exact configuration is `config.yaml` here (= `configs/{config_name}.yaml`): seed {cfg['seed']}; VAE
{cfg['vae']['steps']} steps of batch {cfg['vae']['batch']} random {cfg['vae']['crop']} px crops, L1 + MSE + {cfg['vae']['kl_weight']} KL, AdamW
{cfg['vae']['lr']}; then text encoder + U-Net jointly, {cfg['unet']['steps']} steps of batch {cfg['unet']['batch']}, AdamW {cfg['unet']['lr']} (text
{cfg['unet']['text_lr']}), warm-up {cfg['unet']['warmup']} and cosine decay to 10 %, EMA {cfg['unet']['ema']}. The report stage needs the
world CLIP (`python scripts/train_world_clip.py`) for the CLIP evaluation below.{_finetune_text(cfg)}

Training time as logged by the invocations that made it (on {tr.get('vae', {}).get('device', '2 CPU cores')} unless said; a stage resumed from its
checkpoint only counts the steps it ran): rendering the corpus ({tr.get('pool_images', 'n/a')} images) {minutes(tr.get('render_seconds'))}; VAE
{tr.get('vae', {}).get('steps_run')} steps in {minutes(tr.get('vae', {}).get('seconds'))}; U-Net + text {tr.get('denoiser', {}).get('steps_run')} steps in
{minutes(tr.get('denoiser', {}).get('seconds'))}{' on ' + tr['denoiser']['device'] if tr.get('denoiser', {}).get('device') else ''}, final loss {tr.get('denoiser', {}).get('final_loss')}.{_finetune_time(report, minutes)}
{cfg.get('timing_note', '')}

## What it knows, judged by the world CLIP
{_clip_tables(report, version)}

## VAE reconstruction on held-out products
Fresh benchmark-look renders ({cfg['report']['held_out_images']} per product, half defective), images in [0, 1]:

| product | MSE | PSNR (dB) |
|---|---|---|
{rows}
| **mean (held out)** | **{held['mean']['mse']:.5f}** | **{held['mean']['psnr']:.2f}** |
| mean (pretraining products) | {pre['mean']['mse']:.5f} | {pre['mean']['psnr']:.2f} |

## Samples
`sample_grid.png`: {report['sample_grid_layout']}.
The first rows: pretraining products (normal prompt, defect prompt); the rest: held-out products (normal prompt,
"damaged" prompt): the prior knows the product and has never seen its defects.

{('## Known weakness' + chr(10) + cfg['card_note'] + chr(10) + chr(10)) if cfg.get('card_note') else ''}## Limits
A toy: it knows 13 procedural products and 7 defect kinds at 128 px. It is not a substitute for SD when judging a
method's absolute quality on real data; it makes the workflows, the relative comparisons and the tests runnable
on a CPU.
"""
