"""Downstream building blocks: the DRAEM-style U-Net, the focal loss and the image-score rules."""
import math

import torch

from segmentation.scores import max_score, pooled_max_score
from segmentation.unet import DiscriminativeUNet, focal_loss


def test_unet_maps_an_image_to_two_class_logits_of_the_same_size():
    net = DiscriminativeUNet(base=4).eval()
    out = net(torch.rand(2, 3, 64, 96))
    assert out.shape == (2, 2, 64, 96)
    skip_in = [b[0].in_channels for b in net.decoder]
    assert skip_in == [64, 48, 24, 12, 8]  # up-sampled features + the skip of the same level, base 4
    try:
        net(torch.rand(1, 3, 48, 48))
    except ValueError as e:
        assert "divisible by 32" in str(e)
    else:
        raise AssertionError("a side not divisible by 32 must be rejected")


def test_focal_loss_hand_worked():
    # two pixels: class-1 logit margin log(3) -> p_1 = 3/4; target 1 then 0
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]]).T.reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    p = torch.tensor([0.75, 0.25])  # p_t of each pixel
    expected = (-(1 - p) ** 2 * p.log()).mean()
    torch.testing.assert_close(focal_loss(logits, target, gamma=2.0), expected)
    # gamma = 0 is cross-entropy
    ce = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), ce)


def test_image_scores_max_vs_average_pooled_max():
    m = torch.zeros(1, 64, 64)
    m[0, 30, 30] = 1.0  # one hot pixel
    assert max_score(m).item() == 1.0
    assert abs(pooled_max_score(m).item() - 1 / 441) < 1e-7  # 21 x 21 window, zero padding counted
    blob = torch.zeros(1, 64, 64)
    blob[0, 10:40, 10:40] = 0.8  # a region larger than the window keeps its value
    assert abs(pooled_max_score(blob).item() - 0.8) < 1e-5
