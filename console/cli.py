"""``mqic``: the operator's command line."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from shared.app import config_argument, load_or_exit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqic", description="MQI Communicator operator commands")
    config_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="totals per status and GPU slots")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_or_exit(args.config, "mqic")
    print(f"config ok: {config.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
