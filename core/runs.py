"""What the three entry scripts do, as plain functions the tests call (the scripts only add Hydra)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from .data import DatasetError
from .io import write_text
from .registry import get_method, load_method

CHECKPOINT_KEYS = ("method", "model", "dataset", "split", "product", "seed")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_product(cfg: DictConfig) -> str:
    """``cfg.product``, which must be set for real datasets (the synthetic world defaults to its first held-out one)."""
    product = cfg.get("product")
    if product in (None, "", "???"):
        raise DatasetError(f"product=<name> is required for dataset '{cfg.dataset.name}' (for example product=bottle).")
    return str(product)


def save_config(cfg: DictConfig, run_dir: Path, name: str = "config.yaml") -> Path:
    """The resolved config beside the run's outputs (atomic)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_text(run_dir / name, OmegaConf.to_yaml(cfg, resolve=True))


def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Check the method and product, save the resolved config in ``run_dir``, run the method's ``train``."""
    get_method(cfg.method.name)
    resolve_product(cfg)
    fn = load_method(cfg.method.name, "train")
    run_dir = shared_run_dir(cfg, run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        save_config(cfg, run_dir)
    return fn(cfg, run_dir)


def shared_run_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """Under a multi-process launch every process takes process 0's run directory (Hydra's default one carries a
    timestamp, which the processes may read a second apart)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Path(run_dir)
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    PartialState(cpu=resolve_device(str(cfg.device)).type == "cpu")
    return Path(broadcast_object_list([str(run_dir)])[0])


def merge_checkpoint_config(cfg: DictConfig, checkpoint: Path, overrides: Sequence[str]) -> DictConfig:
    """Take method / model / dataset / split / product / seed from ``<checkpoint>/config.yaml`` unless the command line
    set them (``overrides`` as Hydra records them, e.g. ``method=seas`` or ``model.path=...``)."""
    path = checkpoint / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint={checkpoint} has no config.yaml: pass the run directory that "
                                f"scripts/train.py wrote (hydra.run.dir of the training run).")
    trained = OmegaConf.load(path)
    given = {o.lstrip("+~").split("=")[0].split(".")[0] for o in overrides}
    merged = cfg.copy()
    with open_dict(merged):
        for key in CHECKPOINT_KEYS:
            if key in trained and key not in given:
                merged[key] = trained[key]
    return merged


def generate(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = ()) -> Path:
    checkpoint = Path(cfg.checkpoint).expanduser() if cfg.get("checkpoint") else None
    if checkpoint is not None:
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint={checkpoint} is not a directory: pass the run directory of train.py.")
        cfg = merge_checkpoint_config(cfg, checkpoint, overrides)
    get_method(cfg.method.name)
    resolve_product(cfg)
    fn = load_method(cfg.method.name, "generate")
    if int(os.environ.get("RANK", "0")) == 0:  # one process of a sharded launch writes the config
        from .export import claim_output_dir
        claim_output_dir(out_dir)  # before anything is written there: a folder the toolkit did not make is refused
        save_config(cfg, out_dir, "generate_config.yaml")
    return fn(cfg, checkpoint, out_dir)
