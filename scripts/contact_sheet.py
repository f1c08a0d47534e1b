"""Write a PNG grid (images with mask overlays) of any MVTec-layout folder.

    python scripts/contact_sheet.py root=data/synthetic/seed0_res128 product=bottle out=bottle.png
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from core.data import DatasetError, load_folder
from core.data.visualize import contact_sheet


@hydra.main(version_base="1.3", config_path="../configs", config_name="contact_sheet")
def main(cfg: DictConfig) -> None:
    out = None
    try:
        if OmegaConf.is_missing(cfg, "root") or not str(cfg.root).strip():
            raise DatasetError("root is required (the MVTec-layout folder to show). Fix: add root=<folder>, e.g. "
                               "root=data/synthetic/seed0_res128 product=bottle.")
        table = load_folder(cfg.root, cfg.product)
        out = cfg.out or str(Path(cfg.root) / "contact_sheet.png")
        print(contact_sheet(table, out, per_row=cfg.per_row, cell=cfg.cell))
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: cannot {'write the contact sheet to ' + out if out else 'read ' + str(cfg.root)} "
              f"({e.strerror or e}). Fix: pass out=<a writable path> and a readable root=.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
