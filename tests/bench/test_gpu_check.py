"""benchmarks/gpu_check.py on this machine: every part runs on the CPU (``--allow-cpu``, the "cpu stand-in")
and reports; without CUDA and without --allow-cpu it refuses with exit status 2; the projection is the cost
model's formula on the stated links. The stand-in runs the script as a process; the refusal and the
projection call its ``main(argv)`` in this process (neither starts anything)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import load_benchmark

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
PARTS = {"codecs", "reducers_r1", "reducers_r2", "training", "tests"}


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def ran(part: dict) -> bool:
    """Whether a part ran to its end: not skipped for the budget, not stopped at its deadline (on this
    shared machine a loaded moment can cost a part its time; what it measured is checked when it ran)."""
    return part["status"] != "skipped" and not str(part.get("error", "")).startswith("timed out")


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_quick_cpu_stand_in_runs_every_part_and_writes_its_report(tmp_path):
    # about 70 s on an idle machine; the budget bounds it on a loaded one
    done = run("--allow-cpu", "--quick", "--budget-s", "100", "--out", str(tmp_path), timeout=170)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["schema"] == 1 and report["quick"] is True
    assert report["stand_in"] is (not torch.cuda.is_available())
    for key in ("torch", "cuda_available", "nccl_available", "train_options", "python", "cpus"):
        assert key in report["machine"], key
    assert set(report["parts"]) == PARTS, "every part must report, even when skipped for time"
    for name, part in report["parts"].items():
        assert part["status"] in ("passed", "failed", "skipped"), (name, part)
        if part["status"] == "failed":  # a failure carries its reason
            assert part.get("error") or any(i.get("error") for i in part.get("items", [])), (name, part)
    codecs = report["parts"]["codecs"]
    if ran(codecs):
        from distlearn.comm.compression import COMPRESSORS

        assert [item["name"] for item in codecs["items"]] == list(COMPRESSORS)
        assert codecs["dense_allreduce"]["status"] == "ok" and codecs["dense_allreduce"]["median_s"] > 0
        for item in codecs["items"]:
            assert item["status"] == "ok", item  # on the CPU every codec works
            assert item["median_s"] > 0 and math.isfinite(item["relative_error"])
    r1 = report["parts"]["reducers_r1"]
    if ran(r1):
        from distlearn.comm.reducers import REDUCERS

        assert {item["name"] for item in r1["items"]} == set(REDUCERS)
        assert all(item["exact"] for item in r1["items"])
    r2 = report["parts"]["reducers_r2"]
    if ran(r2):  # CPU tensors through gloo: the direct path and the staged one both sum
        assert r2["status"] == "passed", r2
        assert all(item["status"] == "ok" for item in r2["items"]), r2["items"]
    if ran(report["parts"]["training"]):
        lenet = [
            i for i in report["parts"]["training"]["items"] if (i["device"], i["amp"]) == ("cpu", "none")
        ]
        assert lenet and lenet[0]["status"] in ("ok", "failed", "skipped"), lenet
        if ran(lenet[0]):  # a run that ended within its time trained and reported its throughput
            assert lenet[0]["status"] == "ok" and lenet[0]["samples_per_s"] > 0, lenet
    table = (tmp_path / "gpu_check.md").read_text()
    assert "cpu stand-in" in table and "| codec" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_refuses_unless_allowed(tmp_path, capsys):
    code = load_benchmark("gpu_check").main(["--out", str(tmp_path)])
    assert code == 2
    stderr = capsys.readouterr().err
    assert "no CUDA device" in stderr and "--allow-cpu" in stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_projection_is_the_ring_formula_on_the_assumed_links(tmp_path):
    from distlearn.comm.cost_model import link, project
    from distlearn.models import count_parameters, create_model

    assert load_benchmark("gpu_check").main(["--project-only", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_projection.json").read_text())
    lenet = 4 * count_parameters(create_model("lenet", in_channels=1, image_size=28))
    points = [p for p in data["points"] if p["bytes"] == lenet]
    assert {p["p"] for p in points} == {2, 4, 8} and len({p["link"] for p in points}) == 2
    for point in points:
        network = link(point["GBps"] * 8, alpha=point["alpha_s"], gamma=point["gamma_s_per_byte"])
        # by hand: 2(p-1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma
        p, n = point["p"], point["bytes"]
        by_hand = 2 * (p - 1) * network.alpha + 2 * (p - 1) / p * n * network.beta
        by_hand += (p - 1) / p * n * network.gamma
        assert point["ring_allreduce_s"] == pytest.approx(by_hand, rel=1e-12)
        assert point["ring_allreduce_s"] == pytest.approx(project("ring", p, n, network), rel=1e-12)
    fresh = (tmp_path / "gpu_projection.md").read_text()
    assert "ASSUMED" in fresh
    committed = (REPO / "benchmarks" / "results" / "gpu_projection.md").read_text()
    assert [x for x in fresh.splitlines() if x.startswith("|")] == [
        x for x in committed.splitlines() if x.startswith("|")
    ], "the committed projection is out of date: rerun the command it names"


def test_docs_gpu_quotes_the_committed_projection_and_names_the_check():
    page = (REPO / "docs" / "gpu.md").read_text()
    committed = (REPO / "benchmarks" / "results" / "gpu_projection.md").read_text()
    table = "\n".join(line for line in committed.splitlines() if line.startswith("|"))
    assert table and table in page, "docs/gpu.md must quote benchmarks/results/gpu_projection.md's table"
    assert "python benchmarks/gpu_check.py --project-only --out benchmarks/results" in page
    assert "python benchmarks/gpu_check.py --out DIR" in page
