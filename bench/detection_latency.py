"""Detection latency: from the last write in a drop folder to its ``submitted`` row.

The real scanner process runs alone (``python -m workers.scanner --config C``, watchdog
doorbell included) with the product's rescan interval (10 s), so a short latency can only
come from the doorbell. Realistic cases are written file by file into the drop folder
(like a copy from the planning PC), a second or so apart so the scanner is idle between
them. Latency = ``cases.submitted_at`` minus the newest mtime of any file of the case:
with the ready marker (written last), and without it (the folder must stay unchanged for
the quiescence period: 2 s, and the product default 5 s).

    .venv/bin/python bench/detection_latency.py [--quick]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.common import Workspace, median, table  # noqa: E402
from sandbox.casegen import make_realistic_case  # noqa: E402

RESCAN_SECONDS = 10.0  # the product default: without the doorbell a drop waits up to this long
IDLE_BETWEEN_CASES = 1.2


def scenario(ws: Workspace, label: str, quiescence: float, marker: bool, count: int) -> dict:
    ws.rewrite_config(scanner={"quiescence_period_seconds": quiescence, "ready_marker": common.READY_MARKER,
                               "rescan_interval_seconds": RESCAN_SECONDS})
    proc = ws.start_worker("workers.scanner")
    try:
        common.wait_until(lambda: ws.count("SELECT COUNT(*) FROM workers WHERE name = 'scanner'"
                                           " AND pid = ?", proc.pid), timeout=60, what="scanner heartbeat")
        latencies, filed = [], []
        for index in range(count):
            time.sleep(IDLE_BETWEEN_CASES)  # the scanner goes back to its 10 s idle wait
            name = f"{label}_{index}"
            make_realistic_case(ws.watch, name, marker=common.READY_MARKER if marker else None, seed=index)
            row = common.wait_until(lambda: _row(ws, name), timeout=60 + quiescence, interval=0.02,
                                    what=f"{name} registered")
            folder = Path(row["case_path"])
            written = common.last_write(folder)
            latencies.append(row["submitted_at"] - written)
            filed.append(folder.stat().st_ctime - written)
    finally:
        ws.stop_worker(proc)
    return {"label": label, "quiescence": quiescence, "marker": marker, "count": count,
            "median": median(latencies), "worst": max(latencies), "best": min(latencies),
            "filed_median": median(filed), "filed_worst": max(filed)}


def _row(ws: Workspace, name: str) -> dict | None:
    conn = ws.db()
    try:
        row = conn.execute("SELECT submitted_at, case_path, spool_stage FROM cases WHERE case_name = ?",
                           (name,)).fetchone()
        return dict(row) if row is not None and row["spool_stage"] != "incoming" else None
    finally:
        conn.close()


def main(argv=None) -> int:
    args = common.bench_args(__doc__.splitlines()[0], argv)
    count = 3 if args.quick else 8
    print(common.machine_line())
    with Workspace("detect", groups=common.groups_of(1), keep=args.keep) as ws:
        results = [scenario(ws, "marker", 2.0, True, count), scenario(ws, "quiet2", 2.0, False, count)]
        if not args.quick:
            results.append(scenario(ws, "quiet5", 5.0, False, count))
    print()
    print(f"Detection latency: last file write -> submitted row (realistic cases written file by file;"
          f" scanner.rescan_interval_seconds={RESCAN_SECONDS:g})")
    print(table(["ready by", "quiescence s", "cases", "row: median s", "best s", "worst s",
                 "median minus quiescence s", "in spool: median s", "worst s"],
                [["_CASE_READY marker" if r["marker"] else "quiescence", r["quiescence"], r["count"], r["median"],
                  r["best"], r["worst"], None if r["marker"] else r["median"] - r["quiescence"],
                  r["filed_median"], r["filed_worst"]] for r in results]))
    print("row: cases.submitted_at (the clock reading at the start of the scanner pass that registered it, so a"
          " pass that began\njust before the marker was written shows a few ms below zero); in spool: the ctime of"
          " the folder renamed into\nspool/queued right after the row was committed.")
    print(common.machine_line("end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
