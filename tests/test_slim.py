"""Slim checkpoints (core/models/slim.py): only what fine-tuning changed, rebuilt on a base whose hash must match."""
import json

import pytest
import torch

from core.models import add_placeholder_tokens, build_random, load_diffusers_dir
from core.models.slim import BaseModelMismatchError, changed_rows, load_slim, save_slim, weights_hash

TINY = {"kind": "tiny", "seed": 0}


def _finetuned():
    """The tiny model with two added tokens, a changed U-Net and two changed old embedding rows."""
    comp = build_random("tiny")
    base_table = comp.text_encoder.get_input_embeddings().weight.detach().clone()
    base_hash = weights_hash(comp)
    add_placeholder_tokens(comp.tokenizer, comp.text_encoder, ["<a1>", "<a2>"], "defect")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in comp.unet.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
        table = comp.text_encoder.get_input_embeddings().weight
        table[[5, 17]] += 0.5
        table[-1] += 0.25
    return comp, base_table, base_hash


def test_changed_rows_by_hand():
    base = torch.zeros(4, 3)
    table = torch.zeros(6, 3)
    table[2, 1] = 1.0        # one changed old row
    table[4:] = 0.0          # added rows count even when they equal zero
    assert changed_rows(table, base).tolist() == [2, 4, 5]


def test_weights_hash_is_storage_independent_and_sees_one_value(tmp_path):
    comp = build_random("tiny")
    h = weights_hash(comp)
    comp.save(tmp_path / "m")
    assert weights_hash(load_diffusers_dir(tmp_path / "m")) == h
    half = build_random("tiny")
    half.unet.half()
    assert weights_hash(half) != h  # float16 weights are other values
    with torch.no_grad():
        next(comp.vae.parameters()).view(-1)[0] += 1e-6
    assert weights_hash(comp) != h
    other = build_random("tiny")
    other.tokenizer.add_tokens(["<x>"])
    assert weights_hash(other) != h  # the vocabulary counts


def test_slim_round_trip_is_bitwise_and_stores_only_the_changes(tmp_path):
    comp, base_table, base_hash = _finetuned()
    save_slim(comp, tmp_path / "gen", TINY, base_hash, base_table, config={"note": "x"})
    meta = json.loads((tmp_path / "gen" / "slim.json").read_text())
    assert meta["added_tokens"] == ["<a1>", "<a2>"] and meta["embedding_rows"] == 4  # rows 5, 17 + two new
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["config.yaml", "slim.json",
                                                                    "text_embeddings.safetensors", "unet"]
    loaded = load_slim(tmp_path / "gen")
    for k, v in comp.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v), k
    for k, v in comp.text_encoder.state_dict().items():
        assert torch.equal(loaded.text_encoder.state_dict()[k], v), k
    for k, v in comp.vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[k], v), k
    assert loaded.tokenizer.convert_tokens_to_ids(["<a1>", "<a2>"]) == \
        comp.tokenizer.convert_tokens_to_ids(["<a1>", "<a2>"])
    full = tmp_path / "full"
    comp.save(full)
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    assert size(tmp_path / "gen") < size(full) - sum(f.stat().st_size for f in (full / "vae").rglob("*"))


def test_unet_diff_is_float16_and_reloads_close(tmp_path):
    comp, base_table, base_hash = _finetuned()
    save_slim(comp, tmp_path / "gen", TINY, base_hash, base_table, unet="diff")
    from safetensors.torch import load_file
    diff = load_file(str(tmp_path / "gen" / "unet" / "unet_diff.safetensors"))
    assert {v.dtype for v in diff.values()} == {torch.float16}
    base = build_random("tiny").unet.state_dict()
    k = next(iter(diff))
    torch.testing.assert_close(diff[k].float(), comp.unet.state_dict()[k] - base[k], atol=1e-6, rtol=2 ** -10)
    loaded = load_slim(tmp_path / "gen")
    for k, v in comp.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[k], v, atol=5e-6, rtol=0)


def test_another_base_is_refused_with_the_fix(tmp_path):
    comp, base_table, base_hash = _finetuned()
    save_slim(comp, tmp_path / "gen", TINY, base_hash, base_table)
    with pytest.raises(BaseModelMismatchError, match="fine-tuned from a base model with content hash") as e:
        load_slim(tmp_path / "gen", {"kind": "tiny", "seed": 1})
    assert "model.path" in str(e.value) and str(tmp_path / "gen") in str(e.value)
    assert not (tmp_path / "gen.partial").exists()


def test_weights_hash_is_the_documented_digest_of_names_shapes_values_and_vocabulary():
    """The hash is stored in slim checkpoints, so its format must not drift: recomputed here from its description."""
    import hashlib
    import json

    comp = build_random("tiny", seed=0)
    h = hashlib.sha256()
    for part in ("unet", "vae", "text_encoder"):
        for name, v in sorted(getattr(comp, part).state_dict().items()):
            t = v.detach().float() if v.is_floating_point() else v.detach()
            h.update(f"{part}.{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(comp.tokenizer.get_vocab(), sort_keys=True).encode())
    assert weights_hash(comp) == h.hexdigest()
    with torch.no_grad():
        comp.vae.decoder.conv_out.bias[0] += 1e-3
    assert weights_hash(comp) != h.hexdigest()
