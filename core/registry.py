"""The methods the three scripts can run: one explicit dict, imported lazily (no import side effects).

A method package exposes, in ``<package>/method.py``:

    train(cfg: DictConfig, run_dir: Path) -> Path            # writes its checkpoint into run_dir, returns it
    generate(cfg: DictConfig, checkpoint: Path | None, out_dir: Path) -> Path   # MVTec-layout tree + manifest
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Callable


@dataclass(frozen=True)
class Method:
    name: str
    module: str
    paper: str


METHODS: dict[str, Method] = {
    "seas": Method("seas", "seas.method", "SeaS (Dai et al.)"),
    "anomalydiffusion": Method("anomalydiffusion", "anomalydiffusion.method", "AnomalyDiffusion (Hu et al., AAAI 2024)"),
    "bgdefect": Method("bgdefect", "bgdefect.method", "Background-Aware Defect Generation"),
    "defectdiffu": Method("defectdiffu", "defectdiffu.method", "DefectDiffu (Shi et al.)"),
    "cut": Method("cut", "cut.method", "CUT (training-free)"),
}


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class MethodNotImplementedError(NotImplementedError):
    """The method is registered but its package does not provide train/generate yet."""


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UnknownMethodError(f"Unknown method '{name}'. Available: {', '.join(METHODS)} (method=<name>).")
    return METHODS[name]


def load_method(name: str, entry: str) -> Callable:
    """The function ``entry`` ('train' or 'generate') of method ``name``."""
    m = get_method(name)
    try:
        module: ModuleType = importlib.import_module(m.module)
    except ModuleNotFoundError as e:
        if e.name != m.module:
            raise
        raise MethodNotImplementedError(
            f"Method '{name}' ({m.paper}) is registered, but {m.module.replace('.', '/')}.py does not exist yet: "
            f"its implementation is an open issue of the tracker. Implemented so far: "
            f"{', '.join(implemented()) or 'none'}.") from None
    fn = getattr(module, entry, None)
    if fn is None:
        raise MethodNotImplementedError(f"{m.module} has no '{entry}' function.")
    return fn


def implemented() -> list[str]:
    """Registered methods whose ``method.py`` exists."""
    found = []
    for n, m in METHODS.items():
        try:
            if importlib.util.find_spec(m.module) is not None:
                found.append(n)
        except ModuleNotFoundError:  # the package itself is missing
            pass
    return found
