"""Which MQI Communicator this is: the package version and the database schema it speaks."""
from __future__ import annotations

import sqlite3
from importlib import metadata
from pathlib import Path

from shared.db import SCHEMA_VERSION

DISTRIBUTION = "mqi-communicator"


def package_version() -> str:
    """The installed version (pyproject.toml's ``version``), or ``unknown`` outside an install."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def database_schema(path: Path) -> int | None:
    """``PRAGMA user_version`` of the database at ``path`` (read-only); None when there is no file."""
    if not path.is_file():
        return None
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def describe(database: Path | None) -> str:
    """``mqic 0.1.0, database schema 7`` plus what the configured database file holds."""
    text = f"mqic {package_version()}, database schema {SCHEMA_VERSION}"
    if database is None:
        return text + " (no valid config: the database file was not looked at)"
    found = database_schema(database)
    if found is None:
        return text + f" ({database}: not created yet)"
    if found < SCHEMA_VERSION:
        return text + f" ({database}: schema {found}, migrated when a worker starts)"
    if found > SCHEMA_VERSION:
        return text + f" ({database}: schema {found}, written by a NEWER release: upgrade this one)"
    return text + f" ({database}: up to date)"
