"""Any folder in MVTec AD layout, e.g. the output of ``scripts/generate.py``.

Unlike MVTec AD itself, a generated folder may hold only anomalies (test/<type>) or only
normals (train/good), so train/good is not required.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .mvtec_ad import load_mvtec_ad
from .table import Sample


def load_folder(root: str | Path, products: Iterable[str] | str | None = None) -> list[Sample]:
    return load_mvtec_ad(root, products, require_train=False)
