"""Decoupled neural interfaces in one process: the mechanics against backprop, and the synthetic models learn.

* With every synthetic-gradient model replaced by an oracle that returns the true gradient, a DNI step is a
  backprop step: the weights after several steps equal those of plain backprop on the whole network to 1e-5
  (fully connected and convolutional stages, residual blocks kept whole, SGD with momentum and Adam).
* The zero-initialised synthetic gradient leaves the stages below untouched on the first step.
* The synthetic-gradient loss decreases on a fixed problem (true gradients of a fixed network), for DNI and
  cDNI, and inside a DNI run on a small learnable problem (bootstrapped targets, synthetic inputs too).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distlearn.dni import (
    LocalDNI,
    OracleGradient,
    SyntheticGradient,
    SyntheticInput,
    build_model,
    cut_points,
    split_model,
)
from distlearn.dni.stages import _leaves, layer_costs
from distlearn.errors import ConfigError
from distlearn.models import LeNet, ResNet
from distlearn.models.resnet import BasicBlock


def _problem(
    n: int = 64, classes: int = 4, side: int = 12, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, side, side, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return x, y


def _oracles(stages: list[nn.Module]) -> list[OracleGradient]:
    def upper(k: int):
        return lambda h: nn.Sequential(*stages[k + 1 :])(h)

    return [OracleGradient(upper(k), nn.functional.cross_entropy) for k in range(len(stages) - 1)]


OPTIMIZERS = {
    "momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize(
    ("name", "stages"), [("mlp", 3), ("mlp", 4), ("lenet", 3), ("lenet", 4), ("resnet8", 3)]
)  # fmt: skip
def test_oracle_gradients_give_backprop_updates(name: str, stages: int, optimizer: str) -> None:
    x, y = _problem()
    torch.manual_seed(1)
    if name == "mlp":
        model = build_model("mlp", stages=stages, image_size=12, num_classes=4, hidden=24)
    elif name == "lenet":
        model = LeNet(1, 4, channels=(4, 8), hidden=16, dropout=0.0, image_size=12)
    else:  # residual blocks with BatchNorm, cut between blocks
        model = ResNet(8, in_channels=1, num_classes=4, width=4)
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model)
    pieces = split_model(model, stages, x[:2])
    assert len(pieces) == stages
    dni = LocalDNI(
        pieces,
        example=x[:2],
        num_classes=4,
        optimizer=OPTIMIZERS[optimizer],
        gradient_models=_oracles(pieces),
    )
    backprop = OPTIMIZERS[optimizer](reference.parameters())
    for step in range(6):
        batch = slice(16 * (step % 4), 16 * (step % 4) + 16)
        result = dni.step(x[batch], y[batch])
        backprop.zero_grad()
        loss = nn.functional.cross_entropy(reference(x[batch]), y[batch])
        loss.backward()
        backprop.step()
        torch.testing.assert_close(result.loss, loss.detach(), atol=1e-5, rtol=0)
    triples = zip(model.parameters(), reference.parameters(), initial.parameters(), strict=True)
    for ours, theirs, start in triples:
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        assert not torch.equal(ours, start)  # every stage moved


def test_backprop_and_dni_differ_without_the_oracle() -> None:
    """The equivalence above is not vacuous: synthetic gradients do change the trajectory."""
    x, y = _problem()
    torch.manual_seed(1)
    model = build_model("mlp", stages=3, image_size=12, num_classes=4, hidden=24)
    reference = copy.deepcopy(model)
    dni = LocalDNI(split_model(model, 3, x[:2]), example=x[:2], num_classes=4, optimizer=OPTIMIZERS["adam"])
    backprop = OPTIMIZERS["adam"](reference.parameters())
    for _ in range(5):
        dni.step(x, y)
        backprop.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        backprop.step()
    assert not torch.allclose(model.net[1].weight, reference.net[1].weight, atol=1e-4)


def test_zero_initialised_synthetic_gradient_leaves_lower_stages_alone_at_first() -> None:
    x, y = _problem()
    torch.manual_seed(1)
    model = build_model("mlp", stages=3, image_size=12, num_classes=4, hidden=24)
    before = copy.deepcopy(model)
    pieces = split_model(model, 3, x[:2])
    dni = LocalDNI(pieces, example=x[:2], num_classes=4, optimizer=OPTIMIZERS["adam"], conditioned=True)
    assert torch.equal(dni.gradient_models[0](torch.randn(5, 24), y[:5]), torch.zeros(5, 24))
    dni.step(x, y)
    before_pieces = split_model(before, 3, x[:2])
    for stage in range(2):  # both below the top: their synthetic gradient was exactly 0
        for ours, start in zip(pieces[stage].parameters(), before_pieces[stage].parameters(), strict=True):
            assert torch.equal(ours, start)
    top_before = split_model(before, 3, x[:2])[2]
    assert not torch.equal(next(pieces[2].parameters()), next(top_before.parameters()))


@pytest.mark.parametrize("conditioned", [False, True])
@pytest.mark.parametrize("hidden", [(), (64,)])
def test_synthetic_gradient_loss_decreases_on_a_fixed_problem(conditioned: bool, hidden: tuple) -> None:
    """M(h, y) regressed on the true B * dL/dh of a fixed two-layer network over a fixed batch."""
    torch.manual_seed(0)
    h = torch.randn(128, 16)
    y = torch.randint(0, 5, (128,))
    upper = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    target = OracleGradient(upper, nn.functional.cross_entropy)(h, y)
    model = SyntheticGradient((16,), num_classes=5 if conditioned else None, hidden=hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(h, y), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(target.pow(2).mean().item())  # zero initial prediction
    if hidden:
        assert losses[-1] < 0.5 * losses[0]
    else:  # a linear M: compare with the least-squares optimum over the same features, in closed form
        features = [h, torch.ones(len(h), 1)] + ([nn.functional.one_hot(y, 5).float()] if conditioned else [])
        design = torch.cat(features, dim=1).double()
        solution = torch.linalg.lstsq(design, target.double()).solution
        optimum = (design @ solution - target.double()).pow(2).mean().item()
        assert optimum < 0.95 * losses[0]
        assert losses[-1] < optimum + 0.1 * (losses[0] - optimum)
    assert all(later <= earlier * 1.05 for earlier, later in zip(losses[::50], losses[50::50], strict=False))


def test_conditioning_helps_the_top_interface() -> None:
    """dL/dlogits = softmax - onehot(y) depends on y: the label-conditioned model fits it far better."""
    torch.manual_seed(0)
    logits = torch.randn(256, 5)
    y = torch.randint(0, 5, (256,))
    target = (torch.softmax(logits, dim=1) - nn.functional.one_hot(y, 5)).detach()
    final = {}
    for conditioned in (False, True):
        model = SyntheticGradient((5,), num_classes=5 if conditioned else None, hidden=(64,))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(400):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(logits, y), target)
            loss.backward()
            optimizer.step()
        final[conditioned] = loss.item()
    assert final[True] < 0.25 * final[False]


def test_convolutional_synthetic_gradient_shapes_and_zero_start() -> None:
    model = SyntheticGradient((4, 6, 6), num_classes=3, hidden=(8,))
    out = model(torch.randn(2, 4, 6, 6), torch.tensor([0, 2]))
    assert out.shape == (2, 4, 6, 6) and torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match="pass y"):
        model(torch.randn(2, 4, 6, 6))
    with pytest.raises(ConfigError):
        SyntheticGradient((4, 6))


@pytest.mark.parametrize("synthetic_inputs", [False, True])
def test_dni_learns_a_small_problem_and_its_synthetic_models_improve(synthetic_inputs: bool) -> None:
    """A learnable problem (labels from a fixed random network): DNI's loss falls; SG/input losses fall."""
    torch.manual_seed(0)
    x = torch.randn(256, 1, 8, 8)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    y = teacher(x).argmax(dim=1).detach()
    model = build_model("mlp", stages=3, image_size=8, num_classes=4, hidden=32)
    dni = LocalDNI(
        split_model(model, 3, x[:2]), example=x[:2], num_classes=4,
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3), sg_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
        conditioned=True, synthetic_inputs=synthetic_inputs, sg_hidden=(32,),
    )  # fmt: skip
    first = dni.step(x, y)
    losses, results = [], []
    for _ in range(150):
        result = dni.step(x, y)
        losses.append(result.loss.item())
        results.append(result)
    assert sum(losses[-10:]) / 10 < 0.6 * first.loss.item()
    assert len(results[-1].sg_losses) == 2
    if synthetic_inputs:
        assert len(first.input_losses) == 2
        for k in range(2):
            assert results[-1].input_losses[k] < 0.5 * first.input_losses[k]
    with torch.no_grad():
        accuracy = (dni(x).argmax(dim=1) == y).float().mean().item()
    assert accuracy > 0.8


def test_split_model_balances_and_refuses_impossible_cuts() -> None:
    example = torch.randn(2, 1, 28, 28)
    model = build_model("mlp", stages=3)  # 784-256-256-256-10
    pieces = split_model(model, 3, example)
    assert [sum(p.numel() for p in piece.parameters()) for piece in pieces] == [200960, 65792, 68362]
    lenet = LeNet(1, 10, dropout=0.0)
    assert len(cut_points(list(lenet.features) + list(lenet.classifier))) == 3
    with pytest.raises(ConfigError, match="at most 4 stages"):
        split_model(lenet, 5, example)
    h = example
    for piece in split_model(lenet, 4, example):
        h = piece(h)
    torch.testing.assert_close(h, lenet(example))


def test_synthetic_input_shape() -> None:
    model = SyntheticInput((1, 8, 8), (4, 3, 3), hidden=(16,))
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 4, 3, 3)


def test_a_resnet_is_cut_between_its_residual_blocks_never_inside_one() -> None:
    torch.manual_seed(0)
    resnet = ResNet(8, in_channels=3, num_classes=10)
    example = torch.randn(4, 3, 32, 32)
    layers = _leaves(resnet)
    blocks = [i for i, layer in enumerate(layers) if isinstance(layer, BasicBlock)]
    assert len(blocks) == 3  # each block is one layer: its shortcut skips its inside
    # the cuts: after the stem's ReLU and after each block but the last layer's
    assert cut_points(layers) == [3, *[i + 1 for i in blocks]]
    costs = layer_costs(layers, example)
    # worked by hand: stem 3x3x3 -> 16 on 32x32; block 1 two 3x3 16 -> 16 on 32x32; blocks 2 and 3 halve
    # the map, double the channels and add a 1x1 projection shortcut; the classifier 64 -> 10
    assert costs[0] == 32 * 32 * 16 * 27
    assert costs[blocks[0]] == 2 * 32 * 32 * 16 * 144
    assert costs[blocks[1]] == 16 * 16 * 32 * (144 + 288 + 16)
    assert costs[blocks[2]] == 8 * 8 * 64 * (288 + 576 + 32)
    assert costs[-1] == 64 * 10
    running = resnet.stem[1].running_mean.clone()
    for stages in (2, 3, 5):
        pieces = split_model(resnet, stages, example)
        assert len(pieces) == stages
        h = example
        for piece in pieces:
            piece.eval()
            h = piece(h)
        resnet.eval()
        torch.testing.assert_close(h, resnet(example))
        resnet.train()
    torch.testing.assert_close(resnet.stem[1].running_mean, running)  # measuring moved no statistics
    # two stages balance the largest: stem + block 1 (5.1M MACs) | blocks 2, 3 and the head (7.3M)
    first, _ = split_model(resnet, 2, example)
    assert sum(isinstance(layer, BasicBlock) for layer in first) == 1
    with pytest.raises(ConfigError, match="at most 5 stages"):
        split_model(resnet, 6, example)
