"""SeaS: every mechanism on hand-worked tensors or tiny random models (seas/model.py, seas/method.py)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import core.data.synthetic as S
from core.data import load_folder, read_mask, validate_files
from core.diffusion import AttentionStore, block_resolution
from core.models import architecture, build_random
from seas import method as M
from seas.model import (RefinedMaskPrediction, UAPrompt, add_ua_tokens, da_layers, da_loss, da_loss_at,
                        downsample_mask, official_start_signal, rmp_loss, seas_loss, token_positions)

REPO = Path(__file__).resolve().parents[1]
METHOD = OmegaConf.load(REPO / "configs/method/seas.yaml").method


def _maps(df_maps, ob_map, L=6, ob=1, df=(2, 3, 4, 5)):
    """A (1, r, r, L) attention tensor holding the given maps at the token positions, zeros elsewhere."""
    r = len(ob_map)
    A = torch.zeros(1, r, r, L)
    A[0, :, :, ob] = torch.tensor(ob_map)
    for p, m in zip(df, df_maps):
        A[0, :, :, p] = torch.tensor(m)
    return A, torch.tensor([ob]), torch.tensor([list(df)])


# ------------------------------------------------------------------------------------------------ Eq. 3, DA loss
def test_da_loss_paper_convention_hand_worked():
    # mean of the four anomaly maps = [[0.5, 0], [0, 0]]; M = [[1, 0], [0, 0]]
    A, ob, df = _maps([[[1, 0], [0, 0]]] * 2 + [[[0, 0], [0, 0]]] * 2, [[0.4, 0.9], [0.9, 0.9]])
    M = torch.tensor([[[1.0, 0], [0, 0]]])
    # first term: (0.5 - 1)^2 / 4 cells = 0.0625; second: (0.4 * 1)^2 / 4 = 0.04
    torch.testing.assert_close(da_loss_at(A, M, ob, df, "paper"), torch.tensor(0.0625 + 0.04))


def test_da_loss_official_convention_batch_minmax_hand_worked():
    A, ob, df = _maps([[[1, 0], [0, 1]], [[0, 0], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]],
                      [[0.6, 0.2], [1.0, 0.2]])
    M = torch.tensor([[[1.0, 0], [0, 0]]])
    # anomaly mean [[0.5, 0], [0, 0.25]] -> min-max [[1, 0], [0, 0.5]] -> mean sq. error 0.25 / 4 = 0.0625
    # normal map -> (x - 0.2) / 0.8 = [[0.5, 0], [1, 0]] -> inside M == 1: 0.5^2 = 0.25
    torch.testing.assert_close(da_loss_at(A, M, ob, df, "official"), torch.tensor(0.0625 + 0.25))
    soft = torch.tensor([[[1.0, 0.5], [0, 0]]])  # "gt0" also counts the soft cell, where the normal map is 0
    first = ((torch.tensor([[1.0, 0], [0, 0.5]]) - soft[0]) ** 2).mean()
    torch.testing.assert_close(da_loss_at(A, soft, ob, df, "official", "eq1"), first + 0.25)
    torch.testing.assert_close(da_loss_at(A, soft, ob, df, "official", "gt0"), first + 0.125)


@pytest.mark.parametrize("convention", ["paper", "official"])
def test_normal_token_term_acts_only_inside_the_mask(convention):
    M = torch.tensor([[[1.0, 0], [0, 0]]])
    base = [[0.2, 0.1], [0.3, 0.0]]  # the mask cell is neither the min nor the max of the normal map
    A, ob, df = _maps([[[1, 0], [0, 0]]] * 4, base)
    ref = da_loss_at(A, M, ob, df, convention)
    outside = A.clone()
    outside[0, 0, 1, 1] = 0.15  # within [min, max]: the official batch min-max is unchanged too
    torch.testing.assert_close(da_loss_at(outside, M, ob, df, convention), ref)
    inside = A.clone()
    inside[0, 0, 0, 1] = 0.1
    assert da_loss_at(inside, M, ob, df, convention) < ref


@pytest.mark.parametrize("convention", ["paper", "official"])
@pytest.mark.parametrize("region", ["eq1", "gt0"])
def test_empty_mask_gives_a_finite_loss(convention, region):
    A, ob, df = _maps([[[0.2, 0.1], [0.3, 0.4]]] * 4, [[0.3, 0.1], [0.2, 0.0]])
    A.requires_grad_(True)
    loss = da_loss_at(A, torch.zeros(1, 2, 2), ob, df, convention, region)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(A.grad).all()


def test_mask_downsampling_paper_keeps_small_defects_official_is_soft_max_pooled():
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 0, 0] = 1  # one pixel
    assert downsample_mask(m, 2, "paper", 8)[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    off = downsample_mask(m, 4, "official", latent_size=8)  # bilinear to 8 (no-op), max-pool by 2
    assert off.shape == (1, 4, 4) and off[0, 0, 0] == 1 and off.sum() == 1


def test_da_layers_are_the_encoder_blocks_at_half_and_quarter_latent():
    spec = architecture("sd_v1")["unet"]
    with torch.device("meta"):
        sd = UNet2DConditionModel(**spec)
    layers = da_layers(sd, 64)
    assert sorted(layers) == [16, 32]
    assert all(n.startswith("down_blocks.1.") for n in layers[32]) and len(layers[32]) == 2
    assert all(n.startswith("down_blocks.2.") for n in layers[16]) and len(layers[16]) == 2
    for r, names in layers.items():
        assert all(n.endswith("attn2") and block_resolution(n, 64, 4) == r for n in names)
    mini = build_random("tiny").unet
    assert {r: [n.split(".")[1] for n in v] for r, v in da_layers(mini, 16).items()} == {8: ["1"], 4: ["2"]}


# -------------------------------------------------------------------------------------------------- UA prompt
def test_ua_prompt_tokens_and_initialisation(tiny):
    comp = build_random("tiny")
    p = UAPrompt(("stain", "crack"))
    table_before = comp.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = add_ua_tokens(p, comp.tokenizer, comp.text_encoder)
    assert p.types == ("crack", "stain")  # sorted: type k gets sks{4k+1..4k+4}
    assert p.anomaly_prompt("stain") == "a ob1 with sks5 sks6 sks7 sks8" and p.normal_prompt == "a ob1"
    assert len(ids) == 1 + 4 * 2
    table = comp.text_encoder.get_input_embeddings().weight
    obj = comp.tokenizer("object", add_special_tokens=False).input_ids
    dfc = comp.tokenizer("defect", add_special_tokens=False).input_ids
    torch.testing.assert_close(table[ids["ob1"]], table_before[obj].mean(0))
    for t in p.all_anomaly_tokens:
        torch.testing.assert_close(table[ids[t]], table_before[dfc].mean(0))
    enc = comp.tokenize([p.anomaly_prompt("stain"), p.anomaly_prompt("crack")])
    ob, df = token_positions(p, enc.cpu(), ["stain", "crack"])
    assert enc[0, ob[0]] == ids["ob1"] and enc[0, df[0]].tolist() == [ids[f"sks{i}"] for i in range(5, 9)]
    assert enc[1, df[1]].tolist() == [ids[f"sks{i}"] for i in range(1, 5)]


# ------------------------------------------------------------------------------------- Eq. 4-6 on a tiny model
def _tiny_data(S_: int = 64, n_anom: int = 4, n_norm: int = 3) -> M.TrainingImages:
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n_anom, 1, S_, S_)
    for i in range(n_anom):
        masks[i, :, 8 + 4 * i:24 + 4 * i, 10:30] = 1
    return M.TrainingImages(torch.rand(n_anom, 3, S_, S_, generator=g), masks, ["crack", "stain"] * (n_anom // 2),
                            torch.rand(n_norm, 3, S_, S_, generator=g), [], [])


def _trainer(embeddings="table", convention="official"):
    comp = build_random("tiny")
    prompt = M.build_prompt(["crack", "stain"], comp, METHOD.prompt)
    tcfg = OmegaConf.merge(METHOD.train, {"embeddings": embeddings, "da_convention": convention})
    return comp, prompt, M.SeaSTrainer(comp, prompt, tcfg)


def test_seas_objective_terms_hand_worked():
    eps = torch.cat([torch.ones(2, 4, 2, 2), 2 * torch.ones(2, 4, 2, 2)])
    terms = seas_loss(torch.zeros_like(eps), eps, 2, torch.tensor(0.5), da_weight=2.0)
    assert (float(terms.sd), float(terms.na), float(terms.da)) == (1.0, 4.0, 1.0)
    assert float(terms.total) == 6.0  # Eq. 6: L_df (SD + DA) + L_ob


@pytest.mark.parametrize("convention", ["paper", "official"])
def test_da_loss_reads_the_da_layers_and_reaches_the_anomaly_token_embeddings(convention):
    comp, prompt, trainer = _trainer(convention=convention)
    batch = M.mixed_batch(_tiny_data(), 0, 0, 2, 2, augment=True)
    t, eps = M.batch_noise(0, 0, (4, 4, 16, 16), 1000)
    recorded = []
    orig = trainer.store.record
    trainer.store.record = lambda layer, logits, probs: (recorded.append((layer, logits.shape)),
                                                         orig(layer, logits, probs))[1]
    terms = trainer.loss(batch, t, eps)
    assert sorted({n for n, _ in recorded}) == sorted(n for v in trainer.layers.values() for n in v)
    assert {s[-2] for _, s in recorded} == {8 * 8, 4 * 4}  # the two encoder resolutions of a 16x16 latent
    comp.unet.zero_grad(), trainer.table.grad is None or trainer.table.grad.zero_()
    terms.da.backward()
    grad = trainer.table.grad
    df_rows = [prompt.ids[t] for ty in batch.types for t in prompt.anomaly_tokens(ty)]
    assert grad[df_rows].abs().sum(1).gt(0).all()  # every anomaly token of the batch's types gets a gradient
    other_types = [prompt.ids[t] for ty in prompt.types if ty not in batch.types for t in prompt.anomaly_tokens(ty)]
    if other_types:
        assert grad[other_types].abs().sum() == 0


def test_mixed_batch_pairs_one_transform_and_is_a_function_of_the_step():
    data = _tiny_data()
    a, b = M.mixed_batch(data, 3, 7, 2, 2, True), M.mixed_batch(data, 3, 7, 2, 2, True)
    assert torch.equal(a.images, b.images) and a.types == b.types and a.n_anomaly == 2 and a.images.shape[0] == 4
    c = M.mixed_batch(data, 3, 8, 2, 2, True)
    assert not torch.equal(a.images, c.images)
    for i in range(2):  # each anomaly's mask is transformed with its image: it still covers the same pixels
        idx = [j for j in range(4) if data.types[j] == a.types[i]]
        assert any(math.isclose(float(a.masks[i].sum()), float(data.masks[j].sum())) for j in idx)


def test_new_embeddings_mode_moves_only_the_ua_rows():
    comp, prompt, trainer = _trainer(embeddings="new")
    before = trainer.table.detach().clone()
    batch = M.mixed_batch(_tiny_data(), 0, 0, 2, 2, True)
    t, eps = M.batch_noise(0, 0, (4, 4, 16, 16), 1000)
    trainer.step([(batch, t, eps)])
    changed = (trainer.table.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(prompt.ids.values())


# ------------------------------------------------------------------------------------------- Sec. 3.3, RMP branch
def test_rmp_shapes_for_sd_v1_features_on_the_meta_device():
    arch = architecture("sd_v1")
    with torch.device("meta"):
        rmp = RefinedMaskPrediction.for_models(arch["unet"], arch["vae"])
        fu = [torch.empty(2, 1280, 32, 32), torch.empty(2, 640, 64, 64)]
        fv = [torch.empty(1, 512, 128, 128), torch.empty(1, 512, 256, 256), torch.empty(1, 256, 512, 512)]
        coarse, refined = rmp(fu, fv)
    assert coarse.shape == (2, 2, 64, 64) and refined.shape == (1, 2, 512, 512)
    assert rmp.coarse.blocks[0].qkv.in_features == 192 and len(rmp.coarse.blocks) == 4 and len(rmp.mrms) == 3


def test_rmp_shapes_on_the_mini_prior_features():
    comp = build_random("mini")
    rmp, _ = M.build_rmp(comp, OmegaConf.merge(METHOD.rmp, {"coarse_channels": [32, 16], "heads": 4,
                                                            "norm_groups": 16}))
    comp.unet.eval(), comp.vae.eval()
    z = torch.randn(3, 4, 32, 32)
    e = torch.randn(3, 32, 128)
    fu, fv, img = M.rmp_features(comp, rmp, z, torch.tensor([10, 500, 999]), e, n_refine=2)
    assert [tuple(f.shape[1:]) for f in fu] == [(128, 16, 16), (64, 32, 32)]
    assert [tuple(f.shape[1:]) for f in fv] == [(64, 64, 64), (64, 128, 128), (32, 128, 128)]
    coarse, refined = rmp(fu, fv)
    assert coarse.shape == (3, 2, 32, 32) and refined.shape == (2, 2, 128, 128) and img.shape == (2, 3, 128, 128)


def test_rmp_focal_loss_hand_worked():
    # zero logits: p_t = 0.5 everywhere, focal = 0.25 ln 2 per pixel, for each of the four terms of Eq. 7
    zc, zr = torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8] = 1
    torch.testing.assert_close(rmp_loss(zc, zr, mask, torch.zeros(2, 2, 4, 4), (16, 16)),
                               torch.tensor(4 * 0.25 * math.log(2)))
    # a confident, correct prediction costs ~0; the normal path penalises any anomaly probability
    good_r = torch.stack([1 - mask[:, 0], mask[:, 0]], 1) * 40 - 20
    m_low = (torch.nn.functional.adaptive_avg_pool2d(mask, 4) > 0.5)[:, 0].float()
    good_c = torch.stack([1 - m_low, m_low], 1) * 40 - 20
    ob_ok = torch.tensor([20.0, -20.0]).view(1, 2, 1, 1).expand(2, 2, 4, 4)
    assert rmp_loss(good_c, good_r, mask, ob_ok, (16, 16)) < 1e-6
    bad_ob = torch.tensor([-20.0, 20.0]).view(1, 2, 1, 1).expand(2, 2, 4, 4)
    assert rmp_loss(good_c, good_r, mask, bad_ob, (16, 16)) > 1.0


class SpyRMP(torch.nn.Module):
    """Records what the mask branch sees; returns a fixed probability map per call."""

    def __init__(self, real: RefinedMaskPrediction, values):
        super().__init__()
        self.real, self.values, self.calls = real, list(values), []

    def feature_names(self, unet, vae):
        return self.real.feature_names(unet, vae)

    def forward(self, fu, fv):
        self.calls.append(([f.shape for f in fu], [f.shape for f in fv]))
        p = self.values[len(self.calls) - 1]
        B, H, W = fv[-1].shape[0], *fv[-1].shape[-2:]
        logit = torch.full((B, 1, H, W), math.log(p / (1 - p)))
        return None, torch.cat([torch.zeros_like(logit), logit], 1)


def test_masks_average_the_last_three_steps_on_the_conditional_branch():
    comp = build_random("tiny")
    comp.unet.eval(), comp.vae.eval()
    rmp, _ = M.build_rmp(comp, METHOD.rmp)
    spy = SpyRMP(rmp, [0.1, 0.2, 0.6])
    sched = M.make_scheduler(comp, "dpmsolver++")
    z = torch.randn(2, 4, 16, 16)
    e = torch.randn(2, 24, 16)
    images, probs = M.sample_with_masks(comp, sched, z, e, torch.zeros_like(e), 3.0, 6, spy, mask_steps=3)
    assert len(spy.calls) == 3  # RMP at exactly the last 3 of 6 steps
    assert all(fu[0][0] == 2 and fv[0][0] == 2 for fu, fv in spy.calls)  # conditional half only (CFG batch is 4)
    torch.testing.assert_close(probs, torch.full((2, 64, 64), 0.3))  # mean of 0.1, 0.2, 0.6
    assert images.shape == (2, 3, 64, 64)


def test_official_start_noise_level():
    assert official_start_signal() == pytest.approx(0.098, abs=5e-4)  # A.3 "t = 1500" on SD's unscaled latent


# --------------------------------------------------------------------------------------- train / generate loops
def _cfg(**train):
    return OmegaConf.create({"seed": 0, "product": "widget", "limits": {"max_train_steps": None},
                             "method": OmegaConf.merge(METHOD, {"train": {"steps": 4, "checkpoint_every": 2,
                                                                          **train}})})


def _fresh():
    comp = build_random("tiny")
    return comp, M.build_prompt(["crack", "stain"], comp, METHOD.prompt)


def test_killed_training_resumes_to_the_uninterrupted_weights(tmp_path):
    data = _tiny_data()
    comp, prompt = _fresh()
    M.train_generator(_cfg(), tmp_path / "a", comp, data, prompt)
    reference = {k: v.clone() for k, v in comp.unet.state_dict().items()}
    ref_table = comp.text_encoder.get_input_embeddings().weight.detach().clone()

    class Killed(Exception):
        pass

    def kill(step):
        if step == 3:
            raise Killed
    comp, prompt = _fresh()
    with pytest.raises(Killed):
        M.train_generator(_cfg(), tmp_path / "b", comp, data, prompt, on_step=kill)
    assert (tmp_path / "b" / M.STATE).is_file() and not (tmp_path / "b" / "generator").exists()
    comp, prompt = _fresh()  # a new process: the initial weights again, then the checkpoint of step 2
    M.train_generator(_cfg(), tmp_path / "b", comp, data, prompt)
    for k, v in comp.unet.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert torch.equal(comp.text_encoder.get_input_embeddings().weight.detach(), ref_table)
    assert not (tmp_path / "b" / M.STATE).exists()  # the resumable state goes once the result is saved


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("seas") / "synthetic" / "seed0_res64"
    S.build_world(root, S.WorldConfig(resolution=64, n_train_good=3, n_test_good=1, n_per_type=3,
                                      products=("bottle",)), workers=1, progress=False)
    return root


def _compose(name, overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(name, overrides)


def test_train_and_generate_write_a_reloadable_mvtec_tree_with_binary_masks(world, tmp_path):
    common = ["method=seas", "debug=fast", f"dataset.root={world}", "product=bottle"]
    from core.runs import generate, train
    run = tmp_path / "run"
    train(_compose("train", common), run)
    assert (run / "generator" / "model_index.json").is_file() and (run / "rmp.safetensors").is_file()
    out = tmp_path / "gen"
    gcfg = _compose("generate", common + [f"checkpoint={run}", f"out_dir={out}", "n_per_type=3",
                                          "limits.n_per_type=3", "method.generate.batch_size=2"])
    generate(gcfg, out, overrides=["n_per_type=3"])
    samples = load_folder(out, ["bottle"])
    validate_files(samples)  # image / mask pairing and sizes
    types = S.PRODUCTS["bottle"].defects
    for ty in types:
        rows = [s for s in samples if s.label == 1 and s.anomaly_type == ty]
        assert len(rows) == 3
        for s in rows:
            raw = np.array(__import__("PIL.Image", fromlist=["Image"]).open(s.mask_paths[0]))
            assert raw.shape == (64, 64) and set(np.unique(raw)) <= {0, 255}
            assert read_mask(s.mask_paths).shape == (64, 64)
    assert sum(s.label == 0 for s in samples) == 3  # normals from "a <ob>"
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3 * len(types) + 3
    # a rerun finds everything done and writes nothing
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    generate(gcfg, out, overrides=["n_per_type=3"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    assert len((out / "manifest.jsonl").read_text().splitlines()) == len(lines)


def test_item_randomness_differs_per_item_and_repeats_per_item():
    # torch's CPU generator keeps only the low 32 bits of a seed: keys must differ there
    draws = [torch.randn(4, generator=M.item_generator(0, ty, i)) for ty in (None, "crack") for i in range(5)]
    assert len({tuple(d.tolist()) for d in draws}) == len(draws)
    torch.testing.assert_close(torch.randn(4, generator=M.item_generator(0, "crack", 3)), draws[8])


def test_bad_inputs_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no trained SeaS generator"):
        M.load_generator(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint=<the run directory"):
        M.generate(OmegaConf.create({"method": {"generate": {}}, "device": "cpu"}), None, tmp_path / "out")
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        M.make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], "adamw8bit", 0.0)
    with pytest.raises(ValueError, match="adamw or adamw8bit"):
        M.make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], "sgd", 0.0)
