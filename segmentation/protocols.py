"""The downstream protocols: who trains on what, what is tested, how it is scored (``configs/protocol/*.yaml``).

An *arm* is one training set under a protocol:

- ``baseline``: no generated data - the real few-shot anomalies of the split (plus real normals where the
  protocol uses them). What an inspection team has without a generator.
- ``generated``: the protocol's recipe with a generated folder (``generated=<dir>``).
- ``oracle``: the same recipe with extra *real* defects from the synthetic world's generator in place of the
  generated ones (synthetic world only): the upper bound a perfect generator could reach.

For each arm, fold and training unit (every product, or all products at once for SeaS's unified model) the
downstream model trains for a fixed budget and is tested on the split's test images of each product; no
checkpoint is ever chosen on test data. Finished units are stored in ``<run_dir>/results/`` and skipped on a rerun
with the same run directory, and an interrupted training resumes from its checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from core.data import DatasetError, Sample, anomaly_types, apply_split, load_from_config
from core.io import write_json

from . import tables
from .data import ImagePool, load_generated, oracle_tree, take_per_type
from .models import build_classifier, build_segmenter, normalizer
from .scores import max_score, pooled_max_score
from .train import TrainSpec, predict_maps, train

log = logging.getLogger(__name__)

ARMS = ("baseline", "generated", "oracle")


# ----------------------------------------------------------------------------- configuration


def resolve_products(cfg: DictConfig, table: Sequence[Sample]) -> list[str]:
    available = sorted({s.product for s in table})
    if cfg.get("products"):
        products = [cfg.products] if isinstance(cfg.products, str) else list(cfg.products)
        unknown = [p for p in products if p not in available]
        if unknown:
            raise DatasetError(f"products={unknown} not in the dataset (it has: {', '.join(available)}).")
    elif cfg.dataset.name == "synthetic":
        from core.data.synthetic import BENCHMARK_PRODUCTS
        products = [p for p in BENCHMARK_PRODUCTS if p in available]
    else:
        products = available
    if cfg.limits.get("max_products"):
        products = products[: int(cfg.limits.max_products)]
    return products


def resolve_arms(cfg: DictConfig) -> list[str]:
    arms = list(cfg.arms) if cfg.get("arms") else ["baseline"] + (["generated"] if cfg.get("generated") else [])
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise ValueError(f"arms={bad}: each arm is one of {', '.join(ARMS)}.")
    if "generated" in arms and not cfg.get("generated"):
        raise ValueError("arms includes 'generated' but generated=<dir> is not set. Fix: add generated=/path/to/folder.")
    if "oracle" in arms and cfg.dataset.name != "synthetic":
        raise ValueError(f"The oracle arm draws extra real defects from the synthetic world; dataset={cfg.dataset.name} "
                         f"has no generator. Fix: drop 'oracle' from arms.")
    return arms


def resolve_image_size(cfg: DictConfig, table: Sequence[Sample]) -> int:
    if cfg.get("image_size"):
        size = int(cfg.image_size)
    else:
        from core.data.table import image_size
        size = min(min(image_size(table[0].path)), 256)
    if size % 32:
        raise ValueError(f"image_size={size}: the segmenters need a multiple of 32.")
    return size


def arm_label(cfg: DictConfig, arm: str) -> str:
    if arm != "generated":
        return arm
    if cfg.get("label"):
        return str(cfg.label)
    manifest = Path(cfg.generated).expanduser() / "manifest.jsonl"
    if manifest.is_file():
        with manifest.open() as f:
            first = f.readline()
        if first.strip():
            return str(json.loads(first).get("method", "generated"))
    return "generated"


def train_spec(cfg: DictConfig, n_train: int) -> TrainSpec:
    node = {**OmegaConf.to_container(cfg.downstream.get("train", {}) or {}),
            **OmegaConf.to_container(cfg.protocol.get("train", {}) or {})}
    spec = TrainSpec.from_config(node)
    spec.seed = int(cfg.seed)
    steps = node.get("steps")
    if not steps:
        epochs = node.get("epochs") or 1
        steps = math.ceil(epochs * n_train / spec.batch_size)
    if cfg.limits.get("max_train_steps"):
        steps = min(steps, int(cfg.limits.max_train_steps))
    spec.steps = int(steps)
    spec.checkpoint_every = min(spec.checkpoint_every, spec.steps)
    return spec


# ----------------------------------------------------------------------------- training sets


def arm_anomalies(cfg: DictConfig, arm: str, products: Sequence[str], real_train: Sequence[Sample], fold: int,
                  generated: list[Sample] | None) -> list[Sample]:
    """The anomaly pool of ``arm`` for ``products`` (see the module docstring)."""
    proto = cfg.protocol
    real = [s for s in real_train if s.label == 1 and s.product in products]
    if arm == "baseline":
        return real
    if arm == "generated":
        pool = [s for s in generated if s.label == 1 and s.product in products]
    else:
        pool = oracle_samples(cfg, products, real, fold)
    pool = take_per_type(pool, n_extra_per_type(cfg, real, pool))
    if cfg.limits.get("n_per_type"):
        pool = take_per_type(pool, int(cfg.limits.n_per_type))
    return (real if proto.real_anomalies_with_generated else []) + pool


def n_extra_per_type(cfg: DictConfig, real: Sequence[Sample], pool: Sequence[Sample]) -> int | None:
    proto = cfg.protocol
    if proto.get("generated_ratio"):
        per_type: dict[tuple[str, str], int] = {}
        for s in real:
            per_type[(s.product, s.anomaly_type)] = per_type.get((s.product, s.anomaly_type), 0) + 1
        return int(round(proto.generated_ratio * max(per_type.values(), default=1)))
    return proto.get("generated_per_type")


def oracle_samples(cfg: DictConfig, products: Sequence[str], real: Sequence[Sample], fold: int) -> list[Sample]:
    from core.data import load_folder

    n = cfg.get("oracle_per_type") or cfg.protocol.get("generated_per_type") or 100
    if cfg.protocol.get("generated_ratio"):
        n = n_extra_per_type(cfg, real, [])
    if cfg.limits.get("n_per_type"):
        n = min(n, int(cfg.limits.n_per_type))
    root = Path(cfg.dataset.root).expanduser().parent / "oracle" / f"seed{cfg.dataset.seed}_res{cfg.dataset.resolution}"
    types = {p: sorted({s.anomaly_type for s in real if s.product == p}) for p in products}
    for p in products:
        oracle_tree(root, p, types[p], int(n), seed=int(cfg.dataset.seed), resolution=int(cfg.dataset.resolution))
    return [s for s in load_folder(root, list(products)) if s.label == 1]


# ----------------------------------------------------------------------------- one unit


def score_images(cfg: DictConfig, maps: torch.Tensor) -> torch.Tensor:
    if cfg.protocol.image_score == "max":
        return max_score(maps)
    if cfg.protocol.image_score == "pooled_max":
        return pooled_max_score(maps, int(cfg.protocol.pooled_kernel))
    raise ValueError(f"protocol.image_score must be max or pooled_max, got '{cfg.protocol.image_score}'.")


def segmentation_metrics(cfg: DictConfig, maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> dict:
    from core.metrics.detection import image_metrics, pixel_metrics

    wanted = list(cfg.protocol.metrics)
    out = {}
    if any(m.startswith("image_") for m in wanted):
        out.update(image_metrics(labels.numpy(), score_images(cfg, maps).numpy()))
    if any(m.startswith("pixel_") for m in wanted):
        out.update(pixel_metrics(maps.numpy(), masks.numpy().astype(bool), with_aupro="pixel_aupro" in wanted))
    return {m: float(out[m]) for m in wanted}


def prediction_grid(pool: ImagePool, maps: torch.Tensor, out_png: Path, n: int, title: str) -> None:
    """Rows: image | ground truth | predicted map (jet) for up to ``n`` test images (anomalies first, one normal)."""
    import cv2

    from core.data.visualize import labelled_grid

    anomalous = [i for i, s in enumerate(pool.samples) if s.label == 1]
    normal = [i for i, s in enumerate(pool.samples) if s.label == 0]
    step = max(len(anomalous) // max(n - 1, 1), 1)
    picks = anomalous[::step][: max(n - 1, 1)] + normal[:1]
    rows = []
    for i in picks:
        item = pool[i]
        img = (item["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        gt = np.repeat((item["mask"].numpy() * 255).astype(np.uint8)[..., None], 3, 2)
        heat = cv2.applyColorMap((maps[i].numpy() * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
        s = pool.samples[i]
        rows.append(([title, f"{s.anomaly_type}", f"max {float(maps[i].max()):.2f}"], [img, gt, heat]))
    labelled_grid(rows, out_png, per_row=3, cell=max(pool.size, 96))


def run_unit(cfg: DictConfig, arm: str, fold: int, products: Sequence[str], split, generated, size: int,
             run_dir: Path, device: torch.device) -> list[dict]:
    """Train one model of ``arm`` on ``products`` and test it on each product; returns one record per product."""
    task = cfg.downstream.get("task", "segmentation")
    unit = "all" if len(products) > 1 else products[0]
    anomalies = arm_anomalies(cfg, arm, products, split.train, fold, generated)
    normals = [s for s in split.train if s.label == 0 and s.product in products] \
        if (cfg.protocol.normals or task == "binary_classification") else []
    if not anomalies and task != "binary_classification":
        raise DatasetError(f"{arm} arm of {unit}: no anomalies to train on.")
    n_train = len(anomalies) if cfg.protocol.train.get("anomaly_fraction") else len(anomalies) + len(normals)
    spec = train_spec(cfg, n_train)
    tag = f"{arm}_fold{fold}_{unit}"
    log.info("%s: %d anomalies, %d normals, %d steps", tag, len(anomalies), len(normals), spec.steps)
    torch.manual_seed(spec.seed)
    norm = normalizer(cfg.downstream)
    ckpt = run_dir / "checkpoints" / f"{tag}.pt"
    t0 = time.perf_counter()
    if task == "segmentation":
        model = build_segmenter(cfg.downstream)
        history = train(model, ImagePool(anomalies, size), ImagePool(normals, size), spec, ckpt, device, tag,
                        normalize=norm)
    else:
        model, history = train_classifier(cfg, task, anomalies, normals, spec, ckpt, size, device, tag)
    train_s = time.perf_counter() - t0
    records = []
    for p in products:
        test = [s for s in split.test if s.product == p]
        pool = ImagePool(test, size)
        t1 = time.perf_counter()
        if task == "segmentation":
            maps = predict_maps(model, pool, int(cfg.eval_batch_size), device, norm, desc=f"test {p}")
            labels = torch.tensor([s.label for s in test])
            masks = torch.stack([pool[i]["mask"] for i in range(len(pool))])
            metrics = segmentation_metrics(cfg, maps, masks, labels)
            grid = run_dir / "grids" / f"{tag}_{p}.png" if unit == "all" else run_dir / "grids" / f"{tag}.png"
            prediction_grid(pool, maps, grid, int(cfg.grid_per_product), f"{arm} {p}")
        else:
            metrics = classifier_metrics(cfg, task, model, test, [s for s in anomalies if s.product == p], size,
                                         device)
        records.append({"arm": arm, "label": arm_label(cfg, arm), "fold": fold, "product": p, "unit": unit,
                        "n_train_anomalies": len([s for s in anomalies if s.product == p]),
                        "n_train_normals": len([s for s in normals if s.product == p]), "steps": spec.steps,
                        "train_seconds_per_unit": train_s, "test_seconds": time.perf_counter() - t1,
                        "final_loss": float(np.mean(history["losses"][-20:])) if history["losses"] else None,
                        **metrics})
    return records


# ----------------------------------------------------------------------------- classifiers


def _type_index(samples: Sequence[Sample], types: Sequence[str]) -> list[int]:
    return [types.index(s.anomaly_type) for s in samples]


def train_classifier(cfg, task, anomalies, normals, spec, ckpt, size, device, tag):
    """Type classification (targets = anomaly type index, anomalies only) or binary (normal 0 / defective 1)."""
    if task == "type_classification":
        types = sorted({s.anomaly_type for s in anomalies})
        samples, targets, n_classes = anomalies, _type_index(anomalies, types), len(types)
        spec.anomaly_fraction = None
        normals_pool = ImagePool([], size)
    elif task == "binary_classification":
        samples, targets, n_classes = anomalies, [1] * len(anomalies), 2
        normals_pool = ImagePool(normals, size)
    else:
        raise ValueError(f"Unknown downstream.task '{task}': segmentation | type_classification | binary_classification.")
    model = build_classifier(cfg.downstream, n_classes)
    pool = ImagePool(samples, size)
    target_of = torch.tensor(targets, dtype=torch.long)

    def loss_fn(m, batch, _spec):
        t = torch.where(batch["source"] == 1, target_of[batch["index"]], torch.zeros_like(batch["index"]))
        return torch.nn.functional.cross_entropy(m(batch["image"]), t)

    spec.augment = True
    history = train(model, pool, normals_pool, spec, ckpt, device, tag, loss_fn=loss_fn,
                    normalize=normalizer(cfg.downstream))
    model.types = sorted({s.anomaly_type for s in anomalies})  # type: ignore[attr-defined]
    return model, history


@torch.no_grad()
def classifier_metrics(cfg, task, model, test, train_anomalies, size, device) -> dict:
    norm = normalizer(cfg.downstream)
    if task == "type_classification":
        test = [s for s in test if s.label == 1 and s.anomaly_type in model.types]
        targets = torch.tensor(_type_index(test, model.types))
    else:
        targets = torch.tensor([s.label for s in test])
    pool = ImagePool(test, size)
    preds = []
    for s in range(0, len(pool), 16):
        x = pool.batch(range(s, min(s + 16, len(pool))))["image"]
        preds.append(model(norm(x) if norm else x).argmax(1).cpu())
    pred = torch.cat(preds)
    return {"accuracy": float((pred == targets).float().mean())}


# ----------------------------------------------------------------------------- entry points


def eval_downstream(cfg: DictConfig, run_dir: Path) -> Path:
    """``scripts/eval_downstream.py``: every arm x fold x unit, then the tables. Returns the Markdown table path."""
    from core.runs import resolve_device

    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    table = load_from_config(cfg.dataset, cfg.get("products") or None)
    products = resolve_products(cfg, table)
    arms = resolve_arms(cfg)
    size = resolve_image_size(cfg, table)
    types = {p: anomaly_types([s for s in table if s.product == p]) for p in products}
    generated = None
    if "generated" in arms:
        generated = load_generated(cfg.generated, products, types,
                                   need_anomalies=True)
    records: list[dict] = []
    units = [list(products)] if cfg.protocol.unified else [[p] for p in products]
    for fold in cfg.protocol.folds:
        split_node = dict(cfg.protocol.split)
        split = apply_split(table, split_node.pop("name"), fold=int(fold), **split_node)
        for arm in arms:
            for unit in units:
                tag = f"{arm}_fold{fold}_{'all' if len(unit) > 1 else unit[0]}"
                done = run_dir / "results" / f"{tag}.json"
                if done.is_file():
                    records += json.loads(done.read_text())
                    continue
                recs = run_unit(cfg, arm, int(fold), unit, split, generated, size, run_dir, device)
                write_json(done, recs)
                records += recs
    meta = {"protocol": cfg.protocol.name, "downstream": cfg.downstream.name, "dataset": cfg.dataset.name,
            "image_size": size, "arms": arms, "products": products,
            "backbone": ("ImageNet" if cfg.downstream.get("weights") else "random init")
            if cfg.downstream.name in ("upernet", "resnet34", "resnet50") else None}
    return tables.write_downstream(records, meta, run_dir, cfg.protocol)


def eval_generation(cfg: DictConfig, run_dir: Path) -> Path:
    raise NotImplementedError("eval_generation: not implemented yet (issue 4 is in progress).")
