"""The ``--seeds`` summaries of benchmarks/async_bench.py and benchmarks/ps_bench.py: the mean and the sample
standard deviation over the seeds, and the Markdown tables docs/ copies, checked against ``statistics`` on
small records of the shape the scripts store (the stored files themselves: tests/test_evidence.py)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from scripts import load_benchmark

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


script = load_benchmark


def async_run(seed: int, accuracy: float, speed: float, reached: float | None) -> dict:
    return {
        "seed": seed,
        "final_accuracy": accuracy,
        "best_accuracy": accuracy + 0.01,
        "samples_per_s": speed,
        "time_to_target_s": reached,
    }


def test_async_bench_summarises_every_seed_and_renders_mean_and_std():
    bench = script("async_bench")
    accuracies = [0.84, 0.83, 0.80]
    runs = [async_run(0, 0.84, 3000.0, 10.0), async_run(1, 0.83, 2000.0, None)]
    runs.append(async_run(2, 0.80, 2500.0, 14.0))
    summary = bench.summarise(runs)
    assert summary["seeds"] == [0, 1, 2]
    assert summary["final_accuracy"] == [statistics.fmean(accuracies), statistics.stdev(accuracies)]
    assert summary["time_to_target_s"] == [12.0, statistics.stdev([10.0, 14.0])]  # the runs that reached it
    assert summary["reached"] == 2
    results = {"target": 0.8, "hogwild": {}, "averaging": {"sync": {"summary": summary}}}
    lines = bench.table(results).splitlines()
    std = 100 * statistics.stdev(accuracies)
    reached = "12.0 ± 2.8 (2 of 3 reached)"
    assert lines[2] == f"| sync | 82.33 ± {std:.2f} | 83.33 ± {std:.2f} | 2,500 ± 500 | {reached} |"
    assert "n = 3" in lines[0]


def test_ps_bench_summarises_every_variant_over_its_seeds():
    bench = script("ps_bench")
    accuracy = {}
    for name, values in (("sync", [0.75, 0.76, 0.77]), ("ps", [0.81, 0.80, 0.83])):
        runs = []
        for seed, value in enumerate(values):
            evals = [{"accuracy": 0.1, "updates": 1}, {"accuracy": value, "updates": 200 + seed}]
            runs.append({"seed": seed, "evals": evals, "train_seconds": 1.0 + seed})
            if name == "ps":
                runs[-1]["server"] = {"mean_staleness": 2.0 + seed, "max_staleness": 10 + seed, "dropped": 0}
        accuracy[name] = {"summary": bench.summarise(runs), "runs": runs}
    assert accuracy["ps"]["summary"]["final_accuracy"] == [
        statistics.fmean([0.81, 0.80, 0.83]),
        statistics.stdev([0.81, 0.80, 0.83]),
    ]
    assert "mean_staleness" not in accuracy["sync"]["summary"]  # no server in a sync run
    lines = bench.seeded_table(accuracy).splitlines()
    assert "n = 3" in lines[0] and len(lines) == 4
    assert lines[2] == "| sync | 76.00 ± 1.00 | 201 ± 1 | 2.0 ± 1.0 | – | – |"
    ps_std = 100 * statistics.stdev([0.81, 0.80, 0.83])
    assert lines[3] == f"| ps | 81.33 ± {ps_std:.2f} | 201 ± 1 | 2.0 ± 1.0 | 3.00 ± 1.00 / 11 ± 1 | 0 ± 0 |"


def test_ps_bench_codec_table_gives_each_codec_its_mean_std_and_ratio_to_dense():
    bench = script("ps_bench")
    codecs = {
        "none": {"summary": {"seeds": [0, 1, 2], "accuracy": [0.80, 0.01], "bytes_sent": [400e6, 0.0],
                             "dense_over_sent": 1.0}},
        "topk": {"summary": {"seeds": [0, 1, 2], "accuracy": [0.845, 0.005], "bytes_sent": [10e6, 0.0],
                             "dense_over_sent": 40.0}},
    }  # fmt: skip
    lines = bench.codecs_table(codecs).splitlines()
    assert "n = 3" in lines[0]
    assert lines[2:] == ["| none | 80.00 ± 1.00 | 400.0 | 1.0x |", "| topk | 84.50 ± 0.50 | 10.0 | 40.0x |"]


def test_train_accuracy_summarises_each_run_over_its_seeds():
    bench = script("train_accuracy")
    rows = [
        {"run": "mlp-mnist", "seed": seed, "test_accuracy": a, "seconds_per_epoch": [1.0, 2.0 + seed]}
        for seed, a in enumerate([0.96, 0.95, 0.97])
    ]
    rows.append({"run": "lenet", "seed": 0, "test_accuracy": 0.9, "seconds_per_epoch": [3.0]})
    mlp, lenet = bench.summarise(rows)
    assert mlp["seeds"] == [0, 1, 2] and lenet["seeds"] == [0]
    accuracy = [0.96, 0.95, 0.97]
    assert mlp["test_accuracy"] == [statistics.fmean(accuracy), statistics.stdev(accuracy)]
    assert mlp["seconds_per_epoch"][0] == statistics.fmean([1.5, 2.0, 2.5])
    assert lenet["test_accuracy"] == [0.9, 0.0]


def test_sync_scaling_reads_its_configurations_and_refuses_what_it_cannot_run():
    bench = script("sync_scaling")
    assert bench.parse_configs("1x1,1x2, 2x1,4x1") == [(1, 1), (1, 2), (2, 1), (4, 1)]
    for bad in ("2x2", "1", "0x1", "x1", "1xtwo"):
        try:
            bench.parse_configs(bad)
        except SystemExit as error:
            assert repr(bad) in str(error)
        else:
            raise AssertionError(f"{bad!r} was accepted")


def test_sync_scaling_rotates_the_order_per_seed_and_takes_each_speed_up_against_the_same_seed(monkeypatch):
    """The summary arithmetic of ``--seeds`` on records of the shape ``run`` returns (the runs themselves are
    ``distlearn train``, measured by the benchmark, not here)."""
    bench = script("sync_scaling")
    order = []
    epoch_s = {(1, 1, 0): 40.0, (2, 1, 0): 25.0, (1, 1, 1): 50.0, (2, 1, 1): 25.0}

    def fake_run(workers, args, out, threads, seed):
        order.append((workers, threads, seed))
        return {"workers": workers, "threads": threads, "seed": seed,
                "median_epoch_s": epoch_s[workers, threads, seed],
                "time_to_target_s": None if (workers, seed) == (2, 1) else 10.0 + seed,
                "final_accuracy": 0.85 + 0.01 * seed}  # fmt: skip

    monkeypatch.setattr(bench, "run", fake_run)
    args = type("Args", (), {"seeds": [0, 1], "runs": "unused"})()
    summaries = bench.run_seeds([(1, 1), (2, 1)], args)
    assert order == [(1, 1, 0), (2, 1, 0), (2, 1, 1), (1, 1, 1)]  # seed 1 starts with the second config
    two = summaries[1]
    assert two["speedup"] == [statistics.fmean([40 / 25, 50 / 25]), statistics.stdev([40 / 25, 50 / 25])]
    assert two["time_to_target_s"] == [10.0, 0.0] and two["reached"] == 1
    lines = bench.seeds_table(summaries, 0.85).splitlines()
    assert lines[0].startswith("| R | processes x threads | s / epoch (n = 2) | speed-up vs 1 x 1 (same")
    two_row = "| 2 | 2 x 1 | 25.0 ± 0.0 | 1.80 ± 0.28x | 10.0 ± 0.0 (1 of 2 reached) | 85.50 ± 0.71 |"
    assert lines[3] == two_row


def test_train_accuracy_writes_its_file_with_the_summary_of_the_runs_so_far(tmp_path):
    bench = script("train_accuracy")
    rows = [{"run": "lenet", "seed": seed, "test_accuracy": a, "seconds_per_epoch": [2.0]}
            for seed, a in enumerate([0.92, 0.93])]  # fmt: skip
    out = tmp_path / "sub" / "seeds.json"
    bench.write(str(out), rows[:1])  # a job stopped after its first seed keeps that seed
    assert json.loads(out.read_text())["summary"][0]["seeds"] == [0]
    bench.write(str(out), rows)
    record = json.loads(out.read_text())
    assert record["rows"] == rows
    accuracy = [0.92, 0.93]
    assert record["summary"][0]["test_accuracy"] == [statistics.fmean(accuracy), statistics.stdev(accuracy)]


def test_compression_bench_keeps_each_codec_and_seed_once_from_the_raw_files_it_resumes(tmp_path):
    bench = script("compression_bench")
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    dense = {"label": "dense", "seed": 0}
    first.write_text(json.dumps({"rows": [{**dense, "x": 1}, {"label": "fp16", "seed": 0}]}))
    second.write_text(json.dumps({"rows": [{**dense, "x": 2}, {"label": "dense", "seed": 2}]}))
    rows = bench.kept_rows([str(first), str(second)])
    assert [(r["label"], r["seed"]) for r in rows] == [("dense", 0), ("fp16", 0), ("dense", 2)]
    assert rows[0]["x"] == 1


def test_compression_bench_reports_only_the_codecs_and_seeds_asked_for_pairing_each_with_its_dense_seed():
    import argparse

    bench = script("compression_bench")

    def row(label, codec, seed, accuracy):
        return {"label": label, "codec": codec, "seed": seed, "options": {}, "test_accuracy": accuracy,
                "evaluations": [(125, accuracy)], "steps": 125, "messages": 250, "job_samples_per_s": 500.0,
                "bytes_sent": 1000 if codec == "none" else 100}  # fmt: skip

    rows = [row("dense", "none", s, a) for s, a in [(0, 0.82), (1, 0.83), (2, 0.81)]]
    rows += [row("onebit", "onebit", s, a) for s, a in [(0, 0.62), (1, 0.70), (2, 0.66)]]
    rows += [row("fp16", "fp16", 0, 0.82), row("onebit", "onebit", 3, 0.1)]  # not asked for
    args = argparse.Namespace(only="dense,onebit", seeds=[0, 1, 2], dataset="fashion-mnist", resume=True)
    result = bench.report(args, {"rows": rows, "timings": {"compute_s": 0.05, "onebit": 0.01}}, 1.0)
    dense, onebit = result["summary"]
    assert [r["label"] for r in result["summary"]] == ["dense", "onebit"] and onebit["seeds"] == [0, 1, 2]
    lost = [100 * (0.82 - 0.62), 100 * (0.83 - 0.70), 100 * (0.81 - 0.66)]
    assert abs(onebit["accuracy_lost_points"] - statistics.fmean(lost)) < 1e-9
    assert abs(onebit["lost_std"] - statistics.stdev(lost)) < 1e-9
    assert onebit["ratio"] == 10.0 and dense["accuracy_lost_points"] == 0.0
