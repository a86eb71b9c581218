"""The depth sweep's synthetic-gradient model (hidden layers, as in the paper) and its result table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from distlearn.dni import LocalDNI, SyntheticGradient, build_model, split_model

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "dni_depth.json"


def _bench():
    spec = importlib.util.spec_from_file_location("dni_depth", ROOT / "benchmarks" / "dni_depth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
