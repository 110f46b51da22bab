"""The MLflow UI shows a study: a real `mlflow server` on 127.0.0.1 over the demo study's store, its
compare page opened in headless Chromium (Debian's `chromium` through Playwright's executable_path;
never `playwright install`). Every run name and the `val/top1/joint` metric must be on the page; the
screenshot is kept as a test artifact (tmp_path, and $TEST_ARTIFACTS_DIR when set)."""
import json
import os
import shutil
import urllib.parse
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.slow


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    runs = urllib.parse.quote(json.dumps(run_ids))
    experiments = urllib.parse.quote(json.dumps([experiment_id]))
    return f"{base}/#/compare-runs?runs={runs}&experiments={experiments}"


def find_in_virtual_table(page, text: str, timeout_ms: int) -> None:
    """The compare page's metric table is virtualised (react-virtualized grids of 300 px: only the rows in
    view exist in the DOM): scroll every such grid a few rows at a time until a row with `text` exists."""
    target = page.get_by_text(text, exact=True)
    page.locator("a[title='Plot chart']").first.wait_for(state="attached", timeout=timeout_ms)
    for _ in range(400):
        if target.count():
            return
        moved = page.evaluate("""() => {
            let moved = false;
            for (const grid of document.querySelectorAll('.ReactVirtualized__Grid')) {
                if (grid.scrollTop + grid.clientHeight < grid.scrollHeight - 1) {
                    grid.scrollTop += 120;
                    grid.dispatchEvent(new Event('scroll'));
                    moved = true;
                }
            }
            return moved;
        }""")
        page.wait_for_timeout(100)
        if not moved and not target.count():
            break
    if not target.count():
        raise AssertionError(f"{text!r} never appeared in the compare page's metric table")


def open_and_check(url: str, run_names: list[str], expected_texts: list[str], screenshot: Path,
                   timeout_ms: int = 120_000) -> str:
    """Open `url` in headless Chromium, wait until every name and text is in the page, screenshot it.
    Returns the page's text."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
            for text in run_names:
                page.get_by_text(text, exact=False).first.wait_for(state="attached", timeout=timeout_ms)
            for text in expected_texts:
                find_in_virtual_table(page, text, timeout_ms)
            page.wait_for_timeout(1500)  # let the plots settle for the screenshot
            page.screenshot(path=str(screenshot), full_page=True)
            return page.inner_text("body")
        finally:
            browser.close()


def test_compare_page_shows_every_run_and_the_joint_metric(demo_study, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="playwright (requirements.txt) is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium (Makefile APT_PACKAGES)")
    assert demo_study.rc == 0, demo_study.out[-3000:]
    from mlflow.tracking import MlflowClient

    from tests.conftest import MlflowServer

    client = MlflowClient(tracking_uri=demo_study.uri)
    experiment = client.get_experiment_by_name("ci-study")
    runs = client.search_runs([experiment.experiment_id], "tags.study = 'ci'")
    names = sorted({r.info.run_name for r in runs})
    assert {"baseline", "ssal1", "lc"} <= set(names)
    server = MlflowServer(demo_study.runs_root)  # a real server over the study's own SQLite store
    server.start()
    try:
        url = compare_url(server.url, experiment.experiment_id, [r.info.run_id for r in runs])
        shot = tmp_path / "mlflow_compare.png"
        text = open_and_check(url, names, ["val/top1/joint"], shot)
        for name in names:
            assert name in text
        assert "val/top1/joint" in text
        # the per-epoch chart view of the same experiment renders too
        chart = f"{server.url}/#/experiments/{experiment.experiment_id}/runs?compareRunsMode=CHART"
        open_and_check(chart, ["ssal1"], [], tmp_path / "mlflow_charts.png")
    finally:
        server.stop()
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("TEST_ARTIFACTS_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
        shutil.copy(tmp_path / "mlflow_charts.png", Path(keep) / "mlflow_charts.png")
    print(f"screenshot: {shot}")
