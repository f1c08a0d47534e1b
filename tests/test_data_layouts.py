"""Each real layout loads into the samples table with masks that line up with the defects."""
from pathlib import Path

import numpy as np
import pytest

import trees
from core.data import (anomaly_types, load_dataset, load_folder, load_mvtec_3d, load_mvtec_ad, load_mvtec_loco,
                       load_visa, read_image, read_mask)


def _square(defect):
    y, x, s = defect
    m = np.zeros((trees.SIZE, trees.SIZE), bool)
    m[y:y + s, x:x + s] = True
    return m


def test_mvtec_ad_table_masks_and_grayscale(tmp_path):
    root = trees.mvtec_ad(tmp_path / "mvtec")
    table = load_mvtec_ad(root)
    assert {s.product for s in table} == {"widget", "gridlike"}
    w = [s for s in table if s.product == "widget"]
    assert sum(s.split == "train" for s in w) == 4 and sum(s.split == "test" and s.label == 0 for s in w) == 2
    assert anomaly_types(w) == ["hole", "scratch"]
    for s in table:
        if s.label == 1:
            i = int(s.name[:3])
            assert np.array_equal(read_mask(s.mask_paths), _square(trees.defect_at(i)))
            assert s.mask_paths[0].endswith(f"ground_truth/{s.anomaly_type}/{i:03d}_mask.png")
        else:
            assert s.mask_paths == () and s.anomaly_type == "good"
    g = next(s for s in table if s.product == "gridlike")
    img = read_image(g.path)
    assert img.shape == (trees.SIZE, trees.SIZE, 3) and np.array_equal(img[..., 0], img[..., 2])


def test_visa_csv_and_class_id_masks(tmp_path):
    root = trees.visa(tmp_path / "visa")
    table = load_visa(root)
    assert {s.product for s in table} == {"pcb9", "candle"}
    c = [s for s in table if s.product == "candle"]
    assert [s.split for s in c if s.label == 0].count("train") == 4
    an = [s for s in c if s.label == 1]
    assert len(an) == 3 and {s.anomaly_type for s in an} == {"anomaly"}
    for s in an:
        i = int(s.name[:3])
        raw = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(s.mask_paths[0]))
        assert raw.max() == 1 + i % 3  # class id on disk ...
        assert np.array_equal(read_mask(s.mask_paths), _square(trees.defect_at(i)))  # ... binarised on read


def test_mvtec_3d_nested_rgb_gt(tmp_path):
    root = trees.mvtec_3d(tmp_path / "m3d")
    table = load_mvtec_3d(root)
    assert {s.split for s in table} == {"train", "validation", "test"}
    assert all("/rgb/" in s.path for s in table)
    an = [s for s in table if s.label == 1]
    assert len(an) == 6 and all("/gt/" in s.mask_paths[0] for s in an)
    for s in an:
        assert np.array_equal(read_mask(s.mask_paths), _square(trees.defect_at(int(s.name[:3]))))
    assert all(s.mask_paths == () for s in table if s.label == 0)


def test_mvtec_loco_masks_are_unioned(tmp_path):
    root = trees.mvtec_loco(tmp_path / "loco")
    table = load_mvtec_loco(root)
    an = [s for s in table if s.label == 1]
    assert {s.anomaly_type for s in an} == {"logical_anomalies", "structural_anomalies"}
    for s in an:
        assert len(s.mask_paths) == 2
        m = read_mask(s.mask_paths)
        assert np.array_equal(m, _square((1, 1, 4)) | _square((9, 9, 5)))
    assert sum(s.split == "validation" for s in table) == 2


def test_folder_accepts_generated_tree_without_train(tmp_path):
    root = trees.mvtec_ad(tmp_path / "gen", products=("widget",), n_train=0)
    with pytest.raises(Exception, match="train/good"):
        load_mvtec_ad(root)
    table = load_folder(root)
    assert len(table) == 2 + 6 and not any(s.split == "train" for s in table)


def test_load_dataset_registry_and_product_filter(tmp_path):
    root = trees.mvtec_ad(tmp_path / "mvtec")
    table = load_dataset("mvtec_ad", root, "widget")
    assert {s.product for s in table} == {"widget"}
    with pytest.raises(ValueError, match="Available: synthetic, mvtec_ad"):
        load_dataset("mvtecc", root)


def test_an_rgb_mask_is_read_on_every_channel(tmp_path):
    from PIL import Image
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[0, 0, 0] = 255      # R
    rgb[1, 2, 1] = 9        # G only
    rgb[3, 5, 2] = 1        # B only
    Image.fromarray(rgb).save(tmp_path / "m.png")
    want = np.zeros((4, 6), bool)
    want[0, 0] = want[1, 2] = want[3, 5] = True
    assert np.array_equal(read_mask([tmp_path / "m.png"]), want)


def _layouts(tmp_path):
    """(loader, root, products) of each real layout, each tree holding two products and a stray folder."""
    import csv
    m3d = trees.mvtec_3d(tmp_path / "m3d", products=("bagel", "tire"))
    loco = trees.mvtec_loco(tmp_path / "loco", products=("breakfast_box", "juice_bottle"))
    visa = trees.visa(tmp_path / "visa")
    ad = trees.mvtec_ad(tmp_path / "ad")
    for root in (m3d, loco, ad):
        (root / "notes").mkdir()                       # not a product: no train/good inside
    rows = list(csv.reader(open(visa / "split_csv" / "1cls.csv")))
    return [(load_mvtec_3d, m3d, ("bagel", "tire")), (load_mvtec_loco, loco, ("breakfast_box", "juice_bottle")),
            (load_visa, visa, ("candle", "pcb9")), (load_mvtec_ad, ad, ("gridlike", "widget"))], rows


def test_every_layout_fills_each_row_field_selects_products_and_names_its_layout(tmp_path):
    from core.data import DatasetError
    layouts, _ = _layouts(tmp_path)
    for load, root, products in layouts:
        table = load(root)
        assert sorted({s.product for s in table}) == list(products), load.__name__   # the stray folder is no product
        for s in table:
            assert s.product in products and s.split in ("train", "validation", "test"), (load.__name__, s)
            assert (s.label == 0) == (s.anomaly_type == "good") and s.label in (0, 1) and isinstance(s.label, int)
            assert (s.label == 1) == bool(s.mask_paths) and s.path.startswith(str(root))
        assert sum(s.label == 0 for s in table) and sum(s.label == 1 for s in table)
        for product in products:   # each alone: rows of the other product are skipped wherever they sit
            one = load(root, product)
            assert {s.product for s in one} == {product} and len(one) == sum(s.product == product for s in table)
        with pytest.raises(DatasetError, match=rf"Unknown product\(s\) \['nope'\] under '{root}'"):
            load(root, ["nope"])
        with pytest.raises(DatasetError, match=r"(?s)does not exist.*Expected layout: \S"):
            load(tmp_path / "missing")


def test_visa_rejects_a_repeated_row_naming_its_csv_line(tmp_path):
    import csv
    from core.data import DatasetError
    _, rows = _layouts(tmp_path)
    root = tmp_path / "visa"
    rows.insert(3, rows[5])                       # line 7 repeats the image of line 4 (line 1 is the header)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DatasetError, match=r"line 7 lists image .* twice"):
        load_visa(root)


def test_overlay_tints_the_mask_and_outlines_it():
    from core.data.visualize import overlay
    img = np.full((9, 11, 3), 100, np.uint8)
    m = np.zeros((9, 11), bool)
    m[2:7, 3:9] = True
    out = overlay(img, m, colour=(200, 0, 50))
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert out[4, 5].tolist() == [140, 60, 80]                 # inside: 0.6 * 100 + 0.4 * colour
    assert out[2, 5].tolist() == [200, 0, 50] and out[1, 5].tolist() == [200, 0, 50]   # the outline, both sides
    assert out[0, 0].tolist() == [100, 100, 100]               # outside: untouched


def test_grids_lay_out_one_row_per_group_with_labels_and_refuse_nothing_to_show(tmp_path):
    from PIL import Image

    from core.data.visualize import LABEL_W, contact_sheet, labelled_grid
    a, b = np.zeros((20, 30, 3), np.uint8), np.full((40, 10, 3), 255, np.uint8)
    path = labelled_grid([(["x"], [a, b, a]), (["y", "z"], [b])], tmp_path / "g" / "grid.png", cell=16)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 16, LABEL_W + 3 * 16, 3) and not (tmp_path / "g" / "grid.tmp.png").exists()
    assert (grid[16:, LABEL_W + 16:] == 0).all()                # the short row is padded with black cells
    assert (grid[:16, LABEL_W + 16:LABEL_W + 32] == 255).all()   # its images in order, resized to the cell
    with pytest.raises(ValueError, match="labelled_grid: no rows"):
        labelled_grid([], tmp_path / "none.png")
    table = load_mvtec_ad(trees.mvtec_ad(tmp_path / "m"))
    sheet = np.asarray(Image.open(contact_sheet(table, tmp_path / "sheet.png", per_row=3, cell=8)))
    groups = {(s.product, s.split, s.anomaly_type) for s in table}
    assert sheet.shape == (len(groups) * 8, LABEL_W + 3 * 8, 3)
    with pytest.raises(ValueError, match="contact_sheet: no samples"):
        contact_sheet([], tmp_path / "none.png")


def test_load_synthetic_builds_only_at_the_default_root_or_when_asked_and_checks_the_worlds_record(tmp_path,
                                                                                                  monkeypatch):
    import json

    import core.data.synthetic as S
    from core.data import DatasetError, load_synthetic
    built = []

    def fake_build(root, cfg):          # a tiny tree instead of the real world (what load_synthetic asks for is checked)
        built.append((Path(root).name, cfg.seed, cfg.resolution))
        trees.mvtec_ad(Path(root), products=("bottle", "pill"))
        (Path(root) / "world.json").write_text(json.dumps({"seed": cfg.seed, "resolution": cfg.resolution}))

    monkeypatch.setattr(S, "build_world", fake_build)
    default = tmp_path / "synthetic" / "seed3_res64"
    rows = load_synthetic(default, ["pill"], seed=3, resolution=64)
    assert built == [("seed3_res64", 3, 64)] and {s.product for s in rows} == {"pill"}
    assert load_synthetic(default, seed=3, resolution=64) and len(built) == 1          # built once, then loaded
    other = tmp_path / "mine"
    with pytest.raises(DatasetError, match=r"dataset.root=.*mine does not exist .*seed0_res128.*dataset.build=true"):
        load_synthetic(other)
    for flag, name in ((True, "a"), ("true", "b"), ("True", "c")):
        load_synthetic(tmp_path / name, build=flag)
        assert built[-1] == (name, 0, 128)
    with pytest.raises(DatasetError, match=r"holds a world built with seed 3, resolution 64 but the config says "
                                           r"seed 0, resolution 128 .* Fix: add dataset.seed=3 dataset.resolution=64"):
        load_synthetic(default)
    with pytest.raises(DatasetError, match=r"built with resolution 64 but the config says resolution 32"):
        load_synthetic(default, seed=3, resolution=32)
