"""The network families: shapes for every block and activation, exact parameter and FLOP counts."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the 'tune' extra (torch) is not installed")

from enserve.models.counting import flop_count, parameter_count  # noqa: E402
from enserve.models.mlp import MLP, MLPConfig  # noqa: E402
from enserve.models.resnet import ResNet, ResNetConfig  # noqa: E402
from enserve.models.resnet1d import ResNet1d, ResNet1dConfig  # noqa: E402


@pytest.mark.parametrize("block", ["v1", "v2", "next"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
def test_resnet_shapes(block, activation):
    cfg = ResNetConfig(block=block, activation=activation, filters=8, filter_step=8, blocks=(1, 2, 1, 1),
                       in_channels=1, classes=10)
    out = ResNet(cfg)(torch.zeros(5, 1, 8, 8))
    assert out.shape == (5, 10)


def test_imagenet_stem_and_bad_configs():
    cfg = ResNetConfig(filters=4, filter_step=4, small_input=False)
    assert ResNet(cfg)(torch.zeros(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="block 'v3' is not one of"):
        ResNetConfig(block="v3")
    with pytest.raises(ValueError, match="must be 4 stages of >= 1 block"):
        ResNetConfig(blocks=(1, 0, 1, 1))


def test_more_blocks_and_filters_cost_more():
    small = ResNet(ResNetConfig(filters=8, filter_step=8, blocks=(1, 1, 1, 1)))
    deep = ResNet(ResNetConfig(filters=8, filter_step=8, blocks=(2, 2, 2, 2)))
    wide = ResNet(ResNetConfig(filters=16, filter_step=16, blocks=(1, 1, 1, 1)))
    shape = (3, 32, 32)
    assert parameter_count(small) < parameter_count(deep) and parameter_count(small) < parameter_count(wide)
    assert flop_count(small, shape) < flop_count(deep, shape) and flop_count(small, shape) < flop_count(wide, shape)


def test_mlp_counts_are_exact():
    mlp = MLP(MLPConfig(features=4, classes=2, hidden=(3,)))
    assert parameter_count(mlp) == 4 * 3 + 3 + 3 * 2 + 2
    assert flop_count(mlp, (4,)) == 2 * (4 * 3 + 3 * 2)
    assert mlp(torch.zeros(7, 2, 2)).shape == (7, 2)  # inputs are flattened


def test_conv_flops_are_exact():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
                               torch.nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False))
    # 8x8 outputs: 2 * 64 * 4 * (3*3*3) + 2 * 64 * 4 * (2*3*3)
    assert flop_count(conv, (3, 8, 8)) == 2 * 64 * 4 * 27 + 2 * 64 * 4 * 18
    assert parameter_count(conv) == 4 * 3 * 9 + 4 * 2 * 9


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_resnet1d_shapes_and_exact_first_conv_flops(kernel):
    cfg = ResNet1dConfig(in_channels=2, classes=4, filters=8, filter_step=4, blocks=(1, 2, 1), kernel=kernel)
    net = ResNet1d(cfg)
    assert net(torch.zeros(5, 2, 40)).shape == (5, 4)
    stem = ResNet1d(ResNet1dConfig(in_channels=2, classes=4, filters=8, filter_step=0, blocks=(1, 1, 1), kernel=kernel))
    # the stem alone: 8 outputs x 40 positions x 2 inputs x kernel, 2 FLOPs per multiply-add
    only_stem = torch.nn.Sequential(stem.features[0])
    assert flop_count(only_stem, (2, 40)) == 2 * 8 * 40 * 2 * kernel
    assert flop_count(net, (2, 40)) > flop_count(stem, (2, 40))
    with pytest.raises(ValueError, match="kernel is 4, but must be one of"):
        ResNet1dConfig(in_channels=1, classes=2, kernel=4)
    with pytest.raises(ValueError, match="must be 3 stages of >= 1 block"):
        ResNet1dConfig(in_channels=1, classes=2, blocks=(1, 1))
