"""VLAD, the vision-language anomaly detector CUT trains on its generated samples (CUT, arXiv:2406.01078, Sec. 4.2 and
A.2; never released; it extends AnomalyGPT, arXiv:2308.15366).

A frozen CLIP (a local transformers ``CLIPModel``: ViT-L/14 for real data, the world CLIP on the synthetic world)
gives patch tokens from several stages of its vision tower and the image embedding; text embeddings of a normal and
an anomalous state per product come from its text tower (prompt ensembles). Trainable: one linear adapter per stage
(patch width -> the joint embedding), started from CLIP's own visual projection (a choice; the paper does not say), so
that untrained it gives CLIP's zero-shot maps.

- vision-language (Eq. 8): S_VL = softmax(F_image F_text^T)[anomalous]; M_VL = Upsample(sum over stages of
  softmax(F_hat_patch F_text^T)[anomalous]);
- vision-vision (Eq. 9), when normal shots exist: a memory bank of their adapted patch tokens per stage; M_VV =
  Upsample(sum over stages of 1 - max cosine similarity to the bank), S_VV = max M_VV;
- prediction: M = M_VL + M_VV, S = S_VL + S_VV (summed, as A.2 says);
- loss (Eq. 7): focal(S_VL, y_img) + omega (BCE(M_VL, y_pix) + adapted Dice(M_VL, y_pix)), omega = 6, the adapted
  Dice of Eq. 6 (:func:`cut.model.adapted_dice_loss`). M_VL sums the stages' probabilities; it is averaged over them
  for the pixel losses so that it stays a probability (a choice: the paper sums for prediction and is silent here).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cut.model import adapted_dice_loss

NORMAL_STATES = ("a photo of a flawless {cls}", "a photo of a perfect {cls}", "a photo of a {cls} without defect")
ANOMALOUS_STATES = ("a photo of a damaged {cls}", "a photo of a broken {cls}", "a photo of a {cls} with a defect")


class VLAD(nn.Module):
    def __init__(self, clip, stages: Sequence[int] = (1, 2, 3), temperature: float = 100.0):
        super().__init__()
        self.clip = clip
        for p in self.clip.parameters():
            p.requires_grad_(False)
        vision = clip.model.config.vision_config
        self.stages, self.temperature = [int(s) for s in stages], float(temperature)
        if not self.stages or max(self.stages) > vision.num_hidden_layers or min(self.stages) < 1:
            raise ValueError(f"VLAD stages {list(stages)} must lie in 1..{vision.num_hidden_layers} (the vision "
                             f"tower's layers)")
        dim = clip.model.config.projection_dim
        self.adapters = nn.ModuleList([nn.Linear(vision.hidden_size, dim) for _ in self.stages])
        with torch.no_grad():   # a choice: each adapter starts as CLIP's own visual projection (zero-shot maps)
            for a in self.adapters:
                a.weight.copy_(clip.model.visual_projection.weight)
                a.bias.zero_()
        self.text: dict[str, torch.Tensor] = {}
        self.bank: dict[str, list[torch.Tensor]] = {}

    # -- text ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def text_states(self, product: str) -> torch.Tensor:
        """(2, D) unit embeddings of the normal and the anomalous state of ``product`` (prompt ensembles)."""
        if product not in self.text:
            cls = product.replace("_", " ")
            self.text[product] = self.clip.class_embeds([[t.format(cls=cls) for t in NORMAL_STATES],
                                                         [t.format(cls=cls) for t in ANOMALOUS_STATES]])
        return self.text[product]

    # -- features --------------------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image embeddings (B, D) and the adapted, unit patch tokens of each stage (B, P, D)."""
        with torch.no_grad():
            out = self.clip.model.vision_model(pixel_values=self.clip.preprocess(images), output_hidden_states=True)
            image = F.normalize(self.clip.model.visual_projection(out.pooler_output), dim=-1)
            tokens = [out.hidden_states[s][:, 1:] for s in self.stages]
        return image, [F.normalize(a(t), dim=-1) for a, t in zip(self.adapters, tokens)]

    def forward(self, images: torch.Tensor, products: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per image: ``score_vl`` (B,), ``map_vl`` (B, H, W) (the stages' probabilities averaged), ``maps_vl``
        summed (B, H, W), and the patch tokens for the vision-vision branch."""
        image, patches = self.features(images)
        text = torch.stack([self.text_states(p) for p in products]).to(image)            # (B, 2, D)
        score = (self.temperature * torch.einsum("bd,bkd->bk", image, text)).softmax(-1)[:, 1]
        side = int(round(patches[0].shape[1] ** 0.5))
        probs = [(self.temperature * torch.einsum("bpd,bkd->bpk", p, text)).softmax(-1)[..., 1] for p in patches]
        stack = torch.stack(probs, 1).reshape(len(images), len(probs), side, side)
        up = F.interpolate(stack, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return {"score_vl": score, "map_vl": up.mean(1), "maps_vl": up.sum(1), "patches": patches}

    # -- vision-vision ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def remember(self, product: str, normals: torch.Tensor) -> None:
        """The memory bank B^i of ``product``: the adapted patch tokens of its normal shots, per stage."""
        _, patches = self.features(normals)
        self.bank[product] = [p.reshape(-1, p.shape[-1]) for p in patches]

    @torch.no_grad()
    def vision_vision(self, patches: Sequence[torch.Tensor], product: str, size: int) -> torch.Tensor:
        """Eq. 9: (B, size, size) = Upsample(sum over stages of 1 - max_j <f, b_j>)."""
        if product not in self.bank:
            raise KeyError(f"no memory bank for '{product}': call remember() with its normal shots first")
        side = int(round(patches[0].shape[1] ** 0.5))
        dist = [1 - (p @ b.T).amax(-1) for p, b in zip(patches, self.bank[product])]          # (B, P) each
        m = torch.stack(dist, 1).sum(1).reshape(-1, 1, side, side)
        return F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[:, 0]

    @torch.no_grad()
    def predict(self, images: torch.Tensor, product: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), scores (B,)): M_VL + M_VV and S_VL + S_VV (without a memory bank: the VL terms)."""
        out = self(images, [product] * len(images))
        maps, scores = out["maps_vl"], out["score_vl"]
        if product in self.bank:
            vv = self.vision_vision(out["patches"], product, images.shape[-1])
            maps, scores = maps + vv, scores + vv.flatten(1).amax(1)
        return maps, scores


def focal_loss(p: torch.Tensor, y: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Binary focal loss on probabilities: -(1 - p_t)^gamma log p_t, mean."""
    p = p.clamp(eps, 1 - eps)
    pt = torch.where(y > 0.5, p, 1 - p)
    return (-(1 - pt) ** gamma * pt.log()).mean()


def vlad_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, masks: torch.Tensor, omega: float = 6.0,
              beta: float = 1.0, gamma: float = 2.0) -> torch.Tensor:
    """Eq. 7: focal(S_VL, y_img) + omega (BCE(M_VL, y_pix) + adapted Dice(M_VL, y_pix))."""
    m = out["map_vl"].clamp(1e-6, 1 - 1e-6)
    bce = F.binary_cross_entropy(m, masks.float())
    return focal_loss(out["score_vl"], labels.float(), gamma) + omega * (bce + adapted_dice_loss(masks, m, beta).mean())


__all__ = ["ANOMALOUS_STATES", "NORMAL_STATES", "VLAD", "focal_loss", "vlad_loss"]
