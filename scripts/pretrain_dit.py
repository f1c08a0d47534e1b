"""Pretrain the mini DiT prior (the synthetic world's stand-in for ImageNet DiT-XL/2, which DefectDiffu starts from).

    python scripts/pretrain_dit.py                                   # core/models/mini_dit, resumable
    python scripts/pretrain_dit.py device=cuda train.batch=64         # on a GPU
    python scripts/pretrain_dit.py smoke=true out_dir=/tmp/dit work_dir=/tmp/dit_work   # smoke run (tiny prior)
"""
import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from core.models.pretrain_dit import pretrain_dit

SMOKE = {"prior": {"kind": "tiny"}, "threads": None,
         "corpus_config": {"seed": 0, "resolution": 64,
                           "corpus": {"normal_products": ["metal_nut", "bottle"], "defect_products": ["metal_nut"],
                                      "normal_per_product": 2, "defect_per_product": 2}},
         "architecture": {"hidden_size": 24, "depth": 2, "num_heads": 2},
         "train": {"steps": 3, "batch": 2, "warmup": 1, "checkpoint_every": 2}}


def run(cfg: dict) -> dict:
    if cfg["smoke"]:
        cfg = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(cfg), OmegaConf.create(SMOKE)))
    report = pretrain_dit(cfg, cfg["out_dir"], cfg["work_dir"])
    print(json.dumps(report, indent=2))
    return report


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain_dit")
def main(cfg: DictConfig) -> None:
    try:
        run(OmegaConf.to_container(cfg, resolve=True))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
