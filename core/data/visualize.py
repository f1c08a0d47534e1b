"""Contact sheets: a PNG grid of images with mask overlays, so a person can look at any MVTec-layout tree."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .table import Sample, read_image, read_mask

LABEL_W = 150


def overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 40, 40)) -> np.ndarray:
    """Tint the masked area and draw its outline."""
    out = image.astype(np.float32)
    m = mask.astype(bool)
    out[m] = 0.6 * out[m] + 0.4 * np.array(colour, np.float32)
    edge = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out[edge] = colour
    return out.astype(np.uint8)


def _cell(s: Sample, size: int) -> np.ndarray:
    img = read_image(s.path)
    if s.mask_paths:
        img = overlay(img, read_mask(s.mask_paths))
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def labelled_grid(rows: Sequence[tuple[Sequence[str], Sequence[np.ndarray]]], out_png: str | Path,
                  per_row: int | None = None, cell: int = 128) -> Path:
    """A PNG with one row per entry: up to three label lines, then the row's RGB images (resized to ``cell``)."""
    if not rows:
        raise ValueError("labelled_grid: no rows to show.")
    per_row = per_row or max(len(images) for _, images in rows)
    out_rows = []
    for labels, images in rows:
        cells = [cv2.resize(np.ascontiguousarray(im), (cell, cell), interpolation=cv2.INTER_AREA)
                 for im in list(images)[:per_row]]
        cells += [np.zeros((cell, cell, 3), np.uint8)] * (per_row - len(cells))
        label = np.full((cell, LABEL_W, 3), 255, np.uint8)
        for j, text in enumerate(list(labels)[:3]):
            cv2.putText(label, text[:18], (6, 24 + 22 * j), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        out_rows.append(np.concatenate([label] + cells, axis=1))
    sheet = np.concatenate(out_rows, axis=0)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    cv2.imwrite(str(tmp), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    tmp.replace(out)
    return out


def contact_sheet(samples: Sequence[Sample], out_png: str | Path, per_row: int = 8, cell: int = 128) -> Path:
    """One row per (product, split, type) with up to ``per_row`` images (masks overlaid in red)."""
    groups: dict[tuple, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[(s.product, s.split, s.anomaly_type)].append(s)
    if not groups:
        raise ValueError("contact_sheet: no samples to show.")
    rows = []
    for (product, split, atype), items in sorted(groups.items()):
        items = sorted(items, key=lambda s: s.name)
        idx = np.linspace(0, len(items) - 1, min(per_row, len(items))).round().astype(int)
        rows.append(((product, f"{split}/{atype}", f"n={len(items)}"), [_cell(items[i], cell) for i in idx]))
    return labelled_grid(rows, out_png, per_row, cell)
