"""Polling cost versus the number of tasks on the HPC: remote calls, bytes and parse/apply time per pass.

For N = 10, 100 and 1,000, a fresh sandbox gets N running pueue tasks (``sleep``, labelled
like ours, added in one ssh session by a loop inside one process) and the database gets N
``running`` cases pointing at them. Then ``workers.poller.tick`` runs on a Context built by
``shared.worker.build_context``: we count the remote calls of one pass (and the sshd
sessions), the bytes each call printed, and time the pass, the remote calls, and the parse.
A second table keeps 10 running cases and adds N finished tasks of someone else (the
history a shared pueue accumulates), which is what ``pueue status --json`` bytes grow with.

    .venv/bin/python bench/polling_cost.py [--quick]
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.common import Workspace, median, table  # noqa: E402
from sandbox import pueue_standin  # noqa: E402
from shared.backends import model, pueue_parse  # noqa: E402
from shared.db import transaction  # noqa: E402
from shared.store import case_label  # noqa: E402
from shared.worker import build_context  # noqa: E402
from workers import poller  # noqa: E402

GROUP = "bench"
STEADY_PASSES = 5

# Runs on the HPC in ONE ssh session: adds every task through the stand-in's client code.
ADD_LOOP = r"""
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import pueue_standin
ids = []
for label, group, workdir, command in json.load(sys.stdin):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pueue_standin.main(["add", "--print-task-id", "--group", group, "--label", label,
                                   "--working-directory", workdir, "--", command])
    if code != 0:
        raise SystemExit(f"pueue add failed with exit {code}")
    ids.append(int(out.getvalue().split()[-1]))
print(json.dumps(ids))
"""


class CallMeter:
    """Wraps ``Remote.run`` on one instance: counts calls, stdout bytes and seconds per subcommand."""

    def __init__(self, remote, pueue_cmd: list[str]):
        self.calls: list[tuple[str, int, float, str]] = []
        self.skip = len(pueue_cmd)
        original = remote.run

        def run(argv, *, timeout=None):
            start = time.perf_counter()
            out = original(argv, timeout=timeout)
            self.calls.append((str(argv[self.skip]) if len(argv) > self.skip else "?", len(out.encode()),
                               time.perf_counter() - start, out))
            return out

        remote.run = run

    def reset(self) -> None:
        self.calls.clear()


def add_tasks(ws: Workspace, specs: list[tuple[str, str, str, str]]) -> list[int]:
    """Add tasks through one ssh session (the session's environment, like the submitter's adds)."""
    data_dir = ws.root / "hpc" / "pueue"
    remote = (f"env CUDA_VISIBLE_DEVICES=0 PUEUE_STANDIN_DIR={shlex.quote(str(data_dir))} "
              f"{shlex.quote(sys.executable)} -c {shlex.quote(ADD_LOOP)} "
              f"{shlex.quote(str(Path(pueue_standin.__file__).parent))}")
    done = subprocess.run([*ws.ssh_argv(fresh=True), remote], input=json.dumps(specs), capture_output=True,
                          text=True, timeout=1800, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def seed_running_cases(conn, ws: Workspace, count: int, first_id: int = 1) -> list[int]:
    """``count`` running case rows (ids first_id..) for the group; returns their ids."""
    now = time.time()
    ids = list(range(first_id, first_id + count))
    active = ws.config.spool_path / "active"
    with transaction(conn):
        conn.executemany(
            "INSERT INTO cases (case_id, case_name, case_path, source_path, spool_stage, status, pueue_group,"
            " remote_dir, submitted_at, status_updated_at, started_at, attempts)"
            " VALUES (?, ?, ?, ?, 'active', 'running', ?, ?, ?, ?, ?, 1)",
            [(i, f"case_{i}", str(active / f"{i}_case_{i}"), f"/drop/case_{i}", GROUP, ws.config.hosts[0].hpc.remote_base_dir,
              now, now, now) for i in ids])
    return ids


def link_tasks(conn, case_ids: list[int], task_ids: list[int]) -> None:
    with transaction(conn):
        conn.executemany("UPDATE cases SET pueue_task_id = ? WHERE case_id = ?", list(zip(task_ids, case_ids)))


def prepare(ws: Workspace, running: int, history: int):
    """Finished foreign tasks, then ``running`` running tasks of ours with their case rows; a Context."""
    ws.sandbox.pueue_cli("group", "add", GROUP, "-p", str(max(1, running)))
    base = ws.config.hosts[0].hpc.remote_base_dir
    Path(base).mkdir(parents=True, exist_ok=True)
    if history:
        add_tasks(ws, [(f"someone_{i}", "default", base, "true") for i in range(history)])
        common.wait_until(lambda: all(t.is_done for t in ws.snapshot().tasks.values()), timeout=600,
                          interval=0.5, what="history tasks done")
    ctx = build_context(ws.config, "poller")
    case_ids = seed_running_cases(ctx.conn, ws, running)
    link_tasks(ctx.conn, case_ids, add_tasks(ws, [(case_label(i), GROUP, base, "sleep 3600") for i in case_ids]))
    common.wait_until(lambda: sum(t.state is model.TaskState.RUNNING for t in ws.snapshot().tasks.values())
                      >= running, timeout=300, interval=0.5, what=f"{running} tasks running")
    return ctx


def timed_passes(ws: Workspace, ctx) -> tuple[float, int, list]:
    """(first pass seconds, rows it changed, [(seconds, changed, sshd sessions, calls)] of steady passes)."""
    meter = CallMeter(ctx.hosts["hpc"].remote, list(ctx.config.hosts[0].hpc.pueue_command))
    ctx.hosts["hpc"].remote.ensure_master()
    first_s, first_changed = common.timed(lambda: poller.tick(ctx, time.time()))
    passes = []
    for _ in range(STEADY_PASSES):
        meter.reset()
        before = common.sshd_counts(ws.sshd_log)
        seconds, changed = common.timed(lambda: poller.tick(ctx, time.time()))
        passes.append((seconds, changed, (common.sshd_counts(ws.sshd_log) - before).sessions, list(meter.calls)))
    return first_s, first_changed, passes


def measure(running: int, history: int, keep: bool) -> dict:
    """One fresh sandbox: ``history`` finished foreign tasks, then ``running`` running tasks of ours."""
    with Workspace(f"poll{running}-{history}", groups={GROUP: {"parallel": max(1, running)}}, keep=keep) as ws:
        ctx = prepare(ws, running, history)
        first_s, first_changed, passes = timed_passes(ws, ctx)
        ctx.conn.close()
    _seconds, _changed, sessions, calls = passes[-1]
    by_kind = {kind: size for kind, size, _s, _o in calls}
    status_text = next(out for kind, _b, _s, out in calls if kind == "status")
    log_text = next((out for kind, _b, _s, out in calls if kind == "log"), "")
    parse_status = median([common.timed(lambda: pueue_parse.parse_status(status_text))[0] for _ in range(5)])
    parse_log = median([common.timed(lambda: pueue_parse.parse_log(log_text))[0] for _ in range(5)]) if log_text else 0.0
    tick_s = median([p[0] for p in passes])
    remote_s = median([sum(c[2] for c in p[3]) for p in passes])
    return {"running": running, "history": history, "tasks": running + history,
            "calls": len(calls), "kinds": "+".join(kind for kind, *_ in calls), "sessions": sessions,
            "status_bytes": by_kind.get("status", 0), "log_bytes": by_kind.get("log", 0),
            "first_ms": first_s * 1000, "first_changed": first_changed, "tick_ms": tick_s * 1000,
            "remote_ms": remote_s * 1000, "local_ms": (tick_s - remote_s) * 1000,
            "parse_status_ms": parse_status * 1000, "parse_log_ms": parse_log * 1000,
            "steady_changed": max(p[1] for p in passes)}


def main(argv=None) -> int:
    args = common.bench_args(__doc__.splitlines()[0], argv)
    sizes = (10, 100) if args.quick else (10, 100, 1000)
    print(common.machine_line())
    ours = [measure(n, 0, args.keep) for n in sizes]
    history = [measure(10, n, args.keep) for n in ((100,) if args.quick else (100, 1000))]
    print()
    print(f"Polling cost per poller pass (workers.poller.tick; median of {STEADY_PASSES} steady passes)")
    print(table(
        ["running cases = tasks", "remote calls", "sshd sessions", "status bytes", "log bytes", "pass ms",
         "of which remote ms", "local (parse+apply) ms", "parse status ms", "parse log ms",
         "first pass ms (rows written)"],
        [[r["running"], f"{r['calls']} ({r['kinds']})", r["sessions"], r["status_bytes"], r["log_bytes"],
          r["tick_ms"], r["remote_ms"], r["local_ms"], r["parse_status_ms"], r["parse_log_ms"],
          f"{r['first_ms']:.0f} ({r['first_changed']})"] for r in ours]))
    print()
    print("Same, 10 running cases among finished tasks of others (pueue's history)")
    print(table(
        ["tasks in pueue", "remote calls", "status bytes", "log bytes", "pass ms", "of which remote ms",
         "local ms", "parse status ms"],
        [[r["tasks"], r["calls"], r["status_bytes"], r["log_bytes"], r["tick_ms"], r["remote_ms"], r["local_ms"],
          r["parse_status_ms"]] for r in history]))
    print(common.machine_line("end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
