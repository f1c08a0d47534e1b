"""Background-aware defect generation, the loops: training (Sec. 3.1, 3.3.1, A.1), one U-Net fine-tuned per defect
type with the disentanglement loss (Eq. 5) under masked cross-attention (Eq. 10-11); generation (Sec. 3.2, 3.3.2,
Algorithm 1), the masked DDIM inversion of a normal image (Eq. 8), the start z_T* (Theorem 3.2), the combined
sampling (Eq. 9) and the mask refinement (Eq. 13).

One run is one product and one fold of the two-fold protocol (``split.fold``: the generator of fold f must never
see fold f's test anomalies). Run directory::

    config.yaml                    the resolved Hydra config (core.runs)
    bgdefect.json                  product, fold, types, prompts, training images
    types/<type>/generator/        the type's fine-tuned U-Net as a slim checkpoint (core.models.slim)
    types/<type>/train_state.pt    only while that type trains: its resumable state
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from core.data import DatasetError, Sample, given_mask_files, load_from_config, read_image, read_mask, \
    require_masks, screen_empty_masks, split_from_config, training_normals
from core.data.pairing import nearest_normals
from core.data.torch_dataset import PairedTransform, to_tensor
from core.diffusion import attention_control, cross_attention_layers, ddim_invert, inference_scheduler, layers_at
from core.engine import Engine, EngineSpec, inference_dtype, make_adamw
from core.export import GeneratedWriter, to_uint8
from core.io import read_run_json, write_json
from core.models import SDComponents, load_model
from core.models.slim import is_slim, load_slim, save_slim, weights_hash
from core.runs import item_generator, positive_int, resolve_device, run_identity
from core.shard import current_shard

from .model import C2_INPUTS, DefectAttention, c2_input, disentanglement_loss, masked_cross_attention, noised_pair, \
    refine_mask, resized_mask, sampling_step, start_latent, token_positions, two_part_condition

STATE, META = "train_state.pt", "bgdefect.json"


# ------------------------------------------------------------------------------------------------------- data
def training_anomalies(cfg: DictConfig, product: str) -> dict[str, list[Sample]]:
    """The fold's training anomalies of ``product`` per type (sorted by path). Every type the product has must have
    some in this fold, and every one a mask."""
    split = split_from_config(load_from_config(cfg.dataset, [product]), cfg.split)
    fold = cfg.split.get("fold")
    anomalies = sorted((s for s in split.train if s.label == 1 and s.product == product), key=lambda s: s.path)
    require_masks(anomalies, product, "Background-aware generation masks the latent and the attention with them")
    anomalies = screen_empty_masks(anomalies, str(cfg.method.train.get("empty_masks", "error")),
                                   "method.train.empty_masks")
    by_type: dict[str, list[Sample]] = {}
    for s in anomalies:
        by_type.setdefault(s.anomaly_type, []).append(s)
    every = sorted({s.anomaly_type for s in split.train + split.test if s.label == 1 and s.product == product})
    missing = [t for t in every if t not in by_type]
    if missing:
        raise DatasetError(f"Fold {fold} of split '{cfg.split.name}' leaves type(s) {missing} of '{product}' without a "
                           f"training anomaly (a type with one image has none in fold 1). Fix: train the other fold "
                           f"(split.fold=...), or add examples of those types.")
    if not by_type:
        raise DatasetError(f"Product '{product}' has no training anomalies under split '{cfg.split.name}' in "
                           f"{cfg.dataset.root}.")
    return dict(sorted(by_type.items()))


def load_pairs(samples: Sequence[Sample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, S, S) images in [0, 1] and (n, 1, S, S) binary masks at the model's side."""
    resize = PairedTransform(size=size)
    imgs, masks = [], []
    for s in samples:
        x = read_image(s.path)
        imgs.append(resize.resize(to_tensor(x), False))
        m = torch.from_numpy(read_mask(s.mask_paths, x.shape[:2]).astype("float32"))[None]
        masks.append((resize.resize(m, True) > 0.5).float())
    return torch.stack(imgs), torch.stack(masks)


def prompts(cfg_prompt, product: str, anomaly_type: str) -> dict[str, str]:
    """The three prompt parts: ``defect`` (C_def), ``background`` (C_bg), ``mask`` (C_m), and ``words``, the defect's
    words inside C_def (whose attention refines the mask, Eq. 13). The paper does not say how the parts are built;
    here fixed templates with {product} and {defect}: the type's words from ``type_words`` if it names the type (MVTec
    LOCO's ``logical_anomalies`` -> "missing or misplaced part"), else its name with underscores as spaces."""
    named = (cfg_prompt.get("type_words") or {}) if hasattr(cfg_prompt, "get") else {}
    words = {"product": product.replace("_", " "),
             "defect": str(named[anomaly_type]) if anomaly_type in named else anomaly_type.replace("_", " ")}
    return {**{k: str(cfg_prompt[k]).format(**words) for k in ("defect", "background", "mask")},
            "words": words["defect"]}


def latent_region(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, H, W) binary -> (B, 1, size, size): area average >= 0.5, the rule the masked attention uses per layer."""
    return (F.interpolate(masks.float(), size=(size, size), mode="area") >= 0.5).float()


def step_batch(images: torch.Tensor, masks: torch.Tensor, seed: int, step: int, batch: int, flip: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``step``-th batch of one type: ``batch`` of its images (with their masks), a pure function of
    (seed, step) so that a resumed run sees the same batches; optional joint horizontal flips."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(images.shape[0], (batch,), generator=g)
    x, m = images[idx], masks[idx]
    if flip:
        f = torch.rand(batch, generator=g) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
        m = torch.where(f[:, None, None, None], m.flip(-1), m)
    return x, m


# ------------------------------------------------------------------------------------------------------ train
def train_type(cfg: DictConfig, out: Path, comp: SDComponents, images: torch.Tensor, masks: torch.Tensor,
               parts: dict[str, str], seed: int, on_step: Callable[[int], None] | None = None,
               engine: Engine | None = None) -> None:
    """Eq. 5 for one defect type: the U-Net (only it, DreamBooth-style) learns from the matching loss on z_t with
    C1 = [C_def, C_bg] and the regulariser on the masked latent z_t^m with C2 = [C_m, C_bg], both in one forward
    pass under the masked cross-attention of Eq. 10-11 with the image's mask; resumable from ``out/train_state.pt``;
    the result is a slim checkpoint in ``out/generator``."""
    tcfg = cfg.method.train
    engine = engine or Engine(EngineSpec.from_config(tcfg), comp.device)
    base_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    base_hash, base_table = weights_hash(comp), comp.text_encoder.get_input_embeddings().weight.detach().cpu().clone()
    comp.vae.requires_grad_(False), comp.text_encoder.requires_grad_(False)
    layers = cross_attention_layers(comp.unet)
    engine.prepare_unet(comp.unet, layers)
    comp.unet.requires_grad_(True)
    comp.unet.train()
    opt = make_adamw([{"params": list(comp.unet.parameters()), "lr": float(tcfg.lr)}], str(tcfg.optimizer),
                     float(tcfg.weight_decay))
    state = out / STATE
    start = engine.load(state, {"unet": comp.unet}, {"optimizer": opt}, "bgdefect training")[0] \
        if state.is_file() else 0
    cap = (cfg.get("limits") or {}).get("max_train_steps")
    steps = min(int(tcfg.steps_per_type), int(cap)) if cap else int(tcfg.steps_per_type)
    B, T = int(tcfg.batch), comp.scheduler.config.num_train_timesteps
    dev = comp.device
    with torch.no_grad():
        c1, L = two_part_condition(comp.encode_prompt, [parts["defect"]], [parts["background"]])
        c2, _ = two_part_condition(comp.encode_prompt, [parts["mask"]], [parts["background"]])
    ctx = torch.cat([c1.expand(B, -1, -1), c2.expand(B, -1, -1)])
    latent = (B, comp.unet.config.in_channels, comp.latent_size, comp.latent_size)
    abar = comp.scheduler.alphas_cumprod
    bar = tqdm(range(start, steps), desc=f"bgdefect ({out.name})", initial=start, total=steps,
               disable=not engine.is_main)
    for step in bar:
        x, mask = step_batch(images, masks, seed, step, B, bool(tcfg.flip))
        g = torch.Generator().manual_seed((seed + 7919) * 1_000_003 + step)
        t, eps = torch.randint(0, T, (B,), generator=g), torch.randn(latent, generator=g)
        opt.zero_grad(set_to_none=True)
        with engine.autocast():
            with torch.no_grad():
                z0 = comp.encode_images(x.to(dev))
            m = latent_region(mask, comp.latent_size).to(dev)
            z_t, z_t_m = noised_pair(abar[t].to(dev), z0, m, eps.to(dev))
            with attention_control(comp.unet, layers, edit=masked_cross_attention(mask[:, 0].to(dev), L)):
                pred = comp.unet(torch.cat([z_t, z_t_m]), torch.cat([t, t]).to(dev), encoder_hidden_states=ctx).sample
            e1, e2 = pred.chunk(2)
            loss = disentanglement_loss(eps.to(dev), e1, e2, m)
        engine.backward(loss, 1)
        engine.step(opt)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        done = step + 1
        if done % int(tcfg.checkpoint_every) == 0 and done < steps:
            engine.save(state, done, {"unet": comp.unet}, {"optimizer": opt})
        if on_step is not None:
            on_step(done)
    comp.unet.eval()
    if engine.is_main:
        save_slim(comp, out / "generator", base_cfg, base_hash, base_table, unet=str(tcfg.get("save_unet", "diff")),
                  config=OmegaConf.to_container(cfg, resolve=True))
        if state.exists():
            state.unlink()
    engine.barrier()


def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Fine-tune one U-Net per defect type of ``cfg.product`` on the fold's training anomalies (types already saved
    are skipped; the one in progress resumes)."""
    run_dir = Path(run_dir)
    product, seed = str(cfg.product), int(cfg.seed)
    by_type = training_anomalies(cfg, product)
    engine = Engine(EngineSpec.from_config(cfg.method.train), resolve_device(str(cfg.device)))
    meta = {"product": product, "fold": cfg.split.get("fold"), "split": cfg.split.name, "types": list(by_type),
            "prompts": {t: prompts(cfg.method.prompt, product, t) for t in by_type},
            "train_anomalies": {t: [str(Path(s.path).resolve()) for s in v] for t, v in by_type.items()}}
    path = run_dir / META
    if path.is_file():
        old = read_run_json(path, "the run's types and training images",
                            f"train into a new folder (hydra.run.dir=...); {run_dir} is not usable as it is.")
        if old.get("train_anomalies") != meta["train_anomalies"]:
            raise ValueError(f"{run_dir} was trained on other images than this config gives (another fold or "
                             f"dataset?). Fix: train into a new folder (hydra.run.dir=...).")
    elif engine.is_main:
        write_json(path, meta)
    for i, (t, samples) in enumerate(by_type.items()):
        out = run_dir / "types" / t
        if is_slim(out / "generator"):
            continue
        out.mkdir(parents=True, exist_ok=True)
        comp = load_model(cfg.model).to(engine.device)   # every type starts from the base model
        torch.manual_seed(seed)
        images, masks = load_pairs(samples, comp.resolution)
        train_type(cfg, out, comp, images, masks, meta["prompts"][t], seed + 101 * i, engine=engine)
        del comp
    return run_dir


# --------------------------------------------------------------------------------------------------- generate
PLACEMENTS = ("any", "nearest")
EPS_TIMESTEPS, MASK_SOURCES, REFINE_TOKENS, REFINE_NORMALIZE = ("previous", "target"), ("train", "dir"), \
    ("defect_words", "non_start"), ("none", "max")


def _choice(value, allowed: Sequence[str], key: str) -> str:
    if str(value) not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}, got '{value}'.")
    return str(value)


def masked_eps(comp: SDComponents, layers: Sequence[str], context: torch.Tensor, part_length: int,
               mask: torch.Tensor, store=None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps_theta(z, t, context) under the masked cross-attention of Eq. 10-11 with the image-resolution ``mask``
    (B', H, W), B' dividing the batch (a batch of [C1 rows; C2 rows] repeats it)."""
    def eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = mask if mask.shape[0] == z.shape[0] else mask.repeat(z.shape[0] // mask.shape[0], 1, 1)
        with attention_control(comp.unet, layers, store=store, edit=masked_cross_attention(m, part_length)):
            return comp.unet(z, t, encoder_hidden_states=context).sample
    return eps


def invert_masked(comp: SDComponents, scheduler, c2: torch.Tensor, part_length: int, z0: torch.Tensor,
                  mask: torch.Tensor, steps: int, eps_timestep: str = "previous", fixed_point_iters: int = 0,
                  progress: bool = False) -> list[torch.Tensor]:
    """Eq. 8: the masked DDIM inversion of z_0^m = (1 - m) z_0 with C2, the noise prediction applied only outside the
    latent mask m, on :func:`core.diffusion.ddim_invert` (its update is Eq. 8's: sqrt(abar_t / abar_{t-1}) z +
    (sqrt(1 - abar_t) - sqrt(abar_t (1 - abar_{t-1}) / abar_{t-1})) eps). ``eps_timestep``: ``previous`` evaluates eps at
    the level the step starts from, eps(z~_{t-1}, t-1) as Eq. 8 prints it; ``target`` at the level it goes to (the
    approximation ``ddim_invert`` makes by default; with ``fixed_point_iters`` > 0 the implicit step). ``mask``: (B, H, W)
    at image resolution. Returns the path [z~ at the final level, z~_{t_1}, ..., z~_T^m]."""
    m = latent_region(mask[:, None], z0.shape[-1]).to(z0.dtype)
    eps = masked_eps(comp, cross_attention_layers(comp.unet), c2.expand(z0.shape[0], -1, -1), part_length, mask)
    scheduler.set_timesteps(steps)
    ascending = [int(t) for t in scheduler.timesteps.flip(0)]
    if eps_timestep == "previous":
        if fixed_point_iters:
            raise ValueError("method.generate.inversion.fixed_point_iters > 0 solves the implicit step at the target "
                             "level; it needs method.generate.inversion.eps_timestep=target.")
        earlier = {t: (ascending[i - 1] if i else 0) for i, t in enumerate(ascending)}
        eps_fn = lambda z, t: (1 - m) * eps(z, torch.as_tensor(earlier[int(t)], device=z.device))  # noqa: E731
    else:
        eps_fn = lambda z, t: (1 - m) * eps(z, t)  # noqa: E731
    return ddim_invert(eps_fn, scheduler, (1 - m) * z0, None, fixed_point_iters, return_trajectory=True,
                       progress=progress)


def sample_eq9(comp: SDComponents, scheduler, c1: torch.Tensor, c2: torch.Tensor, part_length: int,
               z_start: torch.Tensor, mask: torch.Tensor, c2_mode: str = "masked", recorder: DefectAttention | None = None,
               record_window: tuple[float, float] = (0.0, 1.0), progress: bool = False,
               return_path: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Eq. 9 from z_T* over the scheduler's timesteps (those of the inversion): at each step one U-Net call on
    [z_t*; c2_input(z_t*)] with [C1; C2] under the masked cross-attention, eps = (1 - m) eps_C2 + m eps_C1, and the
    deterministic DDIM step (:func:`bgdefect.model.sampling_step`) down to the next level (the last to the scheduler's
    final level, where the inversion started). ``recorder`` records the C1 rows' C_def attention during the steps
    whose index / number of steps lies in ``record_window``. Returns z_0* (and the path [z_T*, ..., z_0*])."""
    B = z_start.shape[0]
    m = latent_region(mask[:, None], z_start.shape[-1]).to(z_start.dtype)
    ctx = torch.cat([c1.expand(B, -1, -1), c2.expand(B, -1, -1)])
    eps = masked_eps(comp, cross_attention_layers(comp.unet), ctx, part_length, mask, store=recorder)
    abar = scheduler.alphas_cumprod.to(torch.float64)
    ts = [int(t) for t in scheduler.timesteps]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    z, path = z_start, [z_start]
    for i, t in enumerate(tqdm(ts, desc="Eq. 9 sampling", disable=not progress, leave=False)):
        if recorder is not None:
            recorder.active = record_window[0] <= i / len(ts) < record_window[1]
        tt = torch.full((2 * B,), t, device=z.device)
        e1, e2 = eps(torch.cat([z, c2_input(z, m, c2_mode)]), tt).chunk(2)
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else final
        z = sampling_step(z, e1, e2, abar[t], a_prev, m)
        path.append(z)
    return (z, path) if return_path else z


def algorithm_1(comp: SDComponents, scheduler, c1: torch.Tensor, c2: torch.Tensor, part_length: int,
                z0: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, steps: int, eps_timestep: str = "previous",
                fixed_point_iters: int = 0, c2_mode: str = "masked", recorder: DefectAttention | None = None,
                record_window: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """One batch of Algorithm 1 in latent space: the masked inversion of the normal latents ``z0`` (Eq. 8), the start
    z_T* = z~_T^m + m eps with ``noise`` as eps (Theorem 3.2) and Eq. 9 down to z_0*. ``mask``: (B, H, W) at image
    resolution. Returns z_0* (decode it with ``comp.decode_latents``)."""
    z_T = invert_masked(comp, scheduler, c2, part_length, z0, mask, steps, eps_timestep, fixed_point_iters)[-1]
    m = latent_region(mask[:, None], z0.shape[-1]).to(z0.dtype)
    return sample_eq9(comp, scheduler, c1, c2, part_length, start_latent(z_T, m, noise), mask, c2_mode, recorder,
                      record_window)


def draw_items(gens: Sequence[torch.Generator], n_normals: int, n_masks: int, near: torch.Tensor | None = None
               ) -> tuple[list[int], list[int]]:
    """Each item's normal image and training mask (indices), from the item's own stream: a normal, then a mask, drawn
    independently (Algorithm 1; ``placement=any``); with ``near`` ((n_masks, k), :func:`core.data.pairing.nearest_normals`)
    the normal is then redrawn among the mask's k nearest (``placement=nearest``)."""
    src = [int(torch.randint(n_normals, (1,), generator=gen)) for gen in gens]
    picks = [int(torch.randint(n_masks, (1,), generator=gen)) for gen in gens]
    if near is not None:
        src = [int(near[j, int(torch.randint(near.shape[1], (1,), generator=gen))]) for j, gen in zip(picks, gens)]
    return src, picks


def refine_layers(comp: SDComponents, resolutions) -> list[str]:
    """The cross-attention layers whose C_def maps Eq. 13 averages: those running at ``resolutions`` (sides)."""
    try:
        return layers_at(comp.unet, comp.latent_size, [int(r) for r in resolutions])
    except KeyError as e:
        raise ValueError(f"method.generate.refine.resolutions={list(resolutions)}: {e.args[0]} Fix: sides from that "
                         f"list.") from None


def refined_masks(recorder: DefectAttention, mask: torch.Tensor, normalize: str = "none",
                  threshold: float = 0.5, within_target: bool = True) -> torch.Tensor:
    """Eq. 13 on the recorded C_def attention: m* = [Resize(m' * A_def) >= threshold] at the image's size, m' the
    mask at the map's side. ``normalize=max`` divides each image's map by its maximum first (threshold = half of
    the peak); ``none`` is Eq. 13 as printed. ``within_target`` keeps m* inside the target mask ``mask``: the coarse
    map, resized, spills up to half a cell over the mask's border, where the image is the inverted background
    (Prop. 3.3), not defect. Returns (B, H, W) bool."""
    a = recorder.mean_map()
    m_prime = resized_mask(mask, a.shape[-1]).to(a)
    a = m_prime * a
    if normalize == "max":
        a = a / a.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
    out = refine_mask(a, m_prime, tuple(mask.shape[-2:]), threshold)
    return out & (mask > 0.5) if within_target else out


def generation_config(cfg: DictConfig, fold) -> dict:
    g = cfg.method.generate
    return {"method": "bgdefect", "product": str(cfg.product), "fold": fold, "seed": int(cfg.seed),
            "generate": OmegaConf.to_container(g, resolve=True), "prompt": OmegaConf.to_container(cfg.method.prompt),
            "steps_cap": (cfg.get("limits") or {}).get("num_inference_steps"),
            "checkpoint": run_identity(cfg.checkpoint) if cfg.get("checkpoint") else None}


def load_run(run_dir: Path, product: str) -> dict:
    """The run's record (types, prompts, training images), checked to be a finished bgdefect run of ``product``."""
    fix = (f"train it with scripts/train.py method=bgdefect product={product} split.fold=<0|1> "
           f"hydra.run.dir={run_dir} (a rerun resumes).")
    if not (run_dir / META).is_file():
        raise FileNotFoundError(f"{run_dir} holds no bgdefect training run (no {META}). Fix: pass checkpoint=<the run "
                                f"directory of scripts/train.py method=bgdefect ...>, or {fix}")
    meta = read_run_json(run_dir / META, "the run's types and training images", fix)
    if meta.get("product") != product:
        raise ValueError(f"{run_dir} was trained on '{meta.get('product')}', not on '{product}'. Fix: "
                         f"product={meta.get('product')}, or train a run on {product}.")
    unfinished = [t for t in meta["types"] if not is_slim(run_dir / "types" / t / "generator")]
    if unfinished:
        raise FileNotFoundError(f"{run_dir} has no finished generator for type(s) {unfinished}. Fix: {fix}")
    return meta


def generate(cfg: DictConfig, checkpoint: Path | None, out_dir: Path) -> Path:
    """N image-mask pairs per defect type of the run's product, each on a random normal training image with a target
    mask (one of the type's training masks, or a given one): the masked DDIM inversion of the normal image (Eq. 8),
    the start z_T* (Theorem 3.2), Eq. 9 with the type's U-Net, and the mask refined from the C_def attention
    (Eq. 13); written through :class:`core.export.GeneratedWriter` (resumable; every record names the run's fold)."""
    if checkpoint is None:
        raise FileNotFoundError("bgdefect generates with a trained run: pass checkpoint=<the run directory of "
                                "scripts/train.py method=bgdefect ...>.")
    run_dir, product = Path(checkpoint), str(cfg.product)
    meta = load_run(run_dir, product)
    g = cfg.method.generate
    c2_mode = _choice(g.c2_input, C2_INPUTS, "method.generate.c2_input")
    inv = g.inversion
    eps_timestep = _choice(inv.eps_timestep, EPS_TIMESTEPS, "method.generate.inversion.eps_timestep")
    mask_source = _choice(g.masks, MASK_SOURCES, "method.generate.masks")
    placement = _choice(g.get("placement", "any"), PLACEMENTS, "method.generate.placement")
    if placement == "nearest" and mask_source != "train":
        raise ValueError("method.generate.placement=nearest puts a training mask on the normal images most like the "
                         "anomaly image it was drawn on; method.generate.masks=dir gives masks without their images. "
                         "Fix: method.generate.placement=any, or method.generate.masks=train.")
    ref = g.refine
    tokens_rule = _choice(ref.tokens, REFINE_TOKENS, "method.generate.refine.tokens")
    normalize = _choice(ref.normalize, REFINE_NORMALIZE, "method.generate.refine.normalize")
    window = tuple(float(x) for x in ref.steps)
    if len(window) != 2 or not 0 <= window[0] < window[1] <= 1:
        raise ValueError(f"method.generate.refine.steps={list(ref.steps)} must be [start, stop) fractions of the "
                         f"sampling steps with 0 <= start < stop <= 1, e.g. [0.0, 1.0] for all of them.")
    shard = current_shard(resolve_device(str(cfg.device)))
    dtype = inference_dtype(str(g.get("dtype", "fp32")), shard.device)
    limits = cfg.get("limits") or {}
    n = positive_int(g.n_per_type if cfg.get("n_per_type") is None else cfg.n_per_type, "n_per_type", 100_000)
    n = min(n, int(limits["n_per_type"])) if limits.get("n_per_type") else n
    cap = limits.get("num_inference_steps")
    steps = min(int(g.num_inference_steps), int(cap)) if cap else int(g.num_inference_steps)
    types = list(meta["types"])
    given = given_mask_files(g.get("mask_dir"), types) if mask_source == "dir" else {}
    normals = training_normals(cfg, product, "background-aware generation inverts them and puts the defects on them")
    by_type = training_anomalies(cfg, product) if mask_source == "train" else {}
    for t in by_type:
        if [str(Path(s.path).resolve()) for s in by_type[t]] != meta["train_anomalies"].get(t):
            raise ValueError(f"method.generate.masks=train draws the run's training masks of '{t}', but this config's "
                             f"dataset and split give other images than the run recorded in {run_dir / META}. Fix: "
                             f"generate with the run's dataset and split (fold {meta.get('fold')}), or "
                             f"method.generate.masks=dir.")
    fold = meta.get("fold")
    open_writer = lambda: GeneratedWriter(out_dir, product, "bgdefect", generation_config(cfg, fold),  # noqa: E731
                                          str(checkpoint), int(cfg.seed), shard.index, shard.count)
    writer = open_writer() if shard.is_main else None
    shard.barrier()
    writer = writer or open_writer()
    bs = int(g.batch_size)
    src_cache: dict[int, torch.Tensor] = {}
    small: torch.Tensor | None = None   # every normal at 32 px, for placement=nearest
    try:
        for ty in types:
            items = [i for i in range(n)]
            batches = [b for b in shard.take([items[i:i + bs] for i in range(0, n, bs)])
                       if not all(writer.is_done(ty, i) for i in b)]
            if not batches:
                continue
            comp = load_slim(run_dir / "types" / ty / "generator", cfg.model, shard.device)
            comp.unet.requires_grad_(False), comp.vae.requires_grad_(False), comp.text_encoder.requires_grad_(False)
            if dtype != torch.float32:
                comp.to(dtype=dtype)
            res = comp.resolution
            bank_images, bank = load_pairs(by_type[ty], res) if mask_source == "train" else (None, None)
            bank = None if bank is None else bank[:, 0]
            near = None
            if placement == "nearest":
                k = positive_int(g.placement_k, "method.generate.placement_k", 1_000_000)
                if small is None:
                    small = torch.stack([F.interpolate(load_normal(p, res)[None], size=(32, 32), mode="area")[0]
                                         for p in tqdm(normals, desc="normals for placement=nearest", leave=False)])
                near = nearest_normals(bank_images, bank, small, min(k, len(normals)))
            parts = meta["prompts"][ty]
            with torch.no_grad():
                c1, L = two_part_condition(comp.encode_prompt, [parts["defect"]], [parts["background"]])
                c2, _ = two_part_condition(comp.encode_prompt, [parts["mask"]], [parts["background"]])
            if tokens_rule == "defect_words":
                tokens = token_positions(comp.tokenizer, parts["defect"], parts.get("words", ty.replace("_", " ")))
            else:
                tokens = list(range(1, L))
            layers = refine_layers(comp, ref.resolutions) if bool(ref.enabled) else []
            sched = inference_scheduler(comp.scheduler.config, "ddim", str(g.timestep_spacing))
            todo = sum(1 for b in batches for i in b if not writer.is_done(ty, i))
            for b in tqdm(batches, desc=f"bgdefect generation ({product}/{ty}, {todo} images)"):
                gens = [item_generator(int(cfg.seed), product, ty, i) for i in b]
                if mask_source == "train":
                    src, picks = draw_items(gens, len(normals), bank.shape[0], near)
                    masks = bank[picks]
                else:
                    src = [int(torch.randint(len(normals), (1,), generator=gen)) for gen in gens]
                    files = given[ty]
                    picked = [files[int(torch.randint(len(files), (1,), generator=gen))] for gen in gens]
                    masks = torch.stack([(F.interpolate(torch.from_numpy(read_mask([f]).astype("float32"))[None, None],
                                                        size=(res, res), mode="nearest")[0, 0] > 0.5).float()
                                         for f in picked])
                noise = torch.stack([torch.randn(comp.unet.config.in_channels, comp.latent_size, comp.latent_size,
                                                 generator=gen) for gen in gens])
                for j in src:
                    if j not in src_cache:
                        src_cache[j] = load_normal(normals[j], res)
                x = torch.stack([src_cache[j] for j in src]).to(shard.device)
                mk, dev_dtype = masks.to(shard.device), comp.unet.dtype
                recorder = DefectAttention(tokens, slice(0, len(b)), layers)
                with torch.no_grad():
                    z0 = comp.encode_images(x).to(dev_dtype)
                    z_out = algorithm_1(comp, sched, c1, c2, L, z0, mk, noise.to(shard.device, dev_dtype), steps,
                                        eps_timestep, int(inv.fixed_point_iters), c2_mode, recorder, window)
                    images = comp.decode_latents(z_out).float()
                    refined = refined_masks(recorder, mk.float(), normalize, float(ref.threshold),
                                            bool(ref.get("within_target", True))) \
                        if bool(ref.enabled) else mk > 0.5
                images = to_uint8(images)
                for k, i in enumerate(b):
                    if writer.is_done(ty, i):
                        continue
                    target, out_mask = mk[k].cpu().numpy() > 0.5, refined[k].cpu().numpy()
                    fallback = bool(ref.enabled) and not out_mask.any()
                    if fallback:
                        out_mask = target
                    writer.write_anomaly(ty, i, images[k], out_mask, source=normals[src[k]], fold=fold,
                                         masks=mask_source, target_fraction=round(float(target.mean()), 5),
                                         mask_fraction=round(float(out_mask.mean()), 5),
                                         refined=bool(ref.enabled) and not fallback)
            del comp
        shard.barrier()
        if shard.is_main:
            writer.finish()
    finally:
        writer.close()
    return Path(out_dir)


def load_normal(path: str, size: int) -> torch.Tensor:
    """A normal image as (3, size, size) in [0, 1] (area-style bilinear resize, as the training pairs)."""
    return PairedTransform(size=size).resize(to_tensor(read_image(path)), False).clamp(0, 1)


__all__ = ["algorithm_1", "draw_items", "generate", "invert_masked", "latent_region", "load_pairs", "load_run",
           "masked_eps", "prompts", "refined_masks", "sample_eq9", "step_batch", "train", "train_type",
           "training_anomalies"]
