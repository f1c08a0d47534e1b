"""MVTec 3D-AD: RGB images and ground truth only (xyz point clouds are ignored).

    <root>/<product>/{train,validation}/good/rgb/NNN.png
    <root>/<product>/test/{good,<type>}/rgb/NNN.png
    <root>/<product>/test/<type>/gt/NNN.png          (test/good/gt holds all-zero masks; unused)
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .table import GOOD, DatasetError, Sample, list_images, require_root, select_products, type_folders

LAYOUT = "<root>/<product>/{train,validation}/good/rgb/*.png and <root>/<product>/test/<type>/{rgb,gt}/*.png"


def load_mvtec_3d(root: str | Path, products: Iterable[str] | str | None = None) -> list[Sample]:
    root = require_root(root, LAYOUT)
    available = [p.name for p in root.iterdir() if p.is_dir() and (p / "train" / GOOD / "rgb").is_dir()]
    rows: list[Sample] = []
    for product in select_products(available, products, root):
        pdir = root / product
        for split, atype, images in type_folders(pdir, ("train", "validation", "test"), "rgb"):
            type_dir = pdir / split / atype
            gt_dir = type_dir / "gt"
            for img in images:
                if atype == GOOD:
                    rows.append(Sample(str(img), split, product, GOOD, 0))
                    continue
                mask = gt_dir / f"{img.stem}.png"
                if not mask.is_file():
                    raise DatasetError(f"Anomalous image '{img}' has no mask; expected '{mask}'. Fix: add it or remove the image.")
                rows.append(Sample(str(img), split, product, atype, 1, (str(mask),)))
            if atype != GOOD and gt_dir.is_dir():
                stems = {p.stem for p in images}
                for m in list_images(gt_dir):
                    if m.stem not in stems:
                        raise DatasetError(f"Mask '{m}' has no image; expected '{type_dir / 'rgb' / m.name}'. Fix: add it or remove the mask.")
    return rows
