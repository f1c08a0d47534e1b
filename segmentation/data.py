"""Training and test pools of the downstream protocols.

Every arm of a protocol trains on a list of :class:`core.data.Sample` rows, whatever their source:
real images of the dataset's split, a generated MVTec-layout folder (``scripts/generate.py`` output), or
the synthetic world's oracle (extra *real* defects rendered by :class:`core.data.synthetic.OracleSampler`,
written once as an MVTec-layout tree so that the oracle goes through exactly the code path of generated data).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from core.data import DatasetError, Sample, load_folder, read_image, read_mask, validate_files
from core.data.mvtec_ad import find_products
from core.data.torch_dataset import PairedTransform, to_tensor


def load_generated(root: str | Path, products: Sequence[str], dataset_types: dict[str, list[str]] | None = None,
                   need_anomalies: bool = True, need_normals: bool = False) -> list[Sample]:
    """Samples of a generated folder, checked against what the protocol needs.

    Raises :class:`DatasetError` naming the folder and the fix when: the folder is missing, a product the protocol
    evaluates has no generated data, an anomaly image has no mask, a mask's size differs from its image's, or an
    anomaly type is not one of the dataset's types for that product.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"generated={root} is not a directory. Fix: pass the out_dir of scripts/generate.py "
                           f"(an MVTec-layout tree: <product>/test/<type>/*.png + <product>/ground_truth/...).")
    available = find_products(root)  # product folders only (not e.g. the .sweep/ of a generation multirun)
    missing = [p for p in products if p not in available]
    if missing:
        raise DatasetError(f"generated={root} has no folder for product(s) {', '.join(missing)} (it has: "
                           f"{', '.join(available) or 'nothing'}). Fix: generate those products, or restrict the "
                           f"evaluation with products=[{','.join(p for p in products if p in available)}].")
    samples = load_folder(root, list(products))  # raises on image without mask / mask without image
    validate_files(samples)  # raises on a mask whose size differs from its image
    for p in products:
        mine = [s for s in samples if s.product == p]
        if need_anomalies and not any(s.label == 1 for s in mine):
            raise DatasetError(f"generated={root}/{p} holds no anomalies (expected {p}/test/<type>/*.png with masks "
                               f"in {p}/ground_truth/<type>/<name>_mask.png). Fix: generate anomalies for '{p}'.")
        if need_normals and not any(s.label == 0 for s in mine):
            raise DatasetError(f"generated={root}/{p} holds no normal images (expected {p}/train/good/*.png). "
                               f"Fix: generate normal images for '{p}'.")
        if dataset_types is not None:
            unknown = sorted({s.anomaly_type for s in mine if s.label == 1} - set(dataset_types.get(p, [])))
            if unknown:
                raise DatasetError(
                    f"generated={root}/{p} has anomaly type(s) {', '.join(unknown)} that the dataset's '{p}' does "
                    f"not have ({', '.join(dataset_types.get(p, []))}). Fix: generate with the dataset's type names; "
                    f"or, for a method that names its anomalies freely (CUT's text descriptions), pass "
                    f"generated_types=free (per-type comparisons then pool the product's types).")
    return samples


GENERATED_TYPES = ("dataset", "free")


def checked_types(cfg, types: dict[str, list[str]]) -> dict[str, list[str]] | None:
    """The dataset's anomaly types per product that a generated folder must use (``generated_types: dataset``), or
    ``None`` when its anomalies are named freely (``free``: a text-driven method such as CUT, whose "damaged" is no
    dataset type); per-type comparisons then pool each product's types."""
    mode = str(cfg.get("generated_types", "dataset"))
    if mode not in GENERATED_TYPES:
        raise ValueError(f"generated_types must be one of {', '.join(GENERATED_TYPES)}, got '{mode}'.")
    return None if mode == "free" else types


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_no_test_leak(generated: Sequence[Sample], test: Sequence[Sample], root: str | Path,
                       what: str = "the benchmark's test images",
                       harm: str = "training on them would score the test set on itself") -> None:
    """Refuse a generated folder that holds any of the protocol's test images, as the same file or as a byte-identical
    copy (the benchmark itself, or a copy of it, passed as ``generated=``: its test images would be trained on and
    then scored, pixel AP 92 instead of 33 in the case that was found). Compares file contents, so a renamed or copied
    file is caught; an image re-encoded with other bytes is not (generated images are never byte copies of real ones)."""
    test_files = {os.path.realpath(t.path): t.path for t in test}
    by_hash: dict[str, str] = {}
    sizes = {os.path.getsize(t.path) for t in test}
    hits = []
    for g in generated:
        real = os.path.realpath(g.path)
        if real in test_files:
            hits.append((g.path, test_files[real]))
            continue
        if os.path.getsize(g.path) not in sizes:   # no test file has this size: it cannot be a copy of one
            continue
        if not by_hash:
            by_hash = {_file_sha256(t.path): t.path for t in test}
        h = _file_sha256(g.path)
        if h in by_hash:
            hits.append((g.path, by_hash[h]))
    if hits:
        shown = "; ".join(f"'{a}' = '{b}'" for a, b in hits[:2]) + ("; ..." if len(hits) > 2 else "")
        raise DatasetError(f"generated={root} holds {len(hits)} image(s) identical to {what} ({shown}): {harm}. "
                           f"Fix: pass the out_dir of scripts/generate.py, not the dataset or a copy of it, and remove "
                           f"any real image from the generated folder.")


def oracle_tree(root: str | Path, product: str, types: Iterable[str], n_per_type: int, n_normals: int = 0,
                seed: int = 0, resolution: int = 128) -> Path:
    """Write (or reuse) ``root/<product>`` with ``n_per_type`` extra real defects per type and ``n_normals`` extra
    normals from the synthetic world's oracle stream, in MVTec layout. Atomic per product; a complete tree with at
    least the requested counts is reused."""
    from PIL import Image

    from core.data.synthetic import OracleSampler, PRODUCTS

    root = Path(root).expanduser()
    out = root / product
    meta_path = out / "oracle.json"
    types = list(types)
    want = {"types": types, "n_per_type": n_per_type, "n_normals": n_normals, "seed": seed, "resolution": resolution}
    if meta_path.is_file():
        have = json.loads(meta_path.read_text())
        if (have["seed"], have["resolution"]) == (seed, resolution) and set(types) <= set(have["types"]) \
                and have["n_per_type"] >= n_per_type and have["n_normals"] >= n_normals:
            return root
    if product not in PRODUCTS:
        raise DatasetError(f"The oracle arm needs the synthetic world: '{product}' is not a synthetic product.")
    sampler = OracleSampler(product, seed=seed, resolution=resolution)
    tmp = root / f".{product}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for t in types:
            (tmp / "test" / t).mkdir(parents=True)
            (tmp / "ground_truth" / t).mkdir(parents=True)
            for i, r in enumerate(sampler.iter(t, n_per_type)):
                Image.fromarray(r.image).save(tmp / "test" / t / f"{i:04d}.png")
                Image.fromarray((r.mask > 0).astype(np.uint8) * 255).save(tmp / "ground_truth" / t / f"{i:04d}_mask.png")
        if n_normals:
            (tmp / "train" / "good").mkdir(parents=True)
        for i in range(n_normals):
            Image.fromarray(sampler.normal(i).image).save(tmp / "train" / "good" / f"{i:04d}.png")
        (tmp / "oracle.json").write_text(json.dumps(want))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def take_per_type(samples: Sequence[Sample], n: int | None) -> list[Sample]:
    """The first ``n`` anomalies of each (product, type) by file name; ``None`` keeps all."""
    if n is None:
        return list(samples)
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in sorted(samples, key=lambda s: (s.product, s.anomaly_type, s.name)):
        groups.setdefault((s.product, s.anomaly_type), []).append(s)
    return [s for g in groups.values() for s in g[:n]]


class ImagePool(Dataset):
    """Images and masks of a list of samples at ``size`` x ``size``, decoded once and kept as uint8 when the pool fits
    in ``cache_bytes`` (otherwise read from disk on every access).

    Items: image (3, S, S) float in [0, 1], mask (S, S) float in {0, 1}, label, index into ``samples``.
    """

    def __init__(self, samples: Sequence[Sample], size: int, cache_bytes: int = 2 << 30):
        self.samples, self.size = list(samples), size
        self.cached = len(self.samples) * size * size * 4 <= cache_bytes
        self._images: list[torch.Tensor | None] = [None] * len(self.samples)
        self._masks: list[torch.Tensor | None] = [None] * len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[i]
        img = read_image(s.path)
        mask = read_mask(s.mask_paths, img.shape[:2])
        resize = PairedTransform(self.size).resize  # the data layer's paired resize (bilinear+antialias / nearest)
        x = resize(to_tensor(img), is_mask=False)
        m = resize(torch.from_numpy(mask)[None].float(), is_mask=True)
        return (x * 255).round().clamp(0, 255).to(torch.uint8), (m[0] > 0.5).to(torch.uint8)

    def __getitem__(self, i: int) -> dict:
        if self._images[i] is None:
            x, m = self.load(i)
            if not self.cached:
                return self._item(i, x, m)
            self._images[i], self._masks[i] = x, m
        return self._item(i, self._images[i], self._masks[i])

    def _item(self, i, x, m) -> dict:
        return {"image": x.float() / 255.0, "mask": m.float(), "label": self.samples[i].label, "index": i}

    def batch(self, indices: Sequence[int]) -> dict:
        items = [self[i] for i in indices]
        return {"image": torch.stack([it["image"] for it in items]), "mask": torch.stack([it["mask"] for it in items]),
                "label": torch.tensor([it["label"] for it in items]), "index": torch.tensor(list(indices))}
