"""A torch Dataset over a samples table with paired transforms.

The same geometric transform is applied to the image, its mask and (optionally) a paired normal
image, so a defect and its mask stay aligned. Masks are resized with nearest neighbour and stay in
{0, 1}; images are float in [0, 1] (methods rescale to [-1, 1] where their model expects it).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .table import Sample, read_image, read_mask


@dataclasses.dataclass
class PairedTransform:
    """Resize, then optional random flips and rotations by multiples of 90 degrees (SeaS's augmentation)."""

    size: int | tuple[int, int] | None = None
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False

    def sample_params(self, g: torch.Generator) -> dict:
        r = torch.rand(2, generator=g)
        return {"h": self.hflip and bool(r[0] < 0.5), "v": self.vflip and bool(r[1] < 0.5),
                "k": int(torch.randint(0, 4, (1,), generator=g)) if self.rot90 else 0}

    def resize(self, x: torch.Tensor, is_mask: bool) -> torch.Tensor:
        if self.size is None:
            return x
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if tuple(x.shape[-2:]) == size:
            return x
        if is_mask:
            return F.interpolate(x[None], size=size, mode="nearest")[0]
        return F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)

    def geometric(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        if p["h"]:
            x = x.flip(-1)
        if p["v"]:
            x = x.flip(-2)
        if p["k"]:
            x = torch.rot90(x, p["k"], dims=(-2, -1))
        return x

    def __call__(self, tensors: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
        p = self.sample_params(g)
        return {k: self.geometric(self.resize(v, k == "mask"), p) for k, v in tensors.items()}


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


class AnomalyDataset(Dataset):
    """Items: ``image`` (3,H,W) in [0,1], ``mask`` (1,H,W) in {0,1}, ``label``, ``anomaly_type``, ``path``,
    and ``normal`` (3,H,W) when ``paired_normals`` is given (the i-th item is paired with
    ``paired_normals[i % len]``, the same transform applied).

    Augmentation randomness comes from ``seed`` and the index, so an epoch is reproducible and
    independent of worker count.
    """

    def __init__(self, samples: Sequence[Sample], transform: PairedTransform | None = None,
                 paired_normals: Sequence[Sample] | None = None, seed: int = 0,
                 image_loader: Callable[[str], np.ndarray] = read_image):
        self.samples = list(samples)
        self.transform = transform or PairedTransform()
        self.paired_normals = list(paired_normals) if paired_normals else None
        self.seed = seed
        self.epoch = 0
        self.image_loader = image_loader

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        img = self.image_loader(s.path)
        mask = read_mask(s.mask_paths, img.shape[:2])
        t = {"image": to_tensor(img), "mask": torch.from_numpy(mask)[None].float()}
        if self.paired_normals:
            t["normal"] = to_tensor(self.image_loader(self.paired_normals[i % len(self.paired_normals)].path))
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
        t = self.transform(t, g)
        t["mask"] = (t["mask"] > 0.5).float()
        return {**t, "label": s.label, "anomaly_type": s.anomaly_type, "path": s.path}
