#!/usr/bin/env bash
# Runs the whole test suite (real sshd, real SQLite, real supervisord), installing what is missing.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
