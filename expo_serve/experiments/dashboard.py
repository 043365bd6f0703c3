"""`GET /dashboard`: one page per experiment, drawn server-side as SVG; refreshes itself.

Panels: arms and counts with an SRM badge and the decision; a forest plot per metric and one of
the lift against control; cumulative means, P(best) and bandit weights over time; the metric
against α (dose–response); the battle heatmap with Bradley–Terry strengths.

In the server, with --api-key, the page and its panels need the key like every other route (its
static files do not): server/auth.py checks it, from the header or the sign-in form's cookie.
"""
from __future__ import annotations

from html import escape
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from . import svg
from .api import EnvelopeRoute
from .errors import ExperimentError, not_found
from .service import ExperimentService

STATIC_FILES = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
REFRESH_S = 10


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _num(x: float | None) -> str:
    return "–" if x is None else svg.fmt(x)


def _ci(ci) -> str:
    return "" if not ci else f" [{svg.fmt(ci[0])}, {svg.fmt(ci[1])}]"


def render_panel(results: dict, experiment: dict) -> str:
    key = results["key"]
    arms = results["arms"]
    names = [a["name"] for a in arms]
    primary = results["primary_metric"]
    decision = results["decision"]
    srm = results["srm_p"]
    srm_badge = ('<span class="badge neutral" data-srm="none">SRM: no data</span>' if srm is None else
                 f'<span class="badge bad" data-srm="flagged">SRM p = {srm:.2g}: split broken</span>'
                 if results["srm_flagged"] else f'<span class="badge good" data-srm="ok">SRM ok (p = {srm:.2g})</span>')
    verdict_class = {"winner": "good", "srm": "bad", "guardrail": "bad"}.get(decision["status"], "neutral")
    verdict = (f'<div class="decision {verdict_class}" data-decision="{escape(decision["status"])}" '
               f'data-winner="{escape(decision["winner"] or "")}"><strong>'
               + (f'Winner: {escape(decision["winner"])}' if decision["winner"] else escape(decision["status"].replace("_", " ")))
               + f'</strong> — {escape(decision["reason"])}</div>')

    header = (f'<h2>{escape(key)} <small>phase {results["phase"]} · {escape(results["status"])} · unit {escape(results["unit"])}'
              f' · {escape(results["allocation"])} allocation · primary: {escape(primary)}</small></h2>'
              f'<div class="badges">{srm_badge}<span class="badge neutral">min sample {results["min_sample"]} units/arm</span></div>'
              + verdict)
    if experiment.get("description"):
        header += f'<p class="description">{escape(experiment["description"])}</p>'

    rows = []
    for arm in arms:
        m = arm["metrics"].get(primary, {})
        lift = m.get("lift")
        lift_text = "control" if arm["control"] else ("–" if not lift or lift["relative"] is None else
                                                       f'{lift["relative"]:+.1%}' + (
                                                           f' [{lift["relative_ci"][0]:+.1%}, {lift["relative_ci"][1]:+.1%}]'
                                                           if lift["relative_ci"] else ""))
        guard = ", ".join(f'{g["metric"]}: {g["status"]}' for g in arm["guardrails"]) or "–"
        rows.append(f'<tr data-arm="{escape(arm["name"])}"><td>{escape(arm["name"])}</td><td>{svg.fmt(arm["alpha"])}</td>'
                    f'<td>{arm["units"]}</td><td>{arm["exposures"]}</td><td>{_pct(m.get("coverage"))}</td>'
                    f'<td>{_num(m.get("mean"))}{_ci(m.get("ci"))}</td><td>{lift_text}</td>'
                    f'<td>{_pct(arm["p_best"])}</td><td>{_pct(arm["weight"])}</td><td>{escape(guard)}</td></tr>')
    table = ('<table class="arms"><thead><tr><th>arm</th><th>α</th><th>units</th><th>exposures</th>'
             f'<th>{escape(primary)} coverage</th><th>{escape(primary)} mean [95%]</th><th>lift vs control '
             '[always-valid]</th><th>P(best)</th><th>weight</th><th>guardrails</th></tr></thead><tbody>'
             + "".join(rows) + '</tbody></table>')

    plots = []
    metrics = list(arms[0]["metrics"]) if arms else []
    for metric in metrics:
        plots.append(svg.forest(f"{metric}: mean and 95% interval per arm",
                                [(a["name"], a["metrics"][metric]["mean"],
                                  tuple(a["metrics"][metric]["ci"]) if a["metrics"][metric]["ci"] else None) for a in arms],
                                metric, kind="forest"))
    lift_rows, lift_colors = [], []
    for index, a in enumerate(arms):
        if a["control"]:
            continue
        lift_colors.append(index)
        lift = a["metrics"].get(primary, {}).get("lift")
        lift_rows.append((a["name"], lift["relative"] if lift else None,
                          tuple(lift["relative_ci"]) if lift and lift["relative_ci"] else None))
    plots.insert(1, svg.forest(f"{primary}: relative lift vs control (always-valid interval)", lift_rows,
                               "relative lift", reference=0.0, kind="lift", colors=lift_colors))

    timeline = results.get("timeline")
    if timeline:
        origin = results.get("phase_started_at") or timeline["t"][0]
        minutes = [(t - origin) / 60 for t in timeline["t"]]
        plots.append(svg.lines(f"{primary}: cumulative mean", [(n, minutes, timeline["arms"][n]["mean"]) for n in names],
                               "minutes since phase start", primary, kind="cumulative"))
        plots.append(svg.lines("P(best) over time", [(n, minutes, timeline["p_best"][n]) for n in names],
                               "minutes since phase start", "P(best)", y_range=(0, 1), kind="pbest"))
    history = results.get("weights_history") or []
    if history:
        origin = results.get("phase_started_at") or history[0]["at"]
        end = max(results.get("last_exposure_at") or history[-1]["at"], history[-1]["at"])
        xs = [(h["at"] - origin) / 60 for h in history] + [(end - origin) / 60]
        plots.append(svg.lines("allocation weights over time", [
            (n, xs, [h["weights"].get(n) for h in history] + [history[-1]["weights"].get(n)]) for n in names],
            "minutes since phase start", "weight", y_range=(0, 1), step=True, kind="weights"))
    for metric in [primary] + [m for m in ("output_tokens", "latency_s") if m in metrics and m != primary]:
        plots.append(svg.dose_response(f"{metric} against α", [
            (a["name"], a["alpha"], a["metrics"][metric]["mean"],
             tuple(a["metrics"][metric]["ci"]) if a["metrics"][metric]["ci"] else None) for a in arms], metric))
    battles = results["battles"]
    games = [[battles["wins"][i][j] + battles["wins"][j][i] + battles["ties"][i][j] + battles["both_bad"][i][j]
              for j in range(len(names))] for i in range(len(names))]
    plots.append(svg.heatmap(f"battles: row's win rate against column ({battles['count']} voted)", names,
                             battles["win_rate"], games))
    if battles["count"]:
        plots.append(svg.forest("Bradley–Terry strength (log scale, bootstrap 95%)",
                                [(s["name"], s["strength"], tuple(s["ci"])) for s in battles["strengths"]],
                                "log-strength", reference=0.0, kind="bt"))
    return (f'<section class="panel" data-key="{escape(key)}">{header}{table}'
            f'<div class="plots">{"".join(f"<figure>{p}</figure>" for p in plots)}</div></section>')


def refresh_seconds(text: str | None) -> int:
    """`?refresh=N` (2 to 3600 seconds) overrides the default refresh period."""
    try:
        return min(max(int(text), 2), 3600) if text is not None else REFRESH_S
    except ValueError:
        return REFRESH_S


def render_page(experiments: list[dict], selected: str | None, panel: str, refresh_s: int = REFRESH_S) -> str:
    nav = "".join(f'<a href="?key={escape(e["key"])}" class="{"current" if e["key"] == selected else ""}">'
                  f'{escape(e["key"])} <small>{escape(e["status"])}</small></a>' for e in experiments)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>expo-serve experiments</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard/static/dashboard.css"></head>
<body data-key="{escape(selected or '')}" data-refresh-s="{refresh_s}">
<header><h1>expo-serve · α experiments</h1><nav>{nav}</nav><span id="updated"></span></header>
<main id="panel">{panel}</main>
<script src="/dashboard/static/dashboard.js"></script>
</body></html>"""


def create_dashboard_router(service: ExperimentService) -> APIRouter:
    router = APIRouter(route_class=EnvelopeRoute)

    async def panel_for(key: str | None) -> str:
        if key is None:
            return '<p class="empty">No experiment yet: define one with --experiments FILE or POST /v1/experiments.</p>'
        view = service.get_experiment(key)
        if view["phase"] == 0:
            return f'<p class="empty">{escape(key)} is a draft: start it to collect data.</p>'
        results = await service.results(key, timeline=True)
        return render_panel(results, view)

    def pick(key: str | None, experiments: list[dict]) -> str | None:
        if key is not None:
            if not any(e["key"] == key for e in experiments):
                raise not_found("experiment", key, "key")
            return key
        running = [e["key"] for e in experiments if e["status"] == "running"]
        return (running or [e["key"] for e in experiments] or [None])[0]

    @router.get("/dashboard", response_class=HTMLResponse)
    async def page(request: Request):
        experiments = service.list_experiments()
        selected = pick(request.query_params.get("key"), experiments)
        return HTMLResponse(render_page(experiments, selected, await panel_for(selected),
                                        refresh_seconds(request.query_params.get("refresh"))))

    @router.get("/dashboard/panel", response_class=HTMLResponse)
    async def panel(request: Request):
        experiments = service.list_experiments()
        return HTMLResponse(await panel_for(pick(request.query_params.get("key"), experiments)))

    @router.get("/dashboard/static/{name}")
    async def static(name: str):
        if name not in STATIC_FILES:
            raise ExperimentError(f"No static file {name!r}.", status=404, code="not_found")
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        return Response(body, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    return router
