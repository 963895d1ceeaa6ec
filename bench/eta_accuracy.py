"""ETA accuracy: how far ``shared.eta.estimate`` was from what then happened.

A small sandbox run through the whole system under supervisord: ``--cases`` small cases
(default 12) whose fake simulation runs 4 to 10 s (cycling) with 10 progress lines each,
dropped at once onto 2 GPUs (pueue depth ``--depth``, default 1). While they run,
``estimate()`` is sampled every ``--every`` seconds (default 0.5) through a read-only
connection, like mqic-top. At the end each prediction is compared with the truth:

- finish ETA (a running case): against its ``completed_at`` (our clock, when the poller
  saw it end);
- start ETA (a waiting case): against its ``started_at`` (the scheduler's start).

It prints median, p90 and worst absolute errors, overall and split by how the pace was
known (``basis``), and how far ahead each prediction was made.

    .venv/bin/python bench/eta_accuracy.py [--cases N] [--depth D] [--every S] [--keep]
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.common import Workspace, median, percentile, table  # noqa: E402
from sandbox.casegen import make_case  # noqa: E402
from shared.eta import estimate  # noqa: E402
from shared.queries import read_snapshot  # noqa: E402

GPUS = 2
RUN_SECONDS = (4.0, 6.0, 8.0, 10.0)


@dataclass(frozen=True)
class Sample:
    taken: float
    case_id: int
    kind: str
    at: float
    basis: str


def sample_until_done(ws: Workspace, cases: int, every: float, timeout: float) -> list[Sample]:
    """``estimate()`` every ``every`` seconds until every case is final."""
    conn = ws.db()
    config = ws.config
    samples: list[Sample] = []
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            now = time.time()
            with read_snapshot(conn):
                etas = estimate(conn, config, now)
                final = conn.execute("SELECT COUNT(*) FROM cases WHERE status IN ('completed', 'failed')").fetchone()[0]
            samples += [Sample(now, e.case_id, e.kind, e.at, e.basis) for e in etas.values()]
            if final >= cases:
                return samples
            time.sleep(every)
    finally:
        conn.close()
    raise TimeoutError(f"{cases} cases not final within {timeout:.0f} s")


def pace_source(basis: str) -> str:
    """Which pace a prediction stood on (the last clause of its basis)."""
    for words, name in (("100% done", "100% done: ends now"), ("progress rate", "progress rate"),
                        ("median of", "median of completed runs"),
                        ("projected from", "projected from running cases"), ("default", "default (nothing known)")):
        if words in basis:
            return name
    return "other"


def errors(samples: list[Sample], truth: dict[int, dict], kind: str) -> list[tuple[Sample, float]]:
    """(sample, predicted - actual) of every ``kind`` prediction whose case has that truth."""
    field = "completed_at" if kind == "finish" else "started_at"
    return [(s, s.at - truth[s.case_id][field]) for s in samples
            if s.kind == kind and truth.get(s.case_id, {}).get(field) is not None]


def figures(found: list[tuple[Sample, float]]) -> list[object]:
    absolute = [abs(e) for _, e in found]
    signed = [e for _, e in found]
    ahead = [(s.at - s.taken) for s, _ in found]
    return [len(found), median(absolute), percentile(absolute, 90), max(absolute, default=float("nan")),
            median(signed), median(ahead)]


def report(samples: list[Sample], truth: dict[int, dict]) -> str:
    headers = ["predictions", "n", "median |err| s", "p90 |err| s", "worst s", "median err s (+ late)",
               "median lead s"]
    rows = []
    for kind in ("finish", "start"):
        found = errors(samples, truth, kind)
        rows.append([f"{kind} ETAs, all", *figures(found)])
        for source in sorted({pace_source(s.basis) for s, _ in found}):
            rows.append([f"  {kind}: {source}", *figures([f for f in found if pace_source(f[0].basis) == source])])
    return table(headers, rows)


def timeline(samples: list[Sample], truth: dict[int, dict], drop_at: float) -> str:
    """Every prediction of the first two cases, seconds from the drop (the evidence behind the table)."""
    rows = []
    for case_id in sorted(truth)[:2]:
        row = truth[case_id]
        rows.append([case_id, "truth", "-", row["started_at"] - drop_at, row["completed_at"] - drop_at, ""])
        rows += [[case_id, s.kind, s.taken - drop_at, s.at - drop_at, "", s.basis[:70]]
                 for s in samples if s.case_id == case_id]
    return table(["case", "kind", "taken", "predicted", "completed", "basis"], rows)


def worst(samples: list[Sample], truth: dict[int, dict], drop_at: float, count: int = 4) -> str:
    """The ``count`` largest errors (default pace left out) with what they stood on."""
    found = [(s, e, kind) for kind in ("finish", "start") for s, e in errors(samples, truth, kind)
             if "default" not in s.basis]
    found.sort(key=lambda item: -abs(item[1]))
    return table(["kind", "case", "taken s", "error s", "basis"],
                 [[kind, s.case_id, s.taken - drop_at, e, s.basis[:80]] for s, e, kind in found[:count]],
                 title="largest errors with a known pace (seconds from the drop)")


def extra_args(parser) -> None:
    parser.add_argument("--verbose", action="store_true", help="print every prediction of two cases")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--depth", type=int, default=1, help="pueue depth of each GPU group (default 1)")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between two estimate() samples")


def main(argv=None) -> int:
    args = common.bench_args(__doc__.splitlines()[0], argv, extra_args)
    cases = 6 if args.quick else args.cases
    print(common.machine_line())
    groups = {name: {**spec, "depth": args.depth} for name, spec in common.groups_of(GPUS).items()}
    with Workspace("eta", groups=groups, keep=args.keep) as ws:
        staged = [make_case(ws.staging, f"plan_{i:02d}", atomic=True, marker=common.READY_MARKER,
                            seconds=RUN_SECONDS[i % len(RUN_SECONDS)], batches=10, seed=i) for i in range(cases)]
        ws.start_system()
        common.wait_until(lambda: ws.count("SELECT COUNT(*) FROM workers") >= 4, timeout=60, what="worker heartbeats")
        drop_at = common.drop(staged, ws.watch)
        samples = sample_until_done(ws, cases, args.every, timeout=120 + cases * 30)
        rows = ws.case_rows()
        truth = {r["case_id"]: r for r in rows}
        print(f"ETA accuracy: {cases} cases of {'/'.join(f'{s:g}' for s in RUN_SECONDS)} s (10 progress lines each)"
              f" on {GPUS} GPUs, pueue depth {args.depth}; {len(samples)} predictions sampled every {args.every:g} s;"
              f" {common.cadence(ws.config)}")
        print(f"outcomes: {', '.join(sorted({r['outcome'] or '-' for r in rows}))};"
              f" wall {max(r['completed_at'] for r in rows) - drop_at:.1f} s")
        print(report(samples, truth))
        print(worst(samples, truth, drop_at))
        if args.verbose:
            print(timeline(samples, truth, drop_at))
    print(common.machine_line("end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
