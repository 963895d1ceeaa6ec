"""Shared helpers of the benchmarks: a scratch sandbox HPC, the system under supervisord, counters.

Every benchmark runs against the sandbox HPC (a real sshd on 127.0.0.1 and the pueue
stand-in) in a scratch folder under /tmp that is removed at the end (``--keep`` keeps it).
Nothing here tunes the system: the config is the sandbox's, with the product defaults of
``main_loop`` unless a benchmark says otherwise in its table.

    with Workspace("gap", groups=three_groups()) as ws:
        ws.start_system()                       # supervisord with the project's own conf
        drop(stage_cases(...), ws.watch)
        wait_until(lambda: ws.count_final() == 30, timeout=300)
        print(table(["x", "y"], [[1, 2]]))
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sandbox import hpc as sandbox_hpc  # noqa: E402
from sandbox import waiting  # noqa: E402
from sandbox.slurm import SandboxSlurm  # noqa: E402
from sandbox.sshd import free_port  # noqa: E402
from shared.backends import model, pueue_parse  # noqa: E402
from shared.config import Config, MainLoopConfig, load_config  # noqa: E402
from shared.db import connect  # noqa: E402

VENV = Path(sys.prefix)
READY_MARKER = "_CASE_READY"
WORKERS = ("scanner", "submitter", "poller", "reaper", "exporter")
# The sandbox config shortens the loops; benchmarks measure a stock install's cadence instead.
PRODUCT_MAIN_LOOP = {f.name: f.default for f in dataclasses.fields(MainLoopConfig) if f.name.endswith("interval_seconds")}


# -- command line and output ---------------------------------------------------------------------

def bench_args(description: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """``--quick`` (a smoke run of a few seconds to a minute) and ``--keep`` (keep the scratch folder)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small smoke-test variant")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder for inspection")
    if extra:
        extra(parser)
    return parser.parse_args(argv)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], title: str | None = None) -> str:
    """A plain-text table: columns padded to their widest cell, numbers right-aligned."""
    cells = [[fmt(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    numeric = [all(_numeric(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line([str(h) for h in headers]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "", 1).lstrip("-").replace("x", "").replace("%", "").isdigit() \
        or text == "-"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def machine_line(when: str = "start") -> str:
    """Cores, load averages (1/5 min) and time: the machine is shared, so every table says how busy it was."""
    load = os.getloadavg()
    return (f"machine at {when}: {os.cpu_count()} cores, load {load[0]:.2f}/{load[1]:.2f}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}, python {sys.version.split()[0]}")


# -- load beside a run ------------------------------------------------------------------------------

# A busy loop that also ends when its parent is gone: a bench killed with SIGKILL leaves no spinner.
SPINNER = ("import os, sys\nparent = int(sys.argv[1])\n"
           "while os.getppid() == parent:\n    for _ in range(200_000):\n        pass\n")


@contextlib.contextmanager
def cpu_load(count: int) -> Iterator[list[int]]:
    """``count`` CPU-bound processes for the ``with`` block (their pids); always stopped after it.

    Each spins until it is killed here (on leaving the block, also after Ctrl-C or an
    exception) or its parent, this process, is gone (checked every few milliseconds).
    """
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", SPINNER, str(os.getpid())],
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait()


def exit_on_sigterm() -> None:
    """Make SIGTERM end the bench like Ctrl-C does: through its ``finally`` blocks (load stopped,
    workers and sandbox shut down). A bench started in the background ignores SIGINT."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)


# -- waiting ---------------------------------------------------------------------------------------

Timeout = TimeoutError


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.05,
               what: str = "condition") -> object:
    """Poll ``condition`` until truthy; raise Timeout after ``timeout`` seconds."""
    return waiting.wait_until(condition, timeout, interval, what)


# -- the sandbox and the system ----------------------------------------------------------------------

def groups_of(count: int) -> dict[str, dict]:
    """``count`` GPU groups ``gpu_0 .. gpu_<n-1>``, one GPU each."""
    return {f"gpu_{i}": {"gpu": i} for i in range(count)}


class Supervisor:
    """supervisord with the project's own supervisord.conf, from a scratch copy of the layout."""

    def __init__(self, home: Path, config_path: Path):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "supervisord.conf", home / "supervisord.conf")
        if not (home / ".venv").exists():
            (home / ".venv").symlink_to(VENV)
        for sub in ("run", "logs"):
            (home / sub).mkdir(exist_ok=True)
        self.env = {**os.environ, "MQIC_CONFIG": str(config_path)}
        self.running = False

    def start(self) -> None:
        subprocess.run([str(VENV / "bin" / "supervisord"), "-c", str(self.home / "supervisord.conf")],
                       check=True, env=self.env, cwd=self.home, timeout=30)
        self.running = True

    def ctl(self, *args: str) -> str:
        result = subprocess.run([str(VENV / "bin" / "supervisorctl"), "-c", str(self.home / "supervisord.conf"),
                                 *args], capture_output=True, text=True, env=self.env, cwd=self.home, timeout=120)
        return result.stdout + result.stderr

    def pids(self) -> dict[str, int]:
        """{program: pid} of the running workers."""
        found = {}
        for name in WORKERS:
            text = self.ctl("pid", f"mqic:{name}").strip()
            if text.isdigit() and int(text) > 0:
                found[name] = int(text)
        return found

    def wait_running(self, timeout: float = 30) -> dict[str, int]:
        return wait_until(lambda: (p := self.pids()) and len(p) == len(WORKERS) and p, timeout,
                          interval=0.3, what="every worker RUNNING")

    def shutdown(self) -> None:
        if not self.running:
            return
        self.ctl("shutdown")
        pid_file = self.home / "run" / "supervisord.pid"
        wait_until(lambda: not pid_file.exists(), timeout=120, interval=0.2, what="supervisord exit")
        self.running = False


class Workspace:
    """A scratch folder with its own sandbox HPC (sshd + pueue stand-in, or Slurm) and config.

    ``sections`` override config sections (``main_loop``, ``scanner``, ``hpc`` ...). The
    product's ``main_loop.interval_seconds`` default is used unless overridden, so the
    figures are those of a stock install, not of the faster sandbox setting.

    ``slurm`` (the ``sandbox.slurm.SandboxSlurm`` settings, e.g. ``{"gpus": 3}``) runs a
    real single-node Slurm instead of the stand-in, with ``partitions`` as the slots.

    ``second_groups``: a second pueue host (``gpu2``, with these groups; the first is then
    ``gpu1``). ``login_delays``: {host name: seconds} every remote command on that host
    waits first (a slow login node; the one host alone is named ``hpc``).
    """

    def __init__(self, name: str, *, groups: dict | None = None, keep: bool = False,
                 slurm: dict | None = None, partitions: dict | None = None, second_groups: dict | None = None,
                 login_delays: dict[str, float] | None = None, **sections: dict):
        self.name, self.keep, self.uses_slurm = name, keep, slurm is not None
        self.root = Path(tempfile.mkdtemp(prefix=f"mqic-bench-{name}-", dir="/tmp"))
        sections = {key: dict(value) for key, value in sections.items()}
        sections["main_loop"] = {**PRODUCT_MAIN_LOOP, **sections.get("main_loop", {})}
        sections.setdefault("metrics", {"port": free_port()})
        self.supervisor: Supervisor | None = None
        self.processes: list[subprocess.Popen] = []
        hosts = {"login_delays": login_delays}
        if second_groups is not None:
            hosts |= {"second_host": "pueue", "second_groups": second_groups}
        try:
            self.sandbox = self._sandbox_up(groups, slurm, partitions, sections | hosts)
        except BaseException:
            sandbox_hpc.down(self.root / "hpc")
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _sandbox_up(self, groups: dict | None, slurm: dict | None, partitions: dict | None,
                    sections: dict) -> sandbox_hpc.Sandbox:
        hpc_root = self.root / "hpc"
        if slurm is None:
            return sandbox_hpc.up(hpc_root, groups=groups or groups_of(3), **sections)
        # Started here with our settings; sandbox_hpc.up re-attaches to it (a running cluster keeps them).
        SandboxSlurm(hpc_root / "slurm", **slurm).start()
        return sandbox_hpc.up(hpc_root, slurm=True, partitions=partitions, **sections)

    def slurm(self) -> SandboxSlurm:
        """The workspace's Slurm cluster (only with ``slurm=``), to run client commands locally."""
        return SandboxSlurm.from_state(self.root / "hpc" / "slurm")

    # -- context manager
    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- config
    @property
    def config_path(self) -> Path:
        return self.sandbox.config_path

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    def rewrite_config(self, **sections: dict) -> None:
        """Change config sections in place (before the workers start)."""
        data = yaml.safe_load(self.config_path.read_text())
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))

    @property
    def watch(self) -> Path:
        return self.config.scanner.watch_path

    @property
    def staging(self) -> Path:
        path = self.root / "staging"
        path.mkdir(exist_ok=True)
        return path

    @property
    def db_path(self) -> Path:
        return self.config.database_path

    @property
    def sshd_log(self) -> Path:
        return self.root / "hpc" / "sshd" / "sshd.log"

    @property
    def sshd_pid(self) -> int:
        """The sandbox sshd's listener: every remote command's session descends from it."""
        return int((self.root / "hpc" / "sshd" / "sshd.pid").read_text().split()[0])

    def ssh_argv(self, *, fresh: bool = True) -> list[str]:
        """ssh argv ending in user@host: a fresh connection (no ControlMaster) by default."""
        argv = self.sandbox.endpoint.ssh_base_argv()
        mux = ["-o", "ControlMaster=no", "-o", "ControlPath=none"] if fresh else []
        return [argv[0], *mux, *argv[1:]]

    # -- processes
    def start_system(self) -> Supervisor:
        """Every worker under supervisord (the project's supervisord.conf), started now."""
        self.supervisor = Supervisor(self.root / "home", self.config_path)
        self.supervisor.start()
        return self.supervisor

    def start_worker(self, module: str) -> subprocess.Popen:
        """One worker as a plain process (``python -m workers.X --config C``)."""
        log = open(self.root / f"{module.rsplit('.', 1)[-1]}.out", "ab")
        proc = subprocess.Popen([sys.executable, "-m", module, "--config", str(self.config_path)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.processes.append(proc)
        return proc

    def stop_worker(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        try:
            if self.supervisor:
                self.supervisor.shutdown()
            for proc in self.processes:
                self.stop_worker(proc)
        finally:
            try:
                from shared.remote import Remote
                for host in self.config.hosts:
                    Remote(host.hpc).close()
                    if host.hpc.control_dir:
                        shutil.rmtree(host.hpc.control_dir, ignore_errors=True)
            except Exception:  # noqa: BLE001 - teardown goes on
                pass
            sandbox_hpc.down(self.root / "hpc")
            if self.keep:
                print(f"(scratch folder kept: {self.root})")
            else:
                shutil.rmtree(self.root, ignore_errors=True)

    # -- database
    def db(self) -> sqlite3.Connection:
        """A read-only connection (waits until a worker created the database)."""
        wait_until(self.db_path.exists, timeout=60, what="the database")
        conn = connect(self.db_path, readonly=True)
        return conn

    def count(self, sql: str, *params: object) -> int:
        conn = self.db()
        try:
            return conn.execute(sql, params).fetchone()[0]
        except sqlite3.OperationalError:
            return 0  # schema not there yet
        finally:
            conn.close()

    def count_final(self) -> int:
        return self.count("SELECT COUNT(*) FROM cases WHERE status IN ('completed', 'failed')")

    def case_rows(self) -> list[dict]:
        conn = self.db()
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM cases ORDER BY case_id")]
        finally:
            conn.close()

    # -- pueue
    def snapshot(self) -> model.Snapshot:
        """Everything the stand-in knows, read locally (not counted as a remote call)."""
        return pueue_parse.parse_status(self.sandbox.pueue_cli("status", "--json").stdout)

    def install_pueue_counter(self) -> Path:
        """Point ``hpc.pueue_command`` at a wrapper that logs each subcommand; return the log."""
        counts = self.root / "pueue-calls.log"
        wrapper = self.root / "hpc" / "bin" / "pueue-counted"
        wrapper.write_text(f"#!/bin/sh\necho \"$1\" >> {_sh(counts)}\nexec {_sh(self.sandbox.pueue)} \"$@\"\n")
        wrapper.chmod(0o755)
        self.rewrite_config(hpc={"pueue_command": _sh(wrapper)})
        return counts


def cadence(config: Config) -> str:
    """The loop settings a figure depends on, for the table titles."""
    loop = dataclasses.asdict(config.main_loop)
    return ", ".join(f"main_loop.{k}={v:g}" for k, v in loop.items() if k.endswith("interval_seconds"))


def _sh(path: Path) -> str:
    import shlex
    return shlex.quote(str(path))


def pueue_call_counts(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    if log.exists():
        for word in log.read_text().split():
            counts[word] = counts.get(word, 0) + 1
    return counts


# -- the sshd log: connections and sessions ----------------------------------------------------------

@dataclass(frozen=True)
class SshdCounts:
    connections: int  # "Accepted publickey": a new ssh connection (key exchange + auth)
    sessions: int     # "Starting session:": one remote command, scp/sftp transfer or shell

    def __sub__(self, other: "SshdCounts") -> "SshdCounts":
        return SshdCounts(self.connections - other.connections, self.sessions - other.sessions)


def sshd_counts(log: Path) -> SshdCounts:
    """Count connections and sessions in the sandbox sshd's VERBOSE log so far."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return SshdCounts(connections=text.count("Accepted publickey for"),
                      sessions=text.count("Starting session:"))


# -- cases -----------------------------------------------------------------------------------------

def stage_cases(staging: Path, names: Sequence[str], maker: Callable[..., Path], **options) -> list[Path]:
    """Build case folders (each atomically, with the ready marker) in a staging folder."""
    return [maker(staging, name, atomic=True, marker=READY_MARKER, **options) for name in names]


def drop(folders: Sequence[Path], watch: Path) -> float:
    """Rename staged case folders into the drop folder (same file system: each one atomic)."""
    start = time.time()
    for folder in folders:
        os.rename(folder, watch / folder.name)
    return start


def last_write(folder: Path) -> float:
    """The newest mtime of any regular file under ``folder``."""
    newest = 0.0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
    return newest


# -- pueue timings -----------------------------------------------------------------------------------

def gaps_per_group(tasks: Iterable[model.TaskInfo]) -> dict[str, list[float]]:
    """Seconds between one task's end and the next task's start, per group."""
    by_group: dict[str, list[model.TaskInfo]] = {}
    for task in tasks:
        if task.start is not None and task.end is not None:
            by_group.setdefault(task.group, []).append(task)
    gaps = {}
    for group, items in by_group.items():
        items.sort(key=lambda t: t.start)
        gaps[group] = [(b.start - a.end).total_seconds() for a, b in zip(items, items[1:])]
    return gaps


def run_seconds(tasks: Iterable[model.TaskInfo]) -> list[float]:
    return [(t.end - t.start).total_seconds() for t in tasks if t.start and t.end]


# -- processes -------------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process_table() -> dict[int, tuple[int, float, str]]:
    """Every process now: pid -> (parent pid, CPU seconds of it and of the children it reaped, command line)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it ended meanwhile
        used = sum(int(value) for value in fields[11:15]) / CLOCK_TICKS
        table[int(entry.name)] = (int(fields[1]), used, command)
    return table


def _tree_seconds(table: dict[int, tuple[int, float, str]], roots: Iterable[int]) -> float:
    """CPU seconds of ``roots`` and every live descendant (the ended ones are in their parents' share)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _used, _command) in table.items():
        children.setdefault(parent, []).append(pid)
    total, todo, seen = 0.0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        total += table[pid][1]
        todo += children.get(pid, [])
    return total


class CpuMeter:
    """CPU seconds each side of a run spends: the sandbox HPC (its sshd, so every remote command with
    its login shell, and the scheduler's daemon with its tasks) and the workstation (the workers
    under supervisord with their ssh clients, and the shared ssh connections they started).

    On this machine both sides share its cores, so the sum per case bounds the rate: ``cores /
    seconds per case`` cases per second at most, whatever the design does with its time.
    """

    def __init__(self, ws: "Workspace"):
        self.ws = ws
        self.start: dict[str, float] = {}

    def read(self) -> dict[str, float]:
        ws, table = self.ws, _process_table()
        sshd = ws.sshd_pid
        daemon = [int(ws.sandbox.ctl("pid").strip())] if not ws.uses_slurm else []
        workers = list(ws.supervisor.pids().values()) if ws.supervisor else []
        masters = [pid for pid, (_p, _u, command) in table.items()
                   if "ControlMaster=yes" in command and str(ws.root) in command]
        return {"hpc: remote commands (sshd: logins, pueue clients, transfers)": _tree_seconds(table, [sshd]),
                "hpc: the scheduler's daemon and its tasks": _tree_seconds(table, daemon),
                "workstation: our workers and their ssh": _tree_seconds(table, workers),
                "workstation: shared ssh connections": _tree_seconds(table, masters)}

    def __enter__(self) -> "CpuMeter":
        self.start = self.read()
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = {key: value - self.start.get(key, 0.0) for key, value in self.read().items()}


def login_cpu_seconds(ws: "Workspace", samples: int = 5) -> float:
    """CPU seconds the sandbox HPC spends on one remote ``true`` over the shared connection:
    its login shell (root's ~/.bashrc runs ``pyenv init``, as a cluster login runs ``module``)."""
    from shared.remote import Remote
    remote = Remote(ws.config.hosts[0].hpc)
    remote.ensure_master()
    sshd = ws.sshd_pid
    before = _tree_seconds(_process_table(), [sshd])
    for _ in range(samples):
        remote.run(["true"])
    time.sleep(0.2)  # the session's process reaps its shell
    return (_tree_seconds(_process_table(), [sshd]) - before) / samples


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def voluntary_switches(pid: int) -> int:
    """Voluntary context switches summed over every thread (each is one wake-up after a wait)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
        except OSError:
            continue  # the thread ended meanwhile
    return total


def timed(func: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = func()
    return time.perf_counter() - start, value


def remote_shell_cost(ws: Workspace, samples: int = 5) -> tuple[float, float]:
    """(seconds for one remote ``true`` over the shared connection, seconds for a fresh connection).

    On this machine most of it is the remote login shell reading root's ~/.bashrc; a real
    HPC login (module or conda init) costs the same kind of time on every remote command.
    """
    from shared.remote import Remote
    remote = Remote(ws.config.hosts[0].hpc)
    remote.ensure_master()
    mux = [timed(lambda: remote.run(["true"]))[0] for _ in range(samples)]
    fresh = [timed(lambda: subprocess.run([*ws.ssh_argv(fresh=True), "true"], check=True,
                                          capture_output=True))[0] for _ in range(samples)]
    return median(mux), median(fresh)
