"""The generated-dataset writer: an MVTec-layout tree plus ``manifest.jsonl``, atomic and resumable (DESIGN §5).

Layout under ``root``::

    <product>/test/<type>/<index:04d>.png                 generated anomaly
    <product>/ground_truth/<type>/<index:04d>_mask.png    its mask (0 / 255, the image's size)
    <product>/train/good/<index:04d>.png                  generated normal image
    manifest.jsonl                                        one JSON record per finished item

An item is finished when its manifest record exists: the mask and the image are written first (each to a temporary
name, then renamed), the record last. On opening, files without a record (left by a killed run) are removed and a
torn last manifest line is dropped, so a rerun continues exactly where the previous one stopped and the tree never
holds a half-written file or an image without its mask. A rerun with a different generation config refuses to mix
the two in one folder.

Sharded (N processes, :mod:`core.shard`): process k appends its records to ``manifest.shard<k>.jsonl`` (no two
processes write one file), shard 0 repairs the folder before the others open it, and :meth:`GeneratedWriter.finalize`
(shard 0, after all are done) merges every record into ``manifest.jsonl`` in one canonical order: the product's
anomalies by type and index, then its normals by index. A one-process run ends with the same order, so the tree and
manifest of N processes equal one process's byte for byte; a killed shard's records count as done on the rerun.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data import DatasetError
from .io import atomic_write

MANIFEST = "manifest.jsonl"


def config_hash(config: Any) -> str:
    """A short stable hash of a JSON-serialisable generation config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def shard_manifests(root: str | Path) -> list[Path]:
    """Per-shard manifests left by a sharded run that has not been finalised (killed, or still running)."""
    return sorted(Path(root).glob("manifest.shard*.jsonl"), key=lambda p: int(p.stem.split("shard")[-1]))


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def read_manifest(root: str | Path) -> list[dict]:
    """The records of ``root/manifest.jsonl`` and of any unmerged shard manifests (a torn last line, from a killed
    run, is ignored)."""
    return [r for path in (Path(root) / MANIFEST, *shard_manifests(root)) for r in _read_records(path)]


@contextlib.contextmanager
def manifest_lock(root: Path):
    """An exclusive lock on the folder's manifests (``.manifest.lock``): appends and the final merge (a read and a
    rewrite) never interleave, also when runs of several products write into one folder at once."""
    import fcntl

    with open(Path(root) / ".manifest.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _item_key(r: dict) -> tuple:
    return r.get("product"), r["kind"], r.get("anomaly_type"), int(r["index"])


def _save_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda p: Image.fromarray(array).save(p, format="PNG"))


class GeneratedWriter:
    """Writes one product's generated anomalies (with masks) and normals into ``root``; see the module docstring.

    ``method``, ``checkpoint`` and ``seed`` go into every record; ``config`` (the generation settings that determine
    the images) is hashed, and an existing folder made with another hash is refused.
    """

    def __init__(self, root: str | Path, product: str, method: str, config: Any, checkpoint: str | None = None,
                 seed: int = 0, shard: int = 0, shards: int = 1):
        self.root, self.product, self.method = Path(root), product, method
        self.checkpoint, self.seed = checkpoint, seed
        self.hash = config_hash(config)
        self.manifest = self.root / (MANIFEST if shards == 1 else f"manifest.shard{shard}.jsonl")
        self.root.mkdir(parents=True, exist_ok=True)
        if shard == 0:  # the others open after shard 0's repair (a barrier in the caller): nobody deletes another's work
            with manifest_lock(self.root):
                for path in (self.root / MANIFEST, *shard_manifests(self.root)):
                    self._repair_manifest(path)
        mine = [r for r in read_manifest(self.root) if r.get("product") == product]
        other = sorted({r.get("config_hash") for r in mine} - {self.hash})
        if other:
            raise DatasetError(
                f"{self.root}/{product} was generated with another configuration (config hash {other[0]}, now "
                f"{self.hash}). Fix: choose a new out_dir, or delete {self.root / product} and its lines in "
                f"{self.root / MANIFEST} to regenerate.")
        self.finished = {(r["kind"], r.get("anomaly_type"), int(r["index"])) for r in mine}
        if shard == 0:
            self._remove_orphans(mine)

    # -------------------------------------------------------------------------------------------------- paths
    def anomaly_paths(self, anomaly_type: str, index: int) -> tuple[Path, Path]:
        base = self.root / self.product
        return (base / "test" / anomaly_type / f"{index:04d}.png",
                base / "ground_truth" / anomaly_type / f"{index:04d}_mask.png")

    def normal_path(self, index: int) -> Path:
        return self.root / self.product / "train" / "good" / f"{index:04d}.png"

    def is_done(self, anomaly_type: str | None, index: int) -> bool:
        """Whether the anomaly ``(anomaly_type, index)`` (or normal ``index`` for ``None``) is already written."""
        return ("normal" if anomaly_type is None else "anomaly", anomaly_type, index) in self.finished

    # ------------------------------------------------------------------------------------------------- writes
    def write_anomaly(self, anomaly_type: str, index: int, image: np.ndarray, mask: np.ndarray, **meta) -> None:
        """``image`` (H, W, 3) uint8, ``mask`` (H, W) bool / {0, 1} of the same size."""
        image, mask = np.asarray(image), np.asarray(mask)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}.")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}.")
        img_path, mask_path = self.anomaly_paths(anomaly_type, index)
        _save_png(mask_path, (mask > 0).astype(np.uint8) * 255)
        _save_png(img_path, image)
        self._record("anomaly", anomaly_type, index, img_path, mask_path, meta)

    def write_normal(self, index: int, image: np.ndarray, **meta) -> None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}.")
        path = self.normal_path(index)
        _save_png(path, image)
        self._record("normal", None, index, path, None, meta)

    def _record(self, kind: str, anomaly_type: str | None, index: int, image: Path, mask: Path | None,
                meta: dict) -> None:
        rec = {"method": self.method, "product": self.product, "kind": kind, "anomaly_type": anomaly_type,
               "index": index, "image": str(image.relative_to(self.root)),
               "mask": None if mask is None else str(mask.relative_to(self.root)),
               "checkpoint": self.checkpoint, "seed": self.seed, "config_hash": self.hash, **meta}
        line = json.dumps(rec, default=str) + "\n"
        with manifest_lock(self.root):
            fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        self.finished.add((kind, anomaly_type, index))

    def finalize(self) -> bool:
        """Merge the shard manifests into ``manifest.jsonl``, this product's records in canonical order (anomalies by
        type and index, then normals by index) after the other products' in theirs. Call once, from shard 0, after
        every shard has finished. Returns whether the manifest changed (False: nothing was written since)."""
        with manifest_lock(self.root):  # other products' runs may append to the same folder meanwhile
            return self._merge()

    def _merge(self) -> bool:
        seen, others, mine = set(), [], []
        for r in read_manifest(self.root):
            if _item_key(r) in seen:
                continue
            seen.add(_item_key(r))
            (mine if r.get("product") == self.product else others).append(r)
        mine.sort(key=lambda r: (r["kind"] != "anomaly", r.get("anomaly_type") or "", int(r["index"])))
        text = "".join(json.dumps(r, default=str) + "\n" for r in others + mine)
        path = self.root / MANIFEST
        shard_files = shard_manifests(self.root)
        if not shard_files and path.is_file() and path.read_text() == text:
            return False
        atomic_write(path, lambda p: p.write_text(text))
        for shard_file in shard_files:
            shard_file.unlink()
        return True

    # ------------------------------------------------------------------------------------------------ repairs
    def _repair_manifest(self, path: Path) -> None:
        if not path.is_file():
            return
        text = path.read_text()
        good = sum(len(line) + 1 for line in text.splitlines()[:len(_read_records(path))])
        if good < len(text):  # a torn or unparsable tail (killed mid-write): cut it off
            atomic_write(path, lambda p: p.write_text(text[:good]))

    def _remove_orphans(self, records: list[dict]) -> None:
        kept = {self.root / r["image"] for r in records} | {self.root / r["mask"] for r in records if r.get("mask")}
        base = self.root / self.product
        for sub in ("test", "ground_truth", "train"):
            for f in (base / sub).rglob("*") if (base / sub).is_dir() else []:
                if f.is_file() and (f.suffix == ".png" or ".tmp-" in f.name) and f not in kept:
                    f.unlink()


__all__ = ["GeneratedWriter", "MANIFEST", "config_hash", "read_manifest", "shard_manifests"]
