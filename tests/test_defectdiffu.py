"""DefectDiffu's architecture and equations on hand-worked tensors and a tiny DefectDiT (defectdiffu/model.py,
core/models/dit.py)."""
from __future__ import annotations

import pytest
import torch

from core.models.dit import DiT, load_matching, timestep_embedding, unpatchify
from defectdiffu.model import (DefectDiT, SpatialCrossAttention, attention_map, attention_ratio, average_masks,
                               clip_ratio, defect_region_loss, defectdiffu_loss, double_free, drop_conditions,
                               mask_grid, prompts, single_scale, unified_defect)

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=24, num_heads=3, learn_sigma=True)


def _tiny(groups=(2, 3, 1), text_dim=10, seed=0) -> DefectDiT:
    torch.manual_seed(seed)
    m = DefectDiT(groups=groups, text_dim=text_dim, **TINY)
    # adaLN-Zero starts every block as the identity; give the zero-initialised maps values so that they act
    for p in m.parameters():
        if p.requires_grad and not p.any():
            p.data.normal_(0, 0.1)
    return m.eval()


# ------------------------------------------------------------------------------------------------ DiT
def test_dit_starts_as_zero_and_its_names_are_the_original_checkpoints():
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=24, depth=2, num_heads=3, num_classes=5)
    out = m(torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 5]))
    assert out.shape == (2, 8, 8, 8) and not out.any()          # adaLN-Zero and a zero output layer
    names = set(m.state_dict())
    for k in ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight", "pos_embed",
              "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.bias", "blocks.0.mlp.fc1.weight",
              "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"):
        assert k in names
    assert m.y_embedder.embedding_table.weight.shape == (6, 24)  # 5 classes + the null class


def test_timestep_embedding_and_pos_embed_hand_worked():
    e = timestep_embedding(torch.tensor([0.0, 2.0]), 6, max_period=100.0)
    f = torch.tensor([1.0, 100 ** (-1 / 3), 100 ** (-2 / 3)])
    assert torch.allclose(e[1], torch.cat([torch.cos(2 * f), torch.sin(2 * f)]), atol=1e-6)
    assert torch.equal(e[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    # DiT's 2-D sin-cos table: first half the column (w) coordinate, second half the row; token 1 = (row 0, col 1)
    m = DiT(input_size=8, patch_size=2, hidden_size=8, depth=1, num_heads=2, num_classes=1)
    pos = m.pos_embed[0]
    om = torch.tensor([1.0, 0.01])
    assert torch.allclose(pos[1], torch.cat([torch.sin(om), torch.cos(om), torch.zeros(2), torch.ones(2)]), atol=1e-6)
    assert torch.allclose(pos[4], torch.cat([torch.zeros(2), torch.ones(2), torch.sin(om), torch.cos(om)]), atol=1e-6)


def test_unpatchify_places_each_token_on_its_patch():
    n, p, c = 2, 2, 3
    x = torch.arange(n * 4 * p * p * c, dtype=torch.float32).reshape(n, 4, p * p * c)
    img = unpatchify(x, p, c)
    assert img.shape == (2, 3, 4, 4)
    # token 1 is (row 0, col 1): pixels rows 0-1, cols 2-3; its vector is laid out (p, p, c)
    assert img[1, 2, 1, 3] == x[1, 1].reshape(p, p, c)[1, 1, 2]
    assert img[0, 0, 2, 0] == x[0, 2].reshape(p, p, c)[0, 0, 0]


def test_dit_round_trips_through_save_and_load(tmp_path):
    torch.manual_seed(1)
    m = DiT(input_size=8, patch_size=2, hidden_size=24, depth=2, num_heads=3, num_classes=4)
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    m.save(tmp_path / "dit")
    back = DiT.load(tmp_path / "dit")
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 50, 999]), torch.tensor([0, 3, 4])
    assert torch.equal(back(x, t, y), m(x, t, y))
    from core.models.loading import ModelNotFoundError
    with pytest.raises(ModelNotFoundError, match="model.dit_path"):
        DiT.load(tmp_path / "none")


def test_defectdiffu_starts_from_a_dit_where_names_and_shapes_match():
    """Non-strict start (as the official code from ImageNet DiT): the shared blocks, embedders and output layer come
    from the DiT; the text projection, cross-attention and mask head are new; a tensor of another shape is left."""
    src = DiT(num_classes=7, depth=6, **TINY)
    for p in src.parameters():
        p.data.normal_(0, 0.1)
    dst = DefectDiT(groups=(2, 3, 1), text_dim=10, **TINY)
    loaded, left = load_matching(dst, src.state_dict())
    assert torch.equal(dst.blocks[4].attn.qkv.weight, src.blocks[4].attn.qkv.weight)
    assert "blocks.5.adaLN_modulation.1.weight" in loaded and "y_embedder.embedding_table.weight" not in loaded
    assert all(k.startswith(("y_embedders", "cross_defect", "adapt_mask")) for k in left) and left
    bad = dict(src.state_dict())
    bad["final_layer.linear.weight"] = torch.zeros(3, 3)
    loaded, left = load_matching(DefectDiT(groups=(2, 3, 1), text_dim=10, **TINY), bad)
    assert "final_layer.linear.weight" in left


# ---------------------------------------------------------------------------------------- Sec. 3.2 / 3.4
def test_each_block_group_receives_exactly_its_own_prompt():
    """Background blocks get t_emb + W y_p, defect blocks t_emb + W y_d (their adaLN and their cross-attention's
    context), fusion blocks and the output layer t_emb + W y_f."""
    m = _tiny()
    B = 2
    x, t = torch.randn(B, 4, 8, 8), torch.tensor([10, 700])
    y = {k: torch.randn(B, 10) for k in ("background", "defect", "fusion")}
    seen: dict[str, list] = {"blocks": [], "cross": [], "final": []}
    hooks = [b.adaLN_modulation.register_forward_hook(lambda mod, inp, out: seen["blocks"].append(inp[0]))
             for b in m.blocks]
    hooks += [c.register_forward_hook(lambda mod, inp, out: seen["cross"].append(inp[1])) for c in m.cross_defect]
    hooks.append(m.final_layer.adaLN_modulation.register_forward_hook(
        lambda mod, inp, out: seen["final"].append(inp[0])))
    with torch.no_grad():
        m(x, t, y["background"], y["defect"], y["fusion"])
        want = {k: m.t_embedder(t) + m.y_embedders(v) for k, v in y.items()}
    for h in hooks:
        h.remove()
    groups = ["background"] * 2 + ["defect"] * 3 + ["fusion"]
    assert len(seen["blocks"]) == 6
    for got, g in zip(seen["blocks"], groups):
        assert torch.allclose(got, want[g], atol=1e-6)
        for other in set(want) - {g}:
            assert not torch.allclose(got, want[other], atol=1e-3)
    assert len(seen["cross"]) == 3 and all(torch.allclose(c, want["defect"], atol=1e-6) for c in seen["cross"])
    assert torch.allclose(seen["final"][0], want["fusion"], atol=1e-6)


def test_groups_act_on_the_output_only_through_their_prompt():
    """Changing y_p changes the output; with no background blocks it changes nothing (the groups are separate)."""
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    yp, yd, yf = torch.randn(2, 10), torch.randn(2, 10), torch.randn(2, 10)
    with torch.no_grad():
        m = _tiny()
        assert not torch.allclose(m(x, t, yp, yd, yf)[0], m(x, t, yp + 1, yd, yf)[0])
        m0 = _tiny(groups=(0, 3, 2))
        assert torch.equal(m0(x, t, yp, yd, yf)[0], m0(x, t, yp + 1, yd, yf)[0])


def test_spatial_cross_attention_is_a_softmax_over_positions_per_head():
    torch.manual_seed(0)
    att = SpatialCrossAttention(12, 3)
    x, ctx = torch.randn(2, 5, 12), torch.randn(2, 12)
    out, maps = att(x, ctx)
    assert maps.shape == (2, 3, 5) and out.shape == (2, 5, 12)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 3), atol=1e-6)        # each head a distribution over positions
    # hand-worked for head 1 of image 1
    q = att.to_q(att.norm(x)).reshape(2, 5, 3, 4)[1, :, 1]
    k = att.to_k(ctx).reshape(2, 3, 4)[1, 1]
    v = att.to_v(ctx).reshape(2, 3, 4)[1, 1]
    a = (q @ k / 2).softmax(0)
    assert torch.allclose(maps[1, 1], a, atol=1e-6)
    assert torch.allclose(out[1, :, 4:8], a[:, None] * v[None], atol=1e-6)


def test_mask_head_reads_the_defect_maps_stacked_on_channels_per_token():
    m = _tiny()
    got = {}
    m.adapt_mask.register_forward_hook(lambda mod, inp, out: got.update(inp=inp[0], out=out))
    with torch.no_grad():
        eps, mask_f, maps = m(torch.randn(2, 4, 8, 8), torch.tensor([5, 5]), *torch.randn(3, 2, 10))
    assert maps.shape == (2, 3, 3, 16) and mask_f.shape == (2, 4, 8, 8) and eps.shape == (2, 8, 8, 8)
    assert got["inp"].shape == (2, 16, 9)
    # token 7's channels are (block 0 heads 0-2, block 1 heads 0-2, block 2 heads 0-2) at position 7
    assert torch.equal(got["inp"][1, 7], maps[1, :, :, 7].reshape(-1))


# -------------------------------------------------------------------------------------------- Eq. 7-11
def test_attention_ratio_and_clip_hand_worked():
    maps = torch.zeros(2, 2, 1, 4)
    maps[0, 0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    maps[0, 1, 0] = torch.tensor([0.3, 0.2, 0.1, 0.4])           # mean: 0.2, 0.2, 0.2, 0.4
    maps[1, :, 0] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    a = attention_map(maps)
    assert torch.allclose(a[0], torch.tensor([0.2, 0.2, 0.2, 0.4]))
    mask = torch.tensor([[0, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.float32)
    r = attention_ratio(a, mask, alpha=0.0)
    assert torch.allclose(r, torch.tensor([0.6 / 0.4, 0.3 / 0.7]))
    r = attention_ratio(a, mask, alpha=0.1)
    assert torch.allclose(r, torch.tensor([0.6 / 0.5, 0.3 / 0.8]))
    assert clip_ratio(torch.tensor([0.5, 2.0, 3.7, 8.0, 11.0])).tolist() == pytest.approx([2, 2, 3.7, 8, 8])


def test_defect_region_loss_and_the_objective_hand_worked():
    eps = torch.zeros(2, 4, 2, 2)
    pred = torch.ones(2, 4, 2, 2)
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, 0] = 1                                        # a quarter of image 0's latent
    ratio = torch.tensor([3.0, 5.0])
    assert defect_region_loss(pred, eps, mask, ratio).tolist() == pytest.approx([3 * 0.25, 0.0])
    maps = torch.full((2, 2, 1, 4), 0.25)
    grid = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 1]])
    mf, mt = torch.zeros(2, 4, 2, 2), torch.full((2, 4, 2, 2), 2.0)
    out = defectdiffu_loss(pred, eps, mask, maps, grid, mf, mt, lam=0.2, alpha=0.0)
    # image 0: Rat = 0.75 / 0.25 = 3 -> R 3; image 1: Rat 0 -> R 2 (clipped), its mask is empty in the latent
    assert out["ratio"].item() == pytest.approx(2.5)
    assert out["mse"].item() == pytest.approx(1.0) and out["loss_m"].item() == pytest.approx(4.0)
    assert out["loss_d"].item() == pytest.approx((3 * 0.25 + 0) / 2)
    assert out["loss"].item() == pytest.approx(1.0 + 0.375 + 0.2 * 4.0)


def test_ratio_gradient_flows_unless_detached():
    pred = torch.ones(1, 4, 2, 2)
    mask = torch.ones(1, 1, 2, 2)
    grid = torch.tensor([[1.0, 0, 0, 0]])
    for detach, flows in ((False, True), (True, False)):
        maps = torch.tensor([0.2, 0.3, 0.2, 0.3]).reshape(1, 1, 1, 4).requires_grad_()   # Rat 4: inside the clip
        p = pred.clone().requires_grad_()
        out = defectdiffu_loss(p, torch.zeros_like(pred), mask, maps, grid, torch.zeros(1, 4, 2, 2),
                               torch.zeros(1, 4, 2, 2), detach_ratio=detach)
        out["loss"].backward()
        assert (maps.grad is not None and maps.grad.abs().sum() > 0) == flows and p.grad.abs().sum() > 0


def test_mask_grid_keeps_any_coverage():
    m = torch.zeros(2, 1, 8, 8)
    m[0, 0, 0, 0] = 1
    m[1, 0, 4:8, 4:8] = 1
    g = mask_grid(m, 4)
    assert g.shape == (2, 1, 4, 4) and g[0].sum() == 1 and g[0, 0, 0, 0] == 1 and g[1].sum() == 4


# ---------------------------------------------------------------------------------------------- Algorithm 1
def test_algorithm_1_dropout_frequencies_over_many_draws():
    g = torch.Generator().manual_seed(0)
    n = 20000
    d_norm, p_norm = drop_conditions(["good"] * n, ["bottle"] * n, 0.2, 0.3, g)
    d_def, p_def = drop_conditions(["crack"] * n, ["bottle"] * n, 0.2, 0.3, g)
    share = lambda xs, v: sum(x == v for x in xs) / n  # noqa: E731
    assert share(d_norm, "good") == 1.0
    assert share(p_norm, None) == pytest.approx(0.2, abs=0.012)
    assert share(d_def, "good") == pytest.approx(0.3, abs=0.012)
    assert share(p_def, None) == pytest.approx(1 - 0.8 ** 2, abs=0.012)     # lines 1 and 4: two chances
    both = sum(d == "good" and p is None for d, p in zip(d_def, p_def)) / n
    assert both == pytest.approx(0.3 * 0.36, abs=0.01)                       # independent draws
    assert set(p for p in p_def if p is not None) == {"bottle"}


def test_prompts_of_the_three_parts_and_the_null_product():
    assert prompts("hole", "metal nut") == {"product": "a photo of metal nut", "defect": "a photo of hole",
                                            "fusion": "a photo of hole metal nut"}
    assert prompts("good", None) == {"product": "", "defect": "a photo of good", "fusion": "a photo of good"}
    assert prompts("good", None, "industry")["product"] == "a photo of industry"


# ------------------------------------------------------------------------------------------ Eq. 4 / Eq. 12
def test_double_free_guidance_reductions_and_independent_scales():
    torch.manual_seed(0)
    g0, gp, d0 = torch.randn(3, 2, 4, 3, 5)
    assert torch.equal(double_free(g0, gp, d0, 0.0, 0.0), g0)                         # both 0: unconditional branch
    assert torch.allclose(double_free(g0, gp, d0, 4.0, 0.0), single_scale(gp, g0, 4.0))  # w_d 0: CFG on the product
    assert torch.allclose(double_free(g0, gp, d0, 1.0, 1.0), gp + d0 - g0)           # the composed condition
    # w_d moves only along the defect direction, w_p only along the product direction
    assert torch.allclose(double_free(g0, gp, d0, 2.0, 3.0) - double_free(g0, gp, d0, 2.0, 1.0), 2 * (d0 - g0))
    assert torch.allclose(double_free(g0, gp, d0, 5.0, 1.0) - double_free(g0, gp, d0, 2.0, 1.0), 3 * (gp - g0))
    assert torch.allclose(single_scale(gp, g0, 1.0), gp)


def test_masks_averaged_over_steps_then_isodata():
    from core.diffusion import isodata_threshold
    torch.manual_seed(0)
    truth = torch.zeros(2, 1, 8, 6)
    truth[0, :, 1:4, 1:5] = 1
    truth[1, :, 5:8, 0:2] = 1
    steps = [truth * 0.8 + 0.1 + 0.3 * torch.randn_like(truth) for _ in range(40)]
    avg = average_masks(steps)
    assert torch.allclose(avg, torch.stack(steps).mean(0))
    binary = avg > isodata_threshold(avg)[:, None, None, None]
    assert torch.equal(binary, truth > 0.5)
    assert not torch.equal(steps[0] > isodata_threshold(steps[0])[:, None, None, None], truth > 0.5)  # one step: noisy
    with pytest.raises(ValueError, match="no mask predictions"):
        average_masks([])


def test_unified_defect_names_and_their_errors():
    table = {"metal_nut": {"color": "color", "flip": "flip"}, "screw": {"thread_side": "thread"}}
    assert unified_defect(table, "screw", "thread_side") == "thread"
    assert unified_defect(table, "pill", "good") == "good"
    with pytest.raises(KeyError, match="product 'pill' is not in .* Fix: add it under method.names.pill"):
        unified_defect(table, "pill", "crack")
    with pytest.raises(KeyError, match="'scratch' of 'screw' .*has: thread_side"):
        unified_defect(table, "screw", "scratch")


# ------------------------------------------------------------------------------------- train / generate
@pytest.fixture(scope="module")
def two_world(tmp_path_factory):
    """A tiny synthetic world of two products (64 px, 3 train normals, 2 anomalies per type)."""
    import core.data.synthetic as S
    root = tmp_path_factory.mktemp("world") / "synthetic" / "seed0_res64"
    S.build_world(root, S.WorldConfig(resolution=64, n_train_good=3, n_test_good=1, n_per_type=2,
                                      products=("bottle", "pill")), workers=1, progress=False)
    return root


def _cfg(world, **extra):
    from hydra import compose, initialize_config_dir
    from pathlib import Path
    ov = ["method=defectdiffu", "model=tiny", f"dataset.root={world}", "dataset.resolution=64", "product=bottle",
          "method.products=[bottle,pill]", "method.backbone.init=random", "method.groups=[1,2,1]",
          "method.backbone.architecture.hidden_size=24", "method.backbone.architecture.num_heads=2",
          "method.train.steps=4", "method.train.batch=2", "method.train.checkpoint_every=2",
          "method.generate.num_inference_steps=3", "method.generate.mask_last_steps=2", "method.generate.n_per_type=2",
          "method.generate.batch_size=2", *[f"{k}={v}" for k, v in extra.items()]]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        return compose("train", ov)


def test_training_items_take_the_half_split_normals_without_masks_and_the_name_table(two_world):
    from defectdiffu import method as M
    cfg = _cfg(two_world)
    items = M.training_items(cfg, ["bottle", "pill"])
    for p in ("bottle", "pill"):
        anomalies = [s for s, d, q in items if q == p and d != "good"]
        normals = [s for s, d, q in items if q == p and d == "good"]
        assert len(anomalies) == 4 and len(normals) == 3                 # match: as many as anomalies, of 3
        assert all(s.split == "test" for s in anomalies)                 # half of the test anomalies train
        assert all(not s.mask_paths for s in normals)                     # good images need no mask
    _, masks = M.load_items(items, 64)
    goods = torch.tensor([d == "good" for _, d, _ in items])
    assert not masks[goods].any() and all(m.any() for m in masks[~goods])
    named = M.training_items(_cfg(two_world, **{"+method.names.bottle.crack": "fissure",
                                                 "+method.names.bottle.contamination": "liquid",
                                                 "+method.names.bottle.missing": "missing",
                                                 "+method.names.bottle.stain": "color",
                                                 "+method.names.pill.crack": "fissure"}), ["bottle"])
    assert {d for _, d, _ in named} == {"fissure", "liquid", "missing", "color", "good"}
    with pytest.raises(KeyError, match="'contamination' of 'pill' .*has: crack"):
        M.training_items(_cfg(two_world, **{"+method.names.bottle.crack": "x", "+method.names.pill.crack": "x"}),
                         ["pill"])
    with pytest.raises(KeyError, match="product 'pill' is not in"):
        M.training_items(_cfg(two_world, **{"+method.names.bottle.crack": "x"}), ["pill"])
    assert len([1 for _, d, q in M.training_items(_cfg(two_world, **{"method.train.normals_per_product": 1}),
                                                  ["bottle"]) if d == "good"]) == 1
    excl = M.training_items(_cfg(two_world, **{"method.train.exclude_defects_of": "[pill]"}), ["bottle", "pill"])
    assert {d for _, d, q in excl if q == "pill"} == {"good"}
    # the zero-shot product learns its background from as many normals as the product with the most anomalies (4),
    # here all 3 it has
    assert len([1 for _, d, q in excl if q == "pill"]) == 3


def test_killed_training_resumes_to_the_uninterrupted_model(two_world, tmp_path):
    from defectdiffu import method as M
    from core.models.dit import DiT
    cfg = _cfg(two_world)
    M.train(cfg, tmp_path / "a")
    stop = _cfg(two_world, **{"+method.train.stop_after": 2})
    M.train(stop, tmp_path / "b")
    assert (tmp_path / "b" / "train_state.pt").is_file() and not (tmp_path / "b" / "model").exists()
    M.train(cfg, tmp_path / "b")
    a, b = DefectDiT.load(tmp_path / "a" / "model"), DefectDiT.load(tmp_path / "b" / "model")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.groups == (1, 2, 1)
    with pytest.raises(ValueError, match="holds a DefectDiT"):
        DiT.load(tmp_path / "a" / "model")
    torch.manual_seed(int(cfg.seed))                   # the run's initialisation, untrained
    init = DefectDiT(groups=(1, 2, 1), text_dim=a.text_dim, **{k: a.config[k] for k in (
        "input_size", "patch_size", "in_channels", "hidden_size", "num_heads", "mlp_ratio", "learn_sigma")})
    assert not torch.equal(a.blocks[0].attn.qkv.weight, init.blocks[0].attn.qkv.weight)        # it trained
    with pytest.raises(ValueError, match="other images"):
        M.train(_cfg(two_world, **{"method.products": "[bottle]"}), tmp_path / "a")


def test_guided_eps_runs_the_three_branches_in_order_and_takes_the_defect_branchs_mask():
    from defectdiffu import method as M
    model = _tiny()
    B = 2
    seen = {}

    def fake(z, t, y_p, y_d, y_f):
        seen.update(z=z, y_d=y_d)
        k = z.shape[0] // B
        out = torch.cat([torch.full((B, 8, 8, 8), float(i)) for i in range(k)])
        mask = torch.cat([torch.full((B, 4, 8, 8), 10.0 + i) for i in range(k)])
        return out, mask, None
    model.forward = fake
    z = torch.randn(B, 4, 8, 8)
    y = {k: torch.randn(3 * B, 10) for k in ("product", "defect", "fusion")}
    eps, mask = M.guided_eps(model, z, torch.tensor([5, 5]), y, "double_free", 2.0, 3.0, 9.0)
    # branches 0, 1, 2 = (c_g, 0), (c_g, c_p), (c_d, 0): 0 + 2 (1 - 0) + 3 (2 - 0)
    assert torch.allclose(eps, torch.full_like(eps, 8.0)) and torch.equal(mask, torch.full_like(mask, 12.0))
    assert torch.equal(seen["z"], z.repeat(3, 1, 1, 1))
    eps, mask = M.guided_eps(model, z, torch.tensor([5, 5]), {k: v[:2 * B] for k, v in y.items()}, "single_scale",
                             2.0, 3.0, 4.0)
    assert torch.allclose(eps, torch.full_like(eps, 1.0 + 4.0 * (0 - 1))) and torch.equal(mask, torch.full_like(mask, 10.0))
    texts = M.branch_texts("double_free", "crack", "metal_nut", "")
    assert [t["defect"] for t in texts] == ["a photo of good", "a photo of good", "a photo of crack"]
    assert [t["product"] for t in texts] == ["", "a photo of metal nut", ""]


def test_generate_writes_each_type_with_binary_masks_zero_shot_and_normals(two_world, tmp_path):
    import json
    import numpy as np
    from PIL import Image
    from omegaconf import open_dict
    from defectdiffu import method as M
    cfg = _cfg(two_world, **{"method.train.exclude_defects_of": "[pill]", "method.generate.n_normals": 1})
    M.train(cfg, tmp_path / "run")
    with open_dict(cfg):
        cfg.checkpoint = str(tmp_path / "run")
    M.generate(cfg, tmp_path / "run", tmp_path / "gen")
    recs = [json.loads(x) for x in (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()]
    meta = json.loads((tmp_path / "run" / "defectdiffu.json").read_text())
    types = meta["types"]["bottle"]
    anomalies = [r for r in recs if r["kind"] == "anomaly"]
    assert sorted({r["anomaly_type"] for r in anomalies}) == types and len(anomalies) == 2 * len(types)
    assert sum(r["kind"] == "normal" for r in recs) == 1
    for r in anomalies:
        m = np.array(Image.open(tmp_path / "gen" / r["mask"]))
        assert set(np.unique(m)) <= {0, 255} and r["zero_shot"] is False
    # zero-shot: pill trained on normals only gets bottle's crack (Eq. 12)
    assert meta["types"]["pill"] == []
    with open_dict(cfg):
        cfg.product = "pill"
        cfg.method.generate.defects = ["crack"]
        cfg.method.generate.n_normals = 0
    M.generate(cfg, tmp_path / "run", tmp_path / "zs")
    zs = [json.loads(x) for x in (tmp_path / "zs" / "manifest.jsonl").read_text().splitlines()]
    assert {(r["product"], r["anomaly_type"], r["zero_shot"]) for r in zs} == {("pill", "crack", True)}
    with open_dict(cfg):
        cfg.method.generate.defects = ["teleport"]
    with pytest.raises(ValueError, match="never learned"):
        M.generate(cfg, tmp_path / "run", tmp_path / "zs2")
    with open_dict(cfg):
        cfg.method.generate.defects = []
    with pytest.raises(ValueError, match="zero-shot"):
        M.generate(cfg, tmp_path / "run", tmp_path / "zs3")
    with pytest.raises(FileNotFoundError, match="no finished DefectDiffu run"):
        M.generate(cfg, tmp_path / "nothing", tmp_path / "zs4")


def test_strength_benchmark_summary_hand_worked(tmp_path):
    """benchmarks/defectdiffu_strength.py: per type and w_d, the mean mask area and the mean pixel change against the
    lowest w_d's image of the same item, on two folders written by GeneratedWriter with known contents."""
    import importlib.util
    import numpy as np
    from pathlib import Path
    from core.export import GeneratedWriter
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "defectdiffu_strength.py"
    spec = importlib.util.spec_from_file_location("defectdiffu_strength", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    folders = {}
    for w, (area, level) in {0.0: (4, 10), 2.0: (16, 40)}.items():
        folders[w] = tmp_path / f"w{w:g}"
        with GeneratedWriter(folders[w], "pill", "defectdiffu", {"w_d": w}) as wr:
            for ty, extra in (("crack", 0), ("stain", 8)):
                for i in range(2):
                    img = np.full((8, 8, 3), level + extra + i, np.uint8)
                    m = np.zeros((8, 8), bool)
                    m.flat[:area + i] = True
                    wr.write_anomaly(ty, i, img, m)
            wr.finalize()
    table, rows = mod.summarise(folders, "pill")
    assert table["crack"][0.0] == pytest.approx((4.5 / 64, 0.0))
    assert table["crack"][2.0] == pytest.approx((16.5 / 64, 30.0))
    assert table["stain"][2.0] == pytest.approx((16.5 / 64, 30.0))
    assert [r[0][0] for r in rows] == ["pill/crack", "pill/stain"] and all(len(r[1]) == 2 for r in rows)


def test_the_mvtec_name_table_covers_every_mvtec_ad_type_and_merges_the_papers_pairs():
    """supp. Tab. 2 as data (configs/experiment/defectdiffu_mvtec_ad.yaml): 15 products, MVTec AD's 73 defect types,
    and the merges the paper names (poke -> hole, glue -> liquid, thread_side -> thread, ...)."""
    from hydra import compose, initialize_config_dir
    from pathlib import Path
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose("train", ["experiment=defectdiffu_mvtec_ad"])
    table = cfg.method.names
    assert len(table) == 15 and sum(len(v) for v in table.values()) == 73
    for product, defect, name in (("capsule", "poke", "hole"), ("leather", "glue", "liquid"), ("tile", "oil", "liquid"),
                                  ("screw", "thread_side", "thread"), ("cable", "missing_wire", "missing"),
                                  ("zipper", "fabric_border", "cut"), ("bottle", "broken_small", "broken")):
        assert unified_defect(table, product, defect) == name
    assert cfg.method.schedule == "dit_linear" and list(cfg.method.groups) == [10, 10, 8]
