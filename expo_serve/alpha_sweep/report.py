"""The sweep's report: the recommendation, results.json, results.csv, report.md and sweep.png."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from .stats import CONFIDENCE, LC_RIDGE, RESAMPLES, AlphaStats


@dataclass
class Recommendation:
    alpha: float
    beats_control: bool  # False: no α beat α = 0 beyond noise, and α = 0 is kept
    reason: str


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.1f}%"


def _ci(low: float, high: float, pct: bool = False) -> str:
    if math.isnan(low):
        return "–"
    return f"[{_pct(low)}, {_pct(high)}]" if pct else f"[{low:.3g}, {high:.3g}]"


def ranked(stats: list[AlphaStats]) -> list[AlphaStats]:
    """Candidates (α ≠ 0), best first: paired win rate, then mean score; the smaller α on a tie
    (sorted is stable and the grid is ascending, so equal keys keep the smaller α first)."""
    return sorted((s for s in stats if s.alpha != 0.0), key=lambda s: (-s.win_rate, -s.mean_score))


def recommend(stats: list[AlphaStats]) -> Recommendation:
    control = next(s for s in stats if s.alpha == 0.0)
    order = ranked(stats)
    winners = [s for s in order if s.beats_control]
    if not winners:
        best = order[0]
        return Recommendation(0.0, False, (
            f"No α beats α = 0 beyond noise: no paired win rate's {CONFIDENCE:.0%} interval lies wholly above 50%. "
            f"The best point estimate is α = {best.alpha:g} (win rate {_pct(best.win_rate)} {_ci(best.win_low, best.win_high, True)} "
            f"over {best.prompts} prompts), so keep α = 0, or test the candidates live with experiments.yaml."))
    best = winners[0]
    reason = (f"α = {best.alpha:g} has the highest paired win rate against α = 0 among the α whose {CONFIDENCE:.0%} interval "
              f"lies wholly above 50%: {_pct(best.win_rate)} {_ci(best.win_low, best.win_high, True)} over {best.prompts} prompts, "
              f"length-controlled {_pct(best.lc_win_rate)}; its answers average {best.mean_length:.1f} tokens against "
              f"{control.mean_length:.1f} at α = 0.")
    if best.lc_win_rate <= 0.5:
        reason += " Its length-controlled win rate is not above 50%: the advantage may come from longer answers alone."
    if best.alpha == max(s.alpha for s in stats):
        reason += " It is the largest α tried: a better one may lie beyond the grid, so extend --alphas before settling."
    return Recommendation(best.alpha, True, reason)


def table(stats: list[AlphaStats], recommended: float) -> str:
    """A fixed-width table, as the command prints it."""
    head = f"{'alpha':>7}  {'mean score [95% CI]':>28}  {'win vs 0 [95% CI]':>24}  {'LC win':>7}  {'length':>7}"
    lines = [head]
    for s in stats:
        mark = " *" if s.alpha == recommended else ""
        win = "(control)" if s.alpha == 0 else f"{_pct(s.win_rate)} {_ci(s.win_low, s.win_high, True)}"
        lc = "" if s.alpha == 0 else _pct(s.lc_win_rate)
        lines.append(f"{s.alpha:>7g}  {s.mean_score:>9.4g} {_ci(s.score_low, s.score_high):>18}  {win:>24}  {lc:>7}  "
                     f"{s.mean_length:>7.1f}{mark}")
    return "\n".join(lines)


def write_results(out: Path, stats: list[AlphaStats], rec: Recommendation, meta: dict) -> None:
    (out / "results.json").write_text(json.dumps({
        **meta,
        "recommended": {"alpha": rec.alpha, "beats_control": rec.beats_control, "reason": rec.reason},
        "per_alpha": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.row().items()}
                      for s in stats],  # NaN (an interval from one prompt) is not JSON: null
        "method": {"confidence": CONFIDENCE, "bootstrap": "percentile, over prompts", "resamples": RESAMPLES,
                   "ties": "count half a win", "lc_ridge": LC_RIDGE},
    }, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(AlphaStats)])
        writer.writeheader()
        for s in stats:
            writer.writerow(s.row())


def write_markdown(out: Path, stats: list[AlphaStats], rec: Recommendation, meta: dict, arms: list[float]) -> None:
    rows = ["| α | mean score [95% CI] | win rate vs α = 0 [95% CI] | length-controlled win rate | mean length (tokens) [95% CI] |",
            "|---:|---|---|---:|---|"]
    for s in stats:
        alpha = f"**{s.alpha:g}**" if s.alpha == rec.alpha else f"{s.alpha:g}"
        win = "control" if s.alpha == 0 else f"{_pct(s.win_rate)} {_ci(s.win_low, s.win_high, True)}"
        lc = "–" if s.alpha == 0 else _pct(s.lc_win_rate)
        rows.append(f"| {alpha} | {s.mean_score:.4g} {_ci(s.score_low, s.score_high)} | {win} | {lc} | "
                    f"{s.mean_length:.1f} {_ci(s.length_low, s.length_high)} |")
    text = f"""# α sweep

{meta['prompts']} prompts from `{meta['prompt_file']}`, {meta['samples_per_prompt']} sample(s) each at every α of
{', '.join(f'{a:g}' for a in meta['alphas'])} ({meta['decoding']}), judged by {meta['judge']}.

## Recommendation: α = {rec.alpha:g}

{rec.reason}

Arms of `experiments.yaml`: control (α = 0) and {', '.join(f'α = {a:g}' for a in arms)}.

{chr(10).join(rows)}

![score, win rate and length against α](sweep.png)

## How these numbers are made

- The prompt is the unit: a prompt's samples are averaged, and each {CONFIDENCE:.0%} interval is a percentile
  bootstrap over prompts ({RESAMPLES} resamples, scipy.stats.bootstrap, fixed seed).
- Win rate: each answer against the α = 0 answer to the same prompt and sample index. {meta['preference']}
  Identical answers tie; a tie counts half a win.
- Length-controlled win rate (AlpacaEval 2's idea): a logistic regression of the paired preference on the
  standardized length difference, read at zero difference; ties enter as half a win and half a loss; the
  slope carries a weak ridge penalty (λ = {LC_RIDGE:g}) so that a perfect split by length stays finite.
- "Beyond noise" means the win rate's interval lies wholly above 50%. The intervals are per α, not
  corrected for comparing {len(stats) - 1} α values with the control; treat a borderline winner as a
  candidate for the live A/B, which is what `experiments.yaml` starts.
{meta.get('judge_note', '')}
"""
    (out / "report.md").write_text(text, encoding="utf-8")


def write_plot(path: Path, stats: list[AlphaStats], rec: Recommendation, judge: str) -> None:
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display, no global backend

    alphas = [s.alpha for s in stats]
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    panels = fig.subplots(1, 3)

    def errorbar(ax, mean, low, high, **kw):
        lo = [m - l if not math.isnan(l) else 0 for m, l in zip(mean, low)]
        hi = [h - m if not math.isnan(h) else 0 for m, h in zip(mean, high)]
        ax.errorbar(alphas, mean, yerr=[lo, hi], marker="o", capsize=3, **kw)

    errorbar(panels[0], [s.mean_score for s in stats], [s.score_low for s in stats], [s.score_high for s in stats])
    panels[0].set_title(f"mean score ({judge})")
    errorbar(panels[1], [s.win_rate for s in stats], [s.win_low for s in stats], [s.win_high for s in stats], label="win rate")
    panels[1].plot(alphas, [s.lc_win_rate for s in stats], marker="s", linestyle="--", label="length-controlled")
    panels[1].axhline(0.5, color="grey", linewidth=0.8)
    panels[1].set_title("paired win rate vs α = 0")
    panels[1].legend(fontsize=8)
    errorbar(panels[2], [s.mean_length for s in stats], [s.length_low for s in stats], [s.length_high for s in stats])
    panels[2].set_title("mean response length (tokens)")
    for ax in panels:
        ax.set_xlabel("α")
        ax.axvline(rec.alpha, color="tab:green", linewidth=0.8, linestyle=":")
        ax.grid(alpha=0.3)
    fig.suptitle(f"α sweep: {CONFIDENCE:.0%} bootstrap intervals over {stats[0].prompts} prompts; recommended α = {rec.alpha:g}")
    fig.savefig(path, dpi=110)
