"""CUT's equations on hand-worked tensors (cut/model.py)."""
from __future__ import annotations

import math

import pytest
import torch

from cut.model import (activated_pixels, adapted_dice_loss, annotation, attention_loss, foreground_mask,
                       gaussian_kernel, masked_update, refinement_threshold, smooth, step_size, stop_early,
                       token_maps)


def test_token_maps_drop_the_start_token_and_softmax_the_rest_over_tokens():
    torch.manual_seed(0)
    p = torch.rand(2, 3, 4, 5).softmax(-1)                       # (B, h, w, L): probabilities over 5 tokens
    a = token_maps(p, scale=100.0)
    assert a.shape == (2, 3, 4, 4)
    assert torch.allclose(a.sum(-1), torch.ones(2, 3, 4))        # a distribution over the 4 remaining tokens
    e = torch.exp(100 * p[1, 2, 3, 1:])
    assert torch.allclose(a[1, 2, 3], e / e.sum(), atol=1e-6)
    # the start token's value does not matter
    q = p.clone()
    q[..., 0] = 0.9
    assert torch.allclose(token_maps(q), a)


def test_the_two_gaussian_kernels_hand_worked():
    k = gaussian_kernel(3, 0.5, "gaussian")
    g = torch.tensor([math.exp(-2.0), 1.0, math.exp(-2.0)])      # exp(-d^2 / (2 * 0.25)) at d = -1, 0, 1
    assert torch.allclose(k, (g[:, None] * g[None]) / (g.sum() ** 2), atol=1e-6)
    ka = gaussian_kernel(3, 0.5, "attend_and_excite")
    ga = torch.tensor([math.exp(-1.0), 1.0, math.exp(-1.0)])     # exp(-(d / (2 * 0.5))^2)
    assert torch.allclose(ka, (ga[:, None] * ga[None]) / (ga.sum() ** 2), atol=1e-6)
    assert torch.allclose(gaussian_kernel(3, 0.5 * math.sqrt(2), "gaussian"), ka, atol=1e-6)
    with pytest.raises(ValueError, match="kernel"):
        gaussian_kernel(3, 0.5, "box")


def test_smooth_keeps_the_size_sums_and_reflects_at_the_border():
    a = torch.zeros(2, 5, 6)
    a[0, 2, 3] = 1.0
    a[1, 0, 0] = 1.0
    s = smooth(a, 3, 0.5, "gaussian")
    k = gaussian_kernel(3, 0.5, "gaussian")
    assert s.shape == (2, 5, 6)
    assert torch.allclose(s[0, 1:4, 2:5], k, atol=1e-6)           # an inner impulse spreads as the kernel
    # at the corner the reflected copies do not exist beyond the edge: the corner keeps the kernel's centre weight
    assert s[1, 0, 0] == pytest.approx(float(k[1, 1]), abs=1e-6)


def test_attention_loss_and_the_masked_update():
    a = torch.tensor([[[0.1, 0.9], [0.3, 0.2]], [[0.5, 0.4], [0.7, 0.6]]])
    m = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]]])
    assert attention_loss(a, m).tolist() == pytest.approx([1 - 0.3, 1 - 0.6])   # the max inside the mask only
    z = torch.ones(2, 4, 3, 2)
    grad = torch.full_like(z, 2.0)
    fg = torch.zeros(2, 1, 3, 2)
    fg[0, 0, 0, 0] = 1
    fg[1, 0, 2, 1] = 1
    out = masked_update(z, grad, torch.tensor([0.5, 0.25]), fg)
    assert out[0, :, 0, 0].tolist() == [0.0] * 4 and out[1, :, 2, 1].tolist() == [0.5] * 4
    assert (out[0].sum() - (z[0].sum() - 4 * 1.0)).abs() < 1e-6      # nothing moves outside the foreground


def test_eq_5_step_size_and_the_early_stop_window():
    a = torch.zeros(2, 4, 4)
    a[0, :2, :2] = 1.0                                           # 4 pixels above the mean
    a[1] = torch.arange(16.0).reshape(4, 4)                      # 8 above the mean 7.5
    n = activated_pixels(a)
    assert n.tolist() == [4, 8]
    assert activated_pixels(torch.full((1, 4, 4), 0.5)).tolist() == [0]    # strictly above: a flat map has none
    alpha = step_size(500, n, torch.tensor([8, 8]), lam=10.0, delta=1 / 1000)
    assert alpha.tolist() == pytest.approx([10 * 1.5 * 0.5, 10 * 1.5 * 1.0])
    assert step_size(0, n, torch.tensor([8, 8]))[1] < alpha[1]   # smaller as t falls
    n_t = torch.tensor([5, 10, 11, 49, 50, 80])
    assert stop_early(9, n_t).tolist() == [False] * 6              # not in the first 10 steps
    assert stop_early(10, n_t).tolist() == [False, False, True, True, False, False]   # 10 < n_t < 50


def test_refinement_thresholds_attend_and_excite_or_every_step():
    th = {0: 0.05, 10: 0.5, 20: 0.8}
    assert [refinement_threshold(i, th) for i in (0, 1, 10, 15, 20, 30)] == [0.05, None, 0.5, None, 0.8, None]
    assert [refinement_threshold(i, th, "every_step") for i in (0, 9, 10, 19, 20, 30)] == \
        [0.05, 0.05, 0.5, 0.5, 0.8, 0.8]
    with pytest.raises(ValueError, match="refinement rule"):
        refinement_threshold(0, th, "sometimes")


def test_foreground_is_the_side_away_from_the_border():
    img = torch.zeros(2, 3, 8, 10)
    img[0, :, 2:6, 3:7] = 0.9                                    # bright object on a dark backdrop
    img[1] = 0.9
    img[1, :, 3:5, 4:8] = 0.1                                    # dark object on a bright backdrop
    fg = foreground_mask(img)
    assert torch.equal(fg[0], (img[0, 0] > 0.5).float())
    assert torch.equal(fg[1], (img[1, 0] < 0.5).float())


def test_annotation_upsamples_and_peaks_at_one():
    a = torch.zeros(2, 4, 4)
    a[0, 1, 2] = 0.2
    a[1, 3, 0] = 0.05
    out = annotation(a, 16)
    assert out.shape == (2, 16, 16) and torch.allclose(out.flatten(1).amax(1), torch.ones(2))
    assert out[0, 4:8, 8:12].mean() > out[0, 12:, :4].mean() and out[1, 12:, :4].mean() > out[1, :4, 12:].mean()


def test_adapted_dice_loss_hand_worked():
    y = torch.zeros(2, 1, 2, 2)
    p = torch.zeros(2, 1, 2, 2)
    y[0, 0, 0] = 1                                               # 2 target pixels, prediction covers 1 of them + 1
    p[0, 0, 0, 0] = 1
    p[0, 0, 1, 1] = 1
    dice0 = (2 * 1 + 1) / (2 + 2 + 1)
    l = adapted_dice_loss(y, p, beta=0.5)
    assert l[0].item() == pytest.approx(1 - dice0 / (dice0 + 0.5))
    assert l[1].item() == pytest.approx(1 - 1 / 1.5)             # both empty: Dice 1
    # a smaller beta lowers the loss of an imprecise overlap (the paper's point)
    assert adapted_dice_loss(y, p, beta=0.1)[0] < adapted_dice_loss(y, p, beta=1.0)[0]


# ------------------------------------------------------------------------------------------ the generation loop
def _cfg(world, **extra):
    from hydra import compose, initialize_config_dir
    from pathlib import Path
    ov = ["method=cut", "model=tiny", f"dataset.root={world}", "dataset.resolution=64", "product=bottle",
          "split.k=2", "method.generate.num_inference_steps=6", "method.generate.n_images=2",
          "method.generate.batch_size=2", "method.generate.attention.resolution=8",
          "method.generate.anomaly_word=photo", *[f"{k}={v}" for k, v in extra.items()]]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        return compose("train", ov)


def test_optimisation_lowers_l_att_and_moves_the_latent_only_inside_the_foreground(tiny):
    """One optimise_step on the tiny U-Net: L_att falls, the latent outside the foreground is unchanged."""
    from omegaconf import OmegaConf
    from core.diffusion import layers_at
    from cut import method as M
    g = OmegaConf.create({"attention": {"scale": 100.0, "kernel": "attend_and_excite", "kernel_size": 3, "sigma": 0.5},
                         "optimise": {"thresholds": {0: 0.05}, "refinement": "attend_and_excite",
                                      "max_refinement_iters": 1, "early_stop_after": 10, "early_stop": [10, 50],
                                      "lam": 50.0}})
    layers = layers_at(tiny.unet, tiny.latent_size, [8])
    torch.manual_seed(0)
    z = torch.randn(2, 4, tiny.latent_size, tiny.latent_size)
    cond = tiny.encode_prompt(["a photo of a bottle", "a photo of a bottle"]).detach()
    fg = torch.zeros(2, 64, 64)
    fg[0, 8:40, 16:56] = 1
    fg[1, 24:64, 0:32] = 1
    fg_map = (torch.nn.functional.interpolate(fg[:, None], size=(8, 8), mode="area")[:, 0] > 0.5).float()
    fg_lat = (torch.nn.functional.interpolate(fg[:, None], size=(16, 16), mode="area") > 0.5).float()
    t = torch.tensor([600, 600])
    token = 2
    with torch.no_grad():
        before = attention_loss(M.anomaly_map(tiny, layers, z, t, cond, token, g, grad=False), fg_map)
    z2, n_t, n_start, stopped, iters = M.optimise_step(tiny, layers, z, t, cond, token, g, fg_map, fg_lat, 0, None,
                                                       torch.zeros(2, dtype=torch.bool), 1000)
    with torch.no_grad():
        after = attention_loss(M.anomaly_map(tiny, layers, z2, t, cond, token, g, grad=False), fg_map)
    assert iters == 1 and torch.equal(n_start, n_t)
    assert (after < before).all(), (before, after)
    assert torch.equal(z2 * (1 - fg_lat), z * (1 - fg_lat)) and not torch.equal(z2, z)
    # a stopped image does not move
    z3, *_ = M.optimise_step(tiny, layers, z, t, cond, token, g, fg_map, fg_lat, 0, None,
                             torch.tensor([True, False]), 1000)
    assert torch.equal(z3[0], z[0]) and not torch.equal(z3[1], z[1])


def test_generate_writes_annotated_images_and_resumes(bottle_world, tmp_path):
    import json
    import numpy as np
    from PIL import Image
    from cut import method as M
    cfg = _cfg(bottle_world)
    M.generate(cfg, None, tmp_path / "gen")
    recs = [json.loads(x) for x in (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()]
    normals = M.training_normals(cfg, "bottle", "")
    assert len(normals) == 2                                     # k = 2 shots
    assert len(recs) == 2 and {r["anomaly_type"] for r in recs} == {"photo"}
    for r in recs:
        m = np.array(Image.open(tmp_path / "gen" / r["mask"])) > 0
        assert r["source"] in normals and m.any() and r["prompt"] == "a photo of a bottle that is damaged"
    first = {r["image"]: (tmp_path / "gen" / r["image"]).read_bytes() for r in recs}
    (tmp_path / "gen" / recs[1]["image"]).unlink()               # a lost file is made again, the same
    lines = (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()
    (tmp_path / "gen" / "manifest.jsonl").write_text(lines[0] + "\n")
    M.generate(cfg, None, tmp_path / "gen")
    again = [json.loads(x) for x in (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()]
    assert {r["image"]: (tmp_path / "gen" / r["image"]).read_bytes() for r in again} == first


def test_clear_errors_for_an_unknown_product_word_and_a_missing_anomaly_word(bottle_world, tmp_path):
    from cut import method as M
    with pytest.raises(ValueError, match=r"cannot say \['zqxv'\].*method.class_words.bottle"):
        M.generate(_cfg(bottle_world, **{"+method.class_words.bottle": "zqxv"}), None, tmp_path / "g1")
    with pytest.raises(ValueError, match="'scratched' occurs 0 times"):
        M.generate(_cfg(bottle_world, **{"method.generate.anomaly_word": "scratched"}), None, tmp_path / "g2")
    assert not (tmp_path / "g1").exists() and not (tmp_path / "g2").exists()
