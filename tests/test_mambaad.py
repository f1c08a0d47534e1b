"""MambaAD (segmentation/mambaad.py): the selective scan against a naive loop, the scan paths, the direction
round trip, shapes, the map and a one-batch overfit on tiny sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segmentation.mambaad import (SCAN_TYPES, SS2D, MambaAD, MambaUPNet, anomaly_map, direction_sequences,
                                  distillation_loss, merge_directions, scan_order, selective_scan)


def test_selective_scan_matches_a_naive_loop():
    torch.manual_seed(0)
    b, K, d, N, L = 2, 2, 3, 4, 5
    u, delta = torch.randn(b, K * d, L), torch.randn(b, K * d, L)
    A = -torch.rand(K * d, N) - 0.1
    B, C = torch.randn(b, K, N, L), torch.randn(b, K, N, L)
    D, bias = torch.randn(K * d), torch.randn(K * d)
    y = selective_scan(u, delta, A, B, C, D, bias, True)
    want = torch.zeros(b, K * d, L)
    for i in range(b):
        for c in range(K * d):
            k = c // d
            h = torch.zeros(N)
            for t in range(L):
                dt = torch.nn.functional.softplus(delta[i, c, t] + bias[c])
                for n in range(N):
                    h[n] = torch.exp(dt * A[c, n]) * h[n] + dt * B[i, k, n, t] * u[i, c, t]
                want[i, c, t] = (C[i, k, :, t] * h).sum() + D[c] * u[i, c, t]
    assert torch.allclose(y, want, atol=1e-5)
    # without the softplus and D: delta used as given
    y2 = selective_scan(u, delta.abs(), A, B, C, None, None, False)
    assert not torch.allclose(y2, y)


def test_chunked_checkpointed_scan_gives_the_values_and_gradients_of_one_chunk():
    torch.manual_seed(1)
    b, K, d, N, L = 2, 2, 3, 4, 7                                  # 7 steps: chunks of 3 leave a remainder
    leaves = {"u": torch.randn(b, K * d, L), "delta": torch.randn(b, K * d, L), "A": -torch.rand(K * d, N) - 0.1,
              "B": torch.randn(b, K, N, L), "C": torch.randn(b, K, N, L), "D": torch.randn(K * d),
              "delta_bias": torch.randn(K * d)}
    w = torch.randn(b, K * d, L)                                   # a loss that weighs every output differently

    def run(chunk):
        x = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
        y = selective_scan(**x, delta_softplus=True, chunk=chunk)
        (y * w).sum().backward()
        return y.detach(), {k: v.grad for k, v in x.items()}

    y_one, g_one = run(L)
    for chunk in (1, 3):
        y, g = run(chunk)
        assert torch.allclose(y, y_one, atol=1e-6)
        for k in leaves:
            assert torch.allclose(g[k], g_one[k], atol=1e-5), k
    with torch.no_grad():                                          # without autograd: the same values
        assert torch.allclose(selective_scan(**leaves, chunk=3), y_one, atol=1e-6)


@pytest.mark.parametrize("kind", SCAN_TYPES)
def test_scan_orders_are_permutations_and_paths(kind):
    o = scan_order(8, kind)
    assert sorted(o.tolist()) == list(range(64))
    if kind in ("scan", "hilbert"):   # each step moves to a neighbouring cell
        r, c = o // 8, o % 8
        assert (np.abs(np.diff(r)) + np.abs(np.diff(c)) == 1).all()


def test_scan_orders_hand_worked():
    assert scan_order(3, "sweep").tolist() == list(range(9))
    assert scan_order(3, "scan").tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]
    assert scan_order(3, "zigzag").tolist() == [0, 1, 3, 6, 4, 2, 5, 7, 8]
    assert scan_order(4, "zorder").tolist()[:8] == [0, 1, 4, 5, 2, 3, 6, 7]
    assert scan_order(2, "hilbert").tolist() == [0, 2, 3, 1]
    with pytest.raises(ValueError, match="power-of-two"):
        scan_order(6, "hilbert")


@pytest.mark.parametrize("k", [2, 4, 8])
def test_directions_round_trip(k):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    order = torch.from_numpy(scan_order(4, "hilbert")).long()
    seq = direction_sequences(x, order, k)
    assert seq.shape == (2, k, 3, 16)
    assert torch.equal(seq[:, 0], x.reshape(2, 3, 16)[..., order])
    assert torch.equal(seq[:, k // 2], seq[:, 0].flip(-1))
    assert torch.allclose(merge_directions(seq, order, 4, 4), k * x.reshape(2, 3, 16), atol=1e-6)


def test_ss2d_and_the_decoder_shapes():
    torch.manual_seed(0)
    ss = SS2D(8, 4, d_state=4, scan_type="scan", num_direction=8)
    x = torch.randn(2, 4, 4, 8)
    assert ss(x).shape == (2, 4, 4, 8)
    with torch.no_grad():                                       # the gate: z = 0 gives SiLU(z) = 0, so no output
        ss.in_proj.weight[ss.d_inner:] = 0
    assert ss(x).abs().max() == 0
    dec = MambaUPNet(dims=(32, 16, 8, 4), depths=(2, 2, 3, 2), size=2, d_state=4, num_direction=4)
    outs = dec(torch.randn(2, 32, 2, 2))
    assert [tuple(o.shape) for o in outs] == [(2, 4, 16, 16), (2, 8, 8, 8), (2, 16, 4, 4)]


class _TinyTeacher(torch.nn.Module):
    """Three stages of 8 / 16 / 32 channels at strides 4 / 8 / 16 (a ResNet's stages 1-3 at an eighth of the width)."""

    def __init__(self):
        super().__init__()
        self.s1 = torch.nn.Conv2d(3, 8, 4, 4)
        self.s2 = torch.nn.Conv2d(8, 16, 2, 2)
        self.s3 = torch.nn.Conv2d(16, 32, 2, 2)

    def forward(self, x):
        a = torch.relu(self.s1(x))
        b = torch.relu(self.s2(a))
        return [a, b, torch.relu(self.s3(b))]


def _tiny_mambaad():
    torch.manual_seed(0)
    return MambaAD(_TinyTeacher(), 64, channels=(8, 16, 32), dims=(64, 32, 16, 8), depths=(2, 2, 2, 2), d_state=4,
                   num_direction=4, scan_type="scan")


def test_mambaad_matches_the_teachers_scales_and_overfits_one_batch():
    model = _tiny_mambaad()
    x = torch.rand(2, 3, 64, 64)
    ft, fs = model(x)
    assert [f.shape[1:] for f in ft] == [torch.Size([8, 16, 16]), torch.Size([16, 8, 8]), torch.Size([32, 4, 4])]
    assert [f.shape for f in fs] == [f.shape for f in ft]
    assert all(not p.requires_grad for p in model.teacher.parameters())
    with pytest.raises(ValueError, match="divisible by 32"):
        MambaAD(model.teacher, 48)
    with pytest.raises(ValueError, match="must match the teacher"):
        MambaAD(model.teacher, 64, channels=(8, 16, 32), dims=(64, 32, 16, 4))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = distillation_loss(*model(x), kind="cosine")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_distillation_loss_and_the_map_hand_worked():
    t = [torch.ones(2, 3, 4, 4)]
    s = [torch.ones(2, 3, 4, 4)]
    s[0][1, :, 0, 0] = -1.0                                     # one position of image 1 points the other way
    assert distillation_loss(t, s, 5.0, "l2").item() == pytest.approx(5 * 4 * 3 / (2 * 3 * 16))
    assert distillation_loss(t, s, 1.0, "cosine").item() == pytest.approx(2 / 32)
    m = anomaly_map(t, s, 8, sigma=0)
    assert m.shape == (2, 8, 8) and m[0].abs().max() < 1e-6 and m[1, 0, 0] == pytest.approx(2.0)
    assert m[1].argmax() == 0
