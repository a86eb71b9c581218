"""Models: output shapes, parameter counts from hand-written formulas, the registry, bad sizes.

Forward and backward run on every ``device`` (tests/conftest.py): the CPU always, CUDA where visible.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distlearn.errors import ConfigError
from distlearn.models import MLP, MODELS, LeNet, ResNet, count_parameters, create_model
from distlearn.models.resnet import resnet_depth_blocks
from distlearn.train import TrainConfig


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def forward_backward(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``model(x)`` on ``device``, after checking that a backward pass fills every parameter's gradient there
    with finite values."""
    model, x = model.to(device), x.to(device)
    out = model(x)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.device.type == device.type, f"{name}: no gradient on {device}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
    assert out.device.type == device.type
    return out


def test_mlp_parameter_count_and_shape(device):
    model = MLP(784, 10, hidden=(256, 128))
    assert count_parameters(model) == linear(784, 256) + linear(256, 128) + linear(128, 10)
    assert forward_backward(model, torch.randn(5, 1, 28, 28), device).shape == (5, 10)


def test_mlp_without_hidden_layers_is_logistic_regression(device):
    model = MLP(12, 3, hidden=()).to(device)
    assert count_parameters(model) == linear(12, 3)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    x = torch.randn(4, 12).to(device)
    torch.testing.assert_close(model(x), x @ layers[0].weight.T + layers[0].bias)


def test_lenet_parameter_count_and_shape(device):
    model = LeNet(1, 10, channels=(32, 64), hidden=256)
    expected = conv(1, 32, 5) + conv(32, 64, 5) + linear(64 * 5 * 5, 256) + linear(256, 10)
    assert count_parameters(model) == expected
    assert forward_backward(model, torch.randn(3, 1, 28, 28), device).shape == (3, 10)


def test_lenet5_size_matches_the_paper_layer_sizes():
    # LeNet-5's C1 (6 maps), C3 (16 maps, here fully connected to S2), F6 (120 -> 84 in the paper).
    model = LeNet(1, 10, channels=(6, 16), hidden=120, dropout=0.0)
    assert count_parameters(model) == conv(1, 6, 5) + conv(6, 16, 5) + linear(400, 120) + linear(120, 10)


def batch_norm(c: int) -> int:
    return 2 * c  # weight and bias


def basic_block(c_in: int, c_out: int) -> int:
    return conv(c_in, c_out, 3, False) + batch_norm(c_out) + conv(c_out, c_out, 3, False) + batch_norm(c_out)


def projection(c_in: int, c_out: int) -> int:
    return conv(c_in, c_out, 1, False) + batch_norm(c_out)


@pytest.mark.parametrize("depth", [8, 14, 20])
def test_resnet_parameter_count_and_shape(depth: int, device):
    n = (depth - 2) // 6
    expected = conv(3, 16, 3, False) + batch_norm(16)
    expected += n * basic_block(16, 16)
    expected += basic_block(16, 32) + projection(16, 32) + (n - 1) * basic_block(32, 32)
    expected += basic_block(32, 64) + projection(32, 64) + (n - 1) * basic_block(64, 64)
    expected += linear(64, 10)
    model = ResNet(depth)
    assert count_parameters(model) == expected
    assert forward_backward(model, torch.randn(2, 3, 32, 32), device).shape == (2, 10)
    # depth = 6n + 2 weighted layers: the stem, two 3x3 convolutions per block, the classifier
    weighted = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weighted += [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(weighted) == depth


def test_resnet_rejects_depths_not_6n_plus_2():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        resnet_depth_blocks(10)


def test_registry_names_match_the_config_choices():
    # --model takes a built-in name or an import path: the error lists every built-in one
    from distlearn.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        TrainConfig(model="no-such-model")
    for name in MODELS:
        assert name in str(error.value)
    for name in MODELS:
        TrainConfig(model=name)


@pytest.mark.parametrize(
    "name,channels,side", [("mlp", 1, 28), ("lenet", 1, 28), ("lenet", 3, 32), ("resnet8", 3, 32)]
)
def test_create_model_builds_for_the_input_shape(name: str, channels: int, side: int, device):
    model = create_model(name, in_channels=channels, num_classes=7, image_size=side)
    assert forward_backward(model, torch.randn(2, channels, side, side), device).shape == (2, 7)


def test_create_model_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="lenet"):
        create_model("alexnet")


def test_lenet_rejects_images_too_small():
    with pytest.raises(ValueError, match="12x12"):
        LeNet(1, 10, image_size=8)


def test_seed_fixes_the_initial_weights():
    torch.manual_seed(5)
    a = create_model("lenet").state_dict()
    torch.manual_seed(5)
    b = create_model("lenet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
