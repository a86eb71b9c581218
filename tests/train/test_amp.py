"""Mixed precision in the trainer: ``--amp bf16|fp16`` validated, trains, stays near float32, resumes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from distlearn.amp import LossScaleGuard, Precision, check_amp
from distlearn.checkpoint import load_checkpoint
from distlearn.comm.compression import CompressedReducer, Exchange, create_compressor
from distlearn.errors import ConfigError
from distlearn.models import create_model
from distlearn.train import TrainConfig, train
from distlearn.train.config import validate_config


def config(tmp_path, **changes) -> TrainConfig:
    base = TrainConfig.build(
        dataset="fashion-mnist", model="lenet", optimizer="torch-adam", lr=3e-3, epochs=2, batch_size=32,
        augment=False, out=str(tmp_path / "run"), log_every=4, progress="off", tensorboard="off", quiet=True,
        threads=1,
    )  # fmt: skip
    return replace(base, **changes)


def test_bad_amp_values_and_combinations_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="unknown --amp 'fp8'; choose one of: none, bf16, fp16"):
        config(tmp_path, amp="fp8")
    with pytest.raises(ConfigError, match="--amp fp16 is not available with --strategy ps.*use --amp bf16"):
        TrainConfig.build(strategy="ps", workers=3, amp="fp16")
    with pytest.raises(ConfigError, match="--strategy dni.*use --amp none"):
        TrainConfig.build(strategy="dni", workers=2, amp="bf16")
    with pytest.raises(ConfigError, match="step\\(closure\\).*use --amp bf16"):
        validate_config(config(tmp_path, optimizer="cg-fr", amp="fp16"))
    validate_config(config(tmp_path, optimizer="cg-fr", amp="bf16"))  # no scaler: closures are fine
    with pytest.raises(ConfigError, match="step\\(closure\\)"):
        Precision("fp16", "cpu", closure=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_autocast_on_a_device_torch_cannot_use_is_a_config_error():
    with pytest.raises(ConfigError, match="--amp bf16.*cuda"):
        check_amp("bf16", "cuda")


def test_bf16_and_fp16_forward_and_gradients_stay_near_float32():
    """LeNet on one batch: autocast logits, loss and gradient direction against float32 (bf16 keeps 8
    mantissa bits, fp16 11: relative errors of a few 1e-3 per operation)."""
    torch.manual_seed(0)
    model = create_model("lenet", in_channels=1, num_classes=10, image_size=28).eval()  # no dropout
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def run(amp: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model.zero_grad()
        precision = Precision(amp, "cpu")
        with precision.autocast():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
        loss.backward()  # unscaled: compares the gradients themselves
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        return logits.float(), loss.detach(), grad

    logits32, loss32, grad32 = run("none")
    for amp, dtype, tolerance in (("bf16", torch.bfloat16, 3e-2), ("fp16", torch.float16, 5e-3)):
        logits, loss, grad = run(amp)
        assert logits.dtype == torch.float32
        scale = logits32.abs().max()
        assert (logits - logits32).abs().max() <= tolerance * scale, amp
        assert loss == pytest.approx(loss32.item(), rel=tolerance), amp
        cosine = nn.functional.cosine_similarity(grad, grad32, dim=0)
        assert cosine > 1 - tolerance, (amp, cosine)
        assert not torch.equal(grad, grad32), f"{amp}: autocast changed nothing ({dtype})"


@pytest.fixture(scope="module")
def two_epoch_runs(tmp_path_factory, synthetic) -> dict:
    """{amp: the result of its 2-epoch run}, for none, bf16 and fp16: trained once for this module's tests
    (the fp16 run is also the uninterrupted run the resumed one must equal)."""
    train_set, test_set = synthetic
    tmp_path = tmp_path_factory.mktemp("amp")
    return {
        amp: train(config(tmp_path / amp, amp=amp), train_data=train_set, test_data=test_set)
        for amp in ("none", "bf16", "fp16")
    }


@pytest.mark.timeout(240)
def test_amp_runs_learn_and_end_near_the_float32_run(two_epoch_runs):
    results = two_epoch_runs
    for amp, result in results.items():
        first, last = result.evaluations[0].loss, result.evaluations[-1].loss
        assert result.test_accuracy >= 0.9, amp  # 4 classes: chance is 0.25
        assert last < first or last < 0.05, amp
    for amp in ("bf16", "fp16"):
        assert results[amp].test_loss == pytest.approx(results["none"].test_loss, abs=0.05), amp
        a = torch.cat([p.detach().reshape(-1) for p in results[amp].model.parameters()])
        b = torch.cat([p.detach().reshape(-1) for p in results["none"].model.parameters()])
        assert not torch.equal(a, b), amp  # autocast did run
        assert (a - b).norm() <= 0.25 * b.norm(), amp  # Adam: small differences steer each step a little


@pytest.mark.timeout(240)
def test_fp16_resumes_bitwise_with_its_scaler_and_refuses_another_amp(tmp_path, synthetic, two_epoch_runs):
    train_set, test_set = synthetic
    whole = two_epoch_runs["fp16"]  # config(..., amp="fp16", epochs=2) from start to end
    first = train(config(tmp_path / "part", amp="fp16", epochs=1), train_data=train_set, test_data=test_set)
    checkpoint = load_checkpoint(first.checkpoint)
    assert checkpoint["amp"]["amp"] == "fp16" and checkpoint["amp"]["scaler"]["scale"] > 0
    resumed = train(
        config(tmp_path / "part", amp="fp16", epochs=2, resume=str(first.checkpoint)),
        train_data=train_set,
        test_data=test_set,
    )
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="written with --amp fp16 but this run has --amp none"):
        train(
            config(tmp_path / "part", amp="none", epochs=2, resume=str(first.checkpoint)),
            train_data=train_set,
            test_data=test_set,
        )


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
def test_the_guard_unscales_flags_and_restores_the_codec_state(device):
    """LossScaleGuard alone, in one process: buckets divided by S exactly, an inf noted and zeroed before
    encoding, the skip restores the codec's state and fills the buckets with NaN; a clean step keeps the
    state. On CUDA the per-bucket work makes no host synchronisation."""
    scale = 2.0**4
    reducer = CompressedReducer(create_compressor("topk", density=0.5))
    guard = LossScaleGuard(torch.amp.GradScaler(device, init_scale=scale), reducer)
    generator = torch.Generator().manual_seed(0)
    g1, g2 = torch.randn(10, generator=generator), torch.randn(6, generator=generator)
    reducer.reduce_bucket(
        g1.clone(), Exchange()
    )  # the codec now has a residual (one process: its round trip)
    snapshot = reducer.state_dict()
    b1, b2 = (g1 * scale).to(device), (g2 * scale).to(device)
    b2[3] = float("inf")
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        guard.unscale(b1)
        guard.unscale(b2)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(b1.cpu(), g1)
    assert torch.isfinite(b2).all() and b2[3] == 0 and torch.equal(b2.cpu()[:3], g2[:3])
    reducer.reduce_bucket(g1.clone(), Exchange())  # the step's encode changes the residual ...
    assert not torch.equal(
        reducer.state_dict()["error_feedback"]["residuals"]["flat10"],
        snapshot["error_feedback"]["residuals"]["flat10"],
    )
    assert guard.settle([b1, b2]).item() == scale
    assert guard.skipped == 1 and b1.isnan().all() and b2.isnan().all()
    restored = reducer.state_dict()["error_feedback"]  # ... and the skip undoes it
    assert torch.equal(restored["residuals"]["flat10"], snapshot["error_feedback"]["residuals"]["flat10"])
    assert restored["steps"] == snapshot["error_feedback"]["steps"]
    clean = (g1 * scale).to(device)
    guard.unscale(clean)
    reducer.reduce_bucket(g1.clone(), Exchange())
    changed = reducer.state_dict()
    assert guard.settle([clean]).item() == scale and guard.skipped == 1
    assert torch.equal(clean.cpu(), g1)
    assert changed["error_feedback"]["steps"] == reducer.state_dict()["error_feedback"]["steps"]
