"""DefectDiffu generation cost against its floor, measured in the same run (ratios, not wall-clock limits).

    python benchmarks/defectdiffu_speed.py [--run runs/dd | --size mini|tiny] [--steps 50] [--batch 4]
                                           [--repeats 3] [--device cpu] [--out result.json]

One batch of ``generate``'s loop with double-free guidance (three branches per step in one DefectDiT call, the mask
features of the last ``mask_last_steps`` steps averaged, the image and the mask decoded by the VAE, isodata) against
its floor: the same ``steps`` DefectDiT calls on 3 x batch rows plus one VAE decode of the images, nothing else. The
difference is the mask's cost (its averaging, a second VAE decode, the threshold). With ``--run`` the run's model;
otherwise a random DefectDiT of the mini DiT's size (``configs/pretrain_dit.yaml``) or a tiny one (the time does not
depend on the weights). Variants interleaved, medians reported.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from core.diffusion import inference_scheduler
from core.models import build_random, load_model
from core.timing import device_name, median_seconds
from defectdiffu.method import binary_masks, guided_eps
from defectdiffu.model import DefectDiT, average_masks

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None)
    ap.add_argument("--size", default="mini", choices=["mini", "tiny"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--mask-last-steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.run:
        cfg = OmegaConf.load(Path(a.run) / "config.yaml")
        comp = load_model(cfg.model)
        model = DefectDiT.load(Path(a.run) / "model")
    elif a.size == "mini":
        comp = load_model({"kind": "mini", "version": 2})
        arch = OmegaConf.load(REPO / "configs" / "pretrain_dit.yaml").architecture
        model = DefectDiT(groups=(4, 5, 3), text_dim=128, input_size=comp.latent_size, patch_size=arch.patch_size,
                          in_channels=4, hidden_size=arch.hidden_size, num_heads=arch.num_heads,
                          learn_sigma=arch.learn_sigma)
    else:
        comp = build_random("tiny")
        model = DefectDiT(groups=(1, 2, 1), text_dim=16, input_size=comp.latent_size, hidden_size=32, num_heads=2)
    comp.to(device)
    model.to(device).eval()
    B = a.batch
    sched = inference_scheduler(comp.scheduler.config, "ddim", "leading")
    sched.set_timesteps(a.steps)
    g = torch.Generator().manual_seed(0)
    y = {k: torch.nn.functional.normalize(torch.randn(3 * B, model.text_dim, generator=g), dim=-1).to(device)
         for k in ("product", "defect", "fusion")}
    z0 = torch.randn(B, model.in_channels, comp.latent_size, comp.latent_size, generator=g).to(device)

    @torch.no_grad()
    def method():
        z, rec = z0, []
        for j, t in enumerate(sched.timesteps):
            eps, mf = guided_eps(model, z, torch.full((B,), int(t), device=device), y, "double_free", 1.0, 2.0, 1.0)
            if j >= a.steps - a.mask_last_steps:
                rec.append(mf)
            z = sched.step(eps, t, z).prev_sample
        comp.decode_latents(z)
        binary_masks(comp, average_masks(rec))

    @torch.no_grad()
    def floor():
        z = z0
        for t in sched.timesteps:
            out = model(z.repeat(3, 1, 1, 1), torch.full((3 * B,), int(t), device=device), y["product"], y["defect"],
                         y["fusion"])[0]
            z = sched.step(out[:B, :model.in_channels], t, z).prev_sample
        comp.decode_latents(z)

    fns = {"floor": floor, "method": method}
    med = median_seconds(fns, a.repeats, device)
    res = {"device": device_name(device),
           "threads": torch.get_num_threads(), "model": a.run or a.size, "steps": a.steps, "batch": B,
           "parameters": sum(p.numel() for p in model.parameters()),
           "seconds_per_image": {k: v / B for k, v in med.items()}, "ratio_to_floor": med["method"] / med["floor"]}
    print(f"DefectDiffu generation ({res['model']}, {res['parameters'] / 1e6:.1f} M parameters), {a.steps} DDIM steps, "
          f"batch {B}, {res['device']} ({res['threads']} threads): {res['seconds_per_image']['method']:.3f} s / image, "
          f"floor {res['seconds_per_image']['floor']:.3f}, {res['ratio_to_floor']:.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
