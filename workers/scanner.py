"""scanner: turns folders that stopped changing in the drop folder into ``submitted`` cases.

watchdog (inotify) only rings the doorbell; every pass rescans the drop folder, so
events dropped under load, folders that arrived while the scanner was down and
network shares are all seen. A folder is ready once its fingerprint (size and
mtime of every entry, recursively) stayed the same for the quiescence period, or
at once when the ready marker exists. Bad items are set aside in
``spool/rejected`` with a reason file, never dropped silently and never retried.
"""
from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from shared.doorbell import ring
from shared.logs import for_case
from shared.priority import priority_at_drop
from shared.spool import reconcile, reject, settle_folder
from shared.store import register_case
from shared.worker import Context, worker_main



class NotACase(Exception):
    """The item can never become a case; the message says why."""


@dataclass(frozen=True)
class Observation:
    fingerprint: tuple
    stable_since: float


def fingerprint(folder: Path) -> tuple:
    """(relative path, kind, size, mtime_ns) of every entry; raises NotACase for bad content."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            _check_entry(folder, path, info)
            entries.append((os.path.relpath(path, folder), stat.S_IFMT(info.st_mode),
                            info.st_size, info.st_mtime_ns))
    return tuple(sorted(entries))


def _raise(error: OSError) -> None:
    raise NotACase(f"unreadable: {error.filename}: {error.strerror}")


def _check_entry(folder: Path, path: str, info: os.stat_result) -> None:
    relative = os.path.relpath(path, folder)
    if stat.S_ISLNK(info.st_mode):
        target = os.path.realpath(path)
        where = "outside the case" if os.path.commonpath([target, os.path.realpath(folder)]) != \
            os.path.realpath(folder) else "inside the case"
        raise NotACase(f"contains a symlink leading {where}: {relative} -> {os.readlink(path)}")
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise NotACase(f"contains a special file (not a regular file or folder): {relative}")
    if stat.S_ISREG(info.st_mode) and not os.access(path, os.R_OK):
        raise NotACase(f"unreadable file: {relative}")


def classify(item: Path) -> None:
    """Raise NotACase when ``item`` in the drop folder can never be a case folder."""
    try:
        item.name.encode("utf-8")
    except UnicodeEncodeError:
        raise NotACase("the name is not valid UTF-8") from None
    if item.is_symlink():
        raise NotACase(f"is a symlink (to {os.readlink(item)}), not a folder; copy the real folder")
    if not item.is_dir():
        raise NotACase("is a file, not a folder; each case must be a folder")


def ready(ctx: Context, item: Path, now: float) -> bool:
    """True once ``item`` is complete: marker present, or unchanged for the quiescence period."""
    prints = fingerprint(item)
    if not any(kind == stat.S_IFREG for _path, kind, _size, _mtime in prints):
        raise_if_settled(ctx, item, prints, now, "is an empty folder (no files)")
        return False
    marker = ctx.config.scanner.ready_marker
    if marker and (item / marker).is_file():
        return True
    return settled(ctx, item, prints, now)


def settled(ctx: Context, item: Path, prints: tuple, now: float) -> bool:
    pending = ctx.memory.pending
    seen = pending.get(item.name)
    if seen is None or seen.fingerprint != prints:
        pending[item.name] = Observation(prints, now)
        return ctx.config.scanner.quiescence_period_seconds == 0
    return now - seen.stable_since >= ctx.config.scanner.quiescence_period_seconds


def raise_if_settled(ctx: Context, item: Path, prints: tuple, now: float, reason: str) -> None:
    if settled(ctx, item, prints, now):
        raise NotACase(reason)


def register(ctx: Context, item: Path, now: float) -> None:
    """Insert the ``submitted`` row, then move the folder into the spool (under the lock)."""
    with ctx.spool.lock():
        if not item.is_dir():
            return  # removed or taken meanwhile
        priority, why = priority_at_drop(ctx.config.scanner, item)
        case = register_case(ctx.conn, case_name=item.name, source_path=str(item), now=now,
                             worker=ctx.name, priority=priority, why=why)
        settle_folder(ctx.conn, ctx.spool, case.case_id, now=now, worker=ctx.name)
    ring(ctx.spool.root, "submitter")
    ctx.log.info("case %d registered: %r (%s)", case.case_id, item.name, case.priority,
                 extra=for_case(case.case_id, "register"))


def set_aside(ctx: Context, item: Path, reason: str, now: float) -> None:
    try:
        dest = reject(ctx.spool, item, reason, now=now)
    except FileNotFoundError:
        return
    ctx.log.error("rejected %r: %s (moved to %s)", item.name, reason, dest,
                  extra={"operation": "scan", "error_type": "NotACase"})


def scan_item(ctx: Context, item: Path, now: float) -> int:
    try:
        classify(item)
        if not ready(ctx, item, now):
            return 0
    except NotACase as problem:
        set_aside(ctx, item, str(problem), now)
        ctx.memory.pending.pop(item.name, None)
        return 1
    except FileNotFoundError:
        ctx.memory.pending.pop(item.name, None)
        return 0  # removed while we looked
    register(ctx, item, now)
    ctx.memory.pending.pop(item.name, None)
    return 1


def in_progress_names(ctx: Context) -> set[str]:
    rows = ctx.conn.execute("SELECT source_path FROM cases WHERE spool_stage = 'incoming'")
    return {os.path.basename(r[0]) for r in rows}


def tick(ctx: Context, now: float) -> int:
    """One pass: repair interrupted registrations, then look at every item in the drop folder."""
    done = reconcile(ctx.conn, ctx.spool, now=now, worker=ctx.name)
    watch = ctx.config.scanner.watch_path
    skip = in_progress_names(ctx)
    names = sorted(n for n in os.listdir(watch) if not n.startswith(".") and n not in skip)
    for gone in set(ctx.memory.pending) - set(names):
        ctx.memory.pending.pop(gone)
    for name in names:
        if ctx.stop.is_set():
            break
        try:
            done += scan_item(ctx, watch / name, now)
        except OSError as exc:
            ctx.log.error("cannot take %r: %s", name, exc, extra=for_case(None, "scan", exc))
    return done


def idle_wait(ctx: Context) -> float:
    """Sleep until the next rescan, or sooner while a folder is waiting to settle."""
    if ctx.memory.pending:
        return min(0.5, ctx.config.scanner.quiescence_period_seconds / 4 or 0.5)
    return ctx.config.scanner.rescan_interval_seconds


def start_doorbell(ctx: Context) -> None:
    """watchdog observer whose only job is to wake the loop."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    class Doorbell(FileSystemEventHandler):
        def on_any_event(self, event) -> None:
            ctx.wake.set()

    observer = Observer()
    observer.schedule(Doorbell(), str(ctx.config.scanner.watch_path), recursive=True)
    observer.daemon = True
    observer.start()


def main(argv=None) -> int:
    return worker_main("mqic-scanner", "scanner", tick, argv, prepare=start_doorbell,
                       idle_wait=idle_wait, drain=True)


if __name__ == "__main__":
    sys.exit(main())
