"""The results share for the chaos run and the share tests: a real sshfs (FUSE) mount, and its checks.

``SshfsShare`` mounts ``<root>/share-server`` at ``<root>/tps`` through an sshd of its own
(not the sandbox HPC's, whose outages are a separate disturbance). Its sftp-server runs
under a unique name, so it can be stopped (SIGSTOP): every call on the mount then blocks in
the kernel, as on an SMB/NFS hard mount whose server stopped answering. ``detach`` unmounts
it (lazily), so ``tps`` is a plain empty folder, as when a share is not mounted.

``check_deliveries`` judges the share at the end of a run: every completed case due for
delivery was delivered exactly there with the contents recorded when it was fetched, nothing
else is in the share (no temporaries, no stranger), and nothing was written underneath the
mount point. ``stalled_seats`` measures how long GPU seats stayed zombie when they became so
while the share was in trouble.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from sandbox.procs import processes_with

SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")


def sshfs_missing() -> str | None:
    """Why a real FUSE share cannot be made here, or None."""
    if shutil.which("sshfs") is None:
        return "sshfs is not installed (scripts/setup.sh installs it)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not SFTP_SERVER.exists():
        return f"{SFTP_SERVER} is missing (openssh-sftp-server)"
    return None


class SshfsShare:
    """``<root>/tps``: sshfs of ``<root>/share-server`` through ``sshd`` (a started SandboxSshd)."""

    def __init__(self, sshd, root: Path):
        self.server, self.mount = root / "share-server", root / "tps"
        self.server.mkdir(parents=True, exist_ok=True)
        self.mount.mkdir(exist_ok=True)
        self.token = f"mqic-sftp-{os.getpid()}-{time.time_ns()}"
        self.link = root / self.token
        self.link.symlink_to(SFTP_SERVER)
        self.endpoint = sshd.endpoint

    def attach(self) -> None:
        ep = self.endpoint
        options = (f"IdentityFile={ep.identity_file},UserKnownHostsFile={ep.known_hosts_file},"
                   f"StrictHostKeyChecking=yes,BatchMode=yes,IdentitiesOnly=yes,sftp_server={self.link}")
        subprocess.run(["sshfs", "-p", str(ep.port), "-o", options, f"{ep.user}@{ep.host}:{self.server}",
                        str(self.mount)], check=True, timeout=30, capture_output=True)
        if not os.path.ismount(self.mount):
            raise RuntimeError(f"sshfs did not mount {self.mount}")

    def server_pid(self) -> int:
        pids = [pid for pid in processes_with(self.token)
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == str(self.link).encode()]
        if len(pids) != 1:
            raise RuntimeError(f"expected one sftp-server for {self.mount}, found {pids}")
        return pids[0]

    def hang(self) -> None:
        """The share's server stops answering (every call on the mount blocks)."""
        os.kill(self.server_pid(), signal.SIGSTOP)

    def answer(self) -> None:
        for pid in processes_with(self.token):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def detach(self) -> None:
        """Unmount (lazily): ``tps`` is a plain empty folder again."""
        self.answer()
        subprocess.run(["fusermount", "-u", "-z", str(self.mount)], capture_output=True, timeout=30)

    def close(self) -> None:
        self.detach()


def _content(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in folder.rglob("*") if p.is_file()}


def check_deliveries(db_path: Path, share: SshfsShare) -> Counter:
    """``delivered``, ``undelivered`` (due, not delivered), ``misdelivered`` (content differs from the
    fetch record, or a folder no delivered case names), ``leftovers`` (``.mqic-*`` temporaries) and
    ``underneath`` (files under the unmounted mount point). Call with the share detached."""
    from shared.db import connect
    conn = connect(db_path, readonly=True)
    try:
        since = conn.execute("SELECT value FROM settings WHERE key = 'results.deliver_since'").fetchone()
        rows = conn.execute("SELECT case_name, result_checksums, delivered_at, completed_at FROM cases"
                            " WHERE status = 'completed'").fetchall()
    finally:
        conn.close()
    found = Counter()
    names = {entry.name for entry in share.server.iterdir()}
    delivered = set()
    for row in rows:
        if row["delivered_at"] is None:
            found["undelivered"] += since is not None and row["completed_at"] >= float(since[0])
            continue
        delivered.add(row["case_name"])
        record = {k: (v["size"], v["sha256"]) for k, v in json.loads(row["result_checksums"]).items()}
        folder = share.server / row["case_name"]
        ok = folder.is_dir() and _content(folder) == record
        found["delivered" if ok else "misdelivered"] += 1
    found["leftovers"] = sum(name.startswith(".mqic-") for name in names)
    found["misdelivered"] += len({n for n in names if not n.startswith(".mqic-")} - delivered)
    found["underneath"] = sum(1 for _ in share.mount.rglob("*")) if not os.path.ismount(share.mount) else 0
    return found


def stalled_seats(db_path: Path, windows: list[tuple[float, float]], limit: float) -> tuple[int, float]:
    """(seats that became zombie inside a share-trouble window and stayed so longer than ``limit`` s,
    the longest such zombie time)."""
    from shared.db import connect
    conn = connect(db_path, readonly=True)
    try:
        rows = conn.execute(
            "SELECT z.at, (SELECT MIN(f.at) FROM slot_events f WHERE f.host = z.host AND f.pueue_group = z.pueue_group"
            " AND f.seat = z.seat AND f.event_id > z.event_id AND f.from_status = 'zombie') AS freed"
            " FROM slot_events z WHERE z.to_status = 'zombie'").fetchall()
    finally:
        conn.close()
    spans = [(freed or time.time()) - at for at, freed in rows if any(b <= at <= e for b, e in windows)]
    return sum(span > limit for span in spans), max(spans, default=0.0)
