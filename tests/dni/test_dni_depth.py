"""The depth sweep's synthetic-gradient model (hidden layers, as in the paper) and its result table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from distlearn.dni import LocalDNI, SyntheticGradient, build_model, split_model
from distlearn.errors import ConfigError
from scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "dni_depth.json"


def _bench():
    return load_benchmark("dni_depth")


@pytest.mark.parametrize("conditioned", [False, True])
def test_hidden_layer_model_shapes_and_zero_output_at_start(conditioned: bool) -> None:
    torch.manual_seed(0)
    model = SyntheticGradient((256,), num_classes=10 if conditioned else None, hidden=(256, 256))
    linears = [m for m in model.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 256), (256, 256), (256, 256)]
    assert (model.label_layer is not None) == conditioned
    h, y = torch.randn(7, 256), torch.randint(0, 10, (7,))
    out = model(h, y)
    assert out.shape == (7, 256)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer: g_hat = 0 at first
    assert torch.count_nonzero(model.layers[0].weight) > 0  # the hidden layers are not zero


def test_conditioning_on_the_label_changes_the_prediction_only_for_cdni() -> None:
    torch.manual_seed(0)
    h = torch.randn(5, 256)
    y_a, y_b = torch.zeros(5, dtype=torch.long), torch.full((5,), 3)
    for conditioned in (False, True):
        model = SyntheticGradient((256,), num_classes=10 if conditioned else None, hidden=(256, 256))
        nn.init.normal_(model.layers[-1].weight, std=0.1)  # as after some training
        with torch.no_grad():
            a, b = model(h, y_a), model(h, y_b)
        assert torch.count_nonzero(a) > 0
        assert torch.equal(a, b) != conditioned, f"conditioned={conditioned}"


def test_local_dni_builds_the_sweeps_models_for_every_interface() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    stages = split_model(build_model("mlp", stages=4), 4, x)
    dni = LocalDNI(
        stages, example=x, num_classes=10, conditioned=True, sg_hidden=(256, 256),
        optimizer=lambda p: torch.optim.Adam(p, 1e-4), sg_optimizer=lambda p: torch.optim.Adam(p, 1e-3),
    )  # fmt: skip
    assert len(dni.gradient_models) == 3
    assert all(m.hidden == (256, 256) and m.num_classes == 10 for m in dni.gradient_models)
    result = dni.step(x, torch.tensor([0, 1, 2, 3]))
    assert len(result.sg_losses) == 3 and torch.isfinite(result.loss)


def test_render_gives_mean_and_sample_std_over_seeds() -> None:
    bench = _bench()
    settings = {"lr": 1e-4, "sg_lr": 1e-3, "sg_hidden": [256, 256], "batch_size": 256}
    runs = [
        {"dataset": "mnist", "depth": 3, "variant": v, "seed": s, "epochs": 2, "settings": settings,
         "test_accuracy": a, "per_epoch": [a - 0.01, a]}
        for v, s, a in [("backprop", 0, 0.80), ("backprop", 1, 0.82), ("dni", 0, 0.70), ("dni", 1, 0.74)]
    ]  # fmt: skip
    table = bench.render({"runs": runs, "commands": []})
    row = next(line for line in table.splitlines() if line.startswith("| MNIST test-set split"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # by hand: mean 81.00, sample std sqrt((1 + 1) / 1) = 1.41; DNI 72.00 +- 2.83; gaps 10, 8: 9.00 +- 1.41
    assert cells[:8] == [
        "MNIST test-set split (8,000/2,000)", "3", "2", "81.00 ± 1.41 (2)", "72.00 ± 2.83 (2)", "not run",
        "9.00 ± 1.41 (2)", "-",
    ]  # fmt: skip
    assert cells[8] == "1.00 ± 0.00 (2)"
    assert "| MNIST |" not in table


@pytest.mark.skipif(not RESULTS.exists(), reason="the sweep's result file is not there")
def test_committed_table_is_rendered_from_the_committed_results() -> None:
    results = json.loads(RESULTS.read_text())
    assert RESULTS.with_suffix(".md").read_text() == _bench().render(results, RESULTS.name)
    for part in results.get("parts", []):
        assert (RESULTS.parent / part).exists(), part


def test_batch_norm_fcn_has_one_normalised_layer_per_stage_and_the_mlps_weights() -> None:
    x = torch.randn(16, 1, 28, 28)
    torch.manual_seed(3)
    plain = build_model("mlp", stages=4)
    torch.manual_seed(3)
    model = build_model("mlp", stages=4, batch_norm=True)
    # the linear layers are drawn in the same order as the MLP's: same weights for the same seed
    plain_linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 5
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(plain_linears, linears, strict=True))
    stages = split_model(model, 4, x)
    kinds = [[type(layer).__name__ for layer in stage] for stage in stages]
    assert kinds[1:3] == [["Linear", "BatchNorm1d", "ReLU"]] * 2  # the cut falls after each ReLU
    assert kinds[0] == ["Flatten", "Linear", "BatchNorm1d", "ReLU"] and kinds[3][-1] == "Linear"
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert all(torch.equal(n.running_mean, torch.zeros(256)) for n in norms)
    dni = LocalDNI(
        stages, example=x, num_classes=10, sg_hidden=(256, 256),
        optimizer=lambda p: torch.optim.Adam(p, 1e-4), sg_optimizer=lambda p: torch.optim.Adam(p, 1e-3),
    )  # fmt: skip
    dni.step(x, torch.randint(0, 10, (16,)))
    # each stage's forward pass moved its own layer's statistics (the modules are the model's, not copies)
    assert all(torch.count_nonzero(n.running_mean) > 0 for n in norms)
    assert [sum(isinstance(m, nn.BatchNorm1d) for m in stage.modules()) for stage in dni.stages] == [1] * 4


def test_batch_norm_is_refused_for_other_models() -> None:
    with pytest.raises(ConfigError, match="mlp"):
        build_model("lenet", stages=3, batch_norm=True)


def test_render_names_the_batch_norm_setting() -> None:
    bench = _bench()
    base = {"lr": 1e-4, "sg_lr": 1e-3, "sg_hidden": [256, 256], "batch_size": 256}
    runs = [
        {"dataset": "mnist", "depth": 4, "variant": "backprop", "seed": 0, "epochs": 1, "settings": settings,
         "test_accuracy": a, "per_epoch": [a]}
        for settings, a in [(base, 0.5), ({**base, "batch_norm": True}, 0.7)]
    ]  # fmt: skip
    rows = [line for line in bench.render({"runs": runs}).splitlines() if line.startswith("| MNIST")]
    assert len(rows) == 4  # two settings, two tables
    assert sum("FCN with batch norm" in row for row in rows) == 2
    assert any("70.00 (1)" in row and "batch norm" in row for row in rows)
    assert any("50.00 (1)" in row and "batch norm" not in row for row in rows)
