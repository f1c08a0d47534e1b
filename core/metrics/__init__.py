"""Metrics: detection / segmentation (AUROC, AP, F1-max, IoU, AUPRO) and generation (IS, FID, KID, IC-LPIPS)."""
from .detection import aupro, auroc, average_precision, f1_max, image_metrics, iou, pixel_metrics, pro_curve
from .generation import (ICLPIPSVariant, KIDResult, extract, fid, ic_lpips, ic_lpips_anomaly, inception_score,
                         inception_score_from_logits, kid, lpips_distance)

__all__ = ["ICLPIPSVariant", "KIDResult", "aupro", "auroc", "average_precision", "extract", "f1_max", "fid",
           "ic_lpips", "ic_lpips_anomaly", "image_metrics", "inception_score", "inception_score_from_logits", "iou",
           "kid", "lpips_distance", "pixel_metrics", "pro_curve"]
