"""U-Net forward with attention capture on SeaS's layers vs. a plain (SDPA) forward, in the same run.

    python benchmarks/attention_capture.py [--archs tiny mini sd_v1] [--repeats 5] [--batch 2]

Captured layers: the cross-attention of the encoder blocks at 1/2 and 1/4 of the latent size (SD v1 at 512:
down_blocks.1 and down_blocks.2, 32x32 and 16x16), which SeaS's DA loss reads. Random weights; float32.
Prints the median time of each variant and the ratio to the plain forward (target for sd_v1: <= 1.10x).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from core.diffusion import AttentionStore, attention_control, layers_at
from core.models import architecture


def bench(arch: str, repeats: int, batch: int, tokens: int | None = None) -> dict:
    spec = architecture(arch)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    L = spec["unet"]["sample_size"]
    z = torch.randn(batch, 4, L, L)
    ctx = torch.randn(batch, tokens or spec["max_length"], spec["unet"]["cross_attention_dim"])
    t = torch.tensor(500)
    layers = layers_at(unet, L, [L // 2, L // 4], parts=("down_blocks",))
    variants = {
        "plain (SDPA)": lambda: unet(z, t, ctx),
        "capture token softmax": lambda: _captured(unet, layers, "token", z, t, ctx),
        "capture spatial softmax": lambda: _captured(unet, layers, "spatial", z, t, ctx),
    }
    times = {k: [] for k in variants}
    with torch.no_grad():
        for f in variants.values():
            f()  # warm-up
        for _ in range(repeats):  # interleaved, so drift hits every variant alike
            for k, f in variants.items():
                s = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - s)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain (SDPA)"]
    return {"arch": arch, "layers": len(layers), "median_s": med, "ratio": {k: v / base for k, v in med.items()}}


def _captured(unet, layers, softmax, z, t, ctx):
    store = AttentionStore(softmax=softmax)
    with attention_control(unet, layers, store):
        return unet(z, t, ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["tiny", "mini", "sd_v1"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'arch':8} {'variant':26} {'median s':>10} {'ratio':>7}")
    for arch in args.archs:
        r = bench(arch, args.repeats, args.batch)
        for k, v in r["median_s"].items():
            print(f"{arch:8} {k:26} {v:10.4f} {r['ratio'][k]:7.3f}x   ({r['layers']} captured layers)")


if __name__ == "__main__":
    main()
