"""Counts per product, split and anomaly type: what ``scripts/inspect_dataset.py`` prints."""
from __future__ import annotations

import json

from . import counts, load_from_config, split_from_config


def inspect_counts(dataset_cfg, split_cfg, products=None, validate: bool = True) -> dict[str, dict[str, dict[str, int]]]:
    """{product: {split: {type: count}}} under the split protocol (``none``: the dataset's own split)."""
    table = load_from_config(dataset_cfg, products, validate)
    split = split_from_config(table, split_cfg)
    rows = [(s, part) for part, items in split.parts().items() for s in items]
    role = {id(s): part for s, part in rows}
    return counts([s for s, _ in rows], split_of=lambda s: role[id(s)])


def format_counts(c: dict, fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(c, indent=2)
    if fmt != "table":
        raise ValueError(f"format must be 'table' or 'json', got '{fmt}'. Fix: format=table or format=json.")
    lines = []
    for product, splits in c.items():
        lines.append(f"{product}")
        for split, types in splits.items():
            total = sum(types.values())
            parts = ", ".join(f"{t}: {n}" for t, n in types.items())
            lines.append(f"  {split:<10} {total:>5}  ({parts})")
    return "\n".join(lines)
