"""Side by side: the same generated items (product, anomaly type, index) from several generated folders, e.g. one
method's variants on the same seeds (AnomalyDiffusion's AAR none / paper / official reuse one mask per item).

    python benchmarks/compare_generated.py bottle none=runs/ad_v2/generated_none paper=runs/ad_v2/generated_paper \\
        official=runs/ad_v2/generated_official --per-type 2 --out aar_bottle.png

Rows: the source normal (the first folder's record), each folder's image with its mask outlined, then each folder's
image alone (the defect unhidden). Columns: ``--per-type`` items of each anomaly type, in index order.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2

from core.data import read_image, read_mask
from core.data.visualize import labelled_grid, overlay
from core.export import read_manifest


def items_of(root: Path, product: str) -> dict[tuple[str, int], dict]:
    return {(r["anomaly_type"], int(r["index"])): r for r in read_manifest(root)
            if r.get("product") == product and r.get("kind") == "anomaly"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("product")
    ap.add_argument("folders", nargs="+", help="NAME=GENERATED_FOLDER")
    ap.add_argument("--per-type", type=int, default=2)
    ap.add_argument("--cell", type=int, default=128)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    named = []
    for spec in a.folders:
        name, eq, root = spec.partition("=")
        if not eq or not Path(root, "manifest.jsonl").is_file():
            sys.exit(f"error: '{spec}' is not NAME=<a generated folder with a manifest.jsonl>.")
        named.append((name, Path(root), items_of(Path(root), a.product)))
    common = sorted(set.intersection(*(set(items) for _, _, items in named)))
    if not common:
        sys.exit(f"error: the folders hold no common anomaly item of '{a.product}'.")
    keys = [k for t in sorted({t for t, _ in common}) for k in [c for c in common if c[0] == t][:a.per_type]]
    first = named[0][2]
    rows = [(["source normal"], [read_image(first[k]["source"]) for k in keys])]
    for name, root, items in named:
        rows.append(([name, "mask outlined"], [overlay(read_image(root / items[k]["image"]),
                                                       read_mask([root / items[k]["mask"]]))
                                               for k in keys]))
    for name, root, items in named:
        rows.append(([name], [read_image(root / items[k]["image"]) for k in keys]))
    out = labelled_grid(rows, a.out, cell=a.cell)
    if out.suffix.lower() in (".jpg", ".jpeg"):
        cv2.imwrite(str(out), cv2.imread(str(out)), [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(out, f"({len(keys)} items: {', '.join(f'{t}/{i}' for t, i in keys)})")


if __name__ == "__main__":
    main()
