"""The share of the baseline -> oracle gap that each arm closes, with the arms taken from several downstream runs.

Each argument is ``NAME=RUN_DIR:LABEL``: the arm ``LABEL`` (baseline, generated, oracle, ...) of the downstream run
in ``RUN_DIR`` (its ``results.csv``; a generated arm is labelled by its generator's method, e.g. ``seas``), shown as
``NAME``. Two names are special, as in ``eval_downstream``'s own
table: ``baseline`` and ``oracle``. Use it to compare arms trained in different runs, e.g. an oracle arm at another
count of real defects (the runs must share the protocol, products and test images; the script checks the products).

    python benchmarks/gap_share.py baseline=runs/seas_v2ft/downstream:baseline \\
        seas=runs/seas_v2ft/downstream:seas oracle=runs/seas_v2ft/downstream_oracle50:oracle
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segmentation.tables import fold_average, headroom, headroom_per_product  # noqa: E402


def read_arm(run_dir: Path, label: str) -> list[dict]:
    path = run_dir / "results.csv"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: pass the hydra.run.dir of a finished scripts/eval_downstream.py run.")
    rows: dict[tuple[str, str], dict] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["label"] == label:
                rows.setdefault((r["product"], r["fold"]), {"product": r["product"], "fold": r["fold"]})[
                    r["metric"]] = float(r["value"])
    if not rows:
        with open(path, newline="") as f:
            have = sorted({r["label"] for r in csv.DictReader(f)})
        raise SystemExit(f"{path} has no arm '{label}' (it has {have}).")
    return list(rows.values())


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arms", nargs="+", help="NAME=RUN_DIR:LABEL")
    ap.add_argument("--metrics", default="image_auroc,image_ap,image_f1_max,pixel_auroc,pixel_ap,pixel_f1_max,"
                                          "pixel_iou")
    args = ap.parse_args(argv)
    records, products = [], {}
    for spec in args.arms:
        name, sep, rest = spec.partition("=")
        run_dir, sep2, label = rest.rpartition(":")
        if not (sep and sep2 and name and label):
            raise SystemExit(f"'{spec}': expected NAME=RUN_DIR:LABEL, e.g. oracle=runs/x/downstream:oracle.")
        rows = read_arm(Path(run_dir), label)
        products[name] = sorted({r["product"] for r in rows})
        records += [{**r, "label": name} for r in rows]
    if len({tuple(p) for p in products.values()}) != 1:
        raise SystemExit(f"The arms cover different products: {products}. Compare runs on the same products.")
    if "baseline" not in products or "oracle" not in products:
        raise SystemExit("Name one arm baseline= and one oracle=: the share is of the gap between them.")
    metrics = args.metrics.split(",")
    results = fold_average(records, metrics)
    text = "\n".join(headroom(results, metrics)) + "\n\nPer product:\n\n" + "\n".join(headroom_per_product(results))
    print(text)
    return text


if __name__ == "__main__":
    main()
