"""core/export.py: the generated-dataset writer is atomic, resumable and refuses to mix configurations."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.data import DatasetError, load_folder, validate_files
from core.export import MANIFEST, OWNER_MARKER, GeneratedWriter, claim_output_dir, config_hash, read_manifest


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
    # the mask PNG holds 0 / 255 as MVTec's do (a 0 / 1 PNG reads as a defect too, but looks black to a person)
    from PIL import Image
    raw = np.asarray(Image.open(tmp_path / rec["mask"]))
    assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 255} and np.array_equal(raw == 255, _mask())


def test_config_hash_ignores_key_order_and_sees_values():
    a = {"steps": 25, "guidance": 4.0, "nested": {"x": 1, "y": [1, 2]}}
    b = {"nested": {"y": [1, 2], "x": 1}, "guidance": 4.0, "steps": 25}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "steps": 26})


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
    w.close()  # the killed process's lock died with it
    w2 = GeneratedWriter(tmp_path, "bottle", "seas", {"a": 1})
    assert w2.is_done("crack", 0) and not w2.is_done("crack", 1)
    assert not img1.exists() and not mask1.exists() and not (img1.parent / ".0002.png.tmp-123").exists()
    img0, mask0 = w.anomaly_paths("crack", 0)
    assert img0.exists() and mask0.exists()        # the recorded item keeps both its files
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
    s0.close(), s1.close()
    with GeneratedWriter(tmp_path, "bottle", "m", {}) as rerun:
        assert rerun.is_done("stain", 0)
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


def _tree_hashes(root):
    import hashlib
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_folder_the_writer_did_not_create_is_refused_and_left_unchanged(tmp_path):
    """The data-loss case: out_dir pointed at a copy of a dataset (MVTec names, no manifest) must not lose a file."""
    from PIL import Image
    data = tmp_path / "mvtec_copy"
    for rel in ("bottle/train/good/000.png", "bottle/test/broken/000.png", "bottle/ground_truth/broken/000_mask.png",
                "bottle/train/good/0001.png"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_img(7)).save(data / rel)
    (data / "license.txt").write_text("CC BY-NC-SA")
    before = _tree_hashes(data)
    with pytest.raises(DatasetError, match=r"is not empty \(bottle, license.txt\) and was not created"):
        GeneratedWriter(data, "bottle", "seas", {})
    assert _tree_hashes(data) == before
    # a folder of this toolkit from before the marker existed is named as such, with the command that adopts it
    old = tmp_path / "old_generated"
    old.mkdir()
    (old / MANIFEST).write_text("")
    with pytest.raises(DatasetError, match="touch .*old_generated/.toolkit_generated.json"):
        GeneratedWriter(old, "bottle", "seas", {})
    with pytest.raises(DatasetError, match="out_dir is empty"):
        claim_output_dir("")


def test_a_new_or_pre_run_folder_is_claimed_and_repairs_touch_only_the_writers_own_names(tmp_path):
    out = tmp_path / "gen"
    (out / ".sweep" / "bottle").mkdir(parents=True)          # what Hydra's multirun and the entry script leave first
    with GeneratedWriter(out, "bottle", "seas", {}) as w:
        w.write_normal(0, _img())
    assert (out / OWNER_MARKER).is_file()
    good = out / "bottle" / "train" / "good"
    (good / "0001.png").write_bytes((good / "0000.png").read_bytes())  # an orphan of a killed run: the writer's name
    (good / "000.png").write_bytes(b"a user's file")                    # not the writer's names: never touched
    (good / "notes.png").write_bytes(b"a user's file")
    with GeneratedWriter(out, "bottle", "seas", {}) as w:
        assert w.is_done(None, 0) and not w.is_done(None, 1)
    assert not (good / "0001.png").exists() and (good / "000.png").is_file() and (good / "notes.png").is_file()


def test_a_second_concurrent_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path):
    import multiprocessing as mp
    import os
    import signal
    first = GeneratedWriter(tmp_path, "bottle", "seas", {})
    with pytest.raises(DatasetError, match=f"being written for product 'bottle' by pid {os.getpid()}"):
        GeneratedWriter(tmp_path, "bottle", "seas", {})
    GeneratedWriter(tmp_path, "pill", "seas", {}).close()  # another product into the same folder: allowed
    first.close()
    assert not list(tmp_path.glob(".writing.*"))            # a finished writer leaves no lock file
    # a writer killed while holding the lock: its file stays, the lock does not
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path, ready))
    proc.start()
    assert ready.wait(60)
    with pytest.raises(DatasetError, match=f"by pid {proc.pid}"):
        GeneratedWriter(tmp_path, "bottle", "seas", {})
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert (tmp_path / ".writing.bottle.0.lock").is_file()
    with GeneratedWriter(tmp_path, "bottle", "seas", {}) as w:
        w.write_normal(0, _img())
    assert [r["index"] for r in read_manifest(tmp_path) if r["product"] == "bottle"] == [0]


def _hold_lock(root, ready):
    import time
    w = GeneratedWriter(root, "bottle", "seas", {})  # noqa: F841 (held until killed)
    ready.set()
    time.sleep(600)


def test_a_folder_another_job_is_claiming_at_this_moment_is_claimed_too(tmp_path):
    """Two sweep jobs generating into one folder: the first one's marker is being written (its temporary file is all
    there is); the second must claim the folder too, not call it foreign. Any other stray file is still refused."""
    out = tmp_path / "gen"
    out.mkdir()
    (out / f".{OWNER_MARKER}.tmp-12345").write_text("{")
    assert claim_output_dir(out) == out and (out / OWNER_MARKER).is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / f"{OWNER_MARKER}.tmp").write_text("{")            # not the claim's temporary name
    with pytest.raises(DatasetError, match="not empty"):
        claim_output_dir(other)


def test_finish_merges_the_manifest_and_draws_the_grid_only_when_something_changed(tmp_path):
    import torch

    from core.export import to_uint8
    w = GeneratedWriter(tmp_path, "bottle", "seas", {"a": 1})
    w.write_anomaly("crack", 1, _img(), _mask())
    w.write_anomaly("crack", 0, _img(50), _mask())
    grid = w.finish()
    assert grid == tmp_path / "bottle_grid.png" and grid.stat().st_size > 0
    assert [r["index"] for r in read_manifest(tmp_path)] == [0, 1]                  # merged in canonical order
    grid.write_bytes(b"marker")                                                      # nothing new: not redrawn
    w.finish()
    assert grid.read_bytes() == b"marker"
    grid.unlink()                                                                    # missing: drawn again
    assert w.finish().stat().st_size > 100
    w.close()
    x = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.25]], [[1.0, 0.0]]]])                 # (1, 3, 1, 2)
    assert to_uint8(x).tolist() == [[[[0, 128, 255], [255, 64, 0]]]]                # channels last, rounded
