"""What a trained SeaS generator costs on disk: a full ``save_pretrained`` of every component (what runs stored before
slim checkpoints) against the slim checkpoint (core/models/slim.py), with the U-Net in full or as a float16
difference, and with the whole token table learning (the official code, ``embeddings=table``) or only the new rows
(the paper, ``embeddings=new``).

- ``mini``: real files. The shipped mini prior with SeaS's UA tokens added (4 types, 17 tokens) and every U-Net weight
  and embedding row moved a little (what fine-tuning does), saved each way; sizes are the bytes written.
- ``sd_v1``: SD v1-4's shapes (``architectures.sd_v1``, CLIP's 49408-token vocabulary) built on the meta device:
  sizes are the tensors' bytes as stored (float32, as the official training saves), without writing 4 GB.

    python benchmarks/checkpoint_sizes.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from core.models import add_placeholder_tokens, architecture, load_model
from core.models.slim import save_slim, weights_hash

N_TOKENS = 17          # <ob> + 4 types x 4 <df> tokens
SD_VOCAB = 49408


def _bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def mini_sizes() -> dict[str, int]:
    comp = load_model({"kind": "mini", "version": 2})
    base_table = comp.text_encoder.get_input_embeddings().weight.detach().clone()
    base_hash = weights_hash(comp)
    add_placeholder_tokens(comp.tokenizer, comp.text_encoder, [f"<t{i}>" for i in range(N_TOKENS)], "defect")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in comp.unet.parameters():
            p.add_(1e-4 * torch.randn(p.shape, generator=g))
    table = comp.text_encoder.get_input_embeddings().weight
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out["full save_pretrained (all components)"] = _bytes(comp.save(tmp / "full"))
        cfg = {"kind": "mini", "version": 2}
        out["slim, U-Net full, new rows only"] = _bytes(save_slim(comp, tmp / "a", cfg, base_hash, base_table))
        out["slim, U-Net diff float16, new rows only"] = _bytes(save_slim(comp, tmp / "b", cfg, base_hash,
                                                                          base_table, unet="diff"))
        with torch.no_grad():
            table[: base_table.shape[0]] += 1e-4  # the official whole-table training moves every row
        out["slim, U-Net full, whole table (official)"] = _bytes(save_slim(comp, tmp / "c", cfg, base_hash,
                                                                           base_table))
        out["slim, U-Net diff float16, whole table (official)"] = _bytes(save_slim(comp, tmp / "d", cfg, base_hash,
                                                                                   base_table, unet="diff"))
    return out


def sd_sizes() -> dict[str, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = architecture("sd_v1")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        text = CLIPTextModel(CLIPTextConfig(vocab_size=SD_VOCAB + N_TOKENS, **spec["text"]))
    nbytes = lambda m, size=4: sum(p.numel() for p in m.state_dict().values()) * size  # noqa: E731
    dim = spec["text"]["hidden_size"]
    table, new_rows = (SD_VOCAB + N_TOKENS) * dim * 4, N_TOKENS * dim * 4
    return {"full save_pretrained (all components)": nbytes(unet) + nbytes(vae) + nbytes(text),
            "slim, U-Net full, new rows only": nbytes(unet) + new_rows,
            "slim, U-Net diff float16, new rows only": nbytes(unet, 2) + new_rows,
            "slim, U-Net full, whole table (official)": nbytes(unet) + table,
            "slim, U-Net diff float16, whole table (official)": nbytes(unet, 2) + table}


def main() -> None:
    mini, sd = mini_sizes(), sd_sizes()
    print("| what is stored | mini prior (files written) | ratio | SD v1-4 (float32 tensors) | ratio |")
    print("|---|---|---|---|---|")
    m0, s0 = mini["full save_pretrained (all components)"], sd["full save_pretrained (all components)"]
    for k in mini:
        print(f"| {k} | {mini[k] / 2 ** 20:.2f} MiB | {mini[k] / m0:.2f} | {sd[k] / 2 ** 30:.2f} GiB | "
              f"{sd[k] / s0:.2f} |")


if __name__ == "__main__":
    main()
