"""Pretrain the mini prior (VAE, CLIP text encoder, conditional U-Net) on the synthetic world's pretraining products.

    python scripts/pretrain_prior.py                      # reproduces core/models/mini_prior (about 2 h 15 min, 2 cores)
    python scripts/pretrain_prior.py stage=train          # stages 1-2 only (VAE, U-Net + text encoder)
    python scripts/pretrain_prior.py stage=finetune       # stage 3 only (offset noise), on the stage-2 prior in out_dir
    python scripts/pretrain_prior.py stage=report         # VAE error, sample grid, world-CLIP evaluation, model card
    python scripts/pretrain_prior.py stage=card           # the model card again from report.json (no sampling)
    python scripts/pretrain_prior.py smoke=true out_dir=/tmp/prior work_dir=/tmp/prior_work   # smoke run

Rerunning after an interruption resumes each stage from its checkpoint in ``work_dir``.
"""
import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from core.cli import run_resolved, smoke_config
from core.models.prior_report import DEBUG_OVERRIDES, rewrite_card, write_report
from core.models.pretrain import finetune, pretrain


def run(cfg: dict) -> dict:
    cfg = smoke_config(cfg, DEBUG_OVERRIDES)
    out_dir, work_dir = Path(cfg["out_dir"]), Path(cfg["work_dir"])
    report = {}
    if cfg["stage"] in ("all", "train"):
        report["training"] = pretrain(cfg, out_dir, work_dir)
        (work_dir / "training_report.json").write_text(json.dumps(report["training"], indent=2))
        print(json.dumps(report["training"], indent=2))
    if cfg["stage"] in ("all", "finetune"):
        report["finetune"] = finetune(cfg, out_dir, work_dir)
        if report["finetune"]:
            (work_dir / "finetune_report.json").write_text(json.dumps(report["finetune"], indent=2))
            print(json.dumps(report["finetune"], indent=2))
    if cfg["stage"] in ("all", "report"):
        report["report"] = write_report(cfg, out_dir, work_dir)
    if cfg["stage"] == "card":
        print(rewrite_card(cfg, out_dir))
    return report


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain_prior")
def main(cfg: DictConfig) -> None:
    run_resolved(run, cfg)


if __name__ == "__main__":
    main()
