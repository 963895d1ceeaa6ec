"""Make the state of a previous release's install: run with THAT release's code on the path.

    git worktree add /tmp/mqic-rel <commit of the release>
    PYTHONPATH=/tmp/mqic-rel python tests/data/upgrade/make_fixture.py <release name>

writes tests/data/upgrade/<release name>.tar.gz: /tmp/mqic-upgrade-fixture (database and spool; the
database records absolute paths, so tests/test_upgrade.py unpacks it at the same place) and
<release name>.json, what each case was, to compare with after the upgrade. Cases: two waiting
(one urgent), one completed with its results, one failed, one completed and flagged for review.
"""
from __future__ import annotations

import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

import shared
from sandbox.casegen import make_case as make_moqui_case
from shared.config import parse_config
from shared.lifecycle import move_case
from shared.spool import settle_folder
from shared.states import CaseStatus
from shared.store import flag_for_review, get_case, register_case
from shared.worker import build_context

ROOT = Path("/tmp/mqic-upgrade-fixture")
HERE = Path(__file__).resolve().parent
T0 = 1_780_000_000.0
WALKS = {
    "waiting normal": [],
    "waiting urgent": [],
    "done case": [CaseStatus.SUBMITTING, CaseStatus.RUNNING, CaseStatus.COMPLETED],
    "broken case": [CaseStatus.SUBMITTING, CaseStatus.RUNNING, CaseStatus.FAILED],
    "flagged case": [CaseStatus.SUBMITTING, CaseStatus.RUNNING, CaseStatus.COMPLETED],
}
FINAL_FIELDS = {
    CaseStatus.COMPLETED: {"outcome": "success", "exit_code": 0, "completed_at": T0 + 300, "host": "hpc",
                           "pueue_task_id": 7, "pueue_group": "gpu_a", "remote_dir": "/tmp/mqic-upgrade-remote/x"},
    CaseStatus.FAILED: {"outcome": "failed", "exit_code": 3, "completed_at": T0 + 300, "host": "hpc",
                        "error_message": "exit code 3", "log_tail": "Error: beam model missing\n"},
}


def config():
    data = {"root_dir": str(ROOT), "scanner": {"watch_path": "incoming"},
            "hpc": {"host": "127.0.0.1", "user": "root", "identity_file": "keys/id",
                    "known_hosts_file": "keys/known_hosts", "remote_base_dir": "/tmp/mqic-upgrade-remote"},
            "pueue": {"groups": {"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}}},
            "database": {"path": "database/mqi_communicator.db"}, "spool": {"path": "spool"},
            "logging": {"file": "logs/mqic.log"}}
    return parse_config(data, ROOT / "config.yaml")


def make_case(ctx, name: str, moves: list[CaseStatus], at: float) -> dict:
    folder = ctx.config.scanner.watch_path / name
    if not moves:  # a waiting case runs after the upgrade: a real (fake MOQUI) case folder
        make_moqui_case(ctx.config.scanner.watch_path, name, seconds=0.5, batches=3, deliveries=1,
                        layers_per_delivery=2, ptn_bytes=2_000, rp_bytes=2_048, mgn_bytes=512)
    (folder / "output").mkdir(parents=True, exist_ok=True)
    (folder / "plan.in").write_text(f"plan of {name}\n")
    if moves and moves[-1] is CaseStatus.COMPLETED:
        (folder / "output" / "dose.raw").write_bytes(b"\x01" * 4096)
    case = register_case(ctx.conn, case_name=name, source_path=str(folder), now=at, worker="scanner",
                         priority="urgent" if "urgent" in name else "normal")
    with ctx.spool.lock():
        settle_folder(ctx.conn, ctx.spool, case.case_id, now=at, worker="scanner")
    for index, to in enumerate(moves):
        fields = FINAL_FIELDS.get(to, {}) if index == len(moves) - 1 else {}
        assert move_case(ctx.conn, ctx.spool, get_case(ctx.conn, case.case_id), to, now=at + 10 * (index + 1),
                         worker="test", fields=fields)
    if name.startswith("flagged"):
        flag_for_review(ctx.conn, get_case(ctx.conn, case.case_id), "results look odd", now=at + 60, worker="reaper")
    row = get_case(ctx.conn, case.case_id)
    return {"case_id": row.case_id, "status": row.status.value, "priority": row.priority, "outcome": row.outcome,
            "exit_code": row.exit_code, "spool_stage": row.spool_stage, "case_path": row.case_path,
            "needs_review": bool(row.needs_review), "events": ctx.conn.execute(
                "SELECT COUNT(*) FROM case_events WHERE case_id = ?", (row.case_id,)).fetchone()[0]}


def main(release: str) -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    ctx = build_context(config(), "fixture")
    cases = {name: make_case(ctx, name, moves, T0 + 100 * i) for i, (name, moves) in enumerate(WALKS.items())}
    schema = ctx.conn.execute("PRAGMA user_version").fetchone()[0]
    ctx.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ctx.conn.close()
    with tarfile.open(HERE / f"{release}.tar.gz", "w:gz") as archive:
        archive.add(ROOT / "database", arcname="database")
        archive.add(ROOT / "spool", arcname="spool")
    (HERE / f"{release}.json").write_text(json.dumps(
        {"release": release, "made_with": str(Path(shared.__file__).parent.parent), "made_at": time.time(),
         "schema": schema, "root": str(ROOT), "cases": cases}, indent=2, sort_keys=True) + "\n")
    print(f"{release}: schema {schema}, {len(cases)} cases, code from {Path(shared.__file__).parent}")


if __name__ == "__main__":
    main(sys.argv[1])
