#!/usr/bin/env python3
"""Rewrite README.md's configuration table from the config key declarations (config.py, each scheduler's).

    scripts/config-table.py           rewrite the table in README.md (between its config-table markers)
    scripts/config-table.py --check   change nothing; exit 1 when README's table differs from the declarations

Edit a key's default or help where it is declared (its ``setting(...)`` in shared/config.py, or in a scheduler's
module under shared/backends/), then run this.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.config import readme_with_config_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README's table is not up to date")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    readme = args.readme.read_text(encoding="utf-8")
    wanted = readme_with_config_table(readme)
    if wanted == readme:
        return 0
    if args.check:
        print(f"{args.readme}: the configuration table differs from the declarations; run scripts/config-table.py",
              file=sys.stderr)
        return 1
    args.readme.write_text(wanted, encoding="utf-8")
    print(f"{args.readme}: configuration table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
