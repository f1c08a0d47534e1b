"""Attention capture and editing: the maps are the softmax the paper asks for, only requested layers change, edits
act exactly as attention computed by hand, gradients flow, and processors come back even after an error."""
import pytest
import torch

from core.diffusion import (AttentionStore, RegionTokenMask, TokenReweight, attention_control, block_resolution,
                            cross_attention_layers, layers_at)


def _inputs(tiny, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, tiny.latent_size, tiny.latent_size, generator=g)
    with torch.no_grad():
        ctx = tiny.encode_prompt(["a photo of a bottle with a scratch"] * batch)
    return z, torch.tensor(500), ctx


def test_layer_selection_by_block_and_resolution(tiny):
    all_layers = cross_attention_layers(tiny.unet)
    assert all_layers and all(n.endswith("attn2") for n in all_layers)
    down = cross_attention_layers(tiny.unet, ["down_blocks.1", "down_blocks.2"])
    assert down and all(n.startswith(("down_blocks.1.", "down_blocks.2.")) for n in down)
    L = tiny.latent_size
    assert {block_resolution(n, L, 4) for n in down} == {L // 2, L // 4}
    enc = layers_at(tiny.unet, L, [L // 2, L // 4], parts=("down_blocks",))
    assert enc == down
    with pytest.raises(KeyError, match="down_blocks.0"):
        cross_attention_layers(tiny.unet, ["down_blocks.0"])  # the mini layout has no attention at full latent size


def test_controlled_forward_equals_sdpa_forward(tiny):
    z, t, ctx = _inputs(tiny)
    with torch.no_grad():
        ref = tiny.unet(z, t, ctx).sample
        with attention_control(tiny.unet, cross_attention_layers(tiny.unet), AttentionStore()):
            got = tiny.unet(z, t, ctx).sample
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_token_softmax_maps_sum_to_one_over_tokens(tiny):
    z, t, ctx = _inputs(tiny)
    layers = cross_attention_layers(tiny.unet, ["down_blocks.1"])
    store = AttentionStore(softmax="token")
    with torch.no_grad(), attention_control(tiny.unet, layers, store):
        tiny.unet(z, t, ctx)
    m = store.latest(layers[0])  # (B, N, L)
    assert m.shape == (2, (tiny.latent_size // 2) ** 2, ctx.shape[1])
    torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))


def test_spatial_softmax_maps_sum_to_one_over_positions(tiny):
    z, t, ctx = _inputs(tiny)
    layers = cross_attention_layers(tiny.unet, ["down_blocks.2"])
    store = AttentionStore(softmax="spatial")
    with torch.no_grad(), attention_control(tiny.unet, layers, store):
        tiny.unet(z, t, ctx)
    m = store.latest(layers[0])
    torch.testing.assert_close(m.sum(-2), torch.ones(m.shape[0], m.shape[-1]))
    assert not torch.allclose(m.sum(-1), torch.ones(m.shape[:-1]))  # really the other axis


def test_only_requested_layers_are_captured_and_others_keep_their_processor(tiny):
    z, t, ctx = _inputs(tiny)
    requested = cross_attention_layers(tiny.unet, ["up_blocks.1"])
    before = {n: type(p) for n, p in tiny.unet.attn_processors.items()}
    store = AttentionStore()
    with torch.no_grad(), attention_control(tiny.unet, requested, store):
        during = {n: type(p).__name__ for n, p in tiny.unet.attn_processors.items()}
        tiny.unet(z, t, ctx)
    assert set(store.maps) == set(requested)
    controlled = {n[: -len(".processor")] for n, c in during.items() if c == "ControlledAttnProcessor"}
    assert controlled == set(requested)
    assert {n: type(p) for n, p in tiny.unet.attn_processors.items()} == before


def test_processors_restored_after_exception(tiny):
    before = dict(tiny.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with attention_control(tiny.unet, cross_attention_layers(tiny.unet), AttentionStore()):
            raise RuntimeError("boom")
    after = tiny.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def _by_hand(attn, x, ctx, logit_mask=None, prob_scale=None):
    """Attention of one diffusers Attention module written out: softmax(QK^T/sqrt(d)) V, then the output projection."""
    B, N, _ = x.shape
    h = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    d = q.shape[-1] // h
    q, k, v = (y.view(B, -1, h, d).transpose(1, 2) for y in (q, k, v))
    logits = q @ k.transpose(-1, -2) / d ** 0.5
    if logit_mask is not None:
        logits = logits.masked_fill(~logit_mask, float("-inf"))
    p = logits.softmax(-1)
    if prob_scale is not None:
        p = p * prob_scale
    out = (p @ v).transpose(1, 2).reshape(B, N, h * d)
    return attn.to_out[0](out)


def test_region_mask_edit_matches_attention_by_hand(tiny):
    name = cross_attention_layers(tiny.unet, ["down_blocks.1"])[0]
    attn = dict(tiny.unet.named_modules())[name]
    side, B = 8, 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, side * side, attn.to_q.in_features, generator=g)
    ctx = torch.randn(B, 6, attn.to_k.in_features, generator=g)
    region = torch.zeros(B, side, side)
    region[:, 2:6, 1:5] = 1
    group = [2, 3]  # these tokens may attend only inside the region; tokens 0, 1, 4, 5 are free
    edit = RegionTokenMask([(group, region, True)])
    allowed = torch.ones(B, 1, side * side, 6, dtype=torch.bool)
    outside = region.flatten(1) < 0.5
    allowed[:, 0][outside.unsqueeze(-1).expand(-1, -1, 6) & torch.isin(torch.arange(6), torch.tensor(group))] = False
    with torch.no_grad():
        expected = _by_hand(attn, x, ctx, logit_mask=allowed)
        with attention_control(tiny.unet, [name], edit=edit):
            got = attn(x, encoder_hidden_states=ctx)
        plain = attn(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_zeroing_a_token_group_after_softmax_matches_by_hand(tiny):
    name = cross_attention_layers(tiny.unet, ["up_blocks.2"])[0]
    attn = dict(tiny.unet.named_modules())[name]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 64, attn.to_q.in_features, generator=g)
    ctx = torch.randn(1, 5, attn.to_k.in_features, generator=g)
    scale = torch.ones(5)
    scale[[1, 3]] = 0.0
    with torch.no_grad():
        expected = _by_hand(attn, x, ctx, prob_scale=scale)
        with attention_control(tiny.unet, [name], edit=TokenReweight([1, 3], 0.0, on="probs")):
            got = attn(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_latent_through_a_captured_map(tiny):
    z, t, ctx = _inputs(tiny, batch=1)
    z = z.requires_grad_(True)
    layers = cross_attention_layers(tiny.unet, ["down_blocks.1", "down_blocks.2"])
    store = AttentionStore(keep_grad=True)
    with attention_control(tiny.unet, layers, store):
        tiny.unet(z, t, ctx)
    loss = store.mean_map(layers[:1])[..., 3].max()  # a CUT-style loss on one token's map
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    detached = AttentionStore(keep_grad=False)
    with attention_control(tiny.unet, layers, detached):
        tiny.unet(z, t, ctx)
    assert detached.latest(layers[0]).grad_fn is None


def test_cond_half_keeps_the_conditional_branch_of_a_cfg_batch(tiny):
    z, t, ctx = _inputs(tiny, batch=1)
    with torch.no_grad():
        uncond = tiny.encode_prompt([""])
    layers = cross_attention_layers(tiny.unet, ["down_blocks.1"])
    both, alone = AttentionStore(cond_half=True), AttentionStore()
    with torch.no_grad():
        with attention_control(tiny.unet, layers, both):
            tiny.unet(torch.cat([z, z]), t, torch.cat([uncond, ctx]))
        with attention_control(tiny.unet, layers, alone):
            tiny.unet(z, t, ctx)
    torch.testing.assert_close(both.latest(layers[0]), alone.latest(layers[0]), atol=1e-5, rtol=1e-4)


def test_mean_map_reshapes_to_the_layer_grid(tiny):
    z, t, ctx = _inputs(tiny)
    layers = cross_attention_layers(tiny.unet, ["down_blocks.1", "down_blocks.2"])
    store = AttentionStore()
    with torch.no_grad(), attention_control(tiny.unet, layers, store):
        tiny.unet(z, t, ctx)
    res1 = [n for n in layers if n.startswith("down_blocks.1")]
    m = store.mean_map(res1)
    assert m.shape == (2, tiny.latent_size // 2, tiny.latent_size // 2, ctx.shape[1])
    with pytest.raises(ValueError, match="different resolutions"):
        store.mean_map(layers)


def test_logit_reweighting_by_a_spatial_map_matches_by_hand(tiny):
    """AnomalyDiffusion's official re-weighting: pre-softmax scores of placeholder columns times a weight map."""
    name = cross_attention_layers(tiny.unet, ["down_blocks.2"])[0]
    attn = dict(tiny.unet.named_modules())[name]
    side = 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, side * side, attn.to_q.in_features, generator=g)
    ctx = torch.randn(1, 5, attn.to_k.in_features, generator=g)
    w = 1 + torch.rand(1, side, side, generator=g) * 0.5  # clamp range [1, 1.5] as in the official code
    h = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    d = q.shape[-1] // h
    q, k, v = (y.view(1, -1, h, d).transpose(1, 2) for y in (q, k, v))
    with torch.no_grad():
        logits = q @ k.transpose(-1, -2) / d ** 0.5
        logits[..., 2] = logits[..., 2] * w.flatten(1)[:, None, :]
        expected = attn.to_out[0](((logits.softmax(-1) @ v).transpose(1, 2)).reshape(1, side * side, h * d))
        with attention_control(tiny.unet, [name], edit=TokenReweight([2], w, on="logits")):
            got = attn(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mean_map_averages_calls_and_layers_hand_worked():
    # two layers on a 2 x 2 grid with 3 tokens, three calls each, batch 2; values chosen so sums and means differ
    store = AttentionStore()
    rows = lambda v: torch.full((2, 4, 3), float(v))  # noqa: E731  (B, N, L) as recorded
    store.maps = {"a": [rows(1), rows(2), rows(6)], "b": [rows(10), rows(20), rows(30)]}
    assert store.mean_map().shape == (2, 2, 2, 3)
    torch.testing.assert_close(store.mean_map(), torch.full((2, 2, 2, 3), (6 + 30) / 2))       # the last call
    torch.testing.assert_close(store.mean_map(calls=slice(None)), torch.full((2, 2, 2, 3), (3 + 20) / 2))
    torch.testing.assert_close(store.mean_map(["a"], slice(0, 2)), torch.full((2, 2, 2, 3), 1.5))
    # the grid is the positions in row-major order
    store.maps = {"a": [torch.arange(24.).reshape(2, 4, 3)]}
    torch.testing.assert_close(store.mean_map()[1, 1, 0], torch.tensor([18., 19., 20.]))


def _reference_and_controlled(attn, *args, **kwargs):
    from diffusers.models.attention_processor import AttnProcessor2_0   # applies qk norms (AttnProcessor ignores them)
    from core.diffusion import ControlledAttnProcessor
    attn.set_processor(AttnProcessor2_0())
    want = attn(*args, **kwargs)
    attn.set_processor(ControlledAttnProcessor("layer"))
    return want, attn(*args, **kwargs)


def test_controlled_processor_equals_diffusers_on_4d_input_with_norms_residual_and_rescale():
    from diffusers.models.attention_processor import Attention
    torch.manual_seed(0)
    attn = Attention(32, heads=2, dim_head=16, norm_num_groups=4, spatial_norm_dim=3, residual_connection=True,
                     rescale_output_factor=2.0, bias=True).eval()
    x, zq = torch.randn(2, 32, 3, 5), torch.randn(2, 3, 3, 5)
    with torch.no_grad():
        want, got = _reference_and_controlled(attn, x, temb=zq)
    assert got.shape == (2, 32, 3, 5) and torch.allclose(got, want, atol=1e-5)


def test_controlled_processor_equals_diffusers_on_cross_attention_with_norms_and_a_mask():
    from diffusers.models.attention_processor import Attention
    torch.manual_seed(1)
    attn = Attention(8, cross_attention_dim=6, heads=2, dim_head=4, cross_attention_norm="layer_norm",
                     qk_norm="layer_norm").eval()
    x, ctx = torch.randn(2, 10, 8), torch.randn(2, 7, 6)
    mask = torch.zeros(2, 1, 7)
    mask[0, :, 5:] = -10000.0          # image 0 ignores its last two tokens, image 1 its first
    mask[1, :, 0] = -10000.0
    with torch.no_grad():
        want, got = _reference_and_controlled(attn, x, encoder_hidden_states=ctx, attention_mask=mask)
        unmasked, _ = _reference_and_controlled(attn, x, encoder_hidden_states=ctx)
    assert got.shape == (2, 10, 8) and torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(want, unmasked, atol=1e-3)      # the mask matters in this case


def test_edits_receive_the_layer_name_and_a_probs_only_edit_is_applied_after_softmax():
    from diffusers.models.attention_processor import Attention
    from core.diffusion import ControlledAttnProcessor
    torch.manual_seed(2)
    attn = Attention(8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    x, ctx = torch.randn(2, 10, 8), torch.randn(2, 7, 6)
    seen = []

    class ProbsOnly:
        def edit_probs(self, name, probs):
            seen.append((name, tuple(probs.shape), float(probs.sum(-1).mean())))
            return torch.zeros_like(probs)

    class LogitsOnly:
        def edit_logits(self, name, logits):
            seen.append((name, "logits"))
            return logits

    attn.set_processor(ControlledAttnProcessor("down_blocks.0.attn2", edit=ProbsOnly()))
    with torch.no_grad():
        out = attn(x, encoder_hidden_states=ctx)
    assert seen == [("down_blocks.0.attn2", (2, 2, 10, 7), pytest.approx(1.0))]
    assert torch.allclose(out, attn.to_out[0].bias.expand_as(out))       # zero attention: only the output bias
    attn.set_processor(ControlledAttnProcessor("up_blocks.1.attn2", edit=LogitsOnly()))
    with torch.no_grad():
        attn(x, encoder_hidden_states=ctx)
    assert seen[-1] == ("up_blocks.1.attn2", "logits")


def test_region_token_mask_by_hand_cfg_halves_threshold_boundary_and_overlapping_groups():
    # logits (B=4: a CFG batch of 2 regions), 2 heads, N = 4 positions (2 x 2), L = 5 tokens
    logits = torch.randn(4, 2, 4, 5)
    region = torch.tensor([[[1.0, 0.5], [0.0, 0.25]], [[0.0, 0.0], [1.0, 1.0]]])   # (2, 2, 2): one value at 0.5
    other = torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]]])
    edit = RegionTokenMask([([1, 2], region, True), ([3], region, False), ([2], other, True)], threshold=0.5)
    out = edit.edit_logits("l", logits)
    low = torch.finfo(logits.dtype).min
    r = region.flatten(1).repeat(2, 1)      # (4, 4): the same region for both CFG halves
    o = other.flatten(1).repeat(2, 1)
    inside, outside = r >= 0.5, r < 0.5     # a value exactly at the threshold is inside
    for b in range(4):
        for n in range(4):
            want_blocked = {1: not inside[b, n], 2: not inside[b, n] or not (o[b, n] >= 0.5), 3: not outside[b, n]}
            for tok in range(5):
                blocked = want_blocked.get(tok, False)
                assert (out[b, :, n, tok] == low).all() if blocked else torch.equal(out[b, :, n, tok], logits[b, :, n, tok])


def test_token_reweight_by_hand_on_its_layers_only_with_a_cfg_batch_map():
    x = torch.rand(4, 2, 4, 3) + 0.5
    w = torch.tensor([[[2.0, 0.0], [1.0, 3.0]], [[0.5, 0.5], [4.0, 1.0]]])           # (2, 2, 2) for B = 4
    tr = TokenReweight([1], w, on="probs", layers=["a"])
    out = tr.edit_probs("a", x)
    wq = w.flatten(1).repeat(2, 1)                                                    # (4, N)
    assert torch.allclose(out[..., 1], x[..., 1] * wq[:, None, :])
    assert torch.equal(out[..., [0, 2]], x[..., [0, 2]])
    assert torch.equal(tr.edit_probs("b", x), x) and torch.equal(tr.edit_logits("a", x), x)   # other layer; logits
    on_logits = TokenReweight([0, 2], 1.5, on="logits")
    got = on_logits.edit_logits("any", x)
    assert torch.allclose(got[..., [0, 2]], 1.5 * x[..., [0, 2]]) and torch.equal(got[..., 1], x[..., 1])
    assert torch.equal(on_logits.edit_probs("any", x), x)


def test_block_resolution_of_every_cross_attention_layer_is_the_side_its_queries_run_at(tiny):
    L = tiny.latent_size
    layers = cross_attention_layers(tiny.unet)
    assert {n.split(".")[0] for n in layers} == {"down_blocks", "mid_block", "up_blocks"}
    z, t, ctx = _inputs(tiny, 1)
    with torch.no_grad(), attention_control(tiny.unet, layers, AttentionStore()) as store:
        tiny.unet(z, t, ctx)
    for n in layers:
        queries = store.maps[n][0].shape[-2]
        assert block_resolution(n, L, 4) ** 2 == queries, n
    assert block_resolution("up_blocks.1.attentions.0", 32, 4) == 8 and block_resolution("mid_block.x", 32, 4) == 4
    with pytest.raises(ValueError, match="not inside a U-Net block"):
        block_resolution("conv_in", 32, 4)
    with pytest.raises(KeyError, match=r"Not attention modules .*down_blocks\.9"):
        with attention_control(tiny.unet, ["down_blocks.9.attn2"]):
            pass
