"""Split protocols: deterministic, by file name order, train and test disjoint."""
import math

import pytest

import trees
from core.data import apply_split, load_mvtec_ad


@pytest.fixture
def table(tmp_path):
    # 7 images per type: floors and ceils differ, so off-by-one errors show
    return load_mvtec_ad(trees.mvtec_ad(tmp_path / "m", n_per_type=7, n_train=5, n_test_good=3))


def _names(samples, product="widget", atype="scratch"):
    return [s.name for s in samples if s.product == product and s.anomaly_type == atype]


@pytest.mark.parametrize("protocol,kw", [("none", {}), ("one_third", {}), ("half", {}), ("two_fold", {"fold": 0}),
                                         ("two_fold", {"fold": 1}), ("k_shot", {"k": 2, "seed": 3})])
def test_disjoint_deterministic_and_complete(table, protocol, kw):
    a, b = apply_split(table, protocol, **kw), apply_split(list(reversed(table)), protocol, **kw)
    assert sorted(s.path for s in a.train) == sorted(s.path for s in b.train)  # input order does not matter
    train, test = {s.path for s in a.train}, {s.path for s in a.test}
    assert not train & test
    if protocol != "k_shot":
        assert len(train) + len(test) == len(table)


def test_one_third_takes_first_third_by_name(table):
    sp = apply_split(table, "one_third")
    assert _names(sp.train) == ["000.png", "001.png"]  # floor(7/3) = 2
    assert _names(sp.test) == [f"{i:03d}.png" for i in range(2, 7)]
    assert sum(s.label == 0 for s in sp.train) == 2 * 5 and sum(s.label == 0 for s in sp.test) == 2 * 3


def test_one_third_keeps_one_when_few(tmp_path):
    t = load_mvtec_ad(trees.mvtec_ad(tmp_path / "m", n_per_type=2))
    assert _names(apply_split(t, "one_third").train) == ["000.png"]


def test_half_and_two_fold(table):
    assert _names(apply_split(table, "half").train) == [f"{i:03d}.png" for i in range(3)]
    f0, f1 = apply_split(table, "two_fold", fold=0), apply_split(table, "two_fold", fold=1)
    assert _names(f0.train) == [f"{i:03d}.png" for i in range(math.ceil(7 / 2))]
    assert _names(f1.train) == _names(f0.test) and _names(f0.train) == _names(f1.test)
    with pytest.raises(ValueError, match="fold=0 or fold=1"):
        apply_split(table, "two_fold", fold=2)


def test_k_shot_seeded(table):
    a = apply_split(table, "k_shot", k=2, seed=0)
    b = apply_split(table, "k_shot", k=2, seed=0)
    assert [s.path for s in a.train] == [s.path for s in b.train]
    assert all(s.label == 0 and s.split == "train" for s in a.train)
    assert {s.product for s in a.train} == {"widget", "gridlike"} and len(a.train) == 4
    draws = {tuple(s.name for s in apply_split(table, "k_shot", k=2, seed=sd).train if s.product == "widget")
             for sd in range(8)}
    assert len(draws) > 1  # the seed matters
    with pytest.raises(ValueError, match="only 5 normal"):
        apply_split(table, "k_shot", k=6)


def test_unknown_protocol(table):
    with pytest.raises(ValueError, match="Available: none, one_third"):
        apply_split(table, "thirds")


def test_anomalies_of_the_datasets_train_split_join_the_re_split_pool():
    # VisA's 1cls.csv puts some anomalies in its train split: the few-shot protocols re-split every anomaly of a type
    from core.data import Sample
    rows = [Sample(f"/v/{i:03d}.png", "train" if i < 2 else "test", "pcb", "bad", 1, (f"/v/{i:03d}_m.png",))
            for i in range(6)] + [Sample("/v/good.png", "train", "pcb", "good", 0)]
    sp = apply_split(rows, "one_third")
    assert [s.name for s in sp.train if s.label] == ["000.png", "001.png"]
    assert [s.name for s in sp.test if s.label] == [f"{i:03d}.png" for i in range(2, 6)]
    f1 = apply_split(rows, "two_fold", fold=1)
    assert [s.name for s in f1.test if s.label] == ["000.png", "001.png", "002.png"]


def test_k_shot_draws_each_products_shots_from_its_own_stream(tmp_path):
    both = load_mvtec_ad(trees.mvtec_ad(tmp_path / "m", n_per_type=2, n_train=9))
    alone = [s for s in both if s.product == "widget"]     # sorted after gridlike: a shared stream would differ
    for seed in range(4):
        shots = lambda table: [s.path for s in apply_split(table, "k_shot", k=3, seed=seed).train  # noqa: E731
                               if s.product == "widget"]
        assert shots(both) == shots(alone)   # another product in the table changes nothing


def _rows():
    from core.data import Sample
    rows = [Sample(f"/v/{i:03d}.png", "train" if i < 2 else "test", "pcb", "bad", 1, (f"/v/{i:03d}_m.png",))
            for i in range(6)]
    rows += [Sample(f"/v/v{i}.png", "validation", "pcb", "bad", 1, (f"/v/v{i}_m.png",)) for i in range(2)]
    rows += [Sample(f"/v/g{i}.png", split, "pcb", "good", 0)
             for i, split in enumerate(["train", "train", "train", "test", "validation"])]
    return rows


@pytest.mark.parametrize("protocol,kw,params", [("none", {}, {}), ("one_third", {}, {}), ("half", {}, {}),
                                                ("two_fold", {"fold": 1}, {"fold": 1}),
                                                ("k_shot", {"k": 1, "seed": 4}, {"k": 1, "seed": 4})])
def test_split_records_protocol_and_params_and_keeps_validation_normals(protocol, kw, params):
    sp = apply_split(_rows(), protocol, **kw)
    assert sp.protocol == protocol and sp.params == params
    assert [s.name for s in sp.validation if s.label == 0] == ["g4.png"]
    assert [s.name for s in sp.test if s.label == 0] == ["g3.png"]
    assert sp.parts() == {"train": sp.train, "test": sp.test, "validation": sp.validation}


def test_none_keeps_each_anomaly_in_its_dataset_split():
    sp = apply_split(_rows(), "none")
    assert [s.name for s in sp.train if s.label] == ["000.png", "001.png"]
    assert [s.name for s in sp.test if s.label] == ["002.png", "003.png", "004.png", "005.png"]
    assert [s.name for s in sp.validation if s.label] == ["v0.png", "v1.png"]


def test_k_shot_k_bounds_and_every_anomaly_tests_once():
    rows = _rows()
    sp = apply_split(rows, "k_shot", k=1)
    assert len(sp.train) == 1 and sp.train[0].label == 0 and sp.train[0].split == "train"
    # all three normal training images when k equals the pool: each exactly once (drawn without replacement)
    assert sorted(s.name for s in apply_split(rows, "k_shot", k=3).train) == ["g0.png", "g1.png", "g2.png"]
    # every anomaly tests, whatever the dataset's split, once; the test normal too
    assert sorted(s.name for s in sp.test) == sorted([s.name for s in rows if s.label == 1] + ["g3.png"])
    with pytest.raises(ValueError, match="k_shot needs k >= 1, got 0"):
        apply_split(rows, "k_shot", k=0)


def test_half_of_three_trains_one_and_one_third_of_five_trains_one():
    from core.data.splits import _n_train
    assert _n_train("half", 3, 0) == (0, 1) and _n_train("half", 1, 0) == (0, 1)
    assert _n_train("one_third", 5, 0) == (0, 1) and _n_train("one_third", 2, 0) == (0, 1)
    assert _n_train("two_fold", 5, 0) == (0, 3) and _n_train("two_fold", 5, 1) == (3, 5)


def test_k_shot_products_of_equal_size_draw_different_shots():
    # each product's stream is seeded by (seed, product): two products do not get the same positions in their pools
    from core.data import Sample
    rows = [Sample(f"/{p}/{i:02d}.png", "train", p, "good", 0) for p in ("pill", "zipper") for i in range(12)]
    same = []
    for seed in range(5):
        shots = apply_split(rows, "k_shot", k=3, seed=seed).train
        pos = {p: sorted(int(s.name[:2]) for s in shots if s.product == p) for p in ("pill", "zipper")}
        same.append(pos["pill"] == pos["zipper"])
    assert not all(same)
