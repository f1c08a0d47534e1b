"""The training engine every training loop of the toolkit runs on (SeaS, the mini-prior pretraining, the downstream
segmenters): ``accelerate`` for precision, devices and processes; the toolkit's own rules for batches and
checkpoints.

- **Mixed precision** (``mixed_precision: no | fp16 | bf16``): the forward passes run under autocast, the weights and the optimizer stay float32. bf16 works on the CPU too; fp16 needs a GPU and brings
  accelerate's gradient scaler (unscaled before clipping, skipped steps on overflow). On a CPU, fp16 is refused
  (accelerate would silently run float32).
- **Gradient accumulation and data parallel**: a loop defines its global batch as ``units`` micro-batches (or
  items), each a pure function of (seed, step, unit); :meth:`Engine.mine` gives this process its share. Each
  process accumulates the gradient of ``sum(loss_u) / units`` over its units, and :meth:`Engine.step` sums the
  gradients over processes (one all-reduce of flat buckets, after the last micro-batch: what DDP's ``no_sync`` +
  final sync computes). N processes therefore take the optimizer step one process takes on the same global batch,
  up to the order of floating-point sums. The models are not wrapped in DDP because the toolkit calls them through
  their own interfaces (attention processors, ``.config``), which a wrapper would hide.
- **Clipping** (``grad_clip``: max global L2 norm, null = off) after unscaling; optional 8-bit AdamW
  (:func:`make_adamw`).
- **Memory savers**: ``gradient_checkpointing`` (diffusers' U-Net recomputes its blocks in backward). Attention is
  SDPA everywhere (diffusers' default processor) except in layers a method captures, which compute it explicitly
  (:func:`core.diffusion.attention_control`); no xformers.
- **Checkpoints** (:meth:`Engine.save` / :meth:`Engine.load`): model and tensor states, optimizers, LR schedulers,
  the gradient scaler, the step, the RNG states and a loop's extras, in one ``torch.save`` file written atomically by
  the main process and read back with ``weights_only=True`` (tensors and plain containers only, so loading runs no
  pickled code). A kill at any point then a rerun reaches the uninterrupted run's weights bit for bit (one process).

Launch N processes with ``accelerate launch --num_processes N`` (GPUs) or ``torchrun --nproc_per_node N`` (CPU or
GPU); one process needs no launcher.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .io import torch_save

PRECISIONS = ("no", "fp16", "bf16")
_BUCKET = 1 << 24   # elements per all-reduce bucket (64 MiB of float32)
INFERENCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_dtype(name: str, device: torch.device | str, key: str = "method.generate.dtype") -> torch.dtype:
    """The weight dtype of a sampling run (``fp32`` | ``bf16`` | ``fp16``). fp16 is refused on a CPU, where its
    convolutions are slow or missing; bf16 runs everywhere."""
    if str(name) not in INFERENCE_DTYPES:
        raise ValueError(f"{key} must be one of {sorted(INFERENCE_DTYPES)}, got '{name}'.")
    if str(name) == "fp16" and torch.device(device).type == "cpu":
        raise ValueError(f"{key}=fp16 needs a GPU; on a CPU use bf16 or fp32.")
    return INFERENCE_DTYPES[str(name)]


@dataclass
class EngineSpec:
    mixed_precision: str = "no"          # no | fp16 | bf16
    grad_clip: float | None = None       # max global gradient L2 norm; None: no clipping
    gradient_checkpointing: bool = False

    @classmethod
    def from_config(cls, node: Mapping | None) -> "EngineSpec":
        """The engine keys of a training config node (``method.train``, ``unet``, a downstream ``train``)."""
        node = dict(node or {})
        spec = cls(**{f.name: node[f.name] for f in fields(cls) if node.get(f.name) is not None})
        if spec.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got '{spec.mixed_precision}'.")
        if spec.grad_clip is not None and not float(spec.grad_clip) > 0:
            raise ValueError(f"grad_clip must be a positive number or null, got {spec.grad_clip}.")
        return spec


def _accelerator(mixed_precision: str, cpu: bool):
    """An ``accelerate.Accelerator`` with this precision. accelerate keeps one precision per process and refuses a
    second Accelerator with another; a toolkit process may train in bf16 and then evaluate in float32, so the
    precision part of its shared state (not the process group) is reset first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and (shared.get("_mixed_precision") != mixed_precision or shared.get("_cpu") != cpu):
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


class Engine:
    """One training loop's precision, processes, optimizer step and checkpoints (see the module docstring)."""

    def __init__(self, spec: EngineSpec | None = None, device: torch.device | str = "cpu"):
        self.spec = spec or EngineSpec()
        device = torch.device(device)
        cpu = device.type == "cpu"
        if self.spec.mixed_precision == "fp16" and cpu:
            raise ValueError("mixed_precision=fp16 needs a GPU (autocast to float16 and a gradient scaler); on a CPU "
                             "use bf16 or no.")
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = _accelerator(self.spec.mixed_precision, cpu)
        # one process keeps the configured device (e.g. cuda:1); a launch gives process k its own GPU
        self.device = self.accelerator.device if (self.distributed and not cpu) else device
        self.scaler = self.accelerator.scaler

    # ------------------------------------------------------------------------------------------ processes
    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.distributed else 0

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.distributed else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()

    def mine(self, units: int, what: str = "units") -> range:
        """This process's share of a global batch of ``units`` micro-batches (or items): a contiguous block, the
        same size on every process. ``units`` must be a multiple of the process count."""
        if units % self.world:
            raise ValueError(f"The global batch has {units} {what}, which {self.world} processes cannot share "
                             f"equally. Fix: make it a multiple of {self.world} (or launch a divisor of {units} "
                             f"processes).")
        k = units // self.world
        return range(self.rank * k, (self.rank + 1) * k)

    # ------------------------------------------------------------------------------------------ precision
    def autocast(self):
        """The forward passes' context (mixed precision; nothing in float32)."""
        if self.spec.mixed_precision == "no":
            return contextlib.nullcontext()
        # torch.autocast with this engine's own dtype: accelerate's autocast() reads the process-wide state, which a
        # later Engine with another precision resets
        dtype = torch.bfloat16 if self.spec.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def prepare_unet(self, unet: torch.nn.Module, captured: Iterable[str] = ()) -> torch.nn.Module:
        """Apply the memory savers to a diffusers U-Net. Gradient checkpointing skips every block that holds one of
        the ``captured`` attention layers: their capture processors are installed only during the forward pass, so a
        recomputation in backward would run another processor."""
        if self.spec.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            modules = dict(unet.named_modules())
            for name in captured:
                parts = name.split(".")
                for i in range(len(parts) + 1):
                    m = modules.get(".".join(parts[:i]))
                    if m is not None and m is not unet and getattr(m, "gradient_checkpointing", None) is True:
                        m.gradient_checkpointing = False
        return unet

    # ------------------------------------------------------------------------------------------ step
    def backward(self, loss: torch.Tensor, units: int) -> None:
        """Backward of ``loss / units`` (a micro-batch's share of the global mean), scaled under fp16."""
        loss = loss / units
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, scheduler=None) -> float | None:
        """Sum the gradients over processes, unscale, clip, step (skipped by the scaler on overflow), zero them.
        Returns the gradient norm before clipping when clipping is on."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.distributed:
            self._all_reduce([p.grad for p in params if p.grad is not None])
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = None
        if self.spec.grad_clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                                        float(self.spec.grad_clip)))
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    @staticmethod
    def _all_reduce(grads: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        for dtype in sorted({g.dtype for g in grads}, key=str):
            group = [g for g in grads if g.dtype == dtype]
            i = 0
            while i < len(group):
                bucket, n = [], 0
                while i < len(group) and (not bucket or n + group[i].numel() <= _BUCKET):
                    bucket.append(group[i])
                    n += group[i].numel()
                    i += 1
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat)
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(part.view_as(g))

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Average a module's floating-point buffers (BatchNorm's running statistics) over processes, so that every
        process keeps statistics of all the global batch's micro-batches. They are not one process's statistics:
        that one moves them once per micro-batch, N processes once per update each (N times fewer momentum steps,
        which matters early in training only). Integer buffers (BatchNorm's batch count, which only momentum=None
        reads) stay per process."""
        if not self.distributed:
            return
        import torch.distributed as dist

        floats = [b for b in module.buffers() if b.dtype.is_floating_point]
        if floats:
            flat = torch.cat([b.reshape(-1) for b in floats])
            dist.all_reduce(flat)
            flat /= self.world
            for b, part in zip(floats, flat.split([b.numel() for b in floats])):
                b.copy_(part.view_as(b))

    def reduce_mean(self, value: float) -> float:
        """A logged number averaged over processes (every process gets the same)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        import torch.distributed as dist

        dist.all_reduce(t)
        return float(t) / self.world

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, step: int, modules: Mapping[str, Any] = (), optimizers: Mapping[str, Any] = (),
             extra: Mapping[str, Any] | None = None) -> None:
        """Write the training state atomically (main process only; the others wait). ``modules``: modules (their
        state dicts), tensors or dicts of tensors; ``optimizers``: anything with ``state_dict`` (optimizers, LR
        schedulers); ``extra``: plain data (numbers, strings, lists, dicts, tensors)."""
        if self.is_main:
            state = {"step": int(step), "rng": _rng_state(),
                     "modules": {k: _state_of(v) for k, v in dict(modules).items()},
                     "optimizers": {k: o.state_dict() for k, o in dict(optimizers).items()},
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                     "extra": dict(extra or {})}
            torch_save(state, path)
        self.barrier()

    def load(self, path: str | Path, modules: Mapping[str, Any] = (), optimizers: Mapping[str, Any] = (),
             what: str = "training") -> tuple[int, dict]:
        """Restore what :meth:`save` wrote into ``modules`` / ``optimizers`` (in place); returns (step, extra).
        A file from another configuration or a damaged one gets an error that names it and says what to do."""
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for k, m in dict(modules).items():
                _load_into(m, state["modules"][k])
            for k, o in dict(optimizers).items():
                o.load_state_dict(state["optimizers"][k])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
        except (RuntimeError, KeyError, EOFError, OSError, ValueError, TypeError, pickle.UnpicklingError) as e:
            why = ("it holds more than tensors and plain containers, which a weights_only load refuses"
                   if isinstance(e, pickle.UnpicklingError) or "Weights only" in str(e) else str(e).splitlines()[0])
            raise RuntimeError(f"Cannot resume {what} from {path}: {why}. The file is from another configuration, an "
                               f"older version of the toolkit or damaged; delete it to start this stage afresh.") from e
        return int(state["step"]), dict(state.get("extra") or {})


def _state_of(v: Any) -> Any:
    if isinstance(v, torch.nn.Module):
        return v.state_dict()
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().clone()
    if isinstance(v, Mapping):
        return {k: t.detach().cpu().clone() for k, t in v.items()}
    raise TypeError(f"Cannot checkpoint a {type(v).__name__}; pass a module, a tensor or a dict of tensors.")


def _load_into(m: Any, saved: Any) -> None:
    if isinstance(m, torch.nn.Module):
        m.load_state_dict(saved)
    elif isinstance(m, torch.Tensor):
        if m.shape != saved.shape:
            raise ValueError(f"a tensor of shape {tuple(saved.shape)} where {tuple(m.shape)} was expected")
        with torch.no_grad():
            m.copy_(saved)
    elif isinstance(m, dict):
        if set(m) != set(saved):
            raise ValueError(f"saved keys {sorted(saved)[:5]}... differ from the expected {sorted(m)[:5]}...")
        for k in m:
            m[k].copy_(saved[k])
    else:
        raise TypeError(f"Cannot restore into a {type(m).__name__}.")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def make_adamw(params: Iterable, kind: str = "adamw", weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """AdamW (``adamw``) or bitsandbytes' 8-bit AdamW (``adamw8bit``, CUDA only)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, weight_decay=weight_decay)
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); use "
                              "optimizer=adamw otherwise.") from None
        return bnb.optim.AdamW8bit(params, weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer '{kind}'. Use adamw or adamw8bit.")


__all__ = ["Engine", "EngineSpec", "INFERENCE_DTYPES", "PRECISIONS", "inference_dtype", "make_adamw"]
