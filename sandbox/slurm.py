"""A real single-node Slurm on 127.0.0.1 (Debian 12's slurm-wlm 22.05 and munge), in one folder.

Everything lives under ``root``; nothing in /etc, /run or /var is used, and the ports are
chosen free once and kept in ``state.json``, so several sandboxes can run side by side and
beside a real Slurm on the same machine::

    etc/slurm.conf gres.conf [slurmdbd.conf]   the cluster's configuration (rewritten on start)
    munge/    key and seed of a private munged (its socket is in /tmp/mqic-slurm-munge-XXXX/:
              munged wants every folder above its socket open to all, which a test's tmp_path is not;
              slurmd's spool is there too, as job step sockets need a short path)
    state/ log/ run/                           slurmctld state, logs, pid files
    dev/gpu0..                                 fake GPU device files (gres needs a File= each)
    mysql/                                     MariaDB data for slurmdbd (accounting only)
    bin/      sbatch, squeue, ... wrappers that export SLURM_CONF (for commands run over ssh)
    env.sh    ``. env.sh`` gives a shell the same

Jobs run as root (slurmd must be root), with ``proctrack/linuxproc`` and ``task/none``: no
cgroups, no systemd. With ``accounting=True`` a private MariaDB and slurmdbd make ``sacct``
work; without it sacct says "Slurm accounting storage is disabled".

Usage::

    with SandboxSlurm(tmp_path / "slurm") as slurm:
        slurm.run(["sbatch", "--parsable", "--wrap", "true"])

or from a shell: ``python -m sandbox.slurm up|down|status --root DIR [--accounting]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from sandbox import procs
from shared.errors import MqicError

LOOPBACK = "127.0.0.1"
CLUSTER_NAME = "sandbox"
DAEMON_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
CLIENT_COMMANDS = ("sbatch", "squeue", "scancel", "sacct", "sacctmgr", "sinfo", "scontrol", "srun")
READY_NODE_STATES = frozenset({"idle", "mixed", "allocated", "completing"})
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.05
CLIENT_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 20
MUNGE_KEY_BYTES = 128
# Small InnoDB files: the data folder takes 34 MB instead of 114 MB and is made in 1 s, not 3 s.
MARIADB_SIZES = ("--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M")


class SandboxSlurmError(MqicError):
    """The sandbox Slurm could not be set up, started or found."""


@dataclass(frozen=True)
class SlurmSettings:
    """What the sandbox cluster looks like; kept in ``state.json`` with the ports."""

    accounting: bool = False
    cpus: int = 2
    gpus: int = 2
    partitions: tuple[str, ...] = ("debug", "gpu")
    min_job_age: int = 10      # seconds a finished job stays in squeue (Slurm's default: 300)
    kill_wait: int = 10        # seconds from TERM to KILL on cancel or time limit (default: 30)
    message_timeout: int = 10  # a client gives up on a dead slurmctld after this minus 1 s


@dataclass(frozen=True)
class Ports:
    slurmctld: int
    slurmd: int
    slurmdbd: int
    mariadb: int


@dataclass(frozen=True)
class SlurmEndpoint:
    """What a client needs: SLURM_CONF, or the wrappers in ``bin_dir`` that set it."""

    slurm_conf: Path
    bin_dir: Path
    accounting: bool
    partitions: tuple[str, ...]

    def env(self) -> dict[str, str]:
        """The variables a Slurm client command needs (add them to the current environment)."""
        return {"SLURM_CONF": str(self.slurm_conf)}

    def to_json_dict(self) -> dict[str, object]:
        return {key: str(value) if isinstance(value, Path) else value
                for key, value in asdict(self).items()}


@dataclass(frozen=True)
class _Layout:
    root: Path
    socket_dir: Path | None = None

    @property
    def munge_socket(self) -> Path:
        if self.socket_dir is None:
            raise SandboxSlurmError("the munge socket folder is not chosen yet")
        return self.socket_dir / "munge.socket.2"

    @property
    def spool_dir(self) -> Path:
        """slurmd's spool, in the short socket folder too: slurmstepd makes its sockets there
        (``<spool>/<node>_<job>.<step>``) and a Unix socket path holds at most 107 bytes, which a
        test's deep ``tmp_path`` exceeds (every job then fails to launch and is cancelled)."""
        if self.socket_dir is None:
            raise SandboxSlurmError("the socket folder is not chosen yet")
        return self.socket_dir / "spool"

    def __getattr__(self, name: str) -> Path:  # only for the names in _PATHS
        try:
            return self.root / _PATHS[name]
        except KeyError:
            raise AttributeError(name) from None

    def pid_file(self, daemon: str) -> Path:
        return self.root / "run" / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"


_PATHS = {
    "etc": "etc", "slurm_conf": "etc/slurm.conf", "gres_conf": "etc/gres.conf",
    "dbd_conf": "etc/slurmdbd.conf", "munge_dir": "munge", "munge_key": "munge/munge.key",
    "munge_seed": "munge/munged.seed",
    "state_dir": "state", "log_dir": "log", "run_dir": "run",
    "dev_dir": "dev", "mysql_dir": "mysql", "mysql_data": "mysql/data",
    "mysql_socket": "mysql/mysqld.sock", "bin_dir": "bin", "env_file": "env.sh",
    "state_file": "state.json",
}
_DIRS = ("etc", "munge_dir", "state_dir", "log_dir", "run_dir", "dev_dir", "bin_dir")


def missing_binaries(accounting: bool = False) -> list[str]:
    """The programs this sandbox needs that are not installed (empty when it can run)."""
    needed = ["slurmctld", "slurmd", "slurmstepd", "munged", "sbatch", "squeue", "sinfo"]
    if accounting:
        needed += ["slurmdbd", "mariadbd", "mariadb-install-db", "mariadb"]
    return [name for name in needed if _which(name) is None]


class SandboxSlurm:
    """One Slurm cluster (controller, one node, munge; slurmdbd and MariaDB with accounting).

    ``start()`` is idempotent and starts only what is not running (so a test can stop the
    controller with ``stop_daemon("slurmctld")`` and heal it with ``start()``); ``stop()``
    cancels every job, stops the daemons by their pid files (never by name) and kills any
    job process they left behind.
    """

    def __init__(self, root: Path, accounting: bool = False, *, cpus: int | None = None,
                 gpus: int = 2, partitions: Sequence[str] = ("debug", "gpu"),
                 min_job_age: int = 10, kill_wait: int = 10, message_timeout: int = 10):
        self._layout = _Layout(Path(root).resolve())
        self._requested = SlurmSettings(
            accounting=accounting, cpus=cpus or min(2, os.cpu_count() or 1), gpus=gpus,
            partitions=tuple(partitions), min_job_age=min_job_age, kill_wait=kill_wait,
            message_timeout=message_timeout,
        )
        self.settings, self.ports = self._requested, None
        self._mariadb: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    @classmethod
    def from_state(cls, root: Path) -> SandboxSlurm:
        """Re-attach to a sandbox started (maybe by another process) in ``root``."""
        sandbox = cls(root)
        state = sandbox._read_state()
        if state is None:
            raise SandboxSlurmError(f"no sandbox Slurm state in {sandbox._layout.root}")
        sandbox._requested, sandbox.ports, socket_dir = state
        sandbox.settings = sandbox._requested
        sandbox._layout = _Layout(sandbox._layout.root, socket_dir)
        return sandbox

    def __enter__(self) -> SandboxSlurm:
        try:
            self.start()
        except BaseException:
            self.stop()  # __exit__ will not run: leave no daemon behind
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def root(self) -> Path:
        return self._layout.root

    @property
    def endpoint(self) -> SlurmEndpoint:
        return SlurmEndpoint(slurm_conf=self._layout.slurm_conf, bin_dir=self._layout.bin_dir,
                             accounting=self.settings.accounting,
                             partitions=self.settings.partitions)

    # --- public actions ------------------------------------------------------------

    def start(self) -> SlurmEndpoint:
        """Start whatever is not running and wait until the node accepts jobs.

        Raises SandboxSlurmError (with the tail of the relevant log) when a program is
        missing, the user is not root, a port is taken or a daemon does not come up.
        """
        began = time.monotonic()
        self._check_can_run()
        self._load_or_choose_state()
        self._prepare_files()
        self._ensure_munged()
        if self.settings.accounting:
            self._ensure_mariadb()
            self._ensure_slurmdbd()
        self._ensure_daemon("slurmctld", [_binary("slurmctld"), "-f", str(self._layout.slurm_conf)])
        self._ensure_daemon("slurmd", [_binary("slurmd"), "-f", str(self._layout.slurm_conf)])
        self._wait_until_node_ready()
        self.startup_seconds = time.monotonic() - began
        return self.endpoint

    def stop(self, purge: bool = False) -> None:
        """Cancel every job, stop every daemon (TERM, then KILL), kill leftover job processes.

        With ``purge`` the whole folder is removed afterwards.
        """
        if self._is_ours("slurmctld"):
            self._cancel_all_jobs()
        for daemon in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            self.stop_daemon(daemon)
        self._kill_leftover_jobs()
        if self._layout.socket_dir is not None:
            shutil.rmtree(self._layout.socket_dir, ignore_errors=True)
        if purge:
            shutil.rmtree(self._layout.root, ignore_errors=True)

    def stop_daemon(self, daemon: str) -> None:
        """Stop one daemon of this sandbox (e.g. ``slurmctld`` to simulate a controller outage)."""
        pid = _read_pid(self._layout.pid_file(daemon))
        if pid is not None and self._is_ours(daemon):
            procs.signal_quietly(pid, signal.SIGTERM)
            if not self._wait_for_exit(pid, STOP_TIMEOUT_S):
                procs.signal_quietly(pid, signal.SIGKILL)
                self._wait_for_exit(pid, STOP_TIMEOUT_S)
        self._layout.pid_file(daemon).unlink(missing_ok=True)
        if daemon == "mariadbd":
            self._reap_mariadb()

    def is_running(self) -> bool:
        """True if every daemon of this sandbox is alive."""
        return all(self._is_ours(daemon) for daemon in self._daemons())

    def env(self) -> dict[str, str]:
        """The current environment plus SLURM_CONF of this cluster."""
        return {**os.environ, **self.endpoint.env()}

    def run(self, argv: Sequence[str], timeout: float = CLIENT_TIMEOUT_S,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster; never raises on a non-zero exit."""
        return subprocess.run(list(argv), env=self.env(), capture_output=True, text=True,
                              timeout=timeout, input=stdin,
                              stdin=None if stdin is not None else subprocess.DEVNULL)

    # --- preparing ---------------------------------------------------------------------

    def _daemons(self) -> tuple[str, ...]:
        extra = ("mariadbd", "slurmdbd") if self.settings.accounting else ()
        return ("munged", *extra, "slurmctld", "slurmd")

    def _check_can_run(self) -> None:
        if os.geteuid() != 0:
            raise SandboxSlurmError("the sandbox Slurm needs root (slurmd starts jobs as their user)")
        missing = missing_binaries(self.settings.accounting)
        if missing:
            raise SandboxSlurmError(f"not installed: {', '.join(missing)} (run scripts/setup.sh as root)")

    def _load_or_choose_state(self) -> None:
        """Ports and the socket folder are chosen once and kept; a running cluster keeps its settings."""
        state = self._read_state()
        if state is None:
            socket_dir = Path(tempfile.mkdtemp(prefix="mqic-slurm-munge-", dir="/tmp"))
            settings, ports = self._requested, _free_ports()
        else:
            settings, ports, socket_dir = state
        self._layout = _Layout(self._layout.root, socket_dir)
        running = state is not None and self._any_daemon_alive()
        self.settings, self.ports = (settings if running else self._requested), ports
        self._write_state()

    def _any_daemon_alive(self) -> bool:
        return any(self._is_ours(daemon) for daemon in
                   ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"))

    def _prepare_files(self) -> None:
        layout = self._layout
        for name in _DIRS:
            getattr(layout, name).mkdir(parents=True, exist_ok=True)
        _ensure_socket_dir(layout.socket_dir)
        layout.spool_dir.mkdir(exist_ok=True)
        if not layout.munge_key.exists():
            _write_private(layout.munge_key, os.urandom(MUNGE_KEY_BYTES))
        self._make_gpu_devices()
        layout.slurm_conf.write_text(_slurm_conf_text(layout, self.settings, self.ports))
        if self.settings.gpus:
            layout.gres_conf.write_text(
                f"NodeName={_node_name()} Name=gpu File={layout.dev_dir}/gpu[0-{self.settings.gpus - 1}]\n")
        if self.settings.accounting:
            _write_private(layout.dbd_conf, _slurmdbd_conf_text(layout, self.ports).encode())
        self._write_client_files()

    def _make_gpu_devices(self) -> None:
        # Slurm 22.05 drops a GPU without File= ("Removing file-less GPU") and the node goes
        # INVAL; any character device will do, nothing ever opens it.
        for index in range(self.settings.gpus):
            path = self._layout.dev_dir / f"gpu{index}"
            if path.exists() or path.is_symlink():
                continue
            try:
                os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            except OSError:  # no CAP_MKNOD (an unprivileged container): a symlink works too
                path.symlink_to("/dev/null")

    def _write_client_files(self) -> None:
        layout = self._layout
        conf = shlex.quote(str(layout.slurm_conf))
        for name in CLIENT_COMMANDS:
            program = _which(name)
            if program is None:
                continue
            wrapper = layout.bin_dir / name
            wrapper.write_text(
                f"#!/bin/sh\n# Written by sandbox/slurm.py: {name} of the sandbox cluster in {layout.root}.\n"
                f"SLURM_CONF={conf}; export SLURM_CONF\nexec {shlex.quote(program)} \"$@\"\n")
            wrapper.chmod(0o755)
        layout.env_file.write_text(
            f"export SLURM_CONF={conf}\nexport PATH={shlex.quote(str(layout.bin_dir))}:\"$PATH\"\n")

    # --- daemons -------------------------------------------------------------------------

    def _ensure_munged(self) -> None:
        layout = self._layout
        self._ensure_daemon("munged", [
            _binary("munged"), f"--key-file={layout.munge_key}", f"--socket={layout.munge_socket}",
            f"--pid-file={layout.pid_file('munged')}", f"--log-file={layout.log_file('munged')}",
            f"--seed-file={layout.munge_seed}",
        ])

    def _ensure_mariadb(self) -> None:
        if self._is_ours("mariadbd"):
            return
        layout = self._layout
        if not layout.mysql_data.is_dir():
            self._install_mariadb_data()
        self._check_ports_free(self.ports.mariadb)
        layout.mysql_socket.unlink(missing_ok=True)
        with layout.log_file("mariadbd-stdout").open("ab") as output:
            self._mariadb = subprocess.Popen(
                [_binary("mariadbd"), "--no-defaults", "--user=root", f"--datadir={layout.mysql_data}",
                 f"--socket={layout.mysql_socket}", f"--port={self.ports.mariadb}",
                 f"--bind-address={LOOPBACK}", f"--pid-file={layout.pid_file('mariadbd')}",
                 f"--log-error={layout.log_file('mariadbd')}", "--skip-name-resolve", *MARIADB_SIZES],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True)
        self._wait_for("mariadbd", lambda: self._mariadb_accepts_sql())

    def _install_mariadb_data(self) -> None:
        layout = self._layout
        staging = layout.mysql_dir / "data.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with layout.log_file("mariadb-install").open("ab") as output:
            result = subprocess.run(
                [_binary("mariadb-install-db"), "--no-defaults", "--user=root", f"--datadir={staging}",
                 "--auth-root-authentication-method=socket", "--skip-test-db", *MARIADB_SIZES],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output, timeout=120)
        if result.returncode != 0:
            self._fail("mariadb-install-db", f"exited {result.returncode}")
        os.rename(staging, layout.mysql_data)

    def _mariadb_accepts_sql(self) -> bool:
        if self._mariadb is not None and self._mariadb.poll() is not None:
            self._fail("mariadbd", f"exited with code {self._mariadb.returncode}")
        if not self._layout.mysql_socket.exists():
            return False
        # The slurm user has no password: it exists only on 127.0.0.1 and a private port.
        sql = ("CREATE DATABASE IF NOT EXISTS slurm_acct_db;"
               "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        result = subprocess.run(
            [_binary("mariadb"), "--no-defaults", f"--socket={self._layout.mysql_socket}",
             "--user=root", "--batch", "-e", sql],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
        return result.returncode == 0

    def _ensure_slurmdbd(self) -> None:
        # slurmdbd has no -f: it reads slurmdbd.conf from the folder of $SLURM_CONF.
        self._ensure_daemon("slurmdbd", [_binary("slurmdbd")],
                            ready=lambda: _accepts_tcp(self.ports.slurmdbd))

    def _ensure_daemon(self, daemon: str, argv: list[str],
                       ready: Callable[[], bool] | None = None) -> None:
        """Start a daemon that forks into the background and writes its pid file."""
        if self._is_ours(daemon):
            return
        port = {"slurmctld": self.ports.slurmctld, "slurmd": self.ports.slurmd,
                "slurmdbd": self.ports.slurmdbd}.get(daemon)
        if port is not None:
            self._check_ports_free(port)
        self._layout.pid_file(daemon).unlink(missing_ok=True)
        # Its stdio goes to a file: a pipe would keep us waiting on the daemonized child.
        with self._layout.log_file(f"{daemon}-stdout").open("ab") as output:
            result = subprocess.run(argv, env=self._daemon_env(), stdin=subprocess.DEVNULL,
                                    stdout=output, stderr=output, timeout=START_TIMEOUT_S)
        if result.returncode != 0:
            self._fail(daemon, f"exited with code {result.returncode}")
        self._wait_for(daemon, lambda: self._is_ours(daemon) and (ready is None or ready()))

    def _daemon_env(self) -> dict[str, str]:
        # Job processes inherit this through slurmstepd, which is how stop() finds leftovers.
        return {"PATH": DAEMON_PATH, "SLURM_CONF": str(self._layout.slurm_conf),
                "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}

    def _wait_until_node_ready(self) -> None:
        state = ""

        def node_ready() -> bool:
            nonlocal state
            result = self.run(["sinfo", "--noheader", "--format=%T"], timeout=START_TIMEOUT_S)
            state = result.stdout.strip()
            return result.returncode == 0 and state in READY_NODE_STATES

        self._wait_for("slurmd", node_ready, what=lambda: f"the node is ready (state {state!r})")

    def _wait_for(self, daemon: str, condition: Callable[[], bool],
                  what: Callable[[], str] | None = None) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not condition():
            if time.monotonic() > deadline:
                self._fail(daemon, f"not ready after {START_TIMEOUT_S:g} s"
                           + (f" waiting until {what()}" if what else ""))
            time.sleep(POLL_INTERVAL_S)

    def _check_ports_free(self, port: int) -> None:
        if not _port_is_free(port):
            raise SandboxSlurmError(f"port {port} on {LOOPBACK} is taken (another sandbox or Slurm?)")

    def _fail(self, daemon: str, reason: str) -> None:
        tails = [f"--- {path.name} ---\n{_tail(path)}" for path in
                 (self._layout.log_file(daemon), self._layout.log_file(f"{daemon}-stdout"))
                 if path.exists() and path.stat().st_size]
        raise SandboxSlurmError(f"{daemon} {reason}; logs in {self._layout.log_dir}\n" + "\n".join(tails))

    # --- stopping ----------------------------------------------------------------------

    def _cancel_all_jobs(self) -> None:
        listed = self.run(["squeue", "--noheader", "--format=%i"], timeout=CLIENT_TIMEOUT_S)
        ids = listed.stdout.split()
        if listed.returncode != 0 or not ids:
            return
        self.run(["scancel", *ids])
        deadline = time.monotonic() + self.settings.kill_wait + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            active = self.run(["squeue", "--noheader", "--format=%i", "--states=R,CG,CF,S,ST,SI"])
            if active.returncode != 0 or not active.stdout.strip():
                return
            time.sleep(POLL_INTERVAL_S * 4)

    def _kill_leftover_jobs(self) -> None:
        """SIGKILL our slurmstepd processes and everything below them.

        slurmstepd outlives slurmd, and a job whose controller was gone cannot be
        cancelled. Ours carry our SLURM_CONF in their environment (from slurmd).
        """
        conf = f"SLURM_CONF={self._layout.slurm_conf}"
        stepds = [pid for pid in procs.all_pids() if Path(procs.exe_path(pid)).name == "slurmstepd"
                  and conf in procs.environ(pid)]
        victims = procs.with_descendants(stepds)
        for pid in victims:
            procs.signal_quietly(pid, signal.SIGKILL)
        for pid in victims:
            self._wait_for_exit(pid, STOP_TIMEOUT_S)

    def _wait_for_exit(self, pid: int, timeout_s: float) -> bool:
        return procs.wait_for_exit(pid, timeout_s, POLL_INTERVAL_S, self._reap_mariadb)

    def _reap_mariadb(self) -> None:
        if self._mariadb is not None and self._mariadb.poll() is not None:
            self._mariadb = None

    # --- finding our processes -----------------------------------------------------

    def _is_ours(self, daemon: str) -> bool:
        """The pid file's process is alive and is this sandbox's (a stale pid may be reused)."""
        self._reap_mariadb()
        pid = _read_pid(self._layout.pid_file(daemon))
        if pid is None or not procs.is_alive(pid):
            return False
        layout = self._layout
        if layout.socket_dir is None:  # never started: nothing can be ours
            return False
        marker = {
            "munged": f"--socket={layout.munge_socket}",
            "mariadbd": f"--datadir={layout.mysql_data}",
            "slurmctld": str(layout.slurm_conf), "slurmd": str(layout.slurm_conf),
        }.get(daemon)
        if marker is not None:
            return f" {marker} " in f" {procs.cmdline(pid)} "
        return f"SLURM_CONF={layout.slurm_conf}" in procs.environ(pid)  # slurmdbd: no -f option

    # --- state ----------------------------------------------------------------------------

    def _read_state(self) -> tuple[SlurmSettings, Ports, Path] | None:
        try:
            data = json.loads(self._layout.state_file.read_text())
        except FileNotFoundError:
            return None
        settings = data["settings"]
        settings["partitions"] = tuple(settings["partitions"])
        return SlurmSettings(**settings), Ports(**data["ports"]), Path(data["munge_socket_dir"])

    def _write_state(self) -> None:
        self._layout.root.mkdir(parents=True, exist_ok=True)
        staging = self._layout.state_file.with_suffix(".json.partial")
        staging.write_text(json.dumps({"settings": asdict(self.settings), "ports": asdict(self.ports),
                                       "munge_socket_dir": str(self._layout.socket_dir)}, indent=1) + "\n")
        os.rename(staging, self._layout.state_file)


# --- configuration text --------------------------------------------------------------------

def _slurm_conf_text(layout: _Layout, settings: SlurmSettings, ports: Ports) -> str:
    node = _node_name()
    gres = f" Gres=gpu:{settings.gpus}" if settings.gpus else ""
    lines = [
        f"# Written by sandbox/slurm.py on every start; clients need SLURM_CONF={layout.slurm_conf}",
        f"ClusterName={CLUSTER_NAME}",
        f"SlurmctldHost={node}({LOOPBACK})",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", f"AuthInfo=socket={layout.munge_socket}",
        f"SlurmctldPort={ports.slurmctld}", f"SlurmdPort={ports.slurmd}",
        f"StateSaveLocation={layout.state_dir}", f"SlurmdSpoolDir={layout.spool_dir}",
        f"SlurmctldPidFile={layout.pid_file('slurmctld')}", f"SlurmdPidFile={layout.pid_file('slurmd')}",
        f"SlurmctldLogFile={layout.log_file('slurmctld')}", f"SlurmdLogFile={layout.log_file('slurmd')}",
        "MailProg=/bin/true",
        "# No systemd, no cgroups: job processes are tracked through /proc, nothing is bound.",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "# A queued job starts on the next 1 s scheduler tick instead of every 3 s.",
        "SchedulerParameters=batch_sched_delay=0",
        "# The node reports the CPUs configured here, not the machine's (tests sleep, not compute).",
        "SlurmdParameters=config_overrides",
        "MpiDefault=none", "ReturnToService=2",
        f"MinJobAge={settings.min_job_age}", f"KillWait={settings.kill_wait}",
        f"MessageTimeout={settings.message_timeout}",
        *(["GresTypes=gpu"] if settings.gpus else []),
        *_accounting_lines(layout, settings, ports),
        "JobCompType=jobcomp/none",
        f"NodeName={node} NodeAddr={LOOPBACK} CPUs={settings.cpus} RealMemory=1000{gres} State=UNKNOWN",
        *(f"PartitionName={name} Nodes=ALL{' Default=YES' if index == 0 else ''} MaxTime=UNLIMITED State=UP"
          for index, name in enumerate(settings.partitions)),
    ]
    return "\n".join(lines) + "\n"


def _accounting_lines(layout: _Layout, settings: SlurmSettings, ports: Ports) -> list[str]:
    if not settings.accounting:
        return ["AccountingStorageType=accounting_storage/none"]
    return [
        "AccountingStorageType=accounting_storage/slurmdbd",
        f"AccountingStorageHost={LOOPBACK}", f"AccountingStoragePort={ports.slurmdbd}",
        "# With a private munge socket, slurmdbd connections need it named here too.",
        f"AccountingStoragePass={layout.munge_socket}",
    ]


def _slurmdbd_conf_text(layout: _Layout, ports: Ports) -> str:
    lines = [
        "# Written by sandbox/slurm.py on every start (slurmdbd wants mode 600).",
        "AuthType=auth/munge", f"AuthInfo=socket={layout.munge_socket}",
        "DbdHost=localhost", f"DbdAddr={LOOPBACK}", f"DbdPort={ports.slurmdbd}",
        "SlurmUser=root",
        f"LogFile={layout.log_file('slurmdbd')}", f"PidFile={layout.pid_file('slurmdbd')}",
        "StorageType=accounting_storage/mysql", f"StorageHost={LOOPBACK}",
        f"StoragePort={ports.mariadb}", "StorageUser=slurm", "StorageLoc=slurm_acct_db",
    ]
    return "\n".join(lines) + "\n"


def _node_name() -> str:
    # slurmd finds its node line by the short host name.
    return socket.gethostname().split(".")[0]


# --- small helpers ---------------------------------------------------------------------------

def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{DAEMON_PATH}")


def _binary(name: str) -> str:
    path = _which(name)
    if path is None:
        raise SandboxSlurmError(f"{name} is not installed (run scripts/setup.sh as root)")
    return path


def _ensure_socket_dir(path: Path) -> None:
    """munged's socket folder: ours, a real folder, readable and searchable by all (0755)."""
    try:
        path.mkdir(mode=0o755)
    except FileExistsError:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise SandboxSlurmError(f"{path} exists and is not our folder") from None
    path.chmod(0o755)


def _write_private(path: Path, content: bytes) -> None:
    staging = path.with_name(path.name + ".partial")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(content)
    os.chmod(staging, 0o600)
    os.rename(staging, path)


def _free_ports() -> Ports:
    sockets = []
    try:
        for _ in range(4):  # held open together so the four differ
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind((LOOPBACK, 0))
            sockets.append(probe)
        return Ports(*(probe.getsockname()[1] for probe in sockets))
    finally:
        for probe in sockets:
            probe.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0):
            return True
    except OSError:
        return False


def _tail(path: Path) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


# --- command line -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m sandbox.slurm up|down|status --root DIR [--accounting] [--purge]``; JSON on stdout.

    ``up`` prints the endpoint (SLURM_CONF, the wrappers' folder) and the start-up time;
    ``status`` exits 3 when the cluster is not running.
    """
    parser = argparse.ArgumentParser(prog="python -m sandbox.slurm", description=main.__doc__)
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--accounting", action="store_true", help="up: also slurmdbd + MariaDB (sacct)")
    parser.add_argument("--purge", action="store_true", help="down: remove the folder too")
    args = parser.parse_args(argv)
    try:
        return _run_action(args)
    except SandboxSlurmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _run_action(args: argparse.Namespace) -> int:
    if args.action == "up":
        sandbox = SandboxSlurm(args.root, accounting=args.accounting)
        try:
            endpoint = sandbox.start()
        except SandboxSlurmError:
            sandbox.stop()  # a half-started cluster is of no use
            raise
        print(json.dumps({**endpoint.to_json_dict(), "running": True,
                          "startup_seconds": round(sandbox.startup_seconds or 0.0, 2)}))
        return 0
    try:
        sandbox = SandboxSlurm.from_state(args.root)
    except SandboxSlurmError:
        print(json.dumps({"running": False}))
        return 3 if args.action == "status" else 0
    if args.action == "down":
        sandbox.stop(purge=args.purge)
    running = sandbox.is_running()
    print(json.dumps({**sandbox.endpoint.to_json_dict(), "running": running}))
    return 3 if args.action == "status" and not running else 0


if __name__ == "__main__":
    sys.exit(main())
