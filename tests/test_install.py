"""What an install shows of itself: the release, the schema of the code and of the database."""
from __future__ import annotations

import sqlite3

from shared.db import SCHEMA_VERSION, connect
from shared.version import package_version
from tests.conftest import cli, make_config


def test_version_names_the_release_and_both_schemas(tmp_path, capsys):
    config = make_config(tmp_path)
    code, out, _ = cli(capsys, config, "--version")
    assert code == 0
    assert out.startswith(f"mqic {package_version()}, database schema {SCHEMA_VERSION} (")
    assert "not created yet" in out
    connect(config.database_path).close()
    assert "up to date" in cli(capsys, config, "--version")[1]


def test_version_says_an_older_database_is_migrated_on_start(tmp_path, capsys):
    config = make_config(tmp_path)
    config.database_path.parent.mkdir(parents=True)
    with sqlite3.connect(config.database_path) as old:
        old.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    _, out, _ = cli(capsys, config, "--version")
    assert f"schema {SCHEMA_VERSION - 1}, migrated when a worker starts" in out


def test_version_works_without_a_valid_config(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("scanner: [")
    from console.cli import main
    try:
        main(["--config", str(tmp_path / "bad.yaml"), "--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "no valid config" in capsys.readouterr().out
