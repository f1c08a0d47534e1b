"""Fit a method to a product: python scripts/train.py method=seas product=bottle [dataset=... model=...]

The checkpoint and the resolved config go to the run directory (hydra.run.dir=... sets it).
``--cfg job`` prints the composed config without running.
"""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from core.cli import check_path_overrides, exit_on_user_error
from core.runs import train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with exit_on_user_error():
        out = train(cfg, run_dir)
        print(f"checkpoint: {out}")


if __name__ == "__main__":
    check_path_overrides(sys.argv[1:])   # before Hydra creates its run directory
    main()
