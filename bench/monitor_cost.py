"""Monitor cost with 100,000 cases, and what each worker costs while it has nothing to do.

1. A database with 100,000 cases (a year of work: almost all completed or failed, some
   running, queued and flagged; three or four events each) is seeded in one transaction.
   We time one ``mqic-top`` frame (read the overview and render it, in process), the
   ``mqic-top --once`` and ``mqic cases`` commands (whole processes), and the queries
   behind ``mqic cases``.
2. Idle cost: the whole system under supervisord with nothing to do, first on an empty
   database and then on 100,000 final cases; over a window (60 s; 10 s with --quick) we
   read each worker's CPU seconds (utime+stime of /proc/<pid>/stat) and wake-ups (voluntary
   context switches, summed over its threads).

    .venv/bin/python bench/monitor_cost.py [--quick] [--window SECONDS]
"""
from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.common import Workspace, median, table  # noqa: E402
from shared.db import connect, transaction  # noqa: E402

CASES = 100_000
SETTLE_SECONDS = 5.0
YEAR = 365 * 86400


def extra_args(parser) -> None:
    parser.add_argument("--window", type=float, help="idle measurement window in seconds (default 60, quick 10)")
    parser.add_argument("--cases", type=int, default=CASES)


def seed(db_path: Path, count: int, *, active: bool) -> float:
    """Insert ``count`` cases and their events in one transaction; return the seconds it took."""
    rng = random.Random(1)
    now = time.time()
    conn = connect(db_path)
    start = time.perf_counter()
    cases, events = [], []
    for case_id in range(1, count + 1):
        submitted = now - YEAR + YEAR * case_id / count
        status, outcome, stage = _status(case_id, count, rng, active)
        done = submitted + 900 + rng.random() * 3600 if status in ("completed", "failed") else None
        updated = done or submitted + 60
        name = f"1.2.826.0.1.3680043.8.498.{rng.randrange(10**9, 10**10)}"
        cases.append((case_id, name, f"/spool/{stage}/{case_id}_{name}", f"/drop/{name}", stage, status,
                      100.0 if status == "completed" else 40.0, f"gpu_{case_id % 3}",
                      case_id % 1000, submitted, updated, submitted + 30, done, 1, outcome,
                      int(status == "failed" and case_id % 7 == 0)))
        events += [(case_id, None, "submitted", submitted, "scanner"),
                   (case_id, "submitted", "submitting", submitted + 1, "submitter")]
        if status in ("running", "completed", "failed"):
            events.append((case_id, "submitting", "running", submitted + 30, "submitter"))
        if done:
            events.append((case_id, "running", status, done, "poller"))
    with transaction(conn):
        conn.executemany(
            "INSERT INTO cases (case_id, case_name, case_path, source_path, spool_stage, status, progress,"
            " pueue_group, pueue_task_id, submitted_at, status_updated_at, started_at, completed_at, attempts,"
            " outcome, needs_review) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", cases)
        conn.executemany("INSERT INTO case_events (case_id, from_status, to_status, at, worker)"
                         " VALUES (?, ?, ?, ?, ?)", events)
    seconds = time.perf_counter() - start
    conn.close()
    return seconds


def _status(case_id: int, count: int, rng: random.Random, active: bool) -> tuple[str, str | None, str]:
    if active and case_id > count - 3:
        return "running", None, "active"
    if active and case_id > count - 40:
        return "submitted", None, "queued"
    if rng.random() < 0.03:
        return "failed", "failed", "failed"
    return "completed", "success", "done"


def finalize_active(db_path: Path) -> None:
    """Make every case final so the workers have nothing to do."""
    conn = connect(db_path)
    with transaction(conn):
        conn.execute("UPDATE cases SET status = 'completed', spool_stage = 'done', outcome = 'success'"
                     " WHERE status NOT IN ('completed', 'failed')")
    conn.close()


def frame_costs(ws: Workspace) -> list[list]:
    from rich.console import Console

    from shared import queries
    from console.top import Reader, render

    config = ws.config
    reader = Reader(config)
    frames, reads = [], []
    for _ in range(10):
        start = time.perf_counter()
        now = time.time()
        view, message = reader.read(now)
        reads.append(time.perf_counter() - start)
        Console(file=io.StringIO(), width=120, force_terminal=True).print(render(view, config, now, message))
        frames.append(time.perf_counter() - start)
    reader.close()
    conn = connect(config.database_path, readonly=True)
    listing = median([common.timed(lambda: queries.list_cases(conn, None, 50))[0] for _ in range(10)])
    by_status = median([common.timed(lambda: queries.list_cases(conn, "completed", 50))[0] for _ in range(10)])
    conn.close()
    env = {**os.environ, "COLUMNS": "120"}
    bin_dir = Path(sys.prefix) / "bin"

    def command(*argv: str) -> float:
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([str(bin_dir / argv[0]), "--config", str(ws.config_path), *argv[1:]], env=env,
                           check=True, capture_output=True, timeout=120)
            runs.append(time.perf_counter() - start)
        return median(runs)

    python_start = median([common.timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))[0]
                           for _ in range(3)])
    return [
        ["mqic-top frame: read overview (in process)", median(reads) * 1000],
        ["mqic-top frame: read + render (in process)", median(frames) * 1000],
        ["queries.list_cases (newest 50)", listing * 1000],
        ["queries.list_cases --status completed (newest 50)", by_status * 1000],
        ["`mqic-top --once` (whole process)", command("mqic-top", "--once") * 1000],
        ["`mqic cases` (whole process)", command("mqic", "cases") * 1000],
        ["`mqic cases --status failed` (whole process)", command("mqic", "cases", "--status", "failed") * 1000],
        ["`mqic status` (whole process)", command("mqic", "status") * 1000],
        ["(python -c pass, for scale)", python_start * 1000],
    ]


def idle_costs(ws: Workspace, window: float) -> dict[str, tuple[float, float, float]]:
    """{worker: (cpu seconds, cpu %, wake-ups per minute)} over ``window`` with nothing to do."""
    supervisor = ws.start_system()
    pids = supervisor.wait_running()
    common.wait_until(lambda: ws.count("SELECT COUNT(*) FROM workers") >= 4, timeout=60, what="heartbeats")
    time.sleep(SETTLE_SECONDS)  # start-up work (imports, ssh master, groups) is not idle cost
    before = {name: (common.cpu_seconds(pid), common.voluntary_switches(pid)) for name, pid in pids.items()}
    time.sleep(window)
    result = {}
    for name, pid in pids.items():
        cpu = common.cpu_seconds(pid) - before[name][0]
        wakes = common.voluntary_switches(pid) - before[name][1]
        result[name] = (cpu, 100 * cpu / window, wakes * 60 / window)
    if supervisor.pids() != pids:
        raise RuntimeError(f"a worker restarted during the idle window: {pids} -> {supervisor.pids()}")
    supervisor.shutdown()
    return result


def main(argv=None) -> int:
    args = common.bench_args(__doc__.splitlines()[0], argv, extra_args)
    window = args.window or (10.0 if args.quick else 60.0)
    print(common.machine_line())
    with Workspace("idle-empty", groups=common.groups_of(3), keep=args.keep) as ws:
        idle_empty = idle_costs(ws, window)
    with Workspace("monitor", groups=common.groups_of(3), keep=args.keep) as ws:
        seed_s = seed(ws.db_path, args.cases, active=True)
        frames = frame_costs(ws)
        finalize_active(ws.db_path)
        idle_full = idle_costs(ws, window)
    print()
    print(f"Monitor with {args.cases:,} cases (seeded with their events in {seed_s:.1f} s, one transaction);"
          " medians of 10 in-process / 3 whole-process runs")
    print(table(["what", "ms"], frames))
    print()
    print(f"Idle cost of each worker with nothing to do, over {window:g} s (after {SETTLE_SECONDS:g} s settling)")
    rows = []
    for name in common.WORKERS:
        empty, full = idle_empty.get(name), idle_full.get(name)
        rows.append([name, empty[0], empty[1], empty[2], full[0], full[1], full[2]])
    rows.append(["all workers", *(sum(v[i] for v in idle_empty.values()) for i in range(3)),
                 *(sum(v[i] for v in idle_full.values()) for i in range(3))])
    print(table(["worker", "empty db: cpu s", "cpu %", "wake-ups/min",
                 f"{args.cases:,} cases: cpu s", "cpu %", "wake-ups/min"], rows))
    print(common.machine_line("end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
