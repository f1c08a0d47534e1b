"""Build the synthetic world in MVTec AD layout (deterministic from the seed) and its contact sheet.

    python scripts/make_synthetic.py out_dir=data/synthetic/seed0_res128 seed=0 resolution=128
"""
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from core.data import load_mvtec_ad
from core.data.synthetic import ALL_PRODUCTS, BENCHMARK_PRODUCTS, PRETRAIN_PRODUCTS, WorldConfig, build_world
from core.data.visualize import contact_sheet


def make_synthetic(out_dir: str, seed: int = 0, resolution: int = 128, n_train_good: int = 200, n_test_good: int = 30,
                   n_per_type: int = 15, products=None, workers: int | None = None, sheet: bool = True) -> Path:
    cfg = WorldConfig(seed=seed, resolution=resolution, n_train_good=n_train_good, n_test_good=n_test_good,
                      n_per_type=n_per_type, products=tuple(products) if products else ALL_PRODUCTS)
    t0 = time.time()
    out = build_world(out_dir, cfg, workers=workers)
    print(f"synthetic world: {out}  ({time.time() - t0:.1f} s)")
    print(f"  pretraining products: {', '.join(PRETRAIN_PRODUCTS)}")
    print(f"  benchmark products:   {', '.join(BENCHMARK_PRODUCTS)}")
    if sheet:
        png = contact_sheet(load_mvtec_ad(out), out / "contact_sheet.png", per_row=6, cell=96)
        print(f"  contact sheet: {png}")
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="make_synthetic")
def main(cfg: DictConfig) -> None:
    try:
        make_synthetic(cfg.out_dir, cfg.seed, cfg.resolution, cfg.n_train_good, cfg.n_test_good, cfg.n_per_type,
                       list(cfg.products) if cfg.products else None, cfg.workers, cfg.contact_sheet)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
