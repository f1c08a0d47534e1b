"""The world on disk (MVTec AD layout, atomic build), per-image seed streams, and the oracle sampler."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .products import ALL_PRODUCTS, BENCHMARK_PRODUCTS, DEFECT_TYPES, PRETRAIN_PRODUCTS, PRODUCTS
from .appearance import KEEP_BENCHMARK, Appearance, sample_appearance
from .render import InvisibleDefect, Rendered, render

WORLD_VERSION = 1


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    resolution: int = 128
    n_train_good: int = 200
    n_test_good: int = 30
    n_per_type: int = 15
    products: tuple[str, ...] = ALL_PRODUCTS

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["products"] = list(self.products)
        return {"version": WORLD_VERSION, **d, "benchmark_products": list(BENCHMARK_PRODUCTS),
                "pretrain_products": list(PRETRAIN_PRODUCTS)}


_STREAM = {"train": 0, "test": 1, "oracle": 2, "prior": 3, "web": 4}  # "web": appearance draws of the corpus


def sample_rng(seed: int, product: str, stream: str, atype: str, index: int, *extra: int) -> np.random.Generator:
    """Independent, order-free stream per image: any image can be re-drawn alone."""
    t = 0 if atype == "good" else 1 + DEFECT_TYPES.index(atype)
    return np.random.default_rng([seed, ALL_PRODUCTS.index(product), _STREAM[stream], t, index, *extra])


WEB_ATTEMPTS = 8


def render_web(product: str, seed: int, atype: str, index: int, resolution: int = 128,
               keep: float = KEEP_BENCHMARK) -> tuple[Rendered, Appearance | None]:
    """A pretraining-corpus image: sample ``index`` of the "prior" stream, photographed with a web appearance.

    The appearance comes from the "web" stream. When it hides the defect (a black part in dim light: no photographer
    would caption that photo with its defect) the next appearance of the stream is tried; after ``WEB_ATTEMPTS``
    the benchmark's look is used. Returns the render and the appearance used (None: the benchmark's look).
    """
    spec = PRODUCTS[product]
    defect = None if atype == "good" else atype
    for k in range(WEB_ATTEMPTS):
        app = sample_appearance(sample_rng(seed, product, "web", atype, index, k), spec, keep)
        try:
            return render(product, sample_rng(seed, product, "prior", atype, index), resolution, defect, app), app
        except InvisibleDefect:
            continue
    return render(product, sample_rng(seed, product, "prior", atype, index), resolution, defect), None


def _write_png(path: Path, img: np.ndarray, gray: bool) -> None:
    arr = img[..., 0] if gray else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"Could not write '{path}'.")


def write_product(out: Path, product: str, cfg: WorldConfig) -> int:
    cv2.setNumThreads(1)
    spec = PRODUCTS[product]
    pdir = out / product
    jobs = [("train", "good", cfg.n_train_good), ("test", "good", cfg.n_test_good)]
    jobs += [("test", t, cfg.n_per_type) for t in spec.defects]
    n = 0
    for split, atype, count in jobs:
        (pdir / split / atype).mkdir(parents=True, exist_ok=True)
        if atype != "good":
            (pdir / "ground_truth" / atype).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            r = render(product, sample_rng(cfg.seed, product, split, atype, i), cfg.resolution,
                       None if atype == "good" else atype)
            _write_png(pdir / split / atype / f"{i:03d}.png", r.image, spec.grayscale)
            if atype != "good":
                m = (r.mask.astype(np.uint8) * 255)
                if not cv2.imwrite(str(pdir / "ground_truth" / atype / f"{i:03d}_mask.png"), m):
                    raise OSError(f"Could not write mask for '{product}/{atype}/{i:03d}'.")
            n += 1
    return n


def _write_product_job(args) -> int:
    return write_product(*args)


def build_world(out_dir: str | Path, cfg: WorldConfig = WorldConfig(), workers: int | None = None,
                progress: bool = True) -> Path:
    """Write the world to ``out_dir`` in MVTec AD layout, atomically; a finished identical world is reused.

    The tree is written under ``<out_dir>.partial-<pid>`` and renamed into place when complete, so an
    interrupted build never leaves a half-written world behind.
    """
    out = Path(out_dir).expanduser()
    unknown = [p for p in cfg.products if p not in PRODUCTS]
    if unknown:
        raise ValueError(f"Unknown synthetic product(s) {unknown}. Available: {', '.join(PRODUCTS)}.")
    if cfg.resolution < 64:
        raise ValueError(f"resolution={cfg.resolution} is too small for thin defects; use 128 (default), 256, or at least 64.")
    meta = cfg.to_json()
    if out.exists():
        existing = out / "world.json"
        if existing.is_file() and json.loads(existing.read_text()) == meta:
            return out
        raise FileExistsError(
            f"'{out}' exists but is not this synthetic world (seed={cfg.seed}, resolution={cfg.resolution}). "
            f"Fix: choose another out_dir, or delete '{out}'."
        )
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        jobs = [(tmp, p, cfg) for p in cfg.products]
        workers = workers or min(len(jobs), os.cpu_count() or 1)
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="synthetic world", unit="product", disable=not progress)
        if workers > 1:
            with mp.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_product_job, jobs):
                    bar.update()
        else:
            for j in jobs:
                _write_product_job(j)
                bar.update()
        bar.close()
        (tmp / "world.json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class OracleSampler:
    """Unlimited extra real defects of a product, disjoint from the written test set (own seed stream).

    The downstream "oracle" arm trains on these in place of generated data: an upper bound for a generator.
    """

    def __init__(self, product: str, seed: int = 0, resolution: int = 128):
        if product not in PRODUCTS:
            raise ValueError(f"Unknown synthetic product '{product}'. Available: {', '.join(PRODUCTS)}.")
        self.product, self.seed, self.resolution = product, seed, resolution
        self.defects = PRODUCTS[product].defects

    def sample(self, anomaly_type: str, index: int) -> Rendered:
        return render(self.product, sample_rng(self.seed, self.product, "oracle", anomaly_type, index),
                      self.resolution, anomaly_type)

    def normal(self, index: int) -> Rendered:
        return render(self.product, sample_rng(self.seed, self.product, "oracle", "good", index), self.resolution)

    def iter(self, anomaly_type: str, n: int, start: int = 0) -> Iterator[Rendered]:
        for i in range(start, start + n):
            yield self.sample(anomaly_type, i)
