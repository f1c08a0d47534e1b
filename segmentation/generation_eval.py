"""``scripts/eval_generation.py``: generation quality of a generated folder, per product and averaged.

- IS over the product's generated anomalies (Inception-v3 logits; splits = min(10, n)).
- IC-LPIPS (SeaS's variant by default, ``metrics_variant``): per anomaly type, each generated image joins the cluster
  of its nearest real *training* anomaly of that type (the split's train part), mean pairwise LPIPS per cluster;
  averaged over clusters, then over types.
- IC-LPIPS(a): the same on mask-multiplied images (the anomalies alone).
- KID and FID of the generated normals (``<product>/train/good``) against the real normal training images; the KID
  subset size shrinks to min(n_real, n_fake) (reported).
- FID(a) (synthetic world only): the generated anomalies against as many extra *real* anomalies of the same types
  from the world's oracle stream (never the test images).
- Alignment (methods that edit a real normal image and record it as ``source`` in the manifest): of the pixels that
  changed from the source (largest channel difference > 0.1), the share inside the generated mask, averaged over
  the product's anomalies (AnomalyDiffusion Sec. 3.3's "accurately aligned"; 1 = edits only inside the mask).
- CLIP score: 100 * max(cos, 0) between each generated anomaly and the text "a photo of a <product> with <defect>"
  (Hessel et al. 2021, CLIPScore, arXiv 2104.08718, with torchmetrics' scale), averaged.

Feature space (``metrics.extractor``): ``world_clip`` (the toolkit's world CLIP, ``core/models/world_clip``; the
default on ``dataset=synthetic``, where no Inception weights can exist) or ``inception`` (torchvision Inception-v3
from a local file, the default on real data). IS uses the extractor's class probabilities: Inception's 1000 ImageNet
classes, or the world CLIP's zero-shot (product, state) classes. Values in the two spaces are not comparable.
Inception, LPIPS's backbone and a real CLIP load from local files only (``weights.*``, ``metrics.clip_path``); a
missing file stops the run with a message naming it.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from core.data import DatasetError, apply_split, load_from_config
from core.data.mvtec_ad import find_products
from core.metrics.generation import (ICLPIPSVariant, extract, fid, ic_lpips, inception_score_from_logits, kid,
                                     lpips_distance, mask_alignment)

from . import tables
from .data import ImagePool, check_no_test_leak, checked_types, load_generated

COLUMNS = {"is": "IS", "ic_lpips": "IC-LPIPS", "ic_lpips_anomaly": "IC-LPIPS(a)", "kid": "KID", "fid": "FID",
           "fid_anomaly": "FID(a)", "clip_score": "CLIP score", "alignment": "Alignment"}
DEFAULT_METRICS = {"world_clip": ["is", "fid", "kid", "fid_anomaly", "clip_score", "alignment"],
                   "inception": ["is", "ic_lpips", "ic_lpips_anomaly", "kid", "alignment"]}


def metric_settings(cfg: DictConfig) -> tuple[list[str], str]:
    """(metric names, extractor) after the dataset-dependent defaults: world CLIP on the synthetic world."""
    m = cfg.metrics
    extractor = m.get("extractor") or ("world_clip" if cfg.dataset.name == "synthetic" else "inception")
    if extractor not in DEFAULT_METRICS:
        raise ValueError(f"metrics.extractor={extractor}: choose world_clip or inception.")
    names = list(m.get("names") or DEFAULT_METRICS[extractor])
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        raise ValueError(f"metrics.names={unknown}: choose from {', '.join(COLUMNS)}.")
    if "fid_anomaly" in names and cfg.dataset.name != "synthetic":
        raise ValueError("metrics.names has fid_anomaly, whose reference is the synthetic world's oracle; "
                         f"dataset={cfg.dataset.name} has none. Fix: drop fid_anomaly.")
    return names, extractor


def load_extractor(cfg: DictConfig, extractor: str, clip=None):
    """The feature module ``(features, logits)``: Inception from ``weights.inception`` or the (world) CLIP."""
    if extractor == "inception":
        from core.metrics.extractors import InceptionFeatures
        return InceptionFeatures(cfg.weights.get("inception"), "weights.inception")
    from core.models.world_clip import ClipFeatures
    return ClipFeatures(clip or _clip(cfg))


def _clip(cfg: DictConfig):
    from core.models.world_clip import load_clip
    return load_clip(cfg.metrics.get("clip_path"), "metrics.clip_path")


@torch.no_grad()
def clip_score(encoder, images, prompts) -> float:
    """Mean of 100 * max(cos(image, text), 0) over pairs (CLIPScore with torchmetrics' scale)."""
    scores = []
    for i in range(0, len(images), 64):
        img = encoder.image_embeds(images[i:i + 64])
        txt = encoder.text_embeds(list(prompts[i:i + 64]))
        scores.append((100 * (img * txt).sum(1)).clamp(min=0))
    return float(torch.cat(scores).mean())


def best_clip_score(encoder, images, prompts) -> float:
    """Mean over images of 100 * max(cos(image, text), 0) for the best of ``prompts`` (shared by all images): the CLIP
    score of an anomaly no single prompt names (CUT's "damaged"), against the closest of the product's defects."""
    txt = encoder.text_embeds(list(prompts))
    scores = [(100 * (encoder.image_embeds(images[i:i + 64]) @ txt.T).max(dim=1).values).clamp(min=0)
              for i in range(0, len(images), 64)]
    return float(torch.cat(scores).mean())


def _images(samples, size=None):
    size = size or _native(samples)
    pool = ImagePool(samples, size)
    b = pool.batch(range(len(pool)))
    return b["image"], b["mask"][:, None]


def _native(samples) -> int:
    from core.data.table import image_size
    return min(image_size(samples[0].path))


def eval_generation(cfg: DictConfig, run_dir: Path, extractor=None, lpips_model=None, clip=None) -> Path:
    """``extractor`` / ``lpips_model`` / ``clip`` (a ClipEncoder) replace the loaded models (tests pass tiny ones)."""
    run_dir = Path(run_dir)
    wanted, extractor_name = metric_settings(cfg)
    gen_root = Path(cfg.generated).expanduser()
    if not gen_root.is_dir():
        raise DatasetError(f"generated={gen_root} is not a directory. Fix: pass the out_dir of scripts/generate.py.")
    products = list(cfg.products) if cfg.get("products") else find_products(gen_root)  # not e.g. .sweep/
    if cfg.limits.get("max_products"):
        products = products[: int(cfg.limits.max_products)]
    table = load_from_config(cfg.dataset, products)
    split_node = dict(cfg.split)
    split = apply_split(table, split_node.pop("name"), **split_node)
    types = {p: sorted({s.anomaly_type for s in table if s.product == p and s.label == 1}) for p in products}
    skipped = []
    if not cfg.metrics.get("names") and {"kid", "fid"} & set(wanted) and not any(
            any((gen_root / p / "train" / "good").glob("*.png")) for p in products):
        # an anomaly-only method (AnomalyDiffusion, background-aware generation): the default set drops the metrics
        # of generated normal images instead of stopping; asking for them by name still fails with the fix
        skipped = [m for m in wanted if m in ("kid", "fid")]
        wanted = [m for m in wanted if m not in skipped]
    free = checked_types(cfg, types) is None   # anomalies named freely (CUT): per-type comparisons pool the types
    generated = load_generated(gen_root, products, None if free else types,
                               need_anomalies=any(m not in ("kid", "fid") for m in wanted),
                               need_normals=bool({"kid", "fid"} & set(wanted)))
    # test images only: copies of the real training normals are the metrics' own sanity check (FID, KID ~0)
    check_no_test_leak(generated, split.test, gen_root, what="the dataset's test images",
                       harm="a folder holding them is the benchmark, not generated data")
    from core.runs import check_common, check_run_identity, save_config
    from .protocols import data_identity
    check_common(cfg)
    check_run_identity(run_dir, cfg, data_identity(cfg, table, generated), what="generation evaluation")
    save_config(cfg, run_dir)
    if "clip_score" in wanted and clip is None:
        clip = _clip(cfg)
    if extractor is None and ({"is", "kid", "fid", "fid_anomaly"} & set(wanted)):
        extractor = load_extractor(cfg, extractor_name, clip if extractor_name == "world_clip" else None)
    variant = ICLPIPSVariant(**dict(cfg.get("ic_lpips_variant") or {}))
    if lpips_model is None and ({"ic_lpips", "ic_lpips_anomaly"} & set(wanted)):
        from core.metrics.extractors import load_lpips
        lpips_model = load_lpips(variant.backbone, cfg.weights.get("lpips_backbone"), "weights.lpips_backbone")
    dist = lpips_distance(lpips_model, variant.resize) if lpips_model is not None else None

    reference = None
    if "alignment" in wanted and str(cfg.get("alignment_reference", "source")) == "vae":
        from core.models import load_model
        reference = vae_reference(load_model(cfg.model))
    elif str(cfg.get("alignment_reference", "source")) not in ("source", "vae"):
        raise ValueError(f"alignment_reference must be source or vae, got '{cfg.alignment_reference}'.")
    results: dict = defaultdict(dict)
    notes = [f"No generated normal images in {gen_root}: {', '.join(skipped)} (of generated normals against the real "
             f"ones) not computed."] if skipped else []
    if free:
        notes.append("generated_types=free: the anomalies are named freely, not by the dataset's types; IC-LPIPS "
                     "compares them with all of a product's real anomalies, FID(a)'s reference spreads as many real "
                     "defects evenly over the product's types, and the CLIP score is the best of the product's defect "
                     "prompts.")
    if reference is not None:
        notes.append(f"Alignment is measured against each source's round trip through the VAE of model="
                     f"{cfg.model.get('name', cfg.model.get('kind'))} (alignment_reference=vae), not the source.")
    for p in products:
        gen_anom = [s for s in generated if s.product == p and s.label == 1]
        row = results[p]
        if "is" in wanted:
            x, _ = _images(gen_anom)
            _, logits = extract(extractor, x)
            row["is"] = inception_score_from_logits(logits, splits=min(10, len(x)))[0]
        for metric in ("ic_lpips", "ic_lpips_anomaly"):
            if metric not in wanted:
                continue
            per_type = []
            for t in ([None] if free else types[p]):
                g = [s for s in gen_anom if t is None or s.anomaly_type == t]
                real = [s for s in split.train if s.product == p and s.label == 1 and t in (None, s.anomaly_type)]
                if len(g) < 2 or not real:
                    continue
                size = _native(real)
                gx, gm = _images(g, size)
                rx, rm = _images(real, size)
                if metric == "ic_lpips_anomaly":
                    gx, rx = gx * gm, rx * rm
                per_type.append(ic_lpips(gx, rx, dist, variant).value)
            row[metric] = float(np.mean(per_type)) if per_type else None
        if {"kid", "fid"} & set(wanted):
            fake = [s for s in generated if s.product == p and s.label == 0]
            real = [s for s in split.train if s.product == p and s.label == 0]
            size = _native(real)
            fr, _ = extract(extractor, _images(real, size)[0])
            ff, _ = extract(extractor, _images(fake, size)[0])
            if "kid" in wanted:
                k = kid(fr, ff)
                row["kid"] = k.mean
                if k.shrunk:
                    notes.append(f"{p}: KID subset size shrunk to {k.subset_size} (real {len(real)}, "
                                 f"generated {len(fake)}).")
            if "fid" in wanted:
                row["fid"] = fid(fr, ff)
        if "fid_anomaly" in wanted:
            ref = _oracle_anomalies(cfg, p, gen_anom, types[p] if free else None)
            size = _native(ref)
            row["fid_anomaly"] = fid(extract(extractor, _images(ref, size)[0])[0],
                                     extract(extractor, _images(gen_anom, size)[0])[0])
        if "alignment" in wanted:
            row["alignment"] = _alignment(gen_root, gen_anom, reference)
            if row["alignment"] is None:
                notes.append(f"{p}: no alignment (the manifest records no source normal image for its anomalies).")
        if "clip_score" in wanted:
            from core.models.world_clip import state_prompt
            x, _ = _images(gen_anom)
            if free:   # no state prompt names the anomaly: the closest of the product's defect prompts
                row["clip_score"] = best_clip_score(clip, x, [state_prompt(p, t) for t in types[p]])
            else:
                row["clip_score"] = clip_score(clip, x, [state_prompt(p, s.anomaly_type) for s in gen_anom])
    avg = {m: float(np.mean([results[p][m] for p in products if results[p].get(m) is not None]))
           for m in wanted if any(results[p].get(m) is not None for p in products)}
    header = ["Category"] + [COLUMNS[m] for m in wanted]
    digits = {"kid": 4, "fid": 4, "fid_anomaly": 4, "alignment": 3}
    fmt = lambda m, v: "-" if v is None else f"{v:.{digits.get(m, 2)}f}"  # noqa: E731
    rows = [[p] + [fmt(m, results[p].get(m)) for m in wanted] for p in products]
    rows.append([tables.AVERAGE] + [fmt(m, avg.get(m)) for m in wanted])
    for label, per in tables.load_paper("seas_tab1", cfg.dataset.name, percent=False).items():
        rows.append([f"{label} ({tables.AVERAGE})"] + [fmt(m, per[tables.AVERAGE].get(m)) for m in wanted])
    space = ("world-CLIP image embeddings (core/models/world_clip; 128-d, unit length), IS over its zero-shot "
             "(product, state) classes" if extractor_name == "world_clip" else "Inception-v3 pool features / logits")
    text = (f"# Generation quality of {gen_root} (dataset {cfg.dataset.name})\n\n"
            f"Feature space of IS / FID / KID: {space}. FID(a): generated anomalies vs as many real anomalies of the "
            f"same types from the synthetic world's oracle stream. "
            f"IC-LPIPS variant: {variant}. Real targets: the split's training anomalies ({cfg.split.name}). "
            f"Rows 'paper: ...' are SeaS Tab. 1 (segmentation/paper_results/seas_tab1.csv) where the dataset matches.\n\n"
            + tables.markdown(header, rows) + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    tables.write_text(run_dir / "generation.csv", tables.to_csv(header, rows))
    path = tables.write_text(run_dir / "generation.md", text)
    print(text)
    return path


def vae_reference(comp) -> Callable[[torch.Tensor], torch.Tensor]:
    """The source image as the generator's own VAE returns it (encode, decode, at the model's resolution, resized
    back): the reference for alignment when the prior's round trip alone moves pixels (``alignment_reference=vae``)."""
    def ref(y: torch.Tensor) -> torch.Tensor:
        size = y.shape[-2:]
        x = torch.nn.functional.interpolate(y, size=(comp.resolution,) * 2, mode="bilinear", antialias=True,
                                            align_corners=False) if size != (comp.resolution,) * 2 else y
        with torch.no_grad():
            r = comp.decode_latents(comp.encode_images(x.to(comp.device))).float().cpu().clamp(0, 1)
        return torch.nn.functional.interpolate(r, size=size, mode="bilinear", antialias=True, align_corners=False) \
            if r.shape[-2:] != size else r
    return ref


def _alignment(gen_root: Path, anomalies, reference: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> float | None:
    """Mean :func:`core.metrics.generation.mask_alignment` of the anomalies whose manifest record names a source
    image that exists (resized to the generated image's size); None when none does. ``reference`` maps the source
    to what the change is measured against (default: the source itself)."""
    from core.data import read_image
    from core.data.torch_dataset import to_tensor
    from core.export import read_manifest

    sources = {str((gen_root / r["image"]).resolve()): r.get("source") for r in read_manifest(gen_root)
               if r.get("kind") == "anomaly"}
    values = []
    for s in anomalies:
        src = sources.get(str(Path(s.path).resolve()))
        if not src or not Path(src).is_file():
            continue
        x, m = _images([s])
        y = to_tensor(read_image(src))[None]
        if y.shape[-2:] != x.shape[-2:]:
            y = torch.nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", antialias=True,
                                                align_corners=False)
        if reference is not None:
            y = reference(y)
        a = float(mask_alignment(x, y, m)[0])
        if a == a:
            values.append(a)
    return float(np.mean(values)) if values else None


def _oracle_anomalies(cfg: DictConfig, product: str, generated, pooled_types: Sequence[str] | None = None) -> list:
    """Real anomalies from the world's oracle stream, as many per type as were generated (the FID(a) reference).
    ``pooled_types`` (anomalies named freely): as many in all as were generated, spread evenly over those types."""
    from collections import Counter

    from core.data import load_folder

    from .data import oracle_tree

    if pooled_types:
        n, k = len(generated), len(pooled_types)
        counts = Counter({t: n // k + (i < n % k) for i, t in enumerate(sorted(pooled_types))})
    else:
        counts = Counter(s.anomaly_type for s in generated)
    root = Path(cfg.dataset.root).expanduser().parent / "oracle" / f"seed{cfg.dataset.seed}_res{cfg.dataset.resolution}"
    oracle_tree(root, product, sorted(counts), max(counts.values()), seed=int(cfg.dataset.seed),
                resolution=int(cfg.dataset.resolution))
    by_type: dict = defaultdict(list)
    for s in sorted(load_folder(root, [product]), key=lambda s: s.path):
        if s.label == 1:
            by_type[s.anomaly_type].append(s)
    return [s for t, n in counts.items() for s in by_type[t][:n]]
