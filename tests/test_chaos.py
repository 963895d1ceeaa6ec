"""Nothing is lost: the short chaos run (the long one is ``bench/chaos.py``, see docs/chaos.md),
the pieces of the chaos tooling that must be right for its verdict to mean anything, and the
failures the chaos showed to be possible, pinned down one by one.
"""
from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from bench.chaos import (HOST_NAMES, BusySample, ChaosPlan, busy_figure, idle_reason, killed_keys, newly_killed,
                         run_chaos, two_hosts_config)
from bench.chaos_check import (EXIT_STATUS_RECORD, Expected, Verdict, check_foreign_tasks, exit_status_record,
                               read_starts, recording_starts)
from bench.chaos_hooks import ZONES, cases_in, is_add, is_finalize, is_upload
from sandbox.casegen import make_case
from shared.backends import SubmitItem, pueue_parse
from shared.backends.pueue import submit_batch
from shared.config import parse_config
from shared.remote import Remote, UploadCase
from shared.states import CaseStatus
from shared.store import get_case
from shared.worker import build_context
from tests.conftest import wait_until
from workers import poller, reaper, scanner, submitter


@pytest.mark.system
@pytest.mark.timeout(330)
def test_short_chaos_run_loses_nothing(tmp_path):
    plan = ChaosPlan(cases=24, duration=60, groups=3, kill_every=6, seed=7, settle_timeout=150)
    result = run_chaos(plan, tmp_path / "chaos")
    print(result.table())
    assert result.verdict.violations == [], "\n".join(result.verdict.violations)
    assert result.settled
    assert result.verdict.counts["cases"] == 24 and result.verdict.counts.get("lost", 0) == 0
    done = result.done
    for zone in result.unreached_zones:  # armed, but no worker died in it: reported, and tolerated once
        print(f"NOTE: danger zone {zone} was armed but no worker died in it")
    assert all(done.tokens[zone] >= 1 for zone in ZONES)
    assert len(result.unreached_zones) <= 1, f"danger zones never reached: {result.unreached_zones}"
    assert (done.outages["logins"], done.outages["all"], done.restarts, done.garbage_polls) == (1, 1, 1, 10)
    assert done.masters_cut >= 1 and done.poller_stops == 2 and len(done.foreign) == 1
    assert sum(done.lost_adds_armed.values()) == 3 and sum(result.lost_adds.values()) >= 1
    assert done.sigkills >= 8


@pytest.mark.system
@pytest.mark.timeout(330)
def test_short_two_host_chaos_run_loses_nothing_while_one_host_is_down(tmp_path):
    """Two sandbox hosts; gpu2 down for 30 s (every session killed) while cases drop and every
    one-host disturbance hits gpu1: nothing lost, run twice or failed, and gpu1 kept working."""
    # The outage outlasts a claim stranded by a killed submitter (LEASE_S, then the add's uncertainty),
    # and kills come every 10 s: with a kill every 6 s in a 20 s outage, both of gpu1's seats could be
    # held by dead submitters for the whole window and the "gpu1 kept working" check failed by chance.
    # Four seats: in the window the plan also loses three adds, each holding its seat until the add can
    # no longer land (by design); with two seats, a dead owner and two lost adds of one batch held both
    # for the whole 30 s once in a CI run here.
    plan = ChaosPlan(cases=24, duration=60, groups=4, kill_every=10, seed=11, settle_timeout=150, hosts=2,
                     host_down=30)
    result = run_chaos(plan, tmp_path / "chaos")
    print(result.table())
    assert result.verdict.violations == [], "\n".join(result.verdict.violations)
    assert result.settled
    counts, done = result.verdict.counts, result.done
    assert counts["cases"] == 24 and counts.get("lost", 0) == 0
    assert len(done.host_down_windows) == 1 and done.host_masters_cut == 1
    assert all(counts.get(f"completed_on:{host}", 0) > 0 for host in HOST_NAMES), counts
    assert done.started_on_gpu1_while_down > 0
    assert result.busy(True).counted + result.busy(True).left_out > 0  # gpu1 was sampled while gpu2 was down


# ---------------------------------------------------------------------------------------------
# The chaos tooling itself
# ---------------------------------------------------------------------------------------------

def test_a_task_killed_by_a_restart_counts_even_on_an_id_a_killed_task_had_before():
    """Found by the short two-host run: our requeue removed a killed task, the next add took its
    id, the restart killed that one, and the driver took it for the old one (compared by id): its
    case's second start was reported as run twice."""
    from datetime import datetime, timezone
    from shared.backends.model import TaskInfo, TaskState
    before = killed_keys([TaskInfo(0, "mqic_case_5", "gpu_a", TaskState.KILLED,
                                   start=datetime(2026, 1, 1, tzinfo=timezone.utc))])
    again = TaskInfo(0, "mqic_case_7", "gpu_a", TaskState.KILLED, start=datetime(2026, 1, 2, tzinfo=timezone.utc))
    still = TaskInfo(0, "mqic_case_5", "gpu_a", TaskState.KILLED, start=datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert newly_killed(before, [again]) == [again]
    assert newly_killed(before, [still]) == []


def test_the_two_host_config_names_both_sandboxes(tmp_path):
    from sandbox.hpc import config_data
    from sandbox.sshd import SshEndpoint
    groups = {"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}}
    paths = []
    for name, port in (("hpc", 2201), ("hpc2", 2202)):
        root = tmp_path / name
        endpoint = SshEndpoint("127.0.0.1", port, "me", root / "id", root / "known_hosts")
        data = config_data(root, endpoint, root / "bin" / "pueue", project_root=tmp_path, groups=groups)
        paths.append(root / "config.yaml")
        root.mkdir()
        paths[-1].write_text(yaml.safe_dump(data))
    config = parse_config(yaml.safe_load(two_hosts_config(tmp_path / "config.yaml", *paths, groups).read_text()),
                          tmp_path / "config.yaml")
    first, second = config.hosts
    assert (first.name, second.name) == HOST_NAMES
    assert (first.hpc.port, second.hpc.port) == (2201, 2202)
    assert first.hpc.remote_base_dir != second.hpc.remote_base_dir
    assert first.hpc.control_dir != second.hpc.control_dir
    assert first.hpc.pueue_command != second.hpc.pueue_command
    assert first.hpc.remote_command == second.hpc.remote_command  # one simulation-start log for both
    assert [g.name for g in first.groups] == [g.name for g in second.groups] == ["gpu_a", "gpu_b"]


def test_each_case_is_judged_by_the_outages_of_its_own_host():
    one_host = Expected(modes={}, outages=((1.0, 2.0),))
    assert one_host.outages_of(None) == one_host.outages_of("hpc") == ((1.0, 2.0),)
    two_hosts = Expected(modes={}, host_outages={"gpu1": ((1.0, 2.0),), "gpu2": ((5.0, 65.0),)})
    assert two_hosts.outages_of("gpu2") == ((5.0, 65.0),)
    assert two_hosts.outages_of("gpu1") == ((1.0, 2.0),)
    assert two_hosts.outages_of(None) == ()


def test_gpu1_counts_as_busy_only_when_every_group_runs_while_cases_wait():
    def sample(running, idle=(), waiting=3, down=True, cut=False):
        return BusySample(at=0, gpu2_down=down, gpu1_cut=cut, waiting=waiting, running=frozenset(running),
                          idle=tuple(idle))
    groups = ("gpu_a", "gpu_b")
    samples = [sample({"gpu_a", "gpu_b"}), sample({"gpu_a"}, idle=[("gpu_b", "claim")]),
               sample(set(), idle=[("gpu_a", "free"), ("gpu_b", "dead claim")]), sample(set(), waiting=0),
               sample(set(), cut=True), sample({"gpu_a", "gpu_b"}, down=False)]
    figure = busy_figure(samples, groups, gpu2_down=True)
    assert (figure.busy, figure.counted, figure.left_out) == (1, 3, 1)
    assert figure.idle == {"claim": 1, "free": 1, "dead claim": 1}
    assert figure.gpu_share == pytest.approx(3 / 6)
    assert busy_figure(samples, groups, gpu2_down=False).percent == 100.0
    assert "seat free 33 %" in figure.text()


@pytest.mark.system
def test_a_seat_held_by_a_dead_submitter_is_told_from_a_live_one():
    process = subprocess.Popen(["sleep", "30"])
    try:
        assert idle_reason(("submitting", f"submitter_0:{process.pid}")) == "claim"
    finally:
        process.kill()
        process.wait()
    assert idle_reason(("submitting", f"submitter_0:{process.pid}")) == "dead claim"
    assert idle_reason(("running", None)) == "no task"
    assert idle_reason(None) == "free"

SEEN: list[list[str]] | None = None  # argvs of the subprocesses started while a test records them


def _record_popen(event: str, args: tuple) -> None:
    if SEEN is not None and event == "subprocess.Popen":
        SEEN.append([str(word) for word in (args[1] or [])])


sys.addaudithook(_record_popen)  # audit hooks cannot be removed: this one only records while SEEN is a list


@pytest.mark.parametrize("transfer", ["scp", "tar", "rsync"])
def test_the_upload_zones_see_the_upload_whatever_the_transfer(remote_config, tmp_path, transfer):
    """mid_upload must fire for scp, rsync and the tar pipe (``ssh ... tar -C <upload> -xf -``),
    before_finalize only for the remote verify-and-rename, and neither for anything else."""
    global SEEN
    if shutil.which(transfer) is None:
        pytest.skip(f"{transfer} is not installed")
    remote = Remote(dataclasses.replace(remote_config.hosts[0].hpc, transfer=transfer))
    case = make_case(tmp_path / "cases", "patient 1", deliveries=1, layers_per_delivery=1)
    remote.base_dir()
    SEEN = []
    try:
        remote.upload(case, case.name, case_id=7)
    finally:
        seen, SEEN = SEEN, None
    assert [is_upload(argv) and is_finalize(argv) for argv in seen] == [False] * len(seen)
    assert sum(map(is_upload, seen)) == 1, seen
    assert sum(map(is_finalize, seen)) == 1, seen
    assert not any(map(is_add, seen))


def test_a_batch_upload_is_one_upload_and_one_finalize_carrying_each_case(remote_config, tmp_path):
    """The kills inside a batch: mid_upload and before_finalize see one call that carries both cases."""
    global SEEN
    remote = Remote(remote_config.hosts[0].hpc)
    cases = [make_case(tmp_path / "cases", f"patient {n}", deliveries=1, layers_per_delivery=1) for n in (1, 2)]
    remote.base_dir()
    SEEN = []
    try:
        remote.upload_many([UploadCase(case, case.name, case_id) for case_id, case in enumerate(cases, start=7)])
    finally:
        seen, SEEN = SEEN, None
    [upload] = [argv for argv in seen if is_upload(argv)]
    [finalize] = [argv for argv in seen if is_finalize(argv)]
    assert (cases_in(upload), cases_in(finalize)) == (2, 2)


class CaptureArgv:
    argv: list[str] = []

    def run(self, argv, *, timeout=None):
        self.argv = list(argv)
        return ""


def test_the_after_add_zone_sees_a_batch_of_adds_and_how_many_cases_it_carries():
    runner = CaptureArgv()
    submit_batch(runner, ["pueue"], [SubmitItem("gpu_a", f"mqic_case_{n}", f"/x/{n}", "run") for n in (3, 4)])
    assert is_add(runner.argv) and cases_in(runner.argv) == 2


def test_the_after_add_zone_sees_our_pueue_add():
    argv = pueue_parse.add_argv(["pueue"], group="gpu_a", label="mqic_case_3", workdir="/x", command="run")
    assert is_add(["ssh", "-o", "BatchMode=yes", "hpc", "--", shlex.join(argv)])
    assert not is_add(["ssh", "hpc", "--", "pueue group add gpu_a"])


@pytest.mark.system
def test_the_remote_command_records_every_simulation_start(tmp_path):
    log = tmp_path / "hpc dir" / "starts.log"
    log.parent.mkdir()
    template = recording_starts("true", log)
    for case_id in (3, 3, 12):
        subprocess.run(["sh", "-c", template.format(case_id=case_id, case_name="x", remote_dir="/x")], check=True)
    assert read_starts(log) == {3: 2, 12: 1}
    assert read_starts(tmp_path / "never written") == {}


def test_the_exit_status_record_is_read_from_the_remote_case_folder(tmp_path):
    assert exit_status_record(str(tmp_path)) is None
    (tmp_path / EXIT_STATUS_RECORD).parent.mkdir()
    (tmp_path / EXIT_STATUS_RECORD).write_text("0\n")
    assert exit_status_record(str(tmp_path)) == 0
    (tmp_path / EXIT_STATUS_RECORD).write_text("137 killed\n")
    assert exit_status_record(str(tmp_path)) == 137


def test_another_users_tasks_count_as_touched_when_killed_or_removed(hpc):
    h = hpc()
    h.pueue("parallel", "0", "-g", "default")
    commands = {}
    for seconds in ("0", "30", "30", "30", "30"):
        task_id = int(h.ctl("foreign-add", seconds))
        commands[task_id] = f"sleep {seconds}; exit 0"
    finished, killed, excused, running, removed = sorted(commands)

    def state(task_id: int) -> str:
        return next(iter(h.status()["tasks"][str(task_id)]["status"]))

    wait_until(lambda: [state(i) for i in sorted(commands)] == ["Done"] + ["Running"] * 4, message="tasks")
    h.pueue("kill", str(killed), str(excused), str(removed))
    wait_until(lambda: [state(i) for i in (killed, excused, removed)] == ["Done"] * 3, message="kills done")
    h.pueue("remove", str(removed))
    assert h.ctl("foreign-add", "--label", "mqic_case_9", "0") == f"{removed}\n"  # the freed top id, reused
    verdict = Verdict()
    check_foreign_tasks(pueue_parse.parse_status(h.pueue("status", "--json").stdout),
                        Expected(modes={}, foreign=commands, foreign_excused=frozenset({excused})), verdict)
    assert verdict.counts == {"foreign_touched": 2, "foreign_untouched": 3}
    assert verdict.violations == [
        f"another user's task {killed} ('sleep 30; exit 0') ended killed: someone killed it",
        f"another user's task {removed} ('sleep 30; exit 0') was removed: id now mqic_case_9 ('sleep 0; exit 0')"]


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
    assert submitter.host_ready(ctx, ctx.hosts["hpc"])
    sshd.stop(kill_sessions=True)
    try:
        for _ in range(4):
            submitter.tick(ctx, time.time())
    finally:
        sshd.start()
    case = get_case(ctx.conn, case.case_id)
    assert case.error_type == "Unreachable"
    assert case.status is CaseStatus.SUBMITTED, f"failed for good: {case.outcome}: {case.error_message}"
    assert reaper.probe_down_hosts(ctx, time.time() + reaper.PROBE_DOWN_SECONDS) == 1  # no claims there until then
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
