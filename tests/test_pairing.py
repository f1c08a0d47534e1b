"""core.data.pairing: a training mask goes onto the normal images most like its own anomaly image."""
from __future__ import annotations

import pytest
import torch

from core.data.pairing import nearest_normals


def _world():
    """Five normals of distinct flat colours at 24 px; two anomalies at 16 px: anomaly 0 is normal 3 outside its
    defect, anomaly 1 is normal 1 outside its defect; each defect is painted with the colour of another normal
    (0 and 4), large enough to pull a comparison that did not leave it out."""
    colours = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.9, 0.1], [0.5, 0.5, 0.5], [0.9, 0.1, 0.3], [1.0, 1.0, 1.0]])
    normals = colours[:, :, None, None].expand(5, 3, 24, 24).clone()
    anomalies = torch.stack([colours[3], colours[1]])[:, :, None, None].expand(2, 3, 16, 16).clone()
    masks = torch.zeros(2, 16, 16)
    masks[0, 2:12, 1:9] = 1
    masks[1, 6:16, 5:15] = 1
    anomalies[0][:, masks[0] > 0] = colours[0][:, None]
    anomalies[1][:, masks[1] > 0] = colours[4][:, None]
    return colours, normals, anomalies, masks


def test_the_nearest_normal_is_the_one_the_anomaly_looks_like_outside_its_defect():
    colours, normals, anomalies, masks = _world()
    near = nearest_normals(anomalies, masks, normals, k=5, side=8)
    assert near.shape == (2, 5)
    assert near[:, 0].tolist() == [3, 1]
    # the rest ordered by the distance of the colours, nearest first
    for i, src in enumerate((3, 1)):
        d = (colours - colours[src]).pow(2).mean(1)
        assert near[i].tolist() == torch.sort(d, stable=True).indices.tolist()
    # (n, 1, H, W) masks give the same, and k cuts the list
    assert torch.equal(nearest_normals(anomalies, masks[:, None], normals, k=2, side=8), near[:, :2])


def test_the_defect_is_left_out_of_the_distance():
    """Compared over the whole image the painted defect would win: its area is large and its colour far."""
    colours, normals, anomalies, masks = _world()
    whole = (anomalies[:, None] - torch.nn.functional.interpolate(normals, size=(16, 16), mode="area")[None]
             ).pow(2).mean((2, 3, 4))
    assert whole.argmin(1).tolist() != [3, 1]           # the test would not notice a distance over the whole image
    assert nearest_normals(anomalies, masks, normals, k=1, side=8)[:, 0].tolist() == [3, 1]
    # a cell touched by one defect pixel is left out too: a one-pixel defect (a quarter of its 8 px cell) dark
    # enough to pull the image to normal 0 if its cell counted does not move anything
    a = anomalies.clone()
    a[0][:, 15, 15] = -500.0
    m = masks.clone()
    m[0, 15, 15] = 1
    assert nearest_normals(a, m, normals, k=1, side=8)[:, 0].tolist() == [3, 1]


def test_a_defect_everywhere_compares_the_whole_image_and_ties_go_by_index():
    colours, normals, anomalies, masks = _world()
    full = torch.ones_like(masks)
    near = nearest_normals(anomalies, full, normals, k=5, side=4)
    down = torch.nn.functional.interpolate
    whole = (down(anomalies, size=(4, 4), mode="area")[:, None] - down(normals, size=(4, 4), mode="area")[None]
             ).pow(2).mean((2, 3, 4))
    assert near.tolist() == torch.sort(whole, dim=1, stable=True).indices.tolist()
    assert near[:, 0].tolist() != [3, 1]                # the defect's pixels count now
    twins = torch.cat([normals[:1], normals[:1], normals[1:]])   # normals 0 and 1 identical
    assert nearest_normals(anomalies[:1] * 0, torch.zeros(1, 16, 16), twins, k=2)[0].tolist() == [0, 1]


def test_bad_shapes_and_k_are_refused():
    colours, normals, anomalies, masks = _world()
    with pytest.raises(ValueError, match="same C"):
        nearest_normals(anomalies[:, :1], masks, normals, k=1)
    with pytest.raises(ValueError, match="do not match"):
        nearest_normals(anomalies, masks[:1], normals, k=1)
    with pytest.raises(ValueError, match=r"k=6 must be between 1 and the number of normal images \(5\)"):
        nearest_normals(anomalies, masks, normals, k=6)
