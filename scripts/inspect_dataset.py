"""Print per product and split the image counts per anomaly type; exit 2 with the validation error on a bad tree.

    python scripts/inspect_dataset.py dataset=mvtec_ad dataset.root=/data/mvtec_ad product=bottle split=one_third
    python scripts/inspect_dataset.py format=json          # the synthetic world (built on first use)
"""
import hydra
from omegaconf import DictConfig, OmegaConf

from core.cli import exit_on_user_error
from core.data.inspect import format_counts, inspect_counts


@hydra.main(version_base="1.3", config_path="../configs", config_name="inspect_dataset")
def main(cfg: DictConfig) -> None:
    products = OmegaConf.to_object(cfg.product) if OmegaConf.is_list(cfg.product) else cfg.product
    with exit_on_user_error():   # one line, exit 2: a bad tree, a bad value, a path the file system refuses
        format_counts({}, cfg.format)   # a bad format= fails before the dataset is read
        c = inspect_counts(cfg.dataset, cfg.split, products, cfg.validate)
    print(format_counts(c, cfg.format))


if __name__ == "__main__":
    main()
