"""The command-line scripts, run as a user runs them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import trees

REPO = Path(__file__).resolve().parents[1]


def run(script, *args, env=None):
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("name,make,product,expected", [
    ("mvtec_ad", trees.mvtec_ad, "widget", {"train": {"good": 4}, "test": {"good": 2, "hole": 3, "scratch": 3}}),
    ("visa", trees.visa, "candle", {"train": {"good": 4}, "test": {"anomaly": 3, "good": 2}}),
    ("mvtec_3d", trees.mvtec_3d, "bagel", {"train": {"good": 3}, "validation": {"good": 2},
                                           "test": {"crack": 3, "good": 2, "hole": 3}}),
    ("mvtec_loco", trees.mvtec_loco, "breakfast_box", {"train": {"good": 3}, "validation": {"good": 2},
                                                       "test": {"good": 2, "logical_anomalies": 2, "structural_anomalies": 2}}),
])
def test_inspect_reads_every_layout(tmp_path, name, make, product, expected):
    root = make(tmp_path / name)
    r = run("inspect_dataset.py", f"dataset={name}", f"dataset.root={root}", f"product={product}", "format=json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {product: expected}


def test_inspect_split_protocol_and_table(tmp_path):
    root = trees.mvtec_ad(tmp_path / "m", n_per_type=6)
    r = run("inspect_dataset.py", "dataset=mvtec_ad", f"dataset.root={root}", "split=one_third", "format=json")
    c = json.loads(r.stdout)
    assert c["widget"]["train"] == {"good": 4, "hole": 2, "scratch": 2}
    assert c["widget"]["test"] == {"good": 2, "hole": 4, "scratch": 4}
    r = run("inspect_dataset.py", "dataset=mvtec_ad", f"dataset.root={root}", "split=two_fold", "split.fold=1")
    assert r.returncode == 0 and "widget" in r.stdout and "hole: 3" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["dataset=mvtec_ad", "dataset.root=/nonexistent/x"], "does not exist"),
    (["dataset=mvtec_ad"], "dataset.root is not set"),
    (["dataset=mvtec_ad", "product=bottle"], "Available: gridlike, widget"),
])
def test_inspect_bad_input_exits_nonzero(tmp_path, args, message):
    root = trees.mvtec_ad(tmp_path / "m")
    if "product=bottle" in args:
        args = args + [f"dataset.root={root}"]
    r = run("inspect_dataset.py", *args)
    assert r.returncode == 2 and message in r.stderr and r.stdout == ""


def test_inspect_corrupt_tree_exits_nonzero(tmp_path):
    root = trees.mvtec_ad(tmp_path / "m")
    (root / "widget/test/scratch/000.png").write_bytes(b"garbage")
    r = run("inspect_dataset.py", "dataset=mvtec_ad", f"dataset.root={root}")
    assert r.returncode == 2 and "scratch/000.png" in r.stderr


def test_make_synthetic_inspect_and_contact_sheet(tmp_path):
    out = tmp_path / "world"
    r = run("make_synthetic.py", f"out_dir={out}", "resolution=64", "n_train_good=4", "n_test_good=2", "n_per_type=2",
            "products=[bottle,carpet]", "workers=1")
    assert r.returncode == 0, r.stderr
    sheet = out / "contact_sheet.png"
    assert Image.open(sheet).size[0] > 64 * 6
    r = run("inspect_dataset.py", "dataset=synthetic", f"dataset.root={out}", "dataset.resolution=64", "format=json")
    c = json.loads(r.stdout)
    assert set(c) == {"bottle", "carpet"} and c["bottle"]["train"] == {"good": 4}
    assert c["bottle"]["test"]["crack"] == 2
    r = run("contact_sheet.py", f"root={out}", "product=carpet", f"out={tmp_path / 'c.png'}", "per_row=3")
    assert r.returncode == 0 and Image.open(tmp_path / "c.png").size[1] == 128 * 6  # carpet: train/good, test/good, 4 defect types


def test_synthetic_dataset_builds_on_first_use(tmp_path):
    r = run("inspect_dataset.py", "dataset=synthetic", "dataset.resolution=64", "product=pill", "format=json",
            env={"ANOMALY_DATA": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pill"]["train"] == {"good": 200}
    assert (tmp_path / "synthetic" / "seed0_res64" / "world.json").is_file()


def test_eval_downstream_one_command_on_a_real_layout_and_a_clear_error_for_a_broken_folder(tmp_path):
    data = trees.mvtec_ad(tmp_path / "data", products=("widget",), n_per_type=3)
    gen = trees.mvtec_ad(tmp_path / "gen", products=("widget",), n_per_type=2, variant=1000)
    common = ["dataset=mvtec_ad", f"dataset.root={data}", "downstream.base=4", "image_size=32", "limits.max_train_steps=2",
              "protocol=anomalydiffusion", "label=mygen"]
    r = run("eval_downstream.py", *common, f"generated={gen}", f"hydra.run.dir={tmp_path / 'run'}",
            env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| widget |" in r.stdout and "mygen AUROC" in r.stdout and "baseline AUROC" in r.stdout
    assert (tmp_path / "run" / "table.md").is_file() and (tmp_path / "run" / "grids").is_dir()
    mask = gen / "widget" / "ground_truth" / "hole" / "000_mask.png"
    mask.unlink()
    r = run("eval_downstream.py", *common, f"generated={gen}", f"hydra.run.dir={tmp_path / 'run2'}")
    assert r.returncode == 2
    assert "000.png" in r.stderr and "mask" in r.stderr.lower()
    assert not (tmp_path / "run2" / "checkpoints").exists()  # nothing trained before the folder was checked


def test_gap_share_takes_each_arm_from_its_own_run(tmp_path):
    """benchmarks/gap_share.py: baseline and the generated arm from one run, the oracle from another; hand values."""
    import importlib.util

    def run(d, rows):
        d.mkdir()
        (d / "results.csv").write_text("label,product,fold,metric,value\n" + "".join(
            f"{lab},{p},0,pixel_ap,{v}\n" for lab, p, v in rows))
        return d
    a = run(tmp_path / "a", [("baseline", "pill", 0.1), ("baseline", "cable", 0.2), ("generated", "pill", 0.3),
                             ("generated", "cable", 0.2), ("oracle", "pill", 0.9), ("oracle", "cable", 0.9)])
    b = run(tmp_path / "b", [("oracle", "pill", 0.5), ("oracle", "cable", 0.6)])
    spec = importlib.util.spec_from_file_location("gap_share", REPO / "benchmarks" / "gap_share.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.main([f"baseline={a}:baseline", f"seas={a}:generated", f"oracle={b}:oracle", "--metrics", "pixel_ap"])
    # averaged: baseline 0.15, oracle 0.55, seas 0.25 -> 0.25; per product: pill 0.2 / 0.4 = 0.50, cable 0 / 0.4 = 0.00
    assert "| Pixel AP | 15.00 | 55.00 | +40.00 | 0.25 |" in text          # in percent, as the tables
    assert "| pill | 0.50 |" in text and "| cable | 0.00 |" in text
    with pytest.raises(SystemExit, match="no arm 'oracle_x'"):
        mod.main([f"baseline={a}:baseline", f"oracle={tmp_path / 'a'}:oracle_x"])


def _mutation_score_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("mutation_score", REPO / "scripts" / "mutation_score.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mutation_score"] = mod   # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_mutation_score_groups_mutants_by_module_and_scores_the_judged_ones():
    mod = _mutation_score_module()
    assert mod.module_of("core.metrics.detection.x_iou__mutmut_3") == "core.metrics.detection"
    assert mod.module_of("core.data.splits.x__n_train__mutmut_1") == "core.data.splits"
    assert mod.module_of("segmentation.patchcore.xǁPatchCoreǁforward__mutmut_2") == "segmentation.patchcore"
    results = mod.parse_results("\n".join([
        "    core.metrics.detection.x_iou__mutmut_1: killed", "    core.metrics.detection.x_iou__mutmut_2: survived",
        "    core.metrics.detection.x_iou__mutmut_4: survived",
        "    core.metrics.detection.x_auroc__mutmut_1: killed", "    core.metrics.detection.x_auroc__mutmut_2: killed",
        "    core.data.splits.x_apply_split__mutmut_1: timeout",
        "    core.data.splits.x_apply_split__mutmut_2: no tests"]))
    assert results["core.data.splits.x_apply_split__mutmut_2"] == "no tests"
    table = mod.score_table(results, {"core.metrics.detection.x_iou__mutmut_4": "message"})
    # 3 killed of 5 judged; one of the two survivors only changes a message: 3 of 4 with it set aside
    assert "| core.metrics.detection | 3 | 2 (1) | 0 | 0 | 60.0 % | 75.0 % |" in table
    assert "| core.data.splits | 0 | 0 (0) | 1 | 1 | 0.0 % | 0.0 % |" in table
    assert "| **all** | 3 | 2 (1) | 1 | 1 | 50.0 % | 60.0 % |" in table


def test_mutation_score_tells_a_message_only_mutant_from_a_code_mutant(tmp_path):
    mod = _mutation_score_module()
    src = tmp_path / "core" / "m.py"
    src.parent.mkdir()
    src.write_text(
        "def x_f__mutmut_orig(a):\n    if a < 0:\n        raise ValueError(f'f: a={a} < 0')\n    return 'x' + str(a)\n"
        "def x_f__mutmut_1(a):\n    if a < 0:\n        raise ValueError(None)\n    return 'x' + str(a)\n"
        "def x_f__mutmut_2(a):\n    if a < 0:\n        raise ValueError('XXf: a < 0XX')\n    return 'x' + str(a)\n"
        "def x_f__mutmut_3(a):\n    if a < 1:\n        raise ValueError(f'f: a={a} < 0')\n    return 'x' + str(a)\n"
        "def x_f__mutmut_4(a):\n    if a < 0:\n        raise ValueError(f'f: a={a} < 0')\n    return 'XXxXX' + str(a)\n"
        "def x_f__mutmut_5(a):\n    if a < 0:\n        raise ValueError(None)\n    return 'y' + str(a)\n")
    kinds = mod.classify_survivors(tmp_path, [f"core.m.x_f__mutmut_{i}" for i in (1, 2, 3, 4, 5)])
    # 5 changes the message and the result: not a message-only mutant
    assert kinds == {"core.m.x_f__mutmut_1": "message", "core.m.x_f__mutmut_2": "message",
                     "core.m.x_f__mutmut_3": "code", "core.m.x_f__mutmut_4": "code", "core.m.x_f__mutmut_5": "code"}


def test_mutation_score_puts_every_module_in_one_group_with_existing_tests(tmp_path):
    mod = _mutation_score_module()
    base, groups = mod.load_groups()
    owner = mod.assign_modules(groups)
    assert owner["core/metrics/detection.py"].name == "metrics"
    assert owner["core/data/synthetic/world.py"].name == "synthetic"   # core/data/*.py stays in core/data/
    assert mod.matches("core/data/splits.py", "core/data/*.py") and not mod.matches("core/data/synthetic/w.py",
                                                                                     "core/data/*.py")
    assert not mod.matches("old/core/data/splits.py", "core/data/*.py")    # anchored at the repository root
    assert all((REPO / t).is_file() for g in groups for t in g.tests)
    # a module in two groups, or in none, is an error naming it
    twice = groups + [mod.Group("dup", ("core/engine.py",), ("tests/test_engine.py",))]
    with pytest.raises(mod.ConfigError, match="core/engine.py is in groups engine, dup"):
        mod.assign_modules(twice)
    with pytest.raises(mod.ConfigError, match="core/engine.py is in no group"):
        mod.assign_modules([g for g in groups if g.name != "engine"])
    # the scratch copy's pyproject: the group's selection replaces [tool.mutmut] and the group tables
    text = mod.with_mutmut_table((REPO / "pyproject.toml").read_text(),
                                 mod.mutmut_table(base, ["core/engine.py"], ["tests/test_engine.py"]))
    import tomllib
    cfg = tomllib.loads(text)
    assert cfg["tool"]["mutmut"]["only_mutate"] == ["core/engine.py"]
    assert cfg["tool"]["mutmut"]["pytest_add_cli_args_test_selection"] == ["tests/test_engine.py"]
    assert cfg["tool"]["mutmut"]["also_copy"] == base["also_copy"] and "mutation_score" not in cfg["tool"]
    assert cfg["tool"]["pytest"]["ini_options"]["addopts"] == "-q"

def test_mutation_score_starts_a_group_afresh_only_when_what_judges_it_changed(tmp_path):
    mod = _mutation_score_module()
    (tmp_path / "tests").mkdir()
    for name in ("test_a.py", "test_b.py", "conftest.py", "trees.py"):
        (tmp_path / "tests" / name).write_text(f"# {name}\n")
    g = mod.Group("g", ("core/x.py",), ("tests/test_a.py",))
    first = mod.tests_digest(g, tmp_path)
    (tmp_path / "tests" / "test_b.py").write_text("# another group's tests\n")
    assert mod.tests_digest(g, tmp_path) == first
    for name in ("test_a.py", "trees.py", "conftest.py"):
        (tmp_path / "tests" / name).write_text(f"# {name} changed\n")
        assert mod.tests_digest(g, tmp_path) != first
        first = mod.tests_digest(g, tmp_path)


@pytest.mark.parametrize("script,args,message", [
    ("pretrain_dit.py", ["prior.kind=tiny", "corpus_config=null"], "corpus_config"),
    ("pretrain_dit.py", ["prior.path=/nonexistent/prior"], "/nonexistent/prior"),
])
def test_pretraining_scripts_turn_a_user_error_into_one_line_and_exit_2(tmp_path, script, args, message):
    r = run(script, f"out_dir={tmp_path / 'out'}", f"work_dir={tmp_path / 'work'}", *args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()

