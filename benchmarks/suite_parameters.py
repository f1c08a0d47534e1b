"""Parameter counts of the SeaS downstream suite as configured (configs/downstream/*.yaml), beside the papers'.

    python benchmarks/suite_parameters.py [--image-size 128]

Trainable: what the optimiser updates; frozen: the backbone or teacher (GLASS, HVQ-Trans, MambaAD). Random weights
(nothing is loaded); the counts do not depend on them.
"""
from __future__ import annotations

import argparse

from omegaconf import OmegaConf

PAPERS = {"lfd": "0.94 M (LFD-RoadSeg, arXiv:2402.02430; SeaS Tab. 26)", "glass": "not stated",
          "hvqtrans": "not stated", "mambaad": "25.7 M (MambaAD, arXiv:2404.06564, its complexity comparison; recalled, the PDF was not at hand)"}


def counts(model) -> tuple[int, int]:
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, sum(p.numel() for p in model.parameters()) - train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=128)
    a = ap.parse_args()
    from segmentation.glass import GLASS
    from segmentation.models import build_segmenter
    from segmentation.protocols import build_reconstruction

    rows = []
    for name in ("lfd", "glass", "hvqtrans", "mambaad"):
        d = OmegaConf.load(f"configs/downstream/{name}.yaml")
        if name == "lfd":
            model = build_segmenter(d)
        elif name == "glass":
            model = GLASS(str(d.backbone), None, tuple(d.layers), int(d.preprocess_dim), int(d.target_dim),
                          int(d.proj_layers), int(d.dsc_layers), int(d.dsc_hidden))
        else:
            model = build_reconstruction(OmegaConf.create({"downstream": d, "seed": 0}), a.image_size, 5)
        rows.append((name, *counts(model)))
    print("| model | trainable | frozen | total | paper |\n|---|---|---|---|---|")
    for name, t, f in rows:
        print(f"| {name} | {t / 1e6:.2f} M | {f / 1e6:.2f} M | {(t + f) / 1e6:.2f} M | {PAPERS[name]} |")


if __name__ == "__main__":
    main()
