"""Data layer: one loader per dataset -> a validated samples table; split protocols; the synthetic world.

Import-light on purpose (no torch): spawn workers of the world builder import this package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from .folder import load_folder
from .mvtec_3d import load_mvtec_3d
from .mvtec_ad import load_mvtec_ad
from .mvtec_loco import load_mvtec_loco
from .splits import PROTOCOLS, Split, apply_split
from .table import (DatasetError, Sample, anomaly_types, counts, given_mask_files, read_image, read_mask,
                    require_masks, screen_empty_masks, validate_files)
from .visa import load_visa


def load_synthetic(root: str | Path, products: Iterable[str] | str | None = None, seed: int = 0,
                   resolution: int = 128, build: bool | str = "auto") -> list[Sample]:
    """The synthetic world at ``root``, checked against ``seed`` / ``resolution`` (its ``world.json``).

    A missing world is built there (about half a minute) when ``build`` is true, or when it is ``auto`` and ``root``
    has the default shape ``.../synthetic/seed<seed>_res<resolution>``: a mistyped explicit root is an error, not a
    new world."""
    from .synthetic import WorldConfig, build_world

    root = Path(root).expanduser()
    if not root.exists():
        default_shape = root.name == f"seed{seed}_res{resolution}" and root.parent.name == "synthetic"
        if build is True or str(build).lower() == "true" or (str(build) == "auto" and default_shape):
            build_world(root, WorldConfig(seed=seed, resolution=resolution))
        else:
            raise DatasetError(f"dataset.root={root} does not exist (a synthetic world is built by itself only at the "
                               f"default root .../synthetic/seed{seed}_res{resolution}). Fix: correct the path, or "
                               f"add dataset.build=true to build a world there.")
    info = root / "world.json"
    if info.is_file():
        import json
        built = json.loads(info.read_text())
        wrong = {k: (built.get(k), v) for k, v in (("seed", seed), ("resolution", resolution)) if built.get(k) != v}
        if wrong:
            fix = " ".join(f"dataset.{k}={b}" for k, (b, _) in wrong.items())
            raise DatasetError(f"dataset.root={root} holds a world built with "
                               + ", ".join(f"{k} {b}" for k, (b, _) in wrong.items()) + " but the config says "
                               + ", ".join(f"{k} {c}" for k, (_, c) in wrong.items())
                               + f" (an oracle arm would be drawn at the wrong size). Fix: add {fix}, or use that "
                               f"world's own root.")
    return load_mvtec_ad(root, products)


DATASETS: dict[str, Callable[..., list[Sample]]] = {
    "synthetic": load_synthetic,
    "mvtec_ad": load_mvtec_ad,
    "visa": load_visa,
    "mvtec_3d": load_mvtec_3d,
    "mvtec_loco": load_mvtec_loco,
    "folder": load_folder,
}


def load_dataset(name: str, root: str | Path, products: Iterable[str] | str | None = None,
                 validate: bool = True, **options) -> list[Sample]:
    """Samples table of dataset ``name`` at ``root``; ``validate`` decodes every image and mask."""
    if name not in DATASETS:
        raise DatasetError(f"Unknown dataset '{name}'. Available: {', '.join(DATASETS)}.")
    table = DATASETS[name](root, products, **options)
    if validate:
        validate_files(table)
    return table


__all__ = ["DATASETS", "PROTOCOLS", "DatasetError", "Sample", "Split", "anomaly_types", "apply_split", "counts",
           "load_dataset", "load_folder", "load_mvtec_3d", "load_mvtec_ad", "load_mvtec_loco", "load_synthetic",
           "load_visa", "given_mask_files", "read_image", "read_mask", "require_masks", "screen_empty_masks",
           "training_normals", "validate_files"]


def load_from_config(dataset_cfg, products: Iterable[str] | str | None = None, validate: bool = True) -> list[Sample]:
    """Samples table from a ``dataset/*.yaml`` node (name, root, and loader options)."""
    opts = {k: v for k, v in dict(dataset_cfg).items() if k not in ("name", "root", "default_product")}
    if dataset_cfg.get("root") in (None, "", "???"):
        raise DatasetError(
            f"dataset.root is not set for dataset '{dataset_cfg['name']}'. "
            f"Fix: add dataset.root=/path/to/{dataset_cfg['name']} to the command line (layouts: README, 'Real datasets')."
        )
    if products is not None and not isinstance(products, str):
        products = list(products)
    return load_dataset(dataset_cfg["name"], dataset_cfg["root"], products, validate=validate, **opts)


def split_from_config(table: list[Sample], split_cfg) -> Split:
    """Apply a ``split/*.yaml`` node (name plus fold / k / seed)."""
    d = dict(split_cfg)
    return apply_split(table, d.pop("name"), **d)


def training_normals(cfg, product: str, why: str) -> list[str]:
    """The product's normal training images (train/good under ``cfg.split``) as sorted absolute paths: the images a
    method puts its generated anomalies onto. None is an error saying ``why`` they are needed."""
    split = split_from_config(load_from_config(cfg.dataset, [product]), cfg.split)
    normals = sorted(str(Path(s.path).resolve()) for s in split.train if s.label == 0 and s.product == product)
    if not normals:
        raise DatasetError(f"Product '{product}' has no normal training images (train/good) in {cfg.dataset.root}: "
                           f"{why}.")
    return normals

