"""A stand-in method for testing the entry points: records what it was called with."""
from pathlib import Path


def train(cfg, run_dir: Path) -> Path:
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "trained_on.txt").write_text(f"{cfg.product} {cfg.model.name} {cfg.split.name}")
    return ckpt


def generate(cfg, checkpoint, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "generated_from.txt").write_text(f"{checkpoint} {cfg.product} {cfg.model.name} {cfg.n_per_type}")
    return out_dir
