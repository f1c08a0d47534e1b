"""Sweeps over products (Hydra multirun): the shipped launcher configs compose, and a local joblib sweep trains one
run directory per product and generates both products into one folder that the downstream suite reads as one
dataset."""
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

import core.data.synthetic as S
from core.export import read_manifest
from segmentation.data import load_generated

REPO = Path(__file__).resolve().parents[1]


def _hydra_cfg(overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides, return_hydra_config=True).hydra


def test_launcher_configs_compose_with_the_plugins():
    slurm = _hydra_cfg(["hydra/launcher=slurm"]).launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1 and slurm.array_parallelism == 15
    local = _hydra_cfg(["hydra/launcher=local"]).launcher
    assert local._target_.endswith("JoblibLauncher") and local.n_jobs == 2
    sweep = _hydra_cfg(["product=pill"]).sweep
    assert sweep.subdir == "pill"  # one run directory per product


def test_a_local_sweep_trains_each_product_and_generates_one_dataset(tmp_path):
    world = tmp_path / "synthetic" / "seed0_res64"
    S.build_world(world, S.WorldConfig(resolution=64, n_train_good=3, n_test_good=1, n_per_type=3,
                                       products=("bottle", "pill")), workers=1, progress=False)
    common = ["-m", "hydra/launcher=local", "method=seas", "debug=fast", f"dataset.root={world}", "dataset.resolution=64", "product=bottle,pill"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run(script, *args):
        r = subprocess.run([sys.executable, f"scripts/{script}", *common, *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    run("train.py", f"hydra.sweep.dir={tmp_path / 'runs'}")
    for p in ("bottle", "pill"):
        assert (tmp_path / "runs" / p / "generator" / "slim.json").is_file()
        assert (tmp_path / "runs" / p / "rmp.safetensors").is_file()
    gen = tmp_path / "gen"
    run("generate.py", f"checkpoint={tmp_path / 'runs'}/${{product}}", f"out_dir={gen}", "n_per_type=2",
        "method.generate.mask_threshold=0.3")
    records = read_manifest(gen)
    assert {r["product"] for r in records} == {"bottle", "pill"}
    assert all(r["checkpoint"].endswith(r["product"]) for r in records)  # each product from its own run
    samples = load_generated(gen, ["bottle", "pill"])
    assert {s.product for s in samples if s.label == 1} == {"bottle", "pill"}
    assert len(samples) == len(records)
