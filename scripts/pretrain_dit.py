"""Pretrain the mini DiT prior (the synthetic world's stand-in for ImageNet DiT-XL/2, which DefectDiffu starts from).

    python scripts/pretrain_dit.py                                   # core/models/mini_dit, resumable
    python scripts/pretrain_dit.py device=cuda train.batch=64         # on a GPU
    python scripts/pretrain_dit.py smoke=true out_dir=/tmp/dit work_dir=/tmp/dit_work   # smoke run (tiny prior)
"""
import json

import hydra
from omegaconf import DictConfig

from core.cli import run_resolved, smoke_config
from core.models.pretrain_dit import pretrain_dit

SMOKE = {"prior": {"kind": "tiny"}, "threads": None,
         "corpus_config": {"seed": 0, "resolution": 64,
                           "corpus": {"normal_products": ["metal_nut", "bottle"], "defect_products": ["metal_nut"],
                                      "normal_per_product": 2, "defect_per_product": 2}},
         "architecture": {"hidden_size": 24, "depth": 2, "num_heads": 2},
         "train": {"steps": 3, "batch": 2, "warmup": 1, "checkpoint_every": 2}}


def run(cfg: dict) -> dict:
    cfg = smoke_config(cfg, SMOKE)
    report = pretrain_dit(cfg, cfg["out_dir"], cfg["work_dir"])
    print(json.dumps(report, indent=2))
    return report


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain_dit")
def main(cfg: DictConfig) -> None:
    run_resolved(run, cfg)


if __name__ == "__main__":
    main()
