"""SeaS cost against plain references measured in the same run (ratios, not wall-clock limits).

    python benchmarks/seas_speed.py [--model mini|tiny|sd_v1] [--repeats 7] [--device cpu] [--out result.json]
    python benchmarks/seas_speed.py --model sd_v1 --precisions fp32 bf16 --gen-batch 8   # the SD-size table (GPU)

Training: one SeaS update (mixed batch of 2 anomaly + 2 normal images, DA loss on the encoder's cross-attention,
NA loss, token-embedding updates; ``SeaSTrainer.step``) vs. one plain SD fine-tuning update of the U-Net on the same
4 images (frozen text encoder, SDPA everywhere, MSE on eps). Target: <= 1.25x.

Generation: one SeaS image-mask pair (``sample_with_masks``: 25 DPM-Solver++ steps with CFG, U-Net features captured
at the last 3 steps, the VAE decodes of those steps' input latents and of the final latent, the RMP branch) vs. the
floor: the same 25 CFG denoiser calls plus the same 4 VAE decodes, nothing else. Target: <= 1.15x. Also shown: the floor with only the final decode (what a generator without
masks pays).

``--model mini`` uses the shipped mini prior (the CPU benchmark); ``sd_v1`` random SD v1 shapes (GPU; random weights
are exact for time and memory); ``tiny`` a smoke run. Variants are interleaved so that drift hits each alike; medians
are reported.

``--precisions fp32 bf16``: each measurement in each precision (training: the engine's autocast with float32
weights, ``method.train.mixed_precision``; generation: the models in that dtype), with the bf16 / fp32 ratios, the
peak GPU memory of each (CUDA only), one RMP update, and the estimated time of SeaS on all 15 MVTec AD products
(73 anomaly types; 800 updates per type for each stage, each update ``grad_accum`` = 2 mini-batches of 2 + 2 images;
paper: 73 h on one A100).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from core.models import build_random, load_model
from core.timing import median_seconds
from core.engine import Engine, EngineSpec
from seas.method import (Batch, SeaSTrainer, TrainingImages, accumulate_gradients, build_prompt, build_rmp,
                         make_scheduler, rmp_batch, rmp_batch_loss, sample_with_masks, start_signal)

METHOD = OmegaConf.load("configs/method/seas.yaml").method
MVTEC_AD_TYPES = 73   # anomaly types over the 15 MVTec AD products (SeaS trains 800 updates per type)
PRECISION = {"fp32": ("no", None), "bf16": ("bf16", torch.bfloat16), "fp16": ("fp16", torch.float16)}


def method_config(experiment: str | None):
    """The method node, with an experiment file's ``method`` overrides (e.g. the mini prior's RMP widths)."""
    if not experiment:
        return METHOD
    over = OmegaConf.load(f"configs/experiment/{experiment}.yaml").get("method", {})
    return OmegaConf.merge(METHOD, over)


PEAK_GIB: dict[str, float] = {}   # peak GPU memory of each timed function (CUDA only)


def timed(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    return median_seconds(fns, repeats, device, PEAK_GIB)


def components(name: str, device: torch.device, dtype: torch.dtype | None):
    comp = load_model({"kind": "mini"}) if name == "mini" else build_random(name)
    return comp.to(device, dtype)


def _images(S: int):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, S, S, generator=g)
    masks = torch.zeros(2, 1, S, S)
    masks[:, :, S // 4:S // 2, S // 3:S // 2] = 1
    return images, masks


def bench_training(name: str, repeats: int, device: torch.device, method=METHOD, precision: str = "fp32") -> dict:
    comp = components(name, device, None)
    prompt = build_prompt(["crack", "stain"], comp, method.prompt)
    S = comp.resolution
    images, masks = _images(S)
    batch = Batch(images, masks, ["crack", "stain"], 2)
    g = torch.Generator().manual_seed(1)
    T = comp.scheduler.config.num_train_timesteps
    t = torch.randint(0, T, (4,), generator=g)
    eps = torch.randn(4, 4, comp.latent_size, comp.latent_size, generator=g)
    tcfg = OmegaConf.merge(method.train, {"mixed_precision": PRECISION[precision][0]})
    engine = Engine(EngineSpec.from_config(tcfg), device)
    trainer = SeaSTrainer(comp, prompt, tcfg, engine)
    plain_opt = torch.optim.AdamW(comp.unet.parameters(), lr=1e-9)

    def plain_step():
        plain_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            z0 = comp.encode_images(images.to(device))
            e = comp.encode_prompt(["a photo of a bottle"] * 4)
        z_t = comp.scheduler.add_noise(z0, eps.to(device), t.to(device))
        with engine.autocast():
            loss = F.mse_loss(comp.unet(z_t, t.to(device), encoder_hidden_states=e).sample.float(), eps.to(device))
        loss.backward()
        plain_opt.step()

    # the mask branch: one update on the frozen generator (features, decodes of x_{t-1}, the MRMs)
    data = TrainingImages(images[:2], masks, ["crack", "stain"], images[2:], [], [])
    rcfg = method.rmp
    rmp, _ = build_rmp(comp, rcfg)
    rmp = rmp.to(device).train()
    rmp_opt = torch.optim.AdamW(rmp.parameters(), lr=1e-9)
    with torch.no_grad():
        e_cache = {ty: comp.encode_prompt([prompt.prompt(ty)]) for ty in (*prompt.types, None)}
    item = rmp_batch(data, rcfg, 0, 0, False, rcfg.t_range, (4, comp.latent_size, comp.latent_size))

    def rmp_step():
        rmp_opt.zero_grad(set_to_none=True)
        for p in comp.unet.parameters():
            p.requires_grad_(False)
        accumulate_gradients(lambda it: rmp_batch_loss(comp, rmp, *it, e_cache, rcfg), [item], engine, 1)
        engine.step(rmp_opt)
        for p in comp.unet.parameters():
            p.requires_grad_(True)

    med = timed({"plain SD fine-tuning step": plain_step, "SeaS step": lambda: trainer.step([(batch, t, eps)]),
                 "RMP step": rmp_step}, repeats, device)
    accum = int(method.train.grad_accum), int(rcfg.grad_accum)
    hours = (accum[0] * med["SeaS step"] + accum[1] * med["RMP step"]) * 800 * MVTEC_AD_TYPES / 3600
    return {"precision": precision, "median_s": med, "ratio": med["SeaS step"] / med["plain SD fine-tuning step"],
            "peak_gib": {k: PEAK_GIB.get(k) for k in med}, "mvtec_ad_15_products_hours": hours}


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
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=list(PRECISION))
    ap.add_argument("--experiment", default="auto",
                    help="method overrides from configs/experiment/<name>.yaml; auto: seas_synthetic for mini")
    ap.add_argument("--gen-batch", type=int, default=1, help="images per sampling call")
    ap.add_argument("--skip", nargs="*", default=[], choices=["training", "generation"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    experiment = ("seas_synthetic" if args.model == "mini" else None) if args.experiment == "auto" else args.experiment
    method = method_config(experiment)
    result = {"model": args.model, "experiment": experiment, "device": str(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "repeats": args.repeats, "runs": {}}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    print(f"SeaS speed, model {args.model} (method overrides: {experiment or 'none'}), {result.get('gpu', device)}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for precision in args.precisions:
        run = result["runs"][precision] = {}
        print(f"[{precision}]")
        if "training" not in args.skip:
            run["training"] = tr = bench_training(args.model, args.repeats, device, method, precision)
            for k, v in tr["median_s"].items():
                mem = f"   peak {tr['peak_gib'][k]:.2f} GiB" if tr["peak_gib"].get(k) is not None else ""
                print(f"  {k:34} {v:8.4f} s{mem}")
            print(f"  SeaS / plain training step          {tr['ratio']:8.3f}x   (target <= 1.25x)")
            print(f"  15 MVTec AD products, both stages   {tr['mvtec_ad_15_products_hours']:8.2f} h  (paper: 73 h, A100)")
        if "generation" not in args.skip:
            run["generation"] = ge = bench_generation(args.model, args.repeats, device, PRECISION[precision][1],
                                                      method, args.gen_batch)
            for k, v in ge["per_image_s"].items():
                print(f"  {k:34} {v:8.4f} s per image (batch {args.gen_batch})")
            print(f"  SeaS / floor (same decodes)         {ge['ratio']:8.3f}x   (target <= 1.15x)")
            print(f"  SeaS / floor (25 calls + 1 decode)  {ge['ratio_vs_single_decode_floor']:8.3f}x")
    if "fp32" in result["runs"] and len(result["runs"]) > 1:
        ref = result["runs"]["fp32"]
        for precision, run in result["runs"].items():
            if precision == "fp32":
                continue
            ratios = {}
            for part in ("training", "generation"):
                if part in run:
                    key = "median_s"
                    ratios[part] = {k: run[part][key][k] / ref[part][key][k] for k in run[part][key]}
            run["time_vs_fp32"] = ratios
            print(f"[{precision} time / fp32 time]")
            for part, r in ratios.items():
                for k, v in r.items():
                    print(f"  {part:10} {k:34} {v:6.3f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
