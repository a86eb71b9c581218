"""Cutting a network into K stages: where the decoupled interfaces go.

A stage boundary may only fall after a non-linearity (and the pooling or dropout that follows it), so
every interface carries a layer's activation ``h_k``, as in the paper. Among the allowed cuts we choose the
``K - 1`` that minimise the largest stage's cost (multiply-accumulates per example of its linear and
convolution layers, counted on an example input), ties going to the earliest cuts: a pipeline runs at the
pace of its slowest stage.

``build_model("mlp", stages=K)`` is the paper's MNIST FCN (Jaderberg et al., 2016, section 3.1): ``K``
hidden layers of 256 units with ReLU, one per stage, the classifier in the last stage;
``batch_norm=True`` puts batch normalisation between each hidden layer's linear map and its ReLU, as the
paper's FCN has (docs/dni.md, "Where we differ"). Other names are the networks of :mod:`distlearn.models`
(``lenet`` cuts into up to 4 stages).

A residual block (:class:`distlearn.models.resnet.BasicBlock`) is one layer here: its shortcut skips its
inside, so no stage boundary may fall within it, and its output ``relu(F(x) + shortcut(x))`` is an
activation, so a boundary may fall after it. ``resnet8`` (a stem and three blocks) cuts into up to 5 stages.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from distlearn.errors import ConfigError
from distlearn.models import MLP, create_model
from distlearn.models.resnet import BasicBlock

__all__ = ["build_model", "cut_points", "layer_costs", "split_model"]

_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU)
_FOLLOWERS = (nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)
_BLOCKS = (BasicBlock,)  # kept whole (a shortcut skips their inside); they end in an activation


def _leaves(module: nn.Module) -> list[nn.Module]:
    """The module as a flat list of layers (nested ``nn.Sequential`` s opened up)."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    if isinstance(module, _BLOCKS):
        return [module]
    children = list(module.children())
    if not children:
        return [module]
    # A container that is not Sequential: accept it only when its forward is its children in order,
    # which we verify on an example in split_model.
    return [leaf for child in children for leaf in _leaves(child)]


def cut_points(layers: Sequence[nn.Module]) -> list[int]:
    """Positions ``i`` (a stage ends before ``layers[i]``) right after an activation and its pool/dropout."""
    points = []
    for index, layer in enumerate(layers):
        if isinstance(layer, (*_ACTIVATIONS, *_BLOCKS)):
            end = index + 1
            while end < len(layers) and isinstance(layers[end], _FOLLOWERS):
                end += 1
            if end < len(layers):
                points.append(end)
    return sorted(set(points))


def layer_costs(layers: Sequence[nn.Module], example: torch.Tensor) -> list[float]:
    """Multiply-accumulates per example of each layer: of its linear and convolution layers, those inside a
    residual block included; other layers count 0."""
    costs: list[float] = []
    h = example
    with torch.no_grad():
        for layer in layers:
            counted = [0.0]

            def count(module: nn.Module, _inputs: tuple, out: torch.Tensor, counted: list = counted) -> None:
                if isinstance(module, nn.Linear):
                    counted[0] += out[0].numel() * module.in_features
                else:
                    kh, kw = module.kernel_size
                    counted[0] += out[0].numel() * (module.in_channels // module.groups) * kh * kw

            hooks = [
                m.register_forward_hook(count)
                for m in layer.modules()
                if isinstance(m, (nn.Linear, nn.Conv2d))
            ]
            try:
                h = layer(h)
            finally:
                for hook in hooks:
                    hook.remove()
            costs.append(float(counted[0]))
    return costs


def split_model(model: nn.Module, stages: int, example: torch.Tensor) -> list[nn.Sequential]:
    """Cut ``model`` into ``stages`` sequential pieces sharing its parameters (the modules are not copied).

    Args:
        model: a network whose layers run in order (nested ``nn.Sequential`` s, e.g. distlearn's MLP,
            LeNet and ResNet, whose residual blocks stay whole).
        stages: ``K >= 1``.
        example: one input batch, to measure costs and to check the pieces compose to the model.
    """
    if stages < 1:
        raise ConfigError(f"--stages must be >= 1, got {stages}")
    layers = _leaves(model)
    points = cut_points(layers)
    if stages - 1 > len(points):
        raise ConfigError(
            f"{type(model).__name__} can be cut into at most {len(points) + 1} stages (after each "
            f"non-linearity), not {stages}; lower --stages or use a deeper model"
        )
    was_training = model.training
    model.eval()  # measuring costs must not move batch-norm statistics
    costs = layer_costs(layers, example)

    def largest(cuts: tuple[int, ...]) -> float:
        bounds = (0, *cuts, len(layers))
        return max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))

    best = min(itertools.combinations(points, stages - 1), key=largest)  # min keeps the first of ties
    bounds = (0, *best, len(layers))
    pieces = [nn.Sequential(*layers[a:b]) for a, b in itertools.pairwise(bounds)]
    with torch.no_grad():
        h = example
        for piece in pieces:
            piece.eval()
            h = piece(h)
        if not torch.allclose(h, model(example), atol=1e-5, rtol=1e-4):
            raise ConfigError(
                f"{type(model).__name__}'s forward is not its layers in order, so it cannot be cut into "
                "stages; write it as an nn.Sequential"
            )
    model.train(was_training)
    for piece in pieces:
        piece.train(was_training)
    return pieces


def build_model(
    name: str, *, stages: int, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
    hidden: int = 256, batch_norm: bool = False,
) -> nn.Module:  # fmt: skip
    """The network to cut: ``mlp`` is the paper's FCN with ``stages`` hidden layers of ``hidden`` units.

    ``batch_norm`` (``mlp`` only): Linear -> BatchNorm1d -> ReLU per hidden layer, as an ``nn.Sequential``
    (the linear layers are created in the same order as :class:`MLP` 's, so a seed gives them the same
    weights). Each stage keeps its layer's batch-norm statistics.
    """
    if batch_norm and name != "mlp":
        raise ConfigError(f"batch_norm is an option of the 'mlp' FCN only, not of {name!r}; drop it")
    if name == "mlp" and batch_norm:
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for _ in range(stages):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, num_classes, hidden=(hidden,) * stages)
    return create_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
