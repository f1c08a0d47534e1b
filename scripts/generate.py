"""Generate anomalies + masks (+ normals): python scripts/generate.py checkpoint=<train run dir> out_dir=<dir>

Writes an MVTec-layout tree and manifest.jsonl; a rerun resumes. ``--cfg job`` prints the composed config.
"""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from core.cli import check_path_overrides, exit_on_user_error
from core.data import DatasetError
from core.runs import generate, method_of_checkpoint


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        if OmegaConf.is_missing(cfg, "out_dir") or not str(cfg.out_dir).strip():
            raise DatasetError("out_dir is required (where the generated tree and manifest go; an empty value "
                               "would mean the current directory). Fix: add out_dir=<a new folder>.")
        out = generate(cfg, Path(cfg.out_dir), HydraConfig.get().overrides.task)
        print(f"generated: {out}")


if __name__ == "__main__":
    check_path_overrides(sys.argv[1:])   # before Hydra creates its run directory
    trained_method = method_of_checkpoint(sys.argv[1:])
    if trained_method is not None:      # compose with the run's method, so that its own keys can be overridden
        sys.argv.insert(1, f"method={trained_method}")
    main()
