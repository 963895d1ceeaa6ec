"""Throughput: many tiny cases with an instant simulation through many GPU groups.

Tiny cases (a few files, a 0 s simulation; 200 by default, ``--cases 500`` for the issue's
figure) are dropped at once into a system with 8 groups under supervisord; we measure cases
per second from the drop to the last completed row, ssh connections opened (``Accepted
publickey`` in the sandbox sshd's log) and remote commands run (``Starting session:``: one
per command, scp/sftp transfer or stream) per case, and the pueue calls by subcommand (a
counting wrapper around the stand-in). The naive way runs fewer cases (its 10 s loop would
take far too long); its time is extrapolated to our number of cases.

    .venv/bin/python bench/throughput.py [--quick] [--cases N] [--naive-cases N] [--skip-naive]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, naive  # noqa: E402
from bench.common import Workspace, table  # noqa: E402
from sandbox.casegen import make_case  # noqa: E402

GROUPS = 8
TINY = {"deliveries": 1, "layers_per_delivery": 1, "ptn_bytes": 2_000, "mgn_bytes": 256, "rp_bytes": 2_048,
        "seconds": 0, "batches": 1}


def extra_args(parser) -> None:
    parser.add_argument("--cases", type=int, help="cases for our system (default 200, quick 40; the issue asks for 500: --cases 500)")
    parser.add_argument("--naive-cases", type=int, help="cases for the naive way (default 40, quick 16)")
    parser.add_argument("--skip-naive", action="store_true")


def names(count: int) -> list[str]:
    return [f"tiny_{i:04d}" for i in range(count)]


def run_ours(args, cases: int) -> dict:
    with Workspace("tput", groups=common.groups_of(GROUPS), keep=args.keep) as ws:
        calls_log = ws.install_pueue_counter()
        staged = common.stage_cases(ws.staging, names(cases), make_case, **TINY)
        ws.start_system()
        common.wait_until(lambda: ws.count("SELECT COUNT(*) FROM workers") >= 4, timeout=60,
                          what="worker heartbeats")
        calls_log.unlink(missing_ok=True)  # start-up calls (group creation) are not per case
        before = common.sshd_counts(ws.sshd_log)
        drop_at = common.drop(staged, ws.watch)
        common.wait_until(lambda: ws.count_final() >= cases, timeout=300 + cases * 3, interval=0.5,
                          what=f"{cases} cases final")
        rows = ws.case_rows()
        finished = max(r["completed_at"] for r in rows if r["completed_at"])
        used = common.sshd_counts(ws.sshd_log) - before
        return {"cases": cases, "wall": finished - drop_at, "connections": used.connections,
                "sessions": used.sessions, "calls": common.pueue_call_counts(calls_log),
                "ok": sum(1 for r in rows if r["outcome"] == "success"),
                "cadence": common.cadence(ws.config)}


def run_naive(args, cases: int) -> dict:
    with Workspace("tput-naive", groups=common.groups_of(GROUPS), keep=args.keep) as ws:
        calls_log = ws.install_pueue_counter()
        loop = naive.for_workspace(ws)
        loop.create_groups()
        calls_log.unlink(missing_ok=True)
        staged = common.stage_cases(ws.staging, names(cases), make_case, **TINY)
        before = common.sshd_counts(ws.sshd_log)
        drop_at = common.drop(staged, ws.watch)
        loop.run_until(cases, timeout=300 + cases * 10)
        used = common.sshd_counts(ws.sshd_log) - before
        finished = max(c.done_at for c in loop.cases.values())
        return {"cases": cases, "wall": finished - drop_at, "connections": used.connections,
                "sessions": used.sessions, "calls": common.pueue_call_counts(calls_log),
                "ok": sum(1 for c in loop.cases.values() if c.result == "Success"), "passes": loop.passes}


def advantage(ratio: float | None) -> str:
    """How many times better ours is (below 1: worse)."""
    if not ratio:
        return ""
    return f"{ratio:.1f}x better" if ratio >= 1 else f"{1 / ratio:.1f}x worse"


def summary_rows(ours: dict, theirs: dict | None, cases: int) -> list[list]:
    """(label, value of a run, True when higher is better / False when lower is / None: no ratio)."""
    metrics = (
        ("cases per second", lambda r: r["cases"] / r["wall"], True),
        ("wall: drop -> last completed (s)", lambda r: r["wall"], None),
        (f"time for {cases} cases (s; naive extrapolated)", lambda r: cases * r["wall"] / r["cases"], False),
        ("ssh connections opened", lambda r: r["connections"], None),
        ("ssh connections per case", lambda r: r["connections"] / r["cases"], False),
        ("remote commands (sshd sessions) per case", lambda r: r["sessions"] / r["cases"], False),
        ("pueue calls per case", lambda r: sum(r["calls"].values()) / r["cases"], False))
    rows = []
    for label, value, higher_better in metrics:
        row = [label, value(ours)]
        if theirs:
            a, b = value(ours), value(theirs)
            ratio = (a / b if higher_better else b / a) if higher_better is not None and a and b else None
            row += [b, advantage(ratio)]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = common.bench_args(__doc__.splitlines()[0], argv, extra_args)
    cases = args.cases or (40 if args.quick else 200)
    naive_cases = args.naive_cases or (16 if args.quick else 40)
    print(common.machine_line())
    ours = run_ours(args, cases)
    theirs = None if args.skip_naive else run_naive(args, naive_cases)
    print()
    print(f"Throughput: tiny cases, 0 s simulation, {GROUPS} groups; ours: {ours['cadence']};"
          f" successes ours {ours['ok']}/{cases}"
          + (f", naive {theirs['ok']}/{naive_cases} in {theirs['passes']} passes" if theirs else ""))
    headers = ["metric", f"ours ({cases} cases)"] + ([f"naive ({naive_cases} cases)", "ours vs naive"] if theirs else [])
    print(table(headers, summary_rows(ours, theirs, cases)))
    print()
    subcommands = sorted(set(ours["calls"]) | set(theirs["calls"] if theirs else ()))
    print(table(["pueue subcommand (calls per case)", "ours"] + (["naive"] if theirs else []),
                [[name, ours["calls"].get(name, 0) / cases] +
                 ([theirs["calls"].get(name, 0) / naive_cases] if theirs else []) for name in subcommands]))
    print(common.machine_line("end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
