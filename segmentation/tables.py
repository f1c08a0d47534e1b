"""Result tables laid out like the papers', as CSV and Markdown, with the papers' published numbers beside ours.

Records are dicts with ``label`` (the arm or generator), ``product``, ``fold`` and metric values in [0, 1]. Tables show
percentages. The papers' numbers are data (``segmentation/paper_results/*.csv``: dataset, downstream, method, product,
metric, value in percent), typed in from the papers; they are shown only for the dataset they were measured on.

Layouts:

- ``summary`` (SeaS Tab. 4): one row per (segmentation model, generative model), the metrics averaged over products.
- ``per_product`` (AnomalyDiffusion Tab. 2 / Tab. 3): rows = products + Average, one column group per method;
  pixel-level and image-level metrics in two tables.
"""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from core.io import write_text

PAPER_DIR = Path(__file__).parent / "paper_results"

SHORT = {"image_auroc": "AUROC", "image_ap": "AP", "image_f1_max": "F1-max", "pixel_auroc": "AUROC", "pixel_ap": "AP",
         "pixel_f1_max": "F1-max", "pixel_iou": "IoU", "pixel_aupro": "PRO", "accuracy": "Acc"}
LEVEL = {"image": "Image", "pixel": "Pixel"}
DOWNSTREAM_NAMES = {"bisenetv2": "BiSeNet V2", "upernet": "UPerNet", "unet": "U-Net", "lfd": "LFD",
                    "resnet34": "ResNet-34", "resnet50": "ResNet-50"}
AVERAGE = "Average"


def column_name(metric: str) -> str:
    level = metric.split("_")[0]
    return f"{LEVEL[level]} {SHORT[metric]}" if level in LEVEL else SHORT.get(metric, metric)


def fold_average(records: Iterable[dict], metrics: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{label: {product: {metric: mean over folds}}}, plus an ``Average`` product (mean over products)."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        for m in metrics:
            if r.get(m) is not None:
                acc[r["label"]][r["product"]][m].append(float(r[m]))
    out: dict = {}
    for label, per_product in acc.items():
        out[label] = {p: {m: sum(v) / len(v) for m, v in ms.items()} for p, ms in per_product.items()}
        products = [p for p in out[label] if p != AVERAGE]
        out[label][AVERAGE] = {m: sum(out[label][p][m] for p in products if m in out[label][p])
                               / max(sum(m in out[label][p] for p in products), 1) for m in metrics
                               if any(m in out[label][p] for p in products)}
    return out


def paper_names(name) -> list[str]:
    """A protocol's ``paper``: one table file's name, a list of them, or nothing."""
    if not name:
        return []
    return [str(name)] if isinstance(name, str) else [str(n) for n in name]


def load_paper(name, dataset: str, downstream: str | None = None,
               percent: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """Published numbers of ``paper_results/<name>.csv`` (``name`` may be a list of such files) for ``dataset`` (and
    ``downstream``), as fractions when ``percent`` (the files hold percentages) or as printed:
    {"paper: <method>": {product: {metric: value}}}."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for one in paper_names(name):
        with (PAPER_DIR / f"{one}.csv").open() as f:
            for row in csv.DictReader(line for line in f if not line.startswith("#")):
                if row["dataset"] != dataset or (downstream and row.get("downstream") not in (downstream, "", None)):
                    continue
                product = AVERAGE if row["product"] == "average" else row["product"]
                out[f"paper: {row['method']}"][product][row["metric"]] = \
                    float(row["value"]) / (100.0 if percent else 1.0)
    return {k: dict(v) for k, v in out.items()}


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def summary_table(results: dict, metrics: Sequence[str], downstream: str, digits: int = 2):
    """SeaS Tab. 4: rows (segmentation model, generative model) with product-averaged metrics."""
    header = ["Segmentation model", "Generative model"] + [column_name(m) for m in metrics]
    rows = []
    for label, per_product in results.items():
        avg = per_product.get(AVERAGE, {})
        rows.append([DOWNSTREAM_NAMES.get(downstream, downstream), label] + [_fmt(avg.get(m), digits) for m in metrics])
    return header, rows


def per_product_tables(results: dict, metrics: Sequence[str], digits: int = 1):
    """AnomalyDiffusion Tab. 2 (pixel) / Tab. 3 (image): rows = products + Average, column groups = methods."""
    products = sorted({p for per in results.values() for p in per if p != AVERAGE}) + [AVERAGE]
    out = {}
    for level in ("pixel", "image", "other"):
        ms = [m for m in metrics if (m.split("_")[0] if m.split("_")[0] in LEVEL else "other") == level]
        if not ms:
            continue
        header = ["Category"] + [f"{label} {SHORT.get(m, m)}" for label in results for m in ms]
        rows = [[p] + [_fmt(results[label].get(p, {}).get(m), digits) for label in results for m in ms]
                for p in products if any(p in per for per in results.values())]
        out[level] = (header, rows)
    return out


def headroom(results: dict, metrics: Sequence[str]) -> list[str]:
    """Lines: oracle - baseline per averaged metric, and the share of that gap each other arm closes."""
    if "baseline" not in results or "oracle" not in results:
        return []
    base, orc = results["baseline"][AVERAGE], results["oracle"][AVERAGE]
    lines = ["| metric | baseline | oracle | headroom (oracle - baseline) |"
             + "".join(f" {k}: share of the gap closed |" for k in results if k not in ("baseline", "oracle")
                       and not k.startswith("paper")),
             "|---|---|---|---|" + "".join("---|" for k in results if k not in ("baseline", "oracle")
                                              and not k.startswith("paper"))]
    for m in metrics:
        if m not in base or m not in orc:
            continue
        gap = orc[m] - base[m]
        cells = [column_name(m), _fmt(base[m], 2), _fmt(orc[m], 2), f"{100 * gap:+.2f}"]
        for k, per in results.items():
            if k in ("baseline", "oracle") or k.startswith("paper"):
                continue
            v = per[AVERAGE].get(m)
            cells.append("-" if v is None or abs(gap) < 1e-9 else f"{(v - base[m]) / gap:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def headroom_per_product(results: dict, metrics: Sequence[str] = ("pixel_ap", "pixel_iou")) -> list[str]:
    """Lines: per product (and the mean of the per-product shares), the share of the baseline -> oracle gap each
    other arm closes on ``metrics``; "-" where the gap is zero. The mean of the shares weighs every product alike,
    unlike the share of the averaged metric in :func:`headroom`."""
    if "baseline" not in results or "oracle" not in results:
        return []
    arms = [k for k in results if k not in ("baseline", "oracle") and not k.startswith("paper")]
    metrics = [m for m in metrics if m in results["baseline"].get(AVERAGE, {})]
    if not arms or not metrics:
        return []
    products = [p for p in results["baseline"] if p != AVERAGE and p in results["oracle"]]
    cols = [(k, m) for k in arms for m in metrics]
    lines = ["| product |" + "".join(f" {k}: {column_name(m)} share |" for k, m in cols),
             "|---|" + "---|" * len(cols)]
    shares: dict[tuple[str, str], list[float]] = {c: [] for c in cols}
    for prod in products:
        cells = []
        for k, m in cols:
            gap = results["oracle"][prod][m] - results["baseline"][prod][m]
            v = results[k].get(prod, {}).get(m)
            if v is None or abs(gap) < 1e-9:
                cells.append("-")
                continue
            share = (v - results["baseline"][prod][m]) / gap
            shares[(k, m)].append(share)
            cells.append(f"{share:.2f}")
        lines.append(f"| {prod} | " + " | ".join(cells) + " |")
    lines.append("| mean of the products' shares | " + " | ".join(
        f"{sum(v) / len(v):.2f}" if v else "-" for v in shares.values()) + " |")
    return lines


def write_downstream(records: list[dict], meta: dict, run_dir: Path, protocol) -> Path:
    """Write results.csv (long), table.md / table*.csv (the protocol's layout) and print the Markdown."""
    metrics = list(protocol.metrics) if "accuracy" not in records[0] else ["accuracy"]
    ours = fold_average(records, metrics)
    paper = load_paper(protocol.get("paper"), meta["dataset"], meta["downstream"])
    results = {**ours, **paper}
    run_dir = Path(run_dir)
    long_rows = [[r["label"], r["product"], r["fold"], m, f"{r[m]:.6f}"] for r in records for m in metrics if m in r]
    write_text(run_dir / "results.csv", to_csv(["label", "product", "fold", "metric", "value"], long_rows))
    title = (f"# {meta['protocol']} protocol, {DOWNSTREAM_NAMES.get(meta['downstream'], meta['downstream'])}, "
             f"dataset {meta['dataset']} ({meta['image_size']} px)\n\n")
    notes = [f"Products: {', '.join(meta['products'])}. Arms: {', '.join(meta['arms'])}."]
    if meta.get("backbone"):
        notes.append(f"Backbone: {meta['backbone']}.")
    if paper:
        files = ", ".join(f"segmentation/paper_results/{n}.csv" for n in paper_names(protocol.get("paper")))
        notes.append(f"Rows 'paper: ...' are the published numbers ({files}).")
    md = [title, " ".join(notes) + "\n\n"]
    h, rows = summary_table(results, metrics, meta["downstream"], digits=2)
    md.append("## Averaged over products\n\n" + markdown(h, rows) + "\n")
    write_text(run_dir / "table_summary.csv", to_csv(h, rows))
    if protocol.get("table", "summary") == "per_product" or len(meta["products"]) > 1:
        for level, (h, rows) in per_product_tables(results, metrics, digits=1).items():
            md.append(f"## Per product ({level} level)\n\n" + markdown(h, rows) + "\n")
            write_text(run_dir / f"table_{level}.csv", to_csv(h, rows))
    hr = headroom(ours, metrics)
    if hr:
        md.append("## Headroom on the synthetic world\n\n" + "\n".join(hr) + "\n\n")
        per = headroom_per_product(ours)
        if per and len(meta["products"]) > 1:
            md.append("Per product, share of the baseline -> oracle gap closed:\n\n" + "\n".join(per) + "\n\n")
    timing = defaultdict(float)
    for r in records:
        timing[r["label"]] += r["train_seconds_per_unit"] / max(sum(1 for q in records if q["unit"] == r["unit"]
                                                                     and q["label"] == r["label"]
                                                                     and q["fold"] == r["fold"]), 1)
    md.append("Training time per arm: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timing.items()) + ".\n")
    text = "".join(md)
    path = write_text(run_dir / "table.md", text)
    print(text)
    return path
