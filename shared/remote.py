"""Everything that crosses to the HPC: ssh commands, uploads and downloads, through plumbum.

Security: key authentication only (``BatchMode``, no passwords), strict host-key
checking against ``hpc.known_hosts_file``, and every word that reaches the remote
shell is quoted with ``shlex.quote``. Our mandatory options come first on every
command line because ssh keeps the first value it sees for an option.

Speed: one shared connection per host (``ControlMaster``) under a private control
directory, so all workers multiplex over it. The master is started explicitly and
detached; commands use ``ControlMaster=no``, which multiplexes when the master is up
and quietly connects directly when it is not, so a dead master never blocks a call.

Failures are typed (``shared.errors``): ``Unreachable`` for ssh exit 255, timeouts
and connection errors; ``HostKeyMismatch`` when ssh refused the host's key (never an
outage); ``LocalFailure`` when the trouble was ours (the local folder unreadable, the
local disk full); ``RemoteError`` when the remote command failed (``ResourceShortage`` when
the HPC's system said it ran short of something that comes back: ``remote_error``); the
caller decides what they mean. No retries and no sleeps here.

Every child (ssh, scp, rsync, tar) starts in its own session, so the group signal with
which supervisord stops a worker does not cut a call in flight: the worker sets its stop
event, the call ends within its timeout, then the worker exits.
"""
from __future__ import annotations

import hashlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Sequence

from filelock import FileLock
from plumbum import local
from plumbum.commands.processes import ProcessTimedOut

from shared.errors import (BadOutput, HostKeyMismatch, HpcTrouble, LocalFailure, RemoteError, RemoteFailure,
                           ResourceShortage, Unreachable)

if TYPE_CHECKING:  # annotations only: the backends import this module, and the config imports them
    from shared.config import HpcConfig

SSH_UNREACHABLE = 255
UPLOAD_PREFIX = ".mqic-upload-"
CONNECTION_TROUBLE = re.compile(
    r"Connection (refused|closed|reset|timed out)|lost connection|Broken pipe|"
    r"Could not resolve|No route to host|Network is unreachable|kex_exchange_identification|"
    r"Connection to .* closed by remote host|port \d+: Operation timed out|"
    # the remote tar of an upload got a cut stream: our sending side died, not the case
    r"This does not look like a tar archive|Unexpected EOF in archive", re.IGNORECASE)


# The HPC's system ran short of something that comes back (disk space, quota, processes, open
# files): the command may well work on another attempt.
RESOURCE_SHORTAGE = re.compile(r"No space left on device|Disk quota exceeded|Resource temporarily unavailable|"
                               r"Too many open files")


# ssh's words when it refuses the key the host presented (changed, or none known for it)
HOST_KEY_REFUSED = re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed|"
                              r"No \S+ host key is known for|Host key for \S+ has changed", re.IGNORECASE)
HOST_KEY_UNKNOWN = re.compile(r"No \S+ host key is known for", re.IGNORECASE)
FINGERPRINT = re.compile(r"\b(SHA256:[A-Za-z0-9+/=]+)")
AUTH_REACHED = re.compile(r"Permission denied|Authentications that can continue", re.IGNORECASE)


def host_key_refusal(host: str, err: str) -> HostKeyMismatch | None:
    """The HostKeyMismatch that ssh's ``err`` reports, if it refused the host's key."""
    if not HOST_KEY_REFUSED.search(err):
        return None
    fingerprint = FINGERPRINT.search(err)
    offending = re.search(r"Offending \S+ key in \S+", err)
    detail = offending[0] if offending else " ".join(err.split())[-200:]
    return HostKeyMismatch(host, detail, fingerprint=fingerprint[1] if fingerprint else None,
                           unknown=bool(HOST_KEY_UNKNOWN.search(err)))


SCP_CLOSED = re.compile(r"Connection closed|subsystem request failed", re.IGNORECASE)
SCP_WITHOUT_SFTP = (
    "scp said 'Connection closed' before copying anything, yet {host} answers ssh: its sshd has no SFTP "
    "server (no 'Subsystem sftp'), which OpenSSH 9 scp needs. Fix: set hpc.transfer: tar "
    "(one stream over ssh, needs only tar on the HPC), or hpc.scp_command: \"scp -O\" "
    "(the legacy scp protocol).")


def last_lines(text: str, limit: int = 300) -> str:
    """The last whole lines of ``text`` that fit in ``limit`` characters (at least the last line),
    joined by spaces: never a message cut mid-sentence."""
    kept: list[str] = []
    for line in reversed([line.strip() for line in text.strip().splitlines() if line.strip()]):
        if kept and sum(len(k) + 1 for k in kept) + len(line) > limit:
            break
        kept.insert(0, line)
    return " ".join(kept)


def remote_error(argv: Sequence[str], code: int, err: str, out: str = "") -> RemoteError:
    """The typed failure of a remote command that ran and exited ``code``: ``ResourceShortage``
    when the HPC's system says it ran short (``RESOURCE_SHORTAGE``), else ``RemoteError``."""
    kind = ResourceShortage if RESOURCE_SHORTAGE.search(f"{err}\n{out}") else RemoteError
    return kind(list(argv), code, err, out)


def transfer_failure(what: str, code: int, err: str, out: str = "", *, host: str = "") -> RemoteFailure:
    """The typed failure of a transfer that exited ``code``: a refused host key is HostKeyMismatch;
    connection trouble (ssh's 255, killed by our timeout, or a connection message) is Unreachable,
    anything else ``remote_error``."""
    refused = host_key_refusal(host or what, err)
    if refused is not None:
        return refused
    if code in (SSH_UNREACHABLE, -9) or CONNECTION_TROUBLE.search(err):
        return Unreachable(f"{what}: {last_lines(err) or f'exit {code}'}")
    return remote_error([what], code, err, out)


class VerifyFailed(RemoteFailure):
    """An upload arrived, but its file count or size differs from the local folder."""


class TransferUnsupported(RemoteError, HpcTrouble):
    """The HPC answers ssh but refuses the configured transfer (scp without an SFTP server).

    A configuration problem, not an outage: the message says which setting fixes it.
    """


class UnsafeMember(BadOutput):
    """A results archive holds a member that is not a plain file or folder inside the case folder."""

    def __init__(self, member: str, why: str):
        self.member = member
        super().__init__(f"results archive member {member!r} refused: {why}")


class UnsafeControlDir(Unreachable):
    """The ssh control folder is not a private folder of ours, so the HPC cannot be reached safely.

    Another local user who owns (or can write) it could hijack or spy on the shared
    connection. Nothing is sent until it is fixed; like any Unreachable, never a reason
    to fail a case.
    """


@dataclass(frozen=True)
class UploadResult:
    remote_dir: str
    files: int
    bytes: int


@dataclass(frozen=True)
class UploadCase:
    """One case folder of ``Remote.upload_many``: ``local_dir`` lands as ``<base>/<folder_name>``."""

    local_dir: Path
    folder_name: str
    case_id: int


# What became of one case of ``upload_many``: where it landed, or its own failure.
UploadOutcome = UploadResult | RemoteFailure


@dataclass(frozen=True)
class _Staged:
    """One case on its way up: where it lands first and last, and what it must hold."""

    index: int
    case: UploadCase
    temp: str
    final: str
    files: int
    size: int


def _write_archive(stream, pairs: Sequence[tuple[Path, str]], names: Sequence[str]) -> LocalFailure | None:
    """Write every local folder of ``pairs`` into ``stream`` as one tar archive, each under its name.

    Returns the LocalFailure of a folder that could not be read here (the archive is then
    left unfinished), None otherwise; the other end closing first is left to its exit code.
    """
    current = pairs[0][0] if pairs else None
    try:
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            for (local_dir, _temp), name in zip(pairs, names):
                current = local_dir
                archive.add(str(local_dir), arcname=name)
    except BrokenPipeError:
        return None
    except OSError as exc:
        return LocalFailure(f"tar upload: our local tar of {current} failed: {exc.strerror or exc}"
                            + (f": {exc.filename}" if exc.filename else ""))
    return None


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except BrokenPipeError:
        pass  # the other end ended first: its exit code says why


def folder_manifest(folder: Path) -> tuple[int, int]:
    """(file count, total bytes) of the regular files under ``folder``, as find(1) sees them.

    Raises LocalFailure when ``folder`` is missing, or a folder or file in it cannot be read:
    an upload of it would fail here, not at the host.
    """
    if not os.path.isdir(folder):
        raise LocalFailure(f"local folder {folder} is missing or not a folder")
    files = size = 0
    for dirpath, _dirnames, filenames in os.walk(folder, onerror=_unreadable):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                if not os.access(path, os.R_OK):
                    raise LocalFailure(f"local file {path} is not readable")
                files += 1
                size += os.path.getsize(path)
    return files, size


def _unreadable(error: OSError) -> None:
    raise LocalFailure(f"local folder {error.filename} cannot be read: {error.strerror}")


def remote_path_expr(path: str) -> str:
    """A shell word for ``path`` with a leading ``~`` expanded by the remote shell."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 when missing; raise UnsafeControlDir unless it is then
    a real folder (not a symlink), owned by us, with mode 0700 exactly.

    The checks run on a descriptor opened without following links, so the folder
    cannot be swapped between the check and its use by a path trick.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    created = True
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        created = False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UnsafeControlDir(_unsafe_dir_message(path, os.lstat(path), exc)) from None
    try:
        if created:
            os.fchmod(fd, 0o700)  # mkdir's mode was narrowed by the umask, never widened
        problem = _private_dir_problem(path, os.fstat(fd))
    finally:
        os.close(fd)
    if problem:
        raise UnsafeControlDir(problem)


def _unsafe_dir_message(path: Path, info: os.stat_result, exc: OSError) -> str:
    fix = f"remove it (rm {shlex.quote(str(path))}) or set hpc.control_dir to a private folder"
    if stat.S_ISLNK(info.st_mode):
        return (f"control dir {path} is a symlink (to {os.readlink(path)}), not a folder of ours; "
                f"refusing to use it: {fix}")
    if not stat.S_ISDIR(info.st_mode):
        return f"control dir {path} is not a folder; refusing to use it: {fix}"
    return f"control dir {path} cannot be opened ({exc.strerror}); refusing to use it: {fix}"


def _private_dir_problem(path: Path, info: os.stat_result) -> str | None:
    if info.st_uid != os.getuid():
        return (f"control dir {path} belongs to {_user_name(info.st_uid)}, not to us "
                f"({_user_name(os.getuid())}); another user may have created it first. Refusing to use it: "
                f"remove it as its owner or root, or set hpc.control_dir to a private folder")
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o700:
        return (f"control dir {path} has mode {mode:04o}, not 0700; others could reach the shared "
                f"connection. Refusing to use it: chmod 700 {shlex.quote(str(path))} "
                f"(after checking nothing foreign is inside)")
    return None


def _user_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


HAS_TAR_FILTERS = hasattr(tarfile, "data_filter")  # Python 3.11.4+, 3.12+
TAR_FILTER_ERRORS = (tarfile.FilterError,) if HAS_TAR_FILTERS else ()


def check_member(member: tarfile.TarInfo, dest: Path) -> None:
    """Raise UnsafeMember unless ``member`` is a regular file or folder landing inside ``dest``.

    Refused: absolute names, any ``..`` component, every link (symbolic or hard, even
    one pointing inside: results never need them, and refusing is simpler than proving
    a target harmless), devices, fifos, and a path through an existing link in ``dest``.
    """
    name = member.name
    if not name or name.startswith("/"):
        raise UnsafeMember(name, "absolute path")
    if ".." in name.split("/"):
        raise UnsafeMember(name, "'..' in its path")
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        raise UnsafeMember(name, f"{kind} link to {member.linkname!r}; links are never fetched")
    if not (member.isreg() or member.isdir()):
        raise UnsafeMember(name, "a device, fifo or other special file; only files and folders are fetched")
    root = os.path.realpath(dest)
    if os.path.commonpath([root, os.path.realpath(os.path.join(root, name))]) != root:
        raise UnsafeMember(name, f"its path leads outside {dest} through a link there")


def extract_member(archive: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    """Extract one checked member into ``dest``, owned by us, without set-id bits.

    Our own checks always run; where Python has extraction filters (3.11.4+) the
    ``data`` filter runs as well. Raises UnsafeMember for a refused member.
    """
    check_member(member, dest)
    member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
    member.mode = 0o755 if member.isdir() else (member.mode & 0o755) | 0o600
    try:
        if HAS_TAR_FILTERS:
            archive.extract(member, dest, numeric_owner=True, filter="data")
        else:  # Debian 12's Python 3.11.2
            archive.extract(member, dest, numeric_owner=True)
    except TAR_FILTER_ERRORS as exc:
        raise UnsafeMember(member.name, str(exc)) from None


# Verify each upload by file count and bytes, then rename it into place. $1 a marker, then four
# words per upload (temporary folder, final folder, files, bytes); for each, one record:
# <M>F<index><M><stderr><M><exit><M> and a newline (exit 4: mismatch, 3: unreadable, 1: rename).
FINALIZE_SCRIPT = r"""
mark=$1; shift
one() {
  tmp=$1 final=$2 want="$3 $4"
  got=$(cd -- "$tmp" && find . -type f -printf '%s\n' | awk '{n++; b+=$1} END {printf "%.0f %.0f", n, b}') || return 3
  if [ "$got" != "$want" ]; then echo "upload mismatch: got files/bytes $got, want $want" >&2; return 4; fi
  rm -rf -- "$final" && mv -- "$tmp" "$final" || return 1
  rm -rf -- "${tmp%-*}"-*  # temporaries of earlier, interrupted attempts at this case
}
index=0
while [ $# -ge 4 ]; do
  printf '%sF%s%s' "$mark" "$index" "$mark"
  err=$(one "$1" "$2" "$3" "$4" 2>&1 >/dev/null); code=$?
  printf '%s%s%s%s\n' "$err" "$mark" "$code" "$mark"
  shift 4
  index=$((index + 1))
done
"""
VERIFY_MISMATCH_EXIT = 4
_FINALIZE_TOKENS = 4  # F<index>, stderr, exit code, what follows the closing marker


def parse_finalize(text: str, mark: str) -> dict[int, tuple[int, str]]:
    """(exit code, stderr) of each whole record of FINALIZE_SCRIPT's answer, by index from 0;
    a record cut short, and all after a record that does not fit, are left out."""
    found: dict[int, tuple[int, str]] = {}
    _head, *tokens = (text or "").split(mark)
    for start in range(0, len(tokens) - _FINALIZE_TOKENS + 1, _FINALIZE_TOKENS):
        tag, err, code, after = tokens[start:start + _FINALIZE_TOKENS]
        if tag != f"F{len(found)}" or not code.isdigit() or after.strip():
            break
        found[len(found)] = (int(code), err)
    return found


# Why an upload failed: the folder's write error, or its free space in KB.
DIAGNOSE_SCRIPT = r"""
probe="$1/.mqic-write-probe-$$"
touch -- "$probe" 2>&1 || exit 0
rm -f -- "$probe"
df -Pk -- "$1" | awk 'NR == 2 {print "free_kb " $4}'
"""

# Stream the named result files (globs relative to the case dir) as a tar archive.
RESULTS_SCRIPT = r"""
cd -- "$1" || exit 3
shift
for pattern in "$@"; do
  for f in $pattern; do [ -e "$f" ] && printf '%s\0' "$f"; done
done | tar --null -T - -cf -
"""


# The results of several case folders under one parent folder ($1) in ONE tar stream: $2 is how
# many folder names follow, then the patterns. Each member is named <folder>/<file>; a folder that
# is missing or holds no match adds nothing (the caller downloads such a case on its own).
RESULTS_MANY_SCRIPT = r"""
cd -- "$1" || exit 3
count=$2; shift 2
k=0
for d; do
  k=$((k + 1)); [ "$k" -gt "$count" ] && break
  (
    cd -- "$d" 2>/dev/null || exit 0
    j=0
    for pattern; do
      j=$((j + 1)); [ "$j" -le "$count" ] && continue
      for f in $pattern; do [ -e "$f" ] && printf '%s\0' "$d/$f"; done
    done
  )
done | tar --null -T - -cf -
"""


def presented_host_keys(hpc: HpcConfig, *, timeout: float = 10) -> list[str]:
    """The fingerprints of the keys the host presents now (``ssh-keyscan | ssh-keygen -lf -``), one
    ``bits SHA256:... host (TYPE)`` line each; reads and writes no known_hosts file. Raises
    LocalFailure when the tools fail, Unreachable when the host sends no key."""
    try:
        scan = subprocess.run(["ssh-keyscan", "-T", str(int(timeout)), "-p", str(hpc.port), "--", hpc.host],
                              capture_output=True, timeout=timeout + 5, stdin=subprocess.DEVNULL)
        if not scan.stdout.strip():
            said = last_lines(scan.stderr.decode(errors="replace"), 200)
            raise Unreachable(f"{hpc.host}: ssh-keyscan got no key ({said})")
        listed = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=scan.stdout, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalFailure(f"cannot list the host's keys: {exc}") from None
    return [line for line in listed.stdout.decode(errors="replace").splitlines() if line.strip()]


class Remote:
    """The HPC as seen over ssh. Implements the ``Runner`` protocol of ``shared.backends.model``."""

    def __init__(self, hpc: HpcConfig):
        self.hpc = hpc
        self.control_dir = hpc.control_dir or Path(f"/tmp/mqic-ssh-{os.getuid()}")
        key = f"{hpc.user}@{hpc.host}:{hpc.port}".encode()
        self.control_path = self.control_dir / hashlib.sha1(key).hexdigest()[:20]
        self._base_dir: str | None = None
        self._master_lock = threading.Lock()

    # -- command lines -------------------------------------------------------------------
    def _common_options(self, control_path: str | None = None) -> list[str]:
        hpc = self.hpc
        return [
            "-o", "BatchMode=yes", "-o", "PasswordAuthentication=no",
            "-o", "KbdInteractiveAuthentication=no", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={hpc.known_hosts_file}", "-o", "IdentitiesOnly=yes",
            "-i", str(hpc.identity_file), "-o", f"ConnectTimeout={int(hpc.connect_timeout_seconds)}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            "-o", f"ControlPath={control_path or self.control_path}",
        ]

    @property
    def destination(self) -> str:
        return f"{self.hpc.user}@{self.hpc.host}"

    def ssh_command(self, *, master: bool = False):
        exe, *extra = self.hpc.ssh_command
        mux = (["-M", "-N", "-f", "-o", "ControlMaster=yes",
                "-o", f"ControlPersist={self.hpc.control_persist_seconds}"]
               if master else ["-o", "ControlMaster=no"])
        return local[exe][(*self._common_options(), *mux, "-p", str(self.hpc.port), *extra)]

    def scp_command(self):
        exe, *extra = self.hpc.scp_command
        return local[exe][(*self._common_options(), "-o", "ControlMaster=no", "-P", str(self.hpc.port),
                           "-q", *extra)]

    # -- connection reuse ---------------------------------------------------------------
    def ensure_master(self) -> None:
        """Start the shared ControlMaster connection unless one is already listening.

        Raises UnsafeControlDir when the control folder is not private to us.
        """
        ensure_private_dir(self.control_dir)
        with self._master_lock, FileLock(f"{self.control_path}.lock", timeout=60):
            if self._master_alive():
                return
            self.control_path.unlink(missing_ok=True)  # stale: its master is gone
            master = self.ssh_command(master=True)[self.destination]
            try:
                master.run(retcode=None, timeout=self.hpc.connect_timeout_seconds + 5, new_session=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except ProcessTimedOut:
                pass  # commands then connect directly and report the real problem

    def _master_alive(self) -> bool:
        if not self.control_path.exists():
            return False
        check = self.ssh_command()["-O", "check", self.destination]
        code, _out, _err = check.run(retcode=None, timeout=5, new_session=True)
        return code == 0

    def check_host_key(self, *, timeout: float | None = None) -> None:
        """Connect, let ssh check the host's key, and authenticate with no method at all, so that
        nothing but the handshake reaches the host (never the shared connection, never a command).

        Returns when the key was accepted (ssh got as far as asking to log in); raises
        HostKeyMismatch when it was refused, Unreachable when the host did not get that far.
        """
        exe, *extra = self.hpc.ssh_command
        handshake = local[exe][(*self._common_options("none"), "-o", "ControlMaster=no",
                                "-o", "PubkeyAuthentication=no", "-o", "GSSAPIAuthentication=no",
                                "-o", "HostbasedAuthentication=no", "-N", "-p", str(self.hpc.port), *extra,
                                self.destination)]
        limit = timeout or self.hpc.connect_timeout_seconds + 10
        try:
            code, _out, err = handshake.run(retcode=None, timeout=limit, stdin=subprocess.DEVNULL, new_session=True)
        except ProcessTimedOut:
            raise Unreachable(f"{self.hpc.host}: no handshake within {limit:g}s") from None
        refused = host_key_refusal(self.hpc.host, err)
        if refused is not None:
            raise refused
        if code != 0 and not AUTH_REACHED.search(err):
            raise Unreachable(f"{self.hpc.host}: handshake failed: {last_lines(err) or f'exit {code}'}")

    def close(self) -> None:
        """Stop the shared master connection (other workers start a new one when needed)."""
        self.ssh_command()["-O", "exit", self.destination].run(retcode=None, timeout=5)

    # -- running commands -----------------------------------------------------------------
    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> str:
        """Run ``argv`` on the HPC (each word quoted); return stdout or raise a RemoteFailure."""
        return self.run_shell(" ".join(shlex.quote(str(word)) for word in argv), timeout=timeout,
                              argv=argv)

    def run_shell(self, command: str, *, timeout: float | None = None,
                  argv: Sequence[str] | None = None) -> str:
        """Run an already quoted shell ``command`` on the HPC; return stdout."""
        self.ensure_master()
        ssh = self.ssh_command()[self.destination, "--", command]
        limit = timeout or self.hpc.command_timeout_seconds
        try:
            code, out, err = ssh.run(retcode=None, timeout=limit, stdin=subprocess.DEVNULL, new_session=True)
        except ProcessTimedOut:
            raise Unreachable(f"{self.hpc.host}: no answer within {limit:g}s") from None
        if code == SSH_UNREACHABLE:
            refused = host_key_refusal(self.hpc.host, err)
            if refused is not None:
                raise refused
            raise Unreachable(f"{self.hpc.host}: ssh failed: {last_lines(err) or 'exit 255'}")
        if code != 0:
            raise remote_error(list(argv) if argv is not None else [command], code, err, out)
        return out

    def run_script(self, script: str, *args: str, timeout: float | None = None) -> str:
        """Run a POSIX ``sh`` script with positional ``args`` (never interpolated into it)."""
        return self.run(["sh", "-c", script, "sh", *args], timeout=timeout)

    # -- paths ------------------------------------------------------------------------------
    def base_dir(self) -> str:
        """The absolute remote base directory (``~`` expanded remotely), created if missing."""
        if self._base_dir is None:
            word = remote_path_expr(self.hpc.remote_base_dir)
            out = self.run_shell(f"mkdir -p -- {word} && cd -- {word} && pwd -P")
            lines = [line for line in out.splitlines() if line.strip()]
            if not lines or not lines[-1].startswith("/"):
                raise BadOutput(f"cannot resolve remote_base_dir {self.hpc.remote_base_dir!r}: {out[-200:]!r}")
            self._base_dir = lines[-1]
        return self._base_dir

    def remote_case_dir(self, folder_name: str) -> str:
        return f"{self.base_dir()}/{folder_name}"

    # -- transfers ----------------------------------------------------------------------------
    def upload(self, local_dir: Path, folder_name: str, *, case_id: int,
               timeout: float | None = None) -> UploadResult:
        """Copy ``local_dir`` to ``<base>/<folder_name>`` so that it is complete or absent: the
        batch of one (``upload_many``). Two remote calls: copy, then verify-and-rename.

        Raises LocalFailure, Unreachable, RemoteError (TransferUnsupported: scp against an
        HPC without SFTP) or VerifyFailed.
        """
        outcome = self.upload_many([UploadCase(Path(local_dir), folder_name, case_id)], timeout=timeout)[0]
        if isinstance(outcome, RemoteFailure):
            raise outcome
        return outcome

    def upload_many(self, cases: Sequence[UploadCase], *, timeout: float | None = None) -> list[UploadOutcome]:
        """Copy each case folder to ``<base>/<folder_name>`` so that it is complete or absent.

        Each copy lands under a temporary name (``.mqic-upload-<case id>-<random>``); with
        ``transfer: tar`` all go up in ONE stream, with scp or rsync one copy each. Then ONE
        remote call verifies each by file count and bytes and renames it into place, removing
        the temporaries of that case's earlier attempts. One outcome per case, in order: its
        UploadResult, or its own failure: LocalFailure (its folder here), VerifyFailed (the
        others stand), or the failure of a copy or call it was part of. A cut stream or copy
        renames nothing: it leaves temporaries, which the next upload of the case removes.
        ``timeout`` (default ``upload_timeout_seconds``) is per case. ValueError for a case
        id given twice.
        """
        if len({case.case_id for case in cases}) != len(cases):
            raise ValueError(f"upload_many: a case id given twice: {[case.case_id for case in cases]}")
        outcomes: dict[int, UploadOutcome] = {}
        manifests: dict[int, tuple[int, int]] = {}
        for index, case in enumerate(cases):
            try:
                manifests[index] = folder_manifest(case.local_dir)
            except LocalFailure as exc:
                outcomes[index] = exc
        if manifests:
            try:
                base = self.base_dir()
            except RemoteFailure as exc:
                outcomes.update(dict.fromkeys(manifests, exc))
            else:
                staged = [_Staged(index, cases[index], f"{base}/{UPLOAD_PREFIX}{cases[index].case_id}-"
                                  f"{secrets.token_hex(4)}", f"{base}/{cases[index].folder_name}", *manifests[index])
                          for index in manifests]
                outcomes.update(self._send(staged, base, timeout or self.hpc.upload_timeout_seconds))
                outcomes.update(self._finalize_staged([s for s in staged if s.index not in outcomes]))
        return [outcomes[index] for index in range(len(cases))]

    def _send(self, staged: list[_Staged], base: str, limit: float) -> dict[int, RemoteFailure]:
        """Copy each staged case into its temporary folder; the failures, by index."""
        if self.hpc.transfer == "tar":
            try:
                self._upload_tar_many([(s.case.local_dir, s.temp) for s in staged], base, limit * len(staged))
            except TransferUnsupported as exc:
                return dict.fromkeys((s.index for s in staged), exc)
            except RemoteError as exc:
                return dict.fromkeys((s.index for s in staged), self._explain(exc, base, sum(s.size for s in staged)))
            except RemoteFailure as exc:
                return dict.fromkeys((s.index for s in staged), exc)
            return {}
        failures: dict[int, RemoteFailure] = {}
        transfer = self._upload_rsync if self.hpc.transfer == "rsync" else self._upload_scp
        for position, item in enumerate(staged):
            try:
                transfer(item.case.local_dir, item.temp, limit)
            except (TransferUnsupported, Unreachable, HostKeyMismatch) as exc:  # the rest would fail alike
                failures.update(dict.fromkeys((s.index for s in staged[position:]), exc))
                break
            except RemoteError as exc:
                failures[item.index] = self._explain(exc, base, item.size)
            except RemoteFailure as exc:
                failures[item.index] = exc
        return failures

    def _finalize_staged(self, staged: list[_Staged]) -> dict[int, UploadOutcome]:
        if not staged:
            return {}
        failures = self.finalize_many([(s.temp, s.final, s.files, s.size) for s in staged])
        return {s.index: failure or UploadResult(remote_dir=s.final, files=s.files, bytes=s.size)
                for s, failure in zip(staged, failures)}

    def _explain(self, error: RemoteError, base: str, size: int) -> RemoteError:
        """scp over SFTP says only "Failure": ask the HPC whether the folder is writable and has room."""
        try:
            out = self.run_script(DIAGNOSE_SCRIPT, base)
        except RemoteFailure:
            return error
        free = re.search(r"free_kb (\d+)", out)
        if free and int(free[1]) * 1024 < size:
            reason = f"No space left on device: {int(free[1])} KB free in {base}, the case needs {size // 1024} KB"
        elif not free:
            reason = out.strip()[-300:]
        else:
            return error
        return remote_error(error.argv, error.exit_code, f"{error.stderr.strip()}\n{reason}", error.stdout)

    def finalize_upload(self, temp: str, final: str, files: int, size: int) -> None:
        """Verify ``temp`` holds ``files`` files of ``size`` bytes, then rename it to ``final``: the
        batch of one (``finalize_many``). Raises VerifyFailed, or the call's typed failure."""
        failure = self.finalize_many([(temp, final, files, size)])[0]
        if failure is not None:
            raise failure

    def finalize_many(self, moves: Sequence[tuple[str, str, int, int]]) -> list[RemoteFailure | None]:
        """For each ``(temp, final, files, bytes)``: verify ``temp`` by file count and bytes, then rename
        it to ``final``, all in ONE remote call. One result per move, in order: None when it is in
        place, else its failure: VerifyFailed (``temp`` is left; the other moves stand), the
        typed RemoteError of its rename, or, for a move the call did not report, the call's own
        failure (BadOutput when it answered without that move's record)."""
        mark = f"~mqic-finalize-{secrets.token_hex(12)}~"
        failed: RemoteFailure | None = None
        try:
            text = self.run_script(FINALIZE_SCRIPT, mark, *(str(word) for move in moves for word in move))
        except RemoteError as exc:
            failed, text = exc, exc.stdout
        except RemoteFailure as exc:
            failed, text = exc, ""
        said = parse_finalize(text, mark)
        results: list[RemoteFailure | None] = []
        for index, (temp, final, _files, _size) in enumerate(moves):
            if index not in said:
                results.append(failed or BadOutput(f"upload finalize: no record for {final} in {text[-200:]!r}"))
                continue
            code, err = said[index]
            results.append(None if code == 0 else VerifyFailed(err.strip()) if code == VERIFY_MISMATCH_EXIT
                           else remote_error(["upload finalize", temp, final], code, err))
        return results

    def _transfer(self, command, limit: float, what: str) -> None:
        try:
            code, out, err = command.run(retcode=None, timeout=limit, stdin=subprocess.DEVNULL, new_session=True)
        except ProcessTimedOut:
            raise Unreachable(f"{what}: no progress within {limit:g}s") from None
        if code != 0:
            raise transfer_failure(what, code, err, out, host=self.hpc.host)

    def _upload_scp(self, local_dir: Path, temp: str, limit: float) -> None:
        self.ensure_master()
        scp = self.scp_command()["-r", "--", str(local_dir), f"{self.destination}:{temp}"]
        try:
            self._transfer(scp, limit, "scp upload")
        except Unreachable as exc:
            if SCP_CLOSED.search(str(exc)) and self._answers_without(temp):
                raise TransferUnsupported(["scp upload"], SSH_UNREACHABLE, SCP_WITHOUT_SFTP.format(
                    host=self.hpc.host)) from None
            raise

    def _answers_without(self, temp: str) -> bool:
        """True when a plain ssh command works and ``temp`` was never created: the host is
        up and scp closed before writing anything, as OpenSSH 9 scp does without SFTP."""
        try:
            self.run(["test", "!", "-e", temp])
        except RemoteFailure:
            return False  # unreachable, or scp had started writing: a real connection loss
        return True

    def _upload_tar(self, local_dir: Path, temp: str, limit: float) -> None:
        """One folder as a stream of one (``_upload_tar_many``)."""
        self._upload_tar_many([(local_dir, temp)], temp.rsplit("/", 1)[0], limit)

    def _upload_tar_many(self, pairs: Sequence[tuple[Path, str]], base: str, limit: float) -> None:
        """ONE tar stream over ssh for every ``(local folder, temporary folder in base)``.

        The archive is written here, folder after folder, links kept as links (as tar(1)
        writes them); each lands whole under its temporary name. A folder that cannot be read
        here is a LocalFailure (the stream is cut: the remote tar fails); the remote side's
        failure is typed by ``transfer_failure``; Unreachable after ``limit`` seconds.
        """
        self.ensure_master()
        names = [temp.rsplit("/", 1)[1] for _local, temp in pairs]
        remote = f"cd -- {shlex.quote(base)} && mkdir -p -- {' '.join(map(shlex.quote, names))} && tar -xf -"
        ssh = self.ssh_command()[self.destination, "--", remote].formulate()
        expired = threading.Event()
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(ssh, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            timer = threading.Timer(limit, lambda: (expired.set(), proc.kill()))
            timer.start()
            try:
                ours = _write_archive(proc.stdin, pairs, names)
                if ours is not None:
                    proc.kill()  # the stream is cut: nothing of it may look whole
                _close_quietly(proc.stdin)
                code = proc.wait()
            finally:
                timer.cancel()
            err.seek(0)
            said = err.read().decode("utf-8", "replace")
        if ours is not None:
            raise ours
        if expired.is_set():
            raise Unreachable(f"tar upload: no progress within {limit:g}s")
        if code != 0:
            raise transfer_failure("tar upload", code, said, host=self.hpc.host)

    def _upload_rsync(self, local_dir: Path, temp: str, limit: float) -> None:
        self.ensure_master()
        exe, *extra = self.hpc.ssh_command
        shell = " ".join(shlex.quote(w) for w in (exe, *self._common_options(), "-o", "ControlMaster=no",
                                                   "-p", str(self.hpc.port), *extra))
        rsync = local["rsync"]["-a", "--partial", "-e", shell, "--", f"{local_dir}/",
                               f"{self.destination}:{temp}/"]
        self._transfer(rsync, limit, "rsync upload")

    def download_results(self, remote_dir: str, patterns: Sequence[str], local_dir: Path, *,
                         timeout: float | None = None) -> list[str]:
        """Fetch the files matching ``patterns`` in ``remote_dir`` into ``local_dir``.

        Streams one tar archive over the shared connection and extracts it member by
        member through ``extract_member``, so nothing can land outside ``local_dir``.
        Returns the extracted names (possibly empty when nothing matched). Raises
        UnsafeMember (a BadOutput) naming the first refused member; members before it
        may already be in ``local_dir``.
        """
        if not patterns:
            return []
        landed = self._extract_stream(("sh", "-c", RESULTS_SCRIPT, "sh", remote_dir, *patterns),
                                      timeout or self.hpc.command_timeout_seconds, lambda member: local_dir,
                                      where=str(local_dir))
        return [name for _, name in landed]

    def download_many(self, wanted: Sequence[tuple[str, Path]], patterns: Sequence[str], *,
                      timeout: float | None = None) -> dict[int, list[str]]:
        """``download_results`` for several case folders ((remote folder, local folder) pairs) in ONE
        stream per parent folder on the HPC (one, for the cases of one ``remote_base_dir``).

        All or nothing per stream: returns, per index into ``wanted``, the names extracted into its
        local folder, for every folder of a stream that was read whole; a folder with nothing to
        fetch (no match, or missing) is left out, as is every folder of a stream that failed (cut,
        refused member, error), whose local folders are emptied again: such cases are fetched on
        their own with ``download_results``, which tells what is wrong.
        """
        groups: dict[str, list[int]] = {}
        for index, (remote_dir, _) in enumerate(wanted):
            path = PurePosixPath(remote_dir)
            if path.name and path.name not in (".", ".."):
                groups.setdefault(str(path.parent), []).append(index)
        fetched: dict[int, list[str]] = {}
        for parent, indices in groups.items():
            locals_by_name = {PurePosixPath(wanted[i][0]).name: (i, wanted[i][1]) for i in indices}
            try:
                fetched.update(self._download_stream(parent, locals_by_name, patterns, timeout))
            except (RemoteFailure, OSError):
                for _, local_dir in locals_by_name.values():
                    shutil.rmtree(local_dir, ignore_errors=True)
        return fetched

    def _download_stream(self, parent: str, locals_by_name: dict[str, tuple[int, Path]], patterns: Sequence[str],
                         timeout: float | None) -> dict[int, list[str]]:
        def place(member: tarfile.TarInfo) -> Path:
            folder, _, rest = member.name.partition("/")
            if folder not in locals_by_name or not rest:
                raise UnsafeMember(member.name, "not inside one of the folders asked for")
            member.name = rest
            local_dir = locals_by_name[folder][1]
            local_dir.mkdir(parents=True, exist_ok=True)
            return local_dir

        words = ("sh", "-c", RESULTS_MANY_SCRIPT, "sh", parent, str(len(locals_by_name)), *locals_by_name, *patterns)
        landed = self._extract_stream(words, (timeout or self.hpc.command_timeout_seconds) * max(1, len(locals_by_name)),
                                      place, where="the cases' local folders")
        index_of = {local_dir: index for index, local_dir in locals_by_name.values()}
        names: dict[int, list[str]] = {}
        for local_dir, name in landed:
            names.setdefault(index_of[local_dir], []).append(name)
        return names

    def _extract_stream(self, words: Sequence[str], timeout: float, place: Callable[[tarfile.TarInfo], Path], *,
                        where: str) -> list[tuple[Path, str]]:
        """Run ``words`` on the HPC over the shared connection and extract the tar archive it writes,
        member by member through ``extract_member``, each into the folder ``place`` gives it (``place``
        may rename the member, or refuse it with UnsafeMember). Returns (folder, name) per member.
        Raises UnsafeMember naming the first refused member (members before it may already be
        extracted), LocalFailure when writing ``where`` failed (not the host's doing), or the call's
        own failure; the call is killed after ``timeout`` seconds."""
        self.ensure_master()
        command = " ".join(shlex.quote(w) for w in words)
        ssh = self.ssh_command()[self.destination, "--", command]
        proc = ssh.popen(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, new_session=True)
        landed: list[tuple[Path, str]] = []
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
                for member in archive:
                    folder = place(member)
                    extract_member(archive, member, folder)
                    landed.append((folder, member.name))
        except UnsafeMember:
            proc.kill()
            proc.communicate()
            raise
        except OSError as exc:  # writing here failed (local disk full, folder gone): not the host's doing
            proc.kill()
            proc.communicate()
            raise LocalFailure(f"download results into {where}: {exc.strerror or exc}") from None
        except tarfile.TarError as exc:
            proc.wait()
            self._raise_for(proc, "download results", exc)
        finally:
            timer.cancel()
        proc.wait()
        self._raise_for(proc, "download results", None)
        return landed

    def _raise_for(self, proc, what: str, problem: Exception | None) -> None:
        err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
        if proc.returncode != 0:
            raise transfer_failure(what, proc.returncode, err, host=self.hpc.host)
        if problem is not None:
            raise BadOutput(f"{what}: not a tar stream ({problem})")
