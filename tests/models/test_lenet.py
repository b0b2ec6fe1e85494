"""LeNet-5: layout, parameter count, registry entry and the last layer that last-layer Laplace selects."""

import pytest
import torch
from torch import nn

from posthoc.models import LeNet, build_model, count_parameters


def test_lenet_has_the_lenet5_layout_and_parameter_count() -> None:
    model = LeNet()
    # conv 1*6*25+6, conv 6*16*25+16, fc 256*120+120, fc 120*84+84, fc 84*10+10
    assert count_parameters(model) == 156 + 2416 + 30840 + 10164 + 850 == 44426
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 6, (5, 5), (0, 0)), (6, 16, (5, 5), (0, 0))]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 120), (120, 84), (84, 10)]
    assert list(model.children())[-1] is model.fc3 and model.feature_dim == model.fc3.in_features


def test_lenet_maps_images_to_logits_and_other_sizes_build() -> None:
    torch.manual_seed(0)
    out = LeNet()(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert LeNet(n_classes=4, in_channels=3)(torch.rand(2, 3, 28, 28)).shape == (2, 4)
    with pytest.raises(RuntimeError):  # a 32x32 image gives 16*5*5 features, not 256
        LeNet()(torch.rand(1, 1, 32, 32))


def test_slices_are_plain_sequentials_sharing_parameters() -> None:
    torch.manual_seed(0)
    model = LeNet().eval()
    trunk, x = model[:-1], torch.rand(2, 1, 28, 28)
    assert type(trunk) is nn.Sequential and trunk.fc2 is model.fc2 and model[-1] is model.fc3
    torch.testing.assert_close(model[-1](trunk(x)), model(x))
    assert trunk(x).shape == (2, model.feature_dim)


def test_lenet_is_registered() -> None:
    model = build_model("lenet", n_classes=3)
    assert isinstance(model, LeNet) and model.fc3.out_features == 3


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_lenet_rejects_bad_sizes(bad) -> None:
    with pytest.raises((ValueError, TypeError)):
        LeNet(n_classes=bad)
