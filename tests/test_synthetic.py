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
    table = load_dataset("synthetic", out, resolution=64)  # validates every file
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

    monkeypatch.setattr(S.world, "_write_product_job", lambda args: failing(*args))
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


# ---------------------------------------------------------------- the web-photo appearance of the prior's corpus

def test_identity_appearance_is_the_benchmark_render():
    for product, defect in (("cable", "missing"), ("transistor", "bent"), ("carpet", "hole")):
        a = S.render(product, S.sample_rng(3, product, "prior", defect, 1), 64, defect)
        b = S.render(product, S.sample_rng(3, product, "prior", defect, 1), 64, defect, S.Appearance())
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert S.sample_appearance(np.random.default_rng(0), S.PRODUCTS["pill"], keep=1.0) == S.Appearance()


def test_recolour_rotates_hue_about_the_grey_axis():
    red = np.array([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]]], np.float32)
    out = S.Appearance(hue=2 * np.pi / 3).recolour(red)
    np.testing.assert_allclose(out[0, 0], [0, 1, 0], atol=1e-5)  # +120 degrees: red -> green (not blue)
    np.testing.assert_allclose(out[0, 1], [0.5, 0.5, 0.5], atol=1e-5)  # grey stays grey
    grey = S.Appearance(saturation=0.0).recolour(np.array([[[0.2, 0.6, 0.4]]], np.float32))
    np.testing.assert_allclose(grey[0, 0], [0.2 * 0.299 + 0.6 * 0.587 + 0.4 * 0.114] * 3, atol=1e-5)
    np.testing.assert_allclose(S.Appearance(value=0.5).recolour(red)[0, 0], [0.5, 0, 0], atol=1e-6)


def test_pose_zooms_and_rotates_the_product():
    rng = lambda: S.sample_rng(0, "transistor", "prior", "good", 0)
    base = S.render("transistor", rng(), 128)
    dark = lambda img: (img.mean(-1) < 60)  # the black body on a light backdrop
    rows = np.nonzero(dark(base.image))[0]
    assert rows.mean() < 64  # the body sits in the top half
    flipped = S.render("transistor", rng(), 128, appearance=S.Appearance(angle=np.pi))
    assert np.nonzero(dark(flipped.image))[0].mean() > 64  # rotated by pi: the bottom half
    area = lambda img: dark(img).sum()
    zoomed = S.render("transistor", rng(), 128, appearance=S.Appearance(scale=1.3))
    assert 1.3 ** 2 * 0.85 < area(zoomed.image) / area(base.image) < 1.3 ** 2 * 1.15


@pytest.mark.parametrize("product,defect", [("transistor", "bent"), ("cable", "missing"), ("wood", "scratch"),
                                            ("metal_nut", "bent"), ("hazelnut", "contamination")])
def test_web_look_keeps_the_mask_exact(product, defect):
    """Posed, recoloured, relit: every changed pixel still lies inside the mask (bent re-draws through the pose)."""
    for i in range(4):
        r, app = S.render_web(product, 0, defect, i, 64)
        assert app is not None
        changed = np.abs(r.image.astype(int) - r.clean.astype(int)).max(-1) > 0
        assert r.mask.any() and not (changed & ~r.mask).any()


def test_web_appearances_are_wide_and_rarely_the_benchmark_look():
    apps = [S.sample_appearance(S.sample_rng(0, "pill", "web", "good", i), S.PRODUCTS["pill"]) for i in range(400)]
    assert np.mean([a.posed for a in apps]) == pytest.approx(0.7, abs=0.08)
    assert np.mean([a == S.Appearance() for a in apps]) < 0.02
    hues = [a.hue for a in apps if a.recoloured]
    assert max(hues) - min(hues) > 5  # the whole colour wheel, not a jitter


def test_render_web_redraws_an_appearance_that_hides_the_defect(monkeypatch):
    """A black photo in the dark hides a crack: that appearance is skipped for the next one of the stream."""
    from core.data.synthetic import world as W

    dark = S.Appearance(value=0.0, gloss=0.0, light=(1.0, 0.0, 0.0, 0.0))
    calls = []

    def fake(rng, spec, keep):
        calls.append(1)
        return dark if len(calls) < 3 else S.Appearance(hue=1.0)

    monkeypatch.setattr(W, "sample_appearance", fake)
    with pytest.raises(S.InvisibleDefect):
        S.render("capsule", S.sample_rng(0, "capsule", "prior", "crack", 0), 64, "crack", dark)
    r, app = S.render_web("capsule", 0, "crack", 0, 64)
    assert app == S.Appearance(hue=1.0) and len(calls) == 3 and r.mask.any()
