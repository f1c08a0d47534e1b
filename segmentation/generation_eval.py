"""``scripts/eval_generation.py``: generation quality of a generated folder, per product and averaged.

- IS over the product's generated anomalies (Inception-v3 logits; splits = min(10, n)).
- IC-LPIPS (SeaS's variant by default, ``metrics_variant``): per anomaly type, each generated image joins the cluster
  of its nearest real *training* anomaly of that type (the split's train part), mean pairwise LPIPS per cluster;
  averaged over clusters, then over types.
- IC-LPIPS(a): the same on mask-multiplied images (the anomalies alone).
- KID of the generated normals (``<product>/train/good``) against the real normal training images; the subset
  size shrinks to min(n_real, n_fake) (reported).

Inception and the LPIPS backbone load from local files only (``weights.*``); a missing file stops the run with a
message naming it.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from core.data import DatasetError, apply_split, load_from_config
from core.metrics.generation import ICLPIPSVariant, extract, ic_lpips, inception_score_from_logits, kid, lpips_distance

from . import tables
from .data import ImagePool, load_generated

COLUMNS = {"is": "IS", "ic_lpips": "IC-LPIPS", "ic_lpips_anomaly": "IC-LPIPS(a)", "kid": "KID"}


def _images(samples, size=None):
    size = size or _native(samples)
    pool = ImagePool(samples, size)
    b = pool.batch(range(len(pool)))
    return b["image"], b["mask"][:, None]


def _native(samples) -> int:
    from core.data.table import image_size
    return min(image_size(samples[0].path))


def eval_generation(cfg: DictConfig, run_dir: Path, inception=None, lpips_model=None) -> Path:
    run_dir = Path(run_dir)
    wanted = list(cfg.metrics)
    unknown = [m for m in wanted if m not in COLUMNS]
    if unknown:
        raise ValueError(f"metrics={unknown}: choose from {', '.join(COLUMNS)}.")
    gen_root = Path(cfg.generated).expanduser()
    if not gen_root.is_dir():
        raise DatasetError(f"generated={gen_root} is not a directory. Fix: pass the out_dir of scripts/generate.py.")
    products = list(cfg.products) if cfg.get("products") else sorted(p.name for p in gen_root.iterdir() if p.is_dir())
    if cfg.limits.get("max_products"):
        products = products[: int(cfg.limits.max_products)]
    table = load_from_config(cfg.dataset, products)
    split_node = dict(cfg.split)
    split = apply_split(table, split_node.pop("name"), **split_node)
    types = {p: sorted({s.anomaly_type for s in table if s.product == p and s.label == 1}) for p in products}
    generated = load_generated(gen_root, products, types, need_anomalies=any(m != "kid" for m in wanted),
                               need_normals="kid" in wanted)
    if inception is None and ({"is", "kid"} & set(wanted)):
        from core.metrics.extractors import InceptionFeatures
        inception = InceptionFeatures(cfg.weights.get("inception"), "weights.inception")
    variant = ICLPIPSVariant(**dict(cfg.get("ic_lpips_variant") or {}))
    if lpips_model is None and ({"ic_lpips", "ic_lpips_anomaly"} & set(wanted)):
        from core.metrics.extractors import load_lpips
        lpips_model = load_lpips(variant.backbone, cfg.weights.get("lpips_backbone"), "weights.lpips_backbone")
    dist = lpips_distance(lpips_model, variant.resize) if lpips_model is not None else None

    results: dict = defaultdict(dict)
    notes = []
    for p in products:
        gen_anom = [s for s in generated if s.product == p and s.label == 1]
        row = results[p]
        if "is" in wanted:
            x, _ = _images(gen_anom)
            _, logits = extract(inception, x)
            row["is"] = inception_score_from_logits(logits, splits=min(10, len(x)))[0]
        for metric in ("ic_lpips", "ic_lpips_anomaly"):
            if metric not in wanted:
                continue
            per_type = []
            for t in types[p]:
                g = [s for s in gen_anom if s.anomaly_type == t]
                real = [s for s in split.train if s.product == p and s.label == 1 and s.anomaly_type == t]
                if len(g) < 2 or not real:
                    continue
                size = _native(real)
                gx, gm = _images(g, size)
                rx, rm = _images(real, size)
                if metric == "ic_lpips_anomaly":
                    gx, rx = gx * gm, rx * rm
                per_type.append(ic_lpips(gx, rx, dist, variant).value)
            row[metric] = float(np.mean(per_type)) if per_type else None
        if "kid" in wanted:
            fake = [s for s in generated if s.product == p and s.label == 0]
            real = [s for s in split.train if s.product == p and s.label == 0]
            size = _native(real)
            fr, _ = extract(inception, _images(real, size)[0])
            ff, _ = extract(inception, _images(fake, size)[0])
            k = kid(fr, ff)
            row["kid"] = k.mean
            if k.shrunk:
                notes.append(f"{p}: KID subset size shrunk to {k.subset_size} (real {len(real)}, generated {len(fake)}).")
    avg = {m: float(np.mean([results[p][m] for p in products if results[p].get(m) is not None]))
           for m in wanted if any(results[p].get(m) is not None for p in products)}
    header = ["Category"] + [COLUMNS[m] for m in wanted]
    fmt = lambda m, v: "-" if v is None else (f"{v:.4f}" if m == "kid" else f"{v:.2f}")  # noqa: E731
    rows = [[p] + [fmt(m, results[p].get(m)) for m in wanted] for p in products]
    rows.append([tables.AVERAGE] + [fmt(m, avg.get(m)) for m in wanted])
    for label, per in tables.load_paper("seas_tab1", cfg.dataset.name, percent=False).items():
        rows.append([f"{label} ({tables.AVERAGE})"] + [fmt(m, per[tables.AVERAGE].get(m)) for m in wanted])
    text = (f"# Generation quality of {gen_root} (dataset {cfg.dataset.name})\n\n"
            f"IC-LPIPS variant: {variant}. Real targets: the split's training anomalies ({cfg.split.name}). "
            f"Rows 'paper: ...' are SeaS Tab. 1 (segmentation/paper_results/seas_tab1.csv) where the dataset matches.\n\n"
            + tables.markdown(header, rows) + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    tables.write_text(run_dir / "generation.csv", tables.to_csv(header, rows))
    path = tables.write_text(run_dir / "generation.md", text)
    print(text)
    return path
