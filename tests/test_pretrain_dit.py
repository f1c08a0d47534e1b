"""The mini DiT prior's pretraining (core/models/pretrain_dit.py) at smoke size: saved and reloaded, resumed
bit-identically, the class dropout of classifier-free guidance, the guided DDIM sampler."""
import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from core.data.synthetic import ALL_PRODUCTS
from core.models import build_random
from core.models.dit import DiT
from core.models.pretrain import encode_pool, render_pool
from core.models.pretrain_dit import build_mini_dit, pretrain_dit, product_labels, sample_dit, train_dit

REPO = Path(__file__).resolve().parents[1]


def _smoke_cfg() -> dict:
    spec = importlib.util.spec_from_file_location("pretrain_dit_script", REPO / "scripts" / "pretrain_dit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = OmegaConf.load(REPO / "configs" / "pretrain_dit.yaml")
    return OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.create(mod.SMOKE)))


def test_pretrain_dit_writes_a_loadable_class_conditional_dit_and_resumes(tmp_path):
    cfg = _smoke_cfg()
    report = pretrain_dit(cfg, tmp_path / "dit", tmp_path / "work")
    assert report["training"]["steps_run"] == 3 and report["pool_images"] == 6
    dit = DiT.load(tmp_path / "dit")
    assert dit.y_embedder.num_classes == len(ALL_PRODUCTS) and dit.config["learn_sigma"] is False
    assert dit.config["input_size"] == build_random("tiny").latent_size
    assert not torch.equal(dit.final_layer.linear.weight, torch.zeros_like(dit.final_layer.linear.weight))  # trained
    again = pretrain_dit(cfg, tmp_path / "dit", tmp_path / "work")
    assert again["training"]["steps_run"] == 0
    with pytest.raises(FileNotFoundError, match="corpus_config"):
        pretrain_dit({**cfg, "corpus_config": None}, tmp_path / "dit2", tmp_path / "work2")


def test_killed_and_resumed_dit_training_matches_an_uninterrupted_run(tmp_path):
    comp = build_random("tiny", seed=0)
    pool = render_pool(("metal_nut", "bottle"), 2, 1, 64, seed=0, desc="pool")
    latents, labels = encode_pool(comp, pool), product_labels(pool.products)
    arch = {"patch_size": 2, "hidden_size": 24, "depth": 2, "num_heads": 2}
    tcfg = {**_smoke_cfg()["train"], "steps": 4, "checkpoint_every": 2}

    def run(work, stop):
        work.mkdir()
        if stop:
            train_dit(build_mini_dit(arch, comp), labels, latents, comp.scheduler, {**tcfg, "stop_after": 2}, work, 0,
                      torch.device("cpu"))
        dit = build_mini_dit(arch, comp)          # a fresh process: nothing but the checkpoint survives
        train_dit(dit, labels, latents, comp.scheduler, tcfg, work, 0, torch.device("cpu"))
        return dit

    a, b = run(tmp_path / "a", False), run(tmp_path / "b", True)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.blocks[0].adaLN_modulation[1].weight, build_mini_dit(arch, comp).blocks[0]
                           .adaLN_modulation[1].weight)


@pytest.mark.parametrize("p_drop", [0.0, 0.25])
def test_class_dropout_sends_a_share_of_labels_to_the_null_class(tmp_path, p_drop):
    comp = build_random("tiny", seed=0)
    pool = render_pool(("metal_nut", "bottle", "grid"), 2, 0, 64, seed=0, desc="pool")
    latents, labels = encode_pool(comp, pool), product_labels(pool.products)
    dit = build_mini_dit({"patch_size": 2, "hidden_size": 16, "depth": 1, "num_heads": 2}, comp)
    seen = []
    dit.register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    cfg = {**_smoke_cfg()["train"], "steps": 60, "batch": 16, "class_dropout": p_drop, "checkpoint_every": 1000}
    train_dit(dit, labels, latents, comp.scheduler, cfg, tmp_path, 0, torch.device("cpu"))
    y = torch.cat(seen)
    null = len(ALL_PRODUCTS)
    assert len(y) == 960
    assert (y == null).float().mean().item() == pytest.approx(p_drop, abs=0.04)
    assert set(y[y != null].tolist()) == set(labels.tolist())


def test_sample_dit_is_ddim_with_guidance_on_the_null_class(monkeypatch):
    """With a denoiser that returns one constant for the labelled rows and another for the null rows, the guided eps
    is u + w (c - u): guidance 1 samples as the conditional alone, guidance 0 as the unconditional alone."""
    comp = build_random("tiny", seed=0)
    dit = build_mini_dit({"patch_size": 2, "hidden_size": 16, "depth": 1, "num_heads": 2}, comp)
    null = dit.y_embedder.num_classes

    def fake(x, t, y):
        return torch.where((y == null)[:, None, None, None], torch.full_like(x, -0.5), torch.full_like(x, 0.7))
    dit.forward = fake
    labels = torch.tensor([3, 0])
    run = lambda w: sample_dit(dit, comp, labels, 3, w, torch.Generator().manual_seed(0))  # noqa: E731
    cond_only = run(1.0)

    def fake_cond(x, t, y):
        return torch.full_like(x, 0.7)
    dit.forward = fake_cond
    assert torch.allclose(run(5.0), cond_only, atol=1e-5)   # eps identical in both rows: guidance has no effect
    dit.forward = fake
    assert not torch.allclose(run(0.0), cond_only, atol=1e-3)
    with pytest.raises(ValueError, match="not in the synthetic world"):
        product_labels(["bottle", "teapot"])
