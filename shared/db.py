"""SQLite connection, transactions and forward-only schema migrations.

One ``connect()`` sets WAL, ``busy_timeout``, ``synchronous=NORMAL`` and foreign
keys, and brings the schema up to date. Connections are passed explicitly.
Writers use ``transaction()`` (``BEGIN IMMEDIATE``); readers such as the monitor
open with ``readonly=True`` (``query_only``) and never migrate.
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from shared.errors import MqicError

CASE_STATUSES = "'submitted','submitting','running','completed','failed'"
SLOT_STATUSES = "'available','assigned','zombie'"
OUTCOMES = ("'success','failed','killed','timed_out','failed_to_spawn','vanished',"
            "'cancelled','submit_error','rejected'")
STAGES = "'incoming','queued','active','done','failed'"

# A row whose recorded spool stage disagrees with its status (see shared.spool).
STAGE_MISMATCH = ("spool_stage != CASE status WHEN 'submitted' THEN 'queued' WHEN 'submitting' THEN 'queued'"
                  " WHEN 'running' THEN 'active' WHEN 'completed' THEN 'done' ELSE 'failed' END")

# Each entry moves the schema from version i to i+1. Never edit a released entry:
# append a new one.
MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema.
    f"""
    CREATE TABLE cases (
        case_id INTEGER PRIMARY KEY AUTOINCREMENT,
        case_name TEXT NOT NULL,
        case_path TEXT NOT NULL,
        source_path TEXT NOT NULL,
        spool_stage TEXT NOT NULL CHECK (spool_stage IN ({STAGES})),
        status TEXT NOT NULL CHECK (status IN ({CASE_STATUSES})),
        progress REAL NOT NULL DEFAULT 0,
        pueue_group TEXT,
        pueue_task_id INTEGER,
        remote_dir TEXT,
        submitted_at REAL NOT NULL,
        status_updated_at REAL NOT NULL,
        started_at REAL,
        completed_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        claimed_by TEXT,
        lease_until REAL,
        outcome TEXT CHECK (outcome IS NULL OR outcome IN ({OUTCOMES})),
        exit_code INTEGER,
        error_type TEXT,
        error_message TEXT,
        log_tail TEXT
    );
    CREATE TABLE gpu_resources (
        pueue_group TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ({SLOT_STATUSES})),
        assigned_case_id INTEGER REFERENCES cases(case_id),
        gpu TEXT,
        updated_at REAL NOT NULL
    );
    CREATE TABLE case_events (
        event_id INTEGER PRIMARY KEY AUTOINCREMENT,
        case_id INTEGER NOT NULL REFERENCES cases(case_id),
        from_status TEXT,
        to_status TEXT NOT NULL,
        at REAL NOT NULL,
        worker TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE slot_events (
        event_id INTEGER PRIMARY KEY AUTOINCREMENT,
        pueue_group TEXT NOT NULL,
        from_status TEXT,
        to_status TEXT NOT NULL,
        case_id INTEGER,
        at REAL NOT NULL,
        worker TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX cases_by_status ON cases(status, submitted_at, case_id);
    CREATE INDEX events_by_case ON case_events(case_id, event_id);
    """,
    # 2: operator review flags, worker heartbeats, and the indexes the monitor needs.
    """
    ALTER TABLE cases ADD COLUMN needs_review INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE cases ADD COLUMN review_reason TEXT;
    CREATE TABLE workers (
        name TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat REAL NOT NULL
    );
    CREATE INDEX cases_by_update ON cases(status_updated_at);
    CREATE INDEX cases_for_review ON cases(needs_review) WHERE needs_review = 1;
    """,
    # 3: pre-staging: a waiting case already uploaded (verified) while every GPU was busy.
    """
    ALTER TABLE cases ADD COLUMN staged_at REAL;
    CREATE INDEX cases_incoming ON cases(case_id) WHERE spool_stage = 'incoming';
    """ + f"CREATE INDEX cases_misplaced ON cases(case_id) WHERE {STAGE_MISMATCH};",
    # 4: what each worker last saw of the HPC (read by mqic-top and the exporter).
    """
    ALTER TABLE workers ADD COLUMN remote_ok INTEGER;
    ALTER TABLE workers ADD COLUMN remote_checked_at REAL;
    ALTER TABLE workers ADD COLUMN remote_error TEXT;
    """,
    # 5: issue 10: the link between a case and its remote task.
    # running_since: our clock when the case went running (a cheap bound for timeouts, which
    # are decided on the HPC's clock); add_uncertain_until: until then an add whose answer was
    # lost may still land, so "no task" proves nothing; stop_requested_at: SIGTERM sent.
    """
    ALTER TABLE cases ADD COLUMN running_since REAL;
    ALTER TABLE cases ADD COLUMN add_uncertain_until REAL;
    ALTER TABLE cases ADD COLUMN stop_requested_at REAL;
    UPDATE cases SET running_since = status_updated_at WHERE status = 'running';
    """,
    # issue 12: priority, results delivery, retention, drains, notices and their counters.
    """
    ALTER TABLE cases ADD COLUMN priority TEXT NOT NULL DEFAULT 'normal' CHECK (priority IN ('normal','urgent'));
    ALTER TABLE cases ADD COLUMN delivered_at REAL;
    ALTER TABLE cases ADD COLUMN delivered_to TEXT;
    ALTER TABLE cases ADD COLUMN delivery_attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE cases ADD COLUMN next_delivery_at REAL;
    ALTER TABLE cases ADD COLUMN delivery_error TEXT;
    ALTER TABLE cases ADD COLUMN result_checksums TEXT;
    ALTER TABLE cases ADD COLUMN acknowledged_at REAL;
    ALTER TABLE cases ADD COLUMN remote_removed_at REAL;
    ALTER TABLE cases ADD COLUMN local_removed_at REAL;
    CREATE INDEX cases_undelivered ON cases(completed_at) WHERE status = 'completed' AND delivered_at IS NULL;
    CREATE INDEX cases_remote_kept ON cases(completed_at)
        WHERE status IN ('completed', 'failed') AND remote_removed_at IS NULL AND remote_dir IS NOT NULL;
    CREATE INDEX cases_local_kept ON cases(completed_at) WHERE status = 'completed' AND local_removed_at IS NULL;
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE drains (
        host TEXT PRIMARY KEY,
        since REAL NOT NULL,
        drained_by TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE notices (
        notice_id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        case_id INTEGER,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        claimed_by TEXT,
        lease_until REAL,
        sent_at REAL,
        gave_up_at REAL,
        last_error TEXT
    );
    CREATE INDEX notices_due ON notices(next_attempt_at) WHERE sent_at IS NULL AND gave_up_at IS NULL;
    INSERT INTO settings (key, value, updated_at)
        SELECT 'notify.cursor', COALESCE(MAX(event_id), 0), 0 FROM case_events;
    """,
    # 7: several hosts and slots with depth (issue 11). A slot row is one seat of a
    # (host, group) that holds ``depth`` cases; rows of the one host of older versions
    # carry host '' until a worker names them (``seats.adopt_unnamed_host``).
    f"""
    CREATE TABLE seats (
        slot_id INTEGER PRIMARY KEY AUTOINCREMENT,
        host TEXT NOT NULL,
        pueue_group TEXT NOT NULL,
        seat INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL CHECK (status IN ({SLOT_STATUSES})),
        assigned_case_id INTEGER REFERENCES cases(case_id),
        gpu TEXT,
        updated_at REAL NOT NULL,
        UNIQUE (host, pueue_group, seat)
    );
    INSERT INTO seats (host, pueue_group, seat, status, assigned_case_id, gpu, updated_at)
        SELECT '', pueue_group, 0, status, assigned_case_id, gpu, updated_at FROM gpu_resources;
    DROP TABLE gpu_resources;
    ALTER TABLE seats RENAME TO gpu_resources;
    CREATE INDEX slots_by_case ON gpu_resources(assigned_case_id) WHERE assigned_case_id IS NOT NULL;
    ALTER TABLE slot_events ADD COLUMN host TEXT NOT NULL DEFAULT '';
    ALTER TABLE slot_events ADD COLUMN seat INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE cases ADD COLUMN host TEXT;
    UPDATE cases SET host = '' WHERE pueue_group IS NOT NULL OR remote_dir IS NOT NULL;
    CREATE TABLE host_reach (
        host TEXT PRIMARY KEY,
        ok INTEGER NOT NULL,
        checked_at REAL NOT NULL,
        checked_by TEXT NOT NULL,
        error TEXT,
        down_since REAL
    );
    """,
    # issue 21: the GPUs themselves (nvidia-smi). ``gpus``: the newest reading per (host, GPU
    # index), kept when the host stops answering (its age says how stale it is); times in
    # ``host_time``/``idle_since`` are the HPC's clock, ``seen_at`` ours. ``blocks_claims``:
    # the claim hands none of this GPU's seats out (lost, or a foreign process with
    # ``gpus.avoid_foreign``). ``gpu_history``: one row per GPU per reading, pruned after a day.
    """
    CREATE TABLE gpus (
        host TEXT NOT NULL,
        gpu_index INTEGER NOT NULL,
        uuid TEXT NOT NULL DEFAULT '',
        utilization REAL,
        memory_used_mb REAL,
        memory_total_mb REAL,
        temperature REAL,
        answering INTEGER NOT NULL DEFAULT 1,
        error TEXT,
        processes TEXT NOT NULL DEFAULT '[]',
        foreign_processes INTEGER NOT NULL DEFAULT 0,
        idle_since REAL,
        host_time REAL,
        seen_at REAL NOT NULL,
        blocks_claims INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (host, gpu_index)
    );
    CREATE TABLE gpu_history (
        host TEXT NOT NULL,
        gpu_index INTEGER NOT NULL,
        at REAL NOT NULL,
        utilization REAL,
        memory_used_mb REAL,
        temperature REAL,
        answering INTEGER NOT NULL
    );
    CREATE INDEX gpu_history_by_time ON gpu_history(at);
    CREATE INDEX gpu_history_by_gpu ON gpu_history(host, gpu_index, at);
    """,
    # 9: a host whose key ssh refused is its own state, not an outage (issue 16): ``problem``
    # 'host_key' until a call gets through again (``liveness.note_remote``).
    """
    ALTER TABLE host_reach ADD COLUMN problem TEXT;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(MqicError):
    """The database was written by a newer version of this program."""


class IntegrityError(MqicError):
    """``PRAGMA integrity_check`` reported damage."""


def connect(path: str | Path, *, readonly: bool = False, busy_timeout_ms: int = 10_000,
            migrate: bool = True) -> sqlite3.Connection:
    """Open the database at ``path`` with the house pragmas.

    Writers (default) get WAL, ``synchronous=NORMAL``, foreign keys and an
    up-to-date schema. ``readonly=True`` opens an existing file in
    ``query_only`` mode and never writes. Rows come back as ``sqlite3.Row``.
    """
    path = Path(path)
    if readonly:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                               isolation_level=None, timeout=busy_timeout_ms / 1000)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_ms / 1000)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
        return conn
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    if migrate:
        migrate_schema(conn)
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolls back on any exception.

    Re-entrant: inside an open transaction it simply joins it, so helpers that
    each use ``transaction()`` can be combined into one atomic step.
    """
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate_schema(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Apply the missing migrations up to ``target``; return the resulting version."""
    with transaction(conn):
        current = schema_version(conn)
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(f"database schema version {current} is newer than this "
                               f"program's {SCHEMA_VERSION}; upgrade MQI Communicator")
        for version in range(current, target):
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        return schema_version(conn)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def check_integrity(conn: sqlite3.Connection) -> None:
    """Raise IntegrityError unless ``PRAGMA integrity_check`` says ok."""
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    if rows != ["ok"]:
        raise IntegrityError("database integrity check failed: " + "; ".join(rows[:5]))
