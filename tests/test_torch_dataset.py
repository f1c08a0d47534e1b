"""Paired transforms keep image, mask and paired normal aligned, and masks binary."""
import numpy as np
import torch

import trees
from core.data import load_mvtec_ad
from core.data.torch_dataset import AnomalyDataset, PairedTransform


def test_paired_augmentation_keeps_mask_on_defect(tmp_path):
    table = load_mvtec_ad(trees.mvtec_ad(tmp_path / "m", products=("widget",), n_per_type=6))
    anomalies = [s for s in table if s.label == 1]
    normals = [s for s in table if s.label == 0]
    ds = AnomalyDataset(anomalies, PairedTransform(size=32, hflip=True, vflip=True, rot90=True), paired_normals=normals, seed=1)
    seen_rot = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            img, m, n = item["image"], item["mask"], item["normal"]
            assert img.shape == (3, 32, 32) and m.shape == (1, 32, 32) and n.shape == (3, 32, 32)
            assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
            # the defect is the white square: the mask covers exactly the near-white pixels
            # (bilinear upsampling blends its border; the background is < 0.5)
            white, mb = img.min(0).values > 0.6, m[0] > 0
            assert (white & mb).sum() / (white | mb).sum() > 0.8
            seen_rot.add(tuple(torch.nonzero(m[0])[0].tolist()))
    assert len(seen_rot) > 6  # augmentation actually varies


def test_same_seed_same_epoch_reproduces(tmp_path):
    table = load_mvtec_ad(trees.mvtec_ad(tmp_path / "m", products=("widget",)))
    t = PairedTransform(hflip=True, vflip=True, rot90=True)
    a, b = AnomalyDataset(table, t, seed=5), AnomalyDataset(table, t, seed=5)
    for i in range(len(a)):
        assert torch.equal(a[i]["image"], b[i]["image"])


def test_normal_items_have_empty_masks(tmp_path):
    table = load_mvtec_ad(trees.mvtec_ad(tmp_path / "m", products=("widget",)))
    item = AnomalyDataset([s for s in table if s.label == 0])[0]
    assert item["mask"].sum() == 0 and item["label"] == 0


def test_each_epoch_draws_new_augmentations(tmp_path):
    table = load_mvtec_ad(trees.mvtec_ad(tmp_path / "m", products=("widget",)))
    ds = AnomalyDataset([s for s in table if s.label == 1], PairedTransform(hflip=True, vflip=True, rot90=True), seed=5)
    views = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        views.append(ds[0]["mask"])
    assert any(not torch.equal(views[0], v) for v in views[1:])
