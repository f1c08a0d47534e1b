"""Detection and segmentation metrics: AUROC, AP, F1-max, IoU, AUPRO.

Image-level metrics take one label and one score per image; pixel-level metrics take anomaly maps and
ground-truth masks of shape (N, H, W) and flatten them. AUROC and AP come from scikit-learn, as in
the papers. Inputs may be numpy arrays or torch tensors.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_scores(scores: np.ndarray, what: str, name: str = "scores") -> np.ndarray:
    if scores.size == 0:
        raise ValueError(f"{what}: {name} are empty.")
    if not np.isfinite(scores).all():
        raise ValueError(f"{what}: {name} hold {int((~np.isfinite(scores)).sum())} NaN or infinite value(s); fix the "
                         f"model's output (or drop those images) before scoring.")
    return scores


def _check_binary(labels: np.ndarray, what: str, name: str = "labels") -> np.ndarray:
    """Ground truth must be exactly 0 / 1 (or bool): a soft, NaN or 0/255 mask would be silently misread."""
    if labels.size == 0:
        raise ValueError(f"{what}: {name} are empty.")
    if labels.dtype != bool and not np.isin(labels, (0, 1)).all():
        bad = np.unique(labels[~np.isin(labels, (0, 1))])[:3]
        raise ValueError(f"{what}: {name} must be binary (0 / 1), found values such as {bad.tolist()}. Fix: threshold "
                         f"soft masks (mask > 0.5) and scale 0 / 255 masks (mask > 127) first.")
    return labels.astype(bool)


def _pair(labels, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    y, s = _np(labels), _np(scores)
    if y.shape != s.shape:  # equal size is not enough: a transposed map would be scored against the wrong pixels
        raise ValueError(f"{what}: ground truth {y.shape} and scores {s.shape} differ in shape.")
    return _check_binary(y, what), _check_scores(s, what)


def _binary_targets(labels: np.ndarray, what: str) -> np.ndarray:
    labels = labels.astype(bool).ravel()
    if labels.all() or not labels.any():
        raise ValueError(f"{what}: the ground truth holds only one class ({int(labels[0])}); "
                         f"AUROC / AP / F1-max need both normal and anomalous samples.")
    return labels


def auroc(labels, scores) -> float:
    y, s = _pair(labels, scores, "auroc")
    return float(roc_auc_score(_binary_targets(y, "auroc"), s.ravel()))


def average_precision(labels, scores) -> float:
    y, s = _pair(labels, scores, "average_precision")
    return float(average_precision_score(_binary_targets(y, "average_precision"), s.ravel()))


def f1_max(labels, scores) -> float:
    """max over the precision-recall curve of 2PR / (P + R)."""
    y, s = _pair(labels, scores, "f1_max")
    p, r, _ = precision_recall_curve(_binary_targets(y, "f1_max"), s.ravel())
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def iou(maps, masks, threshold: float = 0.5, reduction: str = "global") -> float:
    """IoU of ``maps >= threshold`` with ``masks``.

    reduction="global": sum of intersections over sum of unions across all images (one pixel pool; SeaS's IoU).
    reduction="mean_per_image": mean of per-image IoUs over the images whose union is non-empty
    (an image with no defect and no prediction has no defined IoU and is left out).
    """
    gt, scores = _pair(masks, maps, "iou")
    pred = scores >= threshold
    if reduction == "global":
        union = np.logical_or(pred, gt).sum()
        return float(np.logical_and(pred, gt).sum() / union) if union else 1.0
    if reduction == "mean_per_image":
        axes = tuple(range(1, pred.ndim))
        inter = np.logical_and(pred, gt).sum(axis=axes)
        union = np.logical_or(pred, gt).sum(axis=axes)
        keep = union > 0
        return float((inter[keep] / union[keep]).mean()) if keep.any() else 1.0
    raise ValueError(f"iou: reduction must be 'global' or 'mean_per_image', got '{reduction}'.")


# ----------------------------------------------------------------------------- AUPRO

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def pro_curve(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, from (0, 0) to (1, 1).

    FPR: false-positive pixels over all normal pixels of all images (normal images included).
    PRO: per-region overlap |pred ∩ region| / |region|, averaged over every connected ground-truth
    region (8-connectivity) of every image. A pixel is predicted anomalous when its score >= threshold.
    Computed in one sort: each normal pixel carries weight 1/#normal into FPR, each region pixel
    1/(|region| * #regions) into PRO; cumulative sums over descending scores give both curves.
    """
    masks, maps = _pair(masks, maps, "pro_curve")
    maps = maps.astype(np.float64)
    if maps.ndim != 3:
        raise ValueError(f"pro_curve: expected maps and masks of shape (N, H, W), got {maps.shape}.")
    fp_w = np.zeros(maps.shape, np.float64)
    pro_w = np.zeros(maps.shape, np.float64)
    n_normal = (~masks).sum()
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=EIGHT_CONNECTED)
        for r in range(1, n + 1):
            regions.append((i, lab == r))
    if not regions:
        raise ValueError("pro_curve: the masks hold no anomalous region.")
    if n_normal == 0:
        raise ValueError("pro_curve: the masks hold no normal pixel, so the FPR is undefined.")
    fp_w[~masks] = 1.0 / n_normal
    for i, region in regions:
        pro_w[i][region] = 1.0 / (region.sum() * len(regions))
    order = np.argsort(-maps.ravel(), kind="stable")
    s = maps.ravel()[order]
    fpr = np.cumsum(fp_w.ravel()[order])
    pro = np.cumsum(pro_w.ravel()[order])
    last_of_threshold = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    fpr = np.clip(fpr[last_of_threshold], 0, 1)
    pro = np.clip(pro[last_of_threshold], 0, 1)
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def integrate_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) (x non-decreasing) from x[0] to x_max, y interpolated linearly at x_max."""
    i = int(np.searchsorted(x, x_max, side="right"))  # first index with x > x_max
    area = float(np.trapezoid(y[:i], x[:i])) if i > 1 else 0.0
    if i < len(x) and x[i - 1] < x_max:
        y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        area += (x_max - x[i - 1]) * (y[i - 1] + y_at) / 2
    return area


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit`` (0.3), divided by it: 1.0 is perfect.

    Matches the MVTec 3D-AD reference evaluation and anomalib (evaluation.md).
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"aupro: fpr_limit must be in (0, 1] (a false-positive rate; 0.3 in the papers), got "
                         f"{fpr_limit}.")
    fpr, pro = pro_curve(maps, masks)
    return integrate_to(fpr, pro, fpr_limit) / fpr_limit


# ----------------------------------------------------------------------------- bundles

def image_metrics(labels, scores) -> dict[str, float]:
    return {"image_auroc": auroc(labels, scores), "image_ap": average_precision(labels, scores),
            "image_f1_max": f1_max(labels, scores)}


def pixel_metrics(maps, masks, iou_threshold: float = 0.5, with_aupro: bool = True) -> dict[str, float]:
    m, g = _np(maps), _np(masks)
    out = {"pixel_auroc": auroc(g, m), "pixel_ap": average_precision(g, m), "pixel_f1_max": f1_max(g, m),
           "pixel_iou": iou(m, g, iou_threshold, "global")}
    if with_aupro:
        out["pixel_aupro"] = aupro(m, g)
    return out
