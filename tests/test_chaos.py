"""Nothing is lost: the short chaos run (the long one is ``bench/chaos.py``, see docs/chaos.md),
plus the two failures the chaos showed to be possible, pinned down one by one.
"""
from __future__ import annotations

import shlex
import time

import pytest
import yaml

from bench.chaos import ZONES, ChaosPlan, run_chaos
from sandbox.casegen import make_case
from shared.config import parse_config
from shared.states import CaseStatus
from shared.store import get_case
from shared.worker import build_context
from tests.conftest import wait_until
from workers import poller, scanner, submitter


@pytest.mark.timeout(290)
def test_short_chaos_run_loses_nothing(tmp_path):
    plan = ChaosPlan(cases=24, duration=50, groups=3, kill_every=4, seed=7, settle_timeout=150)
    result = run_chaos(plan, tmp_path / "chaos")
    print(result.table())
    assert result.verdict.violations == [], "\n".join(result.verdict.violations)
    assert result.settled
    assert result.verdict.counts["cases"] == 24 and result.verdict.counts.get("lost", 0) == 0
    assert {zone: result.zone_hits[zone] >= 1 for zone in ZONES} == dict.fromkeys(ZONES, True)
    assert (result.done.outages, result.done.restarts, result.done.garbage_polls) == (2, 1, 10)
    assert result.done.sigkills >= 8


def context_with(h, name: str, **sections):
    data = yaml.safe_load(h.config_path.read_text())
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return build_context(parse_config(data, h.config_path), name)


def registered_case(ctx, name: str, mode: str = "ok"):
    make_case(ctx.config.scanner.watch_path, name, atomic=True, seconds=0.2, batches=1, deliveries=1,
              layers_per_delivery=1, mode=mode)
    now = time.time()
    scanner.tick(ctx, now)
    scanner.tick(ctx, now + 100)
    return get_case(ctx.conn, max(r[0] for r in ctx.conn.execute("SELECT case_id FROM cases")))


def test_an_outage_longer_than_every_retry_fails_nothing(hpc, sshd):
    """README, Recovery: "HPC unreachable: nothing fails." Bug: retry_or_fail counts an
    Unreachable upload as an attempt, so an outage longer than max_attempts backoffs fails the
    case for good (outcome submit_error)."""
    ctx = context_with(hpc(), "submitter", main_loop={"max_attempts": 2, "backoff_base_seconds": 0})
    case = registered_case(ctx, "patient")
    assert submitter.groups_ready(ctx)
    sshd.stop(kill_sessions=True)
    try:
        for _ in range(4):
            submitter.tick(ctx, time.time())
    finally:
        sshd.start()
    case = get_case(ctx.conn, case.case_id)
    assert case.error_type == "Unreachable"
    assert case.status is CaseStatus.SUBMITTED, f"failed for good: {case.outcome}: {case.error_message}"
    submitter.tick(ctx, time.time())
    assert get_case(ctx.conn, case.case_id).status is CaseStatus.RUNNING


CRASHING_ADD = """#!/bin/sh
# pueue whose daemon dies after it stored the task but before it answered (like `pueue-standin-ctl
# restart` landing in the middle of an add): the task exists, the client only sees the error.
if [ "$1" = add ]; then
  {pueue} "$@" > /dev/null
  printf 'Error: Failed to receive message from daemon\\n\\nCaused by:\\n    0: Connection reset by peer (os error 104)\\n' >&2
  exit 1
fi
exec {pueue} "$@"
"""


def test_a_daemon_crash_during_pueue_add_neither_fails_nor_duplicates_the_case(hpc):
    """Bug: the submitter reads every RemoteError of `pueue add` as "pueue refused, no task was
    created" and fails (or retries) the case. "Failed to receive message from daemon" means the
    request may have been stored: the case must be left for recovery by label, like Unreachable."""
    h = hpc(groups={"gpu_a": {"gpu": 0}})
    shim = h.root / "pueue-crashing-add"
    shim.write_text(CRASHING_ADD.format(pueue=shlex.quote(str(h.bin["pueue"]))))
    shim.chmod(0o755)
    ctx = context_with(h, "submitter", hpc={"pueue_command": shlex.quote(str(shim))})
    case = registered_case(ctx, "stored but unanswered")
    submitter.tick(ctx, time.time())
    assert len(h.tasks_labelled(case.label)) == 1            # the add happened
    after = get_case(ctx.conn, case.case_id)
    assert after.status is CaseStatus.SUBMITTING, f"{after.status.value}: {after.outcome}: {after.error_message}"
    submitter.tick(ctx, time.time() + 1)                       # recovery by label
    after = get_case(ctx.conn, case.case_id)
    assert after.status is CaseStatus.RUNNING and len(h.tasks_labelled(case.label)) == 1


LOG_FAILS_WHILE_FLAGGED = """#!/bin/sh
# pueue whose `log` fails while a flag file exists (the daemon restarting between two calls)
if [ "$1" = log ] && [ -e {flag} ]; then
  printf 'Error: Failed to receive message from daemon\\n' >&2
  exit 1
fi
exec {pueue} "$@"
"""


def test_a_failed_case_keeps_its_log_tail_when_pueue_log_fails_on_that_pass(hpc):
    """Found by the long chaos run (a pueued restart between the poller's `status` and `log`
    calls). Bug: the poller fails the case at once with an empty log tail, and the simulator's
    FATAL ERROR line is lost for good. It should wait a pass for the log (the task stays failed)."""
    h = hpc(groups={"gpu_a": {"gpu": 0}})
    flag, shim = h.root / "log-broken", h.root / "pueue-flaky-log"
    shim.write_text(LOG_FAILS_WHILE_FLAGGED.format(flag=shlex.quote(str(flag)),
                                                   pueue=shlex.quote(str(h.bin["pueue"]))))
    shim.chmod(0o755)
    ctx = context_with(h, "poller", hpc={"pueue_command": shlex.quote(str(shim))})
    case = registered_case(ctx, "fails, log unreadable", mode="fail")
    submitter.tick(ctx, time.time())
    wait_until(lambda: h.tasks_labelled(case.label)[0]["status"].get("Done"), message="task failed")
    flag.touch()
    poller.tick(ctx, time.time())
    flag.unlink()
    poller.tick(ctx, time.time())
    after = get_case(ctx.conn, case.case_id)
    assert (after.status, after.outcome, after.exit_code) == (CaseStatus.FAILED, "failed", 1)
    assert "FATAL ERROR" in (after.log_tail or ""), f"log tail lost: {after.log_tail!r}"
