"""The web dashboard program: serves ``console.web.app`` with waitress on ``web.listen``.

Refuses to start (exit 2, one line) when actions are on and ``web.token_file`` is missing or not
mode 0600. SIGTERM (supervisord's stop) ends it; it keeps no state, so a restart loses nothing.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from waitress import serve

from shared.app import EXIT_CONFIG, config_argument, load_or_exit
from shared.logs import for_case, setup_logging
from console.web.app import create_app
from console.web.guard import TokenFileError, guard_for

THREADS = 6  # 20 polling browsers need few: every poll is answered from the shared one-second snapshot

log = logging.getLogger("mqic.web")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqic-web", description="The web dashboard of MQI Communicator")
    config_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_or_exit(args.config, "mqic-web")
    setup_logging(config.logging, "web")
    try:
        guard = guard_for(config.web)
    except TokenFileError as exc:
        print(f"mqic-web: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    web = config.web
    log.info("serving the dashboard on http://%s:%d/ (%s)", web.host, web.port,
             "actions on" if guard.actions else guard.reason, extra=for_case(None, "serve"))
    serve(create_app(config, guard), host=web.host, port=web.port, threads=THREADS, ident="mqic-web",
          clear_untrusted_proxy_headers=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
