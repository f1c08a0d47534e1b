"""Train the world CLIP on the mini prior's corpus and write its report and model card.

    python scripts/train_world_clip.py                    # reproduces core/models/world_clip (resumes if killed)
    python scripts/train_world_clip.py stage=report       # zero-shot accuracy on the benchmark tree + model card
    python scripts/train_world_clip.py smoke=true out_dir=/tmp/clip work_dir=/tmp/clip_work   # smoke run
"""
from pathlib import Path

import hydra
from omegaconf import DictConfig

from core.cli import run_resolved, smoke_config
from core.models.clip_report import CLIP_DEBUG_OVERRIDES, train, write_report


def run(cfg: dict) -> dict:
    cfg = smoke_config(cfg, CLIP_DEBUG_OVERRIDES)
    out_dir, work_dir = Path(cfg["out_dir"]), Path(cfg["work_dir"])
    report = {}
    if cfg["stage"] in ("all", "train"):
        report["training"] = train(cfg, out_dir, work_dir)
    if cfg["stage"] in ("all", "report"):
        report["report"] = write_report(cfg, out_dir, work_dir)
    return report


@hydra.main(version_base="1.3", config_path="../configs", config_name="world_clip")
def main(cfg: DictConfig) -> None:
    run_resolved(run, cfg)


if __name__ == "__main__":
    main()
