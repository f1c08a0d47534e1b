"""Generation metrics: IS / FID / KID on hand-worked values and against torchmetrics; IC-LPIPS logic; offline loading."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from core.metrics import ICLPIPSVariant, extract, fid, ic_lpips, ic_lpips_anomaly, inception_score, kid
from core.metrics.extractors import InceptionFeatures, MissingWeightsError, load_lpips
from core.metrics.generation import polynomial_mmd2


def test_inception_score_hand_worked():
    assert inception_score(np.full((10, 5), 0.2), splits=1)[0] == pytest.approx(1.0)  # no confidence -> 1
    onehot = np.eye(4)[np.arange(8) % 4]
    assert inception_score(onehot, splits=1)[0] == pytest.approx(4.0, rel=1e-6)  # confident and uniform -> C
    assert inception_score(np.eye(4)[np.zeros(8, int)], splits=1)[0] == pytest.approx(1.0)  # one class -> 1


def test_fid_hand_worked():
    # 1-D: FID = (mu1 - mu2)^2 + s1 + s2 - 2 sqrt(s1 s2) = (mu1-mu2)^2 + (sd1 - sd2)^2
    a = np.array([[0.0], [2.0]])            # mean 1, var 2 (ddof 1)
    b = np.array([[3.0], [7.0]])            # mean 5, var 8
    assert fid(a, b) == pytest.approx(16 + (np.sqrt(2) - np.sqrt(8)) ** 2)
    x = np.random.default_rng(0).normal(size=(50, 3))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)


def test_mmd_hand_worked():
    x, y = np.array([[1.0], [0.0]]), np.array([[1.0], [2.0]])
    k = lambda a, b: (a * b + 1) ** 3
    expected = (2 * k(1, 0)) / 2 + (2 * k(1, 2)) / 2 - 2 * (k(1, 1) + k(1, 2) + k(0, 1) + k(0, 2)) / 4
    assert polynomial_mmd2(x, y) == pytest.approx(expected)


class FeatureTable(nn.Module):
    """A 'feature extractor' that reads precomputed features out of the image tensor (for torchmetrics)."""

    num_features = 6

    def forward(self, x):
        return x.reshape(len(x), -1)[:, : self.num_features].double()


def test_kid_and_fid_agree_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(40, 6)), rng.normal(0.3, 1.2, size=(40, 6))
    to_img = lambda f: torch.tensor(np.pad(f, ((0, 0), (0, 3 * 2 * 2 - 6))).reshape(-1, 3, 2, 2))
    tm_kid = KernelInceptionDistance(feature=FeatureTable(), subsets=3, subset_size=40)
    tm_kid.update(to_img(real), real=True)
    tm_kid.update(to_img(fake), real=False)
    ours = kid(real, fake, subsets=3, subset_size=40)
    assert ours.mean == pytest.approx(tm_kid.compute()[0].item(), rel=1e-5)  # full-size subsets: same sets
    tm_fid = FrechetInceptionDistance(feature=FeatureTable())
    tm_fid.update(to_img(real), real=True)
    tm_fid.update(to_img(fake), real=False)
    assert fid(real, fake) == pytest.approx(tm_fid.compute().item(), rel=1e-4)


def test_kid_subset_shrinks_and_reports():
    rng = np.random.default_rng(2)
    r = kid(rng.normal(size=(30, 4)), rng.normal(size=(12, 4)), subsets=5, subset_size=1000)
    assert r.subset_size == 12 and r.shrunk and r.requested_subset_size == 1000
    assert kid(rng.normal(size=(30, 4)), rng.normal(size=(30, 4)), subset_size=20).shrunk is False


class TinyExtractor(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        f = self.conv(x).mean((2, 3))
        return f, self.head(f)


def test_extract_with_tiny_extractor_batches_consistently():
    x = torch.rand(7, 3, 16, 16)
    f1, l1 = extract(TinyExtractor(), x, batch_size=2)
    f2, l2 = extract(TinyExtractor(), x, batch_size=7)
    assert f1.shape == (7, 8) and l1.shape == (7, 5) and np.allclose(f1, f2, atol=1e-6)


def l1_distance(a, b):
    return (a - b).abs().mean(dim=(1, 2, 3))


def test_ic_lpips_hand_worked_clusters():
    c = lambda v: torch.full((1, 1, 2, 2), float(v))
    targets = torch.cat([c(0), c(10)])
    # cluster of target 0: values 0, 1, 2; cluster of target 10: values 9, 13; one far value 100 -> target 10
    gen = torch.cat([c(0), c(1), c(2), c(9), c(13), c(100)])
    r = ic_lpips(gen, targets, l1_distance)
    # cluster 0 pairs: |0-1|, |0-2|, |1-2| -> mean 4/3; cluster 1: 9,13,100 -> (4 + 91 + 87)/3
    assert r.cluster_sizes == [3, 3]
    assert r.value == pytest.approx((4 / 3 + 182 / 3) / 2)
    full = ic_lpips(gen, targets, l1_distance, ICLPIPSVariant(pairs="all"))
    assert full.value == pytest.approx((2 * 4 / 9 + 2 * 182 / 9) / 2)
    capped = ic_lpips(gen, targets, l1_distance, ICLPIPSVariant(cluster_cap=2))
    assert capped.value == pytest.approx((1 + 4) / 2)


def test_ic_lpips_empty_cluster_variants_and_masked():
    c = lambda v: torch.full((1, 1, 2, 2), float(v))
    targets = torch.cat([c(0), c(50)])
    gen = torch.cat([c(0), c(2), c(4)])
    assert ic_lpips(gen, targets, l1_distance).value == pytest.approx(8 / 3)  # empty cluster skipped
    assert ic_lpips(gen, targets, l1_distance, ICLPIPSVariant(empty="zero")).value == pytest.approx(4 / 3)
    # IC-LPIPS(a): only the masked pixels count; images identical inside the mask have zero diversity
    g = torch.rand(4, 3, 4, 4)
    g[:, :, :2] = 0.5
    m = torch.zeros(4, 1, 4, 4)
    m[:, :, :2] = 1
    t = torch.rand(1, 3, 4, 4)
    assert ic_lpips_anomaly(g, m, t, m[:1], l1_distance).value == pytest.approx(0.0)
    assert ic_lpips(g, t, l1_distance).value > 0


def test_ic_lpips_assigns_each_image_to_its_nearest_target_and_masks_the_targets_too():
    c = lambda v: torch.full((1, 1, 2, 2), float(v))
    targets = torch.cat([c(0), c(10)])
    r = ic_lpips(torch.cat([c(0), c(1), c(2), c(3), c(9)]), targets, l1_distance, ICLPIPSVariant(empty="zero"))
    assert r.cluster_sizes == [4, 1]                     # the nearest target, not the farthest
    # IC-LPIPS(a): the targets are masked as well. Masked, target 0 equals the generated anomalies (its far-off
    # background is masked away); unmasked, target 1 would be the nearer one.
    gen = torch.zeros(2, 1, 2, 2)
    gen[:, :, 0] = 5
    gen[1, :, 0, 0] = 6
    gen_masks = torch.zeros(2, 1, 2, 2)
    gen_masks[:, :, 0] = 1
    t = torch.zeros(2, 1, 2, 2)
    t[0, :, 0] = 5
    t[0, :, 1] = 100
    t_masks = torch.zeros(2, 1, 2, 2)
    t_masks[:, :, 0] = 1
    a = ic_lpips_anomaly(gen, gen_masks, t, t_masks, l1_distance, ICLPIPSVariant(empty="zero"))
    assert a.cluster_sizes == [2, 0]
    assert a.value == pytest.approx((1 / 4 + 0) / 2)


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"(?s)inception_v3_google-0cc3c7bd.pth.*metrics.inception_weights"):
        InceptionFeatures()
    with pytest.raises(MissingWeightsError, match=r"vgg16-397923af.pth"):
        load_lpips("vgg", tmp_path / "nope.pth")


def test_lpips_backbone_loads_from_local_file(tmp_path, monkeypatch):
    from torchvision.models import alexnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(3)
    feats = alexnet().features.state_dict()
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({f"features.{k}": v for k, v in feats.items()}, path)
    model = load_lpips("alex", path)
    assert torch.equal(model.net.slice1.state_dict()["0.weight"], feats["0.weight"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = model(x, x.flip(0)).flatten()
    assert d.shape == (2,) and (d > 0).all() and model(x, x).abs().max() < 1e-6
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not look like"):
        load_lpips("alex", tmp_path / "bad.pth")
