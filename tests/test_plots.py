"""Plot series and SVG charts (shared/plots.py) on real SQLite files, a fixed clock, hostile names."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from shared import plots
from shared.seats import release_slot_of
from shared.states import CaseStatus, SlotStatus
from shared.store import case_from_row, transition
from tests.conftest import make_config
from tests.test_eta import HANDOFF, Desk

HOUR = 3600.0
NOW = 1_000 * HOUR + 1800  # half past an hour
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def desk(tmp_path):
    made = Desk(make_config(tmp_path, pueue={"groups": {"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}}}))
    yield made
    made.conn.close()


def completed_at(desk: Desk, name: str, done: float, run: float = 100.0) -> int:
    """A case registered ``run + 15`` s before ``done`` (claim 5 s after, start HANDOFF later)."""
    return desk.completed(name, done - run - HANDOFF, run)


def failed_at(desk: Desk, name: str, done: float) -> int:
    case_id = desk.running(name, done - 200, started=done - 190)
    assert transition(desk.conn, case_id, CaseStatus.RUNNING, CaseStatus.FAILED, now=done, worker="test",
                      fields={"completed_at": done, "outcome": "failed", "exit_code": 1})
    row = desk.conn.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
    assert release_slot_of(desk.conn, case_from_row(row), SlotStatus.ZOMBIE, now=done, worker="test")
    return case_id


# -- series -------------------------------------------------------------------------------------------

def test_completed_per_hour_counts_completions_in_clock_hours(desk):
    for name, done in (("old", NOW - 30 * HOUR), ("prev1", NOW - HOUR), ("prev2", NOW - HOUR - 600),
                       ("now1", NOW - 100), ("now2", NOW - 1700)):
        completed_at(desk, name, done)
    failed_at(desk, "broken", NOW - 50)  # a failure is not a completion
    series = plots.completed_per_hour(desk.conn, NOW, hours=24)
    assert len(series) == 24
    assert series[-1] == (NOW - 1800, 2) and series[-2] == (NOW - 1800 - HOUR, 2)
    assert series[0][0] == NOW - 1800 - 23 * HOUR
    assert sum(count for _, count in series) == 4  # 30 h ago is outside the window


@pytest.mark.parametrize("zone", ["Asia/Seoul", "Europe/Berlin"])
def test_completed_per_day_starts_at_local_midnight_also_across_a_dst_change(desk, zone):
    tz = ZoneInfo(zone)
    now = datetime(2026, 11, 3, 12, 0, tzinfo=tz).timestamp()  # Berlin left summer time on 25 October
    late = datetime(2026, 11, 2, 23, 30, tzinfo=tz).timestamp()
    early = datetime(2026, 11, 3, 0, 30, tzinfo=tz).timestamp()
    before_dst = datetime(2026, 10, 24, 12, 0, tzinfo=tz).timestamp()
    for name, done in (("late", late), ("early", early), ("early2", early + 60), ("october", before_dst)):
        completed_at(desk, name, done)
    series = plots.completed_per_day(desk.conn, now, tz, days=30)
    assert len(series) == 30
    for start, _ in series:
        local = datetime.fromtimestamp(start, tz)
        assert (local.hour, local.minute, local.second) == (0, 0, 0)
    by_day = {datetime.fromtimestamp(start, tz).date().isoformat(): count for start, count in series}
    assert by_day["2026-11-03"] == 2 and by_day["2026-11-02"] == 1 and by_day["2026-10-24"] == 1
    assert sum(by_day.values()) == 4
    if zone == "Europe/Berlin":
        lengths = {datetime.fromtimestamp(a, tz).date().isoformat(): b - a
                   for (a, _), (b, _) in zip(series, series[1:])}
        assert lengths["2026-10-25"] == 25 * HOUR  # the day the clocks went back


def test_turnaround_and_gpu_wait_of_cases_since(desk):
    completed_at(desk, "old", NOW - 10 * HOUR, run=100.0)
    completed_at(desk, "recent", NOW - 100, run=300.0)
    failed_at(desk, "broken", NOW - 50)
    running = desk.running("live", NOW - 40, started=NOW - 20)
    since = NOW - HOUR
    assert plots.turnaround_seconds(desk.conn, since) == [5 + HANDOFF + 300.0]  # drop -> completed
    # drop -> real start: registered 5 s before the claim, started HANDOFF after it (failed and running too)
    assert sorted(plots.gpu_wait_seconds(desk.conn, since)) == [5 + HANDOFF, 15.0, 25.0]
    assert running and plots.turnaround_seconds(desk.conn, NOW + 1) == []


def test_gpu_busy_share_per_host_counts_each_slot_as_one_gpu(desk):
    window = 1000.0
    completed_at(desk, "half", NOW - 100, run=490.0)  # gpu_a held NOW-600 .. NOW-100
    shares = plots.gpu_busy_share(desk.conn, NOW, window)
    assert shares == {"hpc": pytest.approx(500 / 2000)}  # two GPUs, one busy half the window
    desk.running("busy", NOW - 200, started=NOW - 190)  # holds a seat from NOW - 200 on
    assert plots.gpu_busy_share(desk.conn, NOW, window)["hpc"] == pytest.approx(700 / 2000)


# -- SVG ---------------------------------------------------------------------------------------------

HOSTILE = '<script>alert("x")</script> & "quoted" \'single\' ]]>'


def parsed(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # well-formed XML: nothing broke out of an attribute or an element
    assert root.tag == f"{SVG}svg" and root.get("viewBox") == f"0 0 {plots.WIDTH} {plots.HEIGHT}"
    assert root[0].tag == f"{SVG}title" and root.get("role") == "img"
    assert "<script" not in svg and "style=" not in svg
    return root


def texts(root: ET.Element) -> list[str]:
    return [el.text or "" for el in root.iter() if el.tag in (f"{SVG}text", f"{SVG}title")]


def test_bar_chart_escapes_hostile_titles_labels_and_units():
    svg = plots.bar_chart_svg([(HOSTILE, 3.0), ("ok", 1.0)], title=HOSTILE, unit=HOSTILE)
    root = parsed(svg)
    assert root[0].text == HOSTILE
    assert any(HOSTILE in t for t in texts(root))
    bars = [el for el in root.iter(f"{SVG}rect") if el.get("class") == "bar"]
    assert len(bars) == 2 and float(bars[0].get("height")) == pytest.approx(3 * float(bars[1].get("height")))
    assert bars[0].find(f"{SVG}title").text == f"{HOSTILE}: 3 {HOSTILE}"


def test_histogram_bins_values_and_escapes():
    svg = plots.histogram_svg([1.0, 2.0, 2.5, 9.0, 10.0], bins=3, title=HOSTILE, unit="s<b>")
    root = parsed(svg)
    bars = [el for el in root.iter(f"{SVG}rect") if el.get("class") == "bar"]
    assert [el.find(f"{SVG}title").text.split(": ")[1] for el in bars] == ["3 cases", "0 cases", "2 cases"]
    assert bars[0].find(f"{SVG}title").text.startswith("1–4 s<b>")
    assert "s&lt;b&gt;" in svg


def test_share_bars_clamp_and_escape_host_names():
    svg = plots.share_bars_svg({HOSTILE: 0.25, "gpu2": 1.7, "gpu3": -1}, title="GPU busy")
    root = parsed(svg)
    bars = [el for el in root.iter(f"{SVG}rect") if el.get("class") == "bar"]
    widths = [float(el.get("width")) for el in bars]
    assert widths[1] == pytest.approx(4 * widths[0]) and widths[2] == 0
    assert [el.find(f"{SVG}title").text for el in bars] == [f"{HOSTILE}: 25%", "gpu2: 100%", "gpu3: 0%"]


def test_empty_charts_say_no_data():
    for svg in (plots.bar_chart_svg([], title="t", unit="u"), plots.histogram_svg([], bins=5, title="t", unit="u"),
                plots.share_bars_svg({}, title="t")):
        assert "no data" in texts(parsed(svg))
