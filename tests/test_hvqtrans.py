"""HVQ-Trans (segmentation/hvqtrans.py): codebook assignment, commitment, straight-through, EMA, the class switch,
shapes and a one-batch overfit."""
from __future__ import annotations

import pytest
import torch

from segmentation.hvqtrans import HVQTrans, Quantize


def test_codebook_assignment_commitment_and_straight_through():
    q = Quantize(2, 3).eval()
    q.embed.copy_(torch.tensor([[0.0, 1.0, 5.0], [0.0, 1.0, 5.0]]))      # codewords (0,0), (1,1), (5,5) as columns
    z = torch.tensor([[[0.2, -0.1], [0.9, 1.4]], [[4.0, 6.0], [0.6, 0.6]]], requires_grad=True)
    out, diff, idx = q(z)
    assert idx.tolist() == [[0, 1], [2, 1]]
    want = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[5.0, 5.0], [1.0, 1.0]]])
    assert torch.allclose(out, want)
    assert diff.item() == pytest.approx(((want - z.detach()) ** 2).mean().item())
    out.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))                     # straight-through


def test_ema_with_decay_zero_moves_each_used_codeword_to_its_members_mean():
    q = Quantize(2, 3, decay=0.0, eps=1e-9).train()
    q.embed.copy_(torch.tensor([[0.0, 10.0, -10.0], [0.0, 10.0, -10.0]]))
    z = torch.tensor([[0.5, 0.5], [1.5, -0.5], [9.0, 11.0]])
    q(z)
    assert torch.allclose(q.embed[:, 0], torch.tensor([1.0, 0.0]), atol=1e-5)
    assert torch.allclose(q.embed[:, 1], torch.tensor([9.0, 11.0]), atol=1e-5)
    assert q.cluster_size.tolist() == pytest.approx([2.0, 1.0, 0.0])


class _Tiny(torch.nn.Module):
    """Two stages of 4 and 6 channels at strides 8 and 16 (stands in for EfficientNet-B4's four)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 8, 8), torch.nn.Conv2d(4, 6, 2, 2)

    def forward(self, x):
        a = self.a(x)
        return [a, self.b(a)]


def _model():
    torch.manual_seed(0)
    return HVQTrans(_Tiny(), 10, 4, n_classes=2, hidden=16, heads=2, ff=32, layers=2, n_embed=8, dropout=0.0)


def test_the_class_switch_picks_codebooks_and_projections():
    m = _model().eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for books in [m.top_codebooks] + list(m.level_codebooks):
            books[1].embed.mul_(0).add_(3.0)                           # class 1's codewords all (3, 3, ...)
        out0 = m(x, torch.tensor([0, 0]))
        out1 = m(x, torch.tensor([0, 1]))
    assert torch.allclose(out0["reconstruction"][0], out1["reconstruction"][0], atol=1e-6)
    assert not torch.allclose(out0["reconstruction"][1], out1["reconstruction"][1], atol=1e-3)
    assert out1["map"].shape == (2, 4, 4) and out1["reconstruction"].shape == out1["feature"].shape == (2, 10, 4, 4)


def test_one_batch_overfit_lowers_the_loss():
    m = _model().train()
    x = torch.rand(3, 3, 64, 64)
    c = torch.tensor([0, 1, 0])
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        loss = m(x, c)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(not p.requires_grad for p in m.backbone.parameters())
