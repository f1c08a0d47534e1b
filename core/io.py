"""Atomic writes: a file appears complete or not at all (temporary name in the same folder, then rename)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` then rename ``tmp`` to ``path``; the temporary file is removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2))


def torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda p: torch.save(obj, p))


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Put the finished directory ``tmp`` at ``final``; an existing ``final`` is moved aside first and removed only
    after the swap, so a reader never finds a half-written directory there."""
    import os
    import shutil

    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final
