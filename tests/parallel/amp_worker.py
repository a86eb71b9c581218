"""One rank of the mixed-precision checks (tests/parallel/test_amp_ranks.py), started as plain processes by
tests/ranks.py: ``amp_worker.py skip CODECS`` and ``amp_worker.py trainer AMP:CODEC,...``.

``trainer``: the trainer loop with ``--amp`` and the sync strategy (replicas compared every step by
``check_every=1``, and at the end here); the training loss must fall.

``unscaled``: one step of each codec with the loss scaled by ``S = 2^10`` against the same step unscaled:
the codec's residuals are bitwise equal (S times larger if the codec encoded ``S g``) and the combined
gradient is ``S`` times the unscaled one; a step with an inf leaves the codec's state as before it.

``skip``:

For each codec (``none`` for plain allreduce) it trains a small MLP in a user's loop --
``parallelize(..., grad_scaler=GradScaler("cpu"))``, fp16 autocast, several buckets with overlap -- twice:

* *injected*: at step ``K`` rank 1 alone gets an inf in one gradient (a tensor hook on one weight);
* *reference*: step ``K`` is left out on every rank (no forward, no backward, no codec call), and the scale
  is set to what the skipped step leaves (``scaler.update(new_scale=S / 2)``).

Checks (``OK <codec>: <what>`` lines, ``FAILED ...`` and exit 1 otherwise): every rank skipped step K (its
weights did not change, its scale halved); the codec's state after step K equals the state before it (and
is finite); the final weights of both runs are bitwise equal, and equal across ranks. ``topk-unguarded``
runs the injected case with the guard removed and reports that its residual was polluted: the check above
can fail.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import distlearn
from distlearn.parallel.sync import SyncDataParallel
from distlearn.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync_cases import config_for, synthetic_data  # noqa: E402

STEPS, K = 7, 3
LOCAL = 12  # examples per replica and step
BUCKET_MB = 0.005  # 5 KB: the MLP below splits into several buckets, launched from the hooks
CODEC_OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "topk": {"compression": "topk", "density": 0.05},
    "dgc": {"compression": "dgc", "density": 0.05},
    "powersgd": {"compression": "powersgd", "rank": 2},
    "qsgd": {"compression": "qsgd"},
    "onebit": {"compression": "onebit"},
}


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(LOCAL, 20, generator=generator)
    return x, (x[:, :4].sum(dim=1) > 0).long() + 2 * (x[:, 4] > 0).long()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def check(condition: bool, what: str) -> None:
    if not condition:
        print(f"FAILED {what}", flush=True)
        raise SystemExit(1)
    print(f"OK {what}", flush=True)


def tensors_of(state: Any, prefix: str = "") -> dict[str, Any]:
    """Every tensor and plain value of a nested state dict, by its path."""
    if isinstance(state, dict):
        found: dict[str, Any] = {}
        for key, value in state.items():
            found.update(tensors_of(value, f"{prefix}/{key}"))
        return found
    return {prefix: state}


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    left, right = tensors_of(a), tensors_of(b)
    if left.keys() != right.keys():
        return False
    for key, value in left.items():
        other = right[key]
        if isinstance(value, torch.Tensor):
            if not (value.shape == other.shape and torch.equal(value, other)):
                return False
        elif value != other:
            return False
    return True


def finite_state(state: dict[str, Any]) -> bool:
    return all(
        torch.isfinite(t).all()
        for t in tensors_of(state).values()
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    )


def run(codec: str, rank: int, inject: bool, guarded: bool = True) -> dict[str, Any]:
    model, optimizer = build()
    scaler = torch.amp.GradScaler("cpu", growth_interval=1000)
    options = {key: value for key, value in CODEC_OPTIONS[codec.removesuffix("-unguarded")].items()}
    model, optimizer = distlearn.parallelize(
        model, optimizer, "sync", bucket_mb=BUCKET_MB, grad_scaler=scaler, comm_timeout=60, **options
    )
    strategy = optimizer.distlearn_strategy
    if not guarded:
        strategy.bucketer.scaling = None
    codec_state = (lambda: strategy.compressor.state_dict()) if strategy.compressor is not None else dict
    seen: dict[str, Any] = {}
    try:
        for step in range(STEPS):
            if step == K and not inject:  # the reference leaves step K out, with the scale it would leave
                scaler.update(new_scale=scaler.get_scale() * 0.5)
                continue
            x, y = data(step, rank)
            if step == K:
                seen["before"] = (flat(model), codec_state(), scaler.get_scale())
            hook = None
            if step == K and rank == 1:

                def poison(grad: torch.Tensor) -> torch.Tensor:
                    grad = grad.clone()
                    grad.view(-1)[7] = float("inf")
                    return grad

                hook = model[2].weight.register_hook(poison)  # a middle bucket
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if hook is not None:
                hook.remove()
            optimizer.combine_gradients()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            if step == K:
                seen["after"] = (flat(model), codec_state(), scaler.get_scale())
        seen["final"] = flat(model)
        seen["skipped"] = getattr(strategy.bucketer.scaling, "skipped", None)
    finally:
        strategy.close()
    return seen


def replicas_equal(weights: torch.Tensor) -> bool:
    gathered = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    return all(torch.equal(w, weights) for w in gathered)


def skip(codecs: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.use_deterministic_algorithms(True)
    try:
        for codec in codecs:
            if codec.endswith("-unguarded"):
                seen = run(codec, rank, inject=True, guarded=False)
                state_before, state_after = seen["before"][1], seen["after"][1]
                polluted = not (same_state(state_before, state_after) and finite_state(state_after))
                check(polluted, f"{codec}: without the guard the codec state changes at the skipped step")
                continue
            injected = run(codec, rank, inject=True)
            reference = run(codec, rank, inject=False)
            (w0, s0, scale0), (w1, s1, scale1) = injected["before"], injected["after"]
            check(torch.equal(w0, w1), f"{codec}: step {K} skipped (weights unchanged)")
            check(scale1 == scale0 * 0.5, f"{codec}: scale halved at the skipped step")
            check(same_state(s0, s1) and finite_state(s1), f"{codec}: codec state restored and finite")
            if codec != "none":
                check(injected["skipped"] == 1, f"{codec}: the guard counted one skipped step")
            check(
                torch.equal(injected["final"], reference["final"]),
                f"{codec}: final weights equal the run without step {K}",
            )
            check(not torch.equal(injected["final"], w0), f"{codec}: the other steps trained")
            check(replicas_equal(injected["final"]), f"{codec}: replicas equal")
    finally:
        dist.destroy_process_group()


def one_step(codec: str, rank: int, scaler: Any, inf: bool = False) -> tuple[list[torch.Tensor], dict, Any]:
    """One step through parallelize(): the combined gradients, the codec's state after it, the guard."""
    model, optimizer = build()
    model, optimizer = distlearn.parallelize(
        model,
        optimizer,
        "sync",
        bucket_mb=BUCKET_MB,
        grad_scaler=scaler,
        comm_timeout=60,
        **CODEC_OPTIONS[codec],
    )
    strategy = optimizer.distlearn_strategy
    try:
        x, y = data(0, rank)
        loss = nn.functional.cross_entropy(model(x), y)
        if inf and rank == 1:
            loss = loss * float("inf")
        (loss if scaler is None else scaler.scale(loss)).backward()
        optimizer.combine_gradients()
        grads = [p.grad.clone() for p in model.parameters()]
        return grads, strategy.compressor.state_dict(), strategy.bucketer.scaling
    finally:
        strategy.close()


def unscaled(codecs: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, scale = dist.get_rank(), 2.0**10
    try:
        for codec in codecs:
            part = "error_feedback" if codec != "powersgd" else "powersgd"
            plain_grads, plain_state, guard = one_step(codec, rank, None)
            before = plain_state[part]["residuals"]
            check(guard is None and bool(before), f"{codec}: the plain run has residuals and no guard")
            grads, state, guard = one_step(codec, rank, torch.amp.GradScaler("cpu", init_scale=scale))
            after = state[part]["residuals"]
            check(
                guard.skipped == 0
                and same_state(before, after)
                and any(r.abs().max() > 0 for r in after.values()),
                f"{codec}: residuals equal the unscaled run's",
            )
            check(
                all(torch.equal(g, p * scale) for g, p in zip(grads, plain_grads, strict=True)),
                f"{codec}: gradient is S times the unscaled one",
            )
            _, state, guard = one_step(codec, rank, torch.amp.GradScaler("cpu"), inf=True)
            check(
                guard.skipped == 1 and state[part]["residuals"] == {} and state[part]["steps"] == {},
                f"{codec}: an inf step leaves the state as before",
            )
    finally:
        dist.destroy_process_group()


def trainer(out: Path, cases: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    train_set, test_set = synthetic_data()
    try:
        for case in cases:
            amp, codec = case.split(":")
            options = dict(CODEC_OPTIONS[codec], bucket_mb=BUCKET_MB, check_every=1, timeout_s=60)
            config = config_for(out / f"run-{amp}-{codec}")
            config = dataclasses.replace(config, amp=amp, steps=40, optimizer="adam", lr=0.003, log_every=8)
            result = train(
                config, strategy=SyncDataParallel(**options), train_data=train_set, test_data=test_set
            )
            check(replicas_equal(flat(result.model)), f"trainer {case}: replicas equal")
            if dist.get_rank() == 0:
                records = [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines()]
                losses = [r["loss"] for r in records if r["kind"] == "train"]
                check(
                    losses[-1] < 0.85 * losses[0],
                    f"trainer {case}: loss falls {losses[0]:.3f} -> {losses[-1]:.3f}",
                )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mode, arguments = sys.argv[1], sys.argv[2:]
    if mode == "skip":
        skip(arguments[0].split(","))
    elif mode == "unscaled":
        unscaled(arguments[0].split(","))
    elif mode == "trainer":
        trainer(Path(arguments[0]), arguments[1].split(","))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
