"""CUT generation cost against its floor, measured in the same run (ratios, not wall-clock limits).

    python benchmarks/cut_speed.py [--model mini|tiny] [--steps 50] [--batch 4] [--repeats 2] [--device cpu]
                                   [--out result.json]

One batch of ``cut.method.cut_batch`` (encode, the optimisation passes with gradients while an image's has not stopped,
one guided DDIM step per timestep from t_start, decode) against its floor: the same guided denoiser calls from the
same start (the optimisation off) plus the VAE encode and decode. The optimisation passes are counted; the paper's
200 steps and early stop decide how many there are. Random normal images with a centred foreground stand in for the
product's; the time does not depend on the image.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from core.diffusion import inference_scheduler, layers_at
from core.models import build_random, load_model
from core.timing import device_name, median_seconds
from cut.method import anomaly_token, cut_batch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini", choices=["mini", "tiny"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    comp = (load_model({"kind": "mini", "version": 2}) if a.model == "mini" else build_random("tiny")).to(device)
    for m in (comp.unet, comp.vae, comp.text_encoder):
        m.eval().requires_grad_(False)
    g = OmegaConf.load(REPO / "configs" / "method" / "cut.yaml").method.generate
    g.num_inference_steps = a.steps
    if a.model == "tiny":
        g.attention.resolution = 8
    T = int(comp.scheduler.config.num_train_timesteps)
    sched = inference_scheduler(comp.scheduler.config, "ddim", str(g.timestep_spacing))
    sched.set_timesteps(a.steps)
    timesteps = [t for t in sched.timesteps if int(t) <= T * (1 - float(g.gamma))]
    layers = layers_at(comp.unet, comp.latent_size, [int(g.attention.resolution)])
    with torch.no_grad():
        cond, uncond = comp.encode_prompt(["a photo of a bottle that is damaged"]), comp.encode_prompt([""])
    token = anomaly_token(comp.tokenizer, "a photo of a bottle that is damaged", "damaged")
    gen = torch.Generator().manual_seed(0)
    S, B = comp.resolution, a.batch
    x = torch.rand(B, 3, S, S, generator=gen) * 0.2
    x[:, :, S // 4: 3 * S // 4, S // 4: 3 * S // 4] += 0.6
    x = x.to(device)
    noise = torch.randn(B, comp.unet.config.in_channels, comp.latent_size, comp.latent_size, generator=gen).to(device)
    off = g.copy()
    off.optimise.enabled = False
    passes = {}

    def run(cfg, key):
        def f():
            passes[key] = cut_batch(comp, timesteps, layers, cond, uncond, token, cfg, x, noise, T)[3]
        return f

    fns = {"floor": run(off, "floor"), "cut": run(g, "cut")}
    med = median_seconds(fns, a.repeats, device)
    res = {"device": device_name(device),
           "threads": torch.get_num_threads(), "model": a.model, "steps": a.steps, "denoised_steps": len(timesteps),
           "batch": B, "optimisation_passes": passes["cut"], "seconds_per_image": {k: v / B for k, v in med.items()},
           "ratio_to_floor": med["cut"] / med["floor"]}
    print(f"CUT, {a.model} prior, {len(timesteps)} of {a.steps} DDIM steps from t_start, batch {B}, {res['device']} "
          f"({res['threads']} threads): {res['seconds_per_image']['cut']:.3f} s / image with "
          f"{passes['cut']} optimisation passes, floor {res['seconds_per_image']['floor']:.3f}, "
          f"{res['ratio_to_floor']:.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
