"""Throughput: many tiny cases with an instant simulation through many GPU groups.

Tiny cases (a few files, a 0 s simulation; 500 by default, issue 19's figure) are dropped at
once into a system with 8 groups on one host under supervisord; we measure cases per second
(and per host) from the drop to the last completed row, ssh connections opened (``Accepted
publickey`` in the sandbox sshd's log) and remote commands run (``Starting session:``: one
per command, scp/sftp transfer or stream) per case, and the pueue calls by subcommand (a
counting wrapper around the stand-in). The naive way runs fewer cases (its 10 s loop would
take far too long); its time is extrapolated to our number of cases.

Steady state: while the run goes, the sshd log and the completed rows are sampled every
0.5 s; the figures "at steady state" are those between the moments 20 % and 80 % of the
cases were completed (no start-up, no tail). How many cases were pre-uploaded (on the HPC
before a seat took them) is counted from our own events.

CPU: both sides of the run share this machine's cores (the sandbox HPC's sshd with every remote
command and its login shell, the scheduler's daemon with its tasks; our workers with their ssh
clients and the shared connections), so the CPU seconds each side spends per case are printed,
with the rate the cores allow at that cost: no design can run faster here than cores / (CPU
seconds per case), and the HPC side's share alone bounds it too.

Issue 19's targets are printed beside the figures: >= 10 cases/s per host, >= 20 x the
naive way, <= 2 remote commands per case at steady state.

    .venv/bin/python bench/throughput.py [--quick] [--cases N] [--naive-cases N] [--skip-naive]
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, naive  # noqa: E402
from bench.common import Workspace, table  # noqa: E402
from sandbox.casegen import make_case  # noqa: E402

GROUPS = 8
CASES = 500
STEADY = (0.2, 0.8)  # steady state: from 20 % to 80 % of the cases completed
TARGET_RATE_PER_HOST = 10.0   # issue 19: cases/s per host
TARGET_VS_NAIVE = 20.0        # issue 19: times the naive way's rate
TARGET_COMMANDS_PER_CASE = 2.0  # issue 19: remote commands per case at steady state
TINY = {"deliveries": 1, "layers_per_delivery": 1, "ptn_bytes": 2_000, "mgn_bytes": 256, "rp_bytes": 2_048,
        "seconds": 0, "batches": 1}


def extra_args(parser) -> None:
    parser.add_argument("--cases", type=int, help=f"cases for our system (default {CASES}, issue 19's figure; quick 40)")
    parser.add_argument("--naive-cases", type=int, help="cases for the naive way (default 40, quick 16)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--depth", type=int, default=1,
                        help="seats per group for our system (default 1; 2 keeps each group's next case queued)")


def names(count: int) -> list[str]:
    return [f"tiny_{i:04d}" for i in range(count)]


class Sampler:
    """Samples (time, sshd sessions so far, cases final) every ``interval`` s in a thread."""

    def __init__(self, ws: Workspace, interval: float = 0.5):
        self.ws, self.interval = ws, interval
        self.samples: list[tuple[float, int, int]] = []
        self._offset, self._sessions = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def __enter__(self) -> "Sampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        self.samples.append((time.time(), self._read_sessions(), self.ws.count_final()))

    def _read_sessions(self) -> int:
        """Sessions started so far (reads only what the sshd log gained since the last sample)."""
        log = self.ws.sshd_log
        if log.exists():
            with log.open("rb") as stream:
                stream.seek(self._offset)
                chunk = stream.read()
            cut = chunk.rfind(b"\n") + 1  # count whole lines only
            self._sessions += chunk[:cut].count(b"Starting session:")
            self._offset += cut
        return self._sessions


def steady_state(samples: list[tuple[float, int, int]], cases: int) -> dict:
    """Cases/s and remote commands per case between 20 % and 80 % of the cases completed."""
    low, high = (next((s for s in samples if s[2] >= share * cases), None) for share in STEADY)
    if low is None or high is None or high[2] <= low[2] or high[0] <= low[0]:
        return {"steady_rate": float("nan"), "steady_commands": float("nan"), "steady_window": "-"}
    done = high[2] - low[2]
    return {"steady_rate": done / (high[0] - low[0]), "steady_commands": (high[1] - low[1]) / done,
            "steady_window": f"{done} cases in {high[0] - low[0]:.1f} s"}


def pre_uploaded(ws: Workspace) -> int:
    """Cases that were on the HPC before a seat took them (their 'pre-uploaded' event)."""
    return ws.count("SELECT COUNT(DISTINCT case_id) FROM case_events WHERE detail LIKE 'pre-uploaded%'")


def run_ours(args, cases: int) -> dict:
    groups = {name: {**group, "depth": args.depth} for name, group in common.groups_of(GROUPS).items()}
    with Workspace("tput", groups=groups, keep=args.keep) as ws:
        calls_log = ws.install_pueue_counter()
        staged = common.stage_cases(ws.staging, names(cases), make_case, **TINY)
        ws.start_system()
        common.wait_until(lambda: ws.count("SELECT COUNT(*) FROM workers") >= 4, timeout=60,
                          what="worker heartbeats")
        calls_log.unlink(missing_ok=True)  # start-up calls (group creation) are not per case
        before = common.sshd_counts(ws.sshd_log)
        with Sampler(ws) as sampler, common.CpuMeter(ws) as cpu:
            drop_at = common.drop(staged, ws.watch)
            common.wait_until(lambda: ws.count_final() >= cases, timeout=300 + cases * 3, interval=0.5,
                              what=f"{cases} cases final")
        login = common.login_cpu_seconds(ws)
        rows = ws.case_rows()
        finished = max(r["completed_at"] for r in rows if r["completed_at"])
        used = common.sshd_counts(ws.sshd_log) - before
        return {"cases": cases, "hosts": len(ws.config.hosts), "wall": finished - drop_at,
                "connections": used.connections, "sessions": used.sessions,
                "calls": common.pueue_call_counts(calls_log), "pre_uploaded": pre_uploaded(ws),
                "ok": sum(1 for r in rows if r["outcome"] == "success"),
                "cadence": common.cadence(ws.config), "cpu": cpu.used, "login_cpu": login} | steady_state(sampler.samples, cases)


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
        return {"cases": cases, "hosts": 1, "wall": finished - drop_at, "connections": used.connections,
                "sessions": used.sessions, "calls": common.pueue_call_counts(calls_log),
                "ok": sum(1 for c in loop.cases.values() if c.result == "Success"), "passes": loop.passes}


def cpu_rows(ours: dict) -> list[list]:
    """CPU seconds per case on each side, and the rate this machine's cores allow at that cost."""
    cases, cpu = ours["cases"], ours["cpu"]
    rows = [[f"{side} (s per case)", seconds / cases] for side, seconds in cpu.items()]
    hpc = sum(seconds for side, seconds in cpu.items() if side.startswith("hpc"))
    total = sum(cpu.values())
    logins = ours["sessions"] * ours["login_cpu"]
    cores = os.cpu_count() or 1
    rows += [["  of the remote commands: their login shells (s per case)", logins / cases],
             ["one login's CPU on the HPC (s)", ours["login_cpu"]],
             ["both sides (s per case)", total / cases],
             [f"cases/s the {cores} cores allow at that cost (cores / s per case)", cores * cases / total],
             [f"cases/s the {cores} cores allow for the HPC side alone", cores * cases / hpc]]
    return rows


def advantage(ratio: float | None) -> str:
    """How many times better ours is (below 1: worse)."""
    if not ratio:
        return ""
    return f"{ratio:.1f}x better" if ratio >= 1 else f"{1 / ratio:.1f}x worse"


def summary_rows(ours: dict, theirs: dict | None, cases: int) -> list[list]:
    """(label, value of a run, True when higher is better / False when lower is / None: no ratio)."""
    metrics = (
        ("cases per second", lambda r: r["cases"] / r["wall"], True),
        ("cases per second per host", lambda r: r["cases"] / r["wall"] / r["hosts"], True),
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


def issue19_rows(ours: dict, theirs: dict | None) -> list[list]:
    """Issue 19's three throughput targets: figure, target, MET or NOT MET."""
    rate = ours["cases"] / ours["wall"] / ours["hosts"]
    rows = [["cases per second per host", rate, f">= {TARGET_RATE_PER_HOST:g}", _met(rate >= TARGET_RATE_PER_HOST)]]
    if theirs:
        ratio = (ours["cases"] / ours["wall"]) / (theirs["cases"] / theirs["wall"])
        rows.append(["x the naive way's cases per second", ratio, f">= {TARGET_VS_NAIVE:g}",
                     _met(ratio >= TARGET_VS_NAIVE)])
    steady = ours["steady_commands"]
    rows.append(["remote commands per case at steady state", steady, f"<= {TARGET_COMMANDS_PER_CASE:g}",
                 _met(steady <= TARGET_COMMANDS_PER_CASE)])
    return rows


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def main(argv=None) -> int:
    args = common.bench_args(__doc__.splitlines()[0], argv, extra_args)
    common.exit_on_sigterm()
    cases = args.cases or (40 if args.quick else CASES)
    naive_cases = args.naive_cases or (16 if args.quick else 40)
    print(common.machine_line())
    ours = run_ours(args, cases)
    theirs = None if args.skip_naive else run_naive(args, naive_cases)
    print()
    print(f"Throughput: tiny cases, 0 s simulation, {GROUPS} groups (ours: depth {args.depth}); ours: {ours['cadence']};"
          f" successes ours {ours['ok']}/{cases}"
          + (f", naive {theirs['ok']}/{naive_cases} in {theirs['passes']} passes" if theirs else ""))
    headers = ["metric", f"ours ({cases} cases)"] + ([f"naive ({naive_cases} cases)", "ours vs naive"] if theirs else [])
    print(table(headers, summary_rows(ours, theirs, cases)))
    print()
    print(table(["steady state (20 % -> 80 % of the cases completed)", "ours"],
                [["window", ours["steady_window"]], ["cases per second", ours["steady_rate"]],
                 ["remote commands (sshd sessions) per case", ours["steady_commands"]],
                 ["cases pre-uploaded before a seat took them (whole run)", f"{ours['pre_uploaded']} of {cases}"]]))
    print()
    subcommands = sorted(set(ours["calls"]) | set(theirs["calls"] if theirs else ()))
    print(table(["pueue subcommand (calls per case)", "ours"] + (["naive"] if theirs else []),
                [[name, ours["calls"].get(name, 0) / cases] +
                 ([theirs["calls"].get(name, 0) / naive_cases] if theirs else []) for name in subcommands]))
    print()
    print(table(["CPU of the whole run (both sides share this machine's cores)", "ours"], cpu_rows(ours)))
    print()
    print(table([f"issue 19 ({cases} tiny cases)", "figure", "target", ""], issue19_rows(ours, theirs)))
    print(common.machine_line("end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
