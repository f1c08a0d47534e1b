"""Background-aware defect generation: the equations on hand-worked tensors and a tiny random U-Net (bgdefect/)."""
from __future__ import annotations

import pytest
import torch

from bgdefect.model import (background_from_masked, c2_input, disentanglement_loss, inversion_step,
                            masked_cross_attention, noised_pair, refine_mask, sampling_step, start_latent,
                            two_part_condition)
from core.diffusion import AttentionStore, attention_control, cross_attention_layers


def _masks(B=2, S=8):
    m = torch.zeros(B, 1, S, S)
    m[0, :, 1:4, 2:6] = 1
    m[1, :, 4:8, 0:3] = 1
    return m


# ------------------------------------------------------------------------------------------------ Eq. 10-11
def test_masked_cross_attention_is_one_softmax_per_part_on_its_side_of_the_mask():
    g = torch.Generator().manual_seed(0)
    B, heads, S, L = 2, 3, 4, 5
    logits = torch.randn(B, heads, S * S, 2 * L, generator=g)
    mask = torch.zeros(B, S, S)
    mask[0, :2] = 1
    mask[1, :, 3] = 1
    probs = masked_cross_attention(mask, L).edit_logits("layer", logits).softmax(-1)
    inside = mask.flatten(1).bool()[:, None, :, None].expand(B, heads, S * S, 1)
    # inside: M_def = softmax over the first part only, zero on C_bg; outside: M_bg, zero on C_def
    want_in = logits[..., :L].softmax(-1)
    want_out = logits[..., L:].softmax(-1)
    assert torch.allclose(torch.where(inside, probs[..., :L], want_in), want_in, atol=1e-6)
    assert torch.allclose(torch.where(~inside, probs[..., L:], want_out), want_out, atol=1e-6)
    assert (probs[..., L:][inside.expand_as(probs[..., L:])] == 0).all()
    assert (probs[..., :L][(~inside).expand_as(probs[..., :L])] == 0).all()


def test_masked_cross_attention_acts_in_every_layer_of_a_unet(tiny):
    """The edit must act in diffusers' U-Net (Shape-Guided Diffusion's monkey patch silently stopped doing so)."""
    ctx, L = two_part_condition(tiny.encode_prompt, ["a photo of a crack"] * 2, ["a photo of a bottle"] * 2)
    assert ctx.shape[1] == 2 * L
    m = _masks(2, 16)[:, 0]
    store = AttentionStore(softmax="token", average_heads=False)
    layers = cross_attention_layers(tiny.unet)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), attention_control(tiny.unet, layers, store=store, edit=masked_cross_attention(m, L)):
        tiny.unet(z, torch.tensor([500, 500]), encoder_hidden_states=ctx)
    assert set(store.maps) == set(layers)
    for name, maps in store.maps.items():
        p = maps[-1]                                          # (B, heads, N, 2L)
        side = int(p.shape[2] ** 0.5)
        r = torch.nn.functional.interpolate(m[:, None], size=(side, side), mode="area").flatten(1) >= 0.5
        r = r[:, None, :, None]
        assert (p[..., L:] * r).abs().max() == 0 and (p[..., :L] * ~r).abs().max() == 0, name
        assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5)


# ------------------------------------------------------------------------------------------------ Eq. 5-7, Lemma 3.1
def test_masked_latent_is_the_background_of_the_noised_latent():
    g = torch.Generator().manual_seed(2)
    z0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    m = _masks()
    z_t, z_t_m = noised_pair(torch.tensor([0.3, 0.8]), z0, m, eps)
    assert torch.allclose((1 - m) * z_t, z_t_m) and (m * z_t_m == 0).all()
    assert torch.allclose(z_t[1], 0.8 ** 0.5 * z0[1] + 0.2 ** 0.5 * eps[1])


def test_disentanglement_loss_hand_worked_and_as_one_residual():
    g = torch.Generator().manual_seed(3)
    eps, e1, e2 = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    m = _masks()
    loss = disentanglement_loss(eps, e1, e2, m)
    assert torch.allclose(loss, ((eps - m * e1 - (1 - m) * e2) ** 2).mean())      # the last line of Eq. 5
    # C1's prediction counts only inside, C2's only outside
    assert torch.equal(disentanglement_loss(eps, e1 + 5 * (1 - m), e2 + 5 * m, m), loss)
    one = torch.zeros(1, 1, 1, 2)
    assert disentanglement_loss(torch.zeros(1, 1, 1, 2), torch.tensor([[[[2.0, 9.0]]]]),
                                torch.tensor([[[[9.0, 1.0]]]]), one + torch.tensor([1.0, 0.0])).item() == 2.5


def test_lemma_3_1_the_background_comes_back_from_the_masked_latent_alone():
    g = torch.Generator().manual_seed(4)
    z0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    m = _masks()
    a = torch.tensor([0.05, 0.6])
    _, z_t_m = noised_pair(a, z0, m, eps)
    # zero loss: the C2 branch predicts the noise outside the mask (inside, anything)
    eps_c2 = (1 - m) * eps + m * torch.randn(2, 4, 8, 8, generator=g)
    assert torch.allclose(background_from_masked(z_t_m, eps_c2, a, m), (1 - m) * z0, atol=1e-5)
    assert not torch.allclose(background_from_masked(z_t_m, eps_c2 + 0.1, a, m), (1 - m) * z0, atol=1e-3)


# ------------------------------------------------------------------------------------------------ Eq. 8-9
def test_inversion_step_is_ddim_inversion_outside_and_keeps_the_mask_area_at_zero():
    g = torch.Generator().manual_seed(5)
    m = _masks()
    z = (1 - m) * torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    a_prev, a_t = 0.9, 0.7
    out = inversion_step(z, eps, a_prev, a_t, m)
    assert (m * out == 0).all()
    # outside: DDIM's deterministic step run backwards, x0 = (z - sqrt(1 - a_prev) eps) / sqrt(a_prev)
    x0 = (z - (1 - a_prev) ** 0.5 * eps) / a_prev ** 0.5
    want = a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps
    assert torch.allclose((1 - m) * out, (1 - m) * want, atol=1e-5)


def test_sampling_step_is_the_ddim_step_with_the_combined_prediction():
    g = torch.Generator().manual_seed(6)
    m = _masks()
    z, e1, e2 = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    a_t, a_prev = 0.4, 0.75
    out = sampling_step(z, e1, e2, a_t, a_prev, m)
    eps = (1 - m) * e2 + m * e1
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    assert torch.allclose(out, a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps, atol=1e-5)
    z_T = start_latent((1 - m) * z, m, e1)
    assert torch.equal(z_T * m, e1 * m) and torch.equal(z_T * (1 - m), (1 - m) * z)


def _c2_branch(m, t_scale):
    """A stand-in U-Net for the C2 branch: a function of everything it is given, the defect area included."""
    def eps_c2(x, i):
        return torch.tanh(x * t_scale[i]) + 0.3 * (m * x).mean(dim=(1, 2, 3), keepdim=True) + 0.1 * i
    return eps_c2


@pytest.mark.parametrize("mode", ["masked", "literal"])
def test_proposition_3_3_the_background_does_not_depend_on_the_defect_noise(mode):
    """Invert the masked normal latent (Eq. 8), start from z_T* with two different defect noises, sample (Eq. 9):
    with the C2 branch on the masked latent the backgrounds of the two results are identical; with the literal Eq. 9
    (C2 reads z_t*, defect area included) the defect noise leaks into the background."""
    g = torch.Generator().manual_seed(7)
    m = _masks()
    abar = torch.linspace(0.95, 0.05, 6, dtype=torch.float64)
    scale = torch.linspace(0.5, 1.5, 6)
    eps_c2 = _c2_branch(m, scale)
    z0 = (1 - m) * torch.randn(2, 4, 8, 8, generator=g)
    z = z0
    for i in range(1, 6):
        z = inversion_step(z, eps_c2(z, i - 1), abar[i - 1], abar[i], m)
    results = []
    for seed in (10, 11):
        n = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        zs = start_latent(z, m, n)
        for i in range(5, 0, -1):
            x = c2_input(zs, m, mode)
            # the C1 branch reads everything: in a trained model it sees the background too
            e1 = torch.tanh(zs)
            e2 = eps_c2(x, i)
            zs = sampling_step(zs, e1, e2, abar[i], abar[i - 1], m)
        results.append(zs)
    same = torch.allclose((1 - m) * results[0], (1 - m) * results[1], atol=1e-6)
    assert same == (mode == "masked")
    assert not torch.allclose(m * results[0], m * results[1])      # the defects differ
    with pytest.raises(ValueError, match="c2_input"):
        c2_input(z, m, "both")


# ------------------------------------------------------------------------------------------------ Eq. 13
def test_refinement_keeps_attention_of_at_least_one_half_inside_the_mask():
    att = torch.tensor([[[0.9, 0.6], [0.4, 0.8]], [[0.5, 0.49], [1.0, 0.0]]])
    m = torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
    out = refine_mask(att, m, 2)
    assert out.tolist() == [[[True, True], [False, False]], [[True, False], [False, False]]]
    up = refine_mask(att, m, 8)
    assert up.shape == (2, 8, 8) and up.dtype == torch.bool and not up[1, 6:, :].any()
    with pytest.raises(ValueError, match="one shape"):
        refine_mask(att, m[:, :1], 4)


# ------------------------------------------------------------------------------------------------ training
def _cfg(world, **extra):
    from hydra import compose, initialize_config_dir
    from pathlib import Path
    ov = ["method=bgdefect", "model=tiny", f"dataset.root={world}", "dataset.resolution=64", "product=bottle",
          "method.train.steps_per_type=4", "method.train.checkpoint_every=2", "method.train.batch=2",
          *[f"{k}={v}" for k, v in extra.items()]]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        return compose("train", ov)


def test_killed_type_training_resumes_to_the_uninterrupted_unet(bottle_world, tmp_path):
    from bgdefect import method as M
    from core.models import load_model
    from core.models.slim import load_slim
    cfg = _cfg(bottle_world)
    by_type = M.training_anomalies(cfg, "bottle")
    t = next(iter(by_type))
    parts = M.prompts(cfg.method.prompt, "bottle", t)

    def run(out, on_step=None):
        comp = load_model(cfg.model)
        images, masks = M.load_pairs(by_type[t], comp.resolution)
        out.mkdir(parents=True, exist_ok=True)
        M.train_type(cfg, out, comp, images, masks, parts, 0, on_step=on_step)

    class Killed(Exception):
        pass

    def kill(step):
        if step == 3:
            raise Killed
    run(tmp_path / "a")
    with pytest.raises(Killed):
        run(tmp_path / "b", kill)
    assert (tmp_path / "b" / M.STATE).is_file()
    run(tmp_path / "b")
    a, b = load_slim(tmp_path / "a" / "generator"), load_slim(tmp_path / "b" / "generator")
    base = load_model(cfg.model).unet.state_dict()
    moved = max(float((v - base[k]).abs().max()) for k, v in a.unet.state_dict().items())
    assert moved > 0
    for k, v in a.unet.state_dict().items():
        assert torch.equal(v, b.unet.state_dict()[k]), k
    assert not (tmp_path / "b" / M.STATE).exists()


def test_train_writes_one_generator_per_type_and_fold_errors_are_clear(bottle_world, tmp_path, monkeypatch):
    from bgdefect import method as M
    from core.data import DatasetError
    from core.models.slim import is_slim
    from core.runs import train
    cfg = _cfg(bottle_world, **{"method.train.steps_per_type": 1})
    train(cfg, tmp_path / "run")
    types = sorted(M.training_anomalies(cfg, "bottle"))
    assert sorted(p.name for p in (tmp_path / "run" / "types").iterdir()) == types
    assert all(is_slim(tmp_path / "run" / "types" / t / "generator") for t in types)
    with pytest.raises(ValueError, match="other images"):
        M.train(_cfg(bottle_world, **{"split.fold": 1}), tmp_path / "run")
    real = M.load_from_config

    def one_crack(node, products):   # a type with a single image: fold 1 has none of it
        rows = real(node, products)
        cracks = [s for s in rows if s.anomaly_type == "crack"]
        return [s for s in rows if s.anomaly_type != "crack"] + cracks[:1]
    monkeypatch.setattr(M, "load_from_config", one_crack)
    with pytest.raises(DatasetError, match=r"Fold 1 .*\['crack'\].*split.fold"):
        M.training_anomalies(_cfg(bottle_world, **{"split.fold": 1}), "bottle")


def test_training_runs_every_cross_attention_layer_under_the_masked_attention(bottle_world, tmp_path, monkeypatch):
    from bgdefect import method as M
    from core.models import load_model
    cfg = _cfg(bottle_world, **{"method.train.steps_per_type": 1})
    by_type = M.training_anomalies(cfg, "bottle")
    t = next(iter(by_type))
    comp = load_model(cfg.model)
    images, masks = M.load_pairs(by_type[t], comp.resolution)
    seen = []
    real = M.masked_cross_attention

    def spy(mask, L):
        edit = real(mask, L)
        inner = edit.edit_logits

        def edit_logits(layer, logits):
            seen.append((layer, logits.shape[0], logits.shape[-1]))
            return inner(layer, logits)
        edit.edit_logits = edit_logits
        return edit
    monkeypatch.setattr(M, "masked_cross_attention", spy)
    inputs = []
    forward = comp.unet.forward

    contexts = []

    def record(sample, *a, **kw):
        inputs.append(sample.detach().clone())
        contexts.append(kw["encoder_hidden_states"].detach().clone())
        return forward(sample, *a, **kw)
    monkeypatch.setattr(comp.unet, "forward", record)
    M.train_type(cfg, tmp_path, comp, images, masks, M.prompts(cfg.method.prompt, "bottle", t), 0)
    z_t, z_t_m = inputs[0].chunk(2)       # Eq. 6-7: the second half is the masked latent of the first
    _, mask = M.step_batch(images, masks, 0, 0, 2, False)
    m = M.latent_region(mask, comp.latent_size)
    assert 0 < m.mean() < 1
    assert torch.allclose(z_t_m, (1 - m) * z_t, atol=1e-6) and not torch.allclose(z_t_m, z_t)
    parts = M.prompts(cfg.method.prompt, "bottle", t)
    with torch.no_grad():
        enc = {k: comp.encode_prompt([v])[0] for k, v in parts.items()}
    L = comp.tokenizer.model_max_length
    c = contexts[0]                        # rows: C1 = [C_def, C_bg] for z_t, C2 = [C_m, C_bg] for z_t^m
    for row, first in ((0, "defect"), (1, "defect"), (2, "mask"), (3, "mask")):
        assert torch.allclose(c[row, :L], enc[first], atol=1e-5) and torch.allclose(c[row, L:], enc["background"],
                                                                                      atol=1e-5)
    layers = {layer for layer, _, _ in seen}
    from core.diffusion import cross_attention_layers
    assert layers == set(cross_attention_layers(comp.unet))
    assert {(b, k) for _, b, k in seen} == {(4, 2 * L)}   # [z_t; z_t^m] of a batch of 2, keys [C_def|C_m, C_bg]


# ------------------------------------------------------------------------------------------------ generation
def _tiny_scene(tiny):
    from core.diffusion import inference_scheduler
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 64, 64)
    mask[0, 8:40, 16:48] = 1          # two different masks: a per-row mix-up cannot hide
    mask[1, 30:60, 2:30] = 1
    x = torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        c1, L = two_part_condition(tiny.encode_prompt, ["a photo of a crack"], ["a photo of a bottle"])
        c2, _ = two_part_condition(tiny.encode_prompt, ["a photo of a blank area"], ["a photo of a bottle"])
        z0 = tiny.encode_images(x)
    return mask, z0, c1, c2, L, inference_scheduler(tiny.scheduler.config, "ddim", "leading")


def test_masked_inversion_is_eq_8_with_eps_at_the_previous_level_and_keeps_the_mask_area_zero(tiny):
    from bgdefect import method as M
    from core.diffusion import attention_control, cross_attention_layers
    mask, z0, c1, c2, L, sched = _tiny_scene(tiny)
    m = M.latent_region(mask[:, None], 16)
    with torch.no_grad():
        path = M.invert_masked(tiny, sched, c2, L, z0, mask, 4, "previous")
        ts = [int(t) for t in sched.timesteps.flip(0)]
        abar = sched.alphas_cumprod.double()
        z, levels = (1 - m) * z0, [torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64)]
        want = [z]
        for i, t in enumerate(ts):      # Eq. 8 by hand: eps(z~_{t-1}, t-1, C2) under the masked attention
            with attention_control(tiny.unet, cross_attention_layers(tiny.unet), edit=masked_cross_attention(mask, L)):
                e = tiny.unet(z, torch.tensor(ts[i - 1] if i else 0), encoder_hidden_states=c2.expand(2, -1, -1)).sample
            z = inversion_step(z, e, levels[-1], abar[t], m)
            levels.append(abar[t])
            want.append(z)
    assert len(path) == len(want) == 5
    for a, b in zip(path, want):
        assert torch.allclose(a, b, atol=1e-5)
        assert (m * a).abs().max() == 0                       # z~_t^m stays zero on the mask all the way
    assert not torch.allclose(path[-1], M.invert_masked(tiny, sched, c2, L, z0, mask, 4, "target")[-1], atol=1e-3)
    with pytest.raises(ValueError, match="eps_timestep=target"):
        M.invert_masked(tiny, sched, c2, L, z0, mask, 4, "previous", fixed_point_iters=2)


def test_eq_9_sampler_feeds_c1_the_latent_and_c2_its_masked_background(tiny, monkeypatch):
    from bgdefect import method as M
    mask, z0, c1, c2, L, sched = _tiny_scene(tiny)
    m = M.latent_region(mask[:, None], 16)
    sched.set_timesteps(3)
    z_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    calls, forward = [], tiny.unet.forward

    def spy(sample, t, **kw):
        out = forward(sample, t, **kw)
        calls.append((sample.clone(), t.clone(), kw["encoder_hidden_states"].clone(), out.sample.clone()))
        return out
    monkeypatch.setattr(tiny.unet, "forward", spy)
    with torch.no_grad():
        z_out, path = M.sample_eq9(tiny, sched, c1, c2, L, z_T, mask, "masked", return_path=True)
    assert len(calls) == 3
    abar, ts = sched.alphas_cumprod.double(), [int(t) for t in sched.timesteps]
    z = z_T
    for i, (inp, t, ctx, eps) in enumerate(calls):
        assert torch.equal(inp[:2], z) and torch.allclose(inp[2:], (1 - m) * z)   # rows: [z_t*; (1 - m) z_t*]
        assert (t == ts[i]).all()
        assert torch.equal(ctx[:2], c1.expand(2, -1, -1)) and torch.equal(ctx[2:], c2.expand(2, -1, -1))
        a_prev = abar[ts[i + 1]] if i + 1 < 3 else torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64)
        z = sampling_step(z, eps[:2], eps[2:], abar[ts[i]], a_prev, m)     # (1 - m) eps_C2 + m eps_C1
        assert torch.allclose(path[i + 1], z, atol=1e-6)
    assert torch.allclose(z_out, z, atol=1e-6)


@pytest.mark.parametrize("mode", ["masked", "literal"])
def test_proposition_3_3_on_the_tiny_unet_the_background_retraces_the_inversion(tiny, mode):
    """Invert (Eq. 8), start from z_T* with two defect noises, sample (Eq. 9) with the tiny U-Net. With the C2 branch on
    the masked latent the backgrounds of the two runs are identical (Prop. 3.3: the defect does not touch them) and,
    with the implicit inversion step, retrace the inversion path: largest relative distance over all levels measured
    here 1.7e-4 (50 steps, 20 fixed-point iterations), against 2.7 with the explicit step on this random U-Net.
    The literal Eq. 9 (C2 reads z_t*) lets the defect noise into the background."""
    from bgdefect import method as M
    mask, z0, c1, c2, L, sched = _tiny_scene(tiny)
    m = M.latent_region(mask[:, None], 16)
    with torch.no_grad():
        inv = M.invert_masked(tiny, sched, c2, L, z0, mask, 50, "target", fixed_point_iters=20)
        runs = []
        for seed in (1, 2):
            n = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
            runs.append(M.sample_eq9(tiny, sched, c1, c2, L, start_latent(inv[-1], m, n), mask, mode,
                                     return_path=True)[1])
    same = torch.allclose((1 - m) * runs[0][-1], (1 - m) * runs[1][-1], atol=1e-6)
    assert same == (mode == "masked")
    assert not torch.allclose(m * runs[0][-1], m * runs[1][-1], atol=1e-3)          # the defects differ
    rel = max(float(((1 - m) * (a - b)).norm() / ((1 - m) * b).norm()) for a, b in zip(runs[0], inv[::-1]))
    assert (rel < 2e-3) == (mode == "masked"), rel


def test_defect_attention_records_the_c1_rows_defect_tokens_in_the_window_and_refines_with_eq_13():
    from bgdefect import method as M
    from bgdefect.model import DefectAttention
    rec = DefectAttention(tokens=[2, 3], rows=slice(0, 2), layers=["a", "b"])
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(4, 3, 16, 6, generator=g).softmax(-1)   # [C1 rows; C2 rows], heads 3, 4x4 map, 6 tokens
    rec.record("a", probs, probs)
    rec.record("c", probs * 0, probs * 0)                      # a layer not chosen
    rec.active = False
    rec.record("a", probs * 0, probs * 0)                      # outside the window
    rec.active = True
    small = torch.rand(4, 3, 4, 6, generator=g).softmax(-1)    # a 2x2 layer: averaged after bilinear resizing
    rec.record("b", small, small)
    want_a = probs[:2, :, :, 2:4].sum(-1).mean(1).reshape(2, 4, 4)
    want_b = torch.nn.functional.interpolate(small[:2, :, :, 2:4].sum(-1).mean(1).reshape(2, 1, 2, 2), size=(4, 4),
                                             mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(rec.mean_map(), (want_a + want_b) / 2, atol=1e-6)
    mask = torch.zeros(2, 32, 32)
    mask[0, :16, :16] = 1
    mask[1, 8:32, 8:32] = 1
    out = M.refined_masks(rec, mask, within_target=False)
    a = M.resized_mask(mask, 4) * rec.mean_map()
    assert torch.equal(out, refine_mask(a, M.resized_mask(mask, 4), (32, 32)))
    peak = M.refined_masks(rec, mask, "max", within_target=False)
    assert peak.sum() >= out.sum() and (peak & ~torch.nn.functional.interpolate(
        M.resized_mask(mask, 4)[:, None], size=(32, 32), mode="bilinear")[:, 0].gt(0)).sum() == 0
    # as printed, the resized coarse map spills over a target whose border is not on the map's cells; within_target
    # (the default) cuts it at the target's border
    odd = torch.zeros(2, 32, 32)
    odd[0, 3:13, 5:14] = 1
    odd[1, 10:27, 2:30] = 1
    spill = M.refined_masks(rec, odd, "max", within_target=False)
    assert (spill & (odd < 0.5)).any()
    inside = M.refined_masks(rec, odd, "max")
    assert torch.equal(inside, spill & (odd > 0.5)) and inside.any()


def test_token_positions_find_the_defect_words_once(tiny):
    from bgdefect.model import token_positions
    tok = tiny.tokenizer
    ids = tok("a photo of a broken large defect").input_ids
    pos = token_positions(tok, "a photo of a broken large defect", "broken large")
    assert [ids[i] for i in pos] == tok("broken large", add_special_tokens=False).input_ids and pos[0] == 5
    with pytest.raises(ValueError, match="exactly once"):
        token_positions(tok, "a crack and a crack", "crack")


def test_generate_writes_each_type_on_normals_with_training_masks_and_resumes(bottle_world, tmp_path):
    """End to end on the tiny world: n images per type, each on a real normal training image (its record names it)
    with one of the type's training masks as the target (with refinement off the output mask is that mask); every
    record names the run's fold; a rerun after a kill finishes with the same files."""
    import json
    import numpy as np
    from PIL import Image
    from bgdefect import method as M
    from core.runs import train
    from omegaconf import open_dict
    ov = {"method.train.steps_per_type": 1, "method.generate.num_inference_steps": 2, "method.generate.n_per_type": 3,
          "method.generate.batch_size": 2, "method.generate.refine.resolutions": "[8]",
          "method.generate.refine.enabled": "false"}
    cfg = _cfg(bottle_world, **ov)
    train(cfg, tmp_path / "run")
    with open_dict(cfg):
        cfg.checkpoint = str(tmp_path / "run")
    M.generate(cfg, tmp_path / "run", tmp_path / "gen")
    recs = [json.loads(x) for x in (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()]
    types = sorted(M.training_anomalies(cfg, "bottle"))
    assert sorted({r["anomaly_type"] for r in recs}) == types and len(recs) == 3 * len(types)
    normals = M.training_normals(cfg, "bottle", "")
    by_type = M.training_anomalies(cfg, "bottle")
    for r in recs:
        assert r["fold"] == 0 and r["source"] in normals and r["refined"] is False
        got = np.array(Image.open(tmp_path / "gen" / r["mask"])) > 0
        bank = M.load_pairs(by_type[r["anomaly_type"]], 64)[1][:, 0].numpy() > 0.5
        assert any((got == b).all() for b in bank) and got.any()
    assert len({r["source"] for r in recs}) > 1 and len({r["mask"] for r in recs}) == len(recs)
    # kill after the first batch, rerun: the same files
    first = {r["image"]: (tmp_path / "gen" / r["image"]).read_bytes() for r in recs}
    real, calls = M.sample_eq9, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    import pytest as _pt
    M.sample_eq9 = dies
    try:
        with _pt.raises(KeyboardInterrupt):
            M.generate(cfg, tmp_path / "run", tmp_path / "gen2")
    finally:
        M.sample_eq9 = real
    M.generate(cfg, tmp_path / "run", tmp_path / "gen2")
    again = [json.loads(x) for x in (tmp_path / "gen2" / "manifest.jsonl").read_text().splitlines()]
    assert [r["image"] for r in again] == [r["image"] for r in recs]
    for r in again:
        assert (tmp_path / "gen2" / r["image"]).read_bytes() == first[r["image"]]


def test_placement_nearest_puts_each_mask_on_a_normal_like_its_own_anomaly_image(bottle_world, tmp_path):
    """placement=nearest, k=1: each item's source normal is the training normal nearest (outside the defect) to the
    anomaly image its target mask came from; with the independent draw (any) the sources differ."""
    import json
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image
    from bgdefect import method as M
    from core.data.pairing import nearest_normals
    from core.runs import train
    ov = {"method.train.steps_per_type": 1, "method.generate.num_inference_steps": 2, "method.generate.n_per_type": 4,
          "method.generate.batch_size": 3, "method.generate.refine.enabled": "false"}
    cfg = _cfg(bottle_world, **ov)
    train(cfg, tmp_path / "run")
    out = {}
    for placement in ("nearest", "any"):
        c = _cfg(bottle_world, **ov, **{"method.generate.placement": placement, "method.generate.placement_k": 1})
        M.generate(c, tmp_path / "run", tmp_path / placement)
        out[placement] = [json.loads(x) for x in (tmp_path / placement / "manifest.jsonl").read_text().splitlines()]
    normals = M.training_normals(cfg, "bottle", "")
    small = torch.stack([F.interpolate(M.load_normal(p, 64)[None], size=(32, 32), mode="area")[0] for p in normals])
    by_type = M.training_anomalies(cfg, "bottle")
    checked = 0
    for r in out["nearest"]:
        images, bank = M.load_pairs(by_type[r["anomaly_type"]], 64)
        got = np.array(Image.open(tmp_path / "nearest" / r["mask"])) > 0
        j = [i for i in range(bank.shape[0]) if (got == (bank[i, 0].numpy() > 0.5)).all()]
        assert j, "the target mask is one of the type's training masks"
        near = nearest_normals(images, bank, small, k=1)
        assert r["source"] in {normals[int(near[i, 0])] for i in j}
        checked += 1
    assert checked == len(out["nearest"]) > 0
    assert [r["source"] for r in out["any"]] != [r["source"] for r in out["nearest"]]
    with pytest.raises(ValueError, match="placement=nearest .* Fix: method.generate.placement=any"):
        M.generate(_cfg(bottle_world, **{"method.generate.placement": "nearest", "method.generate.masks": "dir"}),
                   tmp_path / "run", tmp_path / "dir")


def test_generate_errors_name_the_fix(bottle_world, tmp_path):
    from bgdefect import method as M
    from core.runs import train
    cfg = _cfg(bottle_world, **{"method.train.steps_per_type": 1})
    with pytest.raises(FileNotFoundError, match="checkpoint="):
        M.generate(cfg, None, tmp_path / "gen")
    with pytest.raises(FileNotFoundError, match="no bgdefect training run"):
        M.generate(cfg, tmp_path / "nothing", tmp_path / "gen")
    train(cfg, tmp_path / "run")
    t = sorted(M.training_anomalies(cfg, "bottle"))[0]
    import shutil
    shutil.rmtree(tmp_path / "run" / "types" / t / "generator")
    with pytest.raises(FileNotFoundError, match=rf"no finished generator for type\(s\) \['{t}'\]"):
        M.generate(cfg, tmp_path / "run", tmp_path / "gen")
    train(cfg, tmp_path / "run")
    for key, bad, msg in (("c2_input", "both", "c2_input"), ("inversion.eps_timestep", "later", "eps_timestep"),
                          ("refine.steps", "[0.5,0.2]", "refine.steps"), ("masks", "dir", "mask_dir")):
        with pytest.raises(ValueError, match=msg):
            M.generate(_cfg(bottle_world, **{f"method.generate.{key}": bad}), tmp_path / "run", tmp_path / "gen")
    assert not (tmp_path / "gen").exists()          # nothing written before the settings are checked
    with pytest.raises(ValueError, match=r"refine.resolutions=\[99\]: .*runs at: \[.*Fix"):
        M.generate(_cfg(bottle_world, **{"method.generate.refine.resolutions": "[99]"}), tmp_path / "run",
                   tmp_path / "gen")


def test_mvtec_loco_trains_and_generates_with_the_kinds_words_and_unioned_masks(tmp_path):
    """MVTec LOCO: the two anomaly folders are the types, prompted with the experiment's words; the target mask is
    the union of an image's ground-truth masks (two squares here), so with refinement off the output mask is it."""
    import json
    import numpy as np
    from PIL import Image
    from hydra import compose, initialize_config_dir
    from pathlib import Path
    from omegaconf import open_dict
    import trees
    from bgdefect import method as M
    from core.runs import train
    root = trees.mvtec_loco(tmp_path / "loco")
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose("train", ["experiment=bgdefect_mvtec_loco", "model=tiny", f"dataset.root={root}",
                                "product=breakfast_box", "method.train.steps_per_type=1",
                                "method.generate.num_inference_steps=2", "method.generate.n_per_type=1",
                                "method.generate.refine.enabled=false"])
    train(cfg, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / M.META).read_text())
    assert meta["types"] == ["logical_anomalies", "structural_anomalies"]
    assert meta["prompts"]["logical_anomalies"]["defect"] == "a photo of a missing or misplaced part defect"
    with open_dict(cfg):
        cfg.checkpoint = str(tmp_path / "run")
    M.generate(cfg, tmp_path / "run", tmp_path / "gen")
    recs = [json.loads(x) for x in (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    for r in recs:
        got = np.array(Image.open(tmp_path / "gen" / r["mask"])) > 0
        want = np.zeros((64, 64), bool)            # the tree's squares (1, 1, 4) and (9, 9, 5) of 16 px, at 64 px
        want[4:20, 4:20] = True
        want[36:56, 36:56] = True
        assert (got == want).all()


def _background_benchmark():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bgdefect_background.py"
    spec = importlib.util.spec_from_file_location("bgdefect_background", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("strength,calls", [(1.0, 10), (0.5, 5), (0.24, 2)])
def test_background_benchmark_img2img_noises_to_the_strength_and_an_exact_eps_returns_z0(tiny, monkeypatch,
                                                                                         strength, calls):
    """The img2img reference of benchmarks/bgdefect_background.py: z0 forward-noised with eps to the level a fraction
    s up the schedule, then deterministic DDIM; with a denoiser that predicts that eps exactly every step has the
    same x0 = z0, so the result is z0 noised to the scheduler's final level (as every DDIM sample ends):
    sqrt(abar_final) z0 + sqrt(1 - abar_final) eps; the number of denoiser calls is round(s * steps)."""
    from core.diffusion import inference_scheduler
    mod = _background_benchmark()
    B, C, S = 2, 4, 6
    z0, noise = torch.randn(B, C, S, S), torch.randn(B, C, S, S)
    seen = []

    def exact(comp, layers, ctx, L, mask):
        def eps(z, t):
            seen.append(int(t[0]))
            return noise
        return eps
    monkeypatch.setattr(mod, "masked_eps", exact)
    monkeypatch.setattr(mod, "cross_attention_layers", lambda unet: [])
    sched = inference_scheduler(tiny.scheduler.config, "ddim", "leading")
    sched.set_timesteps(10)
    out = mod.img2img(tiny, sched, torch.zeros(1, 3, 8), 1, z0, torch.zeros(B, 8, 8), noise, strength)
    assert len(seen) == calls and seen == [int(t) for t in sched.timesteps[10 - calls:]]
    fin = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float32)
    assert 0.9 < float(fin) < 1
    assert torch.allclose(out, fin.sqrt() * z0 + (1 - fin).sqrt() * noise, atol=1e-5)
    # a denoiser off by a constant lands elsewhere (the test can fail)
    monkeypatch.setattr(mod, "masked_eps", lambda *a: (lambda z, t: noise + 0.3))
    assert not torch.allclose(mod.img2img(tiny, sched, torch.zeros(1, 3, 8), 1, z0, torch.zeros(B, 8, 8), noise,
                                          strength), z0, atol=1e-2)


def test_background_benchmark_errors_hand_worked():
    """Pixel error outside / beyond one latent cell / inside the mask, latent error outside / inside, per item."""
    mod = _background_benchmark()
    S = 12                                      # a 3 x 3 latent of 4 px cells
    x = torch.zeros(2, 3, S, S)
    mask = torch.zeros(2, S, S)
    mask[0, 0:4, 0:4] = 1                       # item 0: latent cell (0, 0)
    mask[1, 8:12, 8:12] = 1                     # item 1: latent cell (2, 2)
    out = x.clone()
    out[0, :, 0:4, 0:4] = 0.4                   # inside: 0.4 * 255 = 102
    out[0, :, :, 8:12] = 0.2                    # 51 on 48 of the 128 outside pixels, all of them beyond one cell
    out[1, 0] = 0.3                             # one channel of three everywhere: 25.5
    z0 = torch.ones(2, 1, 3, 3)
    z = z0.clone()
    z[0, 0, 0, 0] = 3.0                         # inside item 0's latent cell: |2| / |1|
    z[1, 0, 0, 0] = 2.0                         # outside item 1's: 1 / sqrt(8)
    e = mod.errors(x, out, mask, z0, z, cell=4)
    assert e["pixel_in"].tolist() == pytest.approx([102.0, 25.5])
    assert e["pixel_out"].tolist() == pytest.approx([51.0 * 48 / 128, 25.5])
    # beyond one cell (4 px) of item 0's mask: all but rows 0-7 x columns 0-7, 80 px, 48 of them at 51
    assert e["pixel_far"].tolist() == pytest.approx([51.0 * 48 / 80, 25.5])
    assert e["latent_in"].tolist() == pytest.approx([2.0, 0.0])
    assert e["latent_out"].tolist() == pytest.approx([0.0, 1 / 8 ** 0.5])
