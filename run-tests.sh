#!/usr/bin/env bash
# Runs the whole test suite (real sshd, real SQLite, real supervisord), installing what is missing,
# under the newest Python on the machine (`python3`, venv .venv) and then under Debian's own
# /usr/bin/python3 (venv .venv-debian): the project must work on both.
#   MQIC_TEST_PYTHON=newest|debian|both (default both) picks them; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

choice=${MQIC_TEST_PYTHON:-both}
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
  pythons=(newest)  # python3 on PATH is Debian's own: one run covers both
fi

failed=()
for which in "${pythons[@]}"; do
  venv=.venv; [ "$which" = debian ] && venv=.venv-debian
  echo "run-tests: $which Python: $("$venv/bin/python" --version) ($venv)"
  "$venv/bin/python" -m pytest -q "$@" || failed+=("$which")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "run-tests: FAILED under: ${failed[*]}" >&2
  exit 1
fi
