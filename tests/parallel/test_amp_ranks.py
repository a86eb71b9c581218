"""fp16 loss scaling and bf16 autocast with the sync strategy on 2 ranks (plain processes, amp_worker.py).

A step where one rank's gradient holds an inf is skipped on every rank, leaves every codec's state (error
feedback residuals, DGC's momentum, PowerSGD's Q, QSGD's random stream, step counters) as it was, and the
final weights are bitwise those of the run that leaves that step out; the trainer loop with ``--amp``
keeps the replicas equal and its loss falls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distlearn
from distlearn.errors import ConfigError
from ranks import run_ranks

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "amp_worker.py")


def _run(tmp_path: Path, arguments: list[str], timeout: float) -> str:
    codes = run_ranks([sys.executable, WORKER, *arguments], 2, tmp_path, timeout=timeout)
    logs = [(tmp_path / f"log{rank}.txt").read_text() for rank in range(2)]
    assert codes == [0, 0], "\n".join(logs)
    assert "FAILED" not in "".join(logs), "\n".join(logs)
    return "".join(logs)


SKIP_CASES = [["none", "topk", "dgc"], ["powersgd", "qsgd", "onebit", "topk-unguarded"]]


@pytest.fixture(scope="module")
def skip_output(tmp_path_factory) -> str:
    """Both ranks' output of one job running the skip check for every codec of SKIP_CASES in turn (each
    codec's runs start from a fresh model and seed, as in a job of their own): one start-up, not two."""
    codecs = [codec for case in SKIP_CASES for codec in case]
    return _run(tmp_path_factory.mktemp("skip"), ["skip", ",".join(codecs)], timeout=400)


@pytest.mark.timeout(450)
@pytest.mark.parametrize("codecs", SKIP_CASES)
def test_a_step_with_an_inf_on_one_rank_is_skipped_on_every_rank_and_leaves_no_trace(skip_output, codecs):
    output = skip_output
    for codec in codecs:
        if codec.endswith("-unguarded"):  # the check can fail: without the guard the residual changes
            assert output.count(f"OK {codec}: without the guard the codec state changes") == 2, output
            continue
        for what in (
            "step 3 skipped (weights unchanged)",
            "scale halved at the skipped step",
            "codec state restored and finite",
            "final weights equal the run without step 3",
            "replicas equal",
        ):
            assert output.count(f"OK {codec}: {what}") == 2, output


@pytest.mark.timeout(300)
def test_the_trainer_with_amp_keeps_replicas_equal_and_learns(tmp_path):
    cases = ["bf16:none", "fp16:topk", "fp16:none", "bf16:powersgd"]
    output = _run(tmp_path, ["trainer", str(tmp_path), ",".join(cases)], timeout=270)
    for case in cases:
        assert output.count(f"OK trainer {case}: replicas equal") == 2, output
        assert output.count(f"OK trainer {case}: loss falls") == 1, output


@pytest.mark.timeout(200)
def test_the_codec_encodes_the_unscaled_gradient(tmp_path):
    """With the loss scaled by S = 2^10 the codec's residuals are bitwise those of the unscaled run (they
    would be S times larger if it encoded S g), and the combined gradient is S times the unscaled one."""
    output = _run(tmp_path, ["unscaled", "topk,powersgd"], timeout=180)
    for codec in ("topk", "powersgd"):
        for what in ("residuals equal the unscaled run's", "gradient is S times the unscaled one",
                     "an inf step leaves the state as before"):  # fmt: skip
            assert output.count(f"OK {codec}: {what}") == 2, output


def test_grad_scaler_is_refused_where_a_skip_could_differ_between_ranks():
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ConfigError, match="grad_scaler= works with strategy 'sync', 'ddp' or 'single', not 'local-sgd'"
    ):
        distlearn.parallelize(model, optimizer, "local-sgd", grad_scaler=torch.amp.GradScaler("cpu"))
    assert not dist.is_initialized()  # refused before any group was made


@pytest.mark.timeout(60)
def test_a_step_without_combine_gradients_says_what_to_call():
    """One process (a group of one): scaler.step() reads the gradients before optimizer.step(), so the
    strategy must have combined them already; forgetting it is a ConfigError naming the call."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    scaler = torch.amp.GradScaler("cpu")
    model, optimizer = distlearn.parallelize(
        model, torch.optim.SGD(model.parameters(), lr=0.1), grad_scaler=scaler
    )
    try:
        x = torch.randn(4, 3)
        scaler.scale(model(x).square().mean()).backward()
        with pytest.raises(ConfigError, match=r"call optimizer.combine_gradients\(\) after"):
            scaler.step(optimizer)
        scaler.update()  # ends the scaler's iteration that the error interrupted
        optimizer.zero_grad()
        before = model.weight.detach().clone()
        (gradient,) = torch.autograd.grad(model(x).square().mean(), model.weight)
        scaler.scale(model(x).square().mean()).backward()
        optimizer.combine_gradients()
        scaler.step(optimizer)
        scaler.update()
        torch.testing.assert_close(model.weight.detach(), before - 0.1 * gradient)  # unscaled, once
    finally:
        optimizer.distlearn_strategy.close()
    assert not dist.is_initialized()
