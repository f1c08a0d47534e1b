"""Model loading: the locally built tokenizer, placeholder tokens, save/load round trip, clear errors, the prior."""
import json
from pathlib import Path

import pytest
import torch

from core.models import (MINI_PRIOR_DIR, ModelNotFoundError, add_placeholder_tokens, build_random, build_tokenizer,
                         load_model)
from core.models.tokenizer import DEFAULT_WORDS


def test_every_toolkit_word_is_one_token_and_any_text_encodes():
    tok = build_tokenizer()
    assert all(len(tok.tokenize(w)) == 1 for w in DEFAULT_WORDS)
    ids = tok("a photo of a xylophone 42!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]  # byte-level: unseen words split into known pieces
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a xylophone 4 2 !"


def test_placeholder_tokens_are_added_embedded_and_initialised(tiny):
    comp = build_random("tiny", seed=1)
    tok, enc = comp.tokenizer, comp.text_encoder
    n = len(tok)
    ids = add_placeholder_tokens(tok, enc, ["ob1", "sks1", "sks2"], init_word="defect")
    assert ids == [n, n + 1, n + 2]
    assert tok.tokenize("a ob1 with sks1 sks2") == ["a</w>", "ob1", "with</w>", "sks1", "sks2"]
    table = enc.get_input_embeddings().weight
    assert table.shape[0] == n + 3
    defect = tok.convert_tokens_to_ids("defect</w>")
    torch.testing.assert_close(table[ids], table[defect].expand(3, -1))
    # the new row is really used: changing it changes the encoding of a prompt that contains it
    with torch.no_grad():
        before = comp.encode_prompt(["a sks1"])
        table[ids[1]] += 1.0
        after = comp.encode_prompt(["a sks1"])
    assert not torch.allclose(before, after)
    with pytest.raises(ValueError, match="already in the vocabulary"):
        add_placeholder_tokens(tok, enc, ["sks1"])


def test_saved_tiny_pipeline_round_trips_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    comp = build_random("tiny", seed=3)
    add_placeholder_tokens(comp.tokenizer, comp.text_encoder, ["sks1"], init_word="object")
    out = comp.save(tmp_path / "model", config={"method": "test", "lr": 1e-4})
    assert not (tmp_path / "model.partial").exists()
    for sub in ("unet", "vae", "text_encoder"):
        assert list((out / sub).glob("*.safetensors")), sub
    assert (out / "config.yaml").read_text().startswith("method: test")
    assert json.loads((out / "toolkit.json").read_text())["resolution"] == 64
    loaded = load_model({"kind": "diffusers", "path": str(out)})
    assert loaded.resolution == comp.resolution and loaded.latent_size == comp.latent_size
    assert loaded.tokenizer.tokenize("a sks1") == comp.tokenizer.tokenize("a sks1")
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        for m in (comp, loaded):
            m.unet.eval(), m.vae.eval(), m.text_encoder.eval()
        ctx_a, ctx_b = comp.encode_prompt(["a sks1"]), loaded.encode_prompt(["a sks1"])
        torch.testing.assert_close(ctx_a, ctx_b)
        torch.testing.assert_close(comp.unet(z, 10, ctx_a).sample, loaded.unet(z, 10, ctx_b).sample)
        torch.testing.assert_close(comp.decode_latents(z), loaded.decode_latents(z))
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
    again = loaded.save(tmp_path / "again")   # a model loaded from a path and saved must not record that path
    for sub in ("unet", "vae", "text_encoder"):
        assert str(out) not in (again / sub / "config.json").read_text(), sub


def test_saving_over_an_existing_model_replaces_it_whole(tmp_path):
    a, b = build_random("tiny", seed=0), build_random("tiny", seed=1)
    a.save(tmp_path / "m")
    b.save(tmp_path / "m")
    loaded = load_model({"kind": "diffusers", "path": str(tmp_path / "m")})
    torch.testing.assert_close(loaded.unet.conv_in.weight, b.unet.conv_in.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_missing_or_wrong_paths_say_what_to_download_and_which_key(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"model.path") as e:
        load_model({"kind": "diffusers", "name": "sd15", "path": None,
                    "download": "stable-diffusion-v1-5/stable-diffusion-v1-5"})
    assert "stable-diffusion-v1-5" in str(e.value)
    with pytest.raises(ModelNotFoundError, match="not found at") as e:
        load_model({"kind": "diffusers", "path": str(tmp_path / "nope"), "download": "CompVis/stable-diffusion-v1-4"})
    assert "CompVis/stable-diffusion-v1-4" in str(e.value) and "model_index.json" in str(e.value)
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="missing subfolder"):
        load_model({"kind": "diffusers", "path": str(tmp_path / "half")})
    with pytest.raises(ModelNotFoundError, match="config_dir"):
        load_model({"kind": "single_file", "path": str(tmp_path / "x.ckpt")})
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_model({"kind": "single_file", "path": str(tmp_path / "x.ckpt"), "config_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="tiny, mini, diffusers, single_file"):
        load_model({"kind": "hub"})


def test_shipped_mini_prior_loads_offline_and_denoises():
    """The prior in the repository loads without network and knows its world: its noise prediction beats the
    trivial predictor on a noised render of a pretraining product."""
    from core.data.synthetic import render, sample_rng

    comp = load_model({"kind": "mini"})
    assert comp.resolution == 128 and comp.latent_size == 32
    assert all(p.dtype == torch.float32 for p in comp.unet.parameters())
    img = render("screw", sample_rng(123, "screw", "test", "good", 0), 128).image
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        z0 = comp.encode_images(x)
        rec = comp.decode_latents(z0)
        assert ((rec - x) ** 2).mean() < 0.01
        g = torch.Generator().manual_seed(0)
        eps = torch.randn(z0.shape, generator=g)
        t = torch.tensor(400)
        zt = comp.scheduler.add_noise(z0, eps, t)
        pred = comp.unet(zt, t, comp.encode_prompt(["a photo of a screw"])).sample
    assert ((pred - eps) ** 2).mean() < 0.5 * (eps ** 2).mean()


def test_mini_v1_stays_loadable_by_name_for_comparison():
    """model=mini_v1 loads the first prior (shipped in core/models/mini_prior_v1), a different model from v2."""
    from hydra import compose, initialize_config_dir

    from core.models.loading import MINI_PRIOR_DIRS

    with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=mini_v1"])
    v1 = load_model(cfg.model)
    assert v1.source["path"] == str(MINI_PRIOR_DIRS[1]) and v1.resolution == 128
    v2 = load_model({"kind": "mini"})
    assert v2.source["path"] == str(MINI_PRIOR_DIRS[2])
    assert not torch.equal(v1.unet.conv_in.weight, v2.unet.conv_in.weight)
    with pytest.raises(ValueError, match="Unknown mini prior version 7"):
        load_model({"kind": "mini", "version": 7})


@pytest.mark.parametrize("part", ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                                  "vae/diffusion_pytorch_model.safetensors"])
def test_a_truncated_weight_file_is_one_error_naming_the_model(tmp_path, part):
    """A weight file cut short (a copy interrupted) is a ModelNotFoundError naming the folder, not a library traceback."""
    build_random("tiny", seed=0).save(tmp_path / "m")
    f = tmp_path / "m" / part
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(ModelNotFoundError, match=f"Could not load .* from '{tmp_path / 'm'}'"):
        load_model({"kind": "diffusers", "path": str(tmp_path / "m")})


def test_a_saved_model_is_a_diffusers_pipeline_directory_and_reloads_in_the_asked_dtype(tmp_path):
    import json

    from diffusers import StableDiffusionPipeline

    from core.models import ModelNotFoundError, build_random, load_diffusers_dir
    comp = build_random("tiny", seed=0)
    out = tmp_path / "model"
    stale = tmp_path / "model.partial"
    (stale / "junk").mkdir(parents=True)                     # a save interrupted earlier: replaced, not merged
    comp.save(out, config={"a": 1})
    assert not stale.exists() and not (out / "junk").exists()
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for name in ("unet", "vae", "text_encoder"):
        assert "_name_or_path" not in json.loads((out / name / "config.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, safety_checker=None)
    assert torch.equal(pipe.unet.conv_in.weight, comp.unet.conv_in.weight)
    assert pipe.scheduler.config.num_train_timesteps == comp.scheduler.config.num_train_timesteps
    again = load_diffusers_dir(out)
    assert again.unet.dtype == torch.float32 and again.resolution == comp.resolution
    assert again.scheduler.config.beta_schedule == comp.scheduler.config.beta_schedule
    half = load_diffusers_dir(out, dtype=torch.bfloat16)
    assert {half.unet.dtype, half.vae.dtype, half.text_encoder.dtype} == {torch.bfloat16}
    (out / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelNotFoundError, match=r"Could not load my prior from '.*model': .*set my\.key\."):
        load_diffusers_dir(out, what="my prior", key="my.key")


def test_tokenize_pads_and_truncates_every_prompt_to_the_model_length():
    from core.models import build_tokenizer
    from core.models.tokenizer import tokenize
    tok = build_tokenizer()
    long = " ".join(["bottle"] * (tok.model_max_length + 20))
    ids = tokenize(tok, ["a bottle", "", long])
    assert ids.shape == (3, tok.model_max_length) and ids.dtype == torch.int64
    assert ids[0, 0] == tok.bos_token_id and ids[1, 1] == tok.eos_token_id          # "" is <bos><eos><pad>...
    assert (ids[1, 2:] == tok.pad_token_id).all() and ids[2, -1] == tok.eos_token_id  # the long one: cut, ended
