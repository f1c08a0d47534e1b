"""Load SD-class components (U-Net, VAE, CLIP text encoder, tokenizer, noise schedule) from local files only.

Sources (``model.kind`` in ``configs/model/*.yaml``):
- ``tiny``: random components of ``architectures.ARCHITECTURES['tiny']`` built in memory (tests, smoke runs);
- ``mini``: the toolkit's pretrained mini prior shipped in ``core/models/mini_prior`` (v2; ``model.version=1`` is the
  first prior in ``core/models/mini_prior_v1``; ``model.path`` may point to another directory written by
  ``scripts/pretrain_prior.py``);
- ``diffusers``: a local diffusers-format directory (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``);
- ``single_file``: an original ``.ckpt`` / ``.safetensors`` checkpoint plus a local diffusers config directory.

Nothing here reaches the network: every ``from_pretrained`` runs with ``local_files_only=True``, and a missing or
wrong path raises :class:`ModelNotFoundError` naming what to download, in which format, and the config key to set.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors import SafetensorError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..io import replace_dir, write_json
from .architectures import SD_V1_SCHEDULE, architecture
from .tokenizer import build_tokenizer, tokenize

MINI_PRIOR_DIR = Path(__file__).resolve().parent / "mini_prior"
# shipped mini priors by version (``model=mini`` is v2, ``model=mini_v1`` the first one, kept for comparison)
MINI_PRIOR_DIRS = {2: MINI_PRIOR_DIR, 1: Path(__file__).resolve().parent / "mini_prior_v1"}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# What a user should fetch for each named model (``configs/model/<name>.yaml`` sets ``model.download``).
SD_LAYOUT = ("a diffusers-format directory containing model_index.json and the subfolders unet/, vae/, "
             "text_encoder/, tokenizer/, scheduler/")


class ModelNotFoundError(FileNotFoundError):
    """A model file or directory is missing or not in the expected format. The message says how to fix it."""


@dataclass
class SDComponents:
    """The parts of a latent text-to-image diffusion model that every method uses.

    ``resolution`` is the image side in pixels; latents are ``resolution / vae_scale_factor`` wide and are scaled
    by ``vae.config.scaling_factor`` (SD v1: 0.18215) as diffusers does.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    resolution: int
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SDComponents":
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(**kw)  # no dtype=None: diffusers warns about casting when dtype is passed at all
        return self

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return tokenize(self.tokenizer, prompts).to(self.device)

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder last hidden states, (B, max_length, D): the U-Net's cross-attention context."""
        return self.text_encoder(self.tokenize(prompts))[0]

    def encode_images(self, images: torch.Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W) -> scaled latents z_0 (the posterior mean unless ``sample``)."""
        dist = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return z * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1]."""
        x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((x + 1) / 2).clamp(0, 1)

    def save(self, out_dir: str | Path, config: dict | None = None) -> Path:
        """``save_pretrained`` every component (safetensors) plus ``toolkit.json`` and the resolved config.

        Written to ``<out_dir>.partial`` first and renamed into place, so an interrupted save never leaves a
        half-written model where a loader would find it.
        """
        final = Path(out_dir)
        out = final.with_name(final.name + ".partial")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        self.unet.save_pretrained(out / "unet")
        self.vae.save_pretrained(out / "vae")
        self.text_encoder.save_pretrained(out / "text_encoder")
        self.tokenizer.save_pretrained(out / "tokenizer")
        self.scheduler.save_pretrained(out / "scheduler")
        for name in ("unet", "vae", "text_encoder"):   # a model loaded from a path records it; a saved one must not
            cfg_file = out / name / "config.json"
            conf = json.loads(cfg_file.read_text())
            if conf.pop("_name_or_path", None) is not None:
                _write_json(cfg_file, conf)
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
                 "feature_extractor": [None, None], "requires_safety_checker": False}
        _write_json(out / "model_index.json", index)
        _write_json(out / "toolkit.json", {"resolution": self.resolution, "source": self.source})
        if config is not None:
            from omegaconf import OmegaConf
            OmegaConf.save(OmegaConf.create(config), out / "config.yaml")
        return replace_dir(out, final)


def _diffusers_version() -> str:
    import diffusers
    return diffusers.__version__


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, obj)


def build_random(arch: str = "tiny", seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> SDComponents:
    """Randomly initialised components of ``architectures.ARCHITECTURES[arch]`` with a locally built tokenizer."""
    spec = architecture(arch)
    tokenizer = tokenizer or build_tokenizer(model_max_length=spec["max_length"])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec["text"])
    text_encoder = CLIPTextModel(text_cfg)
    scheduler = DDPMScheduler.from_config(SD_V1_SCHEDULE)
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, spec["resolution"],
                        source={"kind": "random", "architecture": arch, "seed": seed})


def _require_dir(path: Path, what: str, key: str, download: str) -> None:
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{what} not found at '{path}'. Expected {SD_LAYOUT}. Download {download} in diffusers format "
            f"(for example with `huggingface-cli download` on a machine with internet access), copy it here, "
            f"and set {key}=<that directory>.")
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer") if not (path / c).is_dir()]
    if missing:
        raise ModelNotFoundError(
            f"'{path}' is not a diffusers-format {what}: missing subfolder(s) {', '.join(missing)}. Expected "
            f"{SD_LAYOUT}. A single .ckpt/.safetensors file needs model.kind=single_file and model.config_dir.")


def load_diffusers_dir(path: str | Path, what: str = "Stable Diffusion model", key: str = "model.path",
                       download: str = "the model", dtype: torch.dtype | None = None,
                       resolution: int | None = None) -> SDComponents:
    """Components from a local diffusers directory (the mini prior, SD v1.4 / v1.5, a saved fine-tune)."""
    path = Path(path).expanduser()
    _require_dir(path, what, key, download)
    kw = dict(local_files_only=True)
    if dtype is not None:
        kw["torch_dtype"] = dtype
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **kw)
        vae = AutoencoderKL.from_pretrained(path / "vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", **({"dtype": dtype} if dtype else {}),
                                                     local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    except (OSError, ValueError, EnvironmentError, RuntimeError, SafetensorError) as e:   # truncated or foreign files
        detail = " ".join(str(e).split())[:300]
        raise ModelNotFoundError(f"Could not load {what} from '{path}': {detail}. Expected {SD_LAYOUT} with weight "
                                 f"files (*.safetensors or *.bin) beside each config.json; set {key}.") from e
    if dtype is None:  # weights stored in float16 (the mini prior) compute in float32 unless asked otherwise
        unet.float(), vae.float(), text_encoder.float()
    sched_dir = path / "scheduler"
    config = DDPMScheduler.load_config(sched_dir) if (sched_dir / "scheduler_config.json").is_file() else SD_V1_SCHEDULE
    scheduler = DDPMScheduler.from_config(config)
    meta = json.loads((path / "toolkit.json").read_text()) if (path / "toolkit.json").is_file() else {}
    if resolution is None:
        resolution = meta.get("resolution") or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, int(resolution),
                        source={"kind": "diffusers", "path": str(path), **meta.get("source", {})})


LDM_LAYOUT = "a diffusers LDMTextToImagePipeline directory: vqvae/, bert/, tokenizer/, unet/, scheduler/"


def load_ldm_dir(path: str | Path, key: str = "model.path", download: str = "CompVis/ldm-text2im-large-256",
                 dtype: torch.dtype | None = None, resolution: int | None = None) -> SDComponents:
    """The LDM text-to-image model (CompVis' text2img-f8-large, AnomalyDiffusion's official base) from a local diffusers
    ``LDMTextToImagePipeline`` directory: its KL autoencoder, its BERT-style ``LDMBertModel`` text encoder (1280 wide)
    and BERT tokenizer (padded to the encoder's 77 positions), its U-Net and schedule. The components take the places
    of SD's, so every method that reads ``SDComponents`` runs on it."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    missing = [c for c in ("vqvae", "bert", "tokenizer", "unet") if not (path / c).is_dir()]
    if not path.is_dir() or missing:
        raise ModelNotFoundError(
            f"LDM text-to-image model not found at '{path}'" + (f" (missing {', '.join(missing)})" if path.is_dir()
                                                                 else "") +
            f". Expected {LDM_LAYOUT}. Download {download} on a machine with internet access, copy it here and set "
            f"{key}=<that directory>.")
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True, **kw)
        vae = AutoencoderKL.from_pretrained(path / "vqvae", local_files_only=True, **kw)
        bert = LDMBertModel.from_pretrained(path / "bert", local_files_only=True, **({"dtype": dtype} if dtype else {}))
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    except (OSError, ValueError, EnvironmentError, RuntimeError, SafetensorError) as e:
        detail = " ".join(str(e).split())[:300]
        raise ModelNotFoundError(f"Could not load the LDM model from '{path}': {detail}. Expected {LDM_LAYOUT} with "
                                 f"weight files beside each config.json; set {key}.") from e
    if dtype is None:
        unet.float(), vae.float(), bert.float()
    tokenizer.model_max_length = int(bert.config.max_position_embeddings)   # the LDM code pads to 77
    sched_dir = path / "scheduler"
    config = DDPMScheduler.load_config(sched_dir) if (sched_dir / "scheduler_config.json").is_file() else SD_V1_SCHEDULE
    if resolution is None:
        resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return SDComponents(unet, vae, bert, tokenizer, DDPMScheduler.from_config(config), int(resolution),
                        source={"kind": "ldm", "path": str(path)})


def load_single_file(checkpoint: str | Path, config_dir: str | Path, download: str = "the checkpoint",
                     dtype: torch.dtype | None = None, resolution: int | None = None) -> SDComponents:
    """An original single-file SD checkpoint (``.ckpt`` / ``.safetensors``), with component configs from a local
    diffusers directory ``config_dir`` (only its JSON configs and tokenizer files are read)."""
    from diffusers import StableDiffusionPipeline

    checkpoint, config_dir = Path(checkpoint).expanduser(), Path(config_dir).expanduser()
    if not checkpoint.is_file() or checkpoint.suffix not in (".ckpt", ".safetensors"):
        raise ModelNotFoundError(
            f"Checkpoint file not found at '{checkpoint}' (expected a .ckpt or .safetensors file). Download "
            f"{download} and set model.path=<file>.")
    if not (config_dir / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"Single-file loading needs a local config directory: '{config_dir}' has no model_index.json. Copy the "
            f"config files (model_index.json and */config.json, tokenizer/) of the matching diffusers model there "
            f"and set model.config_dir=<that directory>.")
    pipe = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(config_dir), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False,
                                                    **({"torch_dtype": dtype} if dtype else {}))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if resolution is None:
        resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, int(resolution),
                        source={"kind": "single_file", "path": str(checkpoint)})


def load_model(cfg: Any) -> SDComponents:
    """Components for a ``model/*.yaml`` node: ``kind`` in tiny / mini / diffusers / single_file."""
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    kind = get("kind")
    dtype = _dtype(get("dtype", None))
    resolution = get("resolution", None)
    if kind == "tiny":
        comp = build_random("tiny", seed=int(get("seed", 0)))
        if dtype is not None:
            comp.to(dtype=dtype)
        return comp
    if kind == "mini":
        version = int(get("version", None) or 2)
        if version not in MINI_PRIOR_DIRS:
            raise ValueError(f"Unknown mini prior version {version}. Shipped: {sorted(MINI_PRIOR_DIRS)} "
                             f"(model=mini is v2, model=mini_v1 is v1).")
        path = Path(get("path", None) or MINI_PRIOR_DIRS[version])
        if not (path / "model_index.json").is_file():
            shipped = MINI_PRIOR_DIRS[version].relative_to(Path(__file__).resolve().parents[2])
            config = "pretrain_prior" if version == 2 else "pretrain_prior_v1"
            raise ModelNotFoundError(
                f"The mini prior is not at '{path}'. It ships with the toolkit in {shipped}: restore it "
                f"(git checkout {shipped}), rebuild it with `python scripts/pretrain_prior.py --config-name {config}` "
                f"(1-2 h on 2 cores), or set model.path=<a directory written by that script>.")
        return load_diffusers_dir(path, "mini prior", "model.path",
                                  "nothing: it ships with the toolkit; rebuild it with scripts/pretrain_prior.py",
                                  dtype, resolution)
    if kind == "diffusers":
        if not get("path", None):
            raise ModelNotFoundError(
                f"model.path is not set for model '{get('name', kind)}'. Download {get('download', 'the model')} "
                f"({SD_LAYOUT}) and run with model.path=<directory>.")
        return load_diffusers_dir(get("path"), get("name", "model"), "model.path", get("download", "the model"),
                                  dtype, resolution)
    if kind == "single_file":
        if not get("path", None) or not get("config_dir", None):
            raise ModelNotFoundError(
                f"Single-file model '{get('name', kind)}' needs model.path=<.ckpt/.safetensors file> and "
                f"model.config_dir=<local diffusers config directory>. Download {get('download', 'the checkpoint')}.")
        return load_single_file(get("path"), get("config_dir"), get("download", "the checkpoint"), dtype, resolution)
    if kind == "ldm":
        if not get("path", None):
            raise ModelNotFoundError(
                f"model.path is not set for model '{get('name', kind)}'. Download {get('download', 'the model')} "
                f"({LDM_LAYOUT}) and run with model.path=<directory>.")
        return load_ldm_dir(get("path"), "model.path", get("download", "the model"), dtype, resolution)
    raise ValueError(f"Unknown model.kind '{kind}'. Use one of: tiny, mini, diffusers, single_file, ldm.")


def _dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "float32", "fp32"):
        return None
    table = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"Unknown model.dtype '{name}'. Use float32, float16 or bfloat16.")
    return table[name]


def load_clip_text(path: str | Path, key: str = "model.clip_path") -> tuple[CLIPTokenizer, CLIPTextModel]:
    """A CLIP text encoder and its tokenizer from a local transformers directory."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"No CLIP model at '{path}' (expected a transformers directory with config.json, model.safetensors, "
            f"vocab.json/merges.txt or tokenizer.json). Download e.g. openai/clip-vit-large-patch14 and set {key}.")
    return (CLIPTokenizer.from_pretrained(path, local_files_only=True),
            CLIPTextModel.from_pretrained(path, local_files_only=True))


def load_clip_vision(path: str | Path, key: str = "model.clip_path"):
    """A CLIP vision tower (with projection) from a local transformers directory."""
    from transformers import CLIPVisionModelWithProjection

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"No CLIP model at '{path}' (expected a transformers directory with config.json and model.safetensors). "
            f"Download e.g. openai/clip-vit-large-patch14 and set {key}.")
    return CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)


def load_dit_state_dict(path: str | Path, key: str = "model.dit_path") -> dict[str, torch.Tensor]:
    """DiT weights as a state dict: the original ``DiT-XL-2-256x256.pt`` / ``.safetensors`` file, or a diffusers
    ``transformer/`` directory. Mapping it onto a model is the method's job (DefectDiffu loads non-strictly)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted((path / "transformer").glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"No *.safetensors in '{path}' or '{path}/transformer'. Set {key}.")
        path = files[0]
    if not path.is_file():
        raise ModelNotFoundError(
            f"DiT weights not found at '{path}'. Download DiT-XL-2-256x256.pt (facebookresearch/DiT release) or the "
            f"diffusers facebook/DiT-XL-2-256 transformer/ folder, and set {key}=<file or directory>.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
