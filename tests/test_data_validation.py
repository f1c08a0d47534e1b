"""Every bad-input case fails with one clear error that names the path and the fix."""
import os

import numpy as np
import pytest

import trees
from core.data import DatasetError, load_dataset, load_mvtec_3d, load_mvtec_loco, load_visa


def _mvtec(tmp_path):
    return trees.mvtec_ad(tmp_path / "mvtec", products=("widget",))


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match=r"(?s)does not exist.*dataset.root"):
        load_dataset("mvtec_ad", tmp_path / "nowhere")


def test_unknown_product_lists_available(tmp_path):
    root = trees.mvtec_ad(tmp_path / "m")
    with pytest.raises(DatasetError, match="Available: gridlike, widget"):
        load_dataset("mvtec_ad", root, "bottle")


def test_image_without_mask(tmp_path):
    root = _mvtec(tmp_path)
    os.remove(root / "widget/ground_truth/hole/001_mask.png")
    with pytest.raises(DatasetError, match=r"test/hole/001.png' has no mask.*001_mask.png"):
        load_dataset("mvtec_ad", root)


def test_mask_without_image(tmp_path):
    root = _mvtec(tmp_path)
    os.remove(root / "widget/test/scratch/002.png")
    with pytest.raises(DatasetError, match=r"002_mask.png' has no image"):
        load_dataset("mvtec_ad", root)


def test_corrupt_image(tmp_path):
    root = _mvtec(tmp_path)
    (root / "widget/train/good/001.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"Cannot read image .*train/good/001.png"):
        load_dataset("mvtec_ad", root)


def test_truncated_image(tmp_path):
    root = _mvtec(tmp_path)
    p = root / "widget/test/good/000.png"
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(DatasetError, match=r"Cannot read image .*test/good/000.png"):
        load_dataset("mvtec_ad", root)


def test_mask_size_differs_from_image(tmp_path):
    root = _mvtec(tmp_path)
    trees.save(root / "widget/ground_truth/hole/000_mask.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"000_mask.png' is 8x8 but its image .* is 16x16"):
        load_dataset("mvtec_ad", root)


def test_empty_anomaly_type(tmp_path):
    root = _mvtec(tmp_path)
    (root / "widget/test/bent").mkdir()
    with pytest.raises(DatasetError, match=r"test/bent' holds no images"):
        load_dataset("mvtec_ad", root)


def test_visa_missing_csv_and_missing_mask(tmp_path):
    root = trees.visa(tmp_path / "v")
    os.remove(root / "candle/Data/Masks/Anomaly/001.png")
    with pytest.raises(DatasetError, match=r"001.JPG' .* has no mask"):
        load_visa(root)
    os.remove(root / "split_csv/1cls.csv")
    with pytest.raises(DatasetError, match=r"1cls.csv' not found"):
        load_visa(root)


def test_visa_mask_without_row(tmp_path):
    root = trees.visa(tmp_path / "v")
    trees.save(root / "pcb9/Data/Masks/Anomaly/099.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(DatasetError, match=r"099.png' has no image"):
        load_visa(root)


def test_mvtec_3d_missing_gt(tmp_path):
    root = trees.mvtec_3d(tmp_path / "m3")
    os.remove(root / "bagel/test/crack/gt/001.png")
    with pytest.raises(DatasetError, match=r"rgb/001.png' has no mask"):
        load_mvtec_3d(root)


def test_loco_missing_and_orphan_masks(tmp_path):
    root = trees.mvtec_loco(tmp_path / "l")
    trees.save(root / "breakfast_box/ground_truth/logical_anomalies/077/000.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(DatasetError, match=r"077' has no image"):
        load_mvtec_loco(root)
    root2 = trees.mvtec_loco(tmp_path / "l2")
    for f in (root2 / "breakfast_box/ground_truth/structural_anomalies/001").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"001.png' has no mask"):
        load_mvtec_loco(root2)
