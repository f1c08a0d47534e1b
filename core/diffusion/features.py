"""Intermediate block outputs of a forward pass (SeaS's mask branch reads U-Net and VAE-decoder up-blocks)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch


@contextmanager
def capture_outputs(model: torch.nn.Module, names: Sequence[str], detach: bool = True
                    ) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks on the submodules ``names``; the yielded dict holds each one's latest output.

    Hooks are removed on exit, also after an exception.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        children = [n for n, _ in model.named_children()]
        raise KeyError(f"No submodule(s) {missing} in {type(model).__name__} (top-level children: {children}).")
    found: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fn(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            found[name] = out.detach() if detach else out
        return fn

    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(hook(n)))
        yield found
    finally:
        for h in handles:
            h.remove()


def unet_up_blocks(unet: torch.nn.Module, indices: Sequence[int] | None = None) -> list[str]:
    """Names of U-Net decoder blocks: ``up_blocks.i`` (all if ``indices`` is None)."""
    n = len(unet.up_blocks)
    return [f"up_blocks.{i}" for i in (range(n) if indices is None else indices)]


def vae_decoder_up_blocks(vae: torch.nn.Module, indices: Sequence[int] | None = None) -> list[str]:
    """Names of VAE decoder blocks: ``decoder.up_blocks.i`` (all if ``indices`` is None)."""
    n = len(vae.decoder.up_blocks)
    return [f"decoder.up_blocks.{i}" for i in (range(n) if indices is None else indices)]
