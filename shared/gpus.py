"""The GPUs themselves: nvidia-smi telemetry per host, what it means for our cases, what the screens read.

A helper thread of the poller (``poller-gpus``) calls ``tick(ctx, now)``: for every
reachable host whose GPUs its login session sees (its scheduler's ``gpus_visible``), at most ONE remote call
per ``gpus.interval_seconds`` (``gpus_parse.probe_argv``: clock, GPUs, processes, owners).
Then, in the database:

- ``gpus`` holds the newest reading per (host, GPU index) and ``gpu_history`` one row per
  GPU per reading (pruned after ``HISTORY_SECONDS``). Unreachable, garbage or a hung
  nvidia-smi: no change; the old reading stays and its age shows it is stale.
- A process is ours when its environment names one of our cases (``MQIC_CASE_ID``, set in
  every task's environment and inherited by all it starts); anything else over
  ``gpus.foreign_memory_mb`` is foreign.
- A GPU that does not answer (listed as lost, no longer listed, or the tool's own failure
  such as the driver gone) is marked so and ``blocks_claims``; so is a GPU with a foreign
  process when ``gpus.avoid_foreign`` is on. ``shared.claims.SEAT_GPU_USABLE`` keeps new
  cases off such a GPU's seats; a seat that holds a case keeps it.
- A running case whose GPU stayed under ``gpus.idle_percent`` for ``gpus.idle_minutes`` (on
  the HPC's clock, counted from the later of the idle streak's start and the task's start)
  is flagged for review ("GPU idle while running"); it is never failed.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Iterable

from shared.backends import scheduler_of
from shared.config import GpusConfig
from shared.db import transaction
from shared.errors import RemoteFailure, Unreachable
from shared.gpus_parse import GpuReading, Probe, parse_probe, probe_argv
from shared.logs import for_case
from shared.seats import slot_of_case
from shared.states import CaseStatus
from shared.store import Case, cases_with_status, flag_for_review
from shared.worker import REPEAT_LOG_SECONDS, forget_logged, note_reach, per_item, reachable_hosts, worth_logging

HISTORY_SECONDS = 24 * 3600.0
PROBE_KEY = "gpus.probed_at:"  # settings: our clock of the newest probe of each host
IDLE_REASON = "GPU idle while running"


@dataclass(frozen=True)
class GpuView:
    """One GPU's newest reading, as the screens and the exporter show it."""
    host: str
    index: int
    uuid: str
    utilization: float | None
    memory_used_mb: float | None
    memory_total_mb: float | None
    temperature: float | None
    answering: bool
    error: str | None
    processes: tuple[dict, ...]
    foreign_processes: int
    idle_since: float | None
    host_time: float | None
    seen_at: float
    blocks_claims: bool

    @property
    def case_ids(self) -> list[int]:
        """Our cases with a process on this GPU."""
        return sorted({p["case_id"] for p in self.processes if p.get("case_id") is not None})

    def age(self, now: float) -> float:
        return max(0.0, now - self.seen_at)

    def stale(self, now: float, interval: float) -> bool:
        """No fresh reading for three intervals (host down, nvidia-smi hung, telemetry off)."""
        return self.age(now) > 3 * interval + 30


def view_from_row(row: sqlite3.Row) -> GpuView:
    data = dict(row)
    return GpuView(host=data["host"], index=data["gpu_index"], uuid=data["uuid"], utilization=data["utilization"],
                   memory_used_mb=data["memory_used_mb"], memory_total_mb=data["memory_total_mb"],
                   temperature=data["temperature"], answering=bool(data["answering"]), error=data["error"],
                   processes=tuple(json.loads(data["processes"] or "[]")),
                   foreign_processes=data["foreign_processes"], idle_since=data["idle_since"],
                   host_time=data["host_time"], seen_at=data["seen_at"], blocks_claims=bool(data["blocks_claims"]))


def gpu_views(conn: sqlite3.Connection, host: str | None = None) -> list[GpuView]:
    """The newest reading of every GPU (of ``host``), by host and index. Works on a read-only connection."""
    try:
        rows = conn.execute("SELECT * FROM gpus WHERE (:host IS NULL OR host = :host) ORDER BY host, gpu_index",
                            {"host": host}).fetchall()
    except sqlite3.OperationalError:  # a database older than this feature (a read-only reader never migrates)
        return []
    return [view_from_row(r) for r in rows]


def seat_gpus(seat_gpu: str | None) -> set[str]:
    """The GPUs a seat is pinned to (``CUDA_VISIBLE_DEVICES``: indexes or UUIDs, comma-separated)."""
    return {word.strip() for word in (seat_gpu or "").split(",") if word.strip()}


def gpus_of_case(conn: sqlite3.Connection, case: Case, views: Iterable[GpuView]) -> list[GpuView]:
    """The GPUs a case uses: its seat's pinned GPUs, and any GPU where a process of it runs."""
    slot = slot_of_case(conn, case.case_id)
    pinned = seat_gpus(slot.gpu if slot else None)
    return [v for v in views if v.host == case.host and
            (str(v.index) in pinned or v.uuid in pinned or case.case_id in v.case_ids)]


# -- collecting --------------------------------------------------------------------------------

def per_call_timeout(config: GpusConfig, command_timeout: float) -> float:
    """How long one nvidia-smi run may take on the HPC: a reading later than the interval is of
    little use, and both runs must fit in the remote call's own limit."""
    return max(1.0, min(max(config.interval_seconds, 5.0), command_timeout / 3))


def collect(runner, config: GpusConfig, command_timeout: float) -> Probe:
    """ONE remote call: the host's clock, its GPUs and their processes. Raises RemoteFailure
    (Unreachable, BadOutput with ToolMissing/ToolHung, RemoteError)."""
    argv = probe_argv(config.command, per_call_timeout(config, command_timeout))
    return parse_probe(runner.run(argv, timeout=command_timeout))


# -- recording ---------------------------------------------------------------------------------

def _known(conn: sqlite3.Connection, host: str) -> dict[int, sqlite3.Row]:
    return {r["gpu_index"]: r for r in conn.execute("SELECT * FROM gpus WHERE host = ?", (host,))}


def our_case_ids(conn: sqlite3.Connection, ids: Iterable[int]) -> set[int]:
    wanted = sorted(set(ids))
    if not wanted:
        return set()
    marks = ",".join("?" * len(wanted))
    return {r[0] for r in conn.execute(f"SELECT case_id FROM cases WHERE case_id IN ({marks})", wanted)}


def _processes(probe: Probe, reading: GpuReading, ours: set[int]) -> list[dict]:
    return [{"pid": a.pid, "memory_mb": a.memory_mb, "case_id": a.case_id if a.case_id in ours else None}
            for a in probe.apps if a.gpu_uuid == reading.uuid]


def is_foreign(process: dict, config: GpusConfig) -> bool:
    """Not ours and holding more than ``foreign_memory_mb`` (unknown memory counts: something is there)."""
    memory = process.get("memory_mb")
    return process.get("case_id") is None and (memory is None or memory > config.foreign_memory_mb)


def _idle_since(old: sqlite3.Row | None, reading: GpuReading, config: GpusConfig, host_time: float) -> float | None:
    if reading.utilization is None or reading.utilization >= config.idle_percent:
        return None
    if old is not None and old["answering"] and old["idle_since"] is not None:
        return old["idle_since"]
    return host_time


def _lost_indexes(probe: Probe, known: dict[int, sqlite3.Row]) -> dict[int, str]:
    """GPUs that did not answer this time: known ones no longer listed, and the gaps that the
    lost lines stand for (nvidia-smi numbers GPUs 0..N-1, a lost one keeps its place)."""
    query = probe.query
    listed = {g.index for g in query.gpus}
    why = query.failure or "; ".join(query.lost) or "no longer listed by nvidia-smi"
    total = len(query.gpus) + len(query.lost)
    gaps = [i for i in range(total) if i not in listed][:len(query.lost)]
    return {i: why for i in sorted((set(known) | set(gaps)) - listed)}


UPSERT = ("INSERT INTO gpus (host, gpu_index, uuid, utilization, memory_used_mb, memory_total_mb, temperature,"
          " answering, error, processes, foreign_processes, idle_since, host_time, seen_at, blocks_claims)"
          " VALUES (:host, :gpu_index, :uuid, :utilization, :memory_used_mb, :memory_total_mb, :temperature,"
          " :answering, :error, :processes, :foreign_processes, :idle_since, :host_time, :seen_at, :blocks_claims)"
          " ON CONFLICT(host, gpu_index) DO UPDATE SET uuid = excluded.uuid, utilization = excluded.utilization,"
          " memory_used_mb = excluded.memory_used_mb, memory_total_mb = excluded.memory_total_mb,"
          " temperature = excluded.temperature, answering = excluded.answering, error = excluded.error,"
          " processes = excluded.processes, foreign_processes = excluded.foreign_processes,"
          " idle_since = excluded.idle_since, host_time = excluded.host_time, seen_at = excluded.seen_at,"
          " blocks_claims = excluded.blocks_claims")
HISTORY = ("INSERT INTO gpu_history (host, gpu_index, at, utilization, memory_used_mb, temperature, answering)"
           " VALUES (:host, :gpu_index, :seen_at, :utilization, :memory_used_mb, :temperature, :answering)")


def _answering_row(host: str, reading: GpuReading, old, probe: Probe, ours: set[int], config: GpusConfig,
                   now: float) -> dict:
    processes = _processes(probe, reading, ours)
    foreign = sum(is_foreign(p, config) for p in processes)
    return {"host": host, "gpu_index": reading.index, "uuid": reading.uuid, "utilization": reading.utilization,
            "memory_used_mb": reading.memory_used_mb, "memory_total_mb": reading.memory_total_mb,
            "temperature": reading.temperature, "answering": 1, "error": None, "processes": json.dumps(processes),
            "foreign_processes": foreign, "idle_since": _idle_since(old, reading, config, probe.host_time),
            "host_time": probe.host_time, "seen_at": now, "blocks_claims": int(config.avoid_foreign and foreign > 0)}


def _silent_row(host: str, index: int, why: str, old, probe: Probe, now: float) -> dict:
    return {"host": host, "gpu_index": index, "uuid": old["uuid"] if old is not None else "", "utilization": None,
            "memory_used_mb": None, "memory_total_mb": old["memory_total_mb"] if old is not None else None,
            "temperature": None, "answering": 0, "error": why[:500], "processes": "[]", "foreign_processes": 0,
            "idle_since": None, "host_time": probe.host_time, "seen_at": now, "blocks_claims": 1}


def record(conn: sqlite3.Connection, host: str, probe: Probe, config: GpusConfig, *, now: float) -> list[GpuView]:
    """Store one host's fresh reading (newest + history) in one transaction; return the host's GPUs."""
    with transaction(conn):
        known = _known(conn, host)
        ours = our_case_ids(conn, (a.case_id for a in probe.apps if a.case_id is not None))
        rows = [_answering_row(host, g, known.get(g.index), probe, ours, config, now) for g in probe.query.gpus]
        rows += [_silent_row(host, i, why, known.get(i), probe, now) for i, why in _lost_indexes(probe, known).items()]
        for row in rows:
            conn.execute(UPSERT, row)
            conn.execute(HISTORY, row)
    return gpu_views(conn, host)


def apply_config(conn: sqlite3.Connection, config: GpusConfig) -> int:
    """Recompute ``blocks_claims`` from the stored readings under this config (at start-up:
    ``avoid_foreign`` may have changed; with telemetry off nothing blocks a seat)."""
    with transaction(conn):
        return conn.execute(
            "UPDATE gpus SET blocks_claims = CASE WHEN :on AND (answering = 0 OR (:avoid AND foreign_processes > 0))"
            " THEN 1 ELSE 0 END", {"on": int(config.enabled), "avoid": int(config.avoid_foreign)}).rowcount


def prune_history(conn: sqlite3.Connection, before: float) -> int:
    with transaction(conn):
        return conn.execute("DELETE FROM gpu_history WHERE at < ?", (before,)).rowcount


def history(conn: sqlite3.Connection, host: str, index: int, since: float) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM gpu_history WHERE host = ? AND gpu_index = ? AND at >= ? ORDER BY at",
                        (host, index, since)).fetchall()


# -- the rules -----------------------------------------------------------------------------------

def idle_for(view: GpuView, case: Case) -> float:
    """Seconds (HPC clock) this GPU has been idle while the case's task ran on it; 0 when not idle."""
    if not view.answering or view.idle_since is None or view.host_time is None or case.started_at is None:
        return 0.0
    return max(0.0, view.host_time - max(view.idle_since, case.started_at))


def flag_idle_cases(conn: sqlite3.Connection, host: str, views: list[GpuView], config: GpusConfig, *,
                    now: float, worker: str) -> list[tuple[int, str]]:
    """Flag for review the running cases of ``host`` whose GPU stayed idle ``idle_minutes``; never fail them."""
    flagged = []
    for case in cases_with_status(conn, CaseStatus.RUNNING, limit=10_000):
        if case.host != host or case.needs_review or case.started_at is None:
            continue
        for view in gpus_of_case(conn, case, views):
            seconds = idle_for(view, case)
            if seconds >= config.idle_minutes * 60:
                reason = (f"{IDLE_REASON}: GPU {view.index} on {host} under {config.idle_percent:g}% "
                          f"for {seconds / 60:.1f} min")
                if flag_for_review(conn, case, reason, now=now, worker=worker):
                    flagged.append((case.case_id, reason))
                break
    return flagged


# -- the loop (a helper thread of the poller) --------------------------------------------------

def sees_gpus(host) -> bool:
    """Whether the host's GPUs are visible from its login session (its scheduler's registry entry says so)."""
    return scheduler_of(host.config).gpus_visible


def take_probe_turn(conn: sqlite3.Connection, host: str, now: float, interval: float) -> bool:
    """True when this process may probe ``host`` now: the interval since the last probe by anyone
    has passed (a compare-and-set on ``settings``, so two pollers still make one call per interval;
    a clock set back does not stop the probes)."""
    key = f"{PROBE_KEY}{host}"
    with transaction(conn):
        conn.execute("INSERT OR IGNORE INTO settings (key, value, updated_at) VALUES (?, ?, ?)",
                     (key, 0.0, now))
        return conn.execute("UPDATE settings SET value = :now, updated_at = :now WHERE key = :key"
                            " AND (value <= :now - :interval OR value > :now)",
                            {"key": key, "now": now, "interval": interval}).rowcount == 1


def tick(ctx, now: float) -> int:
    """One pass: probe each reachable GPU host whose interval has passed; prune old history."""
    config = ctx.config.gpus
    if not config.enabled:
        return 0
    done = 0
    for host in reachable_hosts(ctx):
        if sees_gpus(host) and take_probe_turn(ctx.conn, host.name, now, config.interval_seconds):
            with per_item(ctx, None, f"gpus:{host.name}"):
                done += probe_host(ctx, host, now)
    prune_history(ctx.conn, now - HISTORY_SECONDS)
    return done


def probe_host(ctx, host, now: float) -> int:
    config = ctx.config.gpus
    try:
        probe = collect(host.remote, config, host.timeout)
    except RemoteFailure as exc:
        if isinstance(exc, Unreachable):
            note_reach(ctx, host, exc)
        if worth_logging(ctx, f"gpus:{host.name}:{type(exc).__name__}", now, REPEAT_LOG_SECONDS):
            ctx.log.warning("host %s: GPUs could not be read (%s: %s); the last reading stays", host.name,
                            type(exc).__name__, exc, extra=for_case(None, "gpus", exc) | {"host": host.name})
        return 0
    views = record(ctx.conn, host.name, probe, config, now=ctx.clock())
    log_silent_gpus(ctx, host.name, views, now)
    if probe.query.failure and not views and worth_logging(ctx, f"gpus:{host.name}:failure", now, REPEAT_LOG_SECONDS):
        ctx.log.error("host %s: nvidia-smi lists no GPU: %s", host.name, probe.query.failure,
                      extra={"operation": "gpus", "error_type": "NoGpus", "host": host.name})
    for case_id, reason in flag_idle_cases(ctx.conn, host.name, views, config, now=ctx.clock(), worker=ctx.name):
        ctx.log.error("case %d flagged for review: %s", case_id, reason,
                      extra=for_case(case_id, "gpus") | {"error_type": "GpuIdle"})
    return 1


def log_silent_gpus(ctx, host: str, views: list[GpuView], now: float) -> None:
    for view in views:
        key = f"gpu-silent:{host}:{view.index}"
        if view.answering:
            forget_logged(ctx, key)
        elif worth_logging(ctx, key, now, REPEAT_LOG_SECONDS):
            ctx.log.error("host %s: GPU %d does not answer (%s); its seats get no new case", host, view.index,
                          view.error, extra={"operation": "gpus", "error_type": "GpuNotAnswering", "host": host})
