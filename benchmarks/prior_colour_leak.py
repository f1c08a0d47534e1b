"""Does the prompt or the start noise set a prior sample's global colour? (diagnosis in the mini prior's card)

SD v1's noise schedule leaves sqrt(alpha_bar_T) = 0.068 of the image in x_T (no zero terminal SNR; Lin et al.,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891). A denoiser can then read the
image's global colour from the noisy input's spatial mean, and at sampling time pure noise carries the colour of an
average image. On the mini prior's 32 x 32 latents the noise's own spatial mean is twice as large as on SD's 64 x 64
ones, so the leak is relatively larger, and the samples' colour may ignore the prompt. This script prints, per
product, the mean RGB of its corpus images (web look), of samples of "a photo of a <product>" from plain noise, and
of samples whose start noise carries the leaked mean of that product's latents (sqrt(alpha_bar_t0) * mean latent).
With ``--judge`` it also gives the world CLIP's 13-way product accuracy of both sets of samples: how much of the
prior's low product accuracy the colour explains. The leaked mean comes from the corpus's own (web-look) renders,
never from the benchmark tree.

    python benchmarks/prior_colour_leak.py [--model mini | --path DIR] [--products bottle screw leather] [--n 12]
                                           [--judge]
"""
import argparse

import numpy as np
import torch

from core.data.synthetic import render_web
from core.diffusion import cfg_eps, inference_scheduler, sample
from core.data.synthetic import ALL_PRODUCTS
from core.models import load_model
from core.models.world_clip import embed_images, load_clip, zero_shot_products


def mean_rgb(x: torch.Tensor) -> list[float]:
    return [round(float(v) * 255, 1) for v in x.permute(0, 2, 3, 1).reshape(-1, 3).mean(0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mini", help="mini (v2) or mini_v1")
    ap.add_argument("--path", default=None, help="a prior directory written by scripts/pretrain_prior.py instead")
    ap.add_argument("--products", nargs="+", default=["bottle", "screw", "leather", "pill"])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--device", default="cpu", help="where the prior samples (random draws stay on the CPU)")
    ap.add_argument("--judge", action="store_true", help="add the world CLIP's product accuracy of both sample sets")
    a = ap.parse_args()
    products = ALL_PRODUCTS if a.products == ["all"] else a.products
    clip = load_clip() if a.judge else None
    torch.manual_seed(0)
    comp = load_model({"kind": "mini", "version": 1 if a.model == "mini_v1" else 2, "path": a.path}).to(a.device)
    sched = inference_scheduler(comp.scheduler.config, "ddim", "leading")
    sched.set_timesteps(25)
    t0 = int(sched.timesteps[0])
    leak = float(comp.scheduler.alphas_cumprod[t0].sqrt())
    print(f"first timestep {t0}: sqrt(alpha_bar) = {leak:.4f} of the image stays in the start latent; the spatial "
          f"mean of {comp.latent_size} x {comp.latent_size} unit noise has sd {1 / comp.latent_size:.4f}\n")
    head = "| product | corpus images | samples, plain noise | samples, noise carrying the product's leaked mean |"
    print(head + (" product accuracy (%): plain / leaked mean |" if clip else ""))
    print("|---|---|---|---|" + ("---|" if clip else ""))
    acc = []
    for p in products:
        real = torch.from_numpy(np.stack([render_web(p, 0, "good", i, comp.resolution)[0].image
                                          for i in range(64)])).permute(0, 3, 1, 2).float() / 255
        cond = comp.encode_prompt([f"a photo of a {p.replace('_', ' ')}"] * a.n)
        uncond = comp.encode_prompt([""] * a.n)
        z = torch.randn(a.n, 4, comp.latent_size, comp.latent_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            mu = comp.encode_images(real.to(comp.device)).mean((0, 2, 3)).cpu()
            plain = comp.decode_latents(sample(cfg_eps(comp.unet, cond, uncond, a.guidance), sched,
                                               z.to(comp.device), progress=False)).cpu()
            z_leak = z - z.mean((2, 3), keepdim=True) + leak * mu[None, :, None, None]
            leaked = comp.decode_latents(sample(cfg_eps(comp.unet, cond, uncond, a.guidance), sched,
                                                z_leak.to(comp.device), progress=False)).cpu()
        row = f"| {p} | {mean_rgb(real)} | {mean_rgb(plain)} | {mean_rgb(leaked)} |"
        if clip is not None:
            k = list(ALL_PRODUCTS).index(p)
            acc.append([100 * float((zero_shot_products(clip, embed_images(clip, x)) == k).float().mean())
                        for x in (plain, leaked)])
            row += f" {acc[-1][0]:.0f} / {acc[-1][1]:.0f} |"
        print(row, flush=True)
    if acc:
        m = np.mean(acc, axis=0)
        print(f"| **mean** | | | | {m[0]:.0f} / {m[1]:.0f} |")


if __name__ == "__main__":
    main()
