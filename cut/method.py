"""CUT's generation loop (cut/model.py holds the equations). Training-free: ``train`` records the config and the
base model it will use; ``generate`` does the work.

Per image: a normal image (one of the split's normal training images: k of them under ``split=k_shot``) is encoded
and noised to t_start = T (1 - gamma); DDIM with classifier-free guidance runs from there. At every step, while the
image's optimisation has not stopped, the conditional branch runs once more with gradients; the anomaly word's 16 x 16
map (Eq. 3) gives L_att inside the foreground (Eq. 4), and z_t moves by alpha_t (Eq. 5) against its gradient, inside
the foreground; at the threshold steps the update repeats until the map's maximum reaches the threshold. The early
stop ends an image's optimisation once its attention has concentrated (10 < n_t < 50 after the first 10 steps). The
final smoothed map is the coarse annotation; the written mask is its upsampled map at ``annotation_threshold`` of its
peak.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from core.data import training_normals
from core.data.torch_dataset import PairedTransform, to_tensor
from core.data import read_image
from core.diffusion import AttentionStore, attention_control, inference_scheduler, layers_at
from core.export import GeneratedWriter, to_uint8
from core.io import write_json
from core.models import SDComponents, load_model
from core.models.slim import weights_hash
from core.models.tokenizer import token_runs
from core.runs import item_generator, positive_int, resolve_device

from .model import (activated_pixels, annotation, attention_loss, foreground_mask, masked_update, refinement_threshold,
                    smooth, step_size, stop_early, token_maps)

META = "cut.json"


# ------------------------------------------------------------------------------------------------- prompts
def class_words(cfg: DictConfig, product: str) -> str:
    words = (cfg.method.get("class_words") or {}).get(product)
    return str(words) if words else product.replace("_", " ")


def unknown_words(tokenizer, text: str) -> list[str]:
    """Words of ``text`` the tokenizer can only spell letter by letter (every token one character): words the model
    was never taught (a real CLIP tokenizer has a piece for nearly any word; the mini prior's knows its world)."""
    out = []
    for w in text.split():
        if len(w) < 2:
            continue
        ids = tokenizer(w, add_special_tokens=False).input_ids
        pieces = [tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for i in ids]
        if all(len(p) <= 1 for p in pieces):
            out.append(w)
    return out


def anomaly_token(tokenizer, prompt: str, word: str) -> int:
    """Position of ``word``'s (last) token in the tokenized ``prompt`` (start token at 0); it must occur once."""
    hits = token_runs(tokenizer, prompt, word)
    if len(hits) != 1:
        raise ValueError(f"The anomaly word '{word}' occurs {len(hits)} times as tokens of the prompt '{prompt}'; "
                         f"CUT optimises its attention, so it must occur exactly once. Fix: method.generate.prompt "
                         f"with the word once, or method.generate.anomaly_word.")
    return hits[0][-1]


def build_prompt(cfg: DictConfig, comp: SDComponents, product: str) -> tuple[str, int]:
    g = cfg.method.generate
    cls = class_words(cfg, product)
    bad = unknown_words(comp.tokenizer, cls)
    if bad:
        raise ValueError(f"The prior's tokenizer cannot say {bad} (the class words of '{product}'): it spells them letter "
                         f"by letter, so the prompt would not name the product. Fix: "
                         f"method.class_words.{product}=<words the model knows>.")
    prompt = str(g.prompt).format(cls=cls)
    return prompt, anomaly_token(comp.tokenizer, prompt, str(g.anomaly_word))


# -------------------------------------------------------------------------------------------------- train
def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Training-free: record the base model and the settings a generation will use."""
    run_dir = Path(run_dir)
    comp = load_model(cfg.model)
    build_prompt(cfg, comp, str(cfg.product))         # an unknown word or a bad prompt fails here already
    write_json(run_dir / META, {"product": str(cfg.product), "base_model": weights_hash(comp), "training": None,
                                "generate": OmegaConf.to_container(cfg.method.generate, resolve=True)})
    return run_dir


# ------------------------------------------------------------------------------------------------ generate
def anomaly_map(comp: SDComponents, layers: Sequence[str], z: torch.Tensor, t, cond: torch.Tensor, token: int,
                g: DictConfig, grad: bool) -> torch.Tensor:
    """The anomaly word's smoothed 16 x 16 map (Eq. 3) from one conditional U-Net call on ``z``: (B, h, w)."""
    store = AttentionStore(keep_grad=grad)
    with attention_control(comp.unet, layers, store=store):
        comp.unet(z, t, encoder_hidden_states=cond).sample
    a = token_maps(store.mean_map(layers), float(g.attention.scale))[..., token - 1]
    return smooth(a, int(g.attention.kernel_size), float(g.attention.sigma), str(g.attention.kernel))


def optimise_step(comp, layers, z, t, cond, token, g, fg_map, fg_latent, s: int, n_start, stopped, T: int):
    """Eq. 4-5 at step index ``s``: one update of every image still optimised, then, at a threshold step, repeated
    updates of those whose map maximum is below the threshold. Returns (z, n_t, stopped, iterations)."""
    thr = refinement_threshold(s, {int(k): float(v) for k, v in g.optimise.thresholds.items()},
                               str(g.optimise.refinement))
    iters, n_t = 0, None
    todo = ~stopped
    while todo.any():
        zz = z.detach().requires_grad_(True)
        with torch.enable_grad():
            a = anomaly_map(comp, layers, zz, t, cond, token, g, grad=True)
            loss = attention_loss(a, fg_map)
            grad = torch.autograd.grad((loss * todo).sum(), zz)[0]
        a = a.detach()
        n_cur = activated_pixels(a)
        if n_t is None:
            n_t = n_cur
            if n_start is None:
                n_start = n_t.clone()
            stopped = stopped | stop_early(s, n_t, int(g.optimise.early_stop_after), *map(int, g.optimise.early_stop))
            todo = todo & ~stopped
        alpha = step_size(int(t.flatten()[0]), n_cur, n_start, float(g.optimise.lam), 1.0 / T) * todo
        z = masked_update(z.detach(), grad, alpha, fg_latent)
        iters += 1
        if thr is None or iters >= int(g.optimise.max_refinement_iters):
            break
        peak = (a * fg_map).flatten(1).amax(1)
        todo = todo & (peak < thr)
    return z, n_t, n_start, stopped, iters


def cut_batch(comp: SDComponents, timesteps, layers: Sequence[str], cond: torch.Tensor, uncond: torch.Tensor,
              token: int, g: DictConfig, x: torch.Tensor, noise: torch.Tensor, T: int):
    """One batch of CUT from normal images ``x`` (B, 3, S, S) in [0, 1] and per-item ``noise``: encode, noise to the
    first of ``timesteps``, then per step the optimisation (while an image's has not stopped) and one guided DDIM step.
    Returns (images (B, 3, S, S), the final smoothed anomaly map (B, h, w), stopped (B,), optimisation passes)."""
    B, dev = x.shape[0], x.device
    sched = inference_scheduler(comp.scheduler.config, "ddim", str(g.timestep_spacing))
    sched.set_timesteps(int(g.num_inference_steps))
    fg = foreground_mask(x) if str(g.foreground) == "threshold" else torch.ones(B, *x.shape[-2:], device=dev)
    side = int(g.attention.resolution)
    fg_map = (F.interpolate(fg[:, None], size=(side, side), mode="area")[:, 0] > 0.5).float()
    fg_latent = (F.interpolate(fg[:, None], size=(comp.latent_size,) * 2, mode="area") > 0.5).float()
    with torch.no_grad():
        z = comp.scheduler.add_noise(comp.encode_images(x), noise, torch.tensor([int(timesteps[0])]))
    c_b, u_b = cond.expand(B, -1, -1), uncond.expand(B, -1, -1)
    stopped = torch.zeros(B, dtype=torch.bool, device=dev)
    n_start, iters, last_map = None, 0, None
    for s, t in enumerate(timesteps):
        tt = torch.full((B,), int(t), device=dev)
        if bool(g.optimise.enabled) and not stopped.all():
            z, _, n_start, stopped, k = optimise_step(comp, layers, z, tt, c_b, token, g, fg_map, fg_latent, s,
                                                      n_start, stopped, T)
            iters += k
        with torch.no_grad():
            store = AttentionStore(cond_half=True)
            with attention_control(comp.unet, layers, store=store):
                e = comp.unet(torch.cat([z, z]), torch.cat([tt, tt]), encoder_hidden_states=torch.cat([u_b, c_b])).sample
            eu, ec = e.chunk(2)
            a = token_maps(store.mean_map(layers), float(g.attention.scale))[..., token - 1]
            last_map = smooth(a, int(g.attention.kernel_size), float(g.attention.sigma), str(g.attention.kernel))
            z = sched.step(eu + float(g.guidance_scale) * (ec - eu), t, z).prev_sample
    with torch.no_grad():
        images = comp.decode_latents(z).float().clamp(0, 1)
    return images, last_map, stopped, iters


def generate(cfg: DictConfig, checkpoint: Path | None, out_dir: Path) -> Path:
    g = cfg.method.generate
    dev = resolve_device(str(cfg.device))
    comp = load_model(cfg.model).to(dev)
    for m in (comp.unet, comp.vae, comp.text_encoder):
        m.requires_grad_(False).eval()
    product = str(cfg.product)
    prompt, token = build_prompt(cfg, comp, product)
    normals = training_normals(cfg, product, "CUT starts every image from a noised normal image")
    n = positive_int(g.n_images if cfg.get("n_per_type") is None else cfg.n_per_type, "method.generate.n_images",
                     1_000_000)
    steps, T = int(g.num_inference_steps), int(comp.scheduler.config.num_train_timesteps)
    sched = inference_scheduler(comp.scheduler.config, "ddim", str(g.timestep_spacing))
    sched.set_timesteps(steps)
    t_start = T * (1 - float(g.gamma))
    timesteps = [t for t in sched.timesteps if int(t) <= t_start]
    try:
        layers = layers_at(comp.unet, comp.latent_size, [int(g.attention.resolution)])
    except KeyError as e:
        raise ValueError(f"method.generate.attention.resolution={g.attention.resolution}: {e.args[0]}") from None
    with torch.no_grad():
        cond, uncond = comp.encode_prompt([prompt]), comp.encode_prompt([""])
    folder = str(g.anomaly_type or g.anomaly_word)
    config = {"method": "cut", "product": product, "seed": int(cfg.seed), "prompt": prompt, "normals": normals,
              "generate": OmegaConf.to_container(g, resolve=True), "base_model": weights_hash(comp)}
    writer = GeneratedWriter(out_dir, product, "cut", config, str(checkpoint) if checkpoint else None, int(cfg.seed))
    tf = PairedTransform(size=comp.resolution)
    bs = int(g.batch_size)
    try:
        todo = [i for i in range(n) if not writer.is_done(folder, i)]
        for b0 in tqdm(range(0, len(todo), bs), desc=f"CUT ({product}, '{prompt}')"):
            idx = todo[b0:b0 + bs]
            gens = [item_generator(int(cfg.seed), product, folder, i) for i in idx]
            src = [int(torch.randint(len(normals), (1,), generator=q)) for q in gens]
            noise = torch.stack([torch.randn(comp.unet.config.in_channels, comp.latent_size, comp.latent_size,
                                             generator=q) for q in gens]).to(dev)
            x = torch.stack([tf.resize(to_tensor(read_image(normals[j])), False).clamp(0, 1) for j in src]).to(dev)
            images, last_map, stopped, iters = cut_batch(comp, timesteps, layers, cond, uncond, token, g, x, noise, T)
            soft = annotation(last_map, comp.resolution)
            masks = (soft >= float(g.annotation_threshold)).cpu().numpy()
            arr = to_uint8(images)
            for k, i in enumerate(idx):
                writer.write_anomaly(folder, i, arr[k], masks[k], source=normals[src[k]], prompt=prompt,
                                     optimisation_iterations=iters, stopped_early=bool(stopped[k]),
                                     mask_fraction=round(float(masks[k].mean()), 5))
        writer.finish()
    finally:
        writer.close()
    return Path(out_dir)


__all__ = ["anomaly_map", "anomaly_token", "build_prompt", "class_words", "cut_batch", "generate", "optimise_step", "train",
           "unknown_words"]
