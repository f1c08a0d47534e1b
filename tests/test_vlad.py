"""VLAD (segmentation/vlad.py) on the shipped world CLIP: map shapes, the branches, the loss, a one-batch overfit."""
from __future__ import annotations

import math

import pytest
import torch

from core.models.world_clip import load_clip
from segmentation.vlad import VLAD, focal_loss, vlad_loss


@pytest.fixture(scope="module")
def clip():
    return load_clip()


def _images(n=3, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_map_shapes_and_the_stage_sum(clip):
    torch.manual_seed(0)
    v = VLAD(clip, stages=(1, 3))
    x = _images(3)
    out = v(x, ["bottle", "pill", "bottle"])
    assert out["score_vl"].shape == (3,) and out["map_vl"].shape == (3, 128, 128)
    assert torch.allclose(out["maps_vl"], 2 * out["map_vl"], atol=1e-5)
    assert ((out["map_vl"] >= 0) & (out["map_vl"] <= 1)).all() and ((out["score_vl"] > 0) & (out["score_vl"] < 1)).all()
    assert len(out["patches"]) == 2 and out["patches"][0].shape == (3, 64, clip.model.config.projection_dim)
    # the product's text decides: the same image scored as two products differs
    assert not torch.allclose(v(x[:1], ["bottle"])["score_vl"], v(x[:1], ["carpet"])["score_vl"])
    with pytest.raises(ValueError, match="stages"):
        VLAD(clip, stages=(0, 9))
    assert all(not p.requires_grad for p in v.clip.parameters()) and all(p.requires_grad for p in v.adapters.parameters())


def test_vision_vision_is_zero_on_a_remembered_image_and_adds_to_the_prediction(clip):
    torch.manual_seed(0)
    v = VLAD(clip, stages=(2, 3))
    x = _images(2)
    maps_vl, scores_vl = v.predict(x, "bottle")
    v.remember("bottle", x[:1])
    vv = v.vision_vision(v(x, ["bottle"] * 2)["patches"], "bottle", 128)
    assert vv[0].abs().max() < 1e-4 and vv[1].mean() > 1e-3       # image 0 is in the bank, image 1 is not
    maps, scores = v.predict(x, "bottle")
    assert torch.allclose(maps, maps_vl + vv, atol=1e-5)
    assert torch.allclose(scores, scores_vl + vv.flatten(1).amax(1), atol=1e-5)
    with pytest.raises(KeyError, match="no memory bank for 'pill'"):
        v.vision_vision(v(x, ["pill"] * 2)["patches"], "pill", 128)


def test_focal_and_vlad_loss_hand_worked():
    p, y = torch.tensor([0.8, 0.3]), torch.tensor([1.0, 0.0])
    want = (-(0.2 ** 2) * math.log(0.8) - (0.3 ** 2) * math.log(0.7)) / 2
    assert focal_loss(p, y, 2.0).item() == pytest.approx(want, rel=1e-5)
    out = {"score_vl": p, "map_vl": torch.full((2, 2, 2), 0.5)}
    masks = torch.zeros(2, 2, 2)
    masks[0, 0] = 1
    bce = math.log(2)
    d0 = (2 * 1 + 1) / (2 + 2 + 1)          # sum(y y_hat) = 1, sum(y) = 2, sum(y_hat) = 2
    d1 = 1 / (0 + 2 + 1)
    dice = ((1 - d0 / (d0 + 1)) + (1 - d1 / (d1 + 1))) / 2
    assert vlad_loss(out, y, masks, omega=6.0, beta=1.0).item() == pytest.approx(want + 6 * (bce + dice), rel=1e-5)


def test_one_batch_overfit_puts_the_map_on_the_defect(clip):
    """Adapters trained on one batch (an image with a marked square, a normal one) for 100 Adam steps: the loss falls
    by more than 40 % and the vision-language map is higher inside the square than outside it."""
    torch.manual_seed(0)
    v = VLAD(clip, stages=(2, 3))
    x = _images(2, seed=1) * 0.3
    x[0, :, 32:80, 40:88] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    masks = torch.zeros(2, 128, 128)
    masks[0, 32:80, 40:88] = 1
    labels = torch.tensor([1.0, 0.0])
    opt = torch.optim.Adam(v.adapters.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss = vlad_loss(v(x, ["bottle", "bottle"]), labels, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]          # the image term cannot fall: the image embedding is frozen
    m = v(x, ["bottle", "bottle"])["map_vl"].detach()
    assert m[0][masks[0] > 0].mean() > m[0][masks[0] == 0].mean() + 0.2


def test_a_missing_clip_is_a_clear_error(tmp_path):
    from core.models.loading import ModelNotFoundError
    with pytest.raises(ModelNotFoundError, match="No CLIP model at .*downstream.clip_path"):
        load_clip(tmp_path / "nothing", key="downstream.clip_path")


def test_the_anomalous_state_is_the_second_text_row(clip):
    """With the 'anomalous' text pointing along the image's own tokens (and 'normal' against them) the maps and the
    score exceed 1/2; swapped, they fall below."""
    torch.manual_seed(0)
    v = VLAD(clip, stages=(2, 3))
    x = _images(1)
    image, patches = v.features(x)
    u = torch.nn.functional.normalize(torch.cat(patches, 1).mean(1)[0] + image[0], dim=-1).detach()
    v.text["probe"] = torch.stack([-u, u])
    v.text["swapped"] = torch.stack([u, -u])
    out, swapped = v(x, ["probe"]), v(x, ["swapped"])
    assert out["map_vl"].mean() > 0.5 > swapped["map_vl"].mean()
    assert out["score_vl"].item() > 0.5 > swapped["score_vl"].item()
