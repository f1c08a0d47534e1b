"""Slim checkpoints of a fine-tuned SD-class model: only what fine-tuning changed, the base model recorded by its
config (path) and a content hash.

A fine-tune of SD v1 (SeaS, and the methods after it) changes the U-Net and a few rows of the token-embedding table
and adds tokens to the tokenizer; the VAE, the rest of the text encoder and the scheduler are the base model's. A
full ``save_pretrained`` stores all of them again (about 4 GB per product at SD size). A slim directory holds:

- ``slim.json``: the format, the base model's config node (``model``: kind / path / ...), its content hash
  (:func:`weights_hash`) and vocabulary size, the tokens added (in id order), how the U-Net is stored;
- ``unet/``: the fine-tuned U-Net (``save_pretrained``, safetensors), or with ``unet="diff"`` only its config and
  ``unet_diff.safetensors``, the difference to the base U-Net in ``diff_dtype`` (float16 halves the size; the
  rounding error is that of the *difference*, a small fraction of the change);
- ``text_embeddings.safetensors``: the ids and values of every embedding row that differs from the base, the added
  tokens' rows always.

:func:`load_slim` loads the base model, refuses it if its hash differs from the recorded one (a moved base can be
given by a new config node; a different base cannot), re-adds the tokens, and puts the rows and the U-Net back.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from ..io import read_run_json, read_run_safetensors, replace_dir, write_json
from .loading import SDComponents, load_model

SLIM_FILE = "slim.json"
FORMAT = "toolkit-slim-v1"
UnetMode = Literal["full", "diff"]


class BaseModelMismatchError(ValueError):
    """The base model found for a slim checkpoint is not the one it was fine-tuned from."""


def weights_hash(comp: SDComponents) -> str:
    """sha256 over the U-Net, VAE and text-encoder tensors (names, shapes, values as float32) and the tokenizer's
    vocabulary: the same for one model however it is stored (float16 files load to the same hash)."""
    h = hashlib.sha256()
    for part, module in (("unet", comp.unet), ("vae", comp.vae), ("text_encoder", comp.text_encoder)):
        for name, v in sorted(module.state_dict().items()):
            t = v.detach().to("cpu")
            t = (t.float() if t.is_floating_point() else t).contiguous()
            h.update(f"{part}.{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    h.update(json.dumps(comp.tokenizer.get_vocab(), sort_keys=True).encode())
    return h.hexdigest()


def is_slim(path: str | Path) -> bool:
    return (Path(path) / SLIM_FILE).is_file()


def changed_rows(table: torch.Tensor, base_table: torch.Tensor) -> torch.Tensor:
    """Ids of the rows of ``table`` that differ from ``base_table`` (bitwise), plus every row past the base's end."""
    n = base_table.shape[0]
    differ = (table[:n] != base_table).any(dim=1).nonzero().flatten()
    return torch.cat([differ, torch.arange(n, table.shape[0])])


def save_slim(comp: SDComponents, out_dir: str | Path, base_model: dict, base_hash: str, base_table: torch.Tensor,
              unet: UnetMode = "full", diff_dtype: str = "float16", config: dict | None = None,
              extra: dict | None = None) -> Path:
    """Write ``comp``'s changes against its base (see the module docstring). ``base_table`` is the base model's
    token-embedding table (rows = the base vocabulary); ``base_model`` the config node that loads the base and
    ``base_hash`` its :func:`weights_hash`, both taken before fine-tuning. Written to ``<out_dir>.partial`` and
    renamed into place."""
    if unet not in ("full", "diff"):
        raise ValueError(f"unet must be 'full' or 'diff', got '{unet}'.")
    final = Path(out_dir)
    out = final.with_name(final.name + ".partial")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vocab = int(base_table.shape[0])
    tok = comp.tokenizer
    added = tok.convert_ids_to_tokens(list(range(vocab, len(tok))))
    table = comp.text_encoder.get_input_embeddings().weight.detach().cpu()
    ids = changed_rows(table, base_table.to(table.device, table.dtype))
    save_file({"ids": ids.to(torch.int64), "rows": table[ids].contiguous()}, str(out / "text_embeddings.safetensors"))
    if unet == "full":
        comp.unet.save_pretrained(out / "unet")
    else:
        base = load_base(base_model, base_hash, what=str(final))
        dtype = getattr(torch, diff_dtype)
        trained = comp.unet.state_dict()
        diff = {k: (v.detach().cpu().float() - base.unet.state_dict()[k].float()).to(dtype).contiguous()
                for k, v in trained.items()}
        comp.unet.save_config(out / "unet")
        save_file(diff, str(out / "unet" / "unet_diff.safetensors"))
    meta = {"format": FORMAT, "base": {"model": base_model, "sha256": base_hash, "vocab_size": vocab},
            "added_tokens": added, "unet": unet, "diff_dtype": diff_dtype if unet == "diff" else None,
            "embedding_rows": int(ids.numel()), "resolution": comp.resolution, **(extra or {})}
    write_json(out / SLIM_FILE, meta)
    if config is not None:
        from omegaconf import OmegaConf
        OmegaConf.save(OmegaConf.create(config), out / "config.yaml")
    return replace_dir(out, final)


def load_base(base_model: Any, expected_hash: str, what: str) -> SDComponents:
    """The base model of a slim checkpoint, refused unless its :func:`weights_hash` is ``expected_hash``."""
    comp = load_model(base_model)
    found = weights_hash(comp)
    if found != expected_hash:
        get = base_model.get if hasattr(base_model, "get") else (lambda k, d=None: d)
        where = get("path", None) or f"model kind '{get('kind', '?')}'"
        raise BaseModelMismatchError(
            f"{what} was fine-tuned from a base model with content hash {expected_hash[:16]}..., but the base model "
            f"loaded from {where} hashes to {found[:16]}...: it is another model (or other weights under the same "
            f"path). Fix: point model.path (or model=...) to the exact base the run was trained from, or retrain "
            f"this run on the new base.")
    return comp


def load_slim(path: str | Path, base_model: Any = None, device: torch.device | str = "cpu") -> SDComponents:
    """Rebuild a fine-tuned model from its slim directory and its base (``base_model``: a config node that loads the
    base, e.g. when it moved; default: the one recorded). Raises :class:`BaseModelMismatchError` for another base."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    fix = (f"restore {path} from a copy of the run, or train again into a new folder; the files of a slim checkpoint "
           f"are written together and cannot be mixed with another run's.")
    meta = read_run_json(path / SLIM_FILE, "the slim checkpoint's record", fix)
    found = meta.get("format") if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
    if found != FORMAT:
        raise ValueError(f"{path / SLIM_FILE} is not a slim checkpoint of this toolkit (format {found!r}, expected "
                         f"{FORMAT!r}). Fix: {fix}")
    base_cfg = base_model if base_model is not None else meta["base"]["model"]
    comp = load_base(base_cfg, meta["base"]["sha256"], what=str(path))
    tok, vocab, added = comp.tokenizer, int(meta["base"]["vocab_size"]), list(meta["added_tokens"])
    if len(tok) != vocab:
        raise BaseModelMismatchError(f"The base tokenizer has {len(tok)} tokens; {path} expects {vocab}.")
    if added:
        tok.add_tokens(added)
        if tok.convert_tokens_to_ids(added) != list(range(vocab, vocab + len(added))):
            raise BaseModelMismatchError(f"The tokens of {path} did not get their recorded ids in the base tokenizer.")
        comp.text_encoder.resize_token_embeddings(len(tok))
    emb_path = path / "text_embeddings.safetensors"
    emb = read_run_safetensors(emb_path, "the fine-tuned text-embedding rows", fix)
    with torch.no_grad():
        table = comp.text_encoder.get_input_embeddings().weight
        if set(emb) != {"ids", "rows"} or emb["rows"].ndim != 2 or emb["rows"].shape[1] != table.shape[1] \
                or emb["ids"].shape[0] != emb["rows"].shape[0] \
                or (emb["ids"].numel() and int(emb["ids"].max()) >= table.shape[0]):
            raise ValueError(f"{emb_path} does not hold text-embedding rows of this base model (width "
                             f"{table.shape[1]}, {table.shape[0]} tokens). Fix: {fix}")
        table[emb["ids"]] = emb["rows"].to(table.dtype)
    if meta["unet"] == "full":
        try:
            comp.unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True,
                                                             torch_dtype=comp.unet.dtype)
        except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
            raise ValueError(f"Could not load the fine-tuned U-Net from {path / 'unet'} ({str(e)[:200]}). "
                             f"Fix: {fix}") from None
    else:
        diff_path = path / "unet" / "unet_diff.safetensors"
        diff = read_run_safetensors(diff_path, "the fine-tuned U-Net's difference to its base", fix)
        base = comp.unet.state_dict()
        if set(diff) != set(base) or any(diff[k].shape != v.shape for k, v in base.items()):
            raise ValueError(f"{diff_path} does not hold a U-Net difference for this base model (other names or "
                             f"shapes). Fix: {fix}")
        state = {k: (v.float() + diff[k].float()).to(v.dtype) for k, v in base.items()}
        comp.unet.load_state_dict(state)
    comp.resolution = int(meta.get("resolution") or comp.resolution)
    comp.source = {"kind": "slim", "path": str(path), "base": meta["base"]}
    return comp.to(device)


__all__ = ["BaseModelMismatchError", "FORMAT", "SLIM_FILE", "changed_rows", "is_slim", "load_base", "load_slim",
           "save_slim", "weights_hash"]
