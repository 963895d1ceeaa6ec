"""GPU telemetry cost: remote calls per host per interval, and the poller's pass time with a slow nvidia-smi.

One sandbox HPC (sshd + pueue stand-in + nvidia-smi stand-in, two GPUs), two cases running
(long fake simulations), everything in this process as in the poller: the poller's
``tick`` in the main thread and the telemetry loop (``shared.gpus.tick`` via
``start_helper_loop``, thread ``poller-gpus``) beside it, sharing the host's ssh connection.

1. Calls: the telemetry loop runs alone for a while; every remote call of its thread is
   counted (one per probe: clock, both queries and the owners, in one ``sh -c``).
2. Pass time: poller passes back to back, (a) telemetry off (baseline), (b) telemetry on
   with nvidia-smi answering at once, (c) telemetry on with an nvidia-smi that takes 5 s
   per query (the stand-in's ``hang 5``: a probe takes about 10 s). Printed side by side,
   with what one probe costs when it sits in line with the poller (its own duration).

    .venv/bin/python bench/gpu_telemetry.py [--quick]
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (READY_MARKER, Workspace, bench_args, groups_of, machine_line, median,  # noqa: E402
                          percentile, table)
from sandbox import waiting  # noqa: E402
from sandbox.casegen import make_case  # noqa: E402
from shared import gpus  # noqa: E402
from shared.states import CaseStatus  # noqa: E402
from shared.store import cases_with_status  # noqa: E402
from shared.worker import build_context, start_helper_loop  # noqa: E402
from workers import poller, scanner, submitter  # noqa: E402

TELEMETRY_THREAD = "poller-gpus"
SLOW_SECONDS = 5


def count_calls(ctx) -> Counter:
    """Count every remote call per (thread, host) from now on (wraps each host's runner)."""
    calls: Counter = Counter()
    for host in ctx.hosts.values():
        run = host.remote.run

        def counted(argv, *args, _run=run, _host=host.name, **kwargs):
            calls[(threading.current_thread().name, _host)] += 1
            return _run(argv, *args, **kwargs)
        host.remote.run = counted
    return calls


def start_running_cases(ws: Workspace, count: int) -> None:
    ctx = build_context(ws.config, "bench-setup")
    for i in range(count):
        make_case(ws.watch, f"long_{i}", seconds=3600, batches=3600, atomic=True, marker=READY_MARKER)
    waiting.wait_until(lambda: scanner.tick(ctx, time.time()) >= 0 and
                       len(cases_with_status(ctx.conn, CaseStatus.SUBMITTED)) == count, timeout=60,
                       message="cases registered")
    waiting.wait_until(lambda: submitter.tick(ctx, time.time()) >= 0 and
                       len(cases_with_status(ctx.conn, CaseStatus.RUNNING)) == count, timeout=120,
                       message="cases running")
    ctx.conn.close()


def stop_helpers(ctx) -> None:
    ctx.stop.set()
    for thread in ctx.memory.helper_threads:
        thread.join(timeout=60)


def measure_calls(ws: Workspace, seconds: float) -> list[list]:
    ctx = build_context(ws.config, "poller")
    calls = count_calls(ctx)
    start_helper_loop(ctx, TELEMETRY_THREAD, gpus.tick)
    started = time.monotonic()
    time.sleep(seconds)
    stop_helpers(ctx)
    elapsed = time.monotonic() - started
    interval = ws.config.gpus.interval_seconds
    return [[host, calls[(TELEMETRY_THREAD, host)], f"{elapsed:.0f}", interval,
             round(calls[(TELEMETRY_THREAD, host)] / (elapsed / interval), 2)] for host in ctx.hosts]


def poller_passes(ws: Workspace, passes: int, telemetry: bool) -> tuple[list[float], int]:
    """Pass times of ``passes`` poller ticks (paced like the worker), and the probes done meanwhile."""
    ctx = build_context(ws.config, "poller")
    calls = count_calls(ctx)
    if telemetry:
        start_helper_loop(ctx, TELEMETRY_THREAD, gpus.tick)
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        poller.tick(ctx, time.time())
        times.append(time.perf_counter() - started)
        time.sleep(ws.config.main_loop.poll_interval_seconds)
    stop_helpers(ctx)
    return times, sum(n for (thread, _), n in calls.items() if thread == TELEMETRY_THREAD)


def one_probe_seconds(ws: Workspace) -> float:
    ctx = build_context(ws.config, "bench-probe")
    host = next(iter(ctx.hosts.values()))
    started = time.perf_counter()
    gpus.probe_host(ctx, host, time.time())
    return time.perf_counter() - started


def main(argv=None) -> int:
    args = bench_args(__doc__.splitlines()[0], argv)
    interval = 2.0 if args.quick else 10.0
    call_seconds, passes = (12, 20) if args.quick else (60, 60)
    print(machine_line())
    with Workspace("gpus", groups=groups_of(2), keep=args.keep,
                   gpus={"interval_seconds": interval}) as ws:
        start_running_cases(ws, 2)
        print(table(["host", "telemetry calls", "seconds", "interval s", "calls per interval"],
                    measure_calls(ws, call_seconds), title="1. Remote calls of the telemetry loop"))
        rows = []
        for label, telemetry, slow in (("telemetry off (baseline)", False, 0), ("telemetry on", True, 0),
                                       (f"telemetry on, nvidia-smi {SLOW_SECONDS} s per query", True, SLOW_SECONDS)):
            ws.sandbox.gpus("hang", str(slow))
            probe = one_probe_seconds(ws) if telemetry else float("nan")
            times, probes = poller_passes(ws, passes, telemetry)
            rows.append([label, len(times), probes, probe, median(times), percentile(times, 95), max(times)])
        ws.sandbox.gpus("hang", "0")
        print()
        print(table(["poller passes", "passes", "probes meanwhile", "one probe s", "median s", "p95 s", "max s"],
                    rows, title="2. Poller pass time (2 running cases) beside the telemetry loop"))
    print(machine_line("end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
