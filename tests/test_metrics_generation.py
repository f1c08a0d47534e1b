"""Generation metrics: IS / FID / KID on hand-worked values and against torchmetrics; IC-LPIPS logic; offline loading."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

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


def test_generation_metric_errors_name_the_metric_and_the_set():
    ok = np.random.default_rng(0).normal(size=(5, 3))
    for name, fn in (("fid", fid), ("kid", kid)):
        with pytest.raises(ValueError, match=rf"^{name}: real features must be a non-empty \(N, D\) array, got shape \(5,\)"):
            fn(np.zeros(5), ok)
        with pytest.raises(ValueError, match=rf"^{name}: generated features hold NaN"):
            fn(ok, np.full((5, 3), np.nan))
        with pytest.raises(ValueError, match=rf"^{name}: real features have 3 dimensions and generated ones 4"):
            fn(ok, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="fid needs at least two images in each set"):
        fid(ok[:1], ok)                      # one set too small is enough to refuse
    with pytest.raises(ValueError, match=r"^inception_score: probs must be a non-empty"):
        inception_score(np.zeros((0, 4)))


def test_inception_score_accepts_one_image_and_rounding_but_not_negative_probabilities():
    assert inception_score(np.array([[0.25, 0.75]]))[0] == pytest.approx(1.0)     # one image: p(y|x) = p(y)
    near = np.full((4, 4), 0.25)
    near[:, 0] += 5e-4                                                            # rows sum to 1.0005: rounding
    assert inception_score(near, splits=2)[0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="probability distribution"):
        inception_score(np.array([[1.5, -0.5], [0.5, 0.5]]))                    # rows sum to 1, one is negative
    with pytest.raises(ValueError, match="probability distribution"):
        inception_score(np.array([[0.5, 0.49], [0.5, 0.5]]))                    # off by 0.01


def test_inception_score_splits_and_from_logits():
    # two chunks: [onehot 0, onehot 1] has IS 2, [onehot 0, onehot 0] has IS 1; one chunk of all four: p(y) = (3/4, 1/4)
    probs = np.eye(2)[[0, 1, 0, 0]]
    assert inception_score(probs, splits=2) == pytest.approx((1.5, 0.5))
    kl = 3 / 4 * np.log(4 / 3) + 1 / 4 * np.log(4)
    assert inception_score(probs, splits=1) == pytest.approx((np.exp(kl), 0.0))
    logits = np.log(np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])) + 3.0       # softmax undoes the shift
    from core.metrics.generation import inception_score_from_logits
    assert inception_score_from_logits(logits, splits=1) == pytest.approx(
        inception_score(np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]), splits=1))


def test_fid_falls_back_to_regularised_covariances_when_the_root_is_not_finite(monkeypatch):
    import core.metrics.generation as G
    from scipy import linalg
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(7, 3)) + 1
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eps = np.eye(3) * 1e-6
    seen, real_sqrtm = [], linalg.sqrtm

    def sqrtm(m):   # the first root "fails" as sqrtm does on a singular product
        seen.append(m)
        return np.full_like(m, np.nan) if len(seen) == 1 else real_sqrtm(m)

    monkeypatch.setattr(G.linalg, "sqrtm", sqrtm)
    got = fid(a, b)
    assert len(seen) == 2 and np.allclose(seen[1], (s1 + eps) @ (s2 + eps))
    want = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
            - 2 * np.trace(np.real(real_sqrtm((s1 + eps) @ (s2 + eps)))))
    assert got == pytest.approx(want, rel=1e-9)


def test_kid_uses_the_subset_size_seed_gamma_and_coef_it_is_given():
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(12, 4)), rng.normal(size=(9, 4)) + 0.3
    r = kid(real, fake, subsets=7, subset_size=5, seed=3, gamma=0.5, coef=2.0)
    again = np.random.default_rng(3)
    vals = [polynomial_mmd2(real[again.choice(12, 5, replace=False)], fake[again.choice(9, 5, replace=False)],
                            3, 0.5, 2.0) for _ in range(7)]
    assert (r.mean, r.std, r.subset_size, r.requested_subset_size) == pytest.approx(
        (np.mean(vals), np.std(vals), 5, 5))
    assert kid(real, fake, subsets=7, subset_size=5).mean == kid(real, fake, subsets=7, subset_size=5, seed=0).mean
    assert kid(real[:2], fake[:2], subsets=3).subset_size == 2                  # two images each are enough
    x, y = np.array([[1.0], [0.0]]), np.array([[1.0], [2.0]])
    k = lambda a, b: (0.5 * a * b + 2) ** 3                                     # gamma 0.5, coef 2
    expected = (2 * k(1, 0)) / 2 + (2 * k(1, 2)) / 2 - 2 * (k(1, 1) + k(1, 2) + k(0, 1) + k(0, 2)) / 4
    assert polynomial_mmd2(x, y, 3, 0.5, 2.0) == pytest.approx(expected)


def test_ic_lpips_rejects_each_bad_variant_field_and_reports_its_variant():
    c = lambda v: torch.full((1, 1, 2, 2), float(v))
    gen, targets = torch.cat([c(0), c(1), c(20), c(22), c(23)]), torch.cat([c(50), c(0), c(20)])
    for bad in (ICLPIPSVariant(pairs="every"), ICLPIPSVariant(empty="drop")):
        with pytest.raises(ValueError, match="ICLPIPSVariant"):
            ic_lpips(gen, targets, l1_distance, bad)
    v = ICLPIPSVariant(cluster_cap=9)
    r = ic_lpips(gen, targets, l1_distance, v)
    # the first target's cluster is empty and skipped; the later clusters still count
    assert r.cluster_sizes == [0, 2, 3] and r.value == pytest.approx((1 + (2 + 3 + 1) / 3) / 2) and r.variant is v


def test_mask_alignment_by_hand():
    from core.metrics.generation import mask_alignment
    src = torch.zeros(3, 3, 4, 5)
    gen = src.clone()
    masks = torch.zeros(3, 1, 4, 5)
    masks[:, :, :2, :2] = 1
    gen[0, 1, 0, 0] = 0.5                  # image 0: one change, inside (in channel 1 only)
    gen[1, :, 0, 1] = 0.5                  # image 1: one inside, three outside
    gen[1, 2, 3, 2:5] = 0.3
    gen[2, 0, 1, 1] = 0.05                 # image 2: below the threshold: nothing changed
    out = mask_alignment(gen, src, masks)
    assert out[:2].tolist() == pytest.approx([1.0, 0.25]) and torch.isnan(out[2])
    assert mask_alignment(gen, src, masks[:, 0], threshold=0.01)[2] == 1.0   # masks without a channel axis


def test_inception_features_from_a_local_file(tmp_path, monkeypatch):
    """InceptionFeatures: torchvision's Inception-v3 from a local state dict, pool features and the fc logits of
    ImageNet-normalised 299 x 299 inputs; also found in $TORCH_HOME/hub/checkpoints/."""
    from torchvision.models import inception_v3
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(net.state_dict(), hub / "inception_v3_google-0cc3c7bd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = InceptionFeatures()
    x = torch.rand(2, 3, 40, 56)
    feats, logits = model(x)
    xn = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    xn = (xn - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want_logits = net(xn)
        net.fc = nn.Identity()
        want_feats = net(xn)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1000)
    assert torch.allclose(feats, want_feats, atol=1e-4) and torch.allclose(logits, want_logits, atol=1e-4)
    assert not model.net.training and set(dict(model.named_buffers())) >= {"mean", "std"}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError, match=rf"(?s)looked at '{tmp_path / 'nope.pth'}', '{tmp_path}/empty/hub/"
                                                  r"checkpoints/inception_v3_google-0cc3c7bd.pth'\).*my.key="):
        InceptionFeatures(tmp_path / "nope.pth", config_key="my.key")


def test_ic_lpips_with_model_is_ic_lpips_with_local_lpips(tmp_path, monkeypatch):
    from torchvision.models import alexnet
    from core.metrics.generation import ic_lpips_with_model, lpips_distance

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(3)
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({f"features.{k}": v for k, v in alexnet().features.state_dict().items()}, path)
    gen, targets = torch.rand(5, 3, 24, 24), torch.rand(2, 3, 24, 24)
    gm, tm = (torch.rand(5, 1, 24, 24) > 0.5).float(), (torch.rand(2, 1, 24, 24) > 0.5).float()
    v = ICLPIPSVariant(backbone="alex", resize=32, empty="zero")
    dist = lpips_distance(load_lpips("alex", path), 32, batch_size=2)
    assert ic_lpips_with_model(gen, targets, v, path).value == pytest.approx(ic_lpips(gen, targets, dist, v).value)
    assert ic_lpips_with_model(gen, targets, v, path, masks=(gm, tm)).value == pytest.approx(
        ic_lpips_anomaly(gen, gm, targets, tm, dist, v).value)
    # the distance is LPIPS on [-1, 1] inputs resized to `resize`, batched
    model = load_lpips("alex", path)
    a, b = torch.rand(3, 3, 20, 20), torch.rand(3, 3, 20, 20)
    up = lambda t: F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(lpips_distance(model, 32, batch_size=2)(a, b), model(up(a) * 2 - 1, up(b) * 2 - 1).flatten(),
                          atol=1e-6)
