"""AnomalyDiffusion generation cost against its floor, measured in the same run (ratios, not wall-clock limits).

    python benchmarks/anomalydiffusion_speed.py [--model mini|tiny] [--steps 200] [--batch 8] [--repeats 3]
                                                [--device cpu] [--out result.json]

One batch of image-mask pairs by ``blended_generate`` (Eq. 1: DDIM with eta 1, the latent blended with the
forward-noised normal latent before every step, per-item noise streams) without AAR, with the paper's AAR (Eq. 7-8:
a VAE decode of x0_hat per step, a softmax weight map, re-weighted attention maps in every cross-attention layer) and
with the official AAR (latent inverse-distance weights, dilation, logits), against the floor: the same ``steps``
denoiser calls on the same batch plus one VAE encode of the normal images and one VAE decode, nothing else.
Target: <= 1.15x without AAR; the AAR cost is reported. Variants are interleaved, medians reported.

The condition (e_a + spatial encoder + text encoder, once per batch) is timed apart: it is outside the loop.
"""
from __future__ import annotations

import argparse
import json

import torch

from anomalydiffusion.method import blended_generate, ddim, item_generator
from anomalydiffusion.model import EmbeddingPrompt
from core.models import build_random, load_model
from core.timing import device_name, median_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini", choices=["mini", "tiny"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    comp = (load_model({"kind": "mini", "version": 2}) if a.model == "mini" else build_random("tiny")).to(device)
    for m in (comp.unet, comp.vae, comp.text_encoder):
        m.eval().requires_grad_(False)
    S, B = comp.resolution, a.batch
    g = torch.Generator().manual_seed(0)
    normals = torch.rand(B, 3, S, S, generator=g)
    masks = torch.zeros(B, 1, S, S)
    masks[:, :, S // 4:S // 2, S // 3:2 * S // 3] = 1
    prompt = EmbeddingPrompt(comp.tokenizer, "a photo of a *", 12, "*")
    dim = comp.text_encoder.get_input_embeddings().weight.shape[1]
    with torch.no_grad():
        cond = prompt.encode(comp.text_encoder, torch.randn(B, 12, dim).to(device))
    gens = lambda: [item_generator(0, "bench", i) for i in range(B)]  # noqa: E731
    latent = (B, comp.unet.config.in_channels, comp.latent_size, comp.latent_size)

    @torch.no_grad()
    def floor():
        sched = ddim(comp)
        sched.set_timesteps(a.steps)
        comp.encode_images(normals.to(device))
        z = torch.randn(latent, device=device)
        for t in sched.timesteps:
            comp.unet(z, t, encoder_hidden_states=cond)
        comp.decode_latents(z)

    def run(aar):
        def f():
            with torch.no_grad():
                blended_generate(comp, cond, None, normals, masks, gens(), a.steps, aar=aar, columns=prompt.columns())
        return f

    fns = {"floor": floor, "none": run("none"), "paper": run("paper"), "official": run("official")}
    med = median_seconds(fns, a.repeats, device)
    res = {"device": device_name(device),
           "threads": torch.get_num_threads(), "model": a.model, "steps": a.steps, "batch": B,
           "seconds_per_image": {k: v / B for k, v in med.items()},
           "ratio_to_floor": {k: med[k] / med["floor"] for k in ("none", "paper", "official")}}
    print(f"AnomalyDiffusion generation, {a.model} prior, {a.steps} DDIM steps, batch {B}, {res['device']} "
          f"({res['threads']} threads)")
    print(f"{'variant':<10} {'s / image':>10} {'x floor':>8}")
    for k in fns:
        r = "" if k == "floor" else f"{res['ratio_to_floor'][k]:8.2f}"
        print(f"{k:<10} {res['seconds_per_image'][k]:10.3f} {r}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
