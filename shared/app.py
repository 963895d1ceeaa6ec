"""What every program does first: read ``--config`` and fail with exit code 2 on a bad file."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from shared.config import Config, default_config_path, load_config
from shared.errors import ConfigError

EXIT_CONFIG = 2


def config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="config file (default: $MQIC_CONFIG or config/config.yaml)")


def load_or_exit(path: str | None, program: str) -> Config:
    """Load the config, or print one clear line per problem to stderr and exit 2."""
    try:
        return load_config(path or default_config_path())
    except ConfigError as exc:
        for problem in str(exc).splitlines():
            print(f"{program}: config error: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def worker_args(program: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=program)
    config_argument(parser)
    parser.add_argument("--once", action="store_true", help="run one pass and exit")
    parser.add_argument("--name", default=None, help="worker name (default: the program name)")
    return parser.parse_args(argv)
