"""One phase's rows as the results and the bandit need them: exposures and units per arm, per-unit
sums of every metric (feedback and the implicit signals of outcomes), the primary metric's
timeline, voted battles and the allocation log. Run in one read transaction."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .battles import Battle
from .records import AllocationRow, PhaseData
from .schema import allocations, assignments, battle_votes, battles, exposures, feedback, floor_int, outcomes

_o, _e, _f = outcomes.c, exposures.c, feedback.c

# Implicit metrics as SQL over outcomes: (sum, count, which rows). Aborted requests are left out of
# latency and length, which they would otherwise shorten; `aborted` itself counts them.
IMPLICIT_SQL = {
    "latency_s": (sa.func.sum(_o.latency_s), sa.func.count(_o.latency_s), _o.aborted == 0),
    "ttft_s": (sa.func.sum(_o.ttft_s), sa.func.count(_o.ttft_s), sa.true()),
    "output_tokens": (sa.func.sum(_o.output_tokens), sa.func.count(_o.output_tokens), _o.aborted == 0),
    "aborted": (sa.func.sum(_o.aborted), sa.func.count(), sa.true()),
    "truncated": (sa.func.sum(sa.case((_o.finish_reason == "length", 1), else_=0)), sa.func.count(), _o.aborted == 0),
}


_t = allocations.c
_ALLOCATIONS = sa.select(_t.version, _t.created_at, _t.weights, _t.reason).where(
    _t.key == sa.bindparam("key"), _t.phase == sa.bindparam("phase")).order_by(_t.version)


def load_allocations(conn: Connection, key: str, phase: int) -> list[AllocationRow]:
    """The allocation log of a phase, oldest first (built once: the scheduler reads it every tick)."""
    return [AllocationRow(int(r[0]), float(r[1]), r[2], r[3])
            for r in conn.execute(_ALLOCATIONS, {"key": key, "phase": phase})]


def phase_data(conn: Connection, key: str, phase: int, primary_metric: str, origin: float | None,
               points: int) -> PhaseData:
    in_phase = (_e.key == key, _e.phase == phase)
    exposure_counts = {r[0]: int(r[1]) for r in conn.execute(
        sa.select(_e.arm, sa.func.count()).where(*in_phase).group_by(_e.arm))}
    span = conn.execute(sa.select(sa.func.min(_e.created_at), sa.func.max(_e.created_at)).where(*in_phase)).one()
    # The timeline spans the phase's activity: from its start to its last exposure.
    first = None if span[0] is None else float(span[0])
    last = None if span[1] is None else float(span[1])
    origin = origin if origin is not None else (first or 0.0)
    width = max(((last or origin) - origin) / points, 1e-3)
    a = assignments.c
    units = [(r[0], int(r[1]), int(r[2])) for r in conn.execute(
        sa.select(a.arm, a.allocation_version, sa.func.count()).where(a.key == key, a.phase == phase)
        .group_by(a.arm, a.allocation_version))]
    metric_rows = [(r[0], r[1], r[2], float(r[3]), int(r[4])) for r in conn.execute(
        sa.select(_e.arm, _e.unit_id, _f.name, sa.func.sum(_f.value), sa.func.count())
        .select_from(feedback.join(exposures, _e.exposure_id == _f.exposure_id)).where(*in_phase)
        .group_by(_e.arm, _e.unit_id, _f.name))]
    for name, (total, count, which) in IMPLICIT_SQL.items():
        metric_rows += [(r[0], r[1], name, float(r[2]), int(r[3])) for r in conn.execute(
            sa.select(_e.arm, _e.unit_id, total, count)
            .select_from(outcomes.join(exposures, _e.exposure_id == _o.exposure_id)).where(*in_phase, which)
            .group_by(_e.arm, _e.unit_id)) if r[3]]
    b, v = battles.c, battle_votes.c
    voted = [Battle(r[0], r[1], r[2]) for r in conn.execute(
        sa.select(b.left_arm, b.right_arm, v.winner).select_from(battles.join(battle_votes, v.battle_id == b.battle_id))
        .where(b.key == key, b.phase == phase))]
    return PhaseData(exposure_counts, units, metric_rows,
                     _timeline_rows(conn, in_phase, primary_metric, origin, width), voted,
                     load_allocations(conn, key, phase), first, last, origin, width)


def _timeline_rows(conn: Connection, in_phase: tuple, metric: str, origin: float,
                   width: float) -> list[tuple[str, str, int, float, int]]:
    """(arm, unit, bucket, sum, count) of the primary metric, by time bucket of the signal."""
    if metric in IMPLICIT_SQL:
        total, count, which = IMPLICIT_SQL[metric]
        source, at, where = outcomes.join(exposures, _e.exposure_id == _o.exposure_id), _o.created_at, (which,)
    else:
        total, count = sa.func.sum(_f.value), sa.func.count()
        source, at, where = feedback.join(exposures, _e.exposure_id == _f.exposure_id), _f.created_at, (_f.name == metric,)
    bucket = floor_int((at - origin) / width).label("bucket")
    rows = conn.execute(sa.select(_e.arm, _e.unit_id, bucket, total, count).select_from(source)
                        .where(*in_phase, *where).group_by(_e.arm, _e.unit_id, sa.literal_column("bucket")))
    return [(r[0], r[1], int(r[2]), float(r[3]), int(r[4])) for r in rows if r[4]]
