"""AnomalyDiffusion: every mechanism on hand-worked tensors or tiny random models (anomalydiffusion/)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from anomalydiffusion import method as M
from anomalydiffusion.model import (AnomalyEmbeddings, EmbeddingPrompt, PSPSpatialEncoder, aar_weights_official,
                                    aar_weights_paper, binarize_generated_mask, blend, build_spatial_encoder, dilate,
                                    dilation_radius, hugs_border, latent_mask, masked_diffusion_loss)
from core.data import DatasetError, given_mask_files, load_folder, read_mask
from core.diffusion import ControlledAttnProcessor, TokenReweight
from core.export import read_manifest
from core.models import build_random

REPO = Path(__file__).resolve().parents[1]
METHOD = OmegaConf.load(REPO / "configs/method/anomalydiffusion.yaml").method
SMALL_PSP = dict(units=(1, 1, 1, 1), widths=(8, 8, 16, 16))


# ------------------------------------------------------------------------------------------------ Eq. 5
@pytest.mark.parametrize("normalize", ["mask", "latent"])
def test_masked_loss_ignores_everything_outside_the_mask(normalize):
    g = torch.Generator().manual_seed(0)
    eps, pred = torch.randn(3, 4, 6, 5, generator=g), torch.randn(3, 4, 6, 5, generator=g)
    m = torch.zeros(3, 1, 6, 5)
    m[0, :, 1:3, 2:4] = 1
    m[1, :, 4:, :] = 1
    m[2, :, 0, 0] = 1
    base = masked_diffusion_loss(pred, eps, m, normalize)
    changed = pred + 100 * (1 - m) * torch.randn(3, 4, 6, 5, generator=g)   # anything outside the mask
    assert torch.equal(masked_diffusion_loss(changed, eps, m, normalize), base)
    inside = pred + 0.5 * m
    assert masked_diffusion_loss(inside, eps, m, normalize) != base


def test_masked_loss_normalisations_hand_worked():
    eps = torch.zeros(2, 2, 2, 2)
    pred = torch.zeros(2, 2, 2, 2)
    pred[0, :, 0, 0] = 2.0     # sample 0: one masked position, error 2 in both channels: sum 8
    pred[1, :, :, 0] = 1.0     # sample 1: two masked positions, error 1 in both channels: sum 4
    m = torch.zeros(2, 1, 2, 2)
    m[0, :, 0, 0] = 1
    m[1, :, :, 0] = 1
    # over the mask area: 8 / (2 ch x 1) = 4 and 4 / (2 ch x 2) = 1 -> mean 2.5
    assert masked_diffusion_loss(pred, eps, m, "mask").item() == pytest.approx(2.5)
    # official, over the whole latent (2 x 2 x 2 = 8 elements): 1 and 0.5 -> mean 0.75
    assert masked_diffusion_loss(pred, eps, m, "latent").item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="loss_normalize"):
        masked_diffusion_loss(pred, eps, m, "pixels")


def test_latent_mask_is_binary_at_the_latent_side():
    m = torch.zeros(2, 1, 64, 48)
    m[0, :, 8:24, 8:40] = 1
    lm = latent_mask(m, 16)
    assert lm.shape == (2, 1, 16, 16) and set(lm.unique().tolist()) <= {0.0, 1.0}
    assert lm[0].sum() > 0 and lm[1].sum() == 0


# ------------------------------------------------------------------------------------------ the spatial embedding
def _mask_at(B, S, y, x, h=12, w=10):
    m = torch.zeros(B, 1, S, S)
    m[:, :, y:y + h, x:x + w] = 1
    return m


@pytest.mark.parametrize("kind,opts", [("fpn", {"backbone": "resnet18", "fpn_channels": 32, "head_grid": 4}),
                                       ("psp", SMALL_PSP)])
def test_spatial_tokens_follow_the_mask_and_the_anomaly_embedding_does_not(kind, opts):
    torch.manual_seed(0)
    enc = build_spatial_encoder(kind, 3, 24, 64, **opts).eval()
    a, b = _mask_at(2, 64, 6, 8), _mask_at(2, 64, 40, 36)
    with torch.no_grad():
        ea, eb = enc(a), enc(b)
    assert ea.shape == (2, 3, 24)
    assert (ea - eb).abs().max() > 1e-3               # the mask moved: e_s moved
    assert torch.equal(ea[0], ea[1])                  # the same mask: the same tokens
    emb = AnomalyEmbeddings(["bottle/crack", "bottle/stain"], 4, 24)
    e1 = emb(["bottle/crack", "bottle/stain"])
    assert e1.shape == (2, 4, 24) and not torch.equal(e1[0], e1[1])
    assert torch.equal(emb(["bottle/crack"])[0], e1[0])   # e_a has no input but the key: no location in it
    with pytest.raises(KeyError, match="bottle/scratch"):
        emb(["bottle/scratch"])


def test_psp_encoder_has_the_official_layout_at_full_size():
    enc = PSPSpatialEncoder(4, 1280, 256)
    assert [len(s) for s in enc.stages] == [3, 4, 14, 3]      # IR-50: 24 units
    assert enc.stages[3][-1].res[-1].num_features == 512
    # p1 at 64 x 64 for a 256 input: six stride-2 convs of width 1280 down to 1 x 1, then a linear layer per token
    assert len(enc.heads) == 4 and sum(isinstance(m, torch.nn.Conv2d) for m in enc.heads[0].convs) == 6
    assert enc.heads[0].convs[0].out_channels == 1280


def test_embedding_prompt_splices_the_vectors_where_the_star_was(tiny):
    p = EmbeddingPrompt(tiny.tokenizer, "a photo of a *", 5, "*")
    ids = p.ids(2)
    words = tiny.tokenizer("a photo of a", add_special_tokens=False).input_ids
    assert ids[0, 1:1 + len(words)].tolist() == words and p.span == slice(1 + len(words), 6 + len(words))
    assert ids[0, p.span.stop].item() == tiny.tokenizer.eos_token_id
    v = torch.randn(2, 5, tiny.text_encoder.config.hidden_size, requires_grad=True)
    ctx = p.encode(tiny.text_encoder, v)
    ctx[:, p.span].sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    v2 = v.detach().clone()
    v2[1] += torch.randn_like(v2[1])   # (a constant shift would vanish in the layer norms)
    ctx2 = p.encode(tiny.text_encoder, v2)
    assert torch.allclose(ctx2[0], ctx[0].detach(), atol=1e-6)        # row 0 unchanged
    assert not torch.allclose(ctx2[1, p.span], ctx[1, p.span].detach())  # row 1 reads its own vectors
    with torch.no_grad():   # the hook is gone after the block: a plain encode reads the table again
        plain = tiny.text_encoder(p.ids(1))[0]
        again = tiny.text_encoder(p.ids(1))[0]
    assert torch.equal(plain, again) and not torch.allclose(plain[0, p.span], ctx[0, p.span].detach())
    with pytest.raises(ValueError, match="exactly one"):
        EmbeddingPrompt(tiny.tokenizer, "a photo", 2, "*")
    with pytest.raises(ValueError, match="text encoder takes"):
        EmbeddingPrompt(tiny.tokenizer, "a photo of a *", 40, "*")


# ------------------------------------------------------------------------------------------------ AAR (Sec. 3.3)
def test_paper_aar_weights_sum_to_the_mask_area_and_favour_unchanged_pixels():
    g = torch.Generator().manual_seed(1)
    y = torch.rand(2, 3, 8, 6, generator=g) * 2 - 1
    m = torch.zeros(2, 1, 8, 6)
    m[0, :, 2:6, 1:4] = 1          # 12 pixels
    m[1, :, 0:3, 0:5] = 1          # 15 pixels
    x0 = y + torch.rand(2, 3, 8, 6, generator=g)   # changed everywhere ...
    x0[0, :, 2, 1] = y[0, :, 2, 1]                 # ... except one pixel of each mask
    x0[1, :, 1, 2] = y[1, :, 1, 2]
    w = aar_weights_paper(x0, y, m)
    assert w.shape == (2, 8, 6)
    assert w[0].sum().item() == pytest.approx(12, rel=1e-5) and w[1].sum().item() == pytest.approx(15, rel=1e-5)
    assert (w[m[:, 0] == 0] == 0).all()                      # -inf outside the mask: no weight there
    assert w[0, 2, 1] == w[0][m[0, 0] > 0].max() and w[1, 1, 2] == w[1][m[1, 0] > 0].max()
    # hand-worked: two mask pixels with squared distances 0 and 1 -> softmax(-d) * 2 = 2 e^0 / (1 + e^-1), ...
    y1 = torch.zeros(1, 3, 1, 2)
    x1 = torch.zeros(1, 3, 1, 2)
    x1[0, 0, 0, 1] = 1.0
    w1 = aar_weights_paper(x1, y1, torch.ones(1, 1, 1, 2))
    e = float(np.exp(-1.0))
    assert w1[0, 0].tolist() == pytest.approx([2 / (1 + e), 2 * e / (1 + e)])
    assert torch.equal(aar_weights_paper(x1, y1, torch.zeros(1, 1, 1, 2)), torch.ones(1, 1, 2))   # empty mask


def test_official_dilation_radius_schedule_and_square_dilation():
    assert [dilation_radius(t, 200) for t in (996, 901, 900, 400, 150, 24, 1)] == [8, 8, 8, 4, 2, 0, 0]
    assert [dilation_radius(t, 50) for t in (981, 500, 100, 1)] == [17, 9, 3, 1]
    m = torch.zeros(1, 1, 9, 9)
    m[0, 0, 4, 4] = 1
    assert torch.equal(dilate(m, 0), m)
    d = dilate(m, 2)
    assert d.sum() == 25 and d[0, 0, 2:7, 2:7].min() == 1      # a 5 x 5 square


def test_official_aar_weights_inverse_distance_then_clamp_hand_worked():
    z_y = torch.zeros(1, 2, 1, 4)
    z_t = torch.zeros(1, 2, 1, 4)
    z_t[0, :, 0, 0] = 1.0       # distance 1
    z_t[0, :, 0, 1] = 2.0       # distance 4
    z_t[0, :, 0, 2] = 0.5       # distance 0.25 -- outside the mask
    m = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])
    w, md = aar_weights_official(z_t, z_y, m, t=1, num_steps=200)    # radius 0 at t = 1
    assert torch.equal(md, m)
    # inverse distances 1 and 1/4 -> 2 * (1, 0.25) / 1.25 = (1.6, 0.4) -> clamp [1, 1.5] -> (1.5, 1); outside: 1
    assert w[0, 0].tolist() == pytest.approx([1.5, 1.0, 1.0, 1.0])
    w_big, md_big = aar_weights_official(z_t, z_y, m, t=999, num_steps=200)   # radius 8 covers everything
    assert md_big.sum() == 4 and (w_big >= 1).all() and (w_big <= 1.5).all()
    w0, _ = aar_weights_official(z_y, z_y, m, t=1, num_steps=200)   # zero distance everywhere: all ones
    assert torch.equal(w0, torch.ones(1, 1, 4))


def _attention_inputs(B=2, heads=2, N=16, L=6):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, heads, N, L, generator=g)


def test_official_aar_scales_the_pre_softmax_logits_of_its_columns_only():
    logits = _attention_inputs()
    w = torch.full((2, 4, 4), 1.5)
    edit = TokenReweight([0, 2, 3], w, on="logits")
    out = edit.edit_logits("l", logits)
    assert torch.allclose(out[..., [0, 2, 3]], 1.5 * logits[..., [0, 2, 3]])
    assert torch.equal(out[..., [1, 4, 5]], logits[..., [1, 4, 5]])
    assert torch.equal(edit.edit_probs("l", logits), logits)


def test_paper_aar_multiplies_the_attention_map_of_the_embedding_columns():
    probs = _attention_inputs().softmax(-1)
    w = torch.zeros(2, 4, 4)
    w[:, :2] = 2.0                    # top half of the map: x2, bottom half: 0 (outside the mask)
    out = TokenReweight([2, 3], w, on="probs").edit_probs("l", probs)
    top, bottom = slice(0, 8), slice(8, 16)
    assert torch.allclose(out[:, :, top][..., [2, 3]], 2 * probs[:, :, top][..., [2, 3]])
    assert (out[:, :, bottom][..., [2, 3]] == 0).all()
    assert torch.equal(out[..., [0, 1, 4, 5]], probs[..., [0, 1, 4, 5]])


# ------------------------------------------------------------------------------------------------ Eq. 1 blending
def _cond(tiny, B):
    return tiny.encode_prompt(["a photo of a bottle"] * B)


def _normals_and_masks(B=2, S=64):
    g = torch.Generator().manual_seed(5)
    normals = torch.rand(B, 3, S, S, generator=g)
    masks = torch.zeros(B, 1, S, S)
    masks[0, :, 8:40, 16:48] = 1
    masks[1, :, 30:60, 4:20] = 1
    return normals, masks


@pytest.mark.parametrize("aar", ["none", "paper", "official"])
def test_blending_keeps_the_latent_outside_the_mask_on_the_noised_normal_at_every_step(tiny, aar):
    normals, masks = _normals_and_masks()
    gens = [M.item_generator(0, "bottle/crack", i) for i in range(2)]
    with torch.no_grad():
        images, cb = M.blended_generate(tiny, _cond(tiny, 2), None, normals, masks, gens, steps=4, aar=aar,
                                        columns=[5, 6], record=True)
    assert images.shape == (2, 3, 64, 64) and len(cb.blended) == 4
    if aar != "none":   # the paper re-weights the attention maps of e's columns, the official code their logits
        # (and the start token's column)
        assert cb.edit.on == {"paper": "probs", "official": "logits"}[aar]
        assert sorted(cb.edit.tokens) == ([0, 5, 6] if aar == "official" else [5, 6])
    with torch.no_grad():
        z_y = tiny.encode_images(normals)
    sched = M.ddim(tiny)
    sched.set_timesteps(4)
    # each item's stream: the start noise, then per step the blend's forward noise and the DDIM variance noise
    streams = [M.item_generator(0, "bottle/crack", i) for i in range(2)]
    shape = z_y.shape[1:]
    for g in streams:
        torch.randn(shape, generator=g)
    q = []
    for _ in range(4):
        q.append(torch.stack([torch.randn(shape, generator=g) for g in streams]))
        [torch.randn(shape, generator=g) for g in streams]
    for i, (z, z_y_t, m) in enumerate(cb.blended):
        outside = m.expand_as(z) == 0
        assert outside.any() and (~outside).any()
        assert torch.equal(z[outside], z_y_t[outside])               # Eq. 1 outside the mask, exactly
        # z_y_t is q(y_t | y_0) at this step's t, with this step's own fresh noise
        abar = tiny.scheduler.alphas_cumprod[int(sched.timesteps[i])]
        assert torch.allclose(z_y_t, abar.sqrt() * z_y + (1 - abar).sqrt() * q[i], atol=1e-5)
    assert not torch.equal(q[0], q[1])
    if aar == "official":   # the official sampler blends with the dilated mask: larger at high t, shrinking
        areas = [float(m.sum()) for _, _, m in cb.blended]
        assert areas[0] > areas[-1] >= float(latent_mask(masks, tiny.latent_size).sum())


def test_generation_does_not_depend_on_the_batch_it_runs_in(tiny):
    normals, masks = _normals_and_masks()
    gens = lambda: [M.item_generator(0, "bottle/crack", i) for i in range(2)]  # noqa: E731
    with torch.no_grad():
        both, _ = M.blended_generate(tiny, _cond(tiny, 2), None, normals, masks, gens(), steps=3, aar="official",
                                     columns=[5, 6])
        one, _ = M.blended_generate(tiny, _cond(tiny, 1), None, normals[1:], masks[1:], gens()[1:], steps=3,
                                    aar="official", columns=[5, 6])
    assert torch.allclose(both[1], one[0], atol=1e-5)


def test_aar_changes_the_image_only_through_the_attention_of_its_columns(tiny):
    normals, masks = _normals_and_masks()
    gens = lambda: [M.item_generator(0, "bottle/crack", i) for i in range(2)]  # noqa: E731
    with torch.no_grad():
        plain, _ = M.blended_generate(tiny, _cond(tiny, 2), None, normals, masks, gens(), steps=3, aar="none")
        off, _ = M.blended_generate(tiny, _cond(tiny, 2), None, normals, masks, gens(), steps=3, aar="official",
                                    columns=[5, 6, 7])
        pap, _ = M.blended_generate(tiny, _cond(tiny, 2), None, normals, masks, gens(), steps=3, aar="paper",
                                    columns=[5, 6, 7])
    assert (plain - off).abs().max() > 1e-4 and (plain - pap).abs().max() > 1e-4
    with pytest.warns(UserWarning, match="only without classifier-free guidance"):
        with torch.no_grad():
            M.blended_generate(tiny, _cond(tiny, 2), _cond(tiny, 2) * 0, normals, masks, gens(), steps=1,
                               guidance=2.0, aar="official", columns=[5])
    with pytest.raises(ValueError, match="aar must be one of"):
        M.blended_generate(tiny, _cond(tiny, 2), None, normals, masks, gens(), steps=1, aar="both")


def test_processor_restored_after_generation(tiny):
    normals, masks = _normals_and_masks()
    with torch.no_grad():
        M.blended_generate(tiny, _cond(tiny, 2), None, normals, masks,
                           [M.item_generator(0, "k", i) for i in range(2)], steps=1, aar="paper", columns=[5])
    assert not any(isinstance(m.processor, ControlledAttnProcessor) for m in tiny.unet.modules()
                   if hasattr(m, "processor"))


# ------------------------------------------------------------------------------------------------ masks (Sec. 3.4)
def test_generated_masks_are_binary_and_border_huggers_are_rejected():
    img = torch.zeros(4, 3, 12, 12)
    img[0, :, 4:8, 4:8] = 1.0          # inside: kept
    img[1, :, 0, 2:8] = 1.0            # 6 of 12 pixels of the top row: hugs the border
    img[2, :, 2:6, 11] = 1.0           # 4 of 12 of the right column: exactly 1/3 is allowed
    img[3, :, 4:8, 4:8] = 0.85         # below the threshold: empty -> rejected
    m = binarize_generated_mask(img)
    assert m.dtype == torch.bool and m.shape == (4, 12, 12)
    assert hugs_border(m).tolist() == [False, True, False, True]


def test_mask_sampling_redraws_rejected_masks_from_the_items_own_stream(tiny, monkeypatch):
    calls = []

    def decode(z):   # first draw of item 0 hugs the border, everything else is a centred square
        calls.append(z.shape[0])
        out = torch.zeros(z.shape[0], 3, 64, 64)
        out[:, :, 20:40, 20:40] = 1
        if len(calls) == 1:
            out[0, :, 0, :] = 1
        return out
    monkeypatch.setattr(tiny, "decode_latents", decode)
    p = EmbeddingPrompt(tiny.tokenizer, "a photo of a *", 2, "*")
    e_m = torch.zeros(2, tiny.text_encoder.config.hidden_size)
    masks, draws = M.sample_masks(tiny, p, e_m, [M.item_generator(0, "k", i, "mask") for i in range(3)], steps=2,
                                  eta=1.0, guidance=5.0, threshold=0.9, border=1 / 3, tries=3)
    assert draws == [2, 1, 1] and calls == [3, 1]
    assert masks.dtype == torch.bool and int(masks[0].sum()) == 400 and not masks[0, 0].any()
    monkeypatch.setattr(tiny, "decode_latents", lambda z: torch.ones(z.shape[0], 3, 64, 64))
    with pytest.raises(M.MaskGenerationError, match="method.generate.masks=train"):
        M.sample_masks(tiny, p, e_m, [M.item_generator(0, "k", 0, "mask")], 1, 1.0, 5.0, 0.9, 1 / 3, 2)


# ------------------------------------------------------------------------------------------------ training
def test_augmentation_keeps_the_anomaly_box_inside_the_crop():
    S = 64
    img = torch.rand(3, S, S)
    for y, x in [(0, 0), (50, 52), (30, 2)]:
        m = torch.zeros(1, S, S)
        m[:, y:y + 10, x:x + 12] = 1
        for k in range(20):
            g = torch.Generator().manual_seed(k)
            xi, mi = M.augment_pair(torch.cat([img[:2], m]), m, g, rotate=20, crop_min=0.5)
            assert mi.shape == (1, S, S) and set(mi.unique().tolist()) <= {0.0, 1.0}
            # the mask channel of the image went through the same transform as the mask
            assert ((xi[2] > 0.5) == (mi[0] > 0.5)).float().mean() > 0.97
            # the defect is still there, with at least ~its area (the crop only enlarges it)
            assert mi.sum() >= 0.6 * m.sum()


def test_the_batch_is_a_function_of_the_step_and_draws_every_key():
    bank = M.PairBank(["a/x", "b/y"], {"a/x": torch.rand(3, 3, 16, 16), "b/y": torch.rand(1, 3, 16, 16)},
                      {"a/x": (torch.rand(3, 1, 16, 16) > 0.7).float(), "b/y": (torch.rand(1, 1, 16, 16) > .7).float()},
                      {"a/x": [], "b/y": []})
    aug = dict(flip=True, rotate=20, crop_min=0.75)
    k1, i1, m1 = M.embedding_batch(bank, 0, 5, 4, aug)
    k2, i2, m2 = M.embedding_batch(bank, 0, 5, 4, aug)
    assert k1 == k2 and torch.equal(i1, i2) and torch.equal(m1, m2)
    keys = [k for s in range(50) for k in M.embedding_batch(bank, 0, s, 4, aug)[0]]
    assert 0.35 < keys.count("b/y") / len(keys) < 0.65      # keys drawn uniformly, not images (1 of 4 images)


def _train_cfg(world, model="tiny", **extra):
    ov = ["method=anomalydiffusion", f"model={model}", f"dataset.root={world}", "dataset.resolution=64",
          "product=bottle",
          "method.model.backbone=resnet18", "method.model.fpn_channels=32", "method.train.steps=4",
          "method.train.checkpoint_every=2", "method.masks.steps=3", "method.masks.checkpoint_every=2",
          "method.model.anomaly_tokens=2", "method.model.spatial_tokens=2", "method.masks.tokens=2"]
    ov += [f"{k}={v}" for k, v in extra.items()]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("train", ov)


def test_killed_training_resumes_to_the_uninterrupted_weights(bottle_world, tmp_path):
    from core.models import load_model
    from safetensors.torch import load_file
    cfg = _train_cfg(bottle_world)
    by_key = M.training_anomalies(cfg, ["bottle"])

    def run(dst, on_step=None, masks=False):
        comp = load_model(cfg.model)
        bank = M.PairBank.load(by_key, comp.resolution)
        if masks:
            M.train_mask_embeddings(cfg, dst, comp, bank, on_step=on_step)
        else:
            M.train_embeddings(cfg, dst, comp, bank, on_step=on_step)

    class Killed(Exception):
        pass

    def kill_at(n):
        def f(step):
            if step == n:
                raise Killed
        return f
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run(tmp_path / "a")
    with pytest.raises(Killed):
        run(tmp_path / "b", kill_at(3))
    assert (tmp_path / "b" / M.STATE).is_file() and not (tmp_path / "b" / "embeddings.safetensors").exists()
    run(tmp_path / "b")
    for name in ("embeddings.safetensors", "spatial_encoder.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not (tmp_path / "b" / M.STATE).exists()
    learned = load_file(tmp_path / "a" / "embeddings.safetensors")["weight"]
    init = M.word_embedding(load_model(cfg.model), "defect")
    assert learned.shape == (len(by_key), 2, init.shape[0])
    assert (learned - init).abs().amax(dim=(1, 2)).min() > 0     # every key's embedding learned from its start
    # the mask embeddings: killed in the second key, resumed
    run(tmp_path / "a", masks=True)
    with pytest.raises(Killed):
        run(tmp_path / "b", kill_at(2), masks=True)
    run(tmp_path / "b", masks=True)
    a, b = load_file(tmp_path / "a" / "mask_embeddings.safetensors"), load_file(tmp_path / "b" /
                                                                                 "mask_embeddings.safetensors")
    assert sorted(a) == sorted(by_key) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_products(tmp_path_factory):
    import core.data.synthetic as S
    root = tmp_path_factory.mktemp("w2") / "synthetic" / "seed0_res64"
    S.build_world(root, S.WorldConfig(resolution=64, n_train_good=2, n_test_good=1, n_per_type=3,
                                      products=("bottle", "pill")), workers=1, progress=False)
    return root


def test_one_model_for_two_products_trains_and_generates_a_reloadable_mvtec_tree(two_products, tmp_path):
    from core.runs import generate, train
    cfg = _train_cfg(two_products, **{"method.products": "[bottle,pill]", "method.masks.steps": 1})
    run = tmp_path / "run"
    train(cfg, run)
    meta = json.loads((run / M.META).read_text())
    assert meta["keys"] == sorted(M.training_anomalies(cfg, ["bottle", "pill"]))
    assert {k.split("/")[0] for k in meta["keys"]} == {"bottle", "pill"}

    def gen(product, out, **extra):
        extra = {"n_per_type": 2, "method.generate.masks": "train", **extra}
        ov = ["method=anomalydiffusion", "model=tiny", f"checkpoint={run}", f"out_dir={out}", f"product={product}",
              "method.generate.aar=official", "limits.num_inference_steps=3", *[f"{k}={v}" for k, v in extra.items()]]
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            return generate(compose("generate", ov), out, ov)
    out = tmp_path / "out"
    gen("pill", out)        # the run's config names bottle; pill is one of its products
    table = load_folder(out, ["pill"])
    types = {k.split("/")[1] for k in meta["keys"] if k.startswith("pill/")}
    assert {s.anomaly_type for s in table} == types and len(table) == 2 * len(types)
    for s in table:
        m = read_mask(s.mask_paths)
        assert m.any() and m.shape == (64, 64)
    records = read_manifest(out)
    assert all(r["source"] in meta["train_normals"]["pill"] for r in records)
    # a rerun resumes: nothing to do, nothing rewritten
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    gen("pill", out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    with pytest.raises(DatasetError, match=r"trained on products \['bottle', 'pill'\], not 'cable'"):
        gen("cable", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    # given masks (masks=dir): each pair's mask is one of the given ones, at the image's size
    from PIL import Image
    square = np.zeros((32, 32), np.uint8)
    square[8:20, 4:16] = 255
    for t in types:
        (tmp_path / "given" / t).mkdir(parents=True)
        Image.fromarray(square).save(tmp_path / "given" / t / "a.png")
    gen("pill", tmp_path / "out3", **{"method.generate.masks": "dir", "method.generate.mask_dir": tmp_path / "given"})
    for s in load_folder(tmp_path / "out3", ["pill"]):
        m = read_mask(s.mask_paths)
        assert m.shape == (64, 64) and m.sum() == 4 * 12 * 12 and m[16:40, 8:32].all()
    # masks of an earlier folder, item by item (masks=folder): each item gets the mask that item got there
    gen("pill", tmp_path / "out4", **{"method.generate.masks": "folder", "method.generate.mask_folder": out})
    first = {(s.anomaly_type, Path(s.path).name): s for s in table}
    again = load_folder(tmp_path / "out4", ["pill"])
    assert len(again) == len(first)
    for s in again:
        ref = first[(s.anomaly_type, Path(s.path).name)]
        assert np.array_equal(read_mask(s.mask_paths), read_mask(ref.mask_paths))
    assert len({read_mask(s.mask_paths).tobytes() for s in again}) > 1     # not one mask for every item
    with pytest.raises(FileNotFoundError, match=rf"no mask for {len(types)} of the {3 * len(types)} items of 'pill'"):
        gen("pill", tmp_path / "out5", n_per_type=3,
            **{"method.generate.masks": "folder", "method.generate.mask_folder": out})
    assert not list((tmp_path / "out5").rglob("*.png"))     # refused before anything was drawn
    with pytest.raises(FileNotFoundError, match="not a generated folder"):
        gen("pill", tmp_path / "out6", **{"method.generate.masks": "folder",
                                          "method.generate.mask_folder": tmp_path / "given"})
    with pytest.raises(FileNotFoundError, match="no PNG mask for type"):
        given_mask_files(tmp_path / "given", [*types, "scratch_x"])
    with pytest.raises(ValueError, match="needs method.generate.mask_dir"):
        given_mask_files(None, list(types))


def test_bad_inputs_say_what_to_do(bottle_world, tmp_path, monkeypatch):
    cfg = _train_cfg(bottle_world)
    with pytest.raises(FileNotFoundError, match="no trained AnomalyDiffusion"):
        M.load_trained(tmp_path, build_random("tiny"))
    with pytest.raises(FileNotFoundError, match="checkpoint=<the run directory"):
        M.generate(cfg, None, tmp_path / "out")
    # a dataset without masks
    from core.data import Sample
    real = M.load_from_config

    def no_masks(node, products):
        return [Sample(s.path, s.split, s.product, s.anomaly_type, s.label, ()) for s in real(node, products)]
    monkeypatch.setattr(M, "load_from_config", no_masks)
    with pytest.raises(DatasetError, match="have no mask.*pixel masks"):
        M.training_anomalies(cfg, ["bottle"])
    monkeypatch.setattr(M, "load_from_config", real)
    # a type that the split leaves without a training anomaly
    with pytest.raises(DatasetError, match=r"\['scratch'\].*no training anomaly"):
        M.check_types(["scratch"], M.training_anomalies(cfg, ["bottle"]), "bottle")
    # a missing base model: one line naming model.path
    from core.models.loading import ModelNotFoundError
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        sd = compose("train", ["method=anomalydiffusion", "model=sd15", f"dataset.root={bottle_world}",
                               "dataset.resolution=64", "product=bottle"])
    with pytest.raises(ModelNotFoundError, match="model.path"):
        M.train(sd, tmp_path / "sd")
    with pytest.raises(ValueError, match="stages may hold"):
        M.train(_train_cfg(bottle_world, **{"method.train.stages": "[rmp]"}), tmp_path / "x")


# ------------------------------------------------------------------------------------------------ the LDM base
def _tiny_ldm_dir(root: Path) -> Path:
    """A random LDMTextToImagePipeline layout at the tiny architecture's sizes (BERT tokenizer, LDMBert encoder)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    from core.models import SD_V1_SCHEDULE, architecture
    spec = architecture("tiny")
    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "*", "defect", "bottle", "with"]
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(words))
    BertTokenizer(str(root / "tokenizer" / "vocab.txt")).save_pretrained(root / "tokenizer")
    LDMBertModel(LDMBertConfig(vocab_size=len(words), max_position_embeddings=24, encoder_layers=1,
                               encoder_ffn_dim=32, encoder_attention_heads=2, head_dim=8, d_model=16)
                 ).save_pretrained(root / "bert")
    UNet2DConditionModel(**spec["unet"]).save_pretrained(root / "unet")
    AutoencoderKL(**spec["vae"]).save_pretrained(root / "vqvae")
    DDIMScheduler.from_config(SD_V1_SCHEDULE).save_pretrained(root / "scheduler")
    return root


def test_the_official_ldm_base_loads_trains_and_generates(tmp_path, bottle_world):
    from core.models import ModelNotFoundError, load_model
    with pytest.raises(ModelNotFoundError, match="LDMTextToImagePipeline.*model.path"):
        load_model({"kind": "ldm", "path": str(tmp_path / "nowhere")})
    comp = load_model({"kind": "ldm", "path": str(_tiny_ldm_dir(tmp_path / "ldm"))})
    assert type(comp.text_encoder).__name__ == "LDMBertModel" and comp.tokenizer.model_max_length == 24
    p = EmbeddingPrompt(comp.tokenizer, "a photo of a *", 6, "*")
    ids = p.ids(1)[0].tolist()
    assert ids[0] == comp.tokenizer.cls_token_id and ids[p.span.stop] == comp.tokenizer.sep_token_id
    assert ids[p.span.stop + 1] == comp.tokenizer.pad_token_id
    cfg = _train_cfg(bottle_world, "ldm", **{"model.path": str(tmp_path / "ldm"), "model.resolution": 64,
                                             "method.train.steps": 2})
    by_key = M.training_anomalies(cfg, ["bottle"])
    bank = M.PairBank.load(by_key, comp.resolution)
    before = M.word_embedding(comp, "defect")
    M.train_embeddings(cfg, tmp_path / "run", comp, bank)
    from safetensors.torch import load_file
    w = load_file(tmp_path / "run" / "embeddings.safetensors")["weight"]
    assert w.shape[-1] == 16 and not torch.equal(w[0, 0], before)
    normals, masks = _normals_and_masks()
    with torch.no_grad():
        cond = p.encode(comp.text_encoder, torch.randn(2, 6, 16))
        images, _ = M.blended_generate(comp, cond, None, normals, masks,
                                       [M.item_generator(0, "k", i) for i in range(2)], steps=2, aar="official",
                                       columns=p.columns())
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_embedding_training_in_bf16_keeps_float32_weights_and_learns(bottle_world, tmp_path):
    from safetensors.torch import load_file

    from core.models import load_model
    cfg = _train_cfg(bottle_world, **{"method.train.mixed_precision": "bf16", "method.train.steps": 2})
    comp = load_model(cfg.model)
    bank = M.PairBank.load(M.training_anomalies(cfg, ["bottle"]), comp.resolution)
    M.train_embeddings(cfg, tmp_path, comp, bank)
    w = load_file(tmp_path / "embeddings.safetensors")["weight"]
    init = M.word_embedding(comp, "defect")
    assert w.dtype == torch.float32 and torch.isfinite(w).all() and (w - init).abs().max() > 0
    enc = load_file(tmp_path / "spatial_encoder.safetensors")
    assert all(v.dtype == torch.float32 or not v.is_floating_point() for v in enc.values())
