"""Estimated finish and start times (ETAs) of unfinished cases; pure and read-only.

``estimate`` reads the unfinished cases (indexed by status) and a bounded window of
recent runs, then plays the queue forward on paper:

- a running case that has started finishes when its progress rate says (progress %
  over the time since its real start); without progress yet, one recent median run
  after its start;
- every case still waiting for its GPU (queued in the scheduler behind another,
  being uploaded, or ``submitted``) gets a start: each slot of a host taking claims
  (neither drained nor last seen unreachable) is a lane that runs ``parallel`` cases
  at once and holds ``depth``; the waiting cases, in the claim's own order
  (``claims.waiting_in_claim_order``), take the lane whose seat frees first, start one
  upload after their claim (or when the GPU frees, if later) and run one median run.

Times mix our clock and the HPC's (``started_at`` is the scheduler's start): they are
taken to agree, as NTP keeps them.
"""
from __future__ import annotations

import bisect
import heapq
import sqlite3
import statistics
from dataclasses import dataclass, field
from typing import Iterable

from shared.claims import waiting_in_claim_order
from shared.config import Config
from shared.liveness import down_hosts
from shared.maintenance import drains
from shared.states import CaseStatus, sql_list
from shared.store import Case, case_from_row

DEFAULT_RUN_SECONDS = 1800.0   # no run finished anywhere yet, none in flight with progress
DEFAULT_HANDOFF_SECONDS = 30.0  # claim -> task on the HPC (upload, submit) when never measured
RECENT_RUNS = 20               # a host's median is over its last N completed runs
RUN_WINDOW = 2000              # completed cases read, newest first: bounded at any database size
MIN_PROGRESS = 0.5             # percent: below this a rate says nothing yet


@dataclass(frozen=True)
class Eta:
    case_id: int
    kind: str   # "finish" | "start"
    at: float   # epoch seconds, our clock
    basis: str  # one short human line: how it was computed


@dataclass(frozen=True)
class Pace:
    """How long a case takes on one host: its run, and the hand-off from claim to the HPC."""
    run_seconds: float
    handoff_seconds: float
    basis: str  # where run_seconds came from, e.g. "median of 20 runs on gpu1"
    measured: bool = False  # run_seconds comes from completed runs


@dataclass(frozen=True)
class _Run:
    case_id: int
    host: str | None
    seconds: float
    handoff: float | None


@dataclass
class _Lane:
    """One slot (host, group) on paper: which of its cases end when."""
    host: str
    group: str
    depth: int
    parallel: int
    pace: Pace
    claimable: bool
    held: int = 0
    finishes: list[float] = field(default_factory=list)  # sorted

    def claim_at(self, now: float) -> float:
        """When a seat is free for the next case (the depth-th newest one ended)."""
        return now if self.held < self.depth else max(now, self.finishes[self.held - self.depth])

    def gpu_free_at(self, now: float) -> float:
        """When the next case in line can start on the GPU (``parallel`` run at once)."""
        return now if self.held < self.parallel else max(now, self.finishes[self.held - self.parallel])

    def add(self, finish: float) -> None:
        self.held += 1
        bisect.insort(self.finishes, finish)

    def run_after(self, ready: float, now: float) -> tuple[float, float]:
        """(start, finish) of the next case in line that is ready at ``ready``; records it."""
        start = max(ready, self.gpu_free_at(now))
        finish = start + self.pace.run_seconds
        self.add(finish)
        return start, finish


# -- recent runs --------------------------------------------------------------------------------

RECENT_SQL = ("SELECT case_id, host, started_at, completed_at, running_since FROM cases"
              f" WHERE status = {CaseStatus.COMPLETED.sql} ORDER BY submitted_at DESC, case_id DESC LIMIT ?")


def _recent_runs(conn: sqlite3.Connection, now: float) -> list[_Run]:
    """The newest completed runs of every host, newest first, from a bounded window."""
    runs, wanted = [], []
    for r in conn.execute(RECENT_SQL, (RUN_WINDOW,)):
        if r["started_at"] is None or r["completed_at"] is None or r["completed_at"] > now:
            continue
        wanted.append(r)
    claims = _claim_times(conn, [r["case_id"] for r in wanted[:RECENT_RUNS * 8]])
    for r in wanted:
        claimed = claims.get(r["case_id"])
        handoff = None if claimed is None or r["running_since"] is None else max(0.0, r["running_since"] - claimed)
        runs.append(_Run(r["case_id"], r["host"], max(0.0, r["completed_at"] - r["started_at"]), handoff))
    return runs


def _claim_times(conn: sqlite3.Connection, case_ids: list[int]) -> dict[int, float]:
    """Each case's last claim (``submitted -> submitting``), from the per-case event index."""
    found = {}
    for case_id in case_ids:
        row = conn.execute(f"SELECT at FROM case_events WHERE case_id = ? AND from_status = {CaseStatus.SUBMITTED.sql}"
                           f" AND to_status = {CaseStatus.SUBMITTING.sql} ORDER BY event_id DESC LIMIT 1",
                           (case_id,)).fetchone()
        if row is not None:
            found[case_id] = row[0]
    return found


def _median_or(values: Iterable[float], default: float) -> float:
    values = list(values)
    return statistics.median(values) if values else default


def host_paces(conn: sqlite3.Connection, hosts: Iterable[str], now: float,
               in_flight: list[Case]) -> dict[str, Pace]:
    """Each host's pace. Run: its own recent runs; else every host's; else the projected runs
    of the cases in flight; else ``DEFAULT_RUN_SECONDS``. Hand-off: the same runs' and the
    cases in flight (each has finished its upload); else ``DEFAULT_HANDOFF_SECONDS``."""
    runs = _recent_runs(conn, now)
    overall = runs[:RECENT_RUNS]
    claims = _claim_times(conn, [c.case_id for c in in_flight[:RECENT_RUNS]])
    flying = [c.running_since - claims[c.case_id] for c in in_flight[:RECENT_RUNS]
              if c.case_id in claims and c.running_since is not None]
    handoff_all = _median_or([r.handoff for r in overall if r.handoff is not None] + flying,
                             DEFAULT_HANDOFF_SECONDS)
    projected = [_projected_total(c, now) for c in in_flight if _has_rate(c)]
    paces = {}
    for host in hosts:
        own = [r for r in runs if r.host == host][:RECENT_RUNS]
        handoff = _median_or((r.handoff for r in own if r.handoff is not None), handoff_all)
        if own:
            paces[host] = Pace(statistics.median(r.seconds for r in own), handoff,
                               f"median of {plural(len(own), 'run')} on {host}", measured=True)
        elif overall:
            paces[host] = Pace(statistics.median(r.seconds for r in overall), handoff,
                               f"median of {plural(len(overall), 'run')} on all hosts", measured=True)
        elif projected:
            paces[host] = Pace(statistics.median(projected), handoff,
                               f"projected from {plural(len(projected), 'running case')}")
        else:
            paces[host] = Pace(DEFAULT_RUN_SECONDS, handoff, "no run measured yet: default")
    return paces


# -- running cases --------------------------------------------------------------------------------

def _has_rate(case: Case) -> bool:
    return case.started_at is not None and case.progress >= MIN_PROGRESS and \
        case.status_updated_at > case.started_at


def _projected_total(case: Case, now: float) -> float:
    """Run length the progress rate projects: the time from its start to the poller's last
    progress report, over the fraction done. Once that end has passed without the case ending,
    the run is slower than reported: the time until ``now`` over the fraction done."""
    fraction = min(100.0, case.progress) / 100.0
    reported = (case.status_updated_at - case.started_at) / fraction
    return reported if case.started_at + reported >= now else (now - case.started_at) / fraction


def _finish_by_rate(case: Case, pace: Pace, now: float) -> tuple[float, str]:
    """(finish, basis) from the progress rate. With a measured pace the rate counts for the
    fraction done and the median run for the rest: early progress says little (a report's
    lag, the start-up before the first batch are multiplied by 100 / percent)."""
    weight = case.progress / 100.0 if pace.measured else 1.0
    total = weight * _projected_total(case, now) + (1.0 - weight) * pace.run_seconds
    basis = f"{case.progress:.0f}% done {span(case.status_updated_at - case.started_at)} after its start (progress rate"
    basis += f", weighted {weight:.0%} against the {pace.basis})" if pace.measured else ")"
    return max(now, case.started_at + total), basis


def finish_of_started(case: Case, pace: Pace, now: float) -> Eta:
    """A started case's finish: from its progress rate, else one median run after its start."""
    if case.started_at is not None and case.progress >= 100.0:
        return Eta(case.case_id, "finish", now, "100% done: its results are on the way")
    if _has_rate(case):
        return Eta(case.case_id, "finish", *_finish_by_rate(case, pace, now))
    at = case.started_at + pace.run_seconds
    basis = f"no progress yet: started {span(now - case.started_at)} ago, runs take {span(pace.run_seconds)}" \
            f" ({pace.basis})"
    if at < now:
        return Eta(case.case_id, "finish", now, basis + "; overdue, any moment now")
    return Eta(case.case_id, "finish", at, basis)


# -- the queue on paper ------------------------------------------------------------------------------

def _lanes(config: Config, paces: dict[str, Pace], closed: set[str]) -> dict[tuple[str, str], _Lane]:
    return {(host.name, slot.name): _Lane(host.name, slot.name, slot.depth, slot.parallel, paces[host.name],
                                          claimable=host.name not in closed)
            for host in config.hosts for slot in host.slots}


def _lane_of(lanes: dict[tuple[str, str], _Lane], case: Case, paces: dict[str, Pace], fallback: Pace) -> _Lane:
    """The lane a placed case is on; a slot the config no longer has gets a lane of its own."""
    key = (case.host or "", case.slot or "")
    if key not in lanes:
        lanes[key] = _Lane(key[0], key[1], 1, 1, paces.get(key[0], fallback), claimable=False)
    return lanes[key]


HELD_SQL = (f"SELECT * FROM cases WHERE status IN ({sql_list(CaseStatus.RUNNING, CaseStatus.SUBMITTING)})"
            " ORDER BY status_updated_at, case_id")


def _held_cases(conn: sqlite3.Connection) -> tuple[list[Case], list[Case], list[Case]]:
    """(running and started, running but queued in the scheduler, submitting), each in start order."""
    rows = conn.execute(HELD_SQL).fetchall()
    cases = [case_from_row(r) for r in rows]
    started = [c for c in cases if c.status.value == "running" and c.started_at is not None]
    queued = sorted((c for c in cases if c.status.value == "running" and c.started_at is None),
                    key=lambda c: (c.running_since or c.status_updated_at, c.case_id))
    submitting = [c for c in cases if c.status.value == "submitting"]
    return started, queued, submitting


def estimate(conn: sqlite3.Connection, config: Config, now: float) -> dict[int, Eta]:
    """An Eta for every unfinished case that can have one, by case id.

    Running and started: ``finish``. Running but queued behind another in its slot,
    ``submitting`` and ``submitted``: ``start``. A waiting case gets none while no host
    takes claims (all drained or last seen unreachable). Reads only; one consistent pass
    when called inside ``queries.read_snapshot``.
    """
    started, queued, submitting = _held_cases(conn)
    closed = {d.host for d in drains(conn)} | set(down_hosts(conn))
    names = [h.name for h in config.hosts] + sorted({c.host or "" for c in started + queued + submitting})
    paces = host_paces(conn, dict.fromkeys(names), now, started + queued)
    lanes = _lanes(config, paces, closed)
    etas = _place_held(lanes, paces, started, queued, submitting, now)
    waiting = waiting_in_claim_order(conn, now=now, max_wait_seconds=config.scheduling.max_wait_seconds)
    etas.update(_queue_starts(waiting, [lane for lane in lanes.values() if lane.claimable], now))
    return etas


def _place_held(lanes: dict[tuple[str, str], _Lane], paces: dict[str, Pace], started: list[Case],
                queued: list[Case], submitting: list[Case], now: float) -> dict[int, Eta]:
    """ETAs of the cases that hold a seat, each put on its own lane: the started ones first,
    then those queued in the scheduler, then those being submitted."""
    fallback = next(iter(paces.values()), Pace(DEFAULT_RUN_SECONDS, DEFAULT_HANDOFF_SECONDS, "default"))
    etas: dict[int, Eta] = {}
    for case in started:
        lane = _lane_of(lanes, case, paces, fallback)
        etas[case.case_id] = finish_of_started(case, lane.pace, now)
        lane.add(etas[case.case_id].at)
    for case in queued:
        lane = _lane_of(lanes, case, paces, fallback)
        start, _ = lane.run_after(now, now)
        etas[case.case_id] = Eta(case.case_id, "start", start, f"queued on {lane.host}/{lane.group}"
                                 f" behind {lane.held - 1} of ours; {lane.pace.basis}")
    for case in submitting:
        lane = _lane_of(lanes, case, paces, fallback)
        start, _ = lane.run_after(max(now, case.status_updated_at + lane.pace.handoff_seconds), now)
        etas[case.case_id] = Eta(case.case_id, "start", start,
                                 f"being submitted to {lane.host}/{lane.group}; upload takes"
                                 f" {span(lane.pace.handoff_seconds)}; {lane.pace.basis}")
    return etas


def _queue_starts(waiting: list[Case], lanes: list[_Lane], now: float) -> dict[int, Eta]:
    """Starts of the ``submitted`` cases, each on the lane whose seat frees first, taken as the
    claim takes them: the first in claim order that is not backing off then."""
    if not lanes:
        return {}
    heap = [(lane.claim_at(now), lane.gpu_free_at(now), i) for i, lane in enumerate(lanes)]
    heapq.heapify(heap)
    gpus = sum(lane.parallel for lane in lanes)
    order, etas = _ClaimOrder(waiting), {}
    while order:
        free, _, i = heapq.heappop(heap)
        place, case, claim = order.take(free)
        lane = lanes[i]
        start, _ = lane.run_after(claim + lane.pace.handoff_seconds, now)
        paused = f"backing off for {span(claim - now)}, " if claim > free else ""
        etas[case.case_id] = Eta(case.case_id, "start", start,
                                 f"{ordinal(place)} in the queue ({case.priority}), {paused}"
                                 f"{plural(gpus, 'GPU')} taking cases; {lane.pace.basis}")
        heapq.heappush(heap, (lane.claim_at(now), lane.gpu_free_at(now), i))
    return etas


class _ClaimOrder:
    """The waiting cases as the claim takes them: in claim order, passing over a case whose
    backoff (``next_attempt_at``) has not ended. Linear in the queue plus the cases passed over."""

    def __init__(self, waiting: list[Case]):
        self.waiting, self.head = waiting, 0
        self.passed: list[tuple[int, Case]] = []  # (place, case) backing off, ahead of ``head``

    def __bool__(self) -> bool:
        return self.head < len(self.waiting) or bool(self.passed)

    def take(self, free: float) -> tuple[int, Case, float]:
        """(place, case, when) of the case a claim at ``free`` takes: the first ready one, else
        the one whose backoff ends first (taken then)."""
        for k, (place, case) in enumerate(self.passed):
            if _ready_at(case) <= free:
                return (*self.passed.pop(k), free)
        while self.head < len(self.waiting):
            place, case = self.head + 1, self.waiting[self.head]
            self.head += 1
            if _ready_at(case) <= free:
                return place, case, free
            self.passed.append((place, case))
        k = min(range(len(self.passed)), key=lambda j: _ready_at(self.passed[j][1]))
        place, case = self.passed.pop(k)
        return place, case, _ready_at(case)


def _ready_at(case: Case) -> float:
    return case.next_attempt_at or 0.0


# -- words --------------------------------------------------------------------------------------

def span(seconds: float) -> str:
    """A short duration: ``42s``, ``3m12s``, ``2h05m``, ``3d04h``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
