"""Upgrading in place: the state of the previous release's install (made by its own code, see
tests/data/upgrade/make_fixture.py) is run by this code under real supervisord against the sandbox HPC:
the database is migrated on start, every case is intact, and the cases that were waiting run."""
from __future__ import annotations

import json
import shutil
import sqlite3
import tarfile
from pathlib import Path

import pytest
import yaml

from sandbox.sshd import free_port
from shared.db import SCHEMA_VERSION, connect
from tests.conftest import wait_until
from tests.test_e2e import Supervisor

pytestmark = pytest.mark.system  # every test here starts real processes

FIXTURES = Path(__file__).parent / "data" / "upgrade"
RELEASE = "release-4425a1f"  # the landed main before this release: schema 7


def unpack(release: str) -> dict:
    manifest = json.loads((FIXTURES / f"{release}.json").read_text())
    root = Path(manifest["root"])
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with tarfile.open(FIXTURES / f"{release}.tar.gz") as archive:
        archive.extractall(root)
    return manifest


def schema_of(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def test_the_previous_releases_database_and_spool_run_on_after_the_upgrade(hpc, tmp_path):
    manifest = unpack(RELEASE)
    root = Path(manifest["root"])
    database = root / "database" / "mqi_communicator.db"
    assert schema_of(database) == manifest["schema"] <= SCHEMA_VERSION
    sandbox = hpc(groups={"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}},
                  main_loop={"interval_seconds": 0.3})
    data = yaml.safe_load(sandbox.config_path.read_text())
    data["database"]["path"], data["spool"]["path"] = str(database), str(root / "spool")
    data["scanner"]["watch_path"] = str(root / "incoming")
    data["metrics"] = {"port": free_port()}
    config_path = tmp_path / "upgraded.yaml"
    config_path.write_text(yaml.safe_dump(data))
    (tmp_path / "system").mkdir()
    system = Supervisor(tmp_path / "system", config_path)
    system.start()
    try:
        conn = connect(database, readonly=True)
        waiting = [c["case_id"] for c in manifest["cases"].values() if c["status"] == "submitted"]
        marks = ",".join("?" * len(waiting))
        wait_until(lambda: conn.execute(f"SELECT COUNT(*) FROM cases WHERE case_id IN ({marks})"
                                        " AND status = 'completed'", waiting).fetchone()[0] == len(waiting),
                   timeout=120, interval=0.5, message="the cases waiting before the upgrade completed")
        assert schema_of(database) == SCHEMA_VERSION
        for name, before in manifest["cases"].items():
            row = conn.execute("SELECT * FROM cases WHERE case_id = ?", (before["case_id"],)).fetchone()
            assert row["case_name"] == name
            events = conn.execute("SELECT COUNT(*) FROM case_events WHERE case_id = ?",
                                  (before["case_id"],)).fetchone()[0]
            if before["status"] == "submitted":
                assert row["outcome"] == "success" and Path(row["case_path"]).is_dir()
                continue
            now = {key: row[key] for key in ("status", "priority", "outcome", "exit_code", "spool_stage",
                                             "case_path")}
            assert now == {key: before[key] for key in now}, name
            assert bool(row["needs_review"]) == before["needs_review"], name
            assert events == before["events"], name  # the upgrade itself changed nothing of the ended cases
            assert Path(row["case_path"]).is_dir(), name
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        system.shutdown()
        shutil.rmtree(manifest["root"], ignore_errors=True)
