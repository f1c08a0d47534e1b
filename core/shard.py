"""Which share of an item list this process generates, when a script runs as N processes.

``torchrun --nproc_per_node N scripts/generate.py ...`` (CPU or GPU) or ``accelerate launch --num_processes N
scripts/generate.py ...`` (GPUs) start N copies of a script; they find each other through the launcher's environment
(``WORLD_SIZE`` > 1). :func:`current_shard` gives each its index, the count, its device (GPU k for process k, else
the configured one) and a barrier. One process (no launcher) is shard 0 of 1 and its barrier does nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass
class Shard:
    index: int = 0
    count: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    barrier: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def take(self, units: Sequence[T]) -> list[T]:
        """This process's units: every ``count``-th from ``index`` (round robin, so shards stay balanced)."""
        return list(units[self.index::self.count])


def current_shard(device: torch.device) -> Shard:
    """This process's shard; ``device`` is the configured one (each process of a GPU launch gets its own GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard(device=device)
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    return Shard(state.process_index, state.num_processes, state.device if device.type != "cpu" else device,
                 state.wait_for_everyone)


__all__ = ["Shard", "current_shard"]
