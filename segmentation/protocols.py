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
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from core.data import DatasetError, Sample, anomaly_types, apply_split, load_from_config, screen_empty_masks
from core.io import write_json
from core.runs import check_common, check_run_identity, files_identity, resolve_device, save_config

from . import tables
from .data import ImagePool, check_no_test_leak, checked_types, load_generated, oracle_tree, take_per_type
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
    if cfg.get("generated") and "generated" not in arms:  # a folder given is a folder to evaluate (an experiment's
        arms.insert(1 if arms[:1] == ["baseline"] else 0, "generated")  # arms list may predate the command line)
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


def generated_folders(cfg: DictConfig) -> dict[int, Path]:
    """The generated folder of each fold: ``generated=<dir>`` serves every fold; a path with ``{fold}`` in it names
    one folder per fold (``"generated='runs/bg/gen_fold{fold}'"``: quoted, braces are Hydra syntax), for methods whose generator is trained per fold
    (bgdefect: fold f's generator has seen the anomalies fold 1-f tests on, so it may only serve fold f)."""
    g = str(cfg.generated)
    return {int(f): Path(g.replace("{fold}", str(int(f)))).expanduser() for f in cfg.protocol.folds}


def check_generated_fold(records: Sequence[dict], folder: Path, fold: int, per_fold: bool) -> None:
    """Refuse a generated folder whose records say it was made by a generator trained on another fold (its training
    anomalies are this fold's test anomalies), or made per fold but given as one folder for several folds."""
    made = sorted({int(r["fold"]) for r in records if r.get("fold") is not None})
    if not made:
        return
    if made != [fold]:
        how = ("Fix: generate one folder per fold (one from each fold's run) and name them with {fold}, quoted for "
               "Hydra: \"generated='runs/gen_fold{fold}'\"" if not per_fold else
               f"Fix: point the fold-{fold} folder at the output of the fold-{fold} run")
        raise DatasetError(f"generated={folder} was made by generator(s) trained on fold(s) {made}, but it is used for "
                           f"fold {fold}, whose test anomalies such a generator trained on. {how}.")


def arm_label(cfg: DictConfig, arm: str) -> str:
    if arm != "generated":
        return arm
    if cfg.get("label"):
        return str(cfg.label)
    manifest = next(iter(generated_folders(cfg).values())) / "manifest.jsonl"
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


def checked_anomalies(cfg: DictConfig, arm: str, products, real_train, fold: int, generated) -> list[Sample]:
    """:func:`arm_anomalies`, with every anomaly's mask checked for pixels (``empty_masks``: error | drop)."""
    pool = arm_anomalies(cfg, arm, products, real_train, fold, generated)
    return screen_empty_masks(pool, str(cfg.get("empty_masks", "error")), "empty_masks")


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
    # the tree is reused when it holds at least n per type (an earlier run may have asked for more): take the first n
    return take_per_type([s for s in load_folder(root, list(products)) if s.label == 1], int(n))


# ----------------------------------------------------------------------------- one unit


def score_images(cfg: DictConfig, maps: torch.Tensor) -> torch.Tensor:
    if cfg.protocol.image_score == "max":
        return max_score(maps)
    if cfg.protocol.image_score == "pooled_max":
        return pooled_max_score(maps, int(cfg.protocol.pooled_kernel))
    raise ValueError(f"protocol.image_score must be max or pooled_max, got '{cfg.protocol.image_score}'.")


def segmentation_metrics(cfg: DictConfig, maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                         image_scores: torch.Tensor | None = None) -> dict:
    """The protocol's metrics. ``image_scores`` overrides the protocol's rule (PatchCore scores its own images); maps
    that are not probabilities (PatchCore's distances) get no IoU, which needs the 0.5 threshold."""
    from core.metrics.detection import image_metrics, pixel_metrics

    wanted = list(cfg.protocol.metrics)
    if image_scores is not None:
        wanted = [m for m in wanted if m != "pixel_iou"]
    out = {}
    if any(m.startswith("image_") for m in wanted):
        scores = score_images(cfg, maps) if image_scores is None else image_scores
        out.update(image_metrics(labels.numpy(), scores.numpy()))
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
    tag = f"{arm}_fold{fold}_{unit}"
    if task == "memory_bank":   # a memory bank per product, also under a unified protocol (each product's own)
        return [r for p in products for r in run_patchcore(cfg, arm, fold, p, split, generated, size, run_dir, device,
                                                            tag if len(products) == 1 else f"{tag}_{p}")]
    if task == "vlad":
        return run_vlad(cfg, arm, fold, products, split, generated, size, run_dir, device, tag)
    if task == "reconstruction":
        return run_reconstruction(cfg, arm, fold, products, split, generated, size, run_dir, device, tag)
    if task == "glass":
        return run_glass(cfg, arm, fold, products, split, generated, size, run_dir, device, tag)
    if task == "synthesis" and arm == "baseline":
        anomalies = []  # plain DRAEM: simulated anomalies only
    else:
        anomalies = checked_anomalies(cfg, arm, products, split.train, fold, generated)
    normals = [s for s in split.train if s.label == 0 and s.product in products] \
        if (cfg.protocol.normals or task in ("binary_classification", "synthesis")) else []
    if not anomalies and task not in ("binary_classification", "synthesis"):
        raise DatasetError(f"{arm} arm of {unit}: no anomalies to train on.")
    n_train = len(anomalies) if cfg.protocol.train.get("anomaly_fraction") else len(anomalies) + len(normals)
    spec = train_spec(cfg, n_train if task != "synthesis" else len(normals))
    log.info("%s: %d anomalies, %d normals, %d steps", tag, len(anomalies), len(normals), spec.steps)
    torch.manual_seed(spec.seed)
    norm = normalizer(cfg.downstream)
    ckpt = run_dir / "checkpoints" / f"{tag}.pt"
    t0 = time.perf_counter()
    if task in ("segmentation", "synthesis"):
        loss_fn = {}
        if task == "synthesis":
            from .draem import DRAEM, make_step
            model = DRAEM(int(cfg.downstream.recon_base), int(cfg.downstream.seg_base))
            spec.anomaly_fraction = 0.5 if anomalies else None
            loss_fn = {"loss_fn": make_step(anomaly_source(cfg, size), spec.focal_gamma)}
        else:
            model = build_segmenter(cfg.downstream)
        history = train(model, ImagePool(anomalies, size), ImagePool(normals, size), spec, ckpt, device, tag,
                        normalize=norm, **loss_fn)
    else:
        model, history = train_classifier(cfg, task, anomalies, normals, spec, ckpt, size, device, tag)
    train_s = time.perf_counter() - t0
    records = []
    for p in products:
        test = [s for s in split.test if s.product == p]
        pool = ImagePool(test, size)
        t1 = time.perf_counter()
        if task in ("segmentation", "synthesis"):
            maps = predict_maps(model, pool, int(cfg.eval_batch_size), device, norm, desc=f"test {p}")
            metrics = _score_unit(cfg, run_dir, arm, tag, unit, p, pool, maps)
        else:
            metrics = classifier_metrics(cfg, task, model, test, [s for s in anomalies if s.product == p], size,
                                         device)
        records.append(_record(cfg, arm, fold, p, unit, spec.steps, train_s, time.perf_counter() - t1, history,
                               len([s for s in anomalies if s.product == p]),
                               len([s for s in normals if s.product == p]), metrics))
    return records


def _record(cfg, arm, fold, product, unit, steps, train_s, test_s, history, n_anomalies, n_normals, metrics) -> dict:
    losses = history.get("losses") or []
    return {"arm": arm, "label": arm_label(cfg, arm), "fold": fold, "product": product, "unit": unit,
            "n_train_anomalies": n_anomalies, "n_train_normals": n_normals, "steps": steps,
            "train_seconds_per_unit": train_s, "test_seconds": test_s,
            "final_loss": float(np.mean(losses[-20:])) if losses else None, **metrics}


def _score_unit(cfg, run_dir, arm, tag, unit, product, pool, maps, image_scores=None) -> dict:
    labels = torch.tensor([s.label for s in pool.samples])
    masks = torch.stack([pool[i]["mask"] for i in range(len(pool))])
    metrics = segmentation_metrics(cfg, maps, masks, labels, image_scores)
    grid = run_dir / "grids" / (f"{tag}_{product}.png" if unit == "all" else f"{tag}.png")
    shown = maps if image_scores is None else maps / maps.max().clamp(min=1e-8)
    prediction_grid(pool, shown, grid, int(cfg.grid_per_product), f"{arm} {product}")
    return metrics


def anomaly_source(cfg: DictConfig, size: int) -> list[torch.Tensor] | None:
    """DRAEM's texture images (e.g. DTD) from ``downstream.anomaly_source``; None = procedural textures."""
    folder = cfg.downstream.get("anomaly_source")
    if not folder:
        return None
    from core.data.table import list_images
    files = [p for d in sorted(Path(folder).expanduser().rglob("*")) if d.is_dir() for p in list_images(d)] \
        + list_images(Path(folder).expanduser())
    if not files:
        raise DatasetError(f"downstream.anomaly_source={folder} holds no images. Fix: point it at a texture folder "
                           f"(DRAEM uses DTD) or set it to null for procedural textures.")
    pool = ImagePool([Sample(str(f), "train", "source", "good", 0) for f in files], size)
    return [pool[i]["image"] for i in range(len(pool))]


def extra_normals(cfg: DictConfig, arm: str, product: str, generated, model: str) -> list[Sample]:
    """The normal images an unsupervised detector's arm adds to the real ones: the generated folder's normals
    (``generated``), extra real normals of the synthetic world (``oracle``), none (``baseline``)."""
    extra: list[Sample] = []
    if arm == "generated":
        extra = [s for s in generated if s.label == 0 and s.product == product]
        if not extra:
            raise DatasetError(f"generated={cfg.generated}/{product}/train/good holds no normal images: {model}'s "
                               f"generated arm adds generated normals. Fix: generate normal images too.")
    elif arm == "oracle":
        from core.data import load_folder
        n = int(cfg.get("oracle_per_type") or 100)
        root = Path(cfg.dataset.root).expanduser().parent / "oracle_normals" / f"seed{cfg.dataset.seed}_res{cfg.dataset.resolution}"
        oracle_tree(root, product, [], 0, n_normals=n, seed=int(cfg.dataset.seed), resolution=int(cfg.dataset.resolution))
        extra = take_per_type([s for s in load_folder(root, [product]) if s.label == 0], n)
    if cfg.limits.get("n_per_type"):
        extra = extra[: int(cfg.limits.n_per_type)]
    return extra


def build_reconstruction(cfg: DictConfig, size: int, n_classes: int) -> nn.Module:
    """MambaAD or HVQ-Trans (``downstream.name``) on a frozen timm backbone from a local file (null = random init)."""
    import timm
    d = cfg.downstream
    indices = tuple(d.get("stages") or ((1, 2, 3) if d.name == "mambaad" else (0, 1, 2, 3)))
    backbone = timm.create_model(str(d.backbone), pretrained=False, features_only=True, out_indices=indices)
    if d.get("weights"):
        from .upernet import load_backbone_weights
        load_backbone_weights(backbone, d.weights, str(d.backbone), "downstream.weights")
    torch.manual_seed(int(cfg.seed))
    c = tuple(backbone.feature_info.channels())
    if d.name == "mambaad":
        from .mambaad import MambaAD
        if size % 32:
            raise ValueError(f"MambaAD needs an image side divisible by 32 (image_size={size}). Fix: image_size=128 "
                             f"or 256.")
        return MambaAD(backbone, size, c, (2 * c[2], c[2], c[1], c[0]), tuple(d.depths), d_state=int(d.d_state),
                       scan_type=str(d.scan_type), num_direction=int(d.num_direction))
    if d.name == "hvqtrans":
        from .hvqtrans import HVQTrans
        if size % 16:
            raise ValueError(f"HVQ-Trans needs an image side divisible by 16 (image_size={size}).")
        return HVQTrans(backbone, sum(c), size // 16, n_classes, int(d.hidden), int(d.heads), int(d.ff),
                        int(d.layers), int(d.n_embed), float(d.latent_weight), float(d.dropout))
    raise ValueError(f"downstream.name={d.name} has no reconstruction model (mambaad | hvqtrans).")


def run_reconstruction(cfg, arm, fold, products, split, generated, size, run_dir, device, tag) -> list[dict]:
    """A multi-class reconstruction detector (MambaAD, HVQ-Trans) trained on the unit's normal images only: the real
    ones plus the arm's extra normals (generated / oracle); per product its maps and max image scores. HVQ-Trans
    switches its codebooks and output projection by product (the class)."""
    d = cfg.downstream
    normals = [s for s in split.train if s.label == 0 and s.product in products]
    extra = [s for p in products for s in extra_normals(cfg, arm, p, generated, str(d.name))]
    pool_samples = normals + extra
    classes = {p: i for i, p in enumerate(products)}
    model = build_reconstruction(cfg, size, len(products))
    spec = train_spec(cfg, len(pool_samples))
    spec.anomaly_fraction = None
    norm = normalizer(d)

    def step(m, batch, spec_):
        if d.name == "hvqtrans":
            c = torch.tensor([classes[pool_samples[int(i)].product] for i in batch["index"]], device=batch["image"].device)
            return m(batch["image"], c)["loss"]
        from .mambaad import distillation_loss
        return distillation_loss(*m(batch["image"]), float(d.loss_weight), str(d.loss))
    t0 = time.perf_counter()
    history = train(model, ImagePool([], size), ImagePool(pool_samples, size), spec,
                    run_dir / "checkpoints" / f"{tag}.pt", device, tag, loss_fn=step, normalize=norm)
    train_s = time.perf_counter() - t0
    model.eval()
    records, bs = [], int(cfg.eval_batch_size)
    for p in products:
        pool = ImagePool([s for s in split.test if s.product == p], size)
        t1 = time.perf_counter()
        maps = []
        with torch.no_grad():
            for i in range(0, len(pool), bs):
                x = pool.batch(range(i, min(i + bs, len(pool))))["image"]
                x = (norm(x) if norm is not None else x).to(device)
                if d.name == "hvqtrans":
                    maps.append(model.anomaly_map(x, torch.full((len(x),), classes[p], device=device), size).cpu())
                else:
                    from .mambaad import anomaly_map
                    maps.append(anomaly_map(*model(x), size, float(d.sigma)).cpu())
        maps = torch.cat(maps)
        unit = "all" if len(products) > 1 else p
        metrics = _score_unit(cfg, run_dir, arm, tag, unit, p, pool, maps, maps.flatten(1).amax(1))
        records.append(_record(cfg, arm, fold, p, unit, spec.steps, train_s, time.perf_counter() - t1, history, 0,
                               len([s for s in pool_samples if s.product == p]), metrics))
    return records


def run_glass(cfg, arm, fold, products, split, generated, size, run_dir, device, tag) -> list[dict]:
    """GLASS (SeaS Tab. 2): the discriminator trained on the unit's normal images with global (feature-space)
    synthesis and local anomalies: DRAEM-style simulated ones in the baseline arm, the arm's anomaly images (generated
    pairs, or the oracle's real ones) in the others, as SeaS replaces GLASS's local synthesis."""
    from .draem import procedural_texture, simulate
    from .glass import GLASS, glass_step

    d = cfg.downstream
    normals = [s for s in split.train if s.label == 0 and s.product in products]
    anomalies = [] if arm == "baseline" else checked_anomalies(cfg, arm, products, split.train, fold, generated)
    torch.manual_seed(int(cfg.seed))
    model = GLASS(str(d.backbone), d.get("weights"), tuple(d.layers), int(d.preprocess_dim), int(d.target_dim),
                  int(d.proj_layers), int(d.dsc_layers), int(d.dsc_hidden)).to(device)
    spec = train_spec(cfg, len(normals))
    spec.anomaly_fraction = 0.5 if anomalies else None
    norm = normalizer(d)
    source = anomaly_source(cfg, size)
    centre_pool = ImagePool(normals[: int(d.centre_images)], size)

    def centre(m) -> torch.Tensor:
        """Each patch position's mean projected normal feature (the official code recomputes it every epoch; here
        every ``centre_every`` steps, kept in the model's buffers so that a resume continues exactly)."""
        with torch.no_grad():
            x = centre_pool.batch(range(len(centre_pool)))["image"]
            f, (h, w) = m.features((norm(x) if norm else x).to(device))
            return f.view(len(centre_pool), h * w, -1).mean(0)

    model.set_centre(centre(model))

    def step(m, batch, spec_):
        if int(m.centre_age) >= int(d.centre_every):
            m.set_centre(centre(m))
        m.centre_age += 1
        x, mk, src = batch["image"], batch["mask"], batch["source"]
        nx = x[src == 0]
        if bool((src == 1).any()):
            ax, am = x[src == 1], mk[src == 1]
        else:   # local anomaly synthesis on the normal images
            pairs = [simulate(img, source[int(torch.randint(len(source), (1,)))] if source
                              else procedural_texture(img.shape[-1])) for img in nx.cpu()]
            ax = torch.stack([a for a, _ in pairs]).to(nx)
            am = torch.stack([b for _, b in pairs]).to(nx)
        n = min(len(nx), len(ax))
        nx, ax, am = (norm(nx[:n]) if norm else nx[:n]), (norm(ax[:n]) if norm else ax[:n]), am[:n]
        return glass_step(m, nx, ax, am, m.centre, d)
    t0 = time.perf_counter()
    history = train(model, ImagePool(anomalies, size), ImagePool(normals, size), spec,
                    run_dir / "checkpoints" / f"{tag}.pt", device, tag, loss_fn=step)
    train_s = time.perf_counter() - t0
    model.eval()
    records, bs = [], int(cfg.eval_batch_size)
    for p in products:
        pool = ImagePool([s for s in split.test if s.product == p], size)
        t1 = time.perf_counter()
        maps, scores = [], []
        for i in range(0, len(pool), bs):
            x = pool.batch(range(i, min(i + bs, len(pool))))["image"]
            m, sc = model((norm(x) if norm else x).to(device), float(d.sigma))
            maps.append(m.cpu())
            scores.append(sc.cpu())
        unit = "all" if len(products) > 1 else p
        metrics = _score_unit(cfg, run_dir, arm, tag, unit, p, pool, torch.cat(maps), torch.cat(scores))
        records.append(_record(cfg, arm, fold, p, unit, spec.steps, train_s, time.perf_counter() - t1, history,
                               len([s for s in anomalies if s.product == p]),
                               len([s for s in normals if s.product == p]), metrics))
    return records


def run_patchcore(cfg, arm, fold, product, split, generated, size, run_dir, device, tag) -> list[dict]:
    """PatchCore's memory bank from the real normal training images, plus generated (or oracle) normals."""
    from .patchcore import PatchCore

    normals = [s for s in split.train if s.label == 0 and s.product == product]
    extra = extra_normals(cfg, arm, product, generated, "PatchCore")
    d = cfg.downstream
    model = PatchCore(d.backbone, d.get("weights"), tuple(d.layers), int(d.preprocess_dim), int(d.target_dim),
                      float(d.coreset_ratio), int(d.projection_dim), float(d.blur_sigma), int(cfg.seed)).to(device)
    norm = normalizer(d)
    bank = ImagePool(normals + extra, size)
    bs = int(cfg.eval_batch_size)
    t0 = time.perf_counter()
    model.fit((norm(bank.batch(range(i, min(i + bs, len(bank))))["image"]).to(device)
               for i in range(0, len(bank), bs)))
    train_s = time.perf_counter() - t0
    test = [s for s in split.test if s.product == product]
    pool = ImagePool(test, size)
    t1 = time.perf_counter()
    maps, scores = [], []
    for i in range(0, len(pool), bs):
        m, sc = model(norm(pool.batch(range(i, min(i + bs, len(pool))))["image"]).to(device))
        maps.append(m.cpu())
        scores.append(sc.cpu())
    metrics = _score_unit(cfg, run_dir, arm, tag, product, product, pool, torch.cat(maps), torch.cat(scores))
    return [_record(cfg, arm, fold, product, product, 0, train_s, time.perf_counter() - t1, {}, 0,
                    len(normals) + len(extra), metrics)]


def run_vlad(cfg, arm, fold, products, split, generated, size, run_dir, device, tag) -> list[dict]:
    """VLAD (CUT, Sec. 4.2): its adapters trained on the arm's anomalies (CUT's samples for ``generated``) and the
    normal shots, then per product the shots' memory bank and the summed vision-language + vision-vision maps and
    scores. With no anomaly to train on (the k-shot baseline) the adapters keep their start, CLIP's own projection:
    zero-shot vision-language plus the shots' vision-vision branch."""
    from core.models.world_clip import load_clip
    from .vlad import VLAD, vlad_loss

    d = cfg.downstream
    clip = load_clip(d.get("clip_path"), key="downstream.clip_path")
    layers = clip.model.config.vision_config.num_hidden_layers
    stages = list(d.stages) if d.get("stages") else [max(1, round(layers * q / 4)) for q in (1, 2, 3, 4)]
    torch.manual_seed(int(cfg.seed))
    model = VLAD(clip, stages, float(d.temperature)).to(device)
    anomalies = checked_anomalies(cfg, arm, products, split.train, fold, generated)
    normals = [s for s in split.train if s.label == 0 and s.product in products]
    spec = train_spec(cfg, len(anomalies) + len(normals))
    history: dict = {}
    t0 = time.perf_counter()
    if anomalies:
        pools = {1: anomalies, 0: normals}

        def step(m, batch, spec_):
            names = [pools[int(src)][int(i)].product for src, i in zip(batch["source"], batch["index"])]
            return vlad_loss(m(batch["image"], names), batch["label"], batch["mask"], float(d.omega),
                             float(d.beta), float(spec_.focal_gamma))
        history = train(model, ImagePool(anomalies, size), ImagePool(normals, size), spec,
                        run_dir / "checkpoints" / f"{tag}.pt", device, tag, loss_fn=step)
    train_s = time.perf_counter() - t0
    records, bs = [], int(cfg.eval_batch_size)
    for p in products:
        shots = [s for s in normals if s.product == p]
        if shots:
            model.remember(p, ImagePool(shots, size).batch(range(len(shots)))["image"].to(device))
        pool = ImagePool([s for s in split.test if s.product == p], size)
        t1 = time.perf_counter()
        maps, scores = [], []
        for i in range(0, len(pool), bs):
            m, sc = model.predict(pool.batch(range(i, min(i + bs, len(pool))))["image"].to(device), p)
            maps.append(m.cpu())
            scores.append(sc.cpu())
        unit = "all" if len(products) > 1 else p
        metrics = _score_unit(cfg, run_dir, arm, tag, unit, p, pool, torch.cat(maps), torch.cat(scores))
        records.append(_record(cfg, arm, fold, p, unit, spec.steps if anomalies else 0, train_s,
                               time.perf_counter() - t1, history, len([s for s in anomalies if s.product == p]),
                               len(shots), metrics))
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


def drop_checkpoint(run_dir: Path, tag: str) -> None:
    """Delete a finished unit's resume checkpoint (and the folder once empty)."""
    ckpt = run_dir / "checkpoints" / f"{tag}.pt"
    ckpt.unlink(missing_ok=True)
    if ckpt.parent.is_dir() and not any(ckpt.parent.iterdir()):
        ckpt.parent.rmdir()


def data_identity(cfg: DictConfig, table: Sequence[Sample],
                  generated: dict[int, Sequence[Sample]] | Sequence[Sample] | None) -> dict:
    """What an evaluation's numbers depend on beyond its config: the dataset's and each fold's generated folder's
    files (names and sizes). ``generated``: fold -> samples (the downstream suite), or the samples of the one folder
    ``cfg.generated`` (``eval_generation``, which has no folds)."""
    def files(samples):
        return [p for s in samples for p in (s.path, *s.mask_paths)]
    out = {"dataset": files_identity(cfg.dataset.get("root") or "/", files(table))}
    if generated is not None and not isinstance(generated, dict):
        out["generated"] = files_identity(Path(str(cfg.generated)).expanduser(), files(generated))
    elif generated is not None:
        folders = generated_folders(cfg)
        ids = {str(f): files_identity(folders[f], files(generated[f])) for f in sorted(generated)}
        out["generated"] = ids if "{fold}" in str(cfg.generated) else next(iter(ids.values()))
    return out


def eval_downstream(cfg: DictConfig, run_dir: Path) -> Path:
    """``scripts/eval_downstream.py``: every arm x fold x unit, then the tables. Returns the Markdown table path."""
    run_dir = Path(run_dir)
    check_common(cfg)
    device = resolve_device(cfg.device)
    table = load_from_config(cfg.dataset, cfg.get("products") or None)
    products = resolve_products(cfg, table)
    arms = resolve_arms(cfg)
    size = resolve_image_size(cfg, table)
    types = {p: anomaly_types([s for s in table if s.product == p]) for p in products}
    splits = {}
    for fold in cfg.protocol.folds:
        split_node = dict(cfg.protocol.split)
        splits[fold] = apply_split(table, split_node.pop("name"), fold=int(fold), **split_node)
    generated = None
    if "generated" in arms and checked_types(cfg, types) is None \
            and str(cfg.downstream.get("task", "segmentation")) == "type_classification":
        raise ValueError("downstream.task=type_classification needs generated anomalies named by the dataset's types; "
                         "generated_types=free names none. Fix: drop generated_types=free, or use another task.")
    if "generated" in arms:   # fold -> samples; before anything is written: no fold trains on its own test images
        from core.export import read_manifest
        folders, per_fold = generated_folders(cfg), "{fold}" in str(cfg.generated)
        loaded: dict[Path, list[Sample]] = {}
        generated = {}
        for fold, folder in folders.items():
            if folder not in loaded:
                loaded[folder] = load_generated(folder, products, checked_types(cfg, types), need_anomalies=True)
            generated[fold] = loaded[folder]
            check_no_test_leak(generated[fold], [s for s in splits[fold].test if s.product in products], folder)
            check_generated_fold([r for r in read_manifest(folder) if r.get("product") in products], folder, fold,
                                 per_fold)
    # a rerun reuses finished units' results: only when the config and the images they were computed on are the same
    check_run_identity(run_dir, cfg, data_identity(cfg, table, generated), what="downstream evaluation")
    save_config(cfg, run_dir)
    records: list[dict] = []
    units = [list(products)] if cfg.protocol.unified else [[p] for p in products]
    for fold, split in splits.items():
        for arm in arms:
            for unit in units:
                tag = f"{arm}_fold{fold}_{'all' if len(unit) > 1 else unit[0]}"
                done = run_dir / "results" / f"{tag}.json"
                if done.is_file():
                    records += json.loads(done.read_text())
                    continue
                recs = run_unit(cfg, arm, int(fold), unit, split, generated and generated[int(fold)], size,
                                run_dir, device)
                write_json(done, recs)  # the results file marks the unit done; its checkpoint only served a resume
                if not cfg.get("keep_checkpoints", False):
                    drop_checkpoint(run_dir, tag)
                records += recs
    meta = {"protocol": cfg.protocol.name, "downstream": cfg.downstream.name, "dataset": cfg.dataset.name,
            "image_size": size, "arms": arms, "products": products,
            "backbone": ("ImageNet" if cfg.downstream.get("weights") else "random init")
            if cfg.downstream.name in ("upernet", "resnet34", "resnet50") else None}
    return tables.write_downstream(records, meta, run_dir, cfg.protocol)


def eval_generation(cfg: DictConfig, run_dir: Path) -> Path:
    """``scripts/eval_generation.py``: see :mod:`segmentation.generation_eval`."""
    from .generation_eval import eval_generation as run
    return run(cfg, run_dir)
