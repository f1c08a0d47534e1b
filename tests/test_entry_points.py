"""The Hydra entry points compose for every method and dataset, and the scripts' functions do what they promise."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from core import registry
from core.registry import METHODS, MethodNotImplementedError, UnknownMethodError, get_method
from core.data import DatasetError
from core.runs import generate, train

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
REPO = Path(__file__).resolve().parents[1]
DATASETS = ["synthetic", "mvtec_ad", "visa", "mvtec_3d", "mvtec_loco", "folder"]
PROTOCOL = {"seas": "one_third", "anomalydiffusion": "one_third", "bgdefect": "two_fold", "defectdiffu": "half",
            "cut": "k_shot"}


def _compose(name, overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dataset", DATASETS)
def test_train_and_generate_compose_for_every_method_and_dataset(method, dataset):
    extra = [] if dataset == "synthetic" else ["product=p"]
    cfg = _compose("train", [f"method={method}", f"dataset={dataset}", *extra])
    assert cfg.method.name == method and cfg.dataset.name == dataset
    assert cfg.split.name == PROTOCOL[method]  # each method brings its paper's split protocol
    assert cfg.product == ("bottle" if dataset == "synthetic" else "p")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    gen = _compose("generate", [f"method={method}", f"dataset={dataset}", "out_dir=/tmp/x", *extra])
    assert gen.method.name == method and gen.out_dir == "/tmp/x"


@pytest.mark.parametrize("name", ["eval_downstream", "eval_generation"])
@pytest.mark.parametrize("dataset", DATASETS)
def test_eval_configs_compose(name, dataset):
    cfg = _compose(name, [f"dataset={dataset}", "generated=/tmp/g"])
    assert cfg.dataset.name == dataset and cfg.generated == "/tmp/g"


def test_command_line_split_beats_the_method_default_and_debug_fast_selects_tiny():
    cfg = _compose("train", ["method=seas", "split=half", "debug=fast"])
    assert cfg.split.name == "half"
    assert cfg.model.kind == "tiny" and cfg.limits.max_train_steps == 2


def test_experiment_files_only_override():
    cfg = _compose("train", ["experiment=seas_mvtec_ad", "dataset.root=/data/mvtec", "product=bottle"])
    assert (cfg.dataset.name, cfg.model.name, cfg.method.name) == ("mvtec_ad", "sd14", "seas")
    assert cfg.method.generate.guidance == 8.0


def test_registry_errors_list_the_names():
    with pytest.raises(UnknownMethodError) as e:
        get_method("dreambooth")
    assert all(n in str(e.value) for n in METHODS)


@pytest.fixture
def fake_method(monkeypatch):
    monkeypatch.setitem(METHODS, "seas", registry.Method("seas", "fake_method", "stand-in"))


def test_train_saves_resolved_config_and_checkpoint_in_the_run_dir(tmp_path, fake_method):
    cfg = _compose("train", ["method=seas", "model=tiny"])
    out = train(cfg, tmp_path / "run")
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.product == "bottle" and saved.method.name == "seas"  # resolved, not "${dataset.default_product}"
    assert (out / "trained_on.txt").read_text() == "bottle tiny one_third"


def test_generate_takes_method_model_and_product_from_the_checkpoint(tmp_path, fake_method):
    train(_compose("train", ["method=seas", "model=tiny", "product=pill"]), tmp_path / "run")
    gen = _compose("generate", [f"checkpoint={tmp_path / 'run'}", f"out_dir={tmp_path / 'gen'}", "n_per_type=3"])
    out = generate(gen, tmp_path / "gen", overrides=[f"checkpoint={tmp_path / 'run'}", "n_per_type=3"])
    assert (out / "generated_from.txt").read_text() == f"{tmp_path / 'run'} pill tiny 3"
    assert OmegaConf.load(tmp_path / "gen" / "generate_config.pill.yaml").product == "pill"
    # a product the checkpoint was not trained on is refused (it would write pills labelled "cable"), before any file
    gen2 = _compose("generate", [f"checkpoint={tmp_path / 'run'}", f"out_dir={tmp_path / 'g2'}", "product=cable"])
    with pytest.raises(DatasetError, match="trained on product 'pill', not 'cable'"):
        generate(gen2, tmp_path / "g2", overrides=[f"checkpoint={tmp_path / 'run'}", "product=cable"])
    assert not (tmp_path / "g2").exists()


def test_generate_rejects_a_checkpoint_without_config(tmp_path, fake_method):
    (tmp_path / "empty").mkdir()
    cfg = _compose("generate", [f"checkpoint={tmp_path / 'empty'}", f"out_dir={tmp_path / 'g'}"])
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        generate(cfg, tmp_path / "g", overrides=[])


def test_unimplemented_method_and_missing_product_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "cut", registry.Method("cut", "cut.not_there", "CUT"))
    with pytest.raises(MethodNotImplementedError, match="cut/not_there.py does not exist"):
        train(_compose("train", ["method=cut"]), tmp_path / "r")
    assert not (tmp_path / "r" / "config.yaml").exists()  # nothing written for a run that cannot start
    from core.data import DatasetError
    with pytest.raises(DatasetError, match="product=<name> is required"):
        train(_compose("train", ["method=cut", "dataset=mvtec_ad"]), tmp_path / "r")


def test_cfg_job_prints_the_composed_config_without_running(tmp_path):
    r = subprocess.run([sys.executable, "scripts/train.py", "method=defectdiffu", "product=cable", "--cfg", "job"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.create(r.stdout)
    assert cfg.method.name == "defectdiffu" and cfg.product == "cable" and cfg.split.name == "half"
    assert not (REPO / "outputs" / "train" / "defectdiffu").exists()


def test_generate_keeps_the_runs_node_under_overrides_inside_it(tmp_path):
    from core.runs import merge_checkpoint_config, method_of_checkpoint
    run = tmp_path / "run"
    run.mkdir()
    trained = _compose("train", ["method=seas", "model=tiny", "product=pill", "method.generate.guidance=3.0",
                                 "method.train.lr_unet=1e-3"])
    OmegaConf.save(trained, run / "config.yaml")
    assert method_of_checkpoint([f"checkpoint={run}", "out_dir=x"]) == "seas"
    assert method_of_checkpoint([f"checkpoint={run}", "method=seas"]) is None          # the user chose it
    assert method_of_checkpoint([f"checkpoint={tmp_path / 'none'}"]) is None            # reported later
    for given in ([], ["method=seas"]):   # generate.py adds method=<the run's>: the same as not choosing it
        ov = [f"checkpoint={run}", "method.generate.n_per_type=7", *given]
        cfg = merge_checkpoint_config(_compose("generate", ov + ["out_dir=x"]), run, ov)
        assert cfg.method.generate.n_per_type == 7                     # the override inside the node applies ...
        assert cfg.method.generate.guidance == 3.0 and cfg.method.train.lr_unet == 1e-3   # ... on the run's node
        assert cfg.product == "pill" and cfg.model.name == "tiny"
    ov = [f"checkpoint={run}", "model=mini", "product=bottle"]         # other choices replace the run's
    cfg = merge_checkpoint_config(_compose("generate", ov + ["out_dir=x"]), run, ov)
    assert cfg.model.name == "mini" and cfg.product == "bottle" and cfg.method.generate.guidance == 3.0
