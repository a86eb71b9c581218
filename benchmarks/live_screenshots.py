"""The screenshots of docs/live.md, taken in headless Chromium from a real ``distlearn live --demo``.

Run manual (from the repository root; needs Debian's chromium, see the Makefile's ``browser`` target)::

    .venv/bin/python benchmarks/live_screenshots.py       # writes docs/img/live-runs.png, live-toy.png
    .venv/bin/python benchmarks/live_screenshots.py --out-dir /tmp/shots --steps 100

It starts the demo (sync, ps and hogwild on Fashion-MNIST, ``--steps`` each), opens the page, waits until
every run has ended, photographs the runs view, runs five optimizers on Rosenbrock's function in the toy view
and photographs it, then closes the page, which ends the demo's session: the command must then exit by itself
(that is checked too). Everything is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--steps", type=int, default=300, help="demo steps per run (default 300)")
    parser.add_argument("--timeout", type=float, default=540, help="seconds for the whole script")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("no chromium on PATH: apt-get install chromium (make browser)")
    deadline = time.monotonic() + args.timeout
    runs = Path(tempfile.mkdtemp(prefix="live-demo-"))
    command = [sys.executable, "-m", "distlearn", "live", "--demo", "--steps", str(args.steps),
               "--out", str(runs), "--port", "0"]  # fmt: skip
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in cli.stdout:
            print(line, end="", flush=True)
            if match := re.search(r"open (http://\S+)", line):
                url = match.group(1)
                break
        if url is None:
            sys.exit("distlearn live ended before it served the page")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            while time.monotonic() < deadline:
                with urllib.request.urlopen(url + "api/runs", timeout=10) as response:
                    states = [p["state"] for p in json.load(response)["processes"]]
                if "running" not in states:
                    break
                time.sleep(2)
            print("demo runs:", states, flush=True)
            page.wait_for_timeout(1500)  # the page renders a few times a second
            page.screenshot(path=str(args.out_dir / "live-runs.png"), full_page=True)

            page.click("#tab-toy")
            rosenbrock = "#toy-function option[value='rosenbrock']"
            page.wait_for_selector(rosenbrock, state="attached", timeout=60_000)
            for name in ("nesterov", "rmsprop"):  # sgd, momentum and adam are chosen already
                page.check(f"#toy-optimizers input[value='{name}']")
            page.fill("#toy-steps", "400")
            page.select_option("#toy-delay", "0.005")
            page.click("#toy-run")
            page.wait_for_selector("#toy-canvas[data-steps='400']", timeout=60_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(args.out_dir / "live-toy.png"), full_page=True)
            page.close()  # ends the demo's session
            browser.close()
        rest, _ = cli.communicate(timeout=max(1.0, min(60.0, deadline - time.monotonic())))
        print(rest, end="")
        print(f"distlearn live exited with {cli.returncode} after the page closed", flush=True)
        return cli.returncode
    finally:
        if cli.poll() is None:  # the session did not end it: Ctrl-C, as a person would
            cli.send_signal(signal.SIGINT)
            cli.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
