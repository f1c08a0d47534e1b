"""Tiny dataset trees in each real layout, written by the tests (anomalib-style dummy datasets).

Every anomalous image has a white square; its mask marks that square (with the dataset's own pixel
values: 255 for MVTec, class ids for VisA, per-defect values for LOCO), so tests can check that a
mask lines up with its defect after loading.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 16


def image(seed: int, gray: bool = False, defect: tuple[int, int, int] | None = None, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = rng.integers(40, 120, (size, size) if gray else (size, size, 3)).astype(np.uint8)
    if defect:
        y, x, s = defect
        arr[y:y + s, x:x + s] = 255
    return arr


def mask(defect: tuple[int, int, int], value: int = 255, size: int = SIZE) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    y, x, s = defect
    m[y:y + s, x:x + s] = value
    return m


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def defect_at(i: int) -> tuple[int, int, int]:
    return (2 + i % 8, 3 + (i * 3) % 8, 4)


def mvtec_ad(root: Path, products=("widget", "gridlike"), n_train=4, n_test_good=2, types=("scratch", "hole"),
             n_per_type=3, gray_products=("gridlike",), variant: int = 0) -> Path:
    """An MVTec-layout tree; ``variant`` != 0 draws other images (a "generated" folder must not be a copy of the
    dataset's test images: eval_downstream refuses one that is)."""
    for p in products:
        gray = p in gray_products
        for i in range(n_train):
            save(root / p / "train" / "good" / f"{i:03d}.png", image(variant + i, gray))
        for i in range(n_test_good):
            save(root / p / "test" / "good" / f"{i:03d}.png", image(variant + 100 + i, gray))
        for t in types:
            for i in range(n_per_type):
                d = defect_at(i)
                save(root / p / "test" / t / f"{i:03d}.png", image(variant + 200 + i, gray, d))
                save(root / p / "ground_truth" / t / f"{i:03d}_mask.png", mask(d))
    return root


def visa(root: Path, objects=("pcb9", "candle"), n_normal_train=4, n_normal_test=2, n_anomaly=3) -> Path:
    rows = [("object", "split", "label", "image", "mask")]
    for o in objects:
        base = Path(o) / "Data"
        for i in range(n_normal_train + n_normal_test):
            rel = base / "Images" / "Normal" / f"{i:04d}.JPG"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image(i)).save(root / rel, format="JPEG")
            rows.append((o, "train" if i < n_normal_train else "test", "normal", str(rel), ""))
        for i in range(n_anomaly):
            d = defect_at(i)
            rel = base / "Images" / "Anomaly" / f"{i:03d}.JPG"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image(300 + i, defect=d)).save(root / rel, format="JPEG")
            mrel = base / "Masks" / "Anomaly" / f"{i:03d}.png"
            save(root / mrel, mask(d, value=1 + i % 3))  # class ids, not 255
            rows.append((o, "test", "anomaly", str(rel), str(mrel)))
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def mvtec_3d(root: Path, products=("bagel",), n_train=3, n_val=2, types=("crack", "hole"), n_per_type=3) -> Path:
    for p in products:
        for split, n in (("train", n_train), ("validation", n_val)):
            for i in range(n):
                save(root / p / split / "good" / "rgb" / f"{i:03d}.png", image(i + (50 if split == "validation" else 0)))
                (root / p / split / "good" / "xyz").mkdir(parents=True, exist_ok=True)
        for i in range(2):
            save(root / p / "test" / "good" / "rgb" / f"{i:03d}.png", image(100 + i))
            save(root / p / "test" / "good" / "gt" / f"{i:03d}.png", np.zeros((SIZE, SIZE), np.uint8))
        for t in types:
            for i in range(n_per_type):
                d = defect_at(i)
                save(root / p / "test" / t / "rgb" / f"{i:03d}.png", image(200 + i, defect=d))
                save(root / p / "test" / t / "gt" / f"{i:03d}.png", mask(d))
    return root


def mvtec_loco(root: Path, products=("breakfast_box",), n_train=3, n_val=2, n_per_kind=2) -> Path:
    for p in products:
        for split, n in (("train", n_train), ("validation", n_val)):
            for i in range(n):
                save(root / p / split / "good" / f"{i:03d}.png", image(i))
        for i in range(2):
            save(root / p / "test" / "good" / f"{i:03d}.png", image(100 + i))
        for kind in ("logical_anomalies", "structural_anomalies"):
            for i in range(n_per_kind):
                d1, d2 = (1, 1, 4), (9, 9, 5)
                arr = image(200 + i, defect=d1)
                arr[d2[0]:d2[0] + d2[2], d2[1]:d2[1] + d2[2]] = 255
                save(root / p / "test" / kind / f"{i:03d}.png", arr)
                save(root / p / "ground_truth" / kind / f"{i:03d}" / "000.png", mask(d1, value=2))
                save(root / p / "ground_truth" / kind / f"{i:03d}" / "001.png", mask(d2, value=7))
    return root
