"""Web dashboard cost with 100,000 cases (issue 18).

1. Server time of the overview, filtered case lists and a case page: each request through the
   whole Flask application (routing, the queries, rendering), in process, with the one-second
   snapshot cache off, so every request pays for its queries. Median and worst of 20.
2. The query plans of the case list (EXPLAIN QUERY PLAN), to show which index answers each filter.
3. CPU of 20 live browsers on an idle system: the real program (``python -m console.web.server`` under
   waitress) serves 20 clients that each fetch ``/part/overview`` every 2 s, as ``app.js`` does;
   we read the server's CPU seconds (utime+stime of /proc/<pid>/stat) over the window.

    .venv/bin/python bench/web_cost.py [--quick] [--window SECONDS] [--cases N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from werkzeug.datastructures import MultiDict  # noqa: E402

from bench.monitor_cost import seed  # noqa: E402
from sandbox.sshd import free_port  # noqa: E402
from shared import queries  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.db import connect  # noqa: E402
from console.web.app import create_app, case_filter  # noqa: E402
from console.web.guard import guard_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 20
POLL_SECONDS = 2.0
PAGES = [("overview `/`", "/"), ("overview live part `/part/overview`", "/part/overview"),
         ("cases, newest 50 `/cases`", "/cases"),
         ("cases `?status=failed`", "/cases?status=failed"),
         ("cases `?status=completed&review=no&sort=oldest`", "/cases?status=completed&review=no&sort=oldest"),
         ("cases `?outcome=failed&review=yes`", "/cases?outcome=failed&review=yes"),
         ("cases, name search `?q=498.77`", "/cases?q=498.77"),
         ("cases, page 1,000 by cursor", "/cases?cursor=50000"),
         ("a case page `/cases/<id>`", "/cases/{mid}"), ("`/api/cases?status=failed`", "/api/cases?status=failed"),
         ("`/api/cases/<id>`", "/api/cases/{mid}"), ("`/api/health`", "/api/health")]


def write_config(root: Path, port: int, cache_seconds: float) -> Path:
    data = {"root_dir": str(root), "scanner": {"watch_path": "incoming"},
            "hpc": {"host": "127.0.0.1", "user": "nobody", "identity_file": "keys/id",
                    "known_hosts_file": "keys/known_hosts", "remote_base_dir": "/tmp/mqic-bench-remote"},
            "pueue": {"groups": {"gpu_0": {"gpu": 0}, "gpu_1": {"gpu": 1}, "gpu_2": {"gpu": 2}}},
            "database": {"path": "db/state.db"}, "spool": {"path": "spool"},
            "logging": {"file": "logs/web.log", "json_stdout": False},
            "web": {"listen": f"127.0.0.1:{port}", "cache_seconds": cache_seconds}}
    path = root / f"config-{cache_seconds:g}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def server_times(config_path: Path, count: int) -> list[list]:
    config = load_config(config_path)
    client = create_app(config, guard_for(config.web)).test_client()
    mid = count // 2
    rows = []
    for label, url in PAGES:
        url = url.format(mid=mid)
        client.get(url)  # warm the page cache of SQLite and Jinja's template cache
        runs = []
        for _ in range(20):
            start = time.perf_counter()
            answer = client.get(url)
            runs.append(time.perf_counter() - start)
            assert answer.status_code in (200, 503), (url, answer.status_code)
        rows.append([label, statistics.median(runs) * 1000, max(runs) * 1000])
    return rows


def plan_of(conn, sql: str, params: list) -> str:
    return "; ".join(r["detail"] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


def query_plans(config_path: Path) -> list[tuple[str, str]]:
    config = load_config(config_path)
    conn = connect(config.database_path, readonly=True)
    plans = []
    for args in ({}, {"status": "failed"}, {"outcome": "failed", "review": "yes"}, {"q": "498.77"}):
        wanted = case_filter(MultiDict(args))
        detail, counted = (plan_of(conn, *statement) for statement in (queries.search_page_sql(wanted),
                                                                          queries.search_count_sql(wanted)))
        plans.append((str(args or "(none)"), f"page: {detail} | count: {counted}"))
    conn.close()
    return plans


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def poll(url: str, stop: threading.Event, offset: float, counts: list[int]) -> None:
    stop.wait(offset)
    while not stop.is_set():
        with urllib.request.urlopen(url, timeout=10) as answer:
            answer.read()
        counts.append(1)
        stop.wait(POLL_SECONDS)


def live_browsers_cpu(config_path: Path, port: int, window: float) -> tuple[float, int, float]:
    """(server CPU seconds, requests answered, window) for CLIENTS pollers of the real program."""
    server = subprocess.Popen([sys.executable, "-m", "console.web.server", "--config", str(config_path)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/part/overview", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        stop, counts = threading.Event(), []
        threads = [threading.Thread(target=poll, args=(base + "/part/overview", stop, i * POLL_SECONDS / CLIENTS,
                                                       counts), daemon=True) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(POLL_SECONDS)  # every client has started
        before, started, answered = cpu_seconds(server.pid), time.monotonic(), len(counts)
        time.sleep(window)
        used, elapsed, answered = cpu_seconds(server.pid) - before, time.monotonic() - started, len(counts) - answered
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        return used, answered, elapsed
    finally:
        server.terminate()
        server.wait(timeout=15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases (20,000) and a 10 s window")
    parser.add_argument("--window", type=float, help="CPU window in seconds (default 60, quick 10)")
    parser.add_argument("--cases", type=int, help="cases in the database (default 100,000)")
    args = parser.parse_args()
    count = args.cases or (20_000 if args.quick else 100_000)
    window = args.window or (10.0 if args.quick else 60.0)
    root = Path(tempfile.mkdtemp(prefix="mqic-web-bench-"))
    try:
        port = free_port()
        uncached = write_config(root, port, 0)
        cached = write_config(root, port, 1)
        seeded = seed(load_config(uncached).database_path, count, active=True)
        print(f"{count:,} cases seeded in {seeded:.1f} s; load average {os.getloadavg()[0]:.2f}\n")
        print(f"{'request (cache off: every request runs its queries)':<58} {'median ms':>10} {'worst ms':>9}")
        for label, median_ms, worst_ms in server_times(uncached, count):
            print(f"{label:<58} {median_ms:>10.1f} {worst_ms:>9.1f}")
        print("\nquery plans of the case list (newest first, 50 a page):")
        for args_text, plan in query_plans(uncached):
            print(f"  {args_text:<40} {plan}")
        used, answered, elapsed = live_browsers_cpu(cached, port, window)
        print(f"\n{CLIENTS} live browsers (each /part/overview every {POLL_SECONDS:g} s) for {elapsed:.0f} s: "
              f"{answered} answers, server CPU {used:.2f} s = {100 * used / elapsed:.1f} % of one core; "
              f"load average {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
