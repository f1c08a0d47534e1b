"""Background preservation of background-aware generation against plain img2img, and its cost against its floor.

    python benchmarks/bgdefect_background.py --run runs/bg_bottle_f0 [--n 8] [--batch 8] [--strengths 0.3 0.5 0.8 1.0]
                                             [--repeats 2] [--out result.json] [--grid grid.png]

For every defect type of a trained run (``scripts/train.py method=bgdefect``), ``n`` items drawn as ``generate`` draws
them (a training normal, one of the fold's training masks of the type, the run's placement rule, per-item noise), each
made four ways from the same normal latent z0, mask and noise eps:

- **bgdefect**: Algorithm 1 (masked DDIM inversion with C2, z_T* = z~_T^m + m eps, Eq. 9), as ``generate`` runs it;
- **img2img s**: plain img2img (SDEdit) with the same fine-tuned U-Net and C1 under the masked cross-attention: z0
  forward-noised with eps to the level a fraction s of the way up the DDIM schedule, then deterministic DDIM down with
  eps_theta(z_t, t, C1) everywhere; s = 1 starts from the top level, as bgdefect does;
- **VAE**: decode(z0), the round trip every method pays (the floor of the pixel error).

Reported per method (means over items): the pixel error outside the mask (mean |x_out - x| on 0-255), also only beyond
one latent cell from the mask (the decoder mixes a cell's neighbours), the change inside the mask (does a defect get
drawn at all), and the relative latent error outside / inside the latent mask, ||(1-m)(z_out - z0)|| / ||(1-m) z0||.
Proposition 3.3 says bgdefect's latent background retraces the inversion; img2img re-draws the whole image.

Cost: one batch of Algorithm 1 (encode, inversion, Eq. 9, decode) against its floor, the same denoiser calls without
the masked attention (``steps`` calls on B rows for the inversion, ``steps`` on 2B rows for Eq. 9) plus the VAE encode
and decode; medians of ``repeats`` interleaved runs. Ratios, not wall-clock limits.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from bgdefect.method import (algorithm_1, draw_items, latent_region, load_normal, load_pairs, load_run, masked_eps,
                             training_anomalies)
from bgdefect.model import sampling_step, two_part_condition
from core.data import training_normals
from core.data.pairing import nearest_normals
from core.data.visualize import labelled_grid, overlay
from core.diffusion import cross_attention_layers, inference_scheduler
from core.models.slim import load_slim
from core.runs import item_generator


def img2img(comp, scheduler, c1: torch.Tensor, part_length: int, z0: torch.Tensor, mask: torch.Tensor,
            noise: torch.Tensor, strength: float) -> torch.Tensor:
    """Plain img2img from z0: forward-noised with ``noise`` to the level a fraction ``strength`` up the scheduler's
    timesteps, then deterministic DDIM down with eps(z_t, t, C1) under the masked cross-attention."""
    ts = [int(t) for t in scheduler.timesteps]
    k = max(1, round(strength * len(ts)))
    ts = ts[len(ts) - k:]
    abar = scheduler.alphas_cumprod.to(torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    a = abar[ts[0]]
    z = (a.sqrt() * z0.double() + (1 - a).sqrt() * noise.double()).to(z0.dtype)
    eps = masked_eps(comp, cross_attention_layers(comp.unet), c1.expand(z0.shape[0], -1, -1), part_length, mask)
    ones = torch.ones_like(z[:, :1])
    for i, t in enumerate(ts):
        e = eps(z, torch.full((z.shape[0],), t, device=z.device))
        z = sampling_step(z, e, e, abar[t], abar[ts[i + 1]] if i + 1 < len(ts) else final, ones)
    return z


def errors(x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor, z0: torch.Tensor, z: torch.Tensor,
           cell: int) -> dict[str, np.ndarray]:
    """Per item: pixel error outside / beyond one latent cell of / inside the mask, latent error outside / inside."""
    d = (out - x).abs().mean(1) * 255                                          # (B, H, W)
    m = mask > 0.5
    far = F.max_pool2d(m[:, None].float(), 2 * cell + 1, 1, cell)[:, 0] < 0.5
    lm = latent_region(mask[:, None], z0.shape[-1])
    rel = lambda w: ((w * (z - z0)).flatten(1).norm(dim=1) / (w * z0).flatten(1).norm(dim=1).clamp(min=1e-12))  # noqa
    mean = lambda v, w: (v * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1)  # noqa: E731
    return {"pixel_out": mean(d, ~m).numpy(), "pixel_far": mean(d, far).numpy(), "pixel_in": mean(d, m).numpy(),
            "latent_out": rel(1 - lm).numpy(), "latent_in": rel(lm).numpy()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished bgdefect training run directory")
    ap.add_argument("--n", type=int, default=8, help="items per defect type")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.8, 1.0])
    ap.add_argument("--repeats", type=int, default=2, help="timing repeats (0: no timing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--grid", default=None)
    a = ap.parse_args()
    run = Path(a.run)
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"{run} holds no config.yaml: pass --run <the run directory of scripts/train.py "
                         f"method=bgdefect ...>.")
    cfg = OmegaConf.load(run / "config.yaml")
    product, g = str(cfg.product), cfg.method.generate
    meta = load_run(run, product)
    normals = training_normals(cfg, product, "the benchmark inverts them")
    by_type = training_anomalies(cfg, product)
    placement = str(g.get("placement", "any"))
    steps = int(g.num_inference_steps)
    methods = ["bgdefect"] + [f"img2img {s:g}" for s in a.strengths] + ["VAE"]
    per: dict[str, dict[str, list]] = {k: {} for k in methods}
    grid_rows, timing = [], None
    small = None
    for ty in meta["types"]:
        comp = load_slim(run / "types" / ty / "generator", cfg.model)
        for mod in (comp.unet, comp.vae, comp.text_encoder):
            mod.eval().requires_grad_(False)
        res, cell = comp.resolution, comp.vae_scale_factor
        parts = meta["prompts"][ty]
        with torch.no_grad():
            c1, L = two_part_condition(comp.encode_prompt, [parts["defect"]], [parts["background"]])
            c2, _ = two_part_condition(comp.encode_prompt, [parts["mask"]], [parts["background"]])
        sched = inference_scheduler(comp.scheduler.config, "ddim", str(g.timestep_spacing))
        sched.set_timesteps(steps)
        images, bank = load_pairs(by_type[ty], res)
        near = None
        if placement == "nearest":
            if small is None:
                small = torch.stack([F.interpolate(load_normal(p, res)[None], size=(32, 32), mode="area")[0]
                                     for p in normals])
            near = nearest_normals(images, bank, small, min(int(g.placement_k), len(normals)))
        for b0 in tqdm(range(0, a.n, a.batch), desc=f"{product}/{ty}"):
            gens = [item_generator(a.seed, "background-benchmark", product, ty, i)
                    for i in range(b0, min(a.n, b0 + a.batch))]
            src, picks = draw_items(gens, len(normals), bank.shape[0], near)
            mk = bank[picks][:, 0]
            noise = torch.stack([torch.randn(comp.unet.config.in_channels, comp.latent_size, comp.latent_size,
                                             generator=gen) for gen in gens])
            x = torch.stack([load_normal(normals[j], res) for j in src])
            with torch.no_grad():
                z0 = comp.encode_images(x)
                outs = {"bgdefect": algorithm_1(comp, sched, c1, c2, L, z0, mk, noise, steps,
                                                str(g.inversion.eps_timestep), int(g.inversion.fixed_point_iters),
                                                str(g.c2_input))}
                for s in a.strengths:
                    outs[f"img2img {s:g}"] = img2img(comp, sched, c1, L, z0, mk, noise, s)
                outs["VAE"] = z0
                imgs = {k: comp.decode_latents(z).float().clamp(0, 1) for k, z in outs.items()}
            for k in methods:
                for key, v in errors(x, imgs[k], mk, z0, outs[k], cell).items():
                    per[k].setdefault(key, []).extend(v.tolist())
            if b0 == 0:
                u8 = lambda t: (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # noqa: E731
                shown = ["bgdefect", f"img2img {a.strengths[len(a.strengths) // 2]:g}", f"img2img {a.strengths[-1]:g}"]
                cells = [overlay(u8(x[0]), mk[0].numpy() > 0.5)] + [u8(imgs[k][0]) for k in shown]
                cells += [np.repeat(np.clip((imgs[k][0] - x[0]).abs().mean(0).numpy() * 4 * 255, 0, 255)
                                    .astype(np.uint8)[..., None], 3, 2) for k in shown]
                grid_rows.append(([f"{product}/{ty}", "normal+mask | " + " | ".join(shown), "then |diff| x4"], cells))
                if timing is None and a.repeats > 0:
                    timing = time_batch(comp, sched, c1, c2, L, x, mk, noise, steps, g, a.repeats)
        del comp
    table = {k: {key: float(np.mean(v)) for key, v in d.items()} for k, d in per.items()}
    res = {"run": str(run), "product": product, "types": list(meta["types"]), "n_per_type": a.n, "steps": steps,
           "placement": placement, "threads": torch.get_num_threads(), "errors": table, "timing": timing}
    print(f"bgdefect background preservation, {product} ({len(meta['types'])} types x {a.n}), DDIM {steps}")
    print("| method | pixel err. outside | beyond 1 latent cell | change inside | latent err. outside | inside |")
    print("|---|---|---|---|---|---|")
    for k, v in table.items():
        print(f"| {k} | {v['pixel_out']:.2f} | {v['pixel_far']:.2f} | {v['pixel_in']:.2f} | {v['latent_out']:.3f} "
              f"| {v['latent_in']:.3f} |")
    if timing:
        print(f"cost: {timing['seconds_per_image']:.3f} s / image, floor {timing['floor_seconds_per_image']:.3f} "
              f"({timing['ratio_to_floor']:.2f}x), batch {timing['batch']}, {res['threads']} threads")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    if a.grid and grid_rows:
        labelled_grid(grid_rows, a.grid)


def time_batch(comp, sched, c1, c2, L, x, mk, noise, steps, g, repeats) -> dict:
    """Algorithm 1 on one batch (encode, inversion, Eq. 9, decode) against the same denoiser calls without the masked
    attention plus the VAE encode and decode; medians of interleaved repeats."""
    B = x.shape[0]
    ctx1, ctx2 = c2.expand(B, -1, -1), torch.cat([c1.expand(B, -1, -1), c2.expand(B, -1, -1)])
    zshape = (B, comp.unet.config.in_channels, comp.latent_size, comp.latent_size)

    @torch.no_grad()
    def method():
        z0 = comp.encode_images(x)
        comp.decode_latents(algorithm_1(comp, sched, c1, c2, L, z0, mk, noise, steps, str(g.inversion.eps_timestep),
                                        int(g.inversion.fixed_point_iters), str(g.c2_input)))

    @torch.no_grad()
    def floor():
        comp.encode_images(x)
        z = torch.randn(zshape)
        for t in sched.timesteps:
            comp.unet(z, t, encoder_hidden_states=ctx1)
        z2 = torch.cat([z, z])
        for t in sched.timesteps:
            comp.unet(z2, t, encoder_hidden_states=ctx2)
        comp.decode_latents(z)

    method(), floor()   # warm-up
    times = {"method": [], "floor": []}
    for _ in range(repeats):
        for k, f in (("method", method), ("floor", floor)):
            s = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - s)
    m, f = statistics.median(times["method"]), statistics.median(times["floor"])
    return {"batch": B, "repeats": repeats, "seconds_per_image": m / B, "floor_seconds_per_image": f / B,
            "ratio_to_floor": m / f}


if __name__ == "__main__":
    main()
