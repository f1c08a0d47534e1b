"""DefectDiffu's defect-strength control (Sec. 3.3): the same seeds generated at several w_d, the defect area and the
change against w_d = 0 measured, and a grid (rows: defect types, columns: w_d).

    python benchmarks/defectdiffu_strength.py --run runs/dd --product bottle [--w-d 0 1 2 4 8] [--n 8]
                                              [--out runs/dd_strength] [overrides for generate.py ...]

Each w_d is one ``scripts/generate.py`` folder under ``--out`` (resumable; the initial noise of item (type, i) is the
same in all of them). Per w_d and type: the mean mask area (share of the image), and the mean absolute pixel change
against the w_d = 0 image of the same item (0-255). The paper's claim: the defect grows with w_d.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def generate(run: Path, product: str, w_d: float, n: int, out: Path, extra: list[str]) -> Path:
    folder = out / f"w_d_{w_d:g}"
    cmd = [sys.executable, str(REPO / "scripts" / "generate.py"), f"checkpoint={run}", f"product={product}",
           f"out_dir={folder}", f"method.generate.w_d={w_d}", f"method.generate.n_per_type={n}",
           "method.generate.n_normals=0", *extra]
    subprocess.run(cmd, check=True)
    return folder


def summarise(folders: dict[float, Path], product: str) -> tuple[dict, list]:
    """{type: {w_d: (mean mask area, mean change vs the lowest w_d)}} and the grid rows."""
    from core.data import read_image, read_mask
    from core.data.visualize import overlay
    recs = {w: {(r["anomaly_type"], int(r["index"])): r for r in map(json.loads, (f / "manifest.jsonl").read_text()
                                                                          .splitlines())
                if r["kind"] == "anomaly" and r["product"] == product} for w, f in folders.items()}
    ws = sorted(folders)
    base = ws[0]
    table: dict[str, dict[float, tuple[float, float]]] = {}
    rows = []
    for ty in sorted({k[0] for k in recs[base]}):
        items = sorted(i for t, i in recs[base] if t == ty)
        cells = []
        for w in ws:
            areas, changes = [], []
            for i in items:
                r, r0 = recs[w][(ty, i)], recs[base][(ty, i)]
                img = read_image(folders[w] / r["image"]).astype(np.float32)
                img0 = read_image(folders[base] / r0["image"]).astype(np.float32)
                m = read_mask([folders[w] / r["mask"]])
                areas.append(float(m.mean()))
                changes.append(float(np.abs(img - img0).mean()))
                if i == items[0]:
                    cells.append(overlay(img.astype(np.uint8), m))
            table.setdefault(ty, {})[w] = (float(np.mean(areas)), float(np.mean(changes)))
        rows.append(([f"{product}/{ty}", "w_d: " + " ".join(f"{w:g}" for w in ws)], cells))
    return table, rows


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--product", required=True)
    ap.add_argument("--w-d", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--out", default=None)
    a, extra = ap.parse_known_args(argv)
    out = Path(a.out or f"{a.run}_strength_{a.product}")
    folders = {w: generate(Path(a.run), a.product, w, a.n, out, extra) for w in sorted(set(a.w_d))}
    table, rows = summarise(folders, a.product)
    from core.data.visualize import labelled_grid
    labelled_grid(rows, out / f"{a.product}_strength_grid.png")
    ws = sorted(folders)
    lines = [f"DefectDiffu defect strength, {a.product}, {a.n} items per type (same seeds at every w_d)", "",
             "| type | " + " | ".join(f"w_d={w:g}: area / change" for w in ws) + " |",
             "|---|" + "---|" * len(ws)]
    for ty, row in table.items():
        lines.append(f"| {ty} | " + " | ".join(f"{100 * row[w][0]:.2f} % / {row[w][1]:.1f}" for w in ws) + " |")
    text = "\n".join(lines)
    (out / f"{a.product}_strength.md").write_text(text + "\n")
    (out / f"{a.product}_strength.json").write_text(json.dumps(
        {ty: {f"{w:g}": {"area": v[0], "change": v[1]} for w, v in row.items()} for ty, row in table.items()},
        indent=2))
    print(text)
    return text


if __name__ == "__main__":
    main()
