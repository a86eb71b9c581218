"""benchmarks/rl_scaling.py: the /proc reading of a process tree against the CPU time its processes
measured themselves, and real short A3C and Gorila runs whose CPU accounting by role must be complete and
consistent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts import load_benchmark

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "rl_scaling.py"


bench = load_benchmark("rl_scaling")

# burns `cpu` seconds of its own CPU time, prints what it measured, then waits `rest` seconds
BURN = (
    "import sys, time\n"
    "cpu, rest = float(sys.argv[1]), float(sys.argv[2])\n"
    "while time.process_time() < cpu:\n"
    "    pass\n"
    "print(time.process_time(), flush=True)\n"
    "time.sleep(rest)\n"
)
# starts a child that burns 0.6 s, burns 0.3 s itself, and waits for the child
PARENT = (
    "import subprocess, sys, time\n"
    f"child = subprocess.Popen([sys.executable, '-c', {BURN!r}, '0.6', '0.5'], stdout=subprocess.PIPE)\n"
    "while time.process_time() < 0.3:\n"
    "    pass\n"
    "print(time.process_time(), child.communicate()[0].decode().strip(), flush=True)\n"
)


def test_the_tree_reading_matches_the_cpu_time_the_processes_measured_themselves():
    process = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    tree = bench.ProcessTree(process.pid, "gorila")
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        tree.sample()
        time.sleep(0.05)
    own_parent, own_child = (float(v) for v in process.communicate(timeout=60)[0].split())
    processes = {p["role"]: p for p in tree.report()}
    assert set(processes) == {"launcher", "other"}  # the root and its child, found by its parent pid
    # the last reading comes at most one interval before the process's end; the child then only sleeps
    assert processes["other"]["cpu_s"] == pytest.approx(own_child, abs=0.1)
    assert processes["launcher"]["cpu_s"] <= own_parent + 0.05 + 0.1  # + its interpreter's exit
    assert processes["launcher"]["cpu_s"] >= 0.25
    for entry in processes.values():
        assert 0 < entry["utilisation"] <= 1.2


def test_accounting_figures_from_hand_made_readings():
    processes = [{"role": "server", "cpu_s": 30.0}, {"role": "bundle1", "cpu_s": 20.0}]
    figures = bench.accounting(processes, total=52.0, wall=40.0)
    assert figures["unattributed_cpu_s"] == 2.0
    assert figures["busiest_role"] == "server" and figures["busiest_cpu_s"] == 30.0
    assert figures["projected_wall_2cores_s"] == 30.0  # the server bounds it, not 52 / 2
    assert figures["cpu_utilisation"] == 1.3
    assert bench.accounting(processes, total=80.0, wall=40.0)["projected_wall_2cores_s"] == 40.0


def _check_trial(trial: dict, roles: set[str]) -> None:
    assert trial["exit_code"] == 0, trial["stderr_tail"]
    found = {p["role"] for p in trial["processes"]}
    assert roles <= found, found
    for process in trial["processes"]:
        if process["role"] in roles:
            assert process["cpu_s"] > 0, process
            assert 0 < process["utilisation"] <= 1.2, process
    sampled = sum(p["cpu_s"] for p in trial["processes"])
    assert trial["cpu_total_s"] > 0
    assert sampled <= trial["cpu_total_s"] + 0.05 * len(trial["processes"])  # the exact total holds them all
    assert trial["unattributed_cpu_s"] <= 0.25 * trial["cpu_total_s"]
    assert trial["busiest_cpu_s"] == max(p["cpu_s"] for p in trial["processes"])
    assert trial["projected_wall_2cores_s"] >= trial["cpu_total_s"] / 2 - 0.01
    assert trial["updates"] > 0 and trial["env_steps"] > 0


@pytest.mark.timeout(900)
def test_a_short_a3c_run_is_accounted_by_role(tmp_path):
    trial = bench.rl_bench.run_ours(
        "a3c", 2, 1, tmp_path / "a3c", 500.0, extra=("--total-steps", "400"),
        runner=bench.sampling_runner("a3c", 0.1),
    )  # fmt: skip
    _check_trial(trial, {"parent", "actor-learner0", "actor-learner1"})
    assert trial["staleness_mean"] is not None and trial["staleness_mean"] >= 0
    json.dumps(trial)  # goes into the results file as it is


@pytest.mark.timeout(900)
def test_a_short_gorila_run_is_accounted_by_role_with_its_timers(tmp_path):
    trial = bench.rl_bench.run_ours(
        "gorila", 2, 1, tmp_path / "gorila", 500.0,
        extra=("--total-steps", "600", "--learning-starts", "100"),
        runner=bench.sampling_runner("gorila", 0.1),
    )  # fmt: skip
    _check_trial(trial, {"launcher", "agent", "server", "bundle1", "bundle2"})
    assert 0 < trial["server_busy_fraction"] <= 1
    assert trial["server_busy_s"] > 0
    assert [b["rank"] for b in trial["bundles"]] == [1, 2]
    for bundle in trial["bundles"]:
        assert bundle["gradients"] > 0
        assert 0 <= bundle["reply_wait_s"] <= bundle["seconds"]
        assert 0 < bundle["learn_s"] <= bundle["seconds"]
    assert sum(b["env_steps"] for b in trial["bundles"]) >= trial["env_steps"]  # the last steps unsent
    rows = bench.summarise([dict(trial, solved=True, launch_to_solved_s=1.0, train_to_solved_s=1.0,
                                 env_steps_to_solve=trial["env_steps"])])  # fmt: skip
    assert set(rows[0]["roles"]) >= {"server", "bundle1", "bundle2"}
    assert "server_busy_fraction" in rows[0]


def test_cpu_to_solve_is_projected_from_an_earlier_files_env_steps_to_solve():
    steps = bench._steps_to_solve("rl_bench-gorila-2026-12-01.json")
    assert steps[("gorila", 1)] == (126240.0, "rl_bench-gorila-2026-12-01.json")  # "126240.0 ± 18536.0"
    trial = {"cpu_total_s": 100.0, "busiest_cpu_s": 60.0, "env_steps": 1000}
    projected = bench._projection([trial], 2000.0, "f.json")
    assert projected["cpu_to_solve_s"] == "200.0 ± 0.0"
    assert projected["busiest_cpu_to_solve_s"] == "120.0 ± 0.0"
    assert projected["wall_bound_2cores_s"] == "120.0 ± 0.0"  # the busiest process, not 200 / 2
    spread = bench._projection([dict(trial, busiest_cpu_s=40.0)], 2000.0, "f")
    assert spread["wall_bound_2cores_s"] == "100.0 ± 0.0"  # now the total on 2 cores
