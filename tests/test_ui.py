"""The MLflow UI shows a study: a real `mlflow server` on 127.0.0.1 over the demo study's store, pages opened
in headless Chromium (Debian's `chromium` through Playwright's executable_path; never `playwright install`).

* The compare page lists every run name and the `val/top1/joint` metric.
* The links the project prints (each training run's at its start, the study's at its end) open MLflow's
  Model-training view — side bar Runs / Models, not the GenAI view's Evaluation runs / Judges, which the
  same page shows without the link's `workflowType` — and the run list's chart view draws a per-epoch
  `val/top1/main` chart with one line per training run of the study.

Screenshots are kept as test artifacts (tmp_path, and $TEST_ARTIFACTS_DIR when set). Every wait is on a
condition in the page, never a fixed sleep."""
import json
import os
import re
import shutil
import urllib.parse
from pathlib import Path

import pytest

from pipeline.tracking.store import DEFAULT_UI

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
TIMEOUT_MS = 120_000  # a loaded 2-core box: the UI's first render can take tens of seconds
METRIC = "val/top1/main"  # logged per epoch by every method

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study_ui(demo_study):
    """(MlflowClient of the finished demo study, a real MLflow server over its own SQLite store)."""
    pytest.importorskip("playwright.sync_api", reason="playwright (requirements.txt) is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium (Makefile APT_PACKAGES)")
    assert demo_study.rc == 0, demo_study.out[-3000:]
    from mlflow.tracking import MlflowClient

    from tests.conftest import MlflowServer

    server = MlflowServer(demo_study.runs_root).start()
    try:
        yield MlflowClient(tracking_uri=demo_study.uri), server
    finally:
        server.stop()


def keep_artifact(path: Path) -> None:
    keep = os.environ.get("TEST_ARTIFACTS_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


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


def browser_page(playwright):
    """A fresh browser (no stored UI choice: MLflow remembers the last view in localStorage) and a page."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
    return browser, browser.new_page(viewport={"width": 1600, "height": 1400})


def side_bar(page):
    """The experiment's side bar, once it has rendered its entries (both views have a "Runs"-like entry)."""
    nav = page.get_by_role("navigation").last  # the inner one: the entries of the experiment's view
    nav.get_by_text(re.compile(r"^(Runs|Evaluation runs)$")).first.wait_for(timeout=TIMEOUT_MS)
    return nav


def test_compare_page_shows_every_run_and_the_joint_metric(demo_study, study_ui, tmp_path):
    from playwright.sync_api import sync_playwright

    client, server = study_ui
    experiment = client.get_experiment_by_name("ci-study")
    runs = client.search_runs([experiment.experiment_id], "tags.study = 'ci'")
    names = sorted({r.info.run_name for r in runs})
    assert {"baseline", "ssal1", "lc"} <= set(names)
    shot = tmp_path / "mlflow_compare.png"
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        try:
            page.goto(compare_url(server.url, experiment.experiment_id, [r.info.run_id for r in runs]),
                      wait_until="domcontentloaded", timeout=TIMEOUT_MS)
            for name in names:
                page.get_by_text(name, exact=False).first.wait_for(state="attached", timeout=TIMEOUT_MS)
            find_in_virtual_table(page, "val/top1/joint", TIMEOUT_MS)
            page.screenshot(path=str(shot), full_page=True)
            text = page.inner_text("body")
        finally:
            browser.close()
    for name in names:
        assert name in text
    assert "val/top1/joint" in text
    assert shot.stat().st_size > 10_000
    keep_artifact(shot)


def test_printed_links_open_the_training_view_with_per_epoch_charts(demo_study, study_ui, tmp_path):
    from playwright.sync_api import sync_playwright

    client, server = study_ui
    experiment = client.get_experiment_by_name("ci-study")
    # the training runs of the study: the ones with a per-epoch history of METRIC
    trained = {r.info.run_name: r.info.run_id for r in client.search_runs([experiment.experiment_id], "tags.study = 'ci'")
               if len(client.get_metric_history(r.info.run_id, METRIC)) >= 2}
    assert {"baseline", "ssal1"} <= set(trained), trained

    # what the project printed: each training run's link at its start, the experiment's at the study's end
    training_view = "?workflowType=machine_learning"
    for run_id in trained.values():
        assert f"{DEFAULT_UI}/#/experiments/{experiment.experiment_id}/runs/{run_id}{training_view}" in demo_study.out
    printed = re.search(r"^\[study\] runs: .*?(http://\S+)$", demo_study.out, re.M)
    assert printed, demo_study.out[-3000:]
    link = printed.group(1)
    assert link == f"{DEFAULT_UI}/#/experiments/{experiment.experiment_id}/runs{training_view}"
    link = server.url + link[len(DEFAULT_UI):]  # `mlflow ui` serves on 127.0.0.1:5000; this server elsewhere

    views = tmp_path / "mlflow_training_view.png"
    charts = tmp_path / "mlflow_charts.png"
    with sync_playwright() as playwright:
        # without the link's parameter a fresh browser shows the GenAI view: what the parameter is for
        browser, page = browser_page(playwright)
        try:
            page.goto(link.replace(training_view, ""), wait_until="domcontentloaded", timeout=TIMEOUT_MS)
            assert "Evaluation runs" in side_bar(page).inner_text()
        finally:
            browser.close()

        browser, page = browser_page(playwright)
        try:
            page.goto(link, wait_until="domcontentloaded", timeout=TIMEOUT_MS)
            entries = side_bar(page).inner_text().splitlines()
            assert {"Runs", "Models"} <= set(entries) and not {"Evaluation runs", "Judges"} & set(entries), entries
            page.screenshot(path=str(views))

            # the run list's chart view: one chart card per metric, one line (and legend entry) per run;
            # cards below the fold are rendered lazily, so the chart search narrows them to METRIC's card
            page.locator("label:has(input[name=runs-view-mode][value=CHART])").click()
            page.get_by_placeholder("Search metric charts").fill(METRIC)
            card = page.locator("[data-testid=experiment-view-compare-runs-card]").filter(
                has=page.locator(f"h4[title='{METRIC}']"))
            for name in trained:
                card.get_by_text(f"{name} ({METRIC})", exact=True).wait_for(state="attached", timeout=TIMEOUT_MS)
            card.locator("path.js-line").first.wait_for(state="attached", timeout=TIMEOUT_MS)
            # a run's line: a move to its first epoch and a line on to each next one (plotly may merge
            # collinear points, so no exact count); runs with one point (lc) draw a marker, no line
            lines = [d for d in card.locator("path.js-line").evaluate_all("ps => ps.map(p => p.getAttribute('d'))")
                     if d and "L" in d]
            assert len(set(lines)) >= len(trained), lines  # plotly draws each trace twice
            assert card.get_by_text("Step", exact=True).count()  # per step (= epoch), not per wall time
            page.screenshot(path=str(charts), full_page=True)
        finally:
            browser.close()
    for shot in (views, charts):
        assert shot.stat().st_size > 5_000
        keep_artifact(shot)
