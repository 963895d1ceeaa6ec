#!/usr/bin/env bash
# Re-resolves every dependency (and the test tools) to its newest release in a throw-away venv and
# writes the exact versions to constraints.txt, which scripts/setup.sh installs from. Run it on purpose
# (a dependency update), then run ./run-tests.sh before committing the new constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install -q --upgrade pip
"$scratch/venv/bin/pip" install -q -e '.[test]'
{
  echo "# Exact versions of every dependency, made by scripts/update-constraints.sh; scripts/setup.sh installs with -c."
  "$scratch/venv/bin/pip" freeze --exclude-editable
} > constraints.txt
echo "constraints.txt updated; run ./run-tests.sh before committing it"
