"""python scripts/eval_generation.py ... (see configs/eval_generation.yaml). ``--cfg job`` prints the composed config."""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from core.cli import check_path_overrides, exit_on_user_error
from segmentation.protocols import eval_generation


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval_generation")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        eval_generation(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    check_path_overrides(sys.argv[1:])   # before Hydra creates its run directory
    main()
