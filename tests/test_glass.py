"""GLASS (segmentation/glass.py): the gradient-ascent step, the ring projection, GAS, LAS's hard mining, shapes and a
one-batch overfit on a tiny backbone."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from segmentation.glass import GLASS, Discriminator, ascent_step, glass_step, global_synthesis, local_loss, \
    project_to_ring


def test_the_ascent_step_moves_every_feature_by_eta_along_its_gradient():
    torch.manual_seed(0)
    f, g = torch.randn(5, 7), torch.randn(5, 7) * torch.tensor([1e-3, 1, 10, 100, 5])[:, None]
    out = ascent_step(f, g, 0.01)
    assert torch.allclose((out - f).norm(dim=1), torch.full((5,), 0.01), atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(out - f, g, dim=1)
    assert torch.allclose(cos, torch.ones(5), atol=1e-5)


def test_projection_into_the_ring_keeps_the_direction():
    anchors = torch.zeros(4, 3)
    pts = torch.tensor([[0.1, 0, 0], [0, 0.7, 0], [0, 0, 3.0], [0.3, 0.4, 0]])      # norms 0.1, 0.7, 3.0, 0.5
    out = project_to_ring(pts, anchors, 0.5, 1.0)
    assert out.norm(dim=1).tolist() == pytest.approx([0.5, 0.7, 1.0, 0.5])
    assert torch.allclose(torch.nn.functional.normalize(out, dim=1), torch.nn.functional.normalize(pts, dim=1))
    per = project_to_ring(pts + 1, anchors + 1, torch.tensor([[0.2], [0.2], [0.2], [0.2]]), 0.4)
    assert (per - 1).norm(dim=1).tolist() == pytest.approx([0.2, 0.4, 0.4, 0.4])


def test_global_synthesis_ends_in_the_manifold_ring_and_trains_the_discriminator():
    torch.manual_seed(0)
    disc = Discriminator(6, 2, 16)
    true = torch.randn(20, 6)
    bce, gaus = global_synthesis(disc, true, true.mean(0).expand(20, 6), 0.015, 10, 0.05, "manifold",
                                 torch.tensor(1.0), torch.Generator().manual_seed(0))
    d = (gaus - true).norm(dim=1)
    assert ((d >= 0.5 - 1e-5) & (d <= 1.0 + 1e-5)).all()            # projected at step 10
    bce.backward()
    assert disc.tail.weight.grad.abs().sum() > 0
    # hypersphere: around the centre, radius [r, 2 r]
    c = torch.zeros(20, 6)
    _, g2 = global_synthesis(disc, true, c, 0.015, 5, 0.05, "hypersphere", torch.tensor(3.0))
    assert ((g2.norm(dim=1) >= 3 - 1e-5) & (g2.norm(dim=1) <= 6 + 1e-5)).all()


def test_local_loss_keeps_the_hardest_half():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x[:, :1]
    s = torch.tensor([[0.9], [0.1], [0.6], [0.2]])
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])                  # errors 0.01, 0.81, 0.36, 0.04
    from segmentation.glass import binary_focal
    got = local_loss(Fixed(), s, mask, p=0.5)
    assert got.item() == pytest.approx(binary_focal(torch.tensor([0.1, 0.6]), torch.tensor([1.0, 0.0])).item())
    assert local_loss(Fixed(), s, mask, p=0.0).item() == pytest.approx(binary_focal(s[:, 0], mask).item())


def test_glass_shapes_and_one_batch_overfit_on_a_tiny_backbone():
    torch.manual_seed(0)
    model = GLASS("resnet18", None, (2, 3), 32, 32, 1, 2, 32)
    cfg = OmegaConf.create({"radius": 0.75, "noise": 0.015, "gas_steps": 5, "eta": 0.001,
                            "distribution": "manifold", "p": 0.5})
    x = torch.rand(2, 3, 64, 64)
    aug = x.clone()
    aug[:, :, 16:40, 16:40] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    mask = torch.zeros(2, 64, 64)
    mask[:, 16:40, 16:40] = 1
    model.eval()
    maps, scores = model(x)
    assert maps.shape == (2, 64, 64) and scores.shape == (2,)
    model.train()
    f, (h, w) = model.features(x)
    centre = f.detach().view(2, h * w, -1).mean(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        loss = glass_step(model, x, aug, mask, centre, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]                   # GAS stays hard by design (the ring); LAS is learnt:
    model.eval()
    maps, _ = model(aug, sigma=0)
    assert maps[:, 16:40, 16:40].mean() > maps[:, 48:, 48:].mean()
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_gas_ascends_the_loss_of_calling_the_synthesized_features_anomalous():
    """With no noise the synthesized features start at the normal ones; one step (before any projection) raises
    BCE(disc(f), 1): the features move towards looking normal, which makes them hard anomalies."""
    torch.manual_seed(1)
    disc = Discriminator(4, 1)
    true = torch.randn(8, 4)
    before = torch.nn.functional.binary_cross_entropy(disc(true), torch.ones(8, 1))
    _, gaus = global_synthesis(disc, true, true, 0.0, 1, 0.1, "manifold", torch.tensor(1.0))
    after = torch.nn.functional.binary_cross_entropy(disc(gaus), torch.ones(8, 1))
    assert after > before
    assert torch.allclose((gaus - true).norm(dim=1), torch.full((8,), 0.1), atol=1e-5)
