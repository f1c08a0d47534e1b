"""LFD (segmentation/lfd.py): the parameter count, shapes, the selective fusion and OHEM by hand, a one-batch
overfit."""
from __future__ import annotations

import pytest
import torch

from segmentation.lfd import LFD, Fusion, ohem_ce


def test_size_and_shapes_match_the_paper():
    torch.manual_seed(0)
    m = LFD(2)
    n = sum(p.numel() for p in m.parameters())
    assert 0.90e6 < n < 0.98e6                       # the paper: 936 k
    out = m(torch.rand(2, 3, 64, 96))
    assert out.shape == (2, 2, 64, 96)


def test_selective_fusion_hand_worked():
    f = Fusion(4)
    with torch.no_grad():
        for p in f.point_conv.parameters():
            p.zero_()                                # logits 0: attention 1/2 everywhere
    low, high = torch.rand(2, 4, 6, 6), torch.rand(2, 4, 3, 3)
    up = torch.nn.functional.interpolate(high, size=(6, 6), mode="bilinear", align_corners=False)
    f.eval()
    assert torch.allclose(f(low, high), 0.5 * low + up, atol=1e-6)


def test_ohem_keeps_the_hard_pixels_with_the_class_weights():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1, 0] = torch.tensor([3.0, -3.0, 0.0, 4.0])       # p(class 1) = sigmoid(l)
    target = torch.tensor([[[1, 1, 0, 0]]])
    # p of the own class: 0.953, 0.047, 0.5, 0.018 -> below 0.7: pixels 1 (class 1, w 4), 2 (class 0), 3 (class 0)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none").reshape(-1)
    want = (4 * ce[1] + ce[2] + ce[3]) / 3
    assert ohem_ce(logits, target, thresh=0.7, min_kept=1).item() == pytest.approx(want.item(), rel=1e-5)
    # a threshold above 1 keeps every pixel (mean of the weighted per-pixel losses, as the official reduction)
    assert ohem_ce(logits, target, thresh=1.01, min_kept=1).item() == pytest.approx(
        ((4 * ce[0] + 4 * ce[1] + ce[2] + ce[3]) / 4).item(), rel=1e-5)
    # min_kept beyond the pixel count: the threshold is the largest probability, which itself is left out
    assert ohem_ce(logits, target, thresh=0.0, min_kept=10).item() == pytest.approx(want.item(), rel=1e-5)


def test_one_batch_overfit():
    torch.manual_seed(0)
    m = LFD(2)
    x = torch.rand(2, 3, 64, 64)
    y = torch.zeros(2, 64, 64, dtype=torch.long)
    y[:, 16:40, 24:48] = 1
    x[:, :, 16:40, 24:48] += 0.5
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
