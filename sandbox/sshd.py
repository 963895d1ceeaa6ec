"""A real, throw-away sshd on 127.0.0.1 for tests and the local sandbox HPC.

Everything lives in one private directory (``root``): host and client keys,
``authorized_keys``, ``known_hosts``, ``sshd_config``, the pid file, the log and
a small ``state.json`` (port and user). The port is chosen once and kept, so a
test can stop the server to simulate an outage and start it again on the same
port to heal it.

Usage::

    with SandboxSshd(tmp_path / "sshd") as sshd:
        subprocess.run([*sshd.endpoint.ssh_base_argv(), "true"], check=True)

or from a shell: ``python -m sandbox.sshd start|stop|status ROOT`` (``start --no-sftp``: an sshd
without the SFTP subsystem, as on HPCs where OpenSSH 9 ``scp`` cannot copy).

A slow host (``login_delay``, or ``start --login-delay S``): every session (remote command,
transfer, shell) goes through a small login script (``ForceCommand``) that first sleeps the
seconds in ``ROOT/login_delay_seconds``, read at each login, like a busy login node or a slow
``module``/conda init, and notes the login in ``ROOT/logins.log``. ``set_login_delay`` changes
it while the server runs. Without it the server has no such script, as before.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sandbox import procs
from shared.errors import MqicError

SSHD_BINARY = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.02
LOG_TAIL_LINES = 30


class SandboxSshdError(MqicError):
    """The sandbox sshd could not be set up, started or found."""


@dataclass(frozen=True)
class SshEndpoint:
    """Everything a client needs to reach the sandbox sshd."""

    host: str
    port: int
    user: str
    identity_file: Path
    known_hosts_file: Path

    def ssh_base_argv(self) -> list[str]:
        """Return an ``ssh`` argv ending with ``user@host``; append the remote command.

        Key-only, never prompts (BatchMode), and verifies the host key strictly
        against the sandbox's own known_hosts file.
        """
        return [
            "ssh", "-p", str(self.port), "-i", str(self.identity_file),
            "-o", "BatchMode=yes",
            "-o", "PasswordAuthentication=no",
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts_file}",
            "-o", "StrictHostKeyChecking=yes",
            f"{self.user}@{self.host}",
        ]

    def to_json_dict(self) -> dict[str, object]:
        """Return the endpoint as a JSON-serialisable dict (paths as strings)."""
        return {key: str(value) if isinstance(value, Path) else value
                for key, value in asdict(self).items()}


@dataclass(frozen=True)
class _Layout:
    """Where each sandbox file lives inside ``root``."""

    root: Path

    @property
    def host_key(self) -> Path:
        return self.root / "host_ed25519"

    @property
    def client_key(self) -> Path:
        return self.root / "client_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.root / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def config(self) -> Path:
        return self.root / "sshd_config"

    @property
    def pid_file(self) -> Path:
        return self.root / "sshd.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "sshd.log"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def login_delay(self) -> Path:
        return self.root / "login_delay_seconds"

    @property
    def login_script(self) -> Path:
        return self.root / "login.sh"

    @property
    def login_log(self) -> Path:
        return self.root / "logins.log"


class SandboxSshd:
    """One sshd listening on 127.0.0.1, run as the current user, owned by ``root``.

    ``start()`` is idempotent: if this sandbox's sshd already runs (possibly
    started by another process), it only returns the endpoint.
    """

    def __init__(self, root: Path, port: int | None = None, *, sftp: bool = True,
                 login_delay: float | None = None):
        self._layout = _Layout(Path(root).resolve())
        self._requested_port = port
        self._sftp = sftp  # False: no ``Subsystem sftp``, like HPCs where OpenSSH 9 scp fails
        self._login_delay = login_delay  # seconds every login sleeps (a slow host); None: no login script
        self._process: subprocess.Popen[bytes] | None = None
        self.endpoint: SshEndpoint | None = None

    @classmethod
    def from_state(cls, root: Path) -> SandboxSshd:
        """Re-attach to a sandbox that was started (maybe by another process) in ``root``.

        Raises ``SandboxSshdError`` if ``root`` holds no sandbox state.
        """
        sandbox = cls(root)
        sandbox._endpoint_from_state()
        return sandbox

    def __enter__(self) -> SandboxSshd:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> SshEndpoint:
        """Start sshd (keys and config are created once) and wait until it answers.

        Returns once the port accepts a TCP connection and sends the SSH banner.
        Raises ``SandboxSshdError`` with the tail of the sshd log if it does not.
        """
        if self._login_delay is not None:
            self.set_login_delay(self._login_delay)
        if self.is_running():
            return self._endpoint_from_state()
        layout = self._layout
        layout.root.mkdir(parents=True, exist_ok=True)
        _ensure_privsep_dir()
        _ensure_key(layout.host_key, comment="mqic-sandbox-host")
        _ensure_key(layout.client_key, comment="mqic-sandbox-client")
        port, user = self._port_and_user()
        self._write_state(port, user)
        self._write_client_files(port)
        # A slow host stays slow across restarts (an outage test's stop and start): the file says so.
        slow = layout.login_delay.exists()
        if slow:
            _write_login_script(layout)
        layout.config.write_text(_sshd_config_text(layout, port, user, sftp=self._sftp, login_script=slow))
        self.endpoint = self._endpoint_for(port, user)
        self._launch_and_wait(port)
        return self.endpoint

    def stop(self, kill_sessions: bool = True) -> None:
        """Stop the listener; with ``kill_sessions`` also kill every open connection.

        Connections already accepted survive the listener's death (that is how
        sshd works); killing them too is how tests simulate a network outage
        that breaks multiplexed (ControlMaster) connections as well.
        """
        pid = self._listener_pid()
        if pid is not None and self._is_sandbox_listener(pid):
            procs.signal_quietly(pid, signal.SIGTERM)
            if not self._wait_for_exit(pid, STOP_TIMEOUT_S):
                procs.signal_quietly(pid, signal.SIGKILL)
                self._wait_for_exit(pid, STOP_TIMEOUT_S)
        self._reap_own_child()
        self._layout.pid_file.unlink(missing_ok=True)
        if kill_sessions:
            self._kill_sessions()

    def replace_host_key(self) -> str:
        """Give the server a new host key, as an interception (or a reinstall) would; return its
        fingerprint (``SHA256:...``).

        Every connection is cut and the server restarts on the same port; the clients'
        ``known_hosts`` keeps naming the old key, so strict clients refuse the new one.
        """
        layout = self._layout
        known = layout.known_hosts.read_text()
        self.stop()
        layout.host_key.unlink(missing_ok=True)
        _ensure_key(layout.host_key, comment="mqic-sandbox-host")
        self.start()
        layout.known_hosts.write_text(known)
        return self.host_key_fingerprint()

    def host_key_fingerprint(self) -> str:
        """The ``SHA256:...`` fingerprint of the key the server presents."""
        listed = subprocess.run(["ssh-keygen", "-l", "-f", str(self._layout.host_key.with_suffix(".pub"))],
                                capture_output=True, text=True, check=True)
        return listed.stdout.split()[1]

    def set_login_delay(self, seconds: float) -> None:
        """Make every later login sleep ``seconds`` first (0: no sleep, the login script stays).

        Takes effect at once on a server started with a login delay; on one started without,
        at its next start.
        """
        if seconds < 0:
            raise ValueError(f"login delay: got {seconds!r}, expected seconds >= 0")
        self._layout.root.mkdir(parents=True, exist_ok=True)
        staging = self._layout.login_delay.with_suffix(".partial")
        staging.write_text(f"{seconds:g}\n")
        os.rename(staging, self._layout.login_delay)

    def logins(self) -> list[tuple[float, float]]:
        """(epoch seconds, delay slept) of each login through the slow-host login script so far."""
        if not self._layout.login_log.exists():
            return []
        found = []
        for line in self._layout.login_log.read_text(errors="replace").splitlines():
            fields = line.split()
            if len(fields) == 2:
                found.append((float(fields[0]), float(fields[1])))
        return found

    def sessions_started(self) -> int:
        """How many sessions (commands, shells, subsystems) the server started, from its log."""
        if not self._layout.log_file.exists():
            return 0
        return self._layout.log_file.read_text(errors="replace").count("Starting session:")

    def is_running(self) -> bool:
        """Return True if this sandbox's listener process is alive."""
        self._reap_own_child()
        pid = self._listener_pid()
        return pid is not None and self._is_sandbox_listener(pid)

    # --- starting -----------------------------------------------------------

    def _port_and_user(self) -> tuple[int, str]:
        state = self._read_state()
        if self._requested_port is not None:
            port = self._requested_port
        elif state is not None:
            port = state["port"]
        else:
            port = free_port()
        return port, _current_user()

    def _write_client_files(self, port: int) -> None:
        layout = self._layout
        client_public = _public_key_fields(layout.client_key)
        host_public = _public_key_fields(layout.host_key)
        layout.authorized_keys.write_text(f"{client_public} mqic-sandbox-client\n")
        layout.known_hosts.write_text(f"[{LOOPBACK}]:{port} {host_public}\n")

    def _launch_and_wait(self, port: int) -> None:
        layout = self._layout
        log_offset = layout.log_file.stat().st_size if layout.log_file.exists() else 0
        argv = [str(SSHD_BINARY), "-D", "-f", str(layout.config), "-E", str(layout.log_file)]
        # Errors sshd prints before it honours -E land in the same log; a pipe would
        # break (SIGPIPE) once a short-lived starter such as the CLI has exited.
        with layout.log_file.open("ab") as early_stderr:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=early_stderr, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._listener_is_ready(port):
            if self._process.poll() is not None:
                self._fail_start(f"sshd exited with code {self._process.returncode}", log_offset)
            if time.monotonic() > deadline:
                self.stop()
                self._fail_start(f"sshd did not answer on port {port} within {START_TIMEOUT_S}s",
                                 log_offset)
            time.sleep(POLL_INTERVAL_S)

    def _listener_is_ready(self, port: int) -> bool:
        # sshd writes its pid file only after it has bound the port: without this
        # check, another server already on the port would answer the banner for us.
        assert self._process is not None
        return self._pid_from_file() == self._process.pid and _answers_ssh_banner(port)

    def _fail_start(self, reason: str, log_offset: int) -> None:
        log_tail = _tail(self._layout.log_file, log_offset) or "(sshd log is empty)"
        raise SandboxSshdError(f"{reason}; config {self._layout.config}, log tail:\n{log_tail}")

    # --- finding processes --------------------------------------------------

    def _listener_pid(self) -> int | None:
        if self._process is not None and self._process.returncode is None:
            return self._process.pid
        return self._pid_from_file()

    def _pid_from_file(self) -> int | None:
        try:
            return int(self._layout.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _is_sandbox_listener(self, pid: int) -> bool:
        # The listener keeps its argv (with our config path) in its process title;
        # checking it guards against a stale pid file whose pid was reused.
        return procs.is_alive(pid) and _mentions(procs.cmdline(pid), self._layout.config)

    def _session_pids(self) -> list[int]:
        """Pids of this sandbox's per-connection sshd processes (listener already gone).

        After authentication sshd rewrites its process title ("sshd: root@notty"),
        so the config path in /proc/PID/cmdline only identifies the pre-auth
        children; every sshd process of ours keeps our log file open, though.
        """
        config, log = self._layout.config, str(self._layout.log_file)
        own_pid = os.getpid()
        return [pid for pid in procs.all_pids()
                if pid != own_pid and _is_sshd_binary(pid)
                and (_mentions(procs.cmdline(pid), config) or log in procs.open_file_targets(pid))]

    def _kill_sessions(self) -> None:
        pids = self._session_pids()
        for pid in pids:
            procs.signal_quietly(pid, signal.SIGKILL)
        for pid in pids:
            self._wait_for_exit(pid, STOP_TIMEOUT_S)

    # --- waiting ------------------------------------------------------------

    def _wait_for_exit(self, pid: int, timeout_s: float) -> bool:
        return procs.wait_for_exit(pid, timeout_s, POLL_INTERVAL_S, self._reap_own_child)

    def _reap_own_child(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            self._process = None

    # --- state --------------------------------------------------------------

    def _read_state(self) -> dict | None:
        try:
            return json.loads(self._layout.state_file.read_text())
        except FileNotFoundError:
            return None

    def _write_state(self, port: int, user: str) -> None:
        staging = self._layout.state_file.with_suffix(".json.partial")
        staging.write_text(json.dumps({"port": port, "user": user}) + "\n")
        os.rename(staging, self._layout.state_file)

    def _endpoint_from_state(self) -> SshEndpoint:
        state = self._read_state()
        if state is None:
            raise SandboxSshdError(f"no sandbox sshd state in {self._layout.root}")
        self.endpoint = self._endpoint_for(state["port"], state["user"])
        return self.endpoint

    def _endpoint_for(self, port: int, user: str) -> SshEndpoint:
        return SshEndpoint(host=LOOPBACK, port=port, user=user,
                           identity_file=self._layout.client_key,
                           known_hosts_file=self._layout.known_hosts)


# --- setup helpers ----------------------------------------------------------

SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")

# The slow host's login path. sshd runs it through the user's login shell (which reads its rc files
# as for any command); the command is then run by the same shell without reading them again (bash
# reads ~/.bashrc for an ssh command only at shell level 1; the first bash lowered SHLVL to 0 when it
# exec'ed this script), so the only extra cost is the sleep and one small sh.
LOGIN_SCRIPT = """#!/bin/sh
# Written by sandbox/sshd.py: a slow host's login path (the delay file is read at every login).
delay=$(cat {delay} 2>/dev/null) || delay=0
case "$delay" in ''|0) ;; *) sleep "$delay" ;; esac
echo "$(date +%s.%N) ${{delay:-0}}" >> {log}
case "$SSH_ORIGINAL_COMMAND" in
  '') exec "${{SHELL:-/bin/sh}}" -l ;;
  internal-sftp) exec {sftp_server} ;;
  *) SHLVL=1 exec "${{SHELL:-/bin/sh}}" -c "$SSH_ORIGINAL_COMMAND" ;;
esac
"""


def login_script_text(delay_file: Path, log_file: Path, sftp_server: Path = SFTP_SERVER) -> str:
    """The slow host's login script: sleep what ``delay_file`` says, note the login, run the command."""
    return LOGIN_SCRIPT.format(delay=shlex.quote(str(delay_file)), log=shlex.quote(str(log_file)),
                               sftp_server=shlex.quote(str(sftp_server)))


def _write_login_script(layout: _Layout) -> None:
    layout.login_script.write_text(login_script_text(layout.login_delay, layout.login_log))
    layout.login_script.chmod(0o755)


def _sshd_config_text(layout: _Layout, port: int, user: str, *, sftp: bool = True,
                      login_script: bool = False) -> str:
    lines = [
        f"ListenAddress {LOOPBACK}",
        f"Port {port}",
        f"PidFile {layout.pid_file}",
        f"HostKey {layout.host_key}",
        f"AuthorizedKeysFile {layout.authorized_keys}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        f"AllowUsers {user}",
        "MaxStartups 100:30:200",
        "MaxSessions 100",
        "ClientAliveInterval 5",
        "ClientAliveCountMax 3",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "LogLevel VERBOSE",
    ]
    if sftp:
        lines.append("Subsystem sftp internal-sftp")
    if login_script:
        lines.append(f"ForceCommand {layout.login_script}")
    return "# Written by sandbox/sshd.py; rewritten on every start.\n" + "\n".join(lines) + "\n"


def _ensure_privsep_dir() -> None:
    # Debian's sshd refuses to start without its privilege separation directory.
    if PRIVSEP_DIR.is_dir():
        return
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
        PRIVSEP_DIR.chmod(0o755)
    except OSError as error:
        raise SandboxSshdError(f"cannot create {PRIVSEP_DIR} that sshd needs: {error}") from error


def _ensure_key(path: Path, comment: str) -> None:
    if path.exists() and path.with_suffix(".pub").exists():
        return
    path.unlink(missing_ok=True)
    path.with_suffix(".pub").unlink(missing_ok=True)
    argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise SandboxSshdError(f"ssh-keygen failed for {path}: {result.stderr.strip()}")


def _public_key_fields(private_key: Path) -> str:
    """Return 'type base64' of the key's .pub file, without its comment."""
    return " ".join(private_key.with_suffix(".pub").read_text().split()[:2])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for the sandbox, tests and benches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _answers_ssh_banner(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0) as connection:
            return connection.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _tail(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


def _mentions(cmdline: str, path: Path) -> bool:
    """True if ``path`` is a whole word of ``cmdline`` (not a prefix of another path)."""
    return f" {path} " in f" {cmdline} "


def _is_sshd_binary(pid: int) -> bool:
    return procs.exe_path(pid) == str(SSHD_BINARY.resolve())


# --- command line ---------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m sandbox.sshd start|stop|status ROOT [--no-sftp]``; prints JSON on stdout.

    ``start`` prints the endpoint (``--no-sftp``: without the SFTP subsystem); ``stop`` and ``status`` print
    ``{"running": bool, "endpoint": {...} | null}``. ``status`` exits 3 when not running.
    """
    parser = argparse.ArgumentParser(prog="python -m sandbox.sshd", description=main.__doc__)
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("root", type=Path)
    parser.add_argument("--no-sftp", dest="sftp", action="store_false",
                        help="start without the SFTP subsystem (as some HPCs run sshd)")
    parser.add_argument("--login-delay", type=float, metavar="S",
                        help="start as a slow host: every login sleeps S seconds first")
    args = parser.parse_args(argv)
    try:
        return _run_action(args.action, args.root, sftp=args.sftp, login_delay=args.login_delay)
    except SandboxSshdError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _run_action(action: str, root: Path, *, sftp: bool = True, login_delay: float | None = None) -> int:
    if action == "start":
        print(json.dumps(SandboxSshd(root, sftp=sftp, login_delay=login_delay).start().to_json_dict()))
        return 0
    try:
        sandbox = SandboxSshd.from_state(root)
    except SandboxSshdError:
        print(json.dumps({"running": False, "endpoint": None}))
        return 3 if action == "status" else 0
    if action == "stop":
        sandbox.stop(kill_sessions=True)
    running = sandbox.is_running()
    assert sandbox.endpoint is not None
    print(json.dumps({"running": running, "endpoint": sandbox.endpoint.to_json_dict()}))
    return 3 if action == "status" and not running else 0


if __name__ == "__main__":
    sys.exit(main())
