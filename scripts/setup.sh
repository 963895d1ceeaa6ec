#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks (as root), then the venvs with the project in them.
#   bash scripts/setup.sh [newest] [debian]     (no argument: newest)
#     newest: .venv        from `python3` on PATH (the newest Python on the machine)
#     debian: .venv-debian from Debian's own /usr/bin/python3 (3.11.2 on Debian 12)
# Every dependency at the exact version in constraints.txt (scripts/update-constraints.sh renews it).
# Idempotent: a second run only re-installs the project when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PYTHON=/usr/bin/python3
wanted=("${@:-newest}")

wants() { [[ " ${wanted[*]} " == *" $1 "* ]]; }

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null || missing+=(openssh-client)
command -v rsync >/dev/null || missing+=(rsync)
command -v tar >/dev/null || missing+=(tar)
if wants debian; then
  [ -x "$DEBIAN_PYTHON" ] || missing+=(python3)
  # Debian keeps ensurepip (which `python3 -m venv` needs) in python3-venv.
  { [ -x "$DEBIAN_PYTHON" ] && "$DEBIAN_PYTHON" -c 'import ensurepip' 2>/dev/null; } || missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: please install these Debian packages first: ${missing[*]}" >&2
    exit 1
  fi
fi

# A real single-node Slurm for sandbox/slurm.py and its tests (they skip when it is missing).
# Only as root: a non-root setup goes on without it.
slurm_missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge \
            slurmdbd:slurmdbd mariadbd:mariadb-server; do
  command -v "${pair%%:*}" >/dev/null || slurm_missing+=("${pair#*:}")
done
if [ ${#slurm_missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # In a container, policy-rc.d keeps apt from starting the system-wide daemons; the sandbox
    # runs its own copies in a private folder and uses nothing the packages put in /etc.
    apt-get install -y -qq --no-install-recommends "${slurm_missing[@]}" >/dev/null
  else
    echo "setup: the Slurm tests will be skipped; as root, install: ${slurm_missing[*]}" >&2
  fi
fi

# What only the tests need: headless Chromium and its driver (tests/test_e2e_web.py), sshfs for a
# real FUSE share that can hang (tests/test_e2e_share.py), systemd-analyze to check the units of
# `mqic service`. Only as root: a non-root setup goes on without them (those tests then skip).
test_missing=()
[ -x /usr/bin/chromium ] || test_missing+=(chromium)
[ -x /usr/bin/chromedriver ] || test_missing+=(chromium-driver)
command -v sshfs >/dev/null || test_missing+=(sshfs)
command -v systemd-analyze >/dev/null || test_missing+=(systemd)
if [ ${#test_missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${test_missing[@]}" >/dev/null
  else
    echo "setup: some tests will be skipped; as root, install: ${test_missing[*]}" >&2
  fi
fi

make_venv() {  # make_venv DIR PYTHON
  local venv=$1 python=$2
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
  fi
  if [ ! -f "$venv/.mqic-installed" ] || [ pyproject.toml -nt "$venv/.mqic-installed" ] \
     || [ constraints.txt -nt "$venv/.mqic-installed" ] || [ sandbox/pyproject.toml -nt "$venv/.mqic-installed" ]; then
    "$venv/bin/pip" install -q -c constraints.txt -e ./sandbox -e '.[dev]'
    touch "$venv/.mqic-installed"
  fi
}

if wants newest; then make_venv .venv python3; fi
if wants debian; then make_venv .venv-debian "$DEBIAN_PYTHON"; fi
