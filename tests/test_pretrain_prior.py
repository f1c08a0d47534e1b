"""The mini-prior script runs end to end at smoke size and writes a loadable prior with its report."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from core.models import load_model
from core.models.pretrain import caption, pretrain
from core.models.prior_report import DEBUG_OVERRIDES, write_report

CFG = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load("configs/pretrain_prior.yaml"), DEBUG_OVERRIDES))


def test_captions_name_the_product_and_the_defect():
    import numpy as np
    rng = np.random.default_rng(0)
    caps = {caption("metal_nut", "scratch", rng) for _ in range(50)}
    assert all("metal nut" in c for c in caps)
    assert any("scratch" in c for c in caps) and any("damaged" in c for c in caps)
    assert all("with" not in c and "damaged" not in c for c in {caption("screw", None, rng) for _ in range(20)})


def test_pretrain_smoke_run_writes_a_loadable_prior_and_report(tmp_path):
    cfg = {**CFG, "threads": None}
    report = pretrain(cfg, tmp_path / "prior", tmp_path / "work")
    assert report["vae"]["steps_run"] == 3 and report["denoiser"]["steps_run"] == 3
    comp = load_model({"kind": "mini", "path": str(tmp_path / "prior")})
    assert comp.resolution == 64 and comp.vae.config.scaling_factor != 1.0  # set from the latent std
    assert OmegaConf.load(tmp_path / "prior" / "config.yaml").vae.steps == 3
    # a rerun finds both stage checkpoints finished and trains nothing more
    again = pretrain(cfg, tmp_path / "prior", tmp_path / "work")
    assert again["vae"]["steps_run"] == 0 and again["denoiser"]["steps_run"] == 0
    write_report(cfg, tmp_path / "prior", tmp_path / "work")
    saved = json.loads((tmp_path / "prior" / "report.json").read_text())
    assert set(saved["vae_reconstruction_held_out"]) >= {"bottle", "pill", "cable", "carpet", "leather", "mean"}
    assert (tmp_path / "prior" / "sample_grid.png").stat().st_size > 0


def test_killed_and_resumed_training_matches_an_uninterrupted_run(tmp_path):
    """Both stages stop after step 2 (as if killed right after a checkpoint), rerun, and end bit-identical to a run
    that was never interrupted."""
    from core.models import build_random
    from core.models.pretrain import encode_pool, render_pool, train_denoiser, train_vae

    pool = render_pool(("metal_nut",), 2, 2, 64, seed=0, desc="pool")
    vae_cfg = {**CFG["vae"], "steps": 4, "checkpoint_every": 2}
    den_cfg = {**CFG["unet"], "steps": 4, "checkpoint_every": 2}

    def run(work, stop):
        work.mkdir()
        comp = build_random("tiny", seed=0)
        if stop:
            train_vae(comp, pool, {**vae_cfg, "stop_after": 2}, work, seed=0)
            comp = build_random("tiny", seed=0)  # a fresh process: nothing but the checkpoint survives
        train_vae(comp, pool, vae_cfg, work, seed=0)
        latents = encode_pool(comp, pool)
        if stop:
            fresh = build_random("tiny", seed=0)
            comp.unet, comp.text_encoder = fresh.unet, fresh.text_encoder
            train_denoiser(comp, pool, latents, {**den_cfg, "stop_after": 2}, work, seed=0)
            fresh = build_random("tiny", seed=0)
            comp.unet, comp.text_encoder = fresh.unet, fresh.text_encoder
        train_denoiser(comp, pool, latents, den_cfg, work, seed=0)
        return comp

    a, b = run(tmp_path / "a", stop=False), run(tmp_path / "b", stop=True)
    for ma, mb in ((a.vae, b.vae), (a.unet, b.unet), (a.text_encoder, b.text_encoder)):
        for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
            assert torch.equal(va, vb), k
    assert not torch.equal(a.unet.conv_in.weight, build_random("tiny", seed=0).unet.conv_in.weight)  # it trained


def test_corpus_v2_has_every_product_and_no_defect_of_a_benchmark_product(tmp_path):
    """From the manifest of the configured corpus (counts scaled down): normals of all 13 products, defects of the
    pretraining products only; every manifest line re-renders to its corpus image."""
    import numpy as np

    from core.data.synthetic import (ALL_PRODUCTS, BENCHMARK_PRODUCTS, PRETRAIN_PRODUCTS, Appearance, render,
                                     sample_rng)
    from core.models.pretrain import render_corpus, write_manifest

    c = OmegaConf.to_container(OmegaConf.load("configs/pretrain_prior.yaml"))["corpus"]
    pool = render_corpus(tuple(c["normal_products"]), tuple(c["defect_products"]), 2, 4, 64, seed=0,
                         appearance=c["appearance"], keep=c["keep_benchmark"])
    sha = write_manifest(pool, tmp_path / "manifest.jsonl")
    entries = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert len(entries) == len(pool.images) == 13 * 2 + 8 * 4 and len(sha) == 64
    assert {e["product"] for e in entries if e["defect"] is None} == set(ALL_PRODUCTS)
    assert {e["product"] for e in entries if e["defect"] is not None} == set(PRETRAIN_PRODUCTS)
    assert not any(e["product"] in BENCHMARK_PRODUCTS for e in entries if e["defect"] is not None)
    assert sum(e["appearance"] is not None and Appearance.from_dict(e["appearance"]).posed for e in entries) > 20
    for k in (0, 7, 30, len(entries) - 1):
        e = entries[k]
        app = None if e["appearance"] is None else Appearance.from_dict(e["appearance"])
        img = render(e["product"], sample_rng(e["seed"], e["product"], e["stream"], e["defect"] or "good", e["index"]),
                     64, e["defect"], app).image
        assert np.array_equal(img, pool.images[k])


def test_corpus_refuses_a_benchmark_product_among_the_defects():
    import pytest

    from core.models.pretrain import render_corpus
    with pytest.raises(ValueError, match=r"benchmark product\(s\) \['pill'\]"):
        render_corpus(("screw", "pill"), ("screw", "pill"), 1, 1, 64, seed=0)


def test_the_world_clip_trains_on_the_prior_corpus():
    prior = OmegaConf.load("configs/pretrain_prior.yaml").corpus
    clip = OmegaConf.load("configs/world_clip.yaml").corpus
    assert OmegaConf.to_container(prior) == OmegaConf.to_container(clip)

def test_the_denoiser_ends_with_its_ema_weights_using_the_warm_up_decay(tmp_path):
    """The U-Net ends with its EMA weights, not the raw ones, with the warm-up decay d_s = min(ema, (1+s)/(10+s)):
    after one step ema_1 = d_0 * w_0 + (1 - d_0) * w_1 = 0.1 * w_0 + 0.9 * w_1 (w_1 is the checkpoint's raw U-Net)."""
    from core.models import build_random
    from core.models.pretrain import encode_pool, render_pool, train_denoiser

    pool = render_pool(("screw",), 2, 1, 64, seed=0, desc="pool")
    comp = build_random("tiny", seed=0)
    latents = encode_pool(comp, pool)
    w0 = {k: v.clone() for k, v in comp.unet.state_dict().items()}
    train_denoiser(comp, pool, latents, {**CFG["unet"], "steps": 1, "checkpoint_every": 1}, tmp_path, seed=0)
    raw = torch.load(tmp_path / "denoiser_state.pt", weights_only=True)["modules"]["unet"]
    moved = 0
    for k, v in comp.unet.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.1 * w0[k] + 0.9 * raw[k], rtol=1e-5, atol=1e-6)
            moved += int(not torch.equal(raw[k], w0[k]))
        else:
            assert torch.equal(v, raw[k]), k
    assert moved > 10  # the step changed the weights, so the check above could fail


def test_offset_noise_adds_one_constant_per_image_and_channel(tmp_path, monkeypatch):
    """unet.offset_noise = s: the target noise is eps + s * c with c constant over each latent's pixels and drawn per
    (image, channel); s = 0 keeps SD's plain noise (the same draws, so the runs differ only by the offset)."""
    import core.models.pretrain as P
    from core.models import build_random

    pool = P.render_pool(("screw",), 2, 1, 64, seed=0, desc="pool")
    targets = {}

    def run(offset):
        comp = build_random("tiny", seed=0)
        latents = P.encode_pool(comp, pool)
        seen = []
        real_mse = P.F.mse_loss
        monkeypatch.setattr(P.F, "mse_loss", lambda pred, target: seen.append(target.clone()) or real_mse(pred, target))
        P.train_denoiser(comp, pool, latents, {**CFG["unet"], "batch": 3, "steps": 2, "checkpoint_every": 10,
                                               "offset_noise": offset}, tmp_path / f"o{offset}", seed=0)
        monkeypatch.undo()
        targets[offset] = seen

    run(0.0), run(0.5)
    for plain, offset in zip(targets[0.0], targets[0.5]):
        diff = offset - plain
        assert diff.shape[0] == 3 and diff.shape[1] == 4
        torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))  # constant over the pixels
        assert diff[:, :, 0, 0].abs().min() > 0 and diff[:, :, 0, 0].unique().numel() == 12  # per image and channel


def test_finetune_stage_continues_the_saved_prior_with_its_overrides(tmp_path, monkeypatch):
    """Stage 3 starts from the prior as saved (float16), trains with the finetune overrides (offset noise, seed,
    learning rates) and replaces the prior; steps 0 leaves it alone."""
    from core.models import pretrain as P
    cfg = {**CFG, "threads": None}
    pretrain(cfg, tmp_path / "prior", tmp_path / "work")
    saved = load_model({"kind": "mini", "path": str(tmp_path / "prior")})
    corpus = (tmp_path / "prior" / "corpus.json").read_text()
    assert P.finetune({**cfg, "finetune": {**cfg["finetune"], "steps": 0}}, tmp_path / "prior", tmp_path / "work") == {}
    seen = {}
    real = P.train_denoiser

    def spy(comp, pool, latents, dcfg, work, seed):
        seen.update(dcfg=dcfg, seed=seed, work=work,
                    start={k: v.clone() for k, v in comp.unet.state_dict().items()})
        return real(comp, pool, latents, dcfg, work, seed)
    monkeypatch.setattr(P, "train_denoiser", spy)
    ft = {**cfg["finetune"], "steps": 2, "batch": 3}
    assert cfg["unet"]["batch"] != 3 and "weight_decay" not in ft
    report = P.finetune({**cfg, "finetune": ft}, tmp_path / "prior", tmp_path / "work")
    assert report["denoiser"]["steps_run"] == 2 and report["device"].startswith("cpu")
    assert seen["seed"] == ft["seed"] and seen["work"] == tmp_path / "work" / "finetune"
    assert seen["dcfg"]["offset_noise"] == ft["offset_noise"] and seen["dcfg"]["lr"] == ft["lr"]
    assert seen["dcfg"]["batch"] == 3   # finetune.batch overrides the unet stage's
    assert seen["dcfg"]["weight_decay"] == cfg["unet"]["weight_decay"]  # the rest from the unet stage
    for k, v in saved.unet.state_dict().items():  # it started from the saved (float16) weights
        assert torch.equal(seen["start"][k], v), k
    after = load_model({"kind": "mini", "path": str(tmp_path / "prior")})
    assert any(not torch.equal(after.unet.state_dict()[k], v) for k, v in saved.unet.state_dict().items())
    assert OmegaConf.load(tmp_path / "prior" / "config.yaml").finetune.steps == 2
    assert after.source["finetune"]["steps"] == 2 and after.source["finetune"]["seed"] == ft["seed"]
    assert after.source["finetune"]["batch"] == 3   # toolkit.json records the batch stage 3 ran at
    assert (tmp_path / "prior" / "corpus.json").read_text() == corpus   # what it was trained on stays beside it
    # rerunning resumes from the stage-3 checkpoint (the same weights); without it, it refuses to fine-tune twice
    P.finetune({**cfg, "finetune": ft}, tmp_path / "prior", tmp_path / "work")
    again = load_model({"kind": "mini", "path": str(tmp_path / "prior")})
    for k, v in after.unet.state_dict().items():
        assert torch.equal(again.unet.state_dict()[k], v), k
    (tmp_path / "work" / "finetune" / "denoiser_state.pt").unlink()
    with pytest.raises(ValueError, match="already had stage 3"):
        P.finetune({**cfg, "finetune": ft}, tmp_path / "prior", tmp_path / "work")


def test_the_script_runs_all_three_stages_and_the_card_tells_stage_3(tmp_path):
    """scripts/pretrain_prior.py stage=all smoke=true: train, fine-tune (stage 3), report; the card and toolkit.json
    say what stage 3 did."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("pretrain_prior_script", "scripts/pretrain_prior.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = OmegaConf.to_container(OmegaConf.load("configs/pretrain_prior.yaml"))
    cfg.update(smoke=True, threads=None, stage="all", out_dir=str(tmp_path / "prior"), work_dir=str(tmp_path / "work"))
    report = script.run(cfg)
    assert report["training"]["denoiser"]["steps_run"] == 3 and report["finetune"]["denoiser"]["steps_run"] == 2
    card = (tmp_path / "prior" / "README.md").read_text()
    assert "Stage 3" in card and "2 steps in" in card and f"offset noise {cfg['finetune']['offset_noise']}" in card
    assert "2 steps of batch 2 with" in card and "Stage 3 on cpu (" in card   # batch and device of stage 3
    assert json.loads((tmp_path / "prior" / "toolkit.json").read_text())["source"]["finetune"]["steps"] == 2
