"""The synthetic world: exact masks, determinism, layout, atomic builds, the oracle sampler."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from core.data import apply_split, load_dataset, load_mvtec_ad, read_mask
from core.data import synthetic as S

CASES = [(p, d) for p, spec in S.PRODUCTS.items() for d in spec.defects]


@pytest.mark.parametrize("product,defect", CASES)
def test_changed_pixels_lie_inside_the_mask(product, defect):
    for i, res in enumerate((64, 128, 64)):
        r = S.render(product, S.sample_rng(7, product, "test", defect, i), res, defect)
        changed = np.abs(r.image.astype(int) - r.clean.astype(int)).max(-1) > 0
        assert r.mask.any()
        assert not (changed & ~r.mask).any(), "a pixel changed outside the mask"
        # and the mask is not a loose box around a faint change: most of it visibly differs
        visible = np.abs(r.image.astype(int) - r.clean.astype(int)).max(-1) > S.VISIBLE_LEVEL
        assert visible[r.mask].mean() >= S.MIN_VISIBLE_FRACTION


def test_normals_vary_naturally():
    imgs = [S.render("bottle", S.sample_rng(0, "bottle", "train", "good", i)).image.astype(float) for i in range(6)]
    diffs = [np.abs(imgs[0] - im).mean() for im in imgs[1:]]
    assert min(diffs) > 1.0  # no two normal images are the same picture


def test_render_is_deterministic_and_seed_dependent():
    a = S.render("cable", S.sample_rng(0, "cable", "test", "crack", 3), 64, "crack")
    b = S.render("cable", S.sample_rng(0, "cable", "test", "crack", 3), 64, "crack")
    c = S.render("cable", S.sample_rng(1, "cable", "test", "crack", 3), 64, "crack")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)


def test_product_sets_and_defect_coverage():
    objects = [p for p, s in S.PRODUCTS.items() if s.kind == "object"]
    textures = [p for p, s in S.PRODUCTS.items() if s.kind == "texture"]
    assert len(objects) >= 6 and len(textures) >= 4
    assert len({d for s in S.PRODUCTS.values() for d in s.defects}) >= 6
    assert set(S.BENCHMARK_PRODUCTS).isdisjoint(S.PRETRAIN_PRODUCTS)
    assert set(S.BENCHMARK_PRODUCTS) | set(S.PRETRAIN_PRODUCTS) == set(S.PRODUCTS)
    pre = {d for p in S.PRETRAIN_PRODUCTS for d in S.PRODUCTS[p].defects}
    assert {d for p in S.BENCHMARK_PRODUCTS for d in S.PRODUCTS[p].defects} <= pre


def _digest(root):
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.png")):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


SMALL = dict(resolution=64, n_train_good=3, n_test_good=2, n_per_type=2, products=("bottle", "grid"))


def test_build_world_layout_and_reload(tmp_path):
    out = S.build_world(tmp_path / "w", S.WorldConfig(**SMALL), workers=1, progress=False)
    table = load_dataset("synthetic", out)  # validates every file
    assert {s.product for s in table} == {"bottle", "grid"}
    b = [s for s in table if s.product == "bottle"]
    assert sum(s.split == "train" for s in b) == 3 and sum(s.label == 0 and s.split == "test" for s in b) == 2
    assert {s.anomaly_type for s in b if s.label} == set(S.PRODUCTS["bottle"].defects)
    for s in b:
        if s.label:
            m = read_mask(s.mask_paths)
            assert m.shape == (64, 64) and m.any()
    grid_img = next(s.path for s in table if s.product == "grid")
    assert Image.open(grid_img).mode == "L"  # grayscale product on disk, like MVTec's grid
    meta = json.loads((out / "world.json").read_text())
    assert meta["benchmark_products"] == list(S.BENCHMARK_PRODUCTS)
    assert len(apply_split(table, "one_third").train) > 0


def test_build_world_is_deterministic_reusable_and_atomic(tmp_path, monkeypatch):
    cfg = S.WorldConfig(**SMALL)
    a = S.build_world(tmp_path / "a", cfg, workers=1, progress=False)
    b = S.build_world(tmp_path / "b", cfg, workers=2, progress=False)
    assert _digest(a) == _digest(b)
    assert S.build_world(a, cfg, progress=False) == a  # reused
    with pytest.raises(FileExistsError, match="not this synthetic world"):
        S.build_world(a, S.WorldConfig(**{**SMALL, "seed": 1}), progress=False)
    c = S.build_world(tmp_path / "c", S.WorldConfig(**{**SMALL, "seed": 1}), workers=1, progress=False)
    assert _digest(a) != _digest(c)

    calls = []

    def failing(out, product, cfg):
        calls.append(product)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return S.write_product(out, product, cfg)

    monkeypatch.setattr(S, "_write_product_job", lambda args: failing(*args))
    with pytest.raises(KeyboardInterrupt):
        S.build_world(tmp_path / "d", cfg, workers=1, progress=False)
    assert not any(p.name.startswith("d") for p in tmp_path.iterdir())  # neither the world nor a partial tree


def test_oracle_defects_are_new_and_masked(tmp_path):
    out = S.build_world(tmp_path / "w", S.WorldConfig(**{**SMALL, "products": ("pill",)}), workers=1, progress=False)
    test_imgs = [np.asarray(Image.open(s.path)) for s in load_mvtec_ad(out) if s.label]
    oracle = S.OracleSampler("pill", seed=0, resolution=64)
    for r in oracle.iter("crack", 4):
        assert r.mask.any() and not any(np.array_equal(r.image, t) for t in test_imgs)
        changed = np.abs(r.image.astype(int) - r.clean.astype(int)).max(-1) > 0
        assert not (changed & ~r.mask).any()
    assert np.array_equal(oracle.sample("crack", 2).image, oracle.sample("crack", 2).image)
    with pytest.raises(ValueError, match="has no defect type 'bent'"):
        oracle.sample("bent", 0)
