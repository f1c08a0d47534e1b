"""Downstream building blocks: the DRAEM-style U-Net, the focal loss and the image-score rules."""
import math

import pytest

import numpy as np
import torch

from segmentation.scores import max_score, pooled_max_score
from segmentation.unet import DiscriminativeUNet, focal_loss


def test_unet_maps_an_image_to_two_class_logits_of_the_same_size():
    net = DiscriminativeUNet(base=4).eval()
    out = net(torch.rand(2, 3, 64, 96))
    assert out.shape == (2, 2, 64, 96)
    skip_in = [b[0].in_channels for b in net.decoder]
    assert skip_in == [64, 48, 24, 12, 8]  # up-sampled features + the skip of the same level, base 4
    try:
        net(torch.rand(1, 3, 48, 48))
    except ValueError as e:
        assert "divisible by 32" in str(e)
    else:
        raise AssertionError("a side not divisible by 32 must be rejected")


def test_focal_loss_hand_worked():
    # two pixels: class-1 logit margin log(3) -> p_1 = 3/4; target 1 then 0
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]]).T.reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    p = torch.tensor([0.75, 0.25])  # p_t of each pixel
    expected = (-(1 - p) ** 2 * p.log()).mean()
    torch.testing.assert_close(focal_loss(logits, target, gamma=2.0), expected)
    # gamma = 0 is cross-entropy
    ce = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), ce)


def test_image_scores_max_vs_average_pooled_max():
    m = torch.zeros(1, 64, 64)
    m[0, 30, 30] = 1.0  # one hot pixel
    assert max_score(m).item() == 1.0
    assert abs(pooled_max_score(m).item() - 1 / 441) < 1e-7  # 21 x 21 window, zero padding counted
    blob = torch.zeros(1, 64, 64)
    blob[0, 10:40, 10:40] = 0.8  # a region larger than the window keeps its value
    assert abs(pooled_max_score(blob).item() - 0.8) < 1e-5


def test_bisenetv2_has_the_stated_branches_and_five_heads_at_input_size():
    from segmentation.bisenetv2 import BiSeNetV2

    m = BiSeNetV2(head_channels=16, aux_channels=(4, 4, 4, 4))
    x = torch.randn(2, 3, 64, 96)
    feats = m.semantic(x)
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128]                 # semantic branch 16-32-64-128
    assert [f.shape[-1] for f in feats] == [96 // 4, 96 // 8, 96 // 16, 96 // 32]
    detail_widths = [s[-1][0].out_channels for s in m.detail.stages]
    assert detail_widths == [64, 64, 128]                                     # detail branch 64-64-128
    assert m.detail(x).shape[-2:] == (8, 12)                                  # 1/8
    m.train()
    out, aux = m(x)
    assert out.shape == (2, 2, 64, 96) and len(aux) == 4 and all(a.shape == out.shape for a in aux)
    m.eval()
    assert m(x).shape == (2, 2, 64, 96)
    with pytest.raises(ValueError, match="32"):
        m(torch.randn(1, 3, 48, 48))


def test_upernet_resnet50_outputs_and_local_weights(tmp_path):
    import timm

    from core.metrics.extractors import MissingWeightsError
    from segmentation.upernet import UPerNet

    m = UPerNet(channels=16, aux_channels=8).eval()
    assert m.backbone.feature_info.channels() == [256, 512, 1024, 2048]
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    m.train()
    out, aux = m(torch.randn(2, 3, 64, 64))
    assert out.shape == aux[0].shape == (2, 2, 64, 64)
    # a torchvision-style ImageNet state dict (with its 1000-class fc) loads from a local file
    ref = timm.create_model("resnet50", pretrained=False)
    torch.save(ref.state_dict(), tmp_path / "r50.pth")
    loaded = UPerNet(channels=16, aux_channels=8, weights=str(tmp_path / "r50.pth"))
    assert torch.equal(loaded.backbone.conv1.weight, ref.conv1.weight)
    with pytest.raises(MissingWeightsError, match="downstream.weights"):
        UPerNet(weights=str(tmp_path / "missing.pth"))


def test_classifiers_build_with_the_requested_classes():
    from omegaconf import OmegaConf

    from segmentation.models import build_classifier

    m = build_classifier(OmegaConf.create({"name": "resnet34"}), 3).eval()
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="resnet34"):
        build_classifier(OmegaConf.create({"name": "vgg"}), 2)


def test_draem_blend_is_eq_1_and_perlin_masks_are_binary():
    from segmentation.draem import blend, perlin_mask

    img, src = torch.full((3, 8, 8), 0.2), torch.full((3, 8, 8), 1.0)
    m = torch.zeros(8, 8)
    m[2:5, 3:6] = 1
    out = blend(img, src, m, 0.25)
    assert torch.allclose(out[:, m == 0], img[:, m == 0])                      # outside: the image
    assert torch.allclose(out[:, m == 1], torch.full_like(out[:, m == 1], 0.75 * 1.0 + 0.25 * 0.2))  # inside
    torch.manual_seed(0)
    pm = perlin_mask(64)
    assert set(pm.unique().tolist()) <= {0.0, 1.0} and 0 < pm.sum() < 64 * 64


def test_draem_reconstruction_loss_ignores_the_masked_pixels_of_generated_images():
    from segmentation.draem import reconstruction_loss

    torch.manual_seed(0)
    target = torch.rand(2, 3, 32, 32)
    weight = torch.ones(2, 32, 32)
    weight[0, 8:16, 8:16] = 0                                                    # a generated image's anomaly
    rec = target.clone()
    assert reconstruction_loss(rec, target, weight).item() < 1e-6
    rec[0, :, 8:16, 8:16] = 1 - rec[0, :, 8:16, 8:16]                           # wrong only inside the mask
    assert reconstruction_loss(rec, target, weight).item() < 1e-6
    rec[1, :, 8:16, 8:16] = 1 - rec[1, :, 8:16, 8:16]                           # wrong where it counts
    assert reconstruction_loss(rec, target, weight).item() > 1e-3


def test_patchcore_coreset_and_nearest_neighbour_scores():
    from segmentation.patchcore import PatchCore, gaussian_blur, greedy_coreset

    pts = torch.tensor([[0.0], [1.0], [2.0], [10.0], [9.5]])
    chosen = greedy_coreset(pts, 3, projection_dim=0)
    # k-center: every pick after the (random) first is the point farthest from the points chosen before it
    for i in range(1, 3):
        d = torch.cdist(pts, pts[chosen[:i]]).min(1).values
        assert d[chosen[i]] == d.max()
    assert len(set(chosen.tolist())) == 3
    flat = torch.ones(1, 16, 16)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat, atol=1e-6)           # a normalised kernel
    torch.manual_seed(0)
    pc = PatchCore("resnet18", preprocess_dim=32, target_dim=32, coreset_ratio=1.0, blur_sigma=0)
    normal = torch.zeros(2, 3, 64, 64)
    pc.fit([normal], progress=False)
    odd = normal[:1].clone()
    odd[:, :, 40:56, 40:56] = 3.0                                               # a bright square
    maps, scores = pc(torch.cat([normal[:1], odd]))
    assert scores[0] < 1e-4 < scores[1]                                         # a memorised image scores 0
    assert maps[1, 44:52, 44:52].mean() > maps[1, :16, :16].mean()             # the square is where the map is high
    # the image score is the largest patch distance (with sigma 0 the map interpolates the patch distances, so its
    # maximum cannot exceed it), far above their mean
    assert scores[1] >= maps[1].max() - 1e-5 and scores[1] > 3 * maps[1].mean()


def test_segmentation_loss_adds_weighted_auxiliary_heads():
    import torch.nn.functional as F

    from segmentation.train import TrainSpec, segmentation_loss

    torch.manual_seed(0)
    main, aux = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    target = (torch.rand(2, 8, 8) > 0.8).float()
    spec = TrainSpec(loss="ce", aux_weight=0.4)
    expected = F.cross_entropy(main, target.long()) + 0.4 * F.cross_entropy(aux, target.long())
    assert torch.allclose(segmentation_loss((main, [aux]), target, spec), expected)
    assert torch.allclose(segmentation_loss(main, target, spec), F.cross_entropy(main, target.long()))
    focal = TrainSpec(loss="focal", focal_gamma=0.0, aux_weight=0.0)  # gamma 0: the focal loss is cross-entropy
    assert torch.allclose(segmentation_loss((main, [aux]), target, focal), F.cross_entropy(main, target.long()))


def test_training_batches_schedules_and_steps_hand_worked():
    from omegaconf import OmegaConf
    from segmentation.protocols import train_spec
    from segmentation.train import TrainSpec, augment, batch_indices, make_optimizer
    # the anomaly share of a batch is rounded, not truncated: 0.45 of 8 is 4 (3.6)
    a, n = batch_indices(5, 7, TrainSpec(batch_size=8, anomaly_fraction=0.45), 3)
    assert (len(a), len(n)) == (4, 4)
    a, n = batch_indices(5, 7, TrainSpec(batch_size=6, anomaly_fraction=0.2), 3)
    assert (len(a), len(n)) == (1, 5)
    # poly: lr (1 - s / S) ** 0.9
    layer = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(layer, TrainSpec(steps=10, lr=0.1, schedule="poly"))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.1 * 0.5 ** 0.9)
    # epochs -> steps: ceil(epochs * n_train / batch) (a last partial batch is a step)
    cfg = OmegaConf.create({"seed": 0, "limits": {}, "downstream": {"train": {"batch_size": 4}},
                            "protocol": {"train": {"epochs": 3, "steps": None}}})
    assert train_spec(cfg, 10).steps == 8
    # augmentation moves image and mask together: an image that is its own mask stays so, for every item
    m = torch.zeros(8, 1, 6, 6)
    m[:, :, 0, :3] = 1
    m[:, :, 1:4, 0] = 1
    x = m.repeat(1, 3, 1, 1)
    xs, ms = augment(x, m, torch.Generator().manual_seed(0))
    assert all(torch.equal(xs[i, :1], ms[i]) for i in range(8))
    assert len({ms[i].flatten().tolist().__str__() for i in range(8)}) > 2     # it did move them


def test_patchcore_blur_is_scipys_gaussian_filter_truncated_at_4_sigma():
    from scipy import ndimage

    from segmentation.patchcore import gaussian_blur
    x = torch.rand(2, 20, 24, dtype=torch.float64)
    for sigma in (0.7, 1.5):
        want = np.stack([ndimage.gaussian_filter(m.numpy(), sigma, mode="mirror", truncate=4.0) for m in x])
        assert np.allclose(gaussian_blur(x, sigma).numpy(), want, atol=1e-10)
    assert gaussian_blur(x, 0) is x


def test_draem_ssim_is_the_gaussian_window_formula_with_zero_padding():
    from scipy import ndimage
    from scipy.signal.windows import gaussian

    from segmentation.draem import ssim
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 13, 17, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(2, 3, 13, 17, generator=g, dtype=torch.float64)).clamp(0, 1)
    w = np.outer(gaussian(11, 1.5), gaussian(11, 1.5))
    w /= w.sum()
    f = lambda a: ndimage.correlate(a, w, mode="constant")   # noqa: E731
    vals = []
    for a, b in zip(x.reshape(-1, 13, 17).numpy(), y.reshape(-1, 13, 17).numpy()):
        ma, mb = f(a), f(b)
        saa, sbb, sab = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        vals.append(((2 * ma * mb + c1) * (2 * sab + c2)) / ((ma ** 2 + mb ** 2 + c1) * (saa + sbb + c2)))
    assert float(ssim(x, y)) == pytest.approx(float(np.mean(vals)), rel=1e-9)
    assert float(ssim(x, x)) == pytest.approx(1.0)


def test_greedy_coreset_keeps_everything_when_asked_for_as_many_and_spreads_over_clusters():
    from segmentation.patchcore import greedy_coreset
    f = torch.randn(7, 5)
    assert torch.equal(greedy_coreset(f, 7), torch.arange(7)) and torch.equal(greedy_coreset(f, 9), torch.arange(7))
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 200, generator=g) * 50
    feats = torch.cat([c + torch.randn(30, 200, generator=g) for c in centres])      # 4 far-apart clusters of 30
    picks = greedy_coreset(feats, 4, projection_dim=16, seed=3)
    assert sorted((picks // 30).tolist()) == [0, 1, 2, 3]                              # one from each cluster
    assert torch.equal(picks, greedy_coreset(feats, 4, projection_dim=16, seed=3))


def test_perlin_noise_is_zero_on_the_lattice_and_continuous_between():
    from segmentation.draem import perlin_2d
    torch.manual_seed(0)
    n = perlin_2d(12, 20, (3, 4))                    # lattice every 4 rows and every 5 columns
    assert n.shape == (12, 20)
    assert torch.allclose(n[::4, ::5], torch.zeros(3, 4), atol=1e-6)
    assert n.abs().max() > 0.1 and (n[1:] - n[:-1]).abs().max() < 0.6 and (n[:, 1:] - n[:, :-1]).abs().max() < 0.6
    torch.manual_seed(0)
    assert torch.equal(perlin_2d(12, 20, (3, 4)), n)


def test_draem_anomaly_source_reads_every_image_of_a_folder_tree_at_the_size(tmp_path):
    from omegaconf import OmegaConf
    from PIL import Image

    from core.data import DatasetError
    from segmentation.protocols import anomaly_source
    (tmp_path / "dtd" / "banded").mkdir(parents=True)
    (tmp_path / "dtd" / "dotted" / "deep").mkdir(parents=True)
    for i, rel in enumerate(["top.png", "banded/a.jpg", "banded/b.png", "dotted/deep/c.png"]):
        Image.fromarray(np.full((9, 7, 3), 40 * i, np.uint8)).save(tmp_path / "dtd" / rel)
    (tmp_path / "dtd" / "notes.txt").write_text("not an image")
    imgs = anomaly_source(OmegaConf.create({"downstream": {"anomaly_source": str(tmp_path / "dtd")}}), 16)
    assert len(imgs) == 4 and all(t.shape == (3, 16, 16) for t in imgs)
    assert sorted(round(float(t.mean()) * 255) for t in imgs) == [0, 40, 80, 120]
    assert anomaly_source(OmegaConf.create({"downstream": {"anomaly_source": None}}), 16) is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        anomaly_source(OmegaConf.create({"downstream": {"anomaly_source": str(tmp_path / "empty")}}), 16)
