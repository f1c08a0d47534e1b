"""The samples table every dataset module produces, its validation, and image/mask reading.

A dataset module turns a directory into a list of :class:`Sample` rows. Everything downstream
(split protocols, the torch Dataset, the inspector, the generators) speaks only this table, so a
new layout costs one loader function and nothing else.
"""
from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"


class DatasetError(ValueError):
    """A dataset tree does not match its expected layout. The message names the path and the fix."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One row of the samples table.

    split: the dataset's own split ("train", "validation", "test"); split protocols
    (``core.data.splits``) re-assign rows to train/test without changing this field.
    label: 0 normal, 1 anomalous. mask_paths: empty for normal images; several for LOCO
    (unioned with ``> 0`` when read).
    """

    path: str
    split: str
    product: str
    anomaly_type: str
    label: int
    mask_paths: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return Path(self.path).name

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mask_paths"] = list(self.mask_paths)
        return d


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by file name (the order every protocol uses)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def require_root(root: str | Path, layout_hint: str, config_key: str = "dataset.root") -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"Dataset root '{root}' does not exist or is not a directory.\n"
            f"Expected layout: {layout_hint}\n"
            f"Fix: download/extract the dataset there, or set {config_key}=<path to it>."
        )
    return root


def select_products(available: Sequence[str], requested: Iterable[str] | str | None, root: Path) -> list[str]:
    """Check requested products against what the tree holds; error lists the available ones."""
    available = sorted(available)
    if not available:
        raise DatasetError(f"No products found under '{root}'. Check that dataset.root points at the dataset's top folder.")
    if requested is None:
        return available
    if isinstance(requested, str):
        requested = [requested]
    requested = list(requested)
    unknown = [p for p in requested if p not in available]
    if unknown:
        raise DatasetError(
            f"Unknown product(s) {unknown} under '{root}'. Available: {', '.join(available)}.\n"
            f"Fix: set product=<one of these>."
        )
    return requested


def check_nonempty_type(folder: Path, images: list[Path]) -> None:
    if not images:
        raise DatasetError(
            f"Anomaly-type folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)}).\n"
            f"Fix: remove the empty folder or put its images back."
        )


def type_folders(product_dir: Path, splits: Sequence[str], image_subdir: str = "") -> Iterable[tuple[str, str, list[Path]]]:
    """(split, anomaly type, its images sorted by name) for each ``<product>/<split>/<type>[/<image_subdir>]``.

    An anomaly-type folder without images is an error (``check_nonempty_type``).
    """
    for split in splits:
        sdir = product_dir / split
        if not sdir.is_dir():
            continue
        for type_dir in sorted(d for d in sdir.iterdir() if d.is_dir()):
            folder = type_dir / image_subdir if image_subdir else type_dir
            images = list_images(folder)
            check_nonempty_type(folder, images)
            yield split, type_dir.name, images


# ----------------------------------------------------------------------------- reading


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3). Grayscale / palette / RGBA images become RGB."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"Cannot read image '{path}': {e}. Fix: replace the file with a valid image.") from e


def read_mask(paths: Sequence[str | Path], size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Union of the masks in ``paths`` binarised with ``> 0`` as a bool (H, W) array.

    ``> 0`` is every supported dataset's rule: MVTec masks hold 255, VisA masks hold defect-class
    ids 1..K, LOCO masks hold per-defect values from ``defects_config.json``. With no paths (a
    normal image) an all-False mask of ``size_hw`` is returned.
    """
    if not paths:
        if size_hw is None:
            raise ValueError("read_mask needs size_hw for a normal image (no mask paths).")
        return np.zeros(size_hw, dtype=bool)
    out = None
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                arr = np.asarray(im)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DatasetError(f"Cannot read mask '{p}': {e}. Fix: replace the file with a valid PNG mask.") from e
        if arr.ndim == 3:
            arr = arr.max(axis=2)
        m = arr > 0
        if out is None:
            out = m
        elif out.shape != m.shape:
            raise DatasetError(f"Masks of one image differ in size: '{paths[0]}' {out.shape} vs '{p}' {m.shape}.")
        else:
            out |= m
    return out


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height), checking that the file is an image that decodes: PIL's structural ``verify`` (chunks, CRCs)
    and then a full decode, since a file whose checksums are valid may still hold pixel data that does not decode
    (and would fail only when a training run reaches it)."""
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # structure and CRCs
        with Image.open(path) as im:  # verify() leaves the image unusable: open again to decode
            im.load()
        return size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"Cannot read image '{path}': {e}. Fix: replace the file with a valid image.") from e


# ----------------------------------------------------------------------------- validation


def validate_files(samples: Sequence[Sample], workers: int = 8) -> None:
    """Every image opens; every mask opens and has its image's size. Raises the first problem found.

    Every image and mask is decoded in full (threads), so a file that would fail mid-training fails here.
    """
    def check(s: Sample) -> None:
        size = image_size(s.path)
        for m in s.mask_paths:
            msize = image_size(m)
            if msize != size:
                raise DatasetError(
                    f"Mask '{m}' is {msize[0]}x{msize[1]} but its image '{s.path}' is {size[0]}x{size[1]}.\n"
                    f"Fix: masks must have the image's size; re-export the mask at the image resolution."
                )

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(check, samples):
            pass


def counts(samples: Iterable[Sample], split_of=lambda s: s.split) -> dict[str, dict[str, dict[str, int]]]:
    """{product: {split: {anomaly_type: count}}}, keys sorted."""
    c: dict = defaultdict(lambda: defaultdict(Counter))
    for s in samples:
        c[s.product][split_of(s)][s.anomaly_type] += 1
    return {p: {sp: dict(sorted(t.items())) for sp, t in sorted(v.items())} for p, v in sorted(c.items())}


def anomaly_types(samples: Iterable[Sample]) -> list[str]:
    """Sorted anomaly types present (normal 'good' excluded)."""
    return sorted({s.anomaly_type for s in samples if s.label == 1})


def require_masks(samples: Sequence[Sample], product: str, why: str) -> None:
    """Every anomalous sample must have a mask file: one error naming how many lack one, an example, and ``why`` the
    method needs them (methods that learn from image-mask pairs)."""
    unmasked = [s for s in samples if s.label == 1 and not s.mask_paths]
    if unmasked:
        raise DatasetError(f"{len(unmasked)} training anomalies of '{product}' have no mask (e.g. {unmasked[0].path}). "
                           f"{why}: use a dataset with pixel masks (ground_truth/<type>/<name>_mask.png).")


def given_mask_files(mask_dir, types: Sequence[str]) -> dict[str, list[Path]]:
    """``method.generate.masks=dir`` (AnomalyDiffusion, bgdefect): the PNG masks under ``<mask_dir>/<type>/`` for
    every type (any names; > 0 is the defect), one drawn per item. A missing folder or type is an error naming what to put where."""
    if not mask_dir:
        raise ValueError("method.generate.masks=dir needs method.generate.mask_dir=<a folder with one subfolder of "
                         "PNG masks per anomaly type>.")
    root = Path(str(mask_dir)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"method.generate.mask_dir={root} is not a folder. Expected <mask_dir>/<type>/*.png "
                                f"for the types {list(types)}.")
    files = {t: sorted((root / t).glob("*.png")) for t in types}
    missing = [t for t, f in files.items() if not f]
    if missing:
        raise FileNotFoundError(f"method.generate.mask_dir={root} has no PNG mask for type(s) {missing}. Expected "
                                f"<mask_dir>/<type>/*.png for each of {list(types)}.")
    return files


def screen_empty_masks(samples: Sequence[Sample], policy: str = "error", key: str = "empty_masks") -> list[Sample]:
    """The anomalous ``samples`` whose mask marks no pixel: an error by default (``policy='error'``), naming them and
    the fix; with ``policy='drop'`` they are left out with a warning. Normal samples pass through unread."""
    if policy not in ("error", "drop"):
        raise ValueError(f"{key} must be 'error' or 'drop', got '{policy}'.")
    empty = [s for s in samples if s.label == 1 and s.mask_paths and not read_mask(s.mask_paths).any()]
    if not empty:
        return list(samples)
    names = ", ".join(str(s.mask_paths[0]) for s in empty[:3]) + (", ..." if len(empty) > 3 else "")
    if policy == "error":
        raise DatasetError(f"{len(empty)} anomalous image(s) have an all-zero mask ({names}): they would teach that "
                           f"a defect has no pixels. Fix: repair those masks, or set {key}=drop to leave them out.")
    import warnings
    warnings.warn(f"{key}=drop: left out {len(empty)} anomalous image(s) with an all-zero mask ({names}).",
                  stacklevel=2)
    gone = {id(s) for s in empty}
    return [s for s in samples if id(s) not in gone]
