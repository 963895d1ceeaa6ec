"""The spool: case folders on disk, one stage folder per lifecycle phase.

Invariant: a case whose row says status S lives at ``spool/<stage_for(S)>/<folder_name>``
and its row records that stage in ``spool_stage`` and that path in ``case_path``.
A row in stage ``incoming`` still has its folder at ``source_path`` (the drop folder).

Folders move only by ``os.rename`` inside one file system (a drop folder on another
file system is first copied into ``spool/.staging`` and renamed from there). Every
change that must stay consistent with a move (a status change followed by a move)
runs under ``Spool.lock()``; a crash between the two leaves a row whose
``spool_stage`` disagrees with its status, which ``reconcile`` repairs.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from shared.db import STAGE_MISMATCH, transaction
from shared.processes import pid_alive
from shared.states import CaseStatus
from shared.store import Case, case_from_row, flag_for_review, get_case

STAGE_OF_STATUS = {
    CaseStatus.SUBMITTED: "queued",
    CaseStatus.SUBMITTING: "queued",
    CaseStatus.RUNNING: "active",
    CaseStatus.COMPLETED: "done",
    CaseStatus.FAILED: "failed",
}
STAGES = ("queued", "active", "done", "failed")
REJECTED = "rejected"
STAGING = ".staging"
LOCK_TIMEOUT_SECONDS = 60


def stage_for(status: CaseStatus) -> str:
    return STAGE_OF_STATUS[status]


@dataclass(frozen=True)
class Spool:
    root: Path

    def ensure(self) -> "Spool":
        for name in (*STAGES, REJECTED, STAGING):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        return self

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def path_for(self, case: Case, stage: str | None = None) -> Path:
        return self.root / (stage or stage_for(case.status)) / case.folder_name

    @contextmanager
    def lock(self) -> Iterator[None]:
        """The file lock that serialises row-plus-folder changes across processes.

        Re-entrant within a thread, so a step may hold it around ``move_case``.
        """
        with _lock_for(self.root / ".spool.lock"):
            yield

    def staging_dir(self, name: str) -> Path:
        """A private scratch folder on the spool's file system (removed by the caller)."""
        return self.root / STAGING / f"{name}.{os.getpid()}"


_LOCKS: dict[Path, FileLock] = {}


def _lock_for(path: Path) -> FileLock:
    # One FileLock per path and process: its counter makes nested use re-entrant.
    if path not in _LOCKS:
        _LOCKS[path] = FileLock(str(path), timeout=LOCK_TIMEOUT_SECONDS)
    return _LOCKS[path]


STAGING_OWNER = re.compile(r"\.(\d+)(?:\.partial)?$")


def sweep_staging(spool: Spool) -> int:
    """Remove scratch folders in ``spool/.staging`` whose owning process is gone (a SIGKILL
    skips their cleanup); return how many were removed."""
    removed = 0
    for entry in (spool.root / STAGING).iterdir():
        owner = STAGING_OWNER.search(entry.name)
        if owner and not pid_alive(int(owner[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed




def merge_into(source: Path, dest: Path) -> list[str]:
    """Move every file under ``source`` to the same relative place under ``dest``."""
    moved = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source)
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest / relative)
        moved.append(str(relative))
    return moved


def move_folder(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest`` (which must not exist); copy first across file systems.

    Raises FileNotFoundError when ``src`` is gone (a lost race) and FileExistsError
    when ``dest`` already exists.
    """
    if dest.exists():
        raise FileExistsError(errno.EEXIST, "destination exists", str(dest))
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        staging = dest.parent.parent / STAGING / f"{dest.name}.{os.getpid()}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(src, staging, symlinks=True)
        os.rename(staging, dest)
        shutil.rmtree(src)


def reject(spool: Spool, src: Path, reason: str, *, now: float) -> Path:
    """Set a bad drop-folder item aside in ``spool/rejected`` with a reason file beside it."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    dest = spool.stage_dir(REJECTED) / f"{stamp}_{src.name}"
    suffix = 1
    while dest.exists() or dest.is_symlink():
        dest = dest.with_name(f"{stamp}_{suffix}_{src.name}")
        suffix += 1
    os.rename(src, dest)
    Path(f"{dest}.reason.txt").write_text(f"{src}\n{reason}\n", encoding="utf-8")
    return dest


def _current_location(case: Case) -> Path:
    return Path(case.source_path if case.spool_stage == "incoming" else case.case_path)


def settle_folder(conn: sqlite3.Connection, spool: Spool, case_id: int, *, now: float,
                  worker: str) -> Path | None:
    """Put the folder of ``case_id`` where its status says, and record that in its row.

    Call under ``spool.lock()``. Idempotent: repairs any disagreement a crash left
    (row moved but folder not, or folder moved but row not). A folder found nowhere
    flags the case for review and returns None.
    """
    case = get_case(conn, case_id)
    if case is None:
        return None
    target = spool.path_for(case)
    if case.spool_stage == stage_for(case.status) and target.exists():
        return target
    if not target.exists():
        source = _find_folder(spool, case)
        if source is None:
            flag_for_review(conn, case, f"case folder not found (expected {target})", now=now,
                            worker=worker)
            return None
        move_folder(source, target)
    with transaction(conn):
        conn.execute("UPDATE cases SET spool_stage = ?, case_path = ? WHERE case_id = ? AND status = ?",
                     (stage_for(case.status), str(target), case.case_id, case.status.value))
    return target


def _find_folder(spool: Spool, case: Case) -> Path | None:
    candidates = [_current_location(case), Path(case.source_path)]
    candidates += [spool.stage_dir(stage) / case.folder_name for stage in STAGES]
    for candidate in candidates:
        if candidate.is_dir() and not candidate.is_symlink():
            return candidate
    return None


MISPLACED_SQL = f"SELECT * FROM cases WHERE {STAGE_MISMATCH} ORDER BY case_id LIMIT ?"


def misplaced_cases(conn: sqlite3.Connection, limit: int = 100) -> list[Case]:
    """Cases whose recorded spool stage disagrees with their status."""
    return [case_from_row(r) for r in conn.execute(MISPLACED_SQL, (limit,))]


def reconcile(conn: sqlite3.Connection, spool: Spool, *, now: float, worker: str,
              limit: int = 100) -> int:
    """Repair every row/folder disagreement a crash can leave; return how many were fixed."""
    fixed = 0
    for case in misplaced_cases(conn, limit):
        with spool.lock():
            if settle_folder(conn, spool, case.case_id, now=now, worker=worker) is not None:
                fixed += 1
    return fixed
