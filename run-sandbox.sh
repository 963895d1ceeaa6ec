#!/usr/bin/env bash
# Starts the whole system against the built-in sandbox HPC (a local sshd + the pueue stand-in),
# drops three demo cases and opens mqic-top. Stop with:  ./run-sandbox.sh stop
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export MQIC_CONFIG="$PWD/.sandbox/config.yaml"
mkdir -p run logs

if [ "${1:-}" = "stop" ]; then
  .venv/bin/supervisorctl -c supervisord.conf shutdown || true
  .venv/bin/mqic sandbox down --root .sandbox
  exit 0
fi

.venv/bin/mqic sandbox up --root .sandbox
if ! .venv/bin/supervisorctl -c supervisord.conf status >/dev/null 2>&1; then
  .venv/bin/supervisord -c supervisord.conf
fi
for i in 1 2 3; do
  name="demo_$(date +%H%M%S)_$i"
  .venv/bin/python -m sandbox.casegen .sandbox/incoming "$name" --seconds 20 --marker _CASE_READY >/dev/null
done
if [ -t 1 ]; then
  exec .venv/bin/mqic-top
else
  sleep 5
  .venv/bin/mqic-top --once
fi
