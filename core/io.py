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


# ----------------------------------------------------------------------------- reading a run's files
# A run directory's files are written atomically, but they can still be truncated or replaced by hand (a copy cut
# short, a file of another run or network): each reader names the file and the fix instead of a library traceback.

def _read_run_file(path: str | Path, what: str, fix: str, parse: Callable[[Path], Any], errors: tuple,
                   kind: str) -> Any:
    """``parse(path)``; a missing file, or one of ``errors`` while parsing, is one error naming the file, ``what`` it
    holds and ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing ({what}). Fix: {fix}")
    try:
        return parse(path)
    except errors as e:
        detail = " ".join(str(e).split())[:160]   # one line, whatever the parser printed
        raise ValueError(f"{path} is not {kind} ({what}; {type(e).__name__}: {detail}). Fix: {fix}") from None


def read_run_json(path: str | Path, what: str, fix: str) -> Any:
    """``path`` parsed as JSON (a missing or unparsable file: one error naming it)."""
    return _read_run_file(path, what, fix, lambda p: json.loads(p.read_text()),
                          (UnicodeDecodeError, json.JSONDecodeError), "valid JSON")


def read_run_yaml(path: str | Path, what: str, fix: str):
    """``path`` loaded with OmegaConf as a mapping (a missing or unparsable file: one error naming it)."""
    import yaml
    from omegaconf import OmegaConf

    def parse(p: Path):
        conf = OmegaConf.load(p)
        if not hasattr(conf, "keys"):
            raise ValueError("not a mapping")
        return conf
    return _read_run_file(path, what, fix, parse, (UnicodeDecodeError, yaml.YAMLError, ValueError),
                          "a valid YAML config")


def read_run_safetensors(path: str | Path, what: str, fix: str) -> dict:
    """The tensors of a ``.safetensors`` file (a missing, truncated or non-safetensors file: one error naming it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    return _read_run_file(path, what, fix, lambda p: load_file(str(p)), (SafetensorError, OSError),
                          "a readable safetensors file")


def load_weights(module, state: dict, path: str | Path, what: str, fix: str) -> None:
    """``module.load_state_dict(state)`` (strict); weights of another network (other names or shapes) are one error
    naming the file, not PyTorch's list of every mismatched key."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)[:200]
        raise ValueError(f"{path} does not hold the weights of {what} ({first.strip()}). Fix: {fix}") from None
