"""VisA through its official split file ``<root>/split_csv/1cls.csv``.

    header: object,split,label,image,mask   (paths relative to <root>; mask empty for normals)
    <root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG, <root>/<object>/Data/Masks/Anomaly/*.png

Raw VisA masks hold defect-class ids (1..K), binarised with ``> 0`` by ``read_mask``. VisA's 1cls split
carries no defect-type names, so every anomaly has the type ``anomaly``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable

from .table import GOOD, DatasetError, Sample, require_root, select_products

LAYOUT = "<root>/split_csv/1cls.csv and <root>/<object>/Data/{Images/{Normal,Anomaly},Masks/Anomaly}/*"
ANOMALY_TYPE = "anomaly"
FIELDS = ("object", "split", "label", "image", "mask")


def load_visa(root: str | Path, products: Iterable[str] | str | None = None, split_csv: str = "split_csv/1cls.csv") -> list[Sample]:
    root = require_root(root, LAYOUT)
    csv_path = root / split_csv
    if not csv_path.is_file():
        raise DatasetError(
            f"VisA split file '{csv_path}' not found. Expected {LAYOUT}.\n"
            f"Fix: use the official split_csv/1cls.csv shipped with VisA, or set dataset.split_csv."
        )
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in FIELDS if k not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"'{csv_path}' lacks column(s) {missing}; expected header {','.join(FIELDS)}.")
        records = list(reader)
    names = select_products({r["object"] for r in records}, products, root)
    wanted = set(names)
    rows: list[Sample] = []
    seen_images: set[str] = set()
    for line, r in enumerate(records, start=2):
        if r["object"] not in wanted:
            continue
        img = root / r["image"]
        if not img.is_file():
            raise DatasetError(f"'{csv_path}' line {line} lists image '{img}', which does not exist. Fix: restore it or the csv.")
        if str(img) in seen_images:
            raise DatasetError(f"'{csv_path}' line {line} lists image '{img}' twice.")
        seen_images.add(str(img))
        label = r["label"].strip().lower()
        if label not in ("normal", "anomaly"):
            raise DatasetError(f"'{csv_path}' line {line}: label '{r['label']}', expected 'normal' or 'anomaly'.")
        if label == "normal":
            rows.append(Sample(str(img), r["split"], r["object"], GOOD, 0))
            continue
        mask_rel = (r["mask"] or "").strip()
        mask = root / mask_rel if mask_rel else None
        if mask is None or not mask.is_file():
            raise DatasetError(
                f"Anomalous image '{img}' ('{csv_path}' line {line}) has no mask"
                + (f"; '{mask}' does not exist" if mask else "")
                + ". Fix: restore the mask from the VisA archive."
            )
        rows.append(Sample(str(img), r["split"], r["object"], ANOMALY_TYPE, 1, (str(mask),)))
    # masks on disk that no row uses
    for name in names:
        mdir = root / name / "Data" / "Masks" / "Anomaly"
        if mdir.is_dir():
            used = {Path(m).resolve() for s in rows if s.product == name for m in s.mask_paths}
            for m in sorted(mdir.iterdir()):
                if m.is_file() and m.resolve() not in used:
                    raise DatasetError(f"Mask '{m}' has no image in '{csv_path}'. Fix: add its row or remove the mask.")
    return rows
