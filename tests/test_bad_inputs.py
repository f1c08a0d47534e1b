"""Bad input and careless use, through the real scripts on one tiny world and one tiny SeaS run: each case ends in
exit code 2 and one ``error:`` line naming the fix, and no file that was there before is lost or changed."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import core.data.synthetic as S

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
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "synthetic" / "seed0_res64"
    S.build_world(root, S.WorldConfig(resolution=64, n_train_good=3, n_test_good=1, n_per_type=3,
                                      products=("bottle",)), workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    """One finished SeaS run (debug size) that every case shares; no case may change it."""
    out = tmp_path_factory.mktemp("bad_run") / "run"
    r = _script("train.py", "method=seas", "debug=fast", f"dataset.root={world}", "product=bottle",
                f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _common(world):
    return ["debug=fast", f"dataset.root={world}"]


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
    r = _script("train.py", "method=seas", "debug=fast", f"dataset.root={world}", "product=pill",
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
