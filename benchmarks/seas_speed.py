"""SeaS cost against plain references measured in the same run (ratios, not wall-clock limits).

    python benchmarks/seas_speed.py [--model mini|tiny|sd_v1] [--repeats 7] [--device cpu] [--out result.json]

Training: one SeaS update (mixed batch of 2 anomaly + 2 normal images, DA loss on the encoder's cross-attention,
NA loss, token-embedding updates; ``SeaSTrainer.step``) vs. one plain SD fine-tuning update of the U-Net on the same
4 images (frozen text encoder, SDPA everywhere, MSE on eps). Target: <= 1.25x.

Generation: one SeaS image-mask pair (``sample_with_masks``: 25 DPM-Solver++ steps with CFG, U-Net features captured
at the last 3 steps, the VAE decodes of those steps' input latents and of the final latent, the RMP branch) vs. the
floor: the same 25 CFG denoiser calls plus the same 4 VAE decodes, nothing else. Target: <= 1.15x. Also shown: the floor with only the final decode (what a generator without
masks pays).

``--model mini`` uses the shipped mini prior (the CPU benchmark); ``sd_v1`` random SD v1 shapes (GPU); ``tiny`` a
smoke run. Variants are interleaved so that drift hits each alike; medians are reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from core.models import build_random, load_model
from seas.method import (Batch, SeaSTrainer, build_prompt, build_rmp, make_scheduler, sample_with_masks,
                         start_signal)

METHOD = OmegaConf.load("configs/method/seas.yaml").method


def method_config(experiment: str | None):
    """The method node, with an experiment file's ``method`` overrides (e.g. the mini prior's RMP widths)."""
    if not experiment:
        return METHOD
    over = OmegaConf.load(f"configs/experiment/{experiment}.yaml").get("method", {})
    return OmegaConf.merge(METHOD, over)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    for f in fns.values():
        f()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            _sync(device)
            s = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - s)
    return {k: statistics.median(v) for k, v in times.items()}


def components(name: str, device: torch.device, dtype: torch.dtype | None):
    comp = load_model({"kind": "mini"}) if name == "mini" else build_random(name)
    return comp.to(device, dtype)


def bench_training(name: str, repeats: int, device: torch.device, method=METHOD) -> dict:
    comp = components(name, device, None)
    prompt = build_prompt(["crack", "stain"], comp, method.prompt)
    S = comp.resolution
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, S, S, generator=g)
    masks = torch.zeros(2, 1, S, S)
    masks[:, :, S // 4:S // 2, S // 3:S // 2] = 1
    batch = Batch(images, masks, ["crack", "stain"], 2)
    T = comp.scheduler.config.num_train_timesteps
    t = torch.randint(0, T, (4,), generator=g)
    eps = torch.randn(4, 4, comp.latent_size, comp.latent_size, generator=g)
    trainer = SeaSTrainer(comp, prompt, method.train)
    plain_opt = torch.optim.AdamW(comp.unet.parameters(), lr=1e-9)

    def plain_step():
        plain_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            z0 = comp.encode_images(images.to(device))
            e = comp.encode_prompt(["a photo of a bottle"] * 4)
        z_t = comp.scheduler.add_noise(z0, eps.to(device), t.to(device))
        loss = F.mse_loss(comp.unet(z_t, t.to(device), encoder_hidden_states=e).sample, eps.to(device))
        loss.backward()
        plain_opt.step()

    med = timed({"plain SD fine-tuning step": plain_step, "SeaS step": lambda: trainer.step([(batch, t, eps)])},
                repeats, device)
    return {"median_s": med, "ratio": med["SeaS step"] / med["plain SD fine-tuning step"]}


@torch.no_grad()
def bench_generation(name: str, repeats: int, device: torch.device, dtype: torch.dtype | None, method=METHOD,
                     batch: int = 1) -> dict:
    comp = components(name, device, dtype)
    comp.unet.eval(), comp.vae.eval()
    rmp, _ = build_rmp(comp, method.rmp)
    rmp = rmp.to(device, dtype or torch.float32).eval()
    steps, guidance = int(method.generate.num_inference_steps), float(method.generate.guidance)
    sched = make_scheduler(comp, "dpmsolver++")
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(batch, 4, comp.latent_size, comp.latent_size, generator=g).to(device, dtype or torch.float32)
    z_T = start_signal(method.generate) * z0 + torch.randn(z0.shape, generator=g).to(z0)
    cond = comp.encode_prompt(["a photo of a bottle"] * batch)
    uncond = comp.encode_prompt([""] * batch)

    def floor(decodes: int):
        sched.set_timesteps(steps)
        z = z_T
        for tt in sched.timesteps:
            e_u, e_c = comp.unet(torch.cat([z, z]), tt, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            z = sched.step(e_u + guidance * (e_c - e_u), tt, z).prev_sample
        for _ in range(decodes):
            comp.decode_latents(z)

    # the official mask reading decodes the input latents of the last 3 steps and then the final image: 4 decodes
    # ("output" reuses the last one: 3)
    mask_latent = str(method.generate.get("mask_latent", "input"))
    decodes = 4 if mask_latent == "input" else 3
    floor_key = f"floor: 25 CFG calls + {decodes} decodes"
    med = timed({"floor: 25 CFG calls + 1 decode": lambda: floor(1),
                 floor_key: lambda: floor(decodes),
                 "SeaS image + mask": lambda: sample_with_masks(comp, sched, z_T, cond, uncond, guidance, steps, rmp,
                                                                3, mask_latent=mask_latent)},
                repeats, device)
    per_image = {k: v / batch for k, v in med.items()}
    return {"batch": batch, "mask_latent": mask_latent, "median_s": med, "per_image_s": per_image,
            "ratio": med["SeaS image + mask"] / med[floor_key],
            "ratio_vs_single_decode_floor": med["SeaS image + mask"] / med["floor: 25 CFG calls + 1 decode"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mini", choices=["mini", "tiny", "sd_v1"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=[None, "bfloat16", "float16"], help="generation dtype")
    ap.add_argument("--experiment", default="auto",
                    help="method overrides from configs/experiment/<name>.yaml; auto: seas_synthetic for mini")
    ap.add_argument("--gen-batch", type=int, default=1, help="images per sampling call")
    ap.add_argument("--skip", nargs="*", default=[], choices=["training", "generation"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    experiment = ("seas_synthetic" if args.model == "mini" else None) if args.experiment == "auto" else args.experiment
    method = method_config(experiment)
    result = {"model": args.model, "experiment": experiment, "device": str(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "repeats": args.repeats}
    print(f"SeaS speed, model {args.model} (method overrides: {experiment or 'none'}), {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if "training" not in args.skip:
        result["training"] = tr = bench_training(args.model, args.repeats, device, method)
        for k, v in tr["median_s"].items():
            print(f"  {k:34} {v:8.4f} s")
        print(f"  SeaS / plain training step          {tr['ratio']:8.3f}x   (target <= 1.25x)")
    if "generation" not in args.skip:
        result["generation"] = ge = bench_generation(args.model, args.repeats, device, dtype, method, args.gen_batch)
        for k, v in ge["per_image_s"].items():
            print(f"  {k:34} {v:8.4f} s per image (batch {args.gen_batch})")
        print(f"  SeaS / floor (same decodes)         {ge['ratio']:8.3f}x   (target <= 1.15x)")
        print(f"  SeaS / floor (25 calls + 1 decode)  {ge['ratio_vs_single_decode_floor']:8.3f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
