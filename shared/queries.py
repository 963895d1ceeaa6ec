"""Read-only queries shared by ``mqic-top``, the ``mqic`` command line and the exporter.

Every function takes an open connection (usually ``connect(path, readonly=True)``)
and only reads. Each query is answered from an index, so a frame stays cheap with
100,000 cases; ``overview`` reads everything inside one read transaction, which
gives one consistent picture without ever blocking a writer (WAL).
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

from shared.config import HostConfig
from shared.durations import in_words
from shared.gpus import gpu_views
from shared.liveness import HOST_KEY
from shared.maintenance import Drain, drains
from shared.share import ShareState, share_state
from shared.states import CaseStatus, Outcome, SlotStatus, sql_list
from shared.store import Case, case_from_row

STATUSES = tuple(s.value for s in CaseStatus)
ACTIVE_STATUSES = ("submitted", "submitting", "running")

CASE_VIEW_COLUMNS = ("case_id, case_name, status, progress, host, pueue_group, pueue_task_id,"
                     " submitted_at, status_updated_at, attempts, outcome, needs_review, review_reason,"
                     " priority, delivered_at, delivery_error")


@dataclass(frozen=True)
class CaseView:
    """The columns a listing shows; ``updated_at`` is ``status_updated_at``."""
    case_id: int
    case_name: str
    status: str
    progress: float
    host: str | None  # the host its folder and task are on (None: never placed)
    slot: str | None
    task_id: int | None
    submitted_at: float
    updated_at: float
    attempts: int
    outcome: str | None
    needs_review: bool
    review_reason: str | None
    priority: str = "normal"
    delivered_at: float | None = None
    delivery_error: str | None = None


@dataclass(frozen=True)
class SlotView:
    """One seat of a slot (host, group, seat) with the case it names (``case_*`` are None when free)."""
    host: str
    group: str
    seat: int
    gpu: str | None
    status: str
    since: float
    case_id: int | None
    case_name: str | None
    case_status: str | None
    task_id: int | None
    progress: float | None


@dataclass(frozen=True)
class WorkerView:
    name: str
    pid: int
    host: str
    started_at: float
    heartbeat: float
    alive: bool


@dataclass(frozen=True)
class RemoteView:
    """What the workers last saw of one host (``host_reach``); ``reachable`` None when nothing
    was recorded. ``down_since`` is when the current outage began (None while reachable)."""
    host: str
    reachable: bool | None
    checked_at: float | None = None
    checked_by: str | None = None
    error: str | None = None
    down_since: float | None = None
    problem: str | None = None  # HOST_KEY: ssh refused the host's key (not an outage)

    @property
    def key_refused(self) -> bool:
        return self.problem == HOST_KEY


@dataclass(frozen=True)
class HostView:
    """One host as an operator sees it: how it is reached, its drain and how full its seats are.

    ``configured`` is False for a host the config no longer names whose rows remain (a seat
    still holding a case, a drain); ``backend`` and ``address`` are None for such a host.
    """
    name: str
    configured: bool
    backend: str | None
    address: str | None
    remote: RemoteView
    drain: Drain | None
    seats: int
    in_use: int
    running: int

    @property
    def drained(self) -> bool:
        return self.drain is not None


@dataclass(frozen=True)
class Health:
    healthy: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Upkeep:
    """Day-to-day state: drained hosts, results awaiting delivery, notices not sent."""
    drains: tuple[Drain, ...] = ()
    urgent_waiting: int = 0
    awaiting_delivery: int = 0
    delivery_failing: int = 0
    delivery_error: str | None = None  # the newest delivery error, when some fail
    notices_pending: int = 0
    notices_failing: int = 0
    share: ShareState | None = None  # the results share's recorded problem (None: it answered last time)

    @property
    def drained(self) -> bool:
        return bool(self.drains)


@dataclass(frozen=True)
class Overview:
    """One consistent picture of the database, as the monitor shows it."""
    now: float
    totals: dict[str, int]
    slots: tuple[SlotView, ...]
    recent: tuple[CaseView, ...]
    flagged: tuple[CaseView, ...]
    workers: tuple[WorkerView, ...]
    last_change: float | None
    hosts: tuple[HostView, ...]
    health: Health
    upkeep: Upkeep = Upkeep()
    gpus: tuple = ()  # shared.gpus.GpuView per GPU: the newest nvidia-smi reading (issue 21)

    @property
    def active(self) -> int:
        return sum(self.totals[s] for s in ACTIVE_STATUSES)


@dataclass(frozen=True)
class PhaseSample:
    """One measured duration of a phase (upload, queue_wait, run), in seconds."""
    event_id: int
    phase: str
    seconds: float


def to_jsonable(value: Any) -> Any:
    """Dataclasses (and lists/dicts of them) as plain JSON-ready values."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: to_jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, CaseStatus):
        return value.value
    return value


@contextmanager
def read_snapshot(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One read transaction: every query inside sees the same database state."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def _case_view(row: sqlite3.Row) -> CaseView:
    return CaseView(case_id=row["case_id"], case_name=row["case_name"], status=row["status"],
                    progress=row["progress"], host=row["host"], slot=row["pueue_group"],
                    task_id=row["pueue_task_id"], submitted_at=row["submitted_at"],
                    updated_at=row["status_updated_at"], attempts=row["attempts"],
                    outcome=row["outcome"], needs_review=bool(row["needs_review"]),
                    review_reason=row["review_reason"], priority=row["priority"],
                    delivered_at=row["delivered_at"], delivery_error=row["delivery_error"])


# -- cases ------------------------------------------------------------------------------------

TOTAL_SQL = "SELECT COUNT(*) FROM cases WHERE status = ?"
RECENT_SQL = f"SELECT {CASE_VIEW_COLUMNS} FROM cases ORDER BY status_updated_at DESC LIMIT ?"
NEWEST_SQL = f"SELECT {CASE_VIEW_COLUMNS} FROM cases ORDER BY case_id DESC LIMIT ?"
NEWEST_WITH_STATUS_SQL = (f"SELECT {CASE_VIEW_COLUMNS} FROM cases WHERE status = ?"
                          " ORDER BY submitted_at DESC, case_id DESC LIMIT ?")
FLAGGED_SQL = (f"SELECT {CASE_VIEW_COLUMNS} FROM cases WHERE needs_review = 1"
               " ORDER BY status_updated_at DESC LIMIT ?")


def status_totals(conn: sqlite3.Connection) -> dict[str, int]:
    """Number of cases in every status (all five keys, zero when empty)."""
    return {status: conn.execute(TOTAL_SQL, (status,)).fetchone()[0] for status in STATUSES}


def recent_cases(conn: sqlite3.Connection, limit: int = 10) -> list[CaseView]:
    """The cases whose status or progress changed most recently, newest first."""
    return [_case_view(r) for r in conn.execute(RECENT_SQL, (limit,))]


def list_cases(conn: sqlite3.Connection, status: str | None = None, limit: int = 50) -> list[CaseView]:
    """The newest cases (by registration), optionally only those in ``status``."""
    if status is None:
        return [_case_view(r) for r in conn.execute(NEWEST_SQL, (limit,))]
    CaseStatus.parse(status)
    return [_case_view(r) for r in conn.execute(NEWEST_WITH_STATUS_SQL, (status, limit))]


def review_flags(conn: sqlite3.Connection, limit: int = 20) -> list[CaseView]:
    """Cases flagged for an operator (``needs_review = 1``), most recently changed first."""
    return [_case_view(r) for r in conn.execute(FLAGGED_SQL, (limit,))]


def find_case(conn: sqlite3.Connection, case_id: int) -> Case | None:
    row = conn.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
    return None if row is None else case_from_row(row)


def events_of(conn: sqlite3.Connection, case_id: int) -> list[dict[str, Any]]:
    """The full event history of a case, oldest first."""
    rows = conn.execute("SELECT event_id, from_status, to_status, at, worker, detail FROM case_events"
                        " WHERE case_id = ? ORDER BY event_id", (case_id,))
    return [dict(r) for r in rows]


def case_record(case: Case) -> dict[str, Any]:
    """A case row as a JSON-ready mapping."""
    return to_jsonable(case)


# -- slots, workers, freshness ------------------------------------------------------------------

SLOTS_SQL = (
    "SELECT g.host, g.pueue_group, g.seat, g.gpu, g.status, g.updated_at, g.assigned_case_id,"
    " c.case_name, c.status AS case_status, c.pueue_task_id, c.progress"
    " FROM gpu_resources g LEFT JOIN cases c ON c.case_id = g.assigned_case_id"
    " ORDER BY g.host, g.pueue_group, g.seat")
REACH_SQL = "SELECT host, ok, checked_at, checked_by, error, down_since, problem FROM host_reach ORDER BY host"
# A seat is in use while assigned or zombie (a zombie's task may still run).
SEATS_BY_HOST_SQL = ("SELECT host, COUNT(*) AS seats,"
                     f" COALESCE(SUM(status IN ({sql_list(SlotStatus.ASSIGNED, SlotStatus.ZOMBIE)})), 0) AS in_use"
                     " FROM gpu_resources GROUP BY host")
RUNNING_BY_HOST_SQL = f"SELECT host, COUNT(*) FROM cases WHERE status = {CaseStatus.RUNNING.sql} GROUP BY host"


def slots(conn: sqlite3.Connection) -> list[SlotView]:
    """Every seat of every host's slots (by host, group, seat) with its state, the case on it and
    since when it is in that state."""
    return [SlotView(host=r["host"], group=r["pueue_group"], seat=r["seat"], gpu=r["gpu"], status=r["status"],
                     since=r["updated_at"], case_id=r["assigned_case_id"], case_name=r["case_name"],
                     case_status=r["case_status"], task_id=r["pueue_task_id"], progress=r["progress"])
            for r in conn.execute(SLOTS_SQL)]


def reachability(conn: sqlite3.Connection) -> dict[str, RemoteView]:
    """What the workers last recorded of each host they talked to (``host_reach``), by host name."""
    return {r["host"]: RemoteView(host=r["host"], reachable=bool(r["ok"]), checked_at=r["checked_at"],
                                  checked_by=r["checked_by"], error=r["error"], down_since=r["down_since"],
                                  problem=r["problem"])
            for r in conn.execute(REACH_SQL)}


def running_by_host(conn: sqlite3.Connection) -> dict[str | None, int]:
    """Running cases per host (None: a running case without a host, which should not exist)."""
    return dict(conn.execute(RUNNING_BY_HOST_SQL).fetchall())


def address(host: HostConfig) -> str:
    """``user@host`` (and ``:port`` when not 22): where a configured host is reached."""
    hpc = host.hpc
    return f"{hpc.user}@{hpc.host}" + (f":{hpc.port}" if hpc.port != 22 else "")


def hosts(conn: sqlite3.Connection, configured: Sequence[HostConfig] = ()) -> list[HostView]:
    """Every configured host (in config order), then any other host the database still names.

    A host nobody has talked to yet has ``remote.reachable`` None.
    """
    reach = reachability(conn)
    drained = {d.host: d for d in drains(conn)}
    seats = {r["host"]: (r["seats"], r["in_use"]) for r in conn.execute(SEATS_BY_HOST_SQL)}
    running = running_by_host(conn)
    by_name = {h.name: h for h in configured}
    others = sorted((set(reach) | set(drained) | set(seats) | {h for h in running if h is not None}) - set(by_name))
    views = []
    for name in [*by_name, *others]:
        host = by_name.get(name)
        total, in_use = seats.get(name, (0, 0))
        views.append(HostView(name=name, configured=host is not None,
                              backend=None if host is None else host.backend,
                              address=None if host is None else address(host),
                              remote=reach.get(name, RemoteView(host=name, reachable=None)),
                              drain=drained.get(name), seats=total, in_use=in_use, running=running.get(name, 0)))
    return views


def in_flight_on(conn: sqlite3.Connection, host: str) -> int:
    """Cases being submitted to or running on ``host``."""
    return conn.execute("SELECT COUNT(*) FROM cases"
                        f" WHERE status IN ({sql_list(CaseStatus.SUBMITTING, CaseStatus.RUNNING)}) AND host = ?",
                        (host,)).fetchone()[0]


def workers(conn: sqlite3.Connection, now: float, stale_after: float) -> list[WorkerView]:
    """Every worker's heartbeat; ``alive`` when it is at most ``stale_after`` seconds old."""
    rows = conn.execute("SELECT name, pid, host, started_at, heartbeat FROM workers ORDER BY name")
    return [WorkerView(name=r["name"], pid=r["pid"], host=r["host"], started_at=r["started_at"],
                       heartbeat=r["heartbeat"], alive=now - r["heartbeat"] <= stale_after)
            for r in rows]


def last_db_change(conn: sqlite3.Connection) -> float | None:
    """When the cases last changed: the newest ``status_updated_at`` or case event.

    The newest event is taken by ``event_id`` (append order), which answers from the
    primary key instead of scanning every event for ``max(at)``.
    """
    case_change = conn.execute("SELECT MAX(status_updated_at) FROM cases").fetchone()[0]
    event = conn.execute("SELECT at FROM case_events ORDER BY event_id DESC LIMIT 1").fetchone()
    stamps = [t for t in (case_change, event and event[0]) if t is not None]
    return max(stamps) if stamps else None


def host_key_alerts(hosts_seen: Sequence[HostView]) -> list[str]:
    """One line per host whose key ssh refused: a security event, shown first wherever health is."""
    return [f"HOST KEY CHANGED on host {h.name}: possible interception; nothing is sent there until the key is"
            f" verified with the cluster's admins and known_hosts is fixed (mqic doctor shows the key it presents)"
            for h in hosts_seen if h.remote.key_refused]


def judge_health(totals: dict[str, int], workers_seen: list[WorkerView] | tuple[WorkerView, ...],
                 last_change: float | None, now: float, stale_after: float, upkeep: Upkeep = Upkeep(),
                 hosts_seen: Sequence[HostView] = ()) -> Health:
    """Healthy unless a host's key was refused (first), a heartbeat is stale (or none exists),
    active cases sit unchanged too long, or results cannot be delivered. While every configured
    host is drained (any host, when ``hosts_seen`` is not given), waiting cases are expected not
    to move."""
    reasons = host_key_alerts(hosts_seen)
    reasons += [f"worker {w.name} heartbeat is {now - w.heartbeat:.0f}s old (limit {stale_after:g}s)"
               for w in workers_seen if not w.alive]
    if not workers_seen:
        reasons.append("no worker has written a heartbeat (are the workers running?)")
    configured = [h for h in hosts_seen if h.configured]
    all_drained = all(h.drained for h in configured) if configured else upkeep.drained
    moving = [s for s in ACTIVE_STATUSES if not (all_drained and s == "submitted")]
    active = sum(totals.get(s, 0) for s in moving)
    if active and last_change is not None and now - last_change > stale_after:
        reasons.append(f"no database change for {now - last_change:.0f}s while {active} cases are"
                       f" active (limit {stale_after:g}s)")
    if upkeep.share is not None:
        reasons.append(share_text(upkeep.share, now))
    if upkeep.delivery_failing:
        reasons.append(f"results delivery failing for {upkeep.delivery_failing} cases ({upkeep.delivery_error})")
    return Health(healthy=not reasons, reasons=tuple(reasons))


def share_text(state: ShareState, now: float) -> str:
    """``results share not answering for 3 min (since the delivery's error)``, as recorded by the reaper."""
    return (f"results share {state.kind} for {in_words(now - state.since)} (last tried {in_words(now - state.checked_at)}"
            f" ago: {state.error})")


UNDELIVERED_SQL = ("SELECT COUNT(*), COUNT(delivery_error), MAX(CASE WHEN delivery_error IS NOT NULL"
                   " THEN completed_at END) FROM cases INDEXED BY cases_undelivered"
                   f" WHERE status = {CaseStatus.COMPLETED.sql} AND delivered_at IS NULL"
                   " AND completed_at >= (SELECT value FROM settings WHERE key = 'results.deliver_since')")
NOTICES_SQL = ("SELECT COUNT(*), COUNT(last_error) FROM notices"
               " WHERE sent_at IS NULL AND gave_up_at IS NULL")


def waiting_by_priority(conn: sqlite3.Connection) -> dict[str, int]:
    """Submitted cases per priority (both keys, zero when none)."""
    counts = dict(conn.execute(
        f"SELECT priority, COUNT(*) FROM cases WHERE status = {CaseStatus.SUBMITTED.sql} GROUP BY priority"))
    return {p: counts.get(p, 0) for p in ("normal", "urgent")}


def upkeep(conn: sqlite3.Connection) -> Upkeep:
    """Drains, waiting urgent cases, undelivered results and unsent notices."""
    waiting, failing, newest = conn.execute(UNDELIVERED_SQL).fetchone()
    error = None
    if failing:
        error = conn.execute("SELECT delivery_error FROM cases"
                             f" WHERE status = {CaseStatus.COMPLETED.sql} AND delivered_at IS NULL"
                             " AND completed_at = ? AND delivery_error IS NOT NULL LIMIT 1", (newest,)).fetchone()[0]
    pending, notices_failing = conn.execute(NOTICES_SQL).fetchone()
    urgent = conn.execute("SELECT COUNT(*) FROM cases"
                          f" WHERE status = {CaseStatus.SUBMITTED.sql} AND priority = 'urgent'").fetchone()[0]
    return Upkeep(drains=tuple(drains(conn)), urgent_waiting=urgent, awaiting_delivery=waiting,
                  delivery_failing=failing, delivery_error=error, notices_pending=pending,
                  notices_failing=notices_failing, share=share_state(conn))


def overview(conn: sqlite3.Connection, now: float, stale_after: float, *, recent: int = 10,
             flags: int = 20, configured: Sequence[HostConfig] = ()) -> Overview:
    """Everything the monitor shows, read in one consistent snapshot; ``configured`` are the
    config's hosts (each is shown even before a worker has written anything about it)."""
    with read_snapshot(conn):
        totals = status_totals(conn)
        seen = workers(conn, now, stale_after)
        last = last_db_change(conn)
        kept = upkeep(conn)
        known = tuple(hosts(conn, configured))
        return Overview(now=now, totals=totals, slots=tuple(slots(conn)),
                        recent=tuple(recent_cases(conn, recent)), flagged=tuple(review_flags(conn, flags)),
                        workers=tuple(seen), last_change=last, hosts=known,
                        health=judge_health(totals, seen, last, now, stale_after, kept, known), upkeep=kept,
                        gpus=tuple(gpu_views(conn)))


# -- metrics helpers ------------------------------------------------------------------------------

# A phase ends at an event: the upload when the case starts running (it began at the
# latest claim, submitted -> submitting); queue wait and run when it completes (running
# event -> started_at -> completed_at). The case row is final by then, so a sample never changes.
PHASE_EVENTS_SQL = f"""
SELECT e.event_id, e.to_status, e.at, c.started_at, c.completed_at,
  (SELECT s.at FROM case_events s WHERE s.case_id = e.case_id AND s.event_id < e.event_id
     AND s.to_status = {CaseStatus.SUBMITTING.sql} AND s.from_status = {CaseStatus.SUBMITTED.sql}
     ORDER BY s.event_id DESC LIMIT 1) AS upload_started,
  (SELECT r.at FROM case_events r WHERE r.case_id = e.case_id AND r.event_id < e.event_id
     AND r.to_status = {CaseStatus.RUNNING.sql} AND r.from_status = {CaseStatus.SUBMITTING.sql}
     ORDER BY r.event_id DESC LIMIT 1) AS running_since
FROM case_events e JOIN cases c ON c.case_id = e.case_id
WHERE e.event_id > ? AND e.event_id <= ?
  AND ((e.to_status = {CaseStatus.RUNNING.sql} AND e.from_status = {CaseStatus.SUBMITTING.sql})
       OR (e.to_status = {CaseStatus.COMPLETED.sql} AND e.from_status = {CaseStatus.RUNNING.sql}))
ORDER BY e.event_id"""


def phase_samples(conn: sqlite3.Connection, after: int, upto: int) -> list[PhaseSample]:
    """Phase durations ended by the events ``after < event_id <= upto``, in event order.

    Walks the primary key over that range only, so a scrape reads just the new events.
    """
    samples = []
    for r in conn.execute(PHASE_EVENTS_SQL, (after, upto)):
        if r["to_status"] == "running":
            if r["upload_started"] is not None:
                samples.append(PhaseSample(r["event_id"], "upload", max(0.0, r["at"] - r["upload_started"])))
            continue
        started, done, since = r["started_at"], r["completed_at"], r["running_since"]
        if since is not None and started is not None:
            samples.append(PhaseSample(r["event_id"], "queue_wait", max(0.0, started - since)))
        if started is not None and done is not None:
            samples.append(PhaseSample(r["event_id"], "run", max(0.0, done - started)))
    return samples


MOVES_SQL = ("SELECT COUNT(*) FROM case_events WHERE event_id > ? AND event_id <= ?"
             " AND to_status = ? AND from_status IS NOT to_status")
SLOT_EVENTS_NEWEST_FIRST_SQL = ("SELECT host, pueue_group, seat, from_status, to_status, at FROM slot_events"
                                " ORDER BY event_id DESC")


def moves_into(conn: sqlite3.Connection, status: str, after: int, upto: int) -> int:
    """How many real moves into ``status`` the events ``after < event_id <= upto`` record.

    Unlike a count of rows in that status this only grows (a retried case stays counted).
    """
    return conn.execute(MOVES_SQL, (after, upto, status)).fetchone()[0]


def newest_event_id(conn: sqlite3.Connection) -> int:
    """The id of the newest case event (0 when there is none)."""
    row = conn.execute("SELECT MAX(event_id) FROM case_events").fetchone()
    return row[0] or 0


def slot_busy_seconds(conn: sqlite3.Connection, now: float, window: float) -> dict[tuple[str, str], float]:
    """Seconds of the last ``window`` seconds each slot (host, group) had a seat ``assigned``.

    A slot with depth holds several seats; its GPU counts as busy while any of them is
    assigned, so the seats' busy spans are merged, not added. Starts from each seat's
    current state and walks its events backwards (newest first, by primary key) until the
    window start, so only the window's events are read.
    """
    state = {(r["host"], r["pueue_group"], r["seat"]): r["status"]
             for r in conn.execute("SELECT host, pueue_group, seat, status FROM gpu_resources")}
    until = dict.fromkeys(state, now)
    spans: dict[tuple[str, str], list[tuple[float, float]]] = {(host, group): [] for host, group, _ in state}
    start = now - window
    for r in conn.execute(SLOT_EVENTS_NEWEST_FIRST_SQL):
        if r["at"] < start:
            break
        seat = (r["host"], r["pueue_group"], r["seat"])
        if seat not in state:
            continue
        at = min(max(r["at"], start), until[seat])
        if state[seat] == "assigned":
            spans[seat[:2]].append((at, until[seat]))
        until[seat], state[seat] = at, r["from_status"]
    for seat, status in state.items():
        if status == "assigned":
            spans[seat[:2]].append((start, max(start, until[seat])))
    return {slot: merged_length(found) for slot, found in spans.items()}


def merged_length(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of the ``(begin, end)`` spans."""
    total, reached = 0.0, float("-inf")
    for begin, end in sorted(spans):
        if end > reached:
            total += end - max(begin, reached)
            reached = end
    return total


# -- health, as `mqic health --json` and the web's /api/health answer it --------------------------------

def quick_check(conn: sqlite3.Connection) -> str | None:
    """None when ``PRAGMA quick_check`` is clean, else what it reported."""
    rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
    return None if rows == ["ok"] else "; ".join(rows[:3])


def health_record(reasons: list[str], notes: Sequence[str], hosts: Sequence[HostView]) -> dict[str, Any]:
    """The health report's stable fields; ``notes`` (a drained or unreachable host) do not make
    the system unhealthy."""
    return {"healthy": not reasons, "reasons": reasons, "drained": any(h.drained for h in hosts),
            "notes": list(notes),
            "hosts": [{"host": h.name, "backend": h.backend, "reachable": h.remote.reachable,
                       "down_since": h.remote.down_since, "problem": h.remote.problem, "drained": h.drained,
                       "seats": h.seats,
                       "in_use": h.in_use, "running": h.running} for h in hosts]}


# -- the case list of the web page and its API -------------------------------------------------------

SORTS = ("newest", "oldest")
OUTCOMES = tuple(o.value for o in Outcome)
COUNT_CAP = 10_000  # a count past this reads "10000+" (counting every match of a vague search costs a scan)


@dataclass(frozen=True)
class CaseFilter:
    """What a case listing asks for. ``text`` matches a name (substring) or an id (exact);
    ``cursor`` is the last case id of the previous page (keyset pagination on the primary key)."""
    text: str = ""
    status: str | None = None
    host: str | None = None
    priority: str | None = None
    outcome: str | None = None
    review: bool | None = None
    sort: str = "newest"
    cursor: int | None = None
    limit: int = 50


@dataclass(frozen=True)
class CasePage:
    cases: tuple[CaseView, ...]
    matching: int  # capped at COUNT_CAP + 1
    next_cursor: int | None  # None: this is the last page


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _case_id_in(text: str) -> int | None:
    """``text`` as a case id: ASCII digits within SQLite's integer range (``int()`` also takes
    "²" and other Unicode digits, and SQLite refuses a larger number), else None."""
    if text.isascii() and text.isdigit() and int(text) < 2**63:
        return int(text)
    return None


def _filter_sql(f: CaseFilter) -> tuple[str, list[Any]]:
    """The WHERE clause of ``f`` (without the cursor) and its parameters."""
    clauses, params = [], []
    text = f.text.strip()
    if text:
        as_id = _case_id_in(text)
        clauses.append("(case_name LIKE ? ESCAPE '\\'" + (" OR case_id = ?)" if as_id is not None else ")"))
        params += [_like(text)] + ([as_id] if as_id is not None else [])
    for column, value in (("status", f.status), ("host", f.host), ("priority", f.priority), ("outcome", f.outcome)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if f.review is not None:
        clauses.append("needs_review = ?")
        params.append(int(f.review))
    return " AND ".join(clauses) or "1", params


def search_cases(conn: sqlite3.Connection, f: CaseFilter) -> CasePage:
    """One page of the cases matching ``f``, newest (or oldest) id first, and how many match.

    The page walks the primary key from the cursor (``NOT INDEXED``: through the status index
    SQLite would sort every completed case first) and stops after ``limit`` matches, so a page
    costs the same on page 1 and page 2,000 and at worst one pass over the table; the count
    uses the indexes and stops at ``COUNT_CAP``.
    """
    rows = conn.execute(*search_page_sql(f)).fetchall()
    matching = conn.execute(*search_count_sql(f)).fetchone()[0]
    views = tuple(_case_view(r) for r in rows[:f.limit])
    return CasePage(cases=views, matching=matching,
                    next_cursor=views[-1].case_id if len(rows) > f.limit else None)


def search_page_sql(f: CaseFilter, columns: str = CASE_VIEW_COLUMNS) -> tuple[str, list[Any]]:
    """The statement of one page of ``f`` (one row more than ``limit``: is there a next page?)."""
    if f.sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}")
    where, params = _filter_sql(f)
    descending = f.sort == "newest"
    keyset = "" if f.cursor is None else (" AND case_id < ?" if descending else " AND case_id > ?")
    return (f"SELECT {columns} FROM cases NOT INDEXED WHERE {where}{keyset}"
            f" ORDER BY case_id {'DESC' if descending else 'ASC'} LIMIT ?",
            params + ([] if f.cursor is None else [f.cursor]) + [f.limit + 1])


def search_count_sql(f: CaseFilter) -> tuple[str, list[Any]]:
    """The statement counting the matches of ``f``, up to ``COUNT_CAP + 1``."""
    where, params = _filter_sql(f)
    return f"SELECT COUNT(*) FROM (SELECT 1 FROM cases WHERE {where} LIMIT ?)", params + [COUNT_CAP + 1]
