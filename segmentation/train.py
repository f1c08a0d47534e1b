"""One training loop for every supervised downstream model (segmenters and classifiers).

- A fixed number of optimizer steps; the final weights are the result. No checkpoint is ever chosen on test data.
- Batches are a pure function of (seed, step): with ``anomaly_fraction`` f, round(f * B) items come from the
  anomaly pool and the rest from the normal pool (AnomalyDiffusion: half / half); with ``None`` items are drawn
  uniformly from the union (SeaS: one dataset of generated pairs + normal images).
- Resumable: ``checkpoint`` is rewritten atomically every ``checkpoint_every`` steps (model, optimizer, scheduler,
  step, losses; :class:`core.engine.Engine`); a rerun continues from it and reproduces the uninterrupted run exactly
  (dropout and augmentation draw from generators seeded per step).
- On the engine: ``mixed_precision`` and ``grad_clip``; under a multi-process launch the processes share each
  step's batch (the same global batch; BatchNorm statistics are then per process, as with plain DDP).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.engine import Engine, EngineSpec

from .data import ImagePool
from .unet import focal_loss


@dataclasses.dataclass
class TrainSpec:
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    optimizer: str = "adam"            # adam | adamw | sgd
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"         # constant | poly (power 0.9, MMSeg) | multistep (x0.2 at 80% and 90%, DRAEM) | step | cosine
    loss: str = "focal"                # focal | ce | ohem (LFD's OHEM cross-entropy, class weights 1 / 4)
    focal_gamma: float = 2.0
    aux_weight: float = 1.0            # weight of each auxiliary head's loss (BiSeNetV2 1.0, UPerNet 0.4)
    anomaly_fraction: float | None = 0.5
    augment: bool = True               # random flips and 90-degree rotations, applied to image and mask together
    checkpoint_every: int = 200
    seed: int = 0
    mixed_precision: str = "no"        # the engine (core/engine.py): no | bf16 | fp16 (GPU)
    grad_clip: float | None = None

    @classmethod
    def from_config(cls, node) -> "TrainSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(node).items() if k in fields})


def make_optimizer(model: nn.Module, spec: TrainSpec):
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "adam":
        opt = torch.optim.Adam(params, spec.lr, weight_decay=spec.weight_decay)
    elif spec.optimizer == "adamw":
        opt = torch.optim.AdamW(params, spec.lr, weight_decay=spec.weight_decay)
    elif spec.optimizer == "sgd":
        opt = torch.optim.SGD(params, spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    else:
        raise ValueError(f"Unknown optimizer '{spec.optimizer}': adam | adamw | sgd.")
    total = max(spec.steps, 1)
    if spec.schedule == "constant":
        fn = lambda s: 1.0  # noqa: E731
    elif spec.schedule == "poly":
        fn = lambda s: max(1 - s / total, 0.0) ** 0.9  # noqa: E731
    elif spec.schedule == "multistep":
        fn = lambda s: 0.2 ** ((s >= 0.8 * total) + (s >= 0.9 * total))  # noqa: E731
    elif spec.schedule == "step":     # x0.1 at 80 % of the run (MambaAD's official step decay)
        fn = lambda s: 0.1 ** (s >= 0.8 * total)  # noqa: E731
    elif spec.schedule == "cosine":   # CosineAnnealingLR to 0 over the run (VLAD)
        fn = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
    else:
        raise ValueError(f"Unknown schedule '{spec.schedule}': constant | poly | multistep | step | cosine.")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, fn)


def batch_indices(n_anomalies: int, n_normals: int, spec: TrainSpec, step: int) -> tuple[list[int], list[int]]:
    """(anomaly indices, normal indices) of step ``step``; deterministic in (seed, step)."""
    g = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
    B = spec.batch_size
    if spec.anomaly_fraction is None or n_anomalies == 0 or n_normals == 0:
        n = n_anomalies + n_normals
        picks = torch.randint(0, n, (B,), generator=g).tolist()
        return [i for i in picks if i < n_anomalies], [i - n_anomalies for i in picks if i >= n_anomalies]
    n_a = min(max(int(round(spec.anomaly_fraction * B)), 1), B - 1)
    return (torch.randint(0, n_anomalies, (n_a,), generator=g).tolist(),
            torch.randint(0, n_normals, (B - n_a,), generator=g).tolist())


def augment(x: torch.Tensor, m: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item random horizontal / vertical flips and 90-degree rotations (same for image and mask)."""
    xs, ms = [], []
    r = torch.rand(x.shape[0], 2, generator=g)
    k = torch.randint(0, 4, (x.shape[0],), generator=g)
    for i in range(x.shape[0]):
        xi, mi = x[i], m[i]
        if r[i, 0] < 0.5:
            xi, mi = xi.flip(-1), mi.flip(-1)
        if r[i, 1] < 0.5:
            xi, mi = xi.flip(-2), mi.flip(-2)
        xs.append(torch.rot90(xi, int(k[i]), (-2, -1)))
        ms.append(torch.rot90(mi, int(k[i]), (-2, -1)))
    return torch.stack(xs), torch.stack(ms)


def segmentation_loss(outputs, target: torch.Tensor, spec: TrainSpec) -> torch.Tensor:
    """Main head plus ``aux_weight`` x each auxiliary head; focal (gamma) or cross-entropy over 2 classes."""
    main, aux = (outputs if isinstance(outputs, tuple) else (outputs, []))
    t = target.long()

    def one(logits):
        if spec.loss == "ohem":   # LFD's official loss
            from .lfd import ohem_ce
            return ohem_ce(logits, t)
        return focal_loss(logits, t, spec.focal_gamma) if spec.loss == "focal" else F.cross_entropy(logits, t)

    return one(main) + spec.aux_weight * sum((one(a) for a in aux), torch.zeros(()))


StepFn = Callable[[nn.Module, dict], torch.Tensor]


def segmentation_step(model: nn.Module, batch: dict, spec: TrainSpec) -> torch.Tensor:
    return segmentation_loss(model(batch["image"]), batch["mask"], spec)


def train(model: nn.Module, anomalies: ImagePool, normals: ImagePool, spec: TrainSpec, checkpoint: str | Path | None,
          device: torch.device = torch.device("cpu"), desc: str = "train",
          loss_fn: Callable[[nn.Module, dict, TrainSpec], torch.Tensor] = segmentation_step,
          normalize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Train ``model`` for ``spec.steps`` steps; returns {"losses": [...], "resumed_from": step}. Batches are dicts
    with image (B,3,H,W), mask (B,H,W), label (B,), index (B,) and ``source`` (B,) 1 = anomaly pool."""
    if len(anomalies) + len(normals) == 0:
        raise ValueError(f"{desc}: nothing to train on (both pools are empty).")
    engine = Engine(EngineSpec.from_config(dataclasses.asdict(spec)), device)
    device = engine.device
    model.to(device).train()
    opt, sched = make_optimizer(model, spec)
    start, losses = 0, []
    checkpoint = Path(checkpoint) if checkpoint else None
    if checkpoint is not None and checkpoint.is_file():
        start, extra = engine.load(checkpoint, {"model": model}, {"optimizer": opt, "scheduler": sched}, desc)
        if extra.get("spec") != dataclasses.asdict(spec):
            raise ValueError(f"{checkpoint} was written with other training settings ({extra.get('spec')}). "
                             f"Fix: delete it to start over, or rerun with the settings it was written with.")
        losses = list(extra["losses"])
    mine = engine.mine(spec.batch_size, "images (train.batch_size)")
    bar = tqdm(range(start, spec.steps), desc=desc, initial=start, total=spec.steps, leave=False, dynamic_ncols=True,
               disable=not engine.is_main)
    for step in bar:
        # the whole batch from (seed, step), then this process's items of it (BatchNorm statistics stay per process)
        ia, inn = batch_indices(len(anomalies), len(normals), spec, step)
        parts = [anomalies.batch(ia)] if ia else []
        parts += [normals.batch(inn)] if inn else []
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        batch["source"] = torch.tensor([1] * len(ia) + [0] * len(inn))
        g = torch.Generator().manual_seed(spec.seed * 7_000_003 + step)
        if spec.augment:
            batch["image"], batch["mask"] = augment(batch["image"], batch["mask"], g)
        if normalize is not None:
            batch["image"] = normalize(batch["image"])
        batch = {k: v[mine.start:mine.stop].to(device) for k, v in batch.items()}
        torch.manual_seed(spec.seed * 9_000_011 + step)  # dropout
        with engine.autocast():
            loss = loss_fn(model, batch, spec)
        value = engine.reduce_mean(loss.item())
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss is {value} at step {step}; lower the learning rate.")
        engine.backward(loss, engine.world)   # the mean over this process's items; the processes' sum / world
        engine.step(opt, sched)
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        done = step + 1
        if checkpoint is not None and (done % spec.checkpoint_every == 0 or done == spec.steps):
            engine.save(checkpoint, done, {"model": model}, {"optimizer": opt, "scheduler": sched},
                        {"losses": losses, "spec": dataclasses.asdict(spec)})
    model.eval()
    return {"losses": losses, "resumed_from": start}


@torch.no_grad()
def predict_maps(model: nn.Module, pool: ImagePool, batch_size: int = 16, device: torch.device = torch.device("cpu"),
                 normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 desc: str = "predict") -> torch.Tensor:
    """Anomaly maps (N, H, W): softmax probability of class 1 of a 2-class segmenter, in eval mode."""
    model.to(device).eval()
    out = []
    for s in tqdm(range(0, len(pool), batch_size), desc=desc, leave=False, dynamic_ncols=True):
        x = pool.batch(range(s, min(s + batch_size, len(pool))))["image"]
        if normalize is not None:
            x = normalize(x)
        out.append(model(x.to(device)).softmax(1)[:, 1].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, pool.size, pool.size)
