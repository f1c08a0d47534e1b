"""Detection metrics on hand-worked cases; AUPRO against a direct implementation of its definition."""
import numpy as np
import pytest
from scipy import ndimage

from core.metrics import aupro, auroc, average_precision, f1_max, image_metrics, iou, pixel_metrics, pro_curve
from core.metrics.detection import integrate_to


def test_hand_worked_image_metrics():
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    assert auroc(y, s) == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered
    assert average_precision(y, s) == pytest.approx((1 + 2 / 3) / 2)  # precision at each positive: 1, 2/3
    assert f1_max(y, s) == pytest.approx(0.8)  # threshold 0.35: P = 2/3, R = 1


def test_perfect_and_constant_predictors():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 8, 8), bool)
    masks[1, 2:5, 2:5] = True
    masks[3, 0:2, 5:8] = True
    labels = masks.reshape(4, -1).any(1)
    perfect = masks.astype(float) * 0.9 + rng.uniform(0, 0.05, masks.shape)
    m = {**image_metrics(labels, perfect.reshape(4, -1).max(1)), **pixel_metrics(perfect, masks)}
    assert all(v == pytest.approx(1.0) for v in m.values()), m
    const = np.full(masks.shape, 0.3)
    assert auroc(masks, const) == pytest.approx(0.5) and auroc(labels, np.ones(4)) == pytest.approx(0.5)


def test_single_class_raises():
    with pytest.raises(ValueError, match="only one class"):
        auroc([1, 1], [0.2, 0.3])


def test_iou_global_vs_mean_per_image():
    gt = np.zeros((2, 4, 4), bool)
    gt[0, :2, :2] = True            # 4 px
    gt[1, :, :] = True              # 16 px
    pred = np.zeros((2, 4, 4))
    pred[0, :2, :4] = 1             # 8 px, 4 overlap -> IoU 0.5
    pred[1, :2, :] = 1              # 8 px, 8 overlap -> IoU 0.5 ... of 16 union
    assert iou(pred, gt, reduction="mean_per_image") == pytest.approx((4 / 8 + 8 / 16) / 2)
    assert iou(pred, gt, reduction="global") == pytest.approx((4 + 8) / (8 + 16))
    empty = np.zeros((1, 4, 4))
    assert iou(empty, np.zeros((1, 4, 4), bool), reduction="mean_per_image") == 1.0


def test_aupro_hand_worked():
    # one image, two regions of 2 px and 1 px, 5 normal px
    gt = np.array([[[1, 1, 0, 0], [0, 0, 0, 1]]], bool)
    sc = np.array([[[0.9, 0.2, 0.8, 0.1], [0.05, 0.0, 0.3, 0.7]]])
    fpr, pro = pro_curve(sc, gt)
    # thresholds 0.9, 0.8, 0.7, 0.3, 0.2, 0.1, 0.05, 0.0
    # pro per threshold (mean of regions A={0.9,0.2}, B={0.7}): .25 .25 .75 .75 1 1 1 1
    # fpr (normals 0.8, 0.3, 0.1, 0.05, 0.0 of 5):            0  .2  .2  .4 .4 .6 .8 1
    assert np.allclose(pro, [0, .25, .25, .75, .75, 1, 1, 1, 1])
    assert np.allclose(fpr, [0, 0, .2, .2, .4, .4, .6, .8, 1])
    # area to 0.3: vertical step at 0 (no area), trapezoid 0..0.2 at 0.25, step, then 0.2..0.3 at 0.75
    assert aupro(sc, gt) == pytest.approx((0.2 * 0.25 + 0.1 * 0.75) / 0.3)


def _aupro_by_definition(maps, masks, limit=0.3):
    """Threshold by threshold, the slow way."""
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([pred[i][r].mean() for i, r in regions])
        pts.append((fpr, pro))
    x, y = np.array(pts).T
    keep = x <= limit
    xs, ys = list(x[keep]), list(y[keep])
    if xs[-1] < limit and (~keep).any():
        j = np.argmax(~keep)
        xs.append(limit)
        ys.append(y[j - 1] + (y[j] - y[j - 1]) * (limit - x[j - 1]) / (x[j] - x[j - 1]))
    area = sum((xs[k + 1] - xs[k]) * (ys[k + 1] + ys[k]) / 2 for k in range(len(xs) - 1))
    return area / limit


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_definition_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n, h = 4, 12
    masks = np.zeros((n, h, h), bool)
    for i in range(1, n):
        for _ in range(rng.integers(1, 4)):
            y, x, s = rng.integers(0, h - 3), rng.integers(0, h - 3), rng.integers(1, 4)
            masks[i, y:y + s, x:x + s] = True
    maps = rng.uniform(size=masks.shape) + 0.6 * masks * rng.uniform()
    if seed % 2:
        maps = np.round(maps, 1)  # ties
    assert aupro(maps, masks) == pytest.approx(_aupro_by_definition(maps, masks), abs=1e-9)


def test_eight_connectivity_makes_one_region():
    gt = np.zeros((1, 4, 4), bool)
    gt[0, 0, 0] = gt[0, 1, 1] = True  # diagonal neighbours: one region under 8-connectivity
    sc = np.zeros((1, 4, 4))
    sc[0, 0, 0] = 1.0
    fpr, pro = pro_curve(sc, gt)
    assert pro[1] == pytest.approx(0.5)  # half of the single region, not mean(1, 0) over two regions ... same value
    gt2 = gt.copy()
    gt2[0, 3, 3] = True  # a separate region of 1 px: PRO = mean(0.5, 0) = 0.25
    assert pro_curve(sc, gt2)[1][1] == pytest.approx(0.25)


def test_integrate_to_interpolates():
    x, y = np.array([0, 0.2, 0.5, 1.0]), np.array([0, 0.5, 1.0, 1.0])
    # up to 0.3: 0.2*0.25 + 0.1*(0.5 + 0.6667)/2
    assert integrate_to(x, y, 0.3) == pytest.approx(0.05 + 0.1 * (0.5 + 0.5 + 0.5 / 3) / 2)


def test_iou_counts_a_score_exactly_at_the_threshold_as_predicted_and_pixel_metrics_pass_their_threshold():
    gt = np.zeros((2, 3, 5), bool)
    gt[0, 0, :2] = True
    gt[1, 2, 3:] = True
    maps = np.zeros((2, 3, 5))
    maps[0, 0, :2] = 0.5            # exactly at the default threshold: predicted
    maps[1, 2, 3] = 0.7
    maps[1, 2, 4] = 0.3
    assert iou(maps, gt) == pytest.approx(3 / 4)
    assert iou(maps, gt, threshold=0.3) == pytest.approx(4 / 4)
    assert iou(maps, gt, threshold=0.6) == pytest.approx(1 / 4)
    # pixel_metrics hands its iou_threshold to the IoU
    assert pixel_metrics(maps, gt, with_aupro=False)["pixel_iou"] == pytest.approx(3 / 4)
    assert pixel_metrics(maps, gt, iou_threshold=0.6, with_aupro=False)["pixel_iou"] == pytest.approx(1 / 4)
    assert pixel_metrics(maps, gt, iou_threshold=0.3, with_aupro=False)["pixel_iou"] == pytest.approx(1.0)


def test_metric_dicts_name_each_value_and_iou_of_nothing_predicted_on_nothing_is_one():
    import torch
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    m = image_metrics(y, s)
    assert m == {"image_auroc": pytest.approx(0.75), "image_ap": pytest.approx((1 + 2 / 3) / 2),
                 "image_f1_max": pytest.approx(0.8)}
    # torch tensors are accepted as numpy arrays are, also ones that carry a graph (scores of a model in training)
    assert image_metrics(torch.tensor(y), torch.tensor(s, requires_grad=True)) == m
    # no defect and no prediction anywhere: the global IoU is 1 (nothing missed, nothing invented), not a 0 / 0
    assert iou(np.zeros((2, 3, 4)), np.zeros((2, 3, 4), bool)) == 1.0


@pytest.mark.parametrize("name,fn", [("auroc", auroc), ("average_precision", average_precision), ("f1_max", f1_max),
                                     ("iou", lambda y, s: iou(s, y)), ("pro_curve", lambda y, s: pro_curve(s, y))])
def test_each_bad_input_error_names_the_metric_and_the_bad_values(name, fn):
    y = np.zeros((2, 3, 4), int)
    y[0, 1, 1] = 1
    s = np.linspace(0, 1, 24).reshape(2, 3, 4)
    with pytest.raises(ValueError, match=rf"^{name}: ground truth \(2, 3, 4\) and scores \(2, 4, 3\) differ"):
        fn(y, s.transpose(0, 2, 1))
    bad = s.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=rf"^{name}: scores hold 1 NaN"):
        fn(y, bad)
    y255 = y * 255
    y255[1, 0, 0] = 7
    with pytest.raises(ValueError, match=rf"^{name}: labels must be binary \(0 / 1\), found values such as \[7, 255\]"):
        fn(y255, s)
    with pytest.raises(ValueError, match=rf"^{name}: labels are empty"):
        fn(np.zeros((0, 3, 4)), np.zeros((0, 3, 4)))


@pytest.mark.parametrize("name,fn", [("auroc", auroc), ("average_precision", average_precision), ("f1_max", f1_max)])
def test_one_class_error_names_the_metric_and_one_image_is_not_empty(name, fn):
    with pytest.raises(ValueError, match=rf"^{name}: the ground truth holds only one class \(0\)"):
        fn(np.zeros(3, int), np.array([0.1, 0.2, 0.3]))
    assert fn(np.array([[1, 0]]), np.array([[0.9, 0.1]])) == 1.0   # one image of two pixels


def test_iou_of_a_single_pixel_and_a_bool_mask():
    assert iou(np.array([0.7]), np.array([1])) == 1.0
    assert iou(np.array([0.2, 0.9]), np.array([True, True])) == 0.5


def test_f1_max_counts_a_zero_precision_point_as_zero_and_finds_a_best_point_with_p_plus_r_at_most_one():
    # ranked by score: a negative first (precision = recall = 0 there: F1 is 0, not 0/0), then the best point
    # precision 1/2 at recall 1/2 (F1 = 1/2, p + r = 1), then recall 1 at precision 2/7 (F1 = 4/9)
    labels = np.array([0, 1, 0, 0, 0, 0, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    assert f1_max(labels, scores) == pytest.approx(0.5)
    assert f1_max(np.array([1, 0]), np.array([0.1, 0.9])) == pytest.approx(2 / 3)


def test_iou_mean_per_image_by_hand_with_a_one_pixel_union_and_images_of_different_iou():
    maps = np.zeros((3, 3, 4))
    masks = np.zeros((3, 3, 4), int)
    masks[0, :, :2] = 1            # 6 pixels; 4 predicted -> IoU 2/3
    maps[0, :, 0] = 0.9
    maps[0, 0, 1] = 0.9
    masks[1, 1, 1] = 1             # union of one pixel, predicted -> IoU 1
    maps[1, 1, 1] = 0.8
    maps[2, 2, 3] = 0.7            # nothing to find, one false positive -> IoU 0
    assert iou(maps, masks, 0.5, "mean_per_image") == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert iou(maps, masks, 0.5, "global") == pytest.approx((4 + 1) / (6 + 1 + 1))


def test_integrate_to_before_the_second_point_and_past_the_last_point():
    x, y = np.array([0.0, 0.5, 1.0]), np.array([0.0, 1.0, 1.0])
    assert integrate_to(x, y, 0.25) == pytest.approx(0.25 * 0.5 / 2)   # interpolated inside the first segment
    assert integrate_to(x[:2], y[:2], 1.0) == pytest.approx(0.25)        # no point past 0.5: the curve ends there


def test_aupro_fpr_limit_bounds():
    maps = np.random.default_rng(0).random((2, 8, 9))
    masks = np.zeros((2, 8, 9), int)
    masks[0, 2:4, 3:6] = 1
    full = aupro(maps, masks, fpr_limit=1.0)   # the whole curve is allowed
    fpr, pro = pro_curve(maps, masks)
    assert full == pytest.approx(np.trapezoid(pro, fpr))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="aupro: fpr_limit must be in"):
            aupro(maps, masks, fpr_limit=bad)


def test_pro_curve_needs_a_normal_pixel_and_one_is_enough():
    masks = np.ones((2, 3, 4), int)
    maps = np.random.default_rng(1).random((2, 3, 4))
    with pytest.raises(ValueError, match="no normal pixel"):
        pro_curve(maps, masks)
    masks[1, 2, 3] = 0
    fpr, pro = pro_curve(maps, masks)
    assert fpr[0] == 0 and fpr[-1] == 1 and pro[-1] == pytest.approx(1)
