"""The world CLIP: its contrastive loss on hand-worked values, the CLIPModel layout round trip, resuming, and a tiny
model that learns to tell two products apart zero-shot."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.data import synthetic as S
from core.models.world_clip import (ClipEncoder, ClipFeatures, build_world_clip, clip_loss, embed_images, load_clip,
                                    save_clip, state_prompt, train_world_clip, world_classes, zero_shot_defect_scores,
                                    zero_shot_products)

TINY = {"image_size": 64, "patch_size": 16, "max_length": 24, "projection_dim": 16,
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}}


def _encoder(seed=0):
    model, tok = build_world_clip(TINY, seed=seed)
    return ClipEncoder(model, tok, TINY["image_size"])


def test_clip_loss_with_distinct_labels_is_clips_symmetric_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(3, 5, generator=g), dim=1), F.normalize(torch.randn(3, 5, generator=g), dim=1)
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * img @ txt.T
    ref = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    assert torch.allclose(clip_loss(img, txt, torch.tensor([0, 1, 2]), scale), ref)


def test_clip_loss_targets_every_item_of_the_same_class():
    """Labels [0, 0, 1, 2]: the targets of rows 0 and 1 are (1/2, 1/2, 0, 0), of rows 2 and 3 one-hot."""
    g = torch.Generator().manual_seed(3)
    img, txt = F.normalize(torch.randn(4, 3, generator=g), dim=1), F.normalize(torch.randn(4, 3, generator=g), dim=1)
    L = 2.0 * img @ txt.T
    T = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    i2t = -(T * torch.log_softmax(L, 1)).sum(1).mean()
    t2i = -(T * torch.log_softmax(L.T, 1)).sum(1).mean()
    got = clip_loss(img, txt, torch.tensor([0, 0, 1, 2]), torch.tensor(math.log(2.0)))
    assert torch.allclose(got, (i2t + t2i) / 2)
    assert not torch.allclose(i2t, t2i, atol=1e-3)  # the two directions differ: a transposed softmax would show
    # a one-hot target would punish the equal captions of items 0 and 1 as negatives: a different value
    onehot = (F.cross_entropy(L, torch.arange(4)) + F.cross_entropy(L.T, torch.arange(4))) / 2
    assert not torch.allclose(got, onehot, atol=1e-3)


def test_world_clip_saves_in_clipmodel_layout_and_reloads(tmp_path):
    from transformers import CLIPModel

    enc = _encoder()
    save_clip(enc, tmp_path / "clip")
    assert (tmp_path / "clip" / "model.safetensors").is_file()
    assert (tmp_path / "clip" / "preprocessor_config.json").is_file()
    assert isinstance(CLIPModel.from_pretrained(tmp_path / "clip", local_files_only=True), CLIPModel)
    back = load_clip(tmp_path / "clip")
    x = torch.rand(3, 3, 80, 72)  # resized to the model's 64 px
    with torch.no_grad():
        assert torch.allclose(enc.eval().image_embeds(x), back.image_embeds(x), atol=1e-6)
        assert torch.allclose(enc.text_embeds(["a photo of a bottle"]), back.text_embeds(["a photo of a bottle"]),
                              atol=1e-6)


def test_missing_clip_directory_says_what_to_do(tmp_path):
    from core.models import ModelNotFoundError
    with pytest.raises(ModelNotFoundError, match="config.json.*metrics.clip_path"):
        load_clip(tmp_path / "nothing")


def test_clip_features_are_unit_embeddings_and_scaled_zero_shot_logits():
    enc = _encoder().eval()
    classes = world_classes(("bottle", "screw"))
    assert classes[0] == ("bottle", "good") and len(classes) == 2 + len(S.PRODUCTS["bottle"].defects) + \
        len(S.PRODUCTS["screw"].defects)
    feats = ClipFeatures(enc, classes)
    x = torch.rand(4, 3, 64, 64)
    f, logits = feats(x)
    assert f.shape == (4, 16) and logits.shape == (4, len(classes))
    assert torch.allclose(f.norm(dim=1), torch.ones(4), atol=1e-5)
    text = enc.class_embeds([[state_prompt(p, s)] for p, s in classes])
    assert torch.allclose(logits, enc.logit_scale * f @ text.T, atol=1e-5)
    assert state_prompt("metal_nut", "bent") == "a photo of a metal nut with a bent part"


def _pool(n, res=64, web=True):
    imgs, prods, defs = [], [], []
    for p in ("bottle", "grid"):
        for i in range(n):
            d = None if i % 2 == 0 else S.PRODUCTS[p].defects[i % 3]
            r = S.render_web(p, 5, d or "good", i, res)[0] if web else \
                S.render(p, S.sample_rng(5, p, "prior", d or "good", i), res, d)
            imgs.append(r.image), prods.append(p), defs.append(d)
    return np.stack(imgs), prods, defs


def test_resumed_training_matches_an_uninterrupted_run(tmp_path):
    imgs, prods, defs = _pool(4)
    cfg = {"steps": 4, "batch": 4, "lr": 1e-3, "warmup": 1, "checkpoint_every": 2}

    def run(work, stop):
        work.mkdir()
        if stop:
            train_world_clip(_encoder(), imgs, prods, defs, {**cfg, "stop_after": 2}, work, seed=0)
        enc = _encoder()  # a fresh process: only the checkpoint survives
        train_world_clip(enc, imgs, prods, defs, cfg, work, seed=0)
        return enc

    a, b = run(tmp_path / "a", False), run(tmp_path / "b", True)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.model.visual_projection.weight, _encoder().model.visual_projection.weight)


def test_a_tiny_world_clip_learns_products_zero_shot(tmp_path):
    """Trained on renders of a bottle and a grid, it names the product of unseen test renders."""
    torch.manual_seed(0)
    imgs, prods, defs = _pool(24, web=False)
    enc = _encoder()
    train_world_clip(enc, imgs, prods, defs, {"steps": 80, "batch": 16, "lr": 2e-3, "warmup": 5,
                                              "checkpoint_every": 1000}, tmp_path, seed=0)
    test = [S.render(p, S.sample_rng(0, p, "test", "good", i), 64).image for p in ("bottle", "grid") for i in range(8)]
    x = torch.from_numpy(np.stack(test)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        emb = embed_images(enc, x)
        pred = zero_shot_products(enc, emb, ("bottle", "grid"))
        p_damaged = zero_shot_defect_scores(enc, emb, "bottle")
    assert (pred == torch.tensor([0] * 8 + [1] * 8)).float().mean() >= 0.9
    assert p_damaged.shape == (16,) and ((p_damaged >= 0) & (p_damaged <= 1)).all()


def test_prior_evaluation_runs_on_tiny_models_and_reports_each_number():
    from core.models import build_random
    from core.models.prior_eval import evaluate_prior

    comp = build_random("tiny", seed=0)
    enc = _encoder().eval()
    real = {"bottle": torch.from_numpy(np.stack([S.render("bottle", S.sample_rng(0, "bottle", "train", "good", i), 64)
                                                 .image for i in range(4)])).permute(0, 3, 1, 2).float() / 255}
    out = evaluate_prior(comp, enc, real, n_per_product=3, n_per_defect=2, steps=2, products=("bottle", "screw"),
                         held_out=("bottle",), resolution=64)
    b = out["per_product"]["bottle"]
    assert set(b["damaged_share_defect_prompt"]) == set(S.PRODUCTS["bottle"].defects)
    assert 0 <= b["product_accuracy_real_web_look"] <= 1
    for key in ("world_fid", "world_fid_real_benchmark_look", "world_fid_real_web_look"):
        assert b[key] >= 0
    assert 0 <= b["product_accuracy"] <= 1 and "world_fid" not in out["per_product"]["screw"]
    assert out["product_accuracy_mean"] == pytest.approx(
        (b["product_accuracy"] + out["per_product"]["screw"]["product_accuracy"]) / 2)


def test_augment_blurs_only_when_asked_and_deterministically():
    from core.models.world_clip import augment

    x = torch.rand(3, 3, 32, 32)
    sharp = augment(x, torch.Generator().manual_seed(1))
    blurred = augment(x, torch.Generator().manual_seed(1), blur_prob=1.0, blur_sigma=(1.5, 1.5))
    again = augment(x, torch.Generator().manual_seed(1), blur_prob=1.0, blur_sigma=(1.5, 1.5))
    assert torch.equal(blurred, again)
    # a blur removes high frequencies: neighbouring pixels differ less
    tv = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert tv(blurred) < 0.5 * tv(sharp)


def test_world_clip_script_smoke_run_writes_a_loadable_model_and_card(tmp_path):
    from omegaconf import OmegaConf

    from core.models.clip_report import CLIP_DEBUG_OVERRIDES, train, write_report

    world = S.build_world(tmp_path / "world", S.WorldConfig(resolution=64, n_train_good=2, n_test_good=2, n_per_type=1),
                          workers=1, progress=False)
    cfg = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load("configs/world_clip.yaml"), CLIP_DEBUG_OVERRIDES,
                                                 {"threads": None, "report": {"dataset_root": str(world)}}))
    report = train(cfg, tmp_path / "clip", tmp_path / "work")
    assert report["train"]["steps_run"] == 3 and report["corpus_images"] == 3 * 3 + 2 * 3
    out = write_report(cfg, tmp_path / "clip", tmp_path / "work")
    assert 0 <= out["product_accuracy"] <= 1 and set(out["per_product"]) == set(S.ALL_PRODUCTS)
    assert "sigma_2" in out["web_look"]
    card = (tmp_path / "clip" / "README.md").read_text()
    assert "World CLIP" in card and "python scripts/train_world_clip.py" in card
    assert isinstance(load_clip(tmp_path / "clip"), ClipEncoder)


def test_defect_score_is_the_damaged_side_of_a_two_way_softmax_and_products_the_nearest_class():
    """A stub encoder with known class embeddings: an image on the damaged prompts' direction scores
    softmax(s * [cos_normal, cos_damaged])[1]; the product is the nearest product embedding."""
    class Stub:
        logit_scale = 10.0

        def class_embeds(self, prompt_sets):
            if len(prompt_sets) == 2:  # normal vs damaged ensembles
                return torch.tensor([[1.0, 0.0], [0.0, 1.0]])
            return torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # three products

    emb = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    p = zero_shot_defect_scores(Stub(), emb, "bottle")
    expected = torch.softmax(10.0 * emb @ torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T, dim=1)[:, 1]
    assert torch.allclose(p, expected) and p[0] > 0.99 and p[1] < 0.01
    assert zero_shot_products(Stub(), emb, ("bottle", "pill", "cable")).tolist() == [2, 0, 1]


def test_report_images_are_the_test_split_balanced_per_product_and_scaled(bottle_world):
    from core.data import load_synthetic
    from core.models.clip_report import _load_test_images
    x, products, labels = _load_test_images(str(bottle_world), ["bottle"], 0, 64, cap=3)
    assert x.shape == (3, 3, 64, 64) and products == ["bottle"] * 3 and labels.tolist() == [0, 1, 1]
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.5
    table = [s for s in load_synthetic(bottle_world, ["bottle"], seed=0, resolution=64) if s.split == "test"]
    full, _, full_labels = _load_test_images(str(bottle_world), ["bottle"], 0, 64, cap=None)
    assert len(full) == len(table) and full_labels.tolist() == [s.label for s in table]
    from core.data import read_image
    assert torch.allclose(full[0], torch.from_numpy(read_image(table[0].path)).permute(2, 0, 1).float() / 255)
