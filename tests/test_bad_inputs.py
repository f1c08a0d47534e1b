"""Bad input and careless use, through the real scripts on one tiny world and one tiny SeaS run: each case ends in
exit code 2 and one ``error:`` line naming the fix, and no file that was there before is lost or changed."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def _refused(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and the last stderr line is the one error line containing every needle."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Fix: " in line, line
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.fixture(scope="module")
def world(bottle_world):
    return bottle_world


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    """One finished SeaS run (debug size) that every case shares; no case may change it."""
    out = tmp_path_factory.mktemp("bad_run") / "run"
    r = _script("train.py", "method=seas", "debug=fast", f"dataset.root={world}", "dataset.resolution=64", "product=bottle",
                f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _common(world):
    return ["debug=fast", f"dataset.root={world}", "dataset.resolution=64"]


def test_generating_into_a_dataset_refuses_and_deletes_nothing(world, run, tmp_path):
    """The data-loss case: out_dir pointed at a copy of a real dataset (74 images were deleted before)."""
    data = tmp_path / "copy"
    shutil.copytree(world, data)
    before = _hashes(data)
    r = _script("generate.py", f"checkpoint={run}", f"out_dir={data}", *_common(world))
    _refused(r, f"out_dir={data} is not empty", "was not created by a generation run")
    assert _hashes(data) == before
    # the product's own folder of that copy, too
    r = _script("generate.py", f"checkpoint={run}", f"out_dir={data / 'bottle'}", *_common(world))
    _refused(r, "is not empty")
    assert _hashes(data) == before


@pytest.mark.parametrize("args", [[], ["out_dir="]])
def test_a_missing_or_empty_out_dir_is_one_line(run, world, tmp_path, args):
    cwd_before = _hashes(REPO / "configs")
    r = _script("generate.py", f"checkpoint={run}", *args, *_common(world))
    _refused(r, "out_dir is required")
    assert _hashes(REPO / "configs") == cwd_before


def test_a_product_the_checkpoint_was_not_trained_on_is_refused(run, world, tmp_path):
    before = _hashes(run)
    r = _script("generate.py", f"checkpoint={run}", f"out_dir={tmp_path / 'gen'}", "product=pill", *_common(world))
    _refused(r, "was trained on product 'bottle', not 'pill'")
    assert not _hashes(tmp_path / "gen") and _hashes(run) == before  # (Hydra may have made the empty folder)


def test_training_another_product_into_a_finished_run_is_refused(run, world):
    before = _hashes(run)
    r = _script("train.py", "method=seas", "debug=fast", f"dataset.root={world}", "dataset.resolution=64", "product=pill",
                f"hydra.run.dir={run}")
    _refused(r, "training run defined differently", "product: 'bottle' -> 'pill'", "hydra.run.dir")
    assert _hashes(run) == before


def test_two_checkpoints_do_not_mix_in_one_folder_and_a_refusal_rewrites_no_config(run, world, tmp_path):
    from hydra import compose, initialize_config_dir

    from core.runs import generate, train
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        other = tmp_path / "other_run"
        train(compose("train", ["method=seas", *_common(world), "product=bottle", "seed=1"]), other)
        out = tmp_path / "gen"
        generate(compose("generate", [f"checkpoint={run}", f"out_dir={out}", *_common(world)]), out)
    before = _hashes(out)
    assert "generate_config.bottle.yaml" in before
    r = _script("generate.py", f"checkpoint={other}", f"out_dir={out}", "seed=0", *_common(world))
    _refused(r, "was generated with another configuration")
    assert _hashes(out) == before


# ----------------------------------------------------------------------------------------- metric API, direct calls

def _maps():
    """Masks (2, 4, 6) with a defect, and the maps that score it perfectly."""
    import numpy as np
    masks = np.zeros((2, 4, 6))
    masks[0, 1:3, 2:4] = 1
    masks[1, 0, 5] = 1
    return masks, masks * 0.8 + 0.1


def test_pixel_metrics_refuse_transposed_soft_nan_and_empty_input():
    import numpy as np
    from core.metrics import detection as D
    masks, maps = _maps()
    assert D.auroc(masks, maps) == 1.0
    wrong = maps.transpose(0, 2, 1).reshape(maps.shape[0], 6, 4)  # same size, other shape
    for fn in (D.auroc, D.average_precision, D.f1_max):
        with pytest.raises(ValueError, match="differ in shape"):
            fn(masks, wrong)
    with pytest.raises(ValueError, match="differ in shape"):
        D.iou(wrong, masks)
    soft = masks * 0.5
    with pytest.raises(ValueError, match=r"must be binary \(0 / 1\), found values such as \[0.5\]"):
        D.auroc(soft, maps)
    with pytest.raises(ValueError, match="must be binary"):
        D.iou(maps, masks * 255)
    nan_mask = masks.copy()
    nan_mask[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="must be binary"):
        D.average_precision(nan_mask, maps)
    nan_map = maps.copy()
    nan_map[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        D.aupro(nan_map, masks)
    with pytest.raises(ValueError, match="are empty"):
        D.iou(np.zeros((0, 4, 6)), np.zeros((0, 4, 6)))
    for limit in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fpr_limit must be in \(0, 1\]"):
            D.aupro(maps, masks, fpr_limit=limit)
    assert D.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(1.0)


def test_generation_metrics_refuse_logits_nan_mismatched_and_empty_features():
    import numpy as np
    from core.metrics import generation as G
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5))
    with pytest.raises(ValueError, match="probability distribution"):
        G.inception_score(logits)
    with pytest.raises(ValueError, match="probability distribution"):
        G.inception_score(np.full((6, 5), 0.3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert G.inception_score(probs, 1) == pytest.approx(G.inception_score_from_logits(logits, 1))
    real, fake = rng.normal(size=(8, 3)), rng.normal(size=(7, 3))
    bad = fake.copy()
    bad[2, 1] = np.nan
    for fn in (G.fid, G.kid):
        with pytest.raises(ValueError, match="NaN or infinite"):
            fn(real, bad)
        with pytest.raises(ValueError, match="3 dimensions and generated ones 4"):
            fn(real, rng.normal(size=(7, 4)))
        with pytest.raises(ValueError, match="non-empty"):
            fn(real, np.zeros((0, 3)))


@pytest.mark.parametrize("override,needle", [
    ("n_per_type=0", "n_per_type=0 must be a whole number >= 1"),       # was: the default 1000 per type
    ("n_per_type=-3", "n_per_type=-3 must be a whole number >= 1"),
    ("n_per_type=2.7", "n_per_type=2.7 must be a whole number >= 1"),
    ("n_per_type=many", "n_per_type='many' must be a whole number >= 1"),
    ("n_per_type=1e9", "is more than 100000"),                           # was: a MemoryError
    ("seed=abc", "seed='abc' must be a whole number >= 0"),
    ("device=gpu", "device=gpu is not a device name"),
    ("device=cuda:99", "device=cuda:99"),                                # no GPU, or not 100 of them
])
def test_bad_values_are_refused_naming_the_key_before_any_file(run, world, tmp_path, override, needle):
    from hydra import compose, initialize_config_dir

    from core.runs import generate
    out = tmp_path / "gen"
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("generate", [f"checkpoint={run}", f"out_dir={out}", *_common(world), override])
    with pytest.raises(ValueError, match=re.escape(needle)):
        generate(cfg, out, overrides=[override])
    assert not out.exists()


def test_a_bad_value_on_the_command_line_is_one_line(run, world, tmp_path):
    r = _script("train.py", "method=seas", *_common(world), "seed=abc", f"hydra.run.dir={tmp_path / 'r'}")
    _refused(r, "seed='abc' must be a whole number >= 0")
    assert not _hashes(tmp_path / "r")


def test_seas_training_refuses_an_all_zero_training_mask_or_drops_it_on_request(world, tmp_path):
    import numpy as np
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from core.data import DatasetError
    from seas import method as M
    data = tmp_path / "synthetic" / "seed0_res64"
    shutil.copytree(world, data)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", ["method=seas", *_common(data), "product=bottle"])
    anomalies, _ = M.training_samples(cfg, "bottle")
    target = anomalies[1]
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(target.mask_paths[0])
    with pytest.raises(DatasetError, match="1 anomalous image.* all-zero mask .*method.train.empty_masks=drop"):
        M.training_samples(cfg, "bottle")
    cfg.method.train.empty_masks = "drop"
    with pytest.warns(UserWarning, match="left out 1"):
        kept, _ = M.training_samples(cfg, "bottle")
    assert [s.path for s in kept] == [s.path for s in anomalies if s.path != target.path]


def test_a_synthetic_root_is_checked_against_the_config_and_never_built_by_a_typo(world, tmp_path):
    from core.data import DatasetError, load_dataset
    typo = tmp_path / "synthetc" / "seed0_res64"
    with pytest.raises(DatasetError, match="does not exist .*Fix: correct the path, or add dataset.build=true"):
        load_dataset("synthetic", typo, resolution=64)
    assert not typo.exists()
    with pytest.raises(DatasetError, match="built with resolution 64 but the config says resolution 128.*"
                                           "Fix: add dataset.resolution=64"):
        load_dataset("synthetic", world)                       # the config's default resolution, 128
    with pytest.raises(DatasetError, match="built with seed 0 .* says seed 3"):
        load_dataset("synthetic", world, seed=3, resolution=64)
    assert {s.product for s in load_dataset("synthetic", world, resolution=64)} == {"bottle"}


def _undecodable_png(path: Path) -> None:
    """Rewrite a PNG so that its chunk structure and every CRC are valid but its pixel data does not inflate."""
    import struct
    import zlib
    data = path.read_bytes()
    out, pos = [data[:8]], 8
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IDAT":
            body = b"\x78\x9c" + b"\xff" * max(8, n - 2)   # zlib header, then a reserved (invalid) block type
        out.append(struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(kind + body)))
        pos += 12 + n
    path.write_bytes(b"".join(out))


def test_an_undecodable_png_with_valid_checksums_is_refused_by_inspect(world, tmp_path):
    """Validation decodes the images, not only their headers and CRCs (such a file passed inspect_dataset before)."""
    from PIL import Image
    from core.data.table import DatasetError, image_size
    data = tmp_path / "synthetic" / "seed0_res64"
    shutil.copytree(world, data)
    bad = sorted((data / "bottle" / "test").rglob("*.png"))[-1]
    _undecodable_png(bad)
    with Image.open(bad) as im:
        im.verify()                                   # the structure and the checksums pass
    with pytest.raises(DatasetError, match="Cannot read image"):
        image_size(bad)
    before = _hashes(data)
    r = _script("inspect_dataset.py", "dataset=synthetic", f"dataset.root={data}", "dataset.resolution=64")
    _refused(r, "Cannot read image", bad.name)
    assert _hashes(data) == before


def test_the_benchmark_or_its_test_images_as_generated_data_are_refused(world, tmp_path):
    """generated= pointing at the benchmark (or a folder holding a copy of one of its test images) would train on the
    test set (pixel AP 92 instead of 33 when it was found): refused before anything is written."""
    from core.data import DatasetError, apply_split, load_dataset, load_folder
    from segmentation.data import check_no_test_leak
    out = tmp_path / "eval"
    before = _hashes(world)
    r = _script("eval_downstream.py", *_common(world), "protocol=seas", "downstream=unet", "products=[bottle]",
                f"generated={world}", f"hydra.run.dir={out}")
    _refused(r, f"generated={world}", "identical to the benchmark's test images")
    assert _hashes(world) == before and not (out.exists() and any(out.iterdir()))   # nothing written
    r = _script("eval_generation.py", f"dataset.root={world}", "dataset.resolution=64", f"generated={world}",
                "products=[bottle]", f"hydra.run.dir={tmp_path / 'gen_eval'}")
    _refused(r, "identical to the dataset's test images")
    # a generated-looking folder with one test image copied in under another name
    table = load_dataset("synthetic", world, resolution=64)
    test = apply_split(table, "one_third").test
    gen = tmp_path / "gen"
    shutil.copytree(world, gen)
    for p in gen.rglob("*.png"):                     # every image altered (as a generator's would be) ...
        p.write_bytes(p.read_bytes() + b"\0")
    anomalous = [s for s in test if s.label == 1]
    victim = anomalous[-1]
    rel = Path(victim.path).relative_to(world)
    shutil.copyfile(victim.path, gen / rel)           # ... except one, a byte copy of a test anomaly
    samples = load_folder(gen, ["bottle"])
    with pytest.raises(DatasetError, match=f"holds 1 image.*{rel.name}"):
        check_no_test_leak(samples, test, gen)
    # the same copy of a training anomaly (not a test image of this split) is no leak; nor is a clean folder
    train_anomaly = [s for s in apply_split(table, "one_third").train if s.label == 1][0]
    (gen / rel).write_bytes(Path(train_anomaly.path).read_bytes() + b"\0")
    check_no_test_leak(load_folder(gen, ["bottle"]), test, gen)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])


def _other_network(p: Path) -> None:
    from safetensors.torch import save_file
    import torch
    save_file({"conv.weight": torch.zeros(3, 3, 1, 1), "conv.bias": torch.zeros(3)}, str(p))


CORRUPTIONS = [   # (file of the run, how it is spoiled, what the one error line must name)
    ("rmp.safetensors", _truncate, "not a readable safetensors file"),
    ("rmp.safetensors", _other_network, "does not hold the weights of this run's mask branch"),
    ("rmp.json", Path.unlink, "rmp.json is missing"),
    ("rmp.json", lambda p: p.write_text("{\"heads\": "), "rmp.json is not valid JSON"),
    ("rmp.json", lambda p: p.write_text("{\"widths\": 3}"), "rmp.json does not hold the mask branch's constructor"),
    ("seas.json", lambda p: p.write_text("not json"), "seas.json is not valid JSON"),
    ("config.yaml", lambda p: p.write_text("method: [unclosed\n  - x: {"), "config.yaml is not a valid YAML config"),
    ("generator/text_embeddings.safetensors", _truncate, "text_embeddings.safetensors is not a readable"),
    ("generator/text_embeddings.safetensors", _other_network, "does not hold text-embedding rows of this base"),
    ("generator/slim.json", lambda p: p.write_text("{"), "slim.json is not valid JSON"),
    ("generator/slim.json", lambda p: p.write_text("[1, 2]"), "is not a slim checkpoint of this toolkit"),
    ("identity.json", lambda p: p.write_text("[]"), "identity.json holds no identity hash"),
]


@pytest.mark.parametrize("name,spoil,needle", CORRUPTIONS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CORRUPTIONS)])
def test_a_corrupt_run_file_is_one_error_naming_it(run, world, tmp_path, name, spoil, needle):
    """Truncated, missing or foreign files in a run dir (each tracebacked before): generate exits 2 with one line that
    names the file and the fix, and changes nothing in the run."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    target = copy / name
    assert target.is_file(), sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    spoil(target)
    before = _hashes(copy)
    r = _script("generate.py", f"checkpoint={copy}", f"out_dir={tmp_path / 'gen'}", *_common(world))
    line = _refused(r, needle)
    assert str(target.relative_to(copy)).split("/")[-1] in line
    assert _hashes(copy) == before


def test_a_bad_format_and_a_contact_sheet_without_root_or_to_an_unwritable_path_are_one_line(world, tmp_path):
    r = _script("inspect_dataset.py", "dataset=synthetic", f"dataset.root={world}", "dataset.resolution=64",
                "format=xml")
    _refused(r, "format must be 'table' or 'json', got 'xml'")
    r = _script("contact_sheet.py", "product=bottle")
    _refused(r, "root is required")
    blocker = tmp_path / "a_file"      # a path under a file cannot be written, whoever runs the test (root too)
    blocker.write_text("x")
    r = _script("contact_sheet.py", f"root={world}", "product=bottle", f"out={blocker / 'sheet.png'}")
    _refused(r, "cannot write the contact sheet", "sheet.png")
    assert blocker.read_text() == "x"


def test_a_name_too_long_is_one_line_and_file_system_errors_map_to_a_fix(world, tmp_path):
    """A path the file system refuses ends in one line naming it: an over-long name through the real script; a
    read-only folder, a full disk and a path through a file through the mapping (root, which runs CI, ignores
    permissions, and a full disk cannot be made in a test)."""
    import errno
    from core.cli import exit_on_user_error, file_system_error
    long_root = tmp_path / ("x" * 300)
    r = _script("inspect_dataset.py", f"dataset.root={long_root}")
    _refused(r, "File name too long", "use a shorter path")
    cases = {errno.EROFS: "read-only", errno.ENOSPC: "free space", errno.EACCES: "permissions",
             errno.ENOTDIR: "is a file, not a folder"}
    for code, needle in cases.items():
        msg = file_system_error(OSError(code, os.strerror(code), "/some/where/0001.png"))
        assert "/some/where/0001.png" in msg and needle in msg and "Fix: " in msg, msg
    assert file_system_error(OSError(errno.ECONNRESET, "reset")) is None   # not the user's to fix: re-raised
    with pytest.raises(SystemExit) as e:
        with exit_on_user_error():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/disk/file")
    assert e.value.code == 2
    with pytest.raises(ConnectionResetError):
        with exit_on_user_error():
            raise ConnectionResetError(errno.ECONNRESET, "reset")


def test_an_output_folder_the_file_system_refuses_is_one_line_before_hydra_creates_it(world, run, tmp_path):
    """hydra.run.dir= / out_dir= with a name over 255 bytes or through a file: one line and exit 2 (Hydra printed the
    traceback of its own mkdir before), and nothing is created."""
    too_long = tmp_path / ("x" * 300) / "run"
    r = _script("train.py", "method=seas", *_common(world), "product=bottle", f"hydra.run.dir={too_long}")
    _refused(r, "hydra.run.dir=", "File name too long", "use a shorter path")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = _script("generate.py", f"checkpoint={run}", f"out_dir={blocker / 'gen'}", *_common(world))
    _refused(r, "out_dir=", "Not a directory", "is a file, not a folder")
    r = _script("eval_downstream.py", *_common(world), f"hydra.run.dir='{blocker / 'eval'}'")
    _refused(r, "Not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and blocker.read_text() == "x"
