"""The bench table's projection, checked against the formulas of distlearn.bench.report worked by hand."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from distlearn.bench.report import markdown, project, table_rows
from distlearn.bench.suites import SUITES
from distlearn.cli import main
from distlearn.errors import DataError

ALPHA = 20e-6
BETA_10 = 8 / 10e9  # seconds per byte at 10 Gb/s
N, B = 60_000, 128
# the single process: 1,404 updates of 128 examples in 70.2 s, so t_c = 70.2 / (1404 * 128) s per example
SINGLE = {"status": "ok", "updates": 1404, "train_seconds": 70.2, "train_examples": N}
T_C = 70.2 / (1404 * 128)
GRADIENT = 1_858_088  # bytes of a 464,522-parameter fp32 model
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def cells(line: str) -> list[str]:
    """The stripped cells of one Markdown table row (rich pads them to the column's width)."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def run(strategy: str, *flags: str, workers: int = 2, bytes_per_update: float, **extra) -> dict:
    return {
        "status": "ok",
        "strategy": strategy,
        "workers": workers,
        "flags": list(flags),
        "updates": 1404,
        "bytes_sent": bytes_per_update * 1404,
        "parameters": GRADIENT // 4,
        **extra,
    }


def test_dense_sync_is_compute_plus_the_reducers_allreduce():
    # measured at R0 = 2: all ranks send 2 (R0 - 1) n = 2 n per update, so n = GRADIENT
    ring = run("sync", "--reducer", "ring", bytes_per_update=2 * GRADIENT)
    expected = N / B * (B / 8 * T_C + 2 * 7 * ALPHA + 2 * 7 / 8 * GRADIENT * BETA_10)
    assert project(ring, SINGLE, 8, 10.0, B) == pytest.approx(expected, rel=1e-9)
    # DDP and the default reducer are gloo's ring: the same figure
    for other in (run("ddp", bytes_per_update=2 * GRADIENT), run("sync", bytes_per_update=2 * GRADIENT)):
        assert project(other, SINGLE, 8, 10.0, B) == pytest.approx(expected, rel=1e-9)


def test_at_many_workers_the_latency_bound_algorithms_project_faster_than_the_ring():
    small = 4_000  # a small model: the 2 (R - 1) messages of the ring dominate at R = 128
    ring = run("sync", "--reducer", "ring", bytes_per_update=2 * small)
    halving = run("sync", "--reducer", "rabenseifner", bytes_per_update=2 * small)
    compute = N / B * (B / 128 * T_C)
    expected_ring = compute + N / B * (2 * 127 * ALPHA + 2 * 127 / 128 * small * BETA_10)
    expected_halving = compute + N / B * (2 * 7 * ALPHA + 2 * 127 / 128 * small * BETA_10)
    assert project(ring, SINGLE, 128, 10.0, B) == pytest.approx(expected_ring, rel=1e-9)
    assert project(halving, SINGLE, 128, 10.0, B) == pytest.approx(expected_halving, rel=1e-9)
    assert expected_halving < expected_ring / 2


def test_the_shared_memory_reducers_project_as_hierarchical_on_hosts_of_the_measured_size():
    # measured at R0 = 2 on one host: at R = 8, 4 hosts of 2 ranks; shm on the memory model within each host
    # (2 n at 15.3 GB/s, 3 flag waits per 2 MiB piece of a chunk), a ring of n / 2 bytes across the 4 hosts
    memory_part = 3 * math.ceil(GRADIENT / 2 / 2**21) * 2e-6 + 2.0 * GRADIENT / 15.3e9
    network_part = 2 * 3 * ALPHA + 2 * 3 / 4 * (GRADIENT / 2) * BETA_10
    expected = N / B * (B / 8 * T_C + memory_part + network_part)
    for name in ("shm", "hierarchical"):
        row = run("sync", "--reducer", name, bytes_per_update=2 * GRADIENT)
        assert project(row, SINGLE, 8, 10.0, B) == pytest.approx(expected, rel=1e-9)
    # half the ring's bytes cross the network: faster than the flat ring over 8 ranks
    ring = run("sync", "--reducer", "ring", bytes_per_update=2 * GRADIENT)
    assert project(
        run("sync", "--reducer", "shm", bytes_per_update=2 * GRADIENT), SINGLE, 8, 10.0, B
    ) < project(ring, SINGLE, 8, 10.0, B)


def test_an_all_gathering_codec_receives_more_as_workers_grow():
    # top-k at R0 = 2 sends R0 (R0 - 1) b = 2 b bytes per update in all: b = 37,000 per rank
    topk = run("sync", "--compression", "topk", bytes_per_update=2 * 37_000)
    expected = N / B * (B / 32 * T_C + 31 * (ALPHA + 37_000 * BETA_10))
    assert project(topk, SINGLE, 32, 10.0, B) == pytest.approx(expected, rel=1e-9)
    # the same bytes allreduced (a linear codec, fp16 here) cost 2 (R-1)/R of them, not R - 1 times
    cast = run("sync", "--compression", "fp16", bytes_per_update=2 * 37_000)
    assert project(cast, SINGLE, 32, 10.0, B) < project(topk, SINGLE, 32, 10.0, B)


def test_local_sgd_pays_one_allreduce_every_k_updates():
    # averaging every 4 updates: measured bytes per update are a quarter of one allreduce's 2 n
    local = run("local-sgd", "--average-every", "4", bytes_per_update=2 * GRADIENT / 4)
    allreduce = 2 * 7 * ALPHA + 2 * 7 / 8 * GRADIENT * BETA_10
    expected = N / B * (B / 8 * T_C + allreduce / 4)
    assert project(local, SINGLE, 8, 10.0, B) == pytest.approx(expected, rel=1e-9)
    easgd = run("easgd", "--elastic-tau", "4", bytes_per_update=2 * GRADIENT / 4)
    assert project(easgd, SINGLE, 8, 10.0, B) == pytest.approx(expected, rel=1e-9)


def test_the_parameter_server_is_worker_bound_at_few_workers_and_server_bound_at_many():
    ps = run("ps", "--servers", "1", workers=3, bytes_per_update=GRADIENT)
    message = ALPHA + GRADIENT * BETA_10
    for workers in (2, 64):
        worker_bound = N / B * (B / workers * T_C + 2 * message)
        server_bound = N * workers / B * message
        assert project(ps, SINGLE, workers, 10.0, B) == pytest.approx(max(worker_bound, server_bound))
    assert N / B * (B / 2 * T_C + 2 * message) > N * 2 / B * message  # R = 2: the workers are slower
    # two servers halve the server's term; a backup worker adds its pushes; k local steps divide both terms
    two = run("ps", "--servers", "2", workers=4, bytes_per_update=GRADIENT)
    assert project(two, SINGLE, 64, 10.0, B) == pytest.approx(N * 64 / (B * 2) * message)
    backup = run("ps", "--servers", "1", "--backup-workers", "1", workers=4, bytes_per_update=GRADIENT)
    assert project(backup, SINGLE, 64, 10.0, B) == pytest.approx(N * 65 / B * message)
    local = run("ps", "--servers", "1", "--local-steps", "4", workers=3, bytes_per_update=GRADIENT)
    assert project(local, SINGLE, 64, 10.0, B) == pytest.approx(N * 64 / (B * 4) * message)


def test_what_is_not_projected():
    dense = run("sync", bytes_per_update=2 * GRADIENT)
    assert project(dense, SINGLE, 256, 10.0, B) is None  # R > B: less than one example per worker
    for strategy in ("single", "hogwild", "dni"):
        assert project(run(strategy, bytes_per_update=0), SINGLE, 8, 10.0, B) is None
    assert project({**dense, "status": "failed"}, SINGLE, 8, 10.0, B) is None


def test_render_prints_a_result_files_table_from_its_raw_results(tmp_path, capsys):
    single = {
        **SINGLE,
        "label": "single process",
        "strategy": "single",
        "workers": 1,
        "flags": [],
        "final_accuracy": 0.9,
        "time_to_target_s": 5.0,
        "samples_per_s": 2560.0,
        "bytes_sent": 0,
        "mean_staleness": None,
        "parameters": GRADIENT // 4,
    }
    ring = {
        **run("sync", "--reducer", "ring", bytes_per_update=2 * GRADIENT),
        "label": "sync, ring, R=2",
        "final_accuracy": 0.91,
        "time_to_target_s": 4.0,
        "samples_per_s": 3000.0,
        "mean_staleness": None,
        "train_examples": N,
    }
    record = {
        "suite": "quick",
        "global_batch": B,
        "target": 0.85,
        "description": "as it was run",
        "environment": {"cores": 2, "torch": "2.13.0", "git_commit": "abc"},
        "results": [single, ring],
    }
    path = tmp_path / "bench-quick-x.json"
    path.write_text(json.dumps(record))
    capsys.readouterr()
    code = main(["bench", "--render", str(path)])  # the command line, in this process
    done = capsys.readouterr()
    assert code == 0, done.err
    suite = replace(SUITES["quick"], global_batch=B, target=0.85, description="as it was run")
    assert done.out == markdown(suite, record["results"], record["environment"])
    rows = [cells(line) for line in done.out.splitlines() if line.startswith("|")]
    assert "as it was run" in done.out and ["sync, ring, R=2", "91.00%"] in [row[:2] for row in rows]
    expected_r8 = project(ring, single, 8, 10.0, B)
    line = next(row for row in rows if row[0] == "sync, ring, R=2" and "%" not in row[1])
    assert line[1] == f"{expected_r8:.3g}"
    path.write_text("{not json")
    code = main(["bench", "--render", str(path)])
    assert code != 0 and "not a result file of distlearn bench" in capsys.readouterr().err


def test_the_harness_writes_what_the_report_needs_to_know_about_each_run():
    from distlearn.bench.harness import report_fields

    assert report_fields("single", []) == {"reference": "one-process", "projection": None}
    allreduce = {"model": "allreduce", "algorithm": "backend", "every": 1}
    assert report_fields("ddp", []) == {"reference": "framework", "projection": allreduce}
    assert report_fields("sync", ["--reducer", "ring"])["projection"] == {**allreduce, "algorithm": "ring"}
    assert report_fields("local-sgd", ["--average-every", "4"])["projection"] == {**allreduce, "every": 4}
    assert report_fields("easgd", ["--elastic-tau", "8"])["projection"] == {**allreduce, "every": 8}
    assert report_fields("sync", ["--compression", "topk"])["projection"] == {"model": "all-gather"}
    assert report_fields("sync", ["--compression", "fp16"])["projection"] == allreduce
    flags = ["--servers", "2", "--backup-workers", "1", "--local-steps", "4"]
    assert report_fields("ps", flags) == {
        "reference": None,
        "projection": {"model": "parameter-server", "servers": 2, "backup_workers": 1, "local_steps": 4},
    }
    for strategy in ("hogwild", "dni"):
        assert report_fields(strategy, []) == {"reference": None, "projection": None}


def test_every_row_the_harness_writes_carries_the_report_fields_even_when_its_run_cannot_run(tmp_path):
    from distlearn.bench.harness import run_entry
    from distlearn.bench.suites import Entry

    row = run_entry(SUITES["quick"], Entry("x", "no-such-strategy", 2, ("--reducer", "tree")), tmp_path)
    assert row["status"] == "not available" and row["reference"] is None
    assert row["projection"] == {"model": "allreduce", "algorithm": "tree", "every": 1}


def test_the_report_follows_the_rows_fields_not_the_strategys_name():
    # the row of a strategy the report has never heard of, carrying a ring allreduce: projected as one
    ring = run("sync", "--reducer", "ring", bytes_per_update=2 * GRADIENT)
    renamed = {
        **run("someday", bytes_per_update=2 * GRADIENT),
        "reference": None,
        "projection": {"model": "allreduce", "algorithm": "ring", "every": 1},
    }
    assert project(renamed, SINGLE, 8, 10.0, B) == pytest.approx(project(ring, SINGLE, 8, 10.0, B), rel=0)
    assert project({**ring, "reference": None, "projection": None}, SINGLE, 8, 10.0, B) is None
    with pytest.raises(DataError, match="unknown projection model 'gossip'"):
        project({**ring, "reference": None, "projection": {"model": "gossip"}}, SINGLE, 8, 10.0, B)
    # the reference is whichever finished row says it is: ratios divide by its samples/s
    numbers = {"final_accuracy": 0.9, "time_to_target_s": None, "mean_staleness": None, "train_examples": N}
    base = {**SINGLE, **numbers, "label": "base", "strategy": "sync", "workers": 2, "flags": []}
    rows = [
        {**base, "samples_per_s": 1000.0, "bytes_sent": 0, "reference": None, "projection": None},
        {**base, "samples_per_s": 500.0, "bytes_sent": 0, "reference": "one-process", "projection": None},
        {**renamed, **numbers, "label": "other", "samples_per_s": 2000.0, "train_seconds": 1.0},
    ]
    table = {row["label"]: row for row in table_rows(rows, B)}
    assert table["other"]["vs_single"] == 4.0 and table["other"]["vs_ddp"] is None


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("bench-*.json")))
def test_a_stored_result_file_reads_the_same_with_the_fields_the_harness_writes_now(name):
    from distlearn.bench.harness import report_fields

    record = json.loads((RESULTS / name).read_text())
    now = [{**r, **report_fields(r["strategy"], r["flags"])} for r in record["results"]]
    for r in record["results"]:
        if "projection" in r:  # written by a harness that stores the fields: they must be today's fields
            fields = report_fields(r["strategy"], r["flags"])
            assert {key: r.get(key) for key in fields} == fields, r["label"]
    suite = replace(SUITES["quick"], global_batch=record["global_batch"], target=record["target"])
    env = record["environment"]
    assert markdown(suite, now, env) == markdown(suite, record["results"], env)
