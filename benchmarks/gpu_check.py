"""One GPU, one run, under eight minutes: does distlearn work on CUDA, and what does it gain there?

The check writes ``DIR/gpu_check.json`` (everything, raw times included) and ``DIR/gpu_check.md`` (the
tables) with, after the machine (GPU, torch, CUDA and NCCL versions):

(a) ``tests``: the gpu-marked tests (``pytest -m gpu``), passed / failed / skipped counts;
(b) ``training``: one-process ``distlearn train`` samples/s on cuda against the CPU for LeNet (Fashion-MNIST)
    and ResNet-8 (CIFAR-10), each also with ``--amp bf16`` on cuda (a synthetic stand-in of the same shape
    when the dataset is not on the machine; the JSON says which);
(c) ``codecs``: every codec's encode + decode time on the device against the dense allreduce of the same
    float32 bucket on a one-rank NCCL group (at R = 1 that allreduce is a device copy, not a network);
(d) ``reducers_r1``: every reducer on a one-rank NCCL group: exact result and time;
(e) ``reducers_r2``: two processes on the one GPU with gloo (NCCL refuses two ranks on one device), every
    reducer on CUDA tensors directly (gloo's point-to-point takes CPU tensors only: a failure there is
    recorded with its message) and staged through pinned host memory.

Each part runs in its own process with a deadline cut from one global budget (``--budget-s``), so a crash
or a hang costs that part only; the files are rewritten after every part. Exit status: 0 when every part
passed, 1 when one failed (the files say which and why), 2 when there is no CUDA device and no
``--allow-cpu`` (which runs every part on the CPU, gloo for NCCL, marked "cpu stand-in").

    python benchmarks/gpu_check.py --out DIR [--quick] [--allow-cpu] [--budget-s 420]
    python benchmarks/gpu_check.py --project-only --out benchmarks/results   # the cost-model projection

``--project-only`` writes ``gpu_projection.json`` and ``gpu_projection.md``: the alpha-beta model's ring
allreduce time for LeNet's and ResNet-8's gradients at 2, 4 and 8 GPUs on ASSUMED link figures (see
docs/gpu.md); nothing is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO / "src") not in sys.path:  # runs from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))

from distlearn.tables import markdown_table  # noqa: E402

PARTS = ("codecs", "reducers_r1", "reducers_r2", "training", "tests")
PART_CAPS_S = {"codecs": 60, "reducers_r1": 30, "reducers_r2": 60, "training": 170, "tests": 180}
"""Each part's own limit (seconds); the global budget cuts it shorter when less is left."""
PART_FLOOR_S = 15
"""A later part is always left at least this much of the budget (or skipped when less remains)."""
MODELS = {  # --model, its dataset, the synthetic stand-in, steps on the device / on the CPU (full, quick)
    "lenet": ("fashion-mnist", "gpu_check:fashion_like", (300, 30), (6, 6)),
    "resnet8": ("cifar10", "gpu_check:cifar_like", (200, 10), (4, 4)),
}
NOT_ON_GPU = "no GPU was available to this session: the table is not yet measured"


# -- synthetic stand-ins, for a machine without the datasets (import paths for --dataset) -------------------


def _synthetic(channels: int, side: int, train: int, test: int) -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=generator)
        return images, torch.randint(0, 10, (n,), generator=generator)

    return split(train), split(test)


def fashion_like() -> tuple[Any, Any]:
    """Random uint8 images of Fashion-MNIST's shape (1 x 28 x 28), 10 classes: throughput only."""
    return _synthetic(1, 28, 8192, 512)


def cifar_like() -> tuple[Any, Any]:
    """Random uint8 images of CIFAR-10's shape (3 x 32 x 32), 10 classes: throughput only."""
    return _synthetic(3, 32, 8192, 512)


# -- machine ----------------------------------------------------------------------------------------------


def train_options() -> dict[str, bool]:
    """Which device options this distlearn's ``train`` has (``--device``, ``--amp``)."""
    try:
        from distlearn.train import TrainConfig

        names = {f.name for f in dataclasses.fields(TrainConfig)}
    except Exception:  # noqa: BLE001 -- reported as absent
        names = set()
    return {"device": "device" in names, "amp": "amp" in names}


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nccl_available": torch.distributed.is_nccl_available(),
        "train_options": train_options(),
        # what distlearn and its tests import that a GPU image may lack (carry them as wheels: docs/gpu.md)
        "missing_packages": [
            name
            for name in ("tyro", "rich", "numpy", "pytest", "pytest_timeout", "hypothesis", "scipy")
            if importlib.util.find_spec(name) is None
        ],
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            gpu_capability=f"{properties.major}.{properties.minor}",
            gpu_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            version = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception as error:  # noqa: BLE001
            info["nccl"] = f"unknown ({type(error).__name__})"
    try:
        info["commit"] = (
            subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001 -- a copy without .git
        info["commit"] = None
    return info


def environment() -> dict[str, str]:
    """The subprocesses' environment: this checkout's src and this directory first on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(REPO / "src"), str(HERE), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tail(text: str | bytes | None, limit: int = 1500) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-limit:]


# -- parts run in a process of their own ---------------------------------------------------------------------


def part_in_process(name: str, device: str, quick: bool, timeout_s: float, out: Path) -> dict[str, Any]:
    """``python gpu_check.py --part name`` with ``timeout_s``; its result file, or what went wrong."""
    result_path = out / f"part-{name}.json"
    result_path.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--part",
        name,
        "--device",
        device,
        "--result",
        str(result_path),
        "--part-timeout-s",
        f"{max(1.0, timeout_s - 10):.0f}",
    ]
    if quick:
        command.append("--quick")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=environment())
    except subprocess.TimeoutExpired as expired:
        return {
            "status": "failed",
            "error": f"timed out after {timeout_s:.0f} s",
            "log": tail(expired.stdout),
        }
    if not result_path.is_file():
        return {
            "status": "failed",
            "error": f"exit {done.returncode}, no result",
            "log": tail(done.stdout + done.stderr),
        }
    result = json.loads(result_path.read_text())
    result_path.unlink()
    if result.get("status") == "failed":
        result["log"] = tail(done.stdout + done.stderr)
    return result


# -- (b) training --------------------------------------------------------------------------------------------


def dataset_for(name: str, quick: bool) -> tuple[str, bool]:
    """``(--dataset value, synthetic?)``: the real dataset when this machine has it, else the stand-in."""
    dataset, synthetic, _, _ = MODELS[name]
    if quick:
        return synthetic, True
    from distlearn.data import find_dataset

    return (dataset, False) if find_dataset(dataset) is not None else (synthetic, True)


def train_run(
    model: str,
    device: str,
    amp: str,
    steps: int,
    quick: bool,
    out: Path,
    timeout_s: float,
    options: dict[str, bool],
    stand_in: bool,
) -> dict[str, Any]:
    """One ``distlearn train`` process; samples/s from its summary and from its train records (the median
    of the windows after the first, which holds the warm-up: cuDNN's autotuning, the allocator)."""
    dataset, synthetic = dataset_for(model, quick)
    item: dict[str, Any] = {
        "model": model,
        "device": device,
        "amp": amp,
        "steps": steps,
        "dataset": dataset,
        "synthetic_data": synthetic,
    }
    missing = [
        flag
        for flag, wanted in (("device", device != "cpu"), ("amp", amp != "none"))
        if wanted and not options[flag]
    ]
    if missing:
        text = ", ".join(f"--{flag} (TrainConfig.{flag})" for flag in missing)
        item.update(status="unavailable" if stand_in else "failed", error=f"this distlearn has no {text}")
        return item
    run_dir = out / "runs" / f"{model}-{device}-{amp}"
    batch = 64 if quick else 128
    command = [
        sys.executable,
        "-m",
        "distlearn",
        "train",
        "--model",
        model,
        "--dataset",
        dataset,
        "--steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--test-samples",
        "256",
        "--eval-batch-size",
        "256",
        "--log-every",
        str(max(1, steps // 5)),
        "--out",
        str(run_dir),
        "--overwrite",
        "--no-checkpoints",
        "--progress",
        "off",
        "--tensorboard",
        "off",
        "--quiet",
    ]
    if options["device"]:
        command += ["--device", device]
    if amp != "none":
        command += ["--amp", amp]
    item["command"] = " ".join(command[1:])
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=environment())
    except subprocess.TimeoutExpired as expired:
        item.update(status="failed", error=f"timed out after {timeout_s:.0f} s", log=tail(expired.stdout))
        return item
    item["wall_s"] = time.monotonic() - started
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    summary = [r for r in records if r.get("kind") == "summary"]
    if done.returncode != 0 or not summary:
        message = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        item.update(
            status="failed",
            error=f"exit {done.returncode}: {message[-1] if message else ''}"[:400],
            log=tail(done.stdout + done.stderr),
        )
        return item
    windows = [r["samples_per_s"] for r in records if r.get("kind") == "train" and r.get("samples_per_s")]
    item.update(
        status="ok",
        samples_per_s=summary[-1]["samples_per_s"],
        steady_samples_per_s=statistics.median(windows[1:]) if len(windows) > 1 else None,
        test_accuracy=summary[-1].get("accuracy"),
    )
    return item


def training(device: str, quick: bool, timeout_s: float, out: Path, stand_in: bool) -> dict[str, Any]:
    """LeNet and ResNet-8 (quick: LeNet alone) on the CPU, on the device, and on the device with bf16."""
    options = train_options()
    end = time.monotonic() + timeout_s
    items = []
    for model in ["lenet"] if quick else list(MODELS):
        steps_device, steps_cpu = MODELS[model][3 if quick else 2]
        runs = [("cpu", "none", steps_cpu), (device, "none", steps_device), (device, "bf16", steps_device)]
        baseline = None
        for run_device, amp, steps in runs:
            left = end - time.monotonic()
            if stand_in and run_device == "cpu" and amp == "none" and baseline is not None:
                continue
            if left < 10:
                item = {
                    "model": model,
                    "device": run_device,
                    "amp": amp,
                    "status": "skipped",
                    "error": "out of the part's time",
                }
            elif stand_in and (run_device, amp) == (device, "none") and baseline is not None:
                item = {**baseline, "device": f"{device} (stand-in: the cpu run)"}
            else:
                item = train_run(
                    model, run_device, amp, steps, quick, out, min(120.0, left), options, stand_in
                )
            if (run_device, amp) == ("cpu", "none"):
                baseline = item
            if baseline and baseline.get("samples_per_s") and item.get("samples_per_s"):
                item["vs_cpu"] = item["samples_per_s"] / baseline["samples_per_s"]
            items.append(item)
            print(
                f"train {model} {run_device} {amp}: {item['status']} {item.get('samples_per_s')}", flush=True
            )
    failed = any(i["status"] == "failed" for i in items)
    return {"status": "failed" if failed else "passed", "items": items, "train_options": options}


# -- (a) the gpu-marked tests --------------------------------------------------------------------------------


def gpu_tests(quick: bool, timeout_s: float) -> dict[str, Any]:
    """``pytest -m gpu`` over the test suite (quick: tests/models alone); the counts of its last line."""
    # tests/live (the web UI) and tests/rl (CPU-only strategies) hold no device test and import packages a
    # GPU image may lack: left out, so that their collection errors cannot hide the device tests' counts
    paths = (
        ["tests/models/test_models.py"] if quick else ["tests", "--ignore=tests/live", "--ignore=tests/rl"]
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        *paths,
    ]
    result: dict[str, Any] = {"command": " ".join(command[1:])}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=environment(), cwd=REPO
        )
    except subprocess.TimeoutExpired as expired:
        return {
            **result,
            "status": "failed",
            "error": f"timed out after {timeout_s:.0f} s",
            "log": tail(expired.stdout),
        }
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    counts = {word: 0 for word in ("passed", "failed", "skipped", "deselected", "errors")}
    for number, word in re.findall(
        r"(\d+) (passed|failed|skipped|deselected|errors?)\b", lines[-1] if lines else ""
    ):
        counts["errors" if word.startswith("error") else word] += int(number)
    result.update(counts, returncode=done.returncode, summary=lines[-1] if lines else "")
    # 5: nothing collected (no gpu-marked test in the paths), which is not a failure of the code
    ok = done.returncode in (0, 5) and counts["failed"] == 0 and counts["errors"] == 0
    result["status"] = "passed" if ok else "failed"
    if not ok:
        result["log"] = tail(done.stdout + done.stderr, 4000)
    return result


# -- the report ----------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.3f}"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _cell(item: dict[str, Any]) -> str:
    return item["status"] if item["status"] != "failed" else f"failed: {item.get('error', '')}"


def render(report: dict[str, Any]) -> str:
    info, parts = report["machine"], report["parts"]
    where = (
        "cpu stand-in (no CUDA: every part ran on the CPU, gloo for NCCL)"
        if report["stand_in"]
        else (f"{info.get('gpu')} ({info.get('gpu_memory_gib')} GiB, sm {info.get('gpu_capability')})")
    )
    lines = [
        "# distlearn GPU check",
        "",
        f"- device: {where}",
        f"- torch {info['torch']}, CUDA {info['cuda_runtime']}, NCCL {info.get('nccl', 'n/a')}, "
        f"cuDNN {info.get('cudnn', 'n/a')}, Python {info['python']}, {info['cpus']} CPUs, "
        f"commit {info['commit']}",
        f"- command: `{report['command']}` ({report['elapsed_s']:.0f} s of a "
        f"{report['budget_s']:.0f} s budget)",
        "- parts: " + ", ".join(f"{name} {part['status']}" for name, part in parts.items()),
    ]
    if "training" in parts and parts["training"].get("items"):
        rows = [
            [
                i["model"],
                i["device"],
                i.get("amp", ""),
                i.get("dataset", ""),
                f"{i['samples_per_s']:,.0f}" if i.get("samples_per_s") else "",
                f"{i['steady_samples_per_s']:,.0f}" if i.get("steady_samples_per_s") else "",
                _x(i.get("vs_cpu")),
                _cell(i),
            ]
            for i in parts["training"]["items"]
        ]
        lines += [
            "",
            "## (b) one-process training",
            "",
            markdown_table(
                ["model", "device", "amp", "data", "samples/s", "steady samples/s", "vs cpu", "status"],
                rows,
                align="llllrrrl",
            ),
        ]
    codecs = parts.get("codecs", {})
    if codecs.get("items"):
        dense = codecs["dense_allreduce"]
        rows = [
            [
                i["name"],
                i.get("timed", ""),
                _ms(i.get("median_s")),
                _x(i.get("vs_dense_allreduce")),
                "" if i.get("syncs") is None else i["syncs"],
                "" if i.get("relative_error") is None else f"{i['relative_error']:.3f}",
                _cell(i),
            ]
            for i in codecs["items"]
        ]
        lines += [
            "",
            f"## (c) codecs on a {codecs['bucket']} bucket ({codecs['numel']:,} float32)",
            "",
            f"Dense allreduce of the same {dense['bytes']:,} bytes on a one-rank {dense['backend']} "
            f"group: {_ms(dense.get('median_s')) or _cell(dense)} ms.",
            "",
            markdown_table(
                [
                    "codec",
                    "timed",
                    "median ms",
                    "vs dense allreduce",
                    "host syncs",
                    "relative error",
                    "status",
                ],
                rows,
                align="llrrrrl",
            ),
        ]
    r1 = parts.get("reducers_r1", {})
    if r1.get("items"):
        rows = [
            [i["name"], i["backend"], i.get("exact", ""), _ms(i.get("median_s")), _cell(i)]
            for i in r1["items"]
        ]
        lines += [
            "",
            "## (d) reducers at R = 1",
            "",
            markdown_table(["reducer", "backend", "exact", "median ms", "status"], rows, align="lllrl"),
        ]
    r2 = parts.get("reducers_r2", {})
    if r2.get("items"):
        rows = [
            [
                i["name"],
                i.get("tensor", ""),
                "host-staged" if i.get("staged") else "direct",
                i.get("exact", i.get("ranks_agree", "")),
                _ms(i.get("seconds")),
                _cell(i),
            ]
            for i in r2["items"]
        ]
        lines += [
            "",
            "## (e) reducers at R = 2 on one device, gloo",
            "",
            f"Direct: {r2.get('direct_ok', 0)} ok; staged through host memory: {r2.get('staged_ok', 0)} ok.",
            "",
            markdown_table(
                ["reducer", "tensor", "path", "exact / ranks agree", "ms", "status"], rows, align="llllrl"
            ),
        ]
    tests = parts.get("tests", {})
    if "passed" in tests:
        lines += ["", "## (a) gpu-marked tests", "", f"`{tests['command']}`: {tests['summary']}"]
    for name, part in parts.items():
        if part.get("error"):
            lines += ["", f"- {name}: {part['status']}: {part['error']}"]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(render(report))


# -- the cost-model projection -------------------------------------------------------------------------------

LINKS = {  # ASSUMED figures, not measurements: the class of each link, per direction
    "NVLink (H100 NVLink 4-class, ~300 GB/s)": (300.0, 3e-6),
    "PCIe 4.0 x16 (~25 GB/s)": (25.0, 5e-6),
}
GAMMA = 1.0 / 1e12
"""ASSUMED reduction cost on the GPU: ~1 TB/s of summed bytes (HBM reads and writes), seconds per byte."""


def projection(out: Path) -> int:
    from distlearn.comm.cost_model import link, project
    from distlearn.models import count_parameters, create_model

    gradients = {
        "lenet (Fashion-MNIST)": count_parameters(create_model("lenet", in_channels=1, image_size=28)),
        "resnet8 (CIFAR-10)": count_parameters(create_model("resnet8", in_channels=3, image_size=32)),
    }
    rows, points = [], []
    for model, numel in gradients.items():
        nbytes = 4 * numel
        for name, (gbytes, alpha) in LINKS.items():
            network = link(gbytes * 8, alpha=alpha, gamma=GAMMA, name=name)
            for p in (2, 4, 8):
                seconds = project("ring", p, nbytes, network)
                latency = 2 * (p - 1) * alpha
                points.append(
                    {
                        "model": model,
                        "parameters": numel,
                        "bytes": nbytes,
                        "link": name,
                        "GBps": gbytes,
                        "alpha_s": alpha,
                        "gamma_s_per_byte": GAMMA,
                        "p": p,
                        "ring_allreduce_s": seconds,
                        "latency_share": latency / seconds,
                    }
                )
                rows.append(
                    [
                        model,
                        f"{nbytes / 1e6:.2f}",
                        name,
                        p,
                        f"{seconds * 1e6:,.1f}",
                        f"{latency / seconds:.0%}",
                    ]
                )
    command = "python benchmarks/gpu_check.py --project-only --out " + str(out)
    table = markdown_table(
        ["model", "gradient MB", "link (ASSUMED)", "GPUs", "ring allreduce us", "latency share"],
        rows,
        align="lrlrrr",
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_projection.json").write_text(
        json.dumps(
            {
                "command": command,
                "model": "distlearn.comm.cost_model.project('ring', p, bytes, link(...))",
                "assumed": {"links": LINKS, "gamma_s_per_byte": GAMMA},
                "points": points,
            },
            indent=1,
        )
        + "\n"
    )
    (out / "gpu_projection.md").write_text(
        f"Projected, not measured (`{command}`): the alpha-beta-gamma ring allreduce of one float32 gradient "
        "on ASSUMED links.\n\n" + table + "\n"
    )
    print(table)
    return 0


# -- main ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--quick", action="store_true", help="small sizes, LeNet only, a few tests")
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA, run every part on the CPU")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole check's time budget (s)")
    parser.add_argument("--project-only", action="store_true", help="write the cost-model projection only")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in a child process
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--part-timeout-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        from gpu_check_parts import run_part

        result = run_part(args.part, args.device, args.quick, args.part_timeout_s)
        args.result.write_text(json.dumps(result, default=str))
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    if args.project_only:
        return projection(args.out)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(
            "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine "
            "with a GPU, or pass --allow-cpu to run every part on the CPU as a stand-in",
            file=sys.stderr,
        )
        return 2
    device, stand_in = ("cuda", False) if cuda else ("cpu", True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.budget_s
    report: dict[str, Any] = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": device,
        "stand_in": stand_in,
        "quick": args.quick,
        "budget_s": args.budget_s,
        "machine": machine(device),
        "parts": {},
        "elapsed_s": 0.0,
    }
    for index, name in enumerate(PARTS):
        reserve = PART_FLOOR_S * (len(PARTS) - index - 1)
        timeout_s = min(PART_CAPS_S[name], deadline - time.monotonic() - reserve)
        print(f"gpu_check: {name} ({timeout_s:.0f} s at most)", flush=True)
        part_started = time.monotonic()
        if timeout_s < PART_FLOOR_S:
            part: dict[str, Any] = {"status": "skipped", "error": "out of the time budget"}
        elif name == "training":
            try:
                part = training(device, args.quick, timeout_s, args.out, stand_in)
            except Exception as error:  # noqa: BLE001 -- recorded; the tests still run
                part = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        elif name == "tests":
            part = gpu_tests(args.quick, timeout_s)
        else:
            part = part_in_process(name, device, args.quick, timeout_s, args.out)
        part["wall_s"] = time.monotonic() - part_started  # with the process's start and imports
        report["parts"][name] = part
        report["elapsed_s"] = time.monotonic() - started
        write(report, args.out)
    print(render(report))
    return 0 if all(part["status"] == "passed" for part in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
