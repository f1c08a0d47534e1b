"""Timing for the speed benchmarks (benchmarks/*_speed.py): each method is timed against a plain reference in the
same run, and the result is reported as a ratio, never asserted as a wall-clock limit."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """'cpu', or the GPU's name (e.g. 'NVIDIA H100 80GB HBM3')."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                   peak_gib: dict[str, float] | None = None) -> dict[str, float]:
    """Each function's median wall time over ``repeats`` rounds, after one warm-up call each. The rounds interleave
    the functions (a, b, a, b, ...), so that a slow phase of the machine hits all of them alike. With ``peak_gib``
    (a dict, filled in place) and a CUDA device: each function's peak allocated memory during its warm-up."""
    for k, f in fns.items():
        if peak_gib is not None and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        f()
        sync(device)
        if peak_gib is not None and device.type == "cuda":
            peak_gib[k] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            start = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


__all__ = ["device_name", "median_seconds", "sync"]
