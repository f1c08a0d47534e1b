"""The Hydra entry points compose for every method and dataset, and the scripts' functions do what they promise."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def test_run_identity_records_compares_and_names_what_changed(tmp_path, monkeypatch):
    import json

    from omegaconf import OmegaConf

    from core.runs import RunIdentityError, check_run_identity
    cfg = OmegaConf.create({"lr": 0.1, "steps": 10, "out": "${lr}", "device": "cpu", "keep_checkpoints": False,
                            "hydra": {"run": {"dir": "a"}}, "model": {"name": "tiny", "size": 2}})
    run = tmp_path / "run"
    run.mkdir()
    digest = check_run_identity(run, cfg, {"data": "abc"})
    record = json.loads((run / "identity.json").read_text())
    assert record["hash"] == digest and record["defined_by"]["inputs"] == {"data": "abc"}
    assert record["defined_by"]["config"]["out"] == 0.1                       # resolved, not "${lr}"
    assert "device" not in record["defined_by"]["config"] and "hydra" not in record["defined_by"]["config"]
    # the same definition (other key order, other device / hydra / checkpoint keeping) resumes
    same = OmegaConf.create({"model": {"size": 2, "name": "tiny"}, "steps": 10, "lr": 0.1, "out": "${lr}",
                             "device": "cuda", "keep_checkpoints": True, "hydra": {"run": {"dir": "b"}}})
    assert check_run_identity(run, same, {"data": "abc"}) == digest
    # a changed setting, or changed inputs, are refused, naming each key with the recorded and the new value
    with pytest.raises(RunIdentityError, match=r"holds a run defined differently: config\.lr: 0\.1 -> 0\.2; config\.out: 0\.1 -> 0\.2\. Nothing was changed"):
        check_run_identity(run, OmegaConf.merge(cfg, {"lr": 0.2}), {"data": "abc"})
    with pytest.raises(RunIdentityError, match=r"holds a generation defined differently: inputs\.data: 'abc' -> 'abd'"):
        check_run_identity(run, cfg, {"data": "abd"}, what="generation")
    with pytest.raises(RunIdentityError, match=r"inputs\.data: 'abc' -> '<unset>'"):
        check_run_identity(run, cfg)
    many = OmegaConf.merge(cfg, {"lr": 1, "steps": 1, "model": {"name": "x", "size": 3}, "extra": 1})
    with pytest.raises(RunIdentityError, match=r"\(and 2 more\)"):                # 6 keys differ, 4 shown
        check_run_identity(run, many, {"data": "abc"})
    assert json.loads((run / "identity.json").read_text()) == record            # refusals change nothing
    (tmp_path / "other").mkdir()
    assert check_run_identity(tmp_path / "other", cfg) != digest                 # without the inputs: another identity
    # a key added after the run was recorded resumes at the value that reproduces the run, and only at that value
    import core.runs as runs
    monkeypatch.setitem(runs.ADDED_KEYS, "config.model.extra_key", "old")
    assert check_run_identity(run, OmegaConf.merge(cfg, {"model": {"extra_key": "old"}}), {"data": "abc"})
    with pytest.raises(RunIdentityError, match=r"config\.model\.extra_key: '<unset>' -> 'new'"):
        check_run_identity(run, OmegaConf.merge(cfg, {"model": {"extra_key": "new"}}), {"data": "abc"})
    with pytest.raises(RunIdentityError, match=r"config\.lr: 0\.1 -> 0\.2"):    # ... and does not hide other changes
        check_run_identity(run, OmegaConf.merge(cfg, {"lr": 0.2, "model": {"extra_key": "old"}}), {"data": "abc"})
    with pytest.raises(RunIdentityError, match=r"config\.other_key: '<unset>' -> 'old'"):   # an unlisted key is a change
        check_run_identity(run, OmegaConf.merge(cfg, {"other_key": "old"}), {"data": "abc"})
    assert json.loads((run / "identity.json").read_text()) == record
    (run / "identity.json").write_text("{not json")
    with pytest.raises(RunIdentityError, match="identity.json is corrupt"):
        check_run_identity(run, cfg, {"data": "abc"})


def test_positive_int_and_resolve_device_and_check_common_by_hand():
    from omegaconf import OmegaConf

    from core.runs import check_common, positive_int, resolve_device
    assert positive_int(1, "n") == 1 and positive_int("12", "n") == 12 and positive_int(3.0, "n", maximum=3) == 3
    for bad in (0, 0.5, 2.5, -1, "x", "nan", True, None, [3]):
        with pytest.raises(ValueError, match=rf"^n={re.escape(repr(bad))} must be a whole number >= 1\. Fix: n=<count>"):
            positive_int(bad, "n")
    with pytest.raises(ValueError, match=r"^n=4 is more than 3\."):
        positive_int(4, "n", maximum=3)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"^device=gpu0 is not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device=cuda:1: this machine has no usable CUDA GPU"):
            resolve_device("cuda:1")
    check_common(OmegaConf.create({"seed": 0, "device": "cpu", "n_per_type": 2}))
    check_common(OmegaConf.create({}))                                  # seed 0, device auto, no count
    for cfg, msg in (({"seed": -1}, r"seed=-1 must be"), ({"seed": 1.5}, r"seed=1\.5 must be"),
                     ({"seed": True}, r"seed=True must be"), ({"device": "gpu0"}, r"device=gpu0"),
                     ({"n_per_type": 0}, r"n_per_type=0 must be"), ({"n_per_type": 100_001}, r"more than 100000")):
        with pytest.raises(ValueError, match=msg):
            check_common(OmegaConf.create(cfg))


def test_merge_checkpoint_config_takes_the_runs_nodes_unless_the_command_line_chose(tmp_path):
    from omegaconf import OmegaConf

    from core.runs import merge_checkpoint_config
    run = {"method": {"name": "seas", "steps": 5, "generate": {"guidance": 2.0, "n": 1}},
           "product": "bottle", "seed": 3, "model": {"name": "mini", "path": "a=b"}}
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(run)))
    cfg = OmegaConf.create({"method": {"name": "seas", "steps": 9, "generate": {"guidance": 7.0, "n": 4}},
                            "product": "pill", "seed": 0, "model": {"name": "sd15", "path": "x=y"}, "n_per_type": 2})
    # inside-node overrides keep the run's node, with the command line's value (a value holding '=' too);
    # a "~" deletion is skipped without ending the loop; "+" adds are read like the others
    merged = merge_checkpoint_config(cfg, tmp_path, ["~foo", "+method.generate.guidance=7.0", "seed=0",
                                                     "model.path=x=y"])
    assert merged.method.steps == 5 and merged.method.generate.guidance == 7.0 and merged.method.generate.n == 1
    assert merged.seed == 0 and merged.product == "bottle" and merged.model.name == "mini" and merged.model.path == "x=y"
    # a group choice of another method keeps the command line's node; naming the run's own keeps the run's
    other = merge_checkpoint_config(cfg.copy(), tmp_path, ["method=cut", "product=pill"])
    assert other.method.steps == 9 and other.product == "pill"
    own = merge_checkpoint_config(cfg.copy(), tmp_path, ["method=seas"])
    assert own.method.steps == 5
    # a scalar key set inside (product.x=...) keeps the command line's value
    assert merge_checkpoint_config(cfg.copy(), tmp_path, ["product.x=1"]).product == "pill"


def test_median_seconds_warms_up_once_then_interleaves_the_rounds_and_takes_medians(monkeypatch):
    import torch

    import core.timing as timing
    clock = iter([0.0, 1.0, 1.0, 5.0, 5.0, 10.0, 10.0, 13.0, 13.0, 15.0, 15.0, 115.0])   # a, b, a, b, a, b
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    med = timing.median_seconds(fns, 3, torch.device("cpu"), peak_gib={})
    assert calls == ["a", "b"] + ["a", "b"] * 3            # one warm-up each, then interleaved rounds
    assert med == {"a": 2.0, "b": 4.0}                      # a: 1, 5, 2 -> 2; b: 4, 3, 100 -> 4
