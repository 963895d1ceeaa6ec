"""The whole system as an ordinary account: the sandbox HPC, supervisord and the four workers started
by a user created for the test (runuser), cases dropped and completed, every file it wrote owned by
that user, and nothing needing root. This is how a hospital's IT runs it (see README, "Install on a
workstation")."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from sandbox.sshd import free_port
from tests.conftest import wait_until

pytestmark = pytest.mark.system  # every test here starts real processes

REPO = Path(__file__).resolve().parents[1]


def runnable_python(user: str) -> Path | None:
    """A venv python of this checkout that ``user`` can run (pyenv's lives under /root)."""
    for candidate in (Path(sys.prefix), REPO / ".venv-debian", REPO / ".venv"):
        python = candidate / "bin" / "python"
        if python.exists() and subprocess.run(["runuser", "-u", user, "--", str(python), "-c", "import shared, sandbox"],
                                              capture_output=True, timeout=60).returncode == 0:
            return candidate
    return None


@pytest.fixture
def account():
    if os.geteuid() != 0 or shutil.which("runuser") is None or shutil.which("useradd") is None:
        pytest.skip("creating and becoming another user needs root, useradd and runuser")
    name = f"mqic{uuid.uuid4().hex[:8]}"
    home = Path(f"/tmp/{name}-home")
    subprocess.run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/sh", name],
                   check=True, capture_output=True, timeout=60)
    yield name, home
    subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, timeout=30)
    subprocess.run(["userdel", "-r", name], capture_output=True, timeout=60)
    shutil.rmtree(home, ignore_errors=True)


def as_user(user: str, home: Path, *argv: str, env: dict | None = None, timeout: float = 120) -> str:
    result = subprocess.run(["runuser", "-u", user, "--", "env", f"HOME={home}", *(f"{k}={v}" for k, v in
                                                                                  (env or {}).items()), *argv],
                            capture_output=True, text=True, cwd=home, timeout=timeout)
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result.stdout


def completed(database: Path) -> int:
    """Completed cases so far (0 while the workers are still creating the database)."""
    try:
        with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT COUNT(*) FROM cases WHERE status = 'completed'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_the_whole_system_runs_as_an_ordinary_user(account):
    user, home = account
    venv = runnable_python(user)
    if venv is None:
        pytest.skip(f"no venv of this checkout is readable by {user} (run scripts/setup.sh debian)")
    python, box, app = str(venv / "bin" / "python"), home / "box", home / "app"
    as_user(user, home, python, "-m", "console.cli", "--config", str(home / "none.yaml"), "sandbox", "up",
            "--root", str(box))
    config_path = box / "config.yaml"
    data = yaml.safe_load(config_path.read_text())
    data["main_loop"]["interval_seconds"] = 0.3
    data["scanner"].update(quiescence_period_seconds=0.5, rescan_interval_seconds=1)
    data["metrics"]["port"] = free_port()
    data["web"] = {"listen": f"127.0.0.1:{free_port()}"}
    as_user(user, home, python, "-c", f"import pathlib,sys; pathlib.Path({str(config_path)!r}).write_text(sys.argv[1])",
            yaml.safe_dump(data))
    as_user(user, home, "mkdir", "-p", str(app / "run"), str(app / "logs"))
    as_user(user, home, "cp", str(REPO / "supervisord.conf"), str(app / "supervisord.conf"))
    as_user(user, home, "ln", "-s", str(venv), str(app / ".venv"))
    env = {"MQIC_CONFIG": str(config_path)}
    supervisorctl = [str(app / ".venv" / "bin" / "supervisorctl"), "-c", str(app / "supervisord.conf")]
    as_user(user, home, str(app / ".venv" / "bin" / "supervisord"), "-c", str(app / "supervisord.conf"), env=env)
    try:
        names = ["first", "second", "third"]
        for name in names:
            as_user(user, home, python, "-m", "sandbox.casegen", str(box / "incoming"), name, "--marker",
                    "_CASE_READY", "--seconds", "0.5")
        database = Path(data["database"]["path"])
        wait_until(lambda: completed(database) == len(names), timeout=180, interval=0.5,
                   message="every case completed as the user")
        status = as_user(user, home, python, "-m", "console.cli", "status", env=env)
        assert "completed 3" in status
        programs = as_user(user, home, *supervisorctl, "status", env=env)
        assert programs.count("RUNNING") == 6, programs  # four workers, the exporter and the web dashboard
        uid = int(as_user(user, home, "id", "-u").strip())
        written = [database, Path(data["spool"]["path"]), Path(data["logging"]["file"]).parent, app / "logs"]
        for top in written:
            for path in [top, *top.rglob("*")] if top.is_dir() else [top]:
                assert path.lstat().st_uid == uid, f"{path} is not owned by {user}"
        ours = f"{app}/.venv/bin/python -m workers\\."
        as_root = subprocess.run(["pgrep", "-u", "0", "-f", ours], capture_output=True, text=True)
        as_account = subprocess.run(["pgrep", "-u", user, "-f", ours], capture_output=True, text=True)
        assert as_root.stdout.split() == [] and len(as_account.stdout.split()) == 5
    finally:
        subprocess.run(["runuser", "-u", user, "--", *supervisorctl, "shutdown"], capture_output=True,
                       cwd=home, timeout=120, env={**os.environ, **env})
        subprocess.run(["runuser", "-u", user, "--", python, "-m", "console.cli", "--config", str(config_path),
                        "sandbox", "down", "--root", str(box)], capture_output=True, cwd=home, timeout=120)
