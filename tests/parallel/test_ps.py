"""Parameter servers: staleness, n-softsync, backup workers, k local steps, failures and resume.

Each job is one set of real processes on 127.0.0.1 (one per rank, rendezvous through the env variables, as
separate nodes would be, so a worker may die without the launcher ending the job), running several
``train()`` cases in a row (tests/parallel/ps_worker.py). Results are checked against things computed here
independently: the staleness of a round-robin schedule worked by hand, a sequential re-enactment of the
asynchronous protocol (plain and staleness-aware, k local steps), and one process with the global batch.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ps_cases import GLOBAL_BATCH, LR, STEPS, ps_config  # noqa: E402
from sync_cases import synthetic_data  # noqa: E402

from distlearn.checkpoint import read_verified  # noqa: E402
from distlearn.errors import CommError, ConfigError  # noqa: E402
from distlearn.models import create_model  # noqa: E402
from distlearn.models.transforms import BatchTransform  # noqa: E402
from distlearn.parallel import SingleProcess  # noqa: E402
from distlearn.parallel.base import epoch_batches  # noqa: E402
from distlearn.parallel.ps import ParameterServer, shard_parameters  # noqa: E402
from distlearn.train import create_optimizer, train  # noqa: E402
from ranks import run_ranks

WORKER = str(Path(__file__).resolve().parent / "ps_worker.py")
N_TRAIN = 384


def run_job(job: str, nprocs: int, out: Path, timeout: float = 240) -> list[int]:
    """Start ``nprocs`` ranks of ps_worker.py JOB and return their exit codes (stragglers are killed)."""
    return run_ranks([sys.executable, WORKER, job, str(out)], nprocs, out, timeout)


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("log*.txt")))


# -- independent references ---------------------------------------------------------------------------------


def _initial_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mlp", in_channels=1, num_classes=4, image_size=10)


def _gradient(model, params, indices, data, transform) -> list[torch.Tensor]:
    with torch.no_grad():
        for p, value in zip(model.parameters(), params, strict=True):
            p.copy_(value)
    model.zero_grad(set_to_none=True)
    x = transform(data.images[indices], None)
    torch.nn.functional.cross_entropy(model(x), data.labels[indices]).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def reenact_async(workers: int, *, local_steps: int = 1, aware: bool = False):
    """The round-robin asynchronous protocol done sequentially: returns (server weights, staleness list).

    Worker i's push p comes after worker i-1's push p; a worker computes its gradients on the weights it
    last pulled (local SGD steps in between when k > 1), the server applies lr * sum / max(1, tau).
    """
    data, _ = synthetic_data()
    transform = BatchTransform(data.mean, data.std)
    model = _initial_model()
    local = GLOBAL_BATCH // workers
    batches = [
        list(
            epoch_batches(N_TRAIN, global_batch=local * workers, seed=0, epoch=0, rank=i, world_size=workers)
        )
        for i in range(workers)
    ]
    server = [p.detach().clone() for p in model.parameters()]
    version, copies, pulled, taus = (
        0,
        [[t.clone() for t in server] for _ in range(workers)],
        [0] * workers,
        [],
    )
    for push in range(STEPS // local_steps):
        for i in range(workers):
            total = [torch.zeros_like(t) for t in server]
            for j in range(local_steps):
                g = _gradient(model, copies[i], batches[i][push * local_steps + j], data, transform)
                total = [a + b for a, b in zip(total, g, strict=True)]
                if j < local_steps - 1:
                    copies[i] = [w - LR * d for w, d in zip(copies[i], g, strict=True)]
            tau = version - pulled[i]
            scale = 1.0 / max(1, tau) if aware else 1.0
            server = [w - LR * scale * d for w, d in zip(server, total, strict=True)]
            version += 1
            copies[i], pulled[i] = [t.clone() for t in server], version
            taus.append(tau)
    return torch.cat([t.reshape(-1) for t in server]), taus


def synchronous_reference(batch_of_step) -> torch.Tensor:
    """One process, momentum SGD, the batch of step t given by ``batch_of_step(t)``."""
    data, _ = synthetic_data()
    transform = BatchTransform(data.mean, data.std)
    model = _initial_model()
    optimizer = create_optimizer("momentum", model.parameters(), lr=LR)
    for step in range(STEPS):
        indices = batch_of_step(step)
        optimizer.zero_grad(set_to_none=True)
        x = transform(data.images[indices], None)
        torch.nn.functional.cross_entropy(model(x), data.labels[indices]).backward()
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def round_robin_staleness(workers: int, pushes: int) -> list[int]:
    """Worked by hand: push t (0-based, turn order) comes from a worker that last pulled after its previous
    push, turn t - W, i.e. version t - W + 1 (or version 0 on its first push); the server is at version t,
    so the staleness is min(t, W - 1)."""
    return [min(t, workers - 1) for t in range(pushes)]


@pytest.fixture(scope="module")
def single_process_weights(tmp_path_factory) -> torch.Tensor:
    train_set, test_set = synthetic_data()
    out = tmp_path_factory.mktemp("single")
    config = ps_config(out, optimizer="momentum")
    result = train(config, strategy=SingleProcess(), train_data=train_set, test_data=test_set)
    return torch.cat([p.detach().reshape(-1) for p in result.model.parameters()])


def load(out: Path, case: str, rank: int) -> dict:
    return torch.load(out / f"{case}-rank{rank}.pt", weights_only=True)


def report(out: Path, case: str, server: int = 0) -> dict:
    return json.loads((out / case / f"ps-server{server}.json").read_text())


# -- the jobs ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_one_server_three_workers(tmp_path, single_process_weights):
    codes = run_job("one-server", 4, tmp_path)
    assert codes == [0, 0, 0, 0], logs(tmp_path)
    workers = [1, 2, 3]

    # async, round robin: staleness exactly min(t, W-1), and the weights of the sequential re-enactment
    expected_weights, expected_taus = reenact_async(3)
    assert expected_taus == round_robin_staleness(3, 3 * STEPS)
    served = report(tmp_path, "async")
    assert [u[2] for u in served["updates"]] == expected_taus
    assert [u[0] for u in served["updates"]] == list(range(3 * STEPS))  # one version per update
    assert [u[1] for u in served["updates"]] == workers * STEPS  # turn order
    assert served["version"] == 3 * STEPS and served["dropped"] == 0 and served["dead_workers"] == []
    for i, rank in enumerate(workers):
        seen = load(tmp_path, "async", rank)["staleness_seen"].reshape(-1).tolist()
        assert seen == expected_taus[i::3]  # what the server told each worker about its pushes
    last = load(tmp_path, "async", 3)  # the last push is worker 3's: it holds the final server weights
    assert float((last["weights"] - expected_weights).abs().max()) < 1e-5
    assert (expected_weights - single_process_weights).abs().max() > 1e-3  # async is not sync

    # staleness-aware: lr / staleness changes the trajectory exactly as re-enacted
    aware_weights, _ = reenact_async(3, aware=True)
    assert float((load(tmp_path, "aware", 3)["weights"] - aware_weights).abs().max()) < 1e-5
    assert float((aware_weights - expected_weights).abs().max()) > 1e-4

    # k = 3 local steps: 4 pushes per worker of the accumulated gradient
    kstep_weights, kstep_taus = reenact_async(3, local_steps=3)
    served = report(tmp_path, "kstep")
    assert served["version"] == 3 * STEPS // 3 and [u[2] for u in served["updates"]] == kstep_taus
    assert float((load(tmp_path, "kstep", 3)["weights"] - kstep_weights).abs().max()) < 1e-5
    k_bytes, one_bytes = load(tmp_path, "kstep", 1)["bytes_sent"], load(tmp_path, "async", 1)["bytes_sent"]
    numel = kstep_weights.numel()  # 12 pushes of 64 + 4n bytes against 4 (same INIT; heartbeats: 64 bytes)
    assert abs((one_bytes - k_bytes) - 8 * (64 + 4 * numel)) <= 64 * 8

    # n = R softsync is synchronous SGD with the global batch
    served = report(tmp_path, "softsync")
    assert served["version"] == STEPS and all(u[2] == 0 for u in served["updates"])
    for rank in workers:
        difference = float((load(tmp_path, "softsync", rank)["weights"] - single_process_weights).abs().max())
        assert difference < 1e-5, f"softsync worker {rank}: {difference:.2e}"

    # backup workers: R = 2 of 3; the step is on the first two gradients, exactly b = 1 dropped per step
    served = report(tmp_path, "backup")
    assert served["version"] == STEPS
    assert served["dropped_per_version"] == {str(v): 1 for v in range(STEPS)}
    assert served["pushes"] == 3 * STEPS and served["applied"] == 2 * STEPS
    assert {u[1] for u in served["updates"]} == {1, 2}  # the late worker's gradients never counted
    extended = (GLOBAL_BATCH // 2) * 3  # R + b workers of M = B / R examples
    per_epoch = N_TRAIN // extended
    orders = [torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(e)) for e in range(2)]

    def first_two(step: int) -> torch.Tensor:
        start = (step % per_epoch) * extended
        return orders[step // per_epoch][start : start + GLOBAL_BATCH]

    backup_reference = synchronous_reference(first_two)
    for rank in workers:
        difference = float((load(tmp_path, "backup", rank)["weights"] - backup_reference).abs().max())
        assert difference < 1e-5, f"backup worker {rank}: {difference:.2e}"


@pytest.mark.timeout(300)
def test_two_servers_shard_staleness_softsync_and_resume(tmp_path, single_process_weights):
    blocks_before = set(Path("/dev/shm").glob("distlearn-*"))
    codes = run_job("two-servers", 4, tmp_path)
    assert codes == [0, 0, 0, 0], logs(tmp_path)
    # the shared-memory blocks of every case were unlinked (the kernel frees them with the processes)
    assert set(Path("/dev/shm").glob("distlearn-*")) <= blocks_before
    expected_weights, expected_taus = reenact_async(2)
    for server in (0, 1):
        served = report(tmp_path, "async2", server)
        assert [u[2] for u in served["updates"]] == expected_taus
    assert float((load(tmp_path, "async2", 3)["weights"] - expected_weights).abs().max()) < 1e-5

    for rank in (2, 3):
        difference = float(
            (load(tmp_path, "softsync2", rank)["weights"] - single_process_weights).abs().max()
        )
        assert difference < 1e-5
    # same host: the payloads went through shared memory, exactly every push's gradient and every reply's
    # weights; over the backend the same run gives the same weights and moves nothing through shared memory
    for rank in (2, 3):
        shared, backend = load(tmp_path, "softsync2", rank), load(tmp_path, "softsync2-backend", rank)
        refused = load(tmp_path, "softsync2-refused", rank)
        numel = shared["weights"].numel()
        assert shared["shared_bytes"] == 2 * STEPS * 4 * numel  # pushed and pulled, both servers' shards
        assert backend["shared_bytes"] == 0 and refused["shared_bytes"] == 0
        assert torch.equal(shared["weights"], backend["weights"])
        assert torch.equal(shared["weights"], refused["weights"])
    # resumed from the step-6 checkpoint: the version count continues from 6 and ends where the run did
    for server in (0, 1):
        resumed = report(tmp_path, "resumed", server)
        assert resumed["resumed_from"] == 6 and resumed["version"] == STEPS
        # the log continues too: two gradients (one per worker) per version 0 .. 11
        assert [u[0] for u in resumed["updates"]] == [v for v in range(STEPS) for _ in (2, 3)]
    for rank in (2, 3):
        saved = load(tmp_path, "resumed", rank)
        assert saved["versions"].tolist() == [STEPS, STEPS]
        assert float((saved["weights"] - load(tmp_path, "softsync2", rank)["weights"]).abs().max()) < 1e-6

    # compressed pushes: a lossless codec (top-k at density 1) gives synchronous SGD again, through the
    # codec's encode, the byte format and the servers' decode; 1-bit pushes are ~32x smaller on the wire
    for rank in (2, 3):
        lossless = load(tmp_path, "topk-all", rank)["weights"]
        assert float((lossless - single_process_weights).abs().max()) < 1e-5
        onebit = load(tmp_path, "onebit", rank)
        assert torch.equal(onebit["weights"], load(tmp_path, "onebit", 5 - rank)["weights"])  # same pulls
        assert float((onebit["weights"] - single_process_weights).abs().max()) > 1e-4  # it is lossy
        dense, packed = load(tmp_path, "softsync2", rank)["bytes_sent"], onebit["bytes_sent"]
        numel = lossless.numel()  # both runs: one INIT of the weights (8 bytes each) and heartbeats
        init = 8 * numel
        assert (dense - init) / (packed - init) > 15, (dense, packed)
    for server in (0, 1):
        assert report(tmp_path, "onebit", server)["version"] == STEPS


@pytest.mark.timeout(300)
def test_a_dead_worker_does_not_stop_training_or_lose_server_state(tmp_path):
    codes = run_job("worker-dies", 4, tmp_path)
    assert codes == [0, 0, 0, 3], logs(tmp_path)  # rank 3 died by itself (exit 3) before its push 4
    served = report(tmp_path, "dies")
    assert served["dead_workers"] == [3] and sorted(served["done_workers"]) == [1, 2]
    assert served["version"] == served["applied"] == served["pushes"] == 2 * STEPS + 4
    assert "worker rank 3" in (tmp_path / "log0.txt").read_text()
    final = read_verified(tmp_path / "dies" / "ps-server0-final.pt")
    assert int(final["version"]) == 2 * STEPS + 4
    survivors = [load(tmp_path, "dies", rank) for rank in (1, 2)]
    for saved in survivors:
        assert saved["steps"] == STEPS
    newest = max(survivors, key=lambda s: int(s["versions"][0]))
    assert int(newest["versions"][0]) == 2 * STEPS + 4
    assert torch.equal(newest["weights"], final["flat"])  # the server's state is the survivors' result


@pytest.mark.timeout(300)
def test_a_dead_server_ends_the_workers_with_a_comm_error(tmp_path):
    started = time.monotonic()
    codes = run_job("server-dies", 2, tmp_path)
    assert codes[0] == 4 and codes[1] != 0, logs(tmp_path)
    message = (tmp_path / "rank1.txt").read_text()
    assert message.startswith("CommError: ") and "rank 0" in message, message
    assert time.monotonic() - started < 200


# -- in-process checks -----------------------------------------------------------------------------------


def test_sharding_is_greedy_largest_first_and_balanced():
    assert shard_parameters([10, 3, 7, 5], 2) == [[0, 1], [2, 3]]  # 10 | 7, 5 -> 12 | 3 -> 13 vs 12
    assert shard_parameters([4, 4, 4], 3) == [[0], [1], [2]]
    assert shard_parameters([1, 2], 3) == [[1], [0], []]
    sizes = [int(s) for s in torch.randint(1, 1000, (40,), generator=torch.Generator().manual_seed(1))]
    shards = shard_parameters(sizes, 4)
    assert sorted(i for shard in shards for i in shard) == list(range(40))
    loads = [sum(sizes[i] for i in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(sizes)  # LPT: the gap is at most one tensor


def test_bad_ps_settings_are_rejected():
    with pytest.raises(ConfigError, match="servers"):
        ParameterServer(servers=0)
    with pytest.raises(ConfigError, match="softsync"):
        ParameterServer(softsync=0)
    with pytest.raises(ConfigError, match="drop --softsync"):
        ParameterServer(softsync=2, backup_workers=1)
    with pytest.raises(ConfigError, match="--workers N"):
        ParameterServer().setup(0)


def test_push_codecs_round_trip_and_codecs_that_need_every_rank_are_refused():
    from distlearn.comm.compression import create_compressor
    from distlearn.parallel.ps import decode_push, encode_push, make_push_codec

    gradient = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    worker, server = make_push_codec("topk", {"density": 0.1}), make_push_codec("topk", {"density": 0.1})
    wire = encode_push(worker, "server0", gradient, [600, 400])
    assert wire.dtype == torch.uint8 and wire.numel() < 4 * 1000 // 4  # 100 values + 100 indices + header
    sent = decode_push(server, wire, [600, 400])
    from distlearn.comm.compression import BucketContext

    reference = create_compressor("topk", density=0.1)
    context = BucketContext("server0", [(600,), (400,)])
    expected = reference.decode(reference.encode(gradient.clone(), context), context)
    assert torch.equal(sent, expected) and int((sent != 0).sum()) == 100
    # what was not sent waits in the worker's residual and goes out with the next push
    again = decode_push(server, encode_push(worker, "server0", torch.zeros(1000), [600, 400]), [600, 400])
    assert float((sent + again + _residual(worker, "server0") - gradient).abs().max()) < 1e-6
    for name in ("powersgd", "randomk", "dgc"):
        with pytest.raises(ConfigError, match=f"--compression {name} cannot serve --strategy ps"):
            ParameterServer(compression=name)
    with pytest.raises(ConfigError, match="only apply with --compression NAME"):
        ParameterServer(compression_options={"density": 0.1})


def _residual(codec, key: str) -> torch.Tensor:
    state = codec.state_dict()
    found = [v for k, v in _flatten(state) if "resid" in k and key in k]
    assert len(found) == 1, sorted(k for k, _ in _flatten(state))
    return found[0]


def _flatten(state, prefix: str = ""):
    if isinstance(state, dict):
        for k, v in state.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(state, torch.Tensor):
        yield prefix, state


def test_settings_come_from_the_train_config(tmp_path):
    config = ps_config(tmp_path)
    config.clip_grad_norm = 1.5
    strategy = ParameterServer(run=config)
    settings = (strategy.servers, strategy.softsync, strategy.backup_workers, strategy.local_steps)
    assert settings == (1, 1, 0, 1)
    assert strategy.optimizer_spec == "sgd" and strategy.lr == LR and strategy.clip_grad_norm == 1.5
    assert strategy.out == tmp_path
    config.optimizer = "cg-fr"
    with pytest.raises(ConfigError, match="first-order"):
        ParameterServer(run=config)


def test_headers_round_trip_exactly_and_unknown_kinds_are_refused():
    from distlearn.comm.p2p import HEADER_SIZE, Header, Kind

    header = Header(Kind.PUSH, version=2**52 + 1, step=7, length=123_456_789, lr=0.1, staleness=3, sender=5)
    tensor = header.to_tensor()
    assert tensor.dtype == torch.float64 and tensor.numel() == HEADER_SIZE
    assert Header.from_tensor(tensor) == header  # integers below 2**53 survive float64 exactly
    with pytest.raises(CommError, match="unknown kind"):
        Header.from_tensor(torch.full((HEADER_SIZE,), 99.0, dtype=torch.float64))
