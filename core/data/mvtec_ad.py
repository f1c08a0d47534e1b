"""MVTec AD layout, which is also the layout of the synthetic world and of every generated dataset.

    <root>/<product>/train/good/*.png
    <root>/<product>/test/{good,<type>}/*.png
    <root>/<product>/ground_truth/<type>/<stem>_mask.png      (none for good)

Grid, screw and zipper are grayscale in MVTec AD; ``read_image`` returns RGB for them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .table import GOOD, DatasetError, Sample, list_images, require_root, select_products, type_folders

LAYOUT = "<root>/<product>/{train/good, test/<type>}/*.png and <root>/<product>/ground_truth/<type>/<stem>_mask.png"


def _mask_for(gt_dir: Path, image: Path) -> Path | None:
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
        if (gt_dir / name).is_file():
            return gt_dir / name
    return None


def find_products(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir()))


def load_product(root: Path, product: str, require_train: bool = True) -> list[Sample]:
    pdir = root / product
    rows: list[Sample] = []
    train_dir = pdir / "train" / GOOD
    if require_train and not list_images(train_dir):
        raise DatasetError(f"'{train_dir}' holds no images. Expected normal training images in {LAYOUT}.")
    for split, atype, images in type_folders(pdir, ("train", "test")):
        if split == "train" and atype != GOOD:
            raise DatasetError(f"'{pdir / split / atype}': only train/good is expected under train/ in {LAYOUT}.")
        gt_dir = pdir / "ground_truth" / atype
        for img in images:
            if atype == GOOD:
                rows.append(Sample(str(img), split, product, GOOD, 0))
                continue
            mask = _mask_for(gt_dir, img)
            if mask is None:
                raise DatasetError(
                    f"Anomalous image '{img}' has no mask; expected '{gt_dir / (img.stem + '_mask.png')}'.\n"
                    f"Fix: add the mask, or remove the image."
                )
            rows.append(Sample(str(img), split, product, atype, 1, (str(mask),)))
    # masks without images
    gt_root = pdir / "ground_truth"
    if gt_root.is_dir():
        stems = {(s.anomaly_type, Path(s.path).stem) for s in rows}
        for type_dir in sorted(d for d in gt_root.iterdir() if d.is_dir()):
            for m in list_images(type_dir):
                stem = m.stem[: -len("_mask")] if m.stem.endswith("_mask") else m.stem
                if (type_dir.name, stem) not in stems:
                    raise DatasetError(
                        f"Mask '{m}' has no image; expected '{pdir / 'test' / type_dir.name / (stem + '.png')}'.\n"
                        f"Fix: add the image, or remove the mask."
                    )
    return rows


def load_mvtec_ad(root: str | Path, products: Iterable[str] | str | None = None, require_train: bool = True) -> list[Sample]:
    """Samples table of an MVTec-AD-layout tree (MVTec AD itself, the synthetic world, generated data)."""
    root = require_root(root, LAYOUT)
    names = select_products(find_products(root), products, root)
    return [s for p in names for s in load_product(root, p, require_train)]
