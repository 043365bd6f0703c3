"""The dashboard in real headless Chromium: no console errors, every plot holds data, the page
refreshes itself. Run as a script to regenerate docs/dashboard.png from simulated data:

    python tests/test_experiments_dashboard.py docs/dashboard.png
"""
import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from experiments_helpers import Population, StandaloneServer, drive_service

from expo_serve.experiments import ExperimentService, open_store
from expo_serve.experiments.config import parse_experiment

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

SWEEP = {"key": "alpha-sweep", "description": "Thumbs-up rate across α on live chat traffic", "min_sample": 60,
         "primary_metric": "thumbs", "arms": [
             {"name": "control", "alpha": 0.0, "control": True}, {"name": "a04", "alpha": 0.4},
             {"name": "a08", "alpha": 0.8}, {"name": "a15", "alpha": 1.5}]}
BANDIT = {"key": "alpha-bandit", "allocation": "thompson", "min_sample": 60,
          "thompson": {"burn_in": 20, "floor": 0.05, "update_every_s": 60},
          "arms": [{"name": "control", "alpha": 0.0, "control": True}, {"name": "a04", "alpha": 0.4},
                   {"name": "a10", "alpha": 1.0}]}
PLOT_KINDS = {"forest", "lift", "cumulative", "pbest", "weights", "dose", "heatmap", "bt"}


async def populate(db_url: str) -> None:
    """A realistic phase: an hour of traffic from 400 simulated users, battles with votes."""
    clock = {"now": 1_760_000_000.0}

    def tick():
        clock["now"] += 45

    service = ExperimentService(open_store(db_url), [parse_experiment(SWEEP), parse_experiment(BANDIT)],
                                clock=lambda: clock["now"])
    await service.start(background=False)
    population = Population(users=1500, seed=1)
    await drive_service(service, "alpha-sweep", population, 2000, concurrency=48, clock_step=tick)
    clock["now"] = 1_760_000_000.0
    for _ in range(25):
        await drive_service(service, "alpha-bandit", population, 40, concurrency=40, clock_step=tick)
        await service.update_allocations()
    messages = [{"role": "user", "content": "Explain WAL mode in one paragraph."}]

    async def model_pair(messages, alphas, **_):
        # Stands in for the model: the text is all the voter sees, and its quality follows α.
        return [json.dumps({"quality_alpha": a}) for a in alphas]

    for _ in range(240):
        battle = await service.create_battle("alpha-sweep", messages, model_pair)
        left, right = (json.loads(battle[side]["content"])["quality_alpha"] for side in ("left", "right"))
        await service.vote(battle["id"], population.battle_vote(left, right))
    await service.close()


def capture(db_url: str, screenshot: Path) -> dict:
    from playwright.sync_api import sync_playwright

    with StandaloneServer(db_url) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1320, "height": 1000})
        problems = []
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.on("requestfailed", lambda req: problems.append(f"failed: {req.url}"))
        page.goto(f"{server.base_url}/dashboard?key=alpha-sweep&refresh=2", wait_until="networkidle")
        plots = page.eval_on_selector_all(
            "svg.plot", "els => els.map(e => [e.dataset.plot, Number(e.dataset.points), e.querySelectorAll('.mark').length])")
        decision = page.get_attribute("[data-decision]", "data-winner")
        srm = page.get_attribute("[data-srm]", "data-srm")
        with page.expect_response(lambda r: "/dashboard/panel" in r.url and r.status == 200, timeout=15000):
            pass  # the page's own refresh timer fetches the panel again
        page.wait_for_timeout(300)
        marks_after_refresh = page.eval_on_selector_all("svg.plot .mark", "els => els.length")
        page.screenshot(path=str(screenshot), full_page=True)
        bandit = browser.new_page(viewport={"width": 1320, "height": 1000})
        bandit.on("pageerror", lambda exc: problems.append(str(exc)))
        bandit.goto(f"{server.base_url}/dashboard?key=alpha-bandit", wait_until="networkidle")
        bandit_plots = bandit.eval_on_selector_all("svg.plot", "els => els.map(e => [e.dataset.plot, Number(e.dataset.points)])")
        browser.close()
    return {"problems": problems, "plots": plots, "winner": decision, "srm": srm,
            "marks_after_refresh": marks_after_refresh, "bandit_plots": bandit_plots}


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium chromium-driver)")
def test_dashboard_in_headless_chromium(tmp_path):
    pytest.importorskip("playwright", reason="the playwright package drives Chromium (pip install playwright)")
    db_url = f"sqlite:///{tmp_path / 'dash.db'}"
    asyncio.run(populate(db_url))
    seen = capture(db_url, tmp_path / "dashboard.png")
    assert seen["problems"] == []
    kinds = {kind for kind, points, marks in seen["plots"] if points > 0 and marks > 0}
    assert PLOT_KINDS <= kinds, seen["plots"]
    assert seen["winner"] == "a04" and seen["srm"] == "ok"
    assert seen["marks_after_refresh"] >= sum(marks for _, _, marks in seen["plots"]) * 0.9
    assert {"weights", "pbest"} <= {kind for kind, points in seen["bandit_plots"] if points > 0}
    assert (tmp_path / "dashboard.png").stat().st_size > 50_000


def test_panel_without_data_is_well_formed_svg():
    """A phase that has just started: every chart says so instead of drawing nothing or failing."""
    from expo_serve.experiments.dashboard import render_panel
    from expo_serve.experiments.results import build_results
    from expo_serve.experiments.store import AllocationRow, PhaseData

    exp = parse_experiment(SWEEP)
    data = PhaseData({}, [], [], [], [], [AllocationRow(0, 0.0, exp.fixed_weights(), "phase start")])
    results = build_results(exp, phase=1, status="running", data=data, now=10.0, phase_started_at=0.0,
                            current_weights=None, timeline=True)
    assert results["decision"]["status"] == "collecting" and results["srm_p"] is None
    html = render_panel(results, {"description": "<b>escaped</b>"})
    assert "&lt;b&gt;escaped" in html
    svgs = re.findall(r"<svg .*?</svg>", html, flags=re.S)
    assert len(svgs) >= 6
    for svg_text in svgs:
        ElementTree.fromstring(svg_text)  # well-formed XML
    assert "no data yet" in html and "no battles voted yet" in html


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png")
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "expo-dashboard-shot"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    url = f"sqlite:///{workdir / 'dash.db'}"
    asyncio.run(populate(url))
    print(json.dumps({k: v for k, v in capture(url, out).items() if k != "plots"}, indent=1))
