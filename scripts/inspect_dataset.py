"""Print per product and split the image counts per anomaly type; exit 2 with the validation error on a bad tree.

    python scripts/inspect_dataset.py dataset=mvtec_ad dataset.root=/data/mvtec_ad product=bottle split=one_third
    python scripts/inspect_dataset.py format=json          # the synthetic world (built on first use)
"""
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from core.data import DatasetError
from core.data.inspect import format_counts, inspect_counts


@hydra.main(version_base="1.3", config_path="../configs", config_name="inspect_dataset")
def main(cfg: DictConfig) -> None:
    products = OmegaConf.to_object(cfg.product) if OmegaConf.is_list(cfg.product) else cfg.product
    try:
        format_counts({}, cfg.format)   # a bad format= fails before the dataset is read
        c = inspect_counts(cfg.dataset, cfg.split, products, cfg.validate)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_counts(c, cfg.format))


if __name__ == "__main__":
    main()
