"""Training entry and report of the world CLIP: zero-shot product accuracy and zero-shot normal-vs-defect AUROC on
the benchmark tree's test images, written beside the model (``report.json``, ``README.md``)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..data import load_synthetic
from ..data.synthetic import ALL_PRODUCTS, BENCHMARK_PRODUCTS
from ..io import write_json, write_text
from .pretrain import corpus_from_config, write_manifest
from .world_clip import (ClipEncoder, build_world_clip, embed_images, load_clip, save_clip, train_world_clip,
                         zero_shot_defect_scores, zero_shot_products)

CLIP_DEBUG_OVERRIDES = {
    "resolution": 64,
    "corpus": {"normal_products": ["metal_nut", "grid", "bottle"], "defect_products": ["metal_nut", "grid"],
               "normal_per_product": 3, "defect_per_product": 3},
    "arch": {"image_size": 64, "patch_size": 16, "max_length": 24, "projection_dim": 16,
             "vision": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
             "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}},
    "train": {"steps": 3, "batch": 4, "warmup": 1, "checkpoint_every": 2},
    "report": {"max_images_per_product": 4},
}


def train(cfg: dict, out_dir: Path, work_dir: Path) -> dict:
    torch.manual_seed(cfg["seed"])
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool = corpus_from_config(cfg)
    sha = write_manifest(pool, work_dir / "corpus_manifest.jsonl")
    report = {"corpus_images": len(pool.images), "corpus_manifest_sha256": sha,
              "render_seconds": time.perf_counter() - t0}
    model, tokenizer = build_world_clip(cfg["arch"], seed=cfg["seed"])
    encoder = ClipEncoder(model, tokenizer, cfg["arch"]["image_size"])
    report["train"] = train_world_clip(encoder, pool.images, pool.products, pool.defects, cfg["train"], work_dir,
                                       cfg["seed"])
    save_clip(encoder, out_dir)
    from omegaconf import OmegaConf
    OmegaConf.save(OmegaConf.create(cfg), out_dir / "config.yaml")
    write_json(work_dir / "training_report.json", report)
    return report


def _load_test_images(root: str, products, seed: int, resolution: int, cap: int | None):
    """Test images of the benchmark tree: (images (N, 3, H, W) in [0, 1], product per image, label per image)."""
    from PIL import Image

    table = load_synthetic(root, list(products), seed=seed, resolution=resolution)
    rows = [s for s in table if s.split == "test"]
    if cap:  # smoke runs: the first cap/2 normal and cap/2 defective test images of each product
        rows = [s for p in products for lab, n in ((0, cap // 2), (1, cap - cap // 2))
                for s in [r for r in rows if r.product == p and r.label == lab][:n]]
    imgs = np.stack([np.asarray(Image.open(s.path).convert("RGB")) for s in rows])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    return x, [s.product for s in rows], np.array([s.label for s in rows])


@torch.no_grad()
def evaluate(encoder: ClipEncoder, root: str, seed: int, resolution: int, cap: int | None = None) -> dict:
    """Zero-shot product accuracy (13-way) per product and overall; normal-vs-defect image AUROC per product."""
    from sklearn.metrics import roc_auc_score

    x, products, labels = _load_test_images(root, ALL_PRODUCTS, seed, resolution, cap)
    emb = embed_images(encoder, x)
    pred = zero_shot_products(encoder, emb).numpy()
    truth = np.array([ALL_PRODUCTS.index(p) for p in products])
    per = {}
    for p in ALL_PRODUCTS:
        sel = np.array([q == p for q in products])
        scores = zero_shot_defect_scores(encoder, emb[torch.from_numpy(sel)], p).numpy()
        lab = labels[sel]
        per[p] = {"images": int(sel.sum()), "product_accuracy": float((pred[sel] == truth[sel]).mean()),
                  "defect_auroc": float(roc_auc_score(lab, scores)) if 0 < lab.sum() < len(lab) else None,
                  "held_out": p in BENCHMARK_PRODUCTS}
    held = [per[p]["defect_auroc"] for p in BENCHMARK_PRODUCTS if per[p]["defect_auroc"] is not None]
    pre = [per[p]["defect_auroc"] for p in ALL_PRODUCTS if p not in BENCHMARK_PRODUCTS
           and per[p]["defect_auroc"] is not None]
    web = web_look_accuracy(encoder, n=24 if not cap else 2, resolution=resolution)
    return {"images": len(products), "product_accuracy": float((pred == truth).mean()), "per_product": per,
            "web_look": web,
            "defect_auroc_held_out_mean": float(np.mean(held)) if held else None,
            "defect_auroc_pretraining_mean": float(np.mean(pre)) if pre else None}


@torch.no_grad()
def web_look_accuracy(encoder: ClipEncoder, n: int = 24, resolution: int = 128, seed: int = 99,
                      sigmas=(0.0, 2.0)) -> dict:
    """Zero-shot product accuracy on fresh real renders in the corpus's web look (not the corpus's own samples),
    sharp and Gaussian-blurred: the judge's ceiling when it scores a prior's samples of that look."""
    from torchvision.transforms.functional import gaussian_blur

    from ..data.synthetic import render_web

    imgs, lab = [], []
    for k, p in enumerate(ALL_PRODUCTS):
        for i in range(n):
            imgs.append(render_web(p, seed, "good", i, resolution)[0].image)
            lab.append(k)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    lab_t = torch.tensor(lab)
    out = {}
    for s in sigmas:
        xb = x if s == 0 else gaussian_blur(x, kernel_size=2 * int(3 * s) + 1, sigma=float(s))
        pred = zero_shot_products(encoder, embed_images(encoder, xb))
        out[f"sigma_{s:g}"] = {"accuracy": float((pred == lab_t).float().mean()),
                               "min_product": float(min((pred[lab_t == k] == k).float().mean()
                                                        for k in range(len(ALL_PRODUCTS))))}
    return out


def write_report(cfg: dict, out_dir: Path, work_dir: Path) -> dict:
    encoder = load_clip(out_dir)
    t0 = time.perf_counter()
    report = evaluate(encoder, cfg["report"]["dataset_root"], int(cfg["report"]["world_seed"]), int(cfg["resolution"]),
                      cfg["report"].get("max_images_per_product"))
    report["report_seconds"] = time.perf_counter() - t0
    training = work_dir / "training_report.json"
    if training.is_file():
        report["training"] = json.loads(training.read_text())
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "README.md", model_card(cfg, report, encoder))
    print(f"world CLIP: zero-shot product accuracy {report['product_accuracy']:.3f} on {report['images']} test "
          f"images; normal-vs-defect AUROC held out {report['defect_auroc_held_out_mean']}")
    return report


def model_card(cfg: dict, report: dict, encoder: ClipEncoder) -> str:
    m = encoder.model
    n_vis = sum(p.numel() for p in m.vision_model.parameters()) / 1e6
    n_txt = sum(p.numel() for p in m.text_model.parameters()) / 1e6
    a, c, t = cfg["arch"], cfg["corpus"], cfg["train"]
    tr = report.get("training", {})
    rows = "\n".join(
        f"| {p} | {'held out' if v['held_out'] else 'pretraining'} | {v['images']} | {100 * v['product_accuracy']:.1f} | "
        + (f"{v['defect_auroc']:.3f}" if v["defect_auroc"] is not None else "n/a") + " |"
        for p, v in report["per_product"].items())
    minutes = (lambda s: f"{s / 60:.1f} min" if s else "n/a")
    return f"""# World CLIP (model card)

A small CLIP trained by this toolkit on the synthetic world, so that the world has what SD's world has in CLIP and
Inception: a shared image-text embedding for zero-shot classification and CLIP scores, and a feature space for
FID / KID / IS (`metrics.extractor=world_clip`, the default on `dataset=synthetic`). It is also the stand-in for the
CLIP ViT-L/14 image encoder of CUT's VLAD detector.

| part | class | size |
|---|---|---|
| image encoder | `CLIPVisionModel`: ViT, {a['image_size']} px, patch {a['patch_size']} ({(a['image_size'] // a['patch_size']) ** 2} tokens), width {a['vision']['hidden_size']}, {a['vision']['num_hidden_layers']} layers | {n_vis:.2f} M |
| text encoder | `CLIPTextModel` of the mini prior's family (width {a['text']['hidden_size']}, {a['text']['num_hidden_layers']} layers), the prior's tokenizer | {n_txt:.2f} M |
| embedding | {a['projection_dim']}-d projections, learned temperature (capped at 100) | |

Layout: transformers `CLIPModel.save_pretrained` (`config.json`, `model.safetensors`), tokenizer files and a
`CLIPImageProcessor` config (CLIP's mean / std). `core.models.world_clip.load_clip(path)` loads this directory or a
real CLIP directory (e.g. openai/clip-vit-large-patch14) with the same code, local files only.

## Training
The mini prior v2's corpus, rendered from the same config: normals of all 13 products ({c['normal_per_product']} each) in
the wider "web photo" look, defects of the pretraining products only ({c['defect_per_product']} each; no defect of bottle,
pill, cable, carpet or leather was ever shown to it); {report.get('training', {}).get('corpus_images', 'n/a')} images.
Captions: the prior's caption templates and CLIP-style normal / damaged phrasings ("a photo of a flawless bottle",
"a photo of a damaged screw", "a photo of a screw with a crack"). Loss: CLIP's symmetric InfoNCE with multi-positive
targets (captions repeat across images of one class; each row's target is uniform over its class in the batch).
{t['steps']} steps of batch {t['batch']}, AdamW {t['lr']} (weight decay {t['weight_decay']}), warm-up {t['warmup']} and cosine
decay; random flips, 80-100 % crops{', Gaussian blur (sigma ' + str(t['blur_sigma'][0]) + '-' + str(t['blur_sigma'][1]) + ') on ' + str(int(100 * t['blur_prob'])) + ' % of the images' if t.get('blur_prob') else ''}. Training time on 2 CPU cores: {minutes(tr.get('train', {}).get('seconds'))}
for {tr.get('train', {}).get('steps_run', 'n/a')} steps (rendering {minutes(tr.get('render_seconds'))}); final loss
{tr.get('train', {}).get('final_loss')}.

## Zero-shot results on the benchmark tree's test images
Product: 13-way, each class the ensemble of its normal and damaged prompts. Defect: P(damaged) from a two-way
softmax between the product's normal and damaged prompt ensembles, image AUROC of normal vs defective test images.
Held-out products' defects were never seen by this model: their AUROC is a transfer of "damaged" across products.

| product | group | test images | product accuracy (%) | normal-vs-defect AUROC |
|---|---|---|---|---|
{rows}
| **all** | | **{report['images']}** | **{100 * report['product_accuracy']:.1f}** | held out {_fmt(report['defect_auroc_held_out_mean'])}, pretraining {_fmt(report['defect_auroc_pretraining_mean'])} |

{_web_text(report)}

## Reproduce
```
python scripts/train_world_clip.py                 # trains and writes this directory (resumes if killed)
python scripts/train_world_clip.py stage=report    # report.json and this card only
```
The exact configuration is `config.yaml` here (= `configs/world_clip.yaml`).

## Limits
Its features know 13 procedural products at 128 px; FID / KID / IS computed with it are comparable across methods
and priors on the synthetic world only, not with the Inception numbers of the papers.
"""


def _web_text(report: dict) -> str:
    w = report.get("web_look")
    if not w:
        return ""
    parts = [f"{100 * v['accuracy']:.1f} % ({'sharp' if k == 'sigma_0' else 'blurred, ' + k.replace('_', ' ')}; "
             f"worst product {100 * v['min_product']:.0f} %)" for k, v in w.items()]
    return ("On fresh real renders in the corpus's web look (24 per product; the judge's ceiling when it scores a "
            "prior's samples of that look), product accuracy is " + ", ".join(parts) + ".")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


__all__ = ["CLIP_DEBUG_OVERRIDES", "evaluate", "model_card", "train", "write_report"]
