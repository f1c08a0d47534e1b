"""Split protocols: which samples a method may train on and which it is tested on.

The papers differ, so the protocol is configuration (``split=<name>``):

- ``none``      the dataset's own split.
- ``one_third`` SeaS / AnomalyDiffusion: per product and anomaly type, the first max(floor(n/3), 1)
                images by file name train, the rest test.
- ``two_fold``  background-aware generation: per type, fold 0 trains on the first ceil(n/2) by file name and
                tests on the rest; fold 1 swaps the halves. Results are averaged over both folds.
- ``half``      DefectDiffu: per type, the first max(floor(n/2), 1) by file name train, the rest test.
- ``k_shot``    CUT: k normal training images per product drawn with ``seed``; no anomaly trains, all test.

In every protocol normal images keep the dataset's split (train/good trains, test/good tests,
validation stays validation), anomalies from the dataset's train split (VisA) join the pool that is
re-split, and train and test never share a file.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Sequence

import numpy as np

from .table import Sample

PROTOCOLS = ("none", "one_third", "two_fold", "half", "k_shot")


@dataclasses.dataclass
class Split:
    protocol: str
    train: list[Sample]
    test: list[Sample]
    validation: list[Sample]
    params: dict

    def parts(self) -> dict[str, list[Sample]]:
        return {"train": self.train, "test": self.test, "validation": self.validation}


def _anomalies_by_type(samples: Sequence[Sample]) -> dict[tuple[str, str], list[Sample]]:
    groups: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        if s.label == 1:
            groups[(s.product, s.anomaly_type)].append(s)
    return {k: sorted(v, key=lambda s: (s.name, s.path)) for k, v in groups.items()}


def _n_train(protocol: str, n: int, fold: int) -> tuple[int, int]:
    """Index range [start, stop) of a type's sorted anomalies that trains."""
    if protocol == "one_third":
        return 0, max(n // 3, 1)
    if protocol == "half":
        return 0, max(n // 2, 1)
    if protocol == "two_fold":
        first = math.ceil(n / 2)
        return (0, first) if fold == 0 else (first, n)
    raise AssertionError(protocol)


def apply_split(samples: Sequence[Sample], protocol: str = "none", fold: int = 0, k: int = 1, seed: int = 0) -> Split:
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown split protocol '{protocol}'. Available: {', '.join(PROTOCOLS)}.")
    if protocol == "two_fold" and fold not in (0, 1):
        raise ValueError(f"two_fold takes fold=0 or fold=1, got {fold}.")
    normals = [s for s in samples if s.label == 0]
    train = [s for s in normals if s.split == "train"]
    test = [s for s in normals if s.split == "test"]
    validation = [s for s in normals if s.split == "validation"]
    params = {"fold": fold} if protocol == "two_fold" else {"k": k, "seed": seed} if protocol == "k_shot" else {}

    if protocol == "none":
        anomalies = [s for s in samples if s.label == 1]
        return Split(protocol, train + [s for s in anomalies if s.split == "train"],
                     test + [s for s in anomalies if s.split == "test"],
                     validation + [s for s in anomalies if s.split == "validation"], params)

    if protocol == "k_shot":
        if k < 1:
            raise ValueError(f"k_shot needs k >= 1, got {k}.")
        shots: list[Sample] = []
        by_product: dict[str, list[Sample]] = defaultdict(list)
        for s in train:
            by_product[s.product].append(s)
        for product, pool in sorted(by_product.items()):
            pool = sorted(pool, key=lambda s: (s.name, s.path))
            if k > len(pool):
                raise ValueError(f"k_shot k={k} but product '{product}' has only {len(pool)} normal training images.")
            # a per-product stream so adding a product never changes another product's shots
            rng = np.random.default_rng([seed, sum(map(ord, product))])
            shots += [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]
        # no anomaly trains: every one tests, those of the dataset's train split (VisA) included
        anomalies = [s for s in samples if s.label == 1]
        return Split(protocol, shots, test + anomalies, validation, params)

    for (_, _), items in sorted(_anomalies_by_type(samples).items()):
        start, stop = _n_train(protocol, len(items), fold)
        train += items[start:stop]
        test += items[:start] + items[stop:]
    return Split(protocol, train, test, validation, params)
