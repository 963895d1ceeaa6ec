"""Plot data from the state database, and server-side SVG charts (no script); pure and read-only.

Series find a window's first event by a binary search over ``case_events``' primary key and
read only the window's events, whatever the size of the database. Charts are
plain SVG strings with a fixed ``viewBox``, an accessible ``<title>``, presentation
attributes instead of inline styles (a Content-Security-Policy may forbid those) and
every text run through ``html.escape``.
"""
from __future__ import annotations

import bisect
import math
import sqlite3
from datetime import datetime, timedelta
from html import escape
from zoneinfo import ZoneInfo

from shared.queries import slot_busy_seconds
from shared.states import CaseStatus, sql_list

# Workers stamp events with the ``now`` of their pass, so ids and times may disagree by a
# pass; the search for a window's first event allows this much.
CLOCK_SLACK_SECONDS = 600.0
ENDED_SQL = ("SELECT e.case_id, e.to_status, e.at, c.submitted_at, c.started_at"
             " FROM case_events e JOIN cases c ON c.case_id = e.case_id"
             f" WHERE e.event_id >= :first AND e.at >= :since AND e.from_status = {CaseStatus.RUNNING.sql}"
             f" AND e.to_status IN ({sql_list(CaseStatus.COMPLETED, CaseStatus.FAILED)}) ORDER BY e.event_id DESC")


# -- data ------------------------------------------------------------------------------------------

def first_event_near(conn: sqlite3.Connection, stamp: float) -> int:
    """The id of the first event stamped at or after ``stamp - CLOCK_SLACK_SECONDS``: a binary
    search over the primary key (event times grow with their ids, give or take a pass)."""
    low, high = conn.execute("SELECT COALESCE(MIN(event_id), 1), COALESCE(MAX(event_id), 0) + 1"
                             " FROM case_events").fetchone()
    target = stamp - CLOCK_SLACK_SECONDS
    while low < high:
        middle = (low + high) // 2
        row = conn.execute("SELECT event_id, at FROM case_events WHERE event_id >= ? ORDER BY event_id LIMIT 1",
                           (middle,)).fetchone()
        if row is None or row["at"] >= target:
            high = middle
        else:
            low = row["event_id"] + 1
    return low


def _ended_since(conn: sqlite3.Connection, since: float) -> list[sqlite3.Row]:
    """Events ``running -> completed|failed`` at or after ``since``, newest first (only the
    window's events are read)."""
    return conn.execute(ENDED_SQL, {"first": first_event_near(conn, since), "since": since}).fetchall()


def _completions(conn: sqlite3.Connection, since: float) -> list[float]:
    return [r["at"] for r in _ended_since(conn, since) if r["to_status"] == "completed"]


def _count_into(stamps: list[float], starts: list[float], end: float) -> list[tuple[float, int]]:
    """(bucket start, how many ``stamps`` fall in [start, next start)); the last bucket ends at ``end``."""
    ordered = sorted(stamps)
    bounds = starts[1:] + [end]
    return [(start, bisect.bisect_left(ordered, stop) - bisect.bisect_left(ordered, start))
            for start, stop in zip(starts, bounds)]


def completed_per_hour(conn: sqlite3.Connection, now: float, hours: int = 24) -> list[tuple[float, int]]:
    """Cases completed per clock hour, the last ``hours`` hours (the current one included), oldest first."""
    current = math.floor(now / 3600) * 3600
    starts = [current - 3600 * i for i in range(hours - 1, -1, -1)]
    return _count_into(_completions(conn, starts[0]), starts, current + 3600)


def completed_per_day(conn: sqlite3.Connection, now: float, tz: ZoneInfo, days: int = 30) -> list[tuple[float, int]]:
    """Cases completed per local day in ``tz`` (buckets start at local midnight, also across a
    daylight-saving change), the last ``days`` days (today included), oldest first."""
    today = datetime.fromtimestamp(now, tz).date()
    midnights = [today - timedelta(days=i) for i in range(days - 1, -1, -1)] + [today + timedelta(days=1)]
    stamps = [datetime(d.year, d.month, d.day, tzinfo=tz).timestamp() for d in midnights]
    return _count_into(_completions(conn, stamps[0]), stamps[:-1], stamps[-1])


def turnaround_seconds(conn: sqlite3.Connection, since: float) -> list[float]:
    """Drop (registration) to completed, for every case completed at or after ``since``."""
    return [max(0.0, r["at"] - r["submitted_at"]) for r in _ended_since(conn, since) if r["to_status"] == "completed"]


def gpu_wait_seconds(conn: sqlite3.Connection, since: float) -> list[float]:
    """Registration to the real start on the GPU, for every case that started at or after ``since``:
    those that ended since then (completed or failed) and those running now."""
    ended = {r["case_id"]: r for r in _ended_since(conn, since)}
    running = conn.execute("SELECT case_id, submitted_at, started_at FROM cases"
                           f" WHERE status = {CaseStatus.RUNNING.sql} AND started_at >= ?", (since,)).fetchall()
    rows = [r for r in ended.values() if r["started_at"] is not None and r["started_at"] >= since] + running
    return [max(0.0, r["started_at"] - r["submitted_at"]) for r in rows]


def gpu_busy_share(conn: sqlite3.Connection, now: float, window_seconds: float) -> dict[str, float]:
    """Per host, the share (0..1) of its GPU time in the last ``window_seconds`` during which a
    case held a seat (``slot_events``; a slot with depth counts once, as one GPU)."""
    busy: dict[str, list[float]] = {}
    for (host, _group), seconds in slot_busy_seconds(conn, now, window_seconds).items():
        busy.setdefault(host, []).append(seconds)
    return {host: min(1.0, sum(found) / (len(found) * window_seconds)) for host, found in sorted(busy.items())}


# -- SVG -----------------------------------------------------------------------------------------------

WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 36, 44
BAR_FILL, AXIS, TEXT = "#3b7dd8", "#888888", "#222222"
MAX_LABELS = 12


def _svg(title: str, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"'
            f' class="mqic-chart" preserveAspectRatio="xMidYMid meet">'
            f"<title>{escape(title)}</title>"
            f'<text x="{LEFT}" y="20" font-size="14" font-weight="bold" fill="{TEXT}">{escape(title)}</text>'
            + "".join(body) + "</svg>")


def _number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.2g}"


def _no_data(title: str) -> str:
    return _svg(title, [f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT / 2:.0f}" text-anchor="middle" font-size="13"'
                        f' fill="{AXIS}">no data</text>'])


def _bars(points: list[tuple[str, float]], unit: str, ticks: list[str] | None = None) -> list[str]:
    """Vertical bars over the plot area with a y-axis maximum and at most ``MAX_LABELS`` x labels
    (``ticks``, else the points' labels, which every bar's tooltip shows)."""
    top = max((v for _, v in points), default=0.0) or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / len(points)
    every = max(1, math.ceil(len(points) / MAX_LABELS))
    body = [f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" stroke="{AXIS}"/>',
            f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="{AXIS}"/>',
            f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end" font-size="11" fill="{TEXT}">'
            f"{escape(_number(top))} {escape(unit)}</text>",
            f'<text x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end" font-size="11" fill="{TEXT}">0</text>']
    for i, (label, value) in enumerate(points):
        height = max(0.0, value) / top * plot_h
        x = LEFT + i * step
        body.append(f'<rect class="bar" x="{x + step * 0.1:.1f}" y="{TOP + plot_h - height:.1f}"'
                    f' width="{step * 0.8:.1f}" height="{height:.1f}" fill="{BAR_FILL}">'
                    f"<title>{escape(label)}: {escape(_number(value))} {escape(unit)}</title></rect>")
        if i % every == 0:
            body.append(f'<text x="{x + step / 2:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" font-size="10"'
                        f' fill="{TEXT}">{escape(ticks[i] if ticks else label)}</text>')
    return body


def bar_chart_svg(points: list[tuple[str, float]], *, title: str, unit: str) -> str:
    """One bar per (label, value), e.g. cases completed per hour; 'no data' when empty."""
    return _svg(title, _bars(points, unit)) if points else _no_data(title)


def histogram_svg(values: list[float], *, bins: int, title: str, unit: str) -> str:
    """How many ``values`` fall in each of ``bins`` equal ranges from their minimum to their maximum
    (labels name each range's start, in ``unit``); 'no data' when empty."""
    if not values:
        return _no_data(title)
    bins = max(1, bins)
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / width))] += 1
    points = [(f"{_number(low + i * width)}–{_number(low + (i + 1) * width)} {unit}", float(n))
              for i, n in enumerate(counts)]
    body = _bars(points, "cases", ticks=[_number(low + i * width) for i in range(bins)])
    body.append(f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" text-anchor="end" font-size="11" fill="{TEXT}">'
                f"{escape(unit)} ({len(values)} cases)</text>")
    return _svg(title, body)


def share_bars_svg(shares: dict[str, float], *, title: str) -> str:
    """One horizontal bar per name, its share (0..1, clamped) of the full width, with the percent."""
    if not shares:
        return _no_data(title)
    plot_w = WIDTH - LEFT - RIGHT - 120
    row = min(32.0, (HEIGHT - TOP - 12) / len(shares))
    body = []
    for i, (name, share) in enumerate(shares.items()):
        share = min(1.0, max(0.0, share))
        y = TOP + i * row
        body += [f'<text x="{LEFT + 100}" y="{y + row * 0.65:.1f}" text-anchor="end" font-size="12" fill="{TEXT}">'
                 f"{escape(name)}</text>",
                 f'<rect x="{LEFT + 108}" y="{y + row * 0.15:.1f}" width="{plot_w}" height="{row * 0.7:.1f}"'
                 f' fill="none" stroke="{AXIS}"/>',
                 f'<rect class="bar" x="{LEFT + 108}" y="{y + row * 0.15:.1f}" width="{share * plot_w:.1f}"'
                 f' height="{row * 0.7:.1f}" fill="{BAR_FILL}">'
                 f"<title>{escape(name)}: {share * 100:.0f}%</title></rect>",
                 f'<text x="{LEFT + 114 + plot_w}" y="{y + row * 0.65:.1f}" font-size="12" fill="{TEXT}">'
                 f"{share * 100:.0f}%</text>"]
    return _svg(title, body)
