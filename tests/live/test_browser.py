"""The page in real headless Chromium (Debian's, driven by Playwright): curves appear and grow, views switch.

Playwright drives the chromium found on PATH (``make install`` puts Debian's there as root); its own
browser download is never used. Screenshots go to ``$DISTLEARN_TEST_ARTIFACTS`` or the test's tmp dir.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_helpers import train_record
from playwright.sync_api import Browser, Page, sync_playwright

from distlearn.live.server import LiveServer

pytestmark = pytest.mark.timeout(120)

WAIT_MS = 30_000  # every wait on the page; the page itself updates a few times per second


@pytest.fixture
def browser(chromium_path: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, headless=True, timeout=WAIT_MS)
        try:
            yield browser
        finally:
            browser.close()


def number(page: Page, selector: str, attribute: str) -> int:
    return int(page.get_attribute(selector, attribute) or 0)


def wait_for_number(page: Page, selector: str, attribute: str, above: int) -> int:
    """Wait until ``selector``'s numeric ``attribute`` exceeds ``above``; returns the value."""
    page.wait_for_function(
        "([selector, attribute, above]) => "
        "Number(document.querySelector(selector).getAttribute(attribute)) > above",
        arg=[selector, attribute, above],
        timeout=WAIT_MS,
    )
    return number(page, selector, attribute)


def train_records_in(path: Path) -> int:
    return sum('"kind": "train"' in line for line in path.read_text().splitlines())


def test_the_page_shows_runs_growing_reports_problems_and_switches_to_the_toy_view(
    tmp_path, writing_run, artifact_dir, browser
):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text(train_record(5).to_json() + "\n{this line is cut\n")
    missing = tmp_path / "missing"
    errors: list[str] = []

    with LiveServer([writing_run.run_dir, broken, missing], port=0, poll_interval=0.1) as server:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(server.url, timeout=WAIT_MS)
        page.wait_for_selector("#connection.live", timeout=WAIT_MS)

        # one card per run; the bad inputs are messages on the page, and the page keeps working
        page.wait_for_function("document.querySelectorAll('.run-card').length === 3", timeout=WAIT_MS)
        page.wait_for_selector("#message-list li:has-text('does not exist')", timeout=WAIT_MS)
        malformed = "#message-list li:has-text('metrics.jsonl:2: not a JSON object')"
        page.wait_for_selector(malformed, timeout=WAIT_MS)
        # the card's state comes in its own event, which may follow the message (seen once under load)
        missing_state = ".run-card[data-run='missing'] .state"
        page.wait_for_selector(f"{missing_state}:has-text('missing')", timeout=WAIT_MS)
        assert "missing" in page.inner_text(missing_state)

        # curves appear and grow while the run writes records
        first = wait_for_number(page, "#chart-loss", "data-points", 0)
        assert page.locator("#chart-loss canvas").count() >= 1  # drawn by uPlot
        grown = wait_for_number(page, "#chart-loss", "data-points", first + 4)
        assert grown > first
        wait_for_number(page, "#chart-accuracy", "data-points", 0)
        wait_for_number(page, "#chart-throughput", "data-points", 0)
        wait_for_number(page, "#chart-bytes", "data-points", 0)
        wait_for_number(page, "#staleness", "data-bars", 0)  # rank 1 logs a staleness
        assert wait_for_number(page, "#timeline", "data-rows", 2) == 3  # two ranks of growing, one of broken
        wait_for_number(page, "#timeline", "data-comm-windows", 0)  # compute / communication split drawn
        page.wait_for_timeout(400)  # let the last render settle before the picture
        page.screenshot(path=str(artifact_dir / "live-runs.png"), full_page=True)

        # the toy view: choose a problem, run three optimizers, watch the paths being drawn
        page.click("#tab-toy")
        assert page.is_hidden("#view-runs") and page.is_visible("#view-toy")
        page.wait_for_selector("#toy-function option[value='beale']", state="attached", timeout=WAIT_MS)
        page.select_option("#toy-function", "beale")
        page.wait_for_function(
            "document.getElementById('toy-formula').textContent.startsWith('beale')", timeout=WAIT_MS
        )
        page.check("#toy-optimizers input[value='nesterov']")
        page.fill("#toy-steps", "80")
        page.select_option("#toy-delay", "0.005")
        page.click("#toy-run")
        page.wait_for_selector("#toy-canvas[data-steps='80']", timeout=WAIT_MS)
        page.wait_for_function("document.querySelectorAll('#toy-table tr').length === 5", timeout=WAIT_MS)
        rows = page.locator("#toy-table tr").all_inner_texts()
        assert [row.split()[0] for row in rows[1:]] == ["sgd", "momentum", "nesterov", "adam"]
        assert wait_for_number(page, "#chart-toy-loss", "data-points", 0) == 4 * 81
        page.wait_for_timeout(300)
        page.screenshot(path=str(artifact_dir / "live-toy.png"), full_page=True)

        # back to the runs: every record the run wrote is on the page, none lost while it was hidden
        writing_run.stop()
        page.click("#tab-runs")
        assert page.is_visible("#view-runs") and page.is_hidden("#view-toy")
        expected = train_records_in(writing_run.run_dir / "metrics.jsonl")
        deadline = time.monotonic() + 20
        shown = None
        while time.monotonic() < deadline:
            shown = page.evaluate(
                "() => [...window.distlearnLive.runs.values()]"
                ".find((run) => run.label === 'growing').ranks.get(0).train.length"
            )
            if shown == expected:
                break
            page.wait_for_timeout(100)
        assert shown == expected

        # closing the page ends its event stream, and only that: the server (and a demo's runs) go on
        assert server.state.clients >= 1
        page.close()
        deadline = time.monotonic() + 10
        while server.state.clients and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.state.clients == 0 and not server.state.stopping.is_set()

    assert errors == []
    for name in ("live-runs.png", "live-toy.png"):
        assert (artifact_dir / name).stat().st_size > 10_000
