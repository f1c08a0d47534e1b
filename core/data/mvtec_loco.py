"""MVTec LOCO AD: several masks per anomalous image, unioned with ``> 0``.

    <root>/<product>/{train,validation}/good/*.png
    <root>/<product>/test/{good,logical_anomalies,structural_anomalies}/NNN.png
    <root>/<product>/ground_truth/<kind>/NNN/{000,001,...}.png
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .table import GOOD, DatasetError, Sample, list_images, require_root, select_products, type_folders

LAYOUT = "<root>/<product>/{train,validation,test}/<type>/*.png and <root>/<product>/ground_truth/<type>/<stem>/*.png"


def load_mvtec_loco(root: str | Path, products: Iterable[str] | str | None = None) -> list[Sample]:
    root = require_root(root, LAYOUT)
    available = [p.name for p in root.iterdir() if p.is_dir() and (p / "train" / GOOD).is_dir()]
    rows: list[Sample] = []
    for product in select_products(available, products, root):
        pdir = root / product
        for split, atype, images in type_folders(pdir, ("train", "validation", "test")):
            for img in images:
                if atype == GOOD:
                    rows.append(Sample(str(img), split, product, GOOD, 0))
                    continue
                mdir = pdir / "ground_truth" / atype / img.stem
                masks = list_images(mdir)
                if not masks:
                    raise DatasetError(
                        f"Anomalous image '{img}' has no mask; expected one or more PNGs in '{mdir}'. "
                        f"Fix: add them or remove the image."
                    )
                rows.append(Sample(str(img), split, product, atype, 1, tuple(str(m) for m in masks)))
        gt_root = pdir / "ground_truth"
        if gt_root.is_dir():
            stems = {(s.anomaly_type, Path(s.path).stem) for s in rows if s.product == product}
            for kind in sorted(d for d in gt_root.iterdir() if d.is_dir()):
                for mdir in sorted(d for d in kind.iterdir() if d.is_dir()):
                    if (kind.name, mdir.name) not in stems:
                        raise DatasetError(
                            f"Mask folder '{mdir}' has no image; expected '{pdir / 'test' / kind.name / (mdir.name + '.png')}'. "
                            f"Fix: add the image or remove the masks."
                        )
    return rows
