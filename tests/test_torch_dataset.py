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


def test_geometric_flips_the_stated_axes_of_a_non_square_tensor():
    x = torch.arange(2 * 3 * 5).view(2, 3, 5)
    t = PairedTransform()
    n = x.numpy()
    assert np.array_equal(t.geometric(x, {"h": True, "v": False, "k": 0}).numpy(), n[:, :, ::-1])
    assert np.array_equal(t.geometric(x, {"h": False, "v": True, "k": 0}).numpy(), n[:, ::-1, :])
    for k in (1, 2, 3):
        assert np.array_equal(t.geometric(x, {"h": False, "v": False, "k": k}).numpy(), np.rot90(n, k, axes=(1, 2)))
    assert np.array_equal(t.geometric(x, {"h": True, "v": True, "k": 1}).numpy(), np.rot90(n[:, ::-1, ::-1], 1, axes=(1, 2)))


def test_sample_params_draw_each_flip_independently_and_every_rotation():
    g = torch.Generator().manual_seed(0)
    draws = [PairedTransform(hflip=True, vflip=True, rot90=True).sample_params(g) for _ in range(400)]
    h = np.array([d["h"] for d in draws])
    v = np.array([d["v"] for d in draws])
    k = np.array([d["k"] for d in draws])
    assert 0.4 < h.mean() < 0.6 and 0.4 < v.mean() < 0.6 and 0.15 < (h != v).mean()
    assert sorted(set(k.tolist())) == [0, 1, 2, 3] and all(70 < (k == i).sum() < 130 for i in range(4))
    off = [PairedTransform().sample_params(g) for _ in range(50)]
    assert all(d == {"h": False, "v": False, "k": 0} for d in off)


def test_resize_to_a_non_square_size_bilinear_antialiased_for_images_and_nearest_for_masks():
    torch.manual_seed(0)
    img = torch.rand(3, 16, 20)
    mask = (torch.rand(1, 16, 20) > 0.5).float()
    t = PairedTransform(size=(8, 12))
    out = t({"image": img, "mask": mask, "normal": img.flip(-1)}, torch.Generator().manual_seed(0))
    want = torch.nn.functional.interpolate(img[None], size=(8, 12), mode="bilinear", antialias=True,
                                           align_corners=False)[0]
    assert out["image"].shape == (3, 8, 12) and torch.allclose(out["image"], want)
    assert torch.allclose(out["normal"], torch.nn.functional.interpolate(
        img.flip(-1)[None], size=(8, 12), mode="bilinear", antialias=True, align_corners=False)[0])
    assert torch.equal(out["mask"], torch.nn.functional.interpolate(mask[None], size=(8, 12), mode="nearest")[0])
    assert PairedTransform(size=8)({"image": img}, torch.Generator())["image"].shape == (3, 8, 8)
    assert PairedTransform(size=(16, 20)).resize(img, False) is img          # already at size: untouched


def test_items_name_their_fields_scale_bytes_and_draw_from_seed_epoch_and_index(tmp_path):
    from core.data.torch_dataset import to_tensor
    assert torch.equal(to_tensor(np.full((2, 3, 3), 255, np.uint8)), torch.ones(3, 2, 3))
    table = load_mvtec_ad(trees.mvtec_ad(tmp_path / "m", products=("widget",)))
    normal = [s for s in table if s.label == 0][0]
    item = AnomalyDataset([normal])[0]
    h, w = item["image"].shape[1:]
    assert item["mask"].shape == (1, h, w)
    assert set(item) == {"image", "mask", "label", "anomaly_type", "path"}
    assert item["anomaly_type"] == "good" and item["path"] == normal.path
    anomaly = [s for s in table if s.label == 1][0]
    aug = PairedTransform(hflip=True, vflip=True, rot90=True)

    def masks(ds):
        return [ds[i]["mask"] for i in range(len(ds))]

    sixteen = [anomaly] * 16
    base = masks(AnomalyDataset(sixteen, aug))
    assert all(torch.equal(a, b) for a, b in zip(base, masks(AnomalyDataset(sixteen, aug, seed=0))))  # seed 0 default
    fresh = AnomalyDataset(sixteen, aug)
    fresh.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(base, masks(fresh)))                                # epoch 0 first
    assert not all(torch.equal(a, b) for a, b in zip(base, masks(AnomalyDataset(sixteen, aug, seed=1))))
    # the index enters the draw: one image, 16 items, many of the 16 distinct (flip, rotation) views
    assert len({tuple(m.flatten().tolist()) for m in base}) > 4
