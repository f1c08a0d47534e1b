"""core/export.py: the generated-dataset writer is atomic, resumable and refuses to mix configurations."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.data import DatasetError, load_folder, validate_files
from core.export import MANIFEST, GeneratedWriter, read_manifest


def _img(v=100):
    return np.full((8, 8, 3), v, np.uint8)


def _mask():
    m = np.zeros((8, 8), bool)
    m[2:4, 2:5] = True
    return m


def test_written_tree_is_mvtec_layout_and_reloads(tmp_path):
    w = GeneratedWriter(tmp_path, "bottle", "seas", {"steps": 25}, checkpoint="run", seed=3)
    w.write_anomaly("crack", 0, _img(), _mask(), source="good/000.png")
    w.write_normal(0, _img(50))
    samples = load_folder(tmp_path, ["bottle"])
    validate_files(samples)
    anomaly = [s for s in samples if s.label == 1]
    assert len(anomaly) == 1 and anomaly[0].anomaly_type == "crack"
    assert sum(s.label == 0 for s in samples) == 1
    rec = read_manifest(tmp_path)[0]
    assert rec["method"] == "seas" and rec["checkpoint"] == "run" and rec["seed"] == 3
    assert rec["source"] == "good/000.png" and rec["mask"] == "bottle/ground_truth/crack/0000_mask.png"


def test_resume_skips_finished_items_and_removes_orphans_and_a_torn_line(tmp_path):
    w = GeneratedWriter(tmp_path, "bottle", "seas", {"a": 1})
    w.write_anomaly("crack", 0, _img(), _mask())
    # a killed run: the mask and image of item 1 were written, its record was torn mid-line
    img1, mask1 = w.anomaly_paths("crack", 1)
    mask1.write_bytes(mask1.with_name("0000_mask.png").read_bytes())
    img1.write_bytes(img1.with_name("0000.png").read_bytes())
    with open(tmp_path / MANIFEST, "a") as f:
        f.write('{"method": "seas", "product": "bo')
    (img1.parent / ".0002.png.tmp-123").write_bytes(b"half")
    w2 = GeneratedWriter(tmp_path, "bottle", "seas", {"a": 1})
    assert w2.is_done("crack", 0) and not w2.is_done("crack", 1)
    assert not img1.exists() and not mask1.exists() and not (img1.parent / ".0002.png.tmp-123").exists()
    lines = (tmp_path / MANIFEST).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["index"] == 0
    w2.write_anomaly("crack", 1, _img(), _mask())
    assert len(read_manifest(tmp_path)) == 2


def test_a_different_config_is_refused(tmp_path):
    GeneratedWriter(tmp_path, "bottle", "seas", {"guidance": 8}).write_normal(0, _img())
    with pytest.raises(DatasetError, match="another configuration"):
        GeneratedWriter(tmp_path, "bottle", "seas", {"guidance": 2})
    GeneratedWriter(tmp_path, "pill", "seas", {"guidance": 2})  # another product in the same tree is fine


def test_bad_arrays_are_rejected_before_anything_is_written(tmp_path):
    w = GeneratedWriter(tmp_path, "bottle", "seas", {})
    with pytest.raises(ValueError, match="does not match"):
        w.write_anomaly("crack", 0, _img(), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="uint8"):
        w.write_normal(0, _img().astype(np.float32))
    assert not list(tmp_path.rglob("*.png")) and read_manifest(tmp_path) == []


def test_shard_manifests_merge_in_canonical_order_after_other_products(tmp_path):
    GeneratedWriter(tmp_path, "pill", "m", {}).write_normal(0, _img())  # another product, written earlier
    s0 = GeneratedWriter(tmp_path, "bottle", "m", {}, shard=0, shards=2)
    s1 = GeneratedWriter(tmp_path, "bottle", "m", {}, shard=1, shards=2)
    s1.write_normal(1, _img())
    s0.write_normal(0, _img())
    s1.write_anomaly("stain", 0, _img(), _mask())
    s0.write_anomaly("crack", 1, _img(), _mask())
    s1.write_anomaly("crack", 0, _img(), _mask())
    assert json.loads((tmp_path / MANIFEST).read_text())["product"] == "pill"  # shards never write the main file
    assert len(read_manifest(tmp_path)) == 6  # unmerged shard records count (a rerun skips them)
    assert GeneratedWriter(tmp_path, "bottle", "m", {}).is_done("stain", 0)
    assert s0.finalize() is True and not list(tmp_path.glob("manifest.shard*"))
    order = [(r["product"], r["kind"], r["anomaly_type"], r["index"]) for r in read_manifest(tmp_path)]
    assert order == [("pill", "normal", None, 0), ("bottle", "anomaly", "crack", 0), ("bottle", "anomaly", "crack", 1),
                     ("bottle", "anomaly", "stain", 0), ("bottle", "normal", None, 0), ("bottle", "normal", None, 1)]
    assert s0.finalize() is False  # nothing new: the manifest is left alone


def test_two_products_written_at_once_into_one_folder_lose_no_record(tmp_path):
    """Runs of two products (a Hydra multirun, say) share the folder: one's final merge must not drop the other's
    records appended meanwhile."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_product, args=(tmp_path, p)) for p in ("bottle", "pill", "cable")]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    recs = read_manifest(tmp_path)
    assert sorted((r["product"], r["index"]) for r in recs) == sorted(
        (p, i) for p in ("bottle", "pill", "cable") for i in range(60))


def _write_product(root, product):
    w = GeneratedWriter(root, product, "m", {})
    for i in range(60):
        w.write_normal(i, _img(i))
        if i % 2 == 0:
            w.finalize()
    w.finalize()
