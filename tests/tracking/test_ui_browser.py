"""v1 and v2 of a hypothesis in a real browser: ``mi-spec ui`` on a store holding both (two small
real runs on the bundled induction model), Debian's Chromium (headless) driven by Playwright.

The runs page's chart view must draw the two parents' headline metric ``heads/patch.max_effect``
in ONE chart card (both run names in its legend, each bar the value logged for the run of that
colour), and the compare view of the two parents must show that metric in one row with both runs'
values. Were the keys different per hypothesis (as ``heads_induction-patching-v2/…`` once was),
each chart would hold one run and the test fails.

Skipped (with the reason) without ``/usr/bin/chromium`` (``apt-get install chromium``) or the
``playwright`` package (``pip install -e '.[ui-test]'``). The MLflow UI takes up to a minute to
answer on a loaded machine: every wait polls with generous limits; the UI's whole process group
is ended whatever happens (``procs.spawn``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import sys
from urllib.parse import urlencode

import procs
import pytest
from mlflow.tracking import MlflowClient
from tracking.studies import PATCHING, PATCHING_SMALL, run_small, variant

from mi_spec.tracking.ui import runs_url

CHROMIUM = os.environ.get("MI_SPEC_CHROMIUM", "/usr/bin/chromium")
if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set MI_SPEC_CHROMIUM)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[ui-test]')"
)

CARD = '[data-testid="experiment-view-compare-runs-card"]'  # a chart of the chart view
UI_MS = 180_000  # one page or element of a UI that a loaded 2-core machine serves slowly
METRIC = "heads/patch.max_effect"  # the headline metric of the "heads" experiment
SPREAD = "heads/patch.metric.source"  # a headline metric whose values differ between v1 and v2
# A chart card's legend ([run name, stroke style]) and bars ([fill style, text on the bar])
BARS_JS = """
card => [
  [...card.querySelectorAll('svg + span')]
    .filter(s => s.previousElementSibling.querySelector('path[style*="stroke"]'))
    .map(s => [s.textContent.trim(),
               s.previousElementSibling.querySelector('path').getAttribute('style')]),
  [...card.querySelectorAll('g.point')].filter(g => g.querySelector('text.bartext'))
    .map(g => [g.querySelector('path').getAttribute('style'),
               g.querySelector('text.bartext').textContent.trim()]),
]
"""
# Per leaf element of the page: text, vertical centre, left edge (for rows of the compare view)
LEAVES_JS = """
() => [...document.querySelectorAll('body *')]
  .filter(e => e.children.length === 0 && e.textContent.trim())
  .map(e => { const r = e.getBoundingClientRect();
              return [e.textContent.trim(), (r.top + r.bottom) / 2, r.left, r.top, r.bottom]; })
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(uri, experiment id, {hypothesis: parent run}) for v1 and v2 of the patching study."""
    tmp = tmp_path_factory.mktemp("ui_browser")
    uri = f"sqlite:///{tmp}/mlflow.db"
    v1 = run_small(PATCHING, uri)
    run_small(variant(tmp), uri, PATCHING_SMALL[1:])
    client = MlflowClient(uri)
    runs = client.search_runs([v1.experiment_id])
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    return uri, v1.experiment_id, parents


@pytest.fixture(scope="module")
def browser_page(store, tmp_path_factory):
    """A Chromium page and the base URL of ``mi-spec ui`` serving the store."""
    uri = store[0]
    tmp = tmp_path_factory.mktemp("ui_browser_session")
    port = free_port()
    log = tmp / "ui.log"
    cmd = [sys.executable, "-m", "mi_spec.cli.main", "ui", "--tracking-uri", uri]
    with (
        log.open("w") as out,
        procs.spawn([*cmd, "--port", str(port)], stdout=out, stderr=out) as proc,
        sync_api.sync_playwright() as playwright,
    ):
        base = f"http://127.0.0.1:{port}"
        procs.wait_http(f"{base}/health", proc=proc, log=log)
        context = playwright.chromium.launch_persistent_context(
            str(tmp / "profile"),  # a fresh profile: no saved chart layout or run selection
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu"],
            viewport={"width": 1600, "height": 1200},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(UI_MS)
            yield page, base
        finally:
            context.close()


def rgb(style: str) -> str:
    """``rgb(4, 134, 125)`` out of an inline style's ``fill``/``stroke``."""
    start = style.index("rgb(")
    return style[start : style.index(")", start) + 1].replace(" ", "")


def chart_card(page, metric: str):
    """The chart card titled `metric` in the runs page's chart view, once it has drawn bars."""
    card = page.locator(CARD).filter(has=page.locator(f'h4[title="{metric}"]'))
    card.locator("g.point text.bartext").first.wait_for()
    assert card.count() == 1, f"{card.count()} chart cards titled {metric!r}"
    return card


def bars_by_run(card) -> dict[str, float]:
    """Run name -> the value written on its bar, matched through the legend's colours."""
    legend, bars = card.evaluate(BARS_JS)
    colours = {rgb(stroke): name for name, stroke in legend}
    return {colours.get(rgb(fill), fill): float(text) for fill, text in bars}


def test_v1_and_v2_share_one_chart_and_one_compare_row(browser_page, store):
    page, base = browser_page
    _, exp_id, parents = store
    names = ["induction-patching", "induction-patching-v2"]
    assert sorted(parents) == names
    logged = {n: parents[n].data.metrics for n in names}

    # -- the chart view of the experiment's runs page ---------------------------------------
    page.goto(runs_url(base, exp_id) + "&compareRunsMode=CHART")
    search = page.get_by_placeholder("Search metric charts")
    search.fill("patch.max_effect")  # what a researcher types: every section's matching charts
    titles = page.locator(f"{CARD} h4")
    titles.filter(has_text=re.compile(r"^heads.*/patch\.max_effect$")).first.wait_for()
    # the heads experiment's max_effect charts: one, whatever the hypothesis
    charts = [t for t in titles.all_inner_texts() if re.fullmatch(r"heads.*/patch\.max_effect", t)]
    assert charts == [METRIC], f"one chart for v1 and v2 expected, the UI draws {charts}"
    assert not [t for t in titles.all_inner_texts() if "induction" in t]  # no per-hypothesis key
    seen = {}
    for metric in (METRIC, SPREAD):
        search.fill(metric)
        bars = bars_by_run(chart_card(page, metric))
        assert sorted(bars) == names, f"{metric}: one chart should hold both runs, got {bars}"
        for name, shown in bars.items():  # the UI writes 2 decimals on each bar
            assert math.isclose(shown, logged[name][metric], abs_tol=0.0051), (name, shown)
        seen[metric] = bars
    assert seen[SPREAD][names[0]] != seen[SPREAD][names[1]]  # two bars, two values

    # -- the compare view of the two parent runs ---------------------------------------------
    ids = [parents[n].info.run_id for n in names]
    query = urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp_id])})
    page.goto(f"{base}/#/compare-runs?{query}")
    name_cell = page.locator('a[title="Plot chart"]').filter(
        has_text=re.compile(f"^{re.escape(METRIC)}$")
    )
    name_cell.wait_for()
    page.get_by_text("Run Name:", exact=True).wait_for()
    order = [text for text, *_ in row_of(page.evaluate(LEAVES_JS), "Run Name:")]
    assert sorted(order) == names, order  # one column per run
    name_cell.scroll_into_view_if_needed()
    values = row_values(page.evaluate(LEAVES_JS), name_cell.bounding_box())
    assert len(values) == 2, f"the {METRIC} row shows {values}"
    for name, shown in zip(order, values, strict=True):  # the UI rounds to 3 decimals
        assert math.isclose(shown, logged[name][METRIC], abs_tol=0.00051), (name, shown)
    print(
        f"chart {METRIC!r}: {seen[METRIC]}; chart {SPREAD!r}: {seen[SPREAD]}; "
        f"compare row {METRIC!r}: {dict(zip(order, values, strict=True))}"
    )


def row_of(leaves: list, label: str) -> list:
    """The leaves on the line of the leaf reading `label` (without it), left to right."""
    *_, top, bottom = next(x for x in leaves if x[0] == label)
    return sorted(
        (x for x in leaves if top <= x[1] <= bottom and x[0] != label), key=lambda x: x[2]
    )


def row_values(leaves: list, box: dict) -> list[float]:
    """Numbers on the line of `box` (the metric's name cell), left to right."""
    top, bottom = box["y"], box["y"] + box["height"]
    right = box["x"] + box["width"]
    found = []
    for text, centre, left, *_ in sorted(leaves, key=lambda x: x[2]):
        if top <= centre <= bottom and left >= right:
            try:
                found.append(float(text))
            except ValueError:
                continue
    return found
