"""What the three entry scripts do, as plain functions the tests call (the scripts only add Hydra)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from .data import DatasetError
from .io import read_run_json, read_run_yaml, write_json, write_text
from .registry import get_method, load_method

CHECKPOINT_KEYS = ("method", "model", "dataset", "split", "product", "seed")
IDENTITY = "identity.json"
# keys that do not change what a run computes, so a rerun may change them: where it runs, and whether a downstream
# run keeps its per-unit checkpoints
VOLATILE_KEYS = ("device", "keep_checkpoints")
# settings added after runs had recorded identities, each with the value that reproduces what runs did before the key
# existed: a run recorded without the key resumes when the key has that value (and is refused with any other)
ADDED_KEYS: dict[str, Any] = {
    "config.alignment_reference": "source",  # eval_generation, 2026-12-06: alignment against the source image
    "config.generated_types": "dataset",     # eval_downstream / eval_generation, 2026-12-06: the dataset's types
}


class RunIdentityError(ValueError):
    """A rerun into an existing run directory whose result would be defined differently."""


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def files_identity(root: str | Path, paths: Iterable[str | Path]) -> str:
    """A short hash of the files' names (relative to ``root``) and sizes: what a dataset or generated folder holds
    (cheap: no file is read)."""
    root, h = Path(root), hashlib.sha256()
    for p in sorted(str(Path(p)) for p in paths):
        rel = os.path.relpath(p, root)
        h.update(f"{rel}\t{os.path.getsize(p) if os.path.exists(p) else -1}\n".encode())
    return h.hexdigest()[:16]


def check_run_identity(run_dir: Path, cfg: DictConfig, extra: dict | None = None, what: str = "run") -> str:
    """Refuse a rerun into ``run_dir`` whose result would be defined differently; else record the identity.

    The identity is the resolved config without :data:`VOLATILE_KEYS` (and without ``hydra``), plus ``extra``
    (content identities: a checkpoint's, a generated folder's, a dataset's). The first run writes it to
    ``<run_dir>/identity.json``; a rerun with another identity raises :class:`RunIdentityError` naming the keys that
    differ, before anything is written. A key of :data:`ADDED_KEYS` that the record lacks counts as equal when it has
    the value that reproduces the recorded run. Returns the identity's hash."""
    conf = OmegaConf.to_container(cfg, resolve=True)
    for k in (*VOLATILE_KEYS, "hydra"):
        conf.pop(k, None)
    defined = {"config": conf, **({"inputs": extra} if extra else {})}
    digest = hashlib.sha256(json.dumps(defined, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(run_dir) / IDENTITY
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise RunIdentityError(f"{path} is corrupt (not JSON). Fix: restore it, or use a new run directory.") \
                from None
        if old.get("hash") != digest:
            a, b = _flat(old.get("defined_by", {})), _flat(defined)
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>")
                          and not (k not in a and k in ADDED_KEYS and b.get(k) == ADDED_KEYS[k]))
            if not diff:  # only keys added since, each at the value that reproduces the recorded run
                return digest
            shown = "; ".join(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in diff[:4])
            more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
            raise RunIdentityError(f"{run_dir} holds a {what} defined differently: {shown}{more}. Nothing was "
                                   f"changed. Fix: use a new run directory (hydra.run.dir=...), or rerun with the "
                                   f"recorded settings to resume it.")
        return digest
    write_json(path, {"hash": digest, "defined_by": defined})
    return digest


def run_identity(run_dir: str | Path) -> str:
    """The identity hash a training run recorded (runs from before identities: a hash of its config.yaml)."""
    path = Path(run_dir) / IDENTITY
    if path.is_file():
        record = read_run_json(path, "the run's identity", f"restore it from a copy of the run, or delete {path} "
                               f"to treat the run as one from before identities (its config.yaml's hash).")
        if not isinstance(record, dict) or "hash" not in record:
            raise ValueError(f"{path} holds no identity hash. Fix: restore it from a copy of the run, or delete it.")
        return str(record["hash"])
    config = Path(run_dir) / "config.yaml"
    return hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else "unknown"


def resolve_device(name: str) -> torch.device:
    """``device=auto|cpu|cuda|cuda:<i>|mps``, checked against this machine."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={name} is not a device name. Fix: device=auto (a GPU if there is one), cpu, cuda "
                         f"or cuda:<index>.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}: this machine has no usable CUDA GPU. Fix: device=cpu or device=auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name}: there are {torch.cuda.device_count()} GPU(s). Fix: device=cuda:0.")
    return device


def item_generator(seed: int, *parts: Any) -> torch.Generator:
    """Per-item randomness of a generation run, a pure function of ``seed`` and the item's name (``parts``, joined
    with "/"): an item's result does not depend on batching, on sharding, or on which items a resumed run still has
    to make."""
    key = "/".join(str(p) for p in (seed, *parts)).encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:7], "little"))


def positive_int(value: Any, key: str, maximum: int | None = None) -> int:
    """A config value that must be a whole number >= 1 (and <= ``maximum``), or a one-line error naming ``key``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, str))
    try:
        number = float(value) if ok else float("nan")
    except ValueError:
        number = float("nan")
    if not (number == number and number.is_integer() and number >= 1):
        raise ValueError(f"{key}={value!r} must be a whole number >= 1. Fix: {key}=<count>, e.g. {key}=100.")
    if maximum is not None and number > maximum:
        raise ValueError(f"{key}={value!r} is more than {maximum}. Fix: a smaller {key} (split a larger job with a "
                         f"sweep or several out_dirs).")
    return int(number)


def check_common(cfg: DictConfig) -> None:
    """The keys every entry script reads, checked where they are read: seed, device and the generation counts."""
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a whole number >= 0. Fix: seed=0.")
    resolve_device(str(cfg.get("device", "auto")))
    if cfg.get("n_per_type") is not None:
        positive_int(cfg.n_per_type, "n_per_type", maximum=100_000)


def resolve_product(cfg: DictConfig) -> str:
    """``cfg.product``, which must be set for real datasets (the synthetic world defaults to its first held-out one)."""
    product = cfg.get("product")
    if product in (None, "", "???"):
        raise DatasetError(f"product=<name> is required for dataset '{cfg.dataset.name}' (for example product=bottle).")
    return str(product)


def save_config(cfg: DictConfig, run_dir: Path, name: str = "config.yaml") -> Path:
    """The resolved config beside the run's outputs (atomic)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_text(run_dir / name, OmegaConf.to_yaml(cfg, resolve=True))


def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Check the method and product, save the resolved config in ``run_dir``, run the method's ``train``."""
    get_method(cfg.method.name)
    resolve_product(cfg)
    check_common(cfg)
    fn = load_method(cfg.method.name, "train")
    run_dir = shared_run_dir(cfg, run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        check_run_identity(run_dir, cfg, what="training run")  # before config.yaml: a refused rerun changes nothing
        save_config(cfg, run_dir)
    return fn(cfg, run_dir)


def shared_run_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """Under a multi-process launch every process takes process 0's run directory (Hydra's default one carries a
    timestamp, which the processes may read a second apart)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Path(run_dir)
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    PartialState(cpu=resolve_device(str(cfg.device)).type == "cpu")
    return Path(broadcast_object_list([str(run_dir)])[0])


def merge_checkpoint_config(cfg: DictConfig, checkpoint: Path, overrides: Sequence[str]) -> DictConfig:
    """Take method / model / dataset / split / product / seed from ``<checkpoint>/config.yaml`` unless the command line
    chose them (``overrides`` as Hydra records them).

    A choice of another config group (``method=cut`` for a SeaS run) or another value (``product=pill``) replaces the
    run's node. Overrides inside a node (``method.generate.guidance=4``), or a group choice naming the run's own
    (``method=anomalydiffusion`` for an AnomalyDiffusion run, which generate.py adds so that Hydra can compose that
    method's keys), keep the run's node and apply those keys on top of it."""
    path = checkpoint / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint={checkpoint} has no config.yaml: pass the run directory that "
                                f"scripts/train.py wrote (hydra.run.dir of the training run).")
    trained = read_run_yaml(path, "the training run's resolved config",
                            f"restore it from a copy of the run, or train again into a new folder.")
    chosen: dict[str, str] = {}          # key -> value of a whole-node override ("method=seas", "product=pill")
    inside: dict[str, list[str]] = {}    # key -> dotted paths set inside the node ("method.generate.guidance")
    for o in overrides:
        if o.startswith("~"):
            continue
        name, _, value = o.lstrip("+").partition("=")
        top = name.split(".")[0]
        if "." in name:
            inside.setdefault(top, []).append(name)
        else:
            chosen[top] = value
    merged = cfg.copy()
    with open_dict(merged):
        for key in CHECKPOINT_KEYS:
            if key not in trained:
                continue
            node = trained[key]
            if key in chosen:
                own = OmegaConf.select(node, "name") if OmegaConf.is_config(node) else None
                if own is None or str(own) != chosen[key]:
                    continue           # another choice: the command line's node
            if OmegaConf.is_config(node):
                node = node.copy()
                for dotted in inside.get(key, []):
                    OmegaConf.update(node, dotted.split(".", 1)[1], OmegaConf.select(cfg, dotted), force_add=True)
            elif key in inside:
                continue
            merged[key] = node
    return merged


def method_of_checkpoint(argv: Sequence[str]) -> str | None:
    """The method name recorded by the run that ``checkpoint=`` on the command line names (None if there is none, or
    ``method=`` is given, or the file cannot be read: the normal checks report that later)."""
    values = {a.lstrip("+").partition("=")[0]: a.partition("=")[2] for a in argv if "=" in a}
    path = values.get("checkpoint", "").strip().strip("'\"")
    if not path or "method" in values or "${" in path:
        return None
    try:
        conf = OmegaConf.load(Path(path).expanduser() / "config.yaml")
        name = OmegaConf.select(conf, "method.name")
    except Exception:  # noqa: BLE001 -- any unreadable file is reported by generate() with its fix
        return None
    return str(name) if name else None


def generate(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = ()) -> Path:
    checkpoint = Path(cfg.checkpoint).expanduser() if cfg.get("checkpoint") else None
    if checkpoint is not None:
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint={checkpoint} is not a directory: pass the run directory of train.py.")
        cfg = merge_checkpoint_config(cfg, checkpoint, overrides)
        run_cfg = read_run_yaml(checkpoint / "config.yaml", "the training run's resolved config",
                                "restore it from a copy of the run, or train again into a new folder.")
        trained = run_cfg.get("product")
        # a method that fits one model to several products (method.products, e.g. AnomalyDiffusion) generates any
        # of them; the others, only the run's product
        several = [str(p) for p in ((run_cfg.get("method") or {}).get("products") or [])]
        if several and str(cfg.get("product")) not in several:
            raise DatasetError(f"checkpoint={checkpoint} was trained on products {several}, not "
                               f"'{cfg.get('product')}'. Fix: product=<one of them>, or pass a run trained on "
                               f"'{cfg.get('product')}'.")
        if not several and trained is not None and str(cfg.get("product")) != str(trained):
            raise DatasetError(f"checkpoint={checkpoint} was trained on product '{trained}', not "
                               f"'{cfg.get('product')}'. Fix: drop product= (it comes from the checkpoint), or pass "
                               f"a run trained on '{cfg.get('product')}'.")
    get_method(cfg.method.name)
    resolve_product(cfg)
    check_common(cfg)
    fn = load_method(cfg.method.name, "generate")
    if int(os.environ.get("RANK", "0")) == 0:  # one process of a sharded launch claims the folder
        from .export import claim_output_dir
        claim_output_dir(out_dir)  # before anything is written there: a folder the toolkit did not make is refused
    out = fn(cfg, checkpoint, out_dir)
    if int(os.environ.get("RANK", "0")) == 0:  # after the run: a refused or failed generation changes no config file
        save_config(cfg, out_dir, f"generate_config.{cfg.product}.yaml")  # one per product of the folder
    return out
