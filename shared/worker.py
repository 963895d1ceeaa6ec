"""The loop every worker process runs around its ``tick(ctx, now)``.

``tick`` does one bounded pass and never sleeps; ``run_worker`` owns the stop event,
the interval, heartbeats and signals. Signal handlers only set the stop event, so
SIGTERM lets the step in hand finish and the process exits 0. Database errors are
not caught: the process exits non-zero and supervisord restarts it.
"""
from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from functools import partial
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from shared.backends import Backend, backend_for
from shared.config import Config, HostConfig
from shared.db import check_integrity, connect
from shared.errors import HostKeyMismatch, LocalFailure, Unreachable
from shared.liveness import beat, down_hosts, forget_retired_loops, HOST_KEY, note_remote
from shared.logs import for_case, setup_logging
from shared.remote import Remote
from shared.seats import adopt_unnamed_host, seat_specs, sync_slots
from shared.spool import Spool
from shared.store import flag_for_review, get_case


REVIEW_AFTER_REPEATS = 3


@dataclass
class Memory:
    """What a worker's loop remembers between passes, in this process only (never a truth: the
    database is). A helper thread starts with a memory of its own, sharing what its starter hands it."""
    # every loop
    repeated_errors: dict[tuple[int | None, str], int] = field(default_factory=dict)  # per_item
    logged_at: dict[str, float] = field(default_factory=dict)                        # worth_logging
    helper_threads: list[threading.Thread] = field(default_factory=list)             # start_helper_loop
    helper_failed: bool = False
    notices_sending: dict[int, Any] = field(default_factory=dict)  # shared.notify: notice id -> its child
    # the scanner: folder name -> what it last saw of it (quiescence)
    pending: dict[str, Any] = field(default_factory=dict)
    # a process's loops (main, per host, stagers): their wake events, so that any loop can wake the others
    loop_wakes: dict[str, threading.Event] = field(default_factory=dict)
    # the submitter: hosts whose slots were made sure of (shared by all its loops); per host, how long
    # its recent uploads took (seconds, newest last); when its pace was last read; pre-uploads held back
    hosts_ready: set[str] = field(default_factory=set)
    upload_seconds: dict[str, deque] = field(default_factory=dict)
    paces: dict[str, tuple[float, Any]] = field(default_factory=dict)
    staging_paused_until: dict[str, float] = field(default_factory=dict)
    # the poller: host -> the slots its scheduler had paused at the last look
    paused_slots: dict[str, list[str]] = field(default_factory=dict)
    # the reaper: host -> when its orphans were last looked for; workers already reported stale
    orphans_checked_at: dict[str, float] = field(default_factory=dict)
    stale_workers: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Host:
    """One configured HPC host as a worker talks to it: its own ssh connection and scheduler."""
    config: HostConfig
    remote: Remote
    backend: Backend

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def timeout(self) -> float:
        return self.config.hpc.command_timeout_seconds

    def snapshot(self):
        """One snapshot of this host's tasks, stamped with the host's name."""
        return replace(self.backend.snapshot(), host=self.name)


def connect_hosts(config: Config) -> dict[str, Host]:
    """A ``Host`` per configured host, in config order (connections open on first use)."""
    hosts = {}
    for host in config.hosts:
        remote = Remote(host.hpc)
        hosts[host.name] = Host(host, remote, backend_for(config, host, remote))
    return hosts


@dataclass
class Context:
    """What a worker's tick needs; built once per process."""
    config: Config
    conn: sqlite3.Connection
    spool: Spool
    hosts: dict[str, Host]
    name: str
    log: logging.Logger
    stop: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
    memory: Memory = field(default_factory=Memory)  # per-process observations only
    clock: Callable[[], float] = time.time  # real time for leases and stamps after long steps

    @property
    def worker_id(self) -> str:
        """Unique per process: what ``claimed_by`` records."""
        return f"{self.name}:{os.getpid()}"

    def host(self, name: str | None) -> Host | None:
        """The configured host ``name`` (None for a host the config no longer has)."""
        return self.hosts.get(name) if name is not None else None


@contextmanager
def per_item(ctx: "Context", case_id: int | None, operation: str) -> Iterator[None]:
    """The per-item error boundary inside a tick: log and go on, but let database errors through.

    The third unexpected error in a row on one (case, operation) flags the case for
    review with the error's type and message, so it never loops silently (counted in
    ``ctx.memory``, per process); a success of that (case, operation) resets the count.
    """
    repeats = ctx.memory.repeated_errors
    try:
        yield
    except sqlite3.Error:
        raise
    except Exception as exc:
        count = repeats[(case_id, operation)] = repeats.get((case_id, operation), 0) + 1
        if count <= REVIEW_AFTER_REPEATS:
            ctx.log.exception("case %s: %s failed unexpectedly", case_id, operation,
                              extra=for_case(case_id, operation, exc))
        else:  # the traceback was logged already
            ctx.log.error("case %s: %s failed unexpectedly again (%d times): %s: %s", case_id, operation,
                          count, type(exc).__name__, exc, extra=for_case(case_id, operation, exc))
        if count == REVIEW_AFTER_REPEATS and case_id is not None:
            flag_repeated_error(ctx, case_id, operation, exc, count)
    else:
        repeats.pop((case_id, operation), None)


def flag_repeated_error(ctx: "Context", case_id: int, operation: str, exc: Exception, count: int) -> None:
    case = get_case(ctx.conn, case_id)
    reason = f"{operation} failed {count} times in a row: {type(exc).__name__}: {exc}"[:1000]
    if case is not None and flag_for_review(ctx.conn, case, reason, now=ctx.clock(), worker=ctx.name):
        ctx.log.error("case %d flagged for review: %s", case_id, reason,
                      extra=for_case(case_id, operation, exc))


def note_reach(ctx: "Context", host: Host, error: Exception | None) -> None:
    """Record whether ``host`` answered (any answer, even an error, is reach): the monitor
    shows it and the claim skips a host last seen unreachable.

    Only an answer the host failed to give marks it down: a LocalFailure (our side) says
    nothing about it, nor does a call that died while this worker is stopping (supervisord's
    stop). A refused host key is recorded as its own problem (``HOST_KEY``), never an outage.
    """
    if isinstance(error, LocalFailure) or (isinstance(error, Unreachable) and ctx.stop.is_set()):
        ctx.log.info("host %s: %s: %s (not the host's doing; nothing recorded)", host.name, type(error).__name__,
                     error, extra={"operation": "reach", "error_type": type(error).__name__, "host": host.name})
        return
    problem = HOST_KEY if isinstance(error, HostKeyMismatch) else None
    note_remote(ctx.conn, host.name, ctx.name, ok=not isinstance(error, (Unreachable, HostKeyMismatch)),
                now=ctx.clock(), error=None if error is None else str(error), problem=problem)


def reachable_hosts(ctx: "Context") -> list[Host]:
    """The hosts not last seen unreachable. Workers talk only to these, so a host that is down
    costs no one a connect timeout per pass; the reaper probes the others (``probe_down_hosts``)."""
    down = down_hosts(ctx.conn)
    return [host for host in ctx.hosts.values() if host.name not in down]


def on_reachable_hosts(ctx: "Context", cases: list, now: float, what: str) -> list[tuple[Host, list]]:
    """``cases`` grouped by the host they live on, for the reachable hosts only.

    Cases on a host the config no longer names wait for it; that is logged (at most once
    every 5 minutes per host), naming ``what`` they are.
    """
    by_host: dict[str | None, list] = {}
    for case in cases:
        by_host.setdefault(case.host, []).append(case)
    for name in by_host.keys() - ctx.hosts.keys():
        if worth_logging(ctx, f"unknown-host:{name}", now, REPEAT_LOG_SECONDS):
            ctx.log.error("%d %s on host %r, which is not configured; they wait for it", len(by_host[name]), what,
                          name, extra={"operation": "hosts", "error_type": "UnknownHost"})
    return [(host, by_host[host.name]) for host in reachable_hosts(ctx) if host.name in by_host] if by_host else []


def build_context(config: Config, name: str, *, log: logging.Logger | None = None) -> Context:
    """Open the database (migrating it), check integrity, make the spool and slot rows."""
    conn = connect(config.database_path)
    check_integrity(conn)
    spool = Spool(config.spool_path).ensure()
    config.scanner.watch_path.mkdir(parents=True, exist_ok=True)
    adopt_unnamed_host(conn, config.hosts[0].name, config.hosts[0].hpc.host)
    sync_slots(conn, seat_specs(config), now=time.time(), worker=name)
    return Context(config=config, conn=conn, spool=spool, hosts=connect_hosts(config), name=name,
                   log=log or logging.getLogger(f"mqic.{name}"))


def install_signal_handlers(ctx: Context) -> None:
    def request_stop(signum: int, _frame: object) -> None:
        ctx.stop.set()
        ctx.wake.set()
        wake_loops(ctx)  # the helper loops too, so each ends after the step in hand, not its interval

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


def run_worker(ctx: Context, tick: Callable[[Context, float], int], *,
               idle_wait: Callable[[Context], float] | None = None, once: bool = False,
               drain: bool = False) -> int:
    """Call ``tick`` until stopped; return the process exit code (0 on a clean stop).

    Between passes it waits the interval (or ``idle_wait(ctx)``) unless woken;
    with ``drain`` a pass that did work is followed at once by another.
    The caller logs the start and the stop (a process's stop comes after its helpers').
    """
    interval = ctx.config.main_loop.interval_seconds
    while not ctx.stop.is_set():
        done = tick(ctx, time.time())
        beat(ctx.conn, ctx.name, now=time.time())
        if once:
            break
        wait = 0.0 if (done and drain) else (idle_wait(ctx) if idle_wait else interval)
        ctx.wake.wait(wait)
        ctx.wake.clear()
    return 0


def worker_main(program: str, name: str, tick: Callable[[Context, float], int], argv=None, *,
                prepare: Callable[[Context], None] | None = None,
                idle_wait: Callable[[Context], float] | None = None, drain: bool = False,
                one_pass: Callable[[Context, float], int] | None = None) -> int:
    """Entry point shared by the worker programs: config, logging, context, loop.

    ``one_pass``: what ``--once`` runs instead of ``tick`` when a process does its work in helper
    loops (one per host): the whole pass in this thread, and ``prepare`` (which starts them) is skipped.
    """
    from shared.app import load_or_exit, worker_args

    args = worker_args(program, argv)
    if args.once and one_pass is not None:
        tick, prepare = one_pass, None
    config = load_or_exit(args.config, program)
    worker_name = args.name or name
    log = setup_logging(config.logging, worker_name)
    ctx = build_context(config, worker_name, log=log)
    install_signal_handlers(ctx)
    ctx.log.info("%s started (pid %d)", ctx.name, os.getpid())
    if prepare:
        prepare(ctx)
    for retired in forget_retired_loops(ctx.conn, ctx.name, set(ctx.memory.loop_wakes)):
        ctx.log.info("%s: heartbeat row of %s removed (no longer run)", ctx.name, retired)
    code = run_worker(ctx, tick, idle_wait=idle_wait, once=args.once, drain=drain)
    ctx.stop.set()  # after --once too: the helper loops end with the main one
    wake_loops(ctx)
    for helper in ctx.memory.helper_threads:
        helper.join()  # each finishes the step in hand, then sees the stop event
    ctx.log.info("%s stopped", ctx.name)  # the process's last line, after its helpers'
    return 1 if ctx.memory.helper_failed else code


def start_helper_loop(ctx: Context, name: str, tick: Callable[[Context, float], int], *,
                      drain: bool = False, shared: tuple[str, ...] = (),
                      idle_wait: Callable[[Context], float] | None = None) -> Context:
    """Run ``tick`` in a thread of this process with its own connection, name and wake event.

    Its ``memory`` is its own, but for the ``shared`` fields (the same objects as the main loop's,
    which keeps them up to date for it, e.g. which hosts are ready). It shares the stop event, so SIGTERM ends both loops;
    ``worker_main`` joins it. Its wake event is listed in ``memory.loop_wakes`` (``wake_loops``).
    If the helper dies (say, a database error), the whole process stops and exits 1,
    so supervisord restarts it.
    """
    memory = Memory(**{key: getattr(ctx.memory, key) for key in ("loop_wakes", *shared)})
    helper = replace(ctx, name=name, wake=threading.Event(), memory=memory, log=logging.getLogger(f"mqic.{name}"))
    ctx.memory.loop_wakes.setdefault(ctx.name, ctx.wake)
    ctx.memory.loop_wakes[name] = helper.wake

    def loop() -> None:
        helper.conn = connect(ctx.config.database_path, migrate=False)  # sqlite: one per thread
        helper.log.info("%s started (pid %d)", name, os.getpid())
        try:
            run_worker(helper, tick, drain=drain, idle_wait=idle_wait)
            helper.log.info("%s stopped", name)
        except BaseException:
            helper.log.exception("%s died; stopping the process", name)
            ctx.memory.helper_failed = True
            ctx.stop.set()
            ctx.wake.set()
        finally:
            helper.conn.close()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    ctx.memory.helper_threads.append(thread)
    thread.start()
    return helper


def start_host_loops(ctx: Context, name: str, tick_on: Callable[[Context, Host, float], int], *,
                     drain: bool = False, shared: tuple[str, ...] = (),
                     idle_wait: Callable[[Context], float] | None = None) -> list[Context]:
    """One helper loop per configured host (``<name>@<host>``), each calling ``tick_on(ctx, host, now)``
    for its own host only: a slow host (every remote call taking seconds) slows its own loop, never
    another host's. Each loop has its own database connection (``start_helper_loop``)."""
    return [start_helper_loop(ctx, f"{name}@{host.name}", partial(_on_host, tick_on, host.name), drain=drain,
                              shared=shared, idle_wait=idle_wait)
            for host in ctx.hosts.values()]


def _on_host(tick_on: Callable[[Context, Host, float], int], host_name: str, ctx: Context, now: float) -> int:
    return tick_on(ctx, ctx.hosts[host_name], now)


def wake_loops(ctx: Context, *, containing: str = "") -> None:
    """Wake this process's loops (those whose name contains ``containing``) but the caller's own."""
    for name, wake in list(ctx.memory.loop_wakes.items()):
        if name != ctx.name and containing in name:
            wake.set()


# A condition that keeps coming up is logged again at most this often (``worth_logging``).
REPEAT_LOG_SECONDS = 300


def worth_logging(ctx: Context, key: str, now: float, every_seconds: float) -> bool:
    """True the first time ``key`` comes up, then at most once every ``every_seconds``.

    Keeps a recurring condition (a paused group, a task we cannot read) to one log
    line per change instead of one per pass; ``forget_logged`` re-arms it.
    """
    logged = ctx.memory.logged_at
    if key in logged and now - logged[key] < every_seconds:
        return False
    logged[key] = now
    return True


def forget_logged(ctx: Context, key: str) -> None:
    """The condition ``key`` is over: the next occurrence is logged at once."""
    ctx.memory.logged_at.pop(key, None)
