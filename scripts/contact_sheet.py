"""Write a PNG grid (images with mask overlays) of any MVTec-layout folder.

    python scripts/contact_sheet.py root=data/synthetic/seed0_res128 product=bottle out=bottle.png
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from core.data import DatasetError, load_folder
from core.data.visualize import contact_sheet


@hydra.main(version_base="1.3", config_path="../configs", config_name="contact_sheet")
def main(cfg: DictConfig) -> None:
    try:
        table = load_folder(cfg.root, cfg.product)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = cfg.out or str(Path(cfg.root) / "contact_sheet.png")
    print(contact_sheet(table, out, per_row=cfg.per_row, cell=cfg.cell))


if __name__ == "__main__":
    main()
