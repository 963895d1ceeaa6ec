#!/usr/bin/env bash
# Runs the tests, installing what is missing (scripts/setup.sh), in two tiers:
#   fast tier    tests that start no process (tick-level workers, parsers, store, config, CLI in-process)
#   system tier  real sshd, the pueue stand-in, supervisord, a real Slurm (tests marked `system`)
#
#   ./run-tests.sh          the fast tier under the newest Python on the machine (`python3`, venv .venv),
#                           then EVERY test (both tiers) under Debian's own /usr/bin/python3 (.venv-debian),
#                           the Python hospital workstations run. This is what CI runs (.ci/run).
#   ./run-tests.sh --fast   the fast tier only, under both Pythons.
#   MQIC_TEST_PYTHON=newest|debian   only that Python, which then runs every test (or the fast tier with
#                           --fast). Other arguments go to pytest.
#   MQIC_TEST_WORKERS=N     pytest-xdist workers for a run of every test (default 2, one per core here: the
#                           system tier mostly waits on real processes); each module runs whole on one worker
#                           (--dist loadfile, see tests/conftest.py). 0 runs every test in this one process.
set -euo pipefail
cd "$(dirname "$0")"

fast_only=false
if [ "${1:-}" = --fast ]; then fast_only=true; shift; fi

choice=${MQIC_TEST_PYTHON:-both}
workers=${MQIC_TEST_WORKERS:-2}
case "$workers" in
  ''|*[!0-9]*) echo "run-tests: MQIC_TEST_WORKERS must be a number, not '$workers'" >&2; exit 2 ;;
esac
case "$choice" in
  newest) pythons=(newest) ;;
  debian) pythons=(debian) ;;
  both)
    pythons=(newest)
    if [ ! -x /usr/bin/python3 ] && ! command -v apt-get >/dev/null; then
      echo "run-tests: no /usr/bin/python3 and no apt-get here: testing the newest Python only" >&2
    else
      pythons+=(debian)
    fi ;;
  *) echo "run-tests: MQIC_TEST_PYTHON must be newest, debian or both, not '$choice'" >&2; exit 2 ;;
esac
bash scripts/setup.sh "${pythons[@]}"

identity() { "$1" -c 'import sys; print(sys.version, sys.base_prefix)'; }
if [ "${#pythons[@]}" = 2 ] && [ "$(identity .venv/bin/python)" = "$(identity .venv-debian/bin/python)" ]; then
  pythons=(debian)  # python3 on PATH is Debian's own: one run covers both
fi

run() {  # run WHICH TIER [pytest args...]
  local which=$1 tier=$2; shift 2
  local venv=.venv; [ "$which" = debian ] && venv=.venv-debian
  echo "run-tests: $which Python $("$venv/bin/python" --version | cut -d' ' -f2) ($venv): $tier"
  if [ "$tier" = fast ]; then
    MQIC_TEST_TIER=fast "$venv/bin/python" -m pytest -q -m "not system" "$@"
  elif [ "$workers" = 0 ]; then
    "$venv/bin/python" -m pytest -q "$@"
  else
    "$venv/bin/python" -m pytest -q -n "$workers" --dist loadfile "$@"
  fi
}

failed=()
for which in "${pythons[@]}"; do
  tier="every test"
  if $fast_only || { [ "${#pythons[@]}" = 2 ] && [ "$which" = newest ]; }; then tier=fast; fi
  SECONDS=0
  run "$which" "$tier" "$@" || failed+=("$which ($tier)")
  echo "run-tests: $which ($tier) took ${SECONDS} s"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "run-tests: FAILED under: ${failed[*]}" >&2
  exit 1
fi
