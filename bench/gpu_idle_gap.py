"""GPU idle gap: how long a GPU group stays idle between one case's end and the next case's start.

30 realistic cases (about 220 files / 45 MB each, a 2 s simulation each) are dropped at
once (atomic renames, ready marker) into a system of 3 GPU groups run by supervisord; the
gaps come from pueue's own start/end times of consecutive tasks on the same group. The
naive way (bench/naive.py) runs the same kind of cases (fewer: its 10 s loop is slow) on a
fresh sandbox for the ratio.

    .venv/bin/python bench/gpu_idle_gap.py [--quick] [--naive-cases N] [--skip-naive]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, naive  # noqa: E402
from bench.common import Workspace, median, percentile, table  # noqa: E402
from sandbox.casegen import make_realistic_case  # noqa: E402

GROUPS = 3
RUN_SECONDS = 2.0
LABEL = "mqic_case_"


def extra_args(parser) -> None:
    parser.add_argument("--cases", type=int, help="cases for our system (default 30, quick 6)")
    parser.add_argument("--naive-cases", type=int, help="cases for the naive way (default 9, quick 6)")
    parser.add_argument("--skip-naive", action="store_true", help="only measure our system")


def summarize(tasks, drop_at: float, finished_at: float, cases: int) -> dict:
    """Gap statistics, wall time and the ideal for one run."""
    gaps = [g for per in common.gaps_per_group(tasks).values() for g in per]
    runs = common.run_seconds(tasks)
    starts = [t.start.timestamp() for t in tasks if t.start]
    wall = finished_at - drop_at
    return {
        "cases": cases, "gaps": len(gaps), "gap_median": median(gaps), "gap_p90": percentile(gaps, 90),
        "gap_worst": max(gaps) if gaps else float("nan"),
        "first_start": min(starts) - drop_at if starts else float("nan"),
        "run_median": median(runs), "wall": wall, "ideal": cases * RUN_SECONDS / GROUPS,
        "ideal_measured": sum(runs) / GROUPS, "busy": sum(runs) / (GROUPS * wall) * 100 if wall > 0 else 0.0,
    }


def event_times(ws: Workspace) -> tuple[dict[int, dict[str, float]], set[int]]:
    """({case id: {to_status: first time}}, ids of the cases pre-uploaded while GPUs were busy)."""
    conn = ws.db()
    try:
        times: dict[int, dict[str, float]] = {}
        staged = set()
        for row in conn.execute("SELECT case_id, to_status, at, detail FROM case_events ORDER BY event_id"):
            times.setdefault(row["case_id"], {}).setdefault(row["to_status"], row["at"])
            if row["detail"].startswith("pre-uploaded"):
                staged.add(row["case_id"])
        return times, staged
    finally:
        conn.close()


def slot_freed_times(ws: Workspace) -> dict[int, float]:
    """{case id: when its GPU slot was first released (assigned -> available or zombie)}."""
    conn = ws.db()
    try:
        freed: dict[int, float] = {}
        for row in conn.execute("SELECT case_id, at FROM slot_events WHERE from_status = 'assigned'"
                                " AND to_status IN ('available', 'zombie') ORDER BY event_id"):
            freed.setdefault(row["case_id"], row["at"])
        return freed
    finally:
        conn.close()


def breakdown(ws: Workspace, tasks) -> dict:
    """Split every gap (task A ends .. task B starts, same group) into the steps that fill it.

    The slot event is stamped with the ``now`` of the poller pass that freed it (taken
    before its ``pueue status`` call), so: A ends -> that pass starts (poll cadence); pass
    starts -> B claimed (the status call, the slot release, the doorbell, the claim); claim
    -> running row (upload unless pre-uploaded, verify, pueue add); running row -> B start
    (negative: pueue starts the task before our row is written).
    """
    events, staged = event_times(ws)
    freed = slot_freed_times(ws)
    by_group: dict[str, list] = {}
    for task in tasks:
        if task.start and task.end:
            by_group.setdefault(task.group, []).append(task)
    steps: dict[str, list[float]] = {"detect": [], "wake": [], "submit_staged": [], "submit_upload": [], "spawn": []}
    for items in by_group.values():
        items.sort(key=lambda t: t.start)
        for prev, nxt in zip(items, items[1:]):
            released = freed.get(int(prev.label[len(LABEL):]))
            case_id = int(nxt.label[len(LABEL):])
            ev = events.get(case_id, {})
            if released is None or "submitting" not in ev or "running" not in ev:
                continue
            steps["detect"].append(released - prev.end.timestamp())
            steps["wake"].append(ev["submitting"] - released)
            steps["submit_staged" if case_id in staged else "submit_upload"].append(ev["running"] - ev["submitting"])
            steps["spawn"].append(nxt.start.timestamp() - ev["running"])
    return {name: (len(values), median(values), max(values, default=float("nan"))) for name, values in steps.items()} \
        | {"staged_total": len(staged)}


def run_ours(args, cases: int) -> tuple[dict, dict, dict]:
    with Workspace("gap", groups=common.groups_of(GROUPS), keep=args.keep) as ws:
        staged = common.stage_cases(ws.staging, [f"plan_{i:03d}" for i in range(cases)], make_realistic_case,
                                    seconds=RUN_SECONDS, batches=4, seed=7)
        ws.start_system()
        common.wait_until(lambda: ws.count("SELECT COUNT(*) FROM workers") >= 4, timeout=60,
                          what="worker heartbeats")
        drop_at = common.drop(staged, ws.watch)
        common.wait_until(lambda: ws.count_final() >= cases, timeout=120 + cases * 20, interval=0.2,
                          what=f"{cases} cases final")
        rows = ws.case_rows()
        tasks = [t for t in ws.snapshot().tasks.values() if (t.label or "").startswith(LABEL)]
        finished = max(r["completed_at"] for r in rows if r["completed_at"])
        outcomes = {r["outcome"] for r in rows}
        config = {"cadence": common.cadence(ws.config), "transfer": ws.config.hosts[0].hpc.transfer,
                  "outcomes": ",".join(sorted(o or "-" for o in outcomes))}
        return summarize(tasks, drop_at, finished, cases), breakdown(ws, tasks), config


def run_naive(args, cases: int) -> dict:
    with Workspace("gap-naive", groups=common.groups_of(GROUPS), keep=args.keep) as ws:
        loop = naive.for_workspace(ws)
        loop.create_groups()
        staged = common.stage_cases(ws.staging, [f"plan_{i:03d}" for i in range(cases)], make_realistic_case,
                                    seconds=RUN_SECONDS, batches=4, seed=7)
        drop_at = common.drop(staged, ws.watch)
        loop.run_until(cases, timeout=120 + cases * 40)
        tasks = [t for t in ws.snapshot().tasks.values() if (t.label or "").startswith(naive.LABEL_PREFIX)]
        finished = max(c.done_at for c in loop.cases.values())
        return summarize(tasks, drop_at, finished, cases)


METRICS = (("gap_median", "gap median (s)"), ("gap_p90", "gap p90 (s)"), ("gap_worst", "gap worst (s)"),
           ("first_start", "drop -> first task start (s)"), ("run_median", "task run time median (s)"),
           ("wall", "wall: drop -> last completed (s)"), ("ideal", "ideal: cases x 2 s / groups (s)"),
           ("ideal_measured", "ideal with measured run times (s)"), ("busy", "GPU busy share (%)"))
STEPS = {"detect": "task A ends -> start of the poller pass that saw it (poll cadence)",
         "wake": "that pass starts -> B claimed (pueue status call, slot freed, doorbell, claim)",
         "submit_upload": "B claimed -> B running row: uploaded at claim (upload, verify, add)",
         "submit_staged": "B claimed -> B running row: pre-uploaded (check, pueue add)",
         "spawn": "B running row -> B task start (negative: pueue starts it first)"}


def summary_rows(ours: dict, theirs: dict | None) -> list[list]:
    """One row per metric; the ratio column only where "naive / ours" means "times worse"."""
    rows = []
    for key, label in METRICS:
        row = [label, ours[key]]
        if theirs:
            ratio = theirs[key] / ours[key] if ours[key] and key.startswith(("gap", "first")) else None
            row += [theirs[key], f"{ratio:.1f}x" if ratio and ratio == ratio else ""]
        rows.append(row)
    ours_slow = ours["wall"] / ours["ideal"]
    row = ["wall / ideal (1.0 = GPUs never idle)", ours_slow]
    if theirs:
        theirs_slow = theirs["wall"] / theirs["ideal"]
        row += [theirs_slow, f"{theirs_slow / ours_slow:.1f}x"]
    return rows + [row]


def main(argv=None) -> int:
    args = common.bench_args(__doc__.splitlines()[0], argv, extra_args)
    cases = args.cases or (6 if args.quick else 30)
    naive_cases = args.naive_cases or (6 if args.quick else 9)
    print(common.machine_line())
    ours, parts, config = run_ours(args, cases)
    theirs = None if args.skip_naive else run_naive(args, naive_cases)
    print()
    print(f"GPU idle gap: {GROUPS} groups, realistic cases (~220 files, 45 MB), {RUN_SECONDS:g} s simulation;"
          f" ours: {config['cadence']}, hpc.transfer={config['transfer']}, outcomes {config['outcomes']}")
    headers = ["metric", f"ours ({cases} cases)"] + ([f"naive ({naive_cases} cases)", "naive/ours"] if theirs else [])
    print(table(headers, summary_rows(ours, theirs)))
    print()
    print(table(["where each gap goes", "gaps", "median s", "worst s"], [[STEPS[k], *parts[k]] for k in STEPS]))
    print(f"cases pre-uploaded while every GPU was busy: {parts['staged_total']} of {cases}")
    print(f"\nbar (median GPU idle gap < 1 s): {'MET' if ours['gap_median'] < 1.0 else 'NOT MET'}")
    print(common.machine_line("end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
