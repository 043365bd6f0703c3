"""`GET /dashboard`: one page per experiment, drawn server-side as SVG; refreshes itself.

Panels: arms and counts with an SRM badge and the decision; a forest plot per metric and one of
the lift against control; cumulative means, P(best) and bandit weights over time; the metric
against α (dose–response); the battle heatmap with Bradley–Terry strengths.

In the server, with --api-key, the page and its panels need the key like every other route (its
static files do not): server/auth.py checks it, from the header or the sign-in form's cookie.
"""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from . import svg
from .api import EnvelopeRoute
from .errors import ExperimentError, not_found
from .service import ExperimentService

STATIC_FILES = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
REFRESH_S = 10
VERDICT_CLASS = {"winner": "good", "srm": "bad", "guardrail": "bad"}

# The markup lives in templates/ (autoescaped: keys, arm names and descriptions are operators' text);
# the charts are SVG strings from svg.py, which escapes its own text.
_templates = Environment(loader=PackageLoader(__package__, "templates"), autoescape=True, undefined=StrictUndefined)
_templates.filters["g2"] = lambda x: f"{x:.2g}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _num(x: float | None) -> str:
    return "–" if x is None else svg.fmt(x)


def _ci(ci) -> str:
    return "" if not ci else f" [{svg.fmt(ci[0])}, {svg.fmt(ci[1])}]"


def _lift(arm: dict, primary: str) -> str:
    if arm["control"]:
        return "control"
    lift = arm["metrics"].get(primary, {}).get("lift")
    if not lift or lift["relative"] is None:
        return "–"
    ci = lift["relative_ci"]
    return f'{lift["relative"]:+.1%}' + (f" [{ci[0]:+.1%}, {ci[1]:+.1%}]" if ci else "")


def arm_rows(results: dict) -> list[dict]:
    """The arms table's cells, as text."""
    primary = results["primary_metric"]
    rows = []
    for arm in results["arms"]:
        m = arm["metrics"].get(primary, {})
        rows.append({"name": arm["name"], "alpha": svg.fmt(arm["alpha"]), "units": arm["units"],
                     "exposures": arm["exposures"], "coverage": _pct(m.get("coverage")),
                     "mean": _num(m.get("mean")) + _ci(m.get("ci")), "lift": _lift(arm, primary),
                     "p_best": _pct(arm["p_best"]), "weight": _pct(arm["weight"]),
                     "guardrails": ", ".join(f'{g["metric"]}: {g["status"]}' for g in arm["guardrails"]) or "–"})
    return rows


def plots(results: dict) -> list[str]:
    """Every chart of the panel, in order, as SVG."""
    arms = results["arms"]
    names = [a["name"] for a in arms]
    primary = results["primary_metric"]
    charts = []
    metrics = list(arms[0]["metrics"]) if arms else []
    for metric in metrics:
        charts.append(svg.forest(f"{metric}: mean and 95% interval per arm",
                                 [(a["name"], a["metrics"][metric]["mean"],
                                   tuple(a["metrics"][metric]["ci"]) if a["metrics"][metric]["ci"] else None)
                                  for a in arms], metric, kind="forest"))
    lift_rows, lift_colors = [], []
    for index, a in enumerate(arms):
        if a["control"]:
            continue
        lift_colors.append(index)
        lift = a["metrics"].get(primary, {}).get("lift")
        lift_rows.append((a["name"], lift["relative"] if lift else None,
                          tuple(lift["relative_ci"]) if lift and lift["relative_ci"] else None))
    charts.insert(1, svg.forest(f"{primary}: relative lift vs control (always-valid interval)", lift_rows,
                                "relative lift", reference=0.0, kind="lift", colors=lift_colors))

    timeline = results.get("timeline")
    if timeline:
        origin = results.get("phase_started_at") or timeline["t"][0]
        minutes = [(t - origin) / 60 for t in timeline["t"]]
        charts.append(svg.lines(f"{primary}: cumulative mean", [(n, minutes, timeline["arms"][n]["mean"]) for n in names],
                                "minutes since phase start", primary, kind="cumulative"))
        charts.append(svg.lines("P(best) over time", [(n, minutes, timeline["p_best"][n]) for n in names],
                                "minutes since phase start", "P(best)", y_range=(0, 1), kind="pbest"))
    history = results.get("weights_history") or []
    if history:
        origin = results.get("phase_started_at") or history[0]["at"]
        end = max(results.get("last_exposure_at") or history[-1]["at"], history[-1]["at"])
        xs = [(h["at"] - origin) / 60 for h in history] + [(end - origin) / 60]
        charts.append(svg.lines("allocation weights over time", [
            (n, xs, [h["weights"].get(n) for h in history] + [history[-1]["weights"].get(n)]) for n in names],
            "minutes since phase start", "weight", y_range=(0, 1), step=True, kind="weights"))
    for metric in [primary] + [m for m in ("output_tokens", "latency_s") if m in metrics and m != primary]:
        charts.append(svg.dose_response(f"{metric} against α", [
            (a["name"], a["alpha"], a["metrics"][metric]["mean"],
             tuple(a["metrics"][metric]["ci"]) if a["metrics"][metric]["ci"] else None) for a in arms], metric))
    battles = results["battles"]
    games = [[battles["wins"][i][j] + battles["wins"][j][i] + battles["ties"][i][j] + battles["both_bad"][i][j]
              for j in range(len(names))] for i in range(len(names))]
    charts.append(svg.heatmap(f"battles: row's win rate against column ({battles['count']} voted)", names,
                              battles["win_rate"], games))
    if battles["count"]:
        charts.append(svg.forest("Bradley–Terry strength (log scale, bootstrap 95%)",
                                 [(s["name"], s["strength"], tuple(s["ci"])) for s in battles["strengths"]],
                                 "log-strength", reference=0.0, kind="bt"))
    return charts


def render_panel(results: dict, experiment: dict) -> str:
    decision = results["decision"]
    return _templates.get_template("panel.html").render(
        r=results, d=decision, verdict_class=VERDICT_CLASS.get(decision["status"], "neutral"),
        description=experiment.get("description"), rows=arm_rows(results),
        plots=[Markup(chart) for chart in plots(results)])


def render_notice(message: str) -> str:
    return _templates.get_template("notice.html").render(message=message)


def refresh_seconds(text: str | None) -> int:
    """`?refresh=N` (2 to 3600 seconds) overrides the default refresh period."""
    try:
        return min(max(int(text), 2), 3600) if text is not None else REFRESH_S
    except ValueError:
        return REFRESH_S


def render_page(experiments: list[dict], selected: str | None, panel: str, refresh_s: int = REFRESH_S) -> str:
    return _templates.get_template("page.html").render(experiments=experiments, selected=selected,
                                                       panel=Markup(panel), refresh_s=refresh_s)


def create_dashboard_router(service: ExperimentService) -> APIRouter:
    router = APIRouter(route_class=EnvelopeRoute)

    async def panel_for(key: str | None) -> str:
        if key is None:
            return render_notice("No experiment yet: define one with --experiments FILE or POST /v1/experiments.")
        view = service.get_experiment(key)
        if view["phase"] == 0:
            return render_notice(f"{key} is a draft: start it to collect data.")
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
