"""The real workers, driven tick by tick, on a real single-node Slurm over the sandbox sshd.

The same ticks as tests/test_workers.py; only the config differs (``hpc.backend: slurm``,
two slots on the sandbox's ``gpu`` partition with ``gres: gpu:1`` each). Skipped, saying
why, only where Slurm cannot run here.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from shared.backends import slurm
from shared.states import CaseStatus, SlotStatus
from shared.store import case_events, get_case
from tests.conftest import get_slot, skip_unless_slurm_can_run, wait_until
from tests.test_workers import ctx_for, poll_until_final, submitted
from workers import poller, reaper, submitter

pytestmark = pytest.mark.system  # every test here starts real processes


def test_a_case_runs_as_a_slurm_job_and_completes_with_its_results(slurm_hpc):
    h = slurm_hpc()
    ctx = ctx_for(h)
    case = submitted(ctx, "success", seconds=0.3)
    [job] = [j for j in h.jobs() if j.job_id == case.task_id]
    assert (job.name, job.partition, job.comment, job.work_dir) == (case.label, "gpu", f"mqic_slot={case.slot}",
                                                                    case.remote_dir)
    case = poll_until_final(ctx, case.case_id, timeout=40)
    assert case.status is CaseStatus.COMPLETED and case.outcome == "success" and case.progress == 100
    assert list(Path(case.case_path, "output").iterdir())           # result_files: output/*
    assert get_slot(ctx.conn, case.slot).status is SlotStatus.AVAILABLE
    assert "exit record" in case_events(ctx.conn, case.case_id)[-1]["detail"]  # Slurm forgets; the record tells


def test_a_failing_case_fails_with_its_exit_code_and_log_tail(slurm_hpc):
    ctx = ctx_for(slurm_hpc())
    case = submitted(ctx, "failure", mode="fail")
    case = poll_until_final(ctx, case.case_id, timeout=40)
    assert case.status is CaseStatus.FAILED and case.outcome == "failed" and case.exit_code == 1
    assert "FATAL ERROR" in case.log_tail
    assert get_slot(ctx.conn, case.slot).status is SlotStatus.ZOMBIE
    reaper.tick(ctx, time.time())                                    # no job of ours left in the slot
    assert get_slot(ctx.conn, case.slot).status is SlotStatus.AVAILABLE


def test_a_case_past_its_timeout_is_failed_and_its_job_stopped(slurm_hpc):
    h = slurm_hpc(main_loop={"running_case_timeout_hours": 1 / 3600, "kill_grace_seconds": 2})
    ctx = ctx_for(h)
    case = submitted(ctx, "hangs", mode="hang", seconds=60)

    def timed_out():
        poller.tick(ctx, time.time())
        return get_case(ctx.conn, case.case_id).status is CaseStatus.FAILED
    wait_until(timed_out, timeout=40, interval=0.3, message="the timeout")
    case = get_case(ctx.conn, case.case_id)
    assert case.outcome == "timed_out" and case.stop_requested_at
    wait_until(lambda: all(j.verdict.ended for j in h.jobs()), timeout=30, interval=0.3, message="job stopped")
    reaper.tick(ctx, time.time())
    assert get_slot(ctx.conn, case.slot).status is SlotStatus.AVAILABLE
    poller.tick(ctx, time.time())
    assert get_case(ctx.conn, case.case_id).outcome == "timed_out"


def test_a_job_cancelled_by_someone_else_is_requeued_and_runs_again(slurm_hpc):
    h = slurm_hpc()
    ctx = ctx_for(h)
    case = submitted(ctx, "cancelled outside", seconds=30)
    wait_until(lambda: [j for j in h.jobs() if j.verdict.state.value == "running"], timeout=30, message="running")
    h.cluster.run(["scancel", str(case.task_id)])
    wait_until(lambda: [j for j in h.jobs() if j.state == "CANCELLED"], timeout=30, message="cancelled")
    killed = case.task_id
    poller.tick(ctx, time.time())
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.SUBMITTED and case.attempts == 1 and case.error_type == "TaskKilled"
    # In Slurm's words (issue 16): a job, killed by someone else, what Slurm says of it; never pueue's.
    assert case.error_message == f"poll: TaskKilled: job {killed} was {slurm.WORDS.killed_by_others}: cancelled"
    assert not [e for e in case_events(ctx.conn, case.case_id) if "pueue" in (e["detail"] or "")]
    submitter.tick(ctx, case.next_attempt_at + 1)
    again = get_case(ctx.conn, case.case_id)
    assert again.status is CaseStatus.RUNNING and again.task_id != case.task_id


# -- operator surfaces on Slurm ------------------------------------------------------------------------

def test_sandbox_up_slurm_then_doctor_show_and_cancel(tmp_path, capsys):
    """``mqic sandbox up --slurm`` brings up sshd and a cluster of its own; doctor, show and cancel use it."""
    skip_unless_slurm_can_run()
    import shutil
    from types import SimpleNamespace

    import yaml
    from console.cli import main as cli_main
    from shared.config import load_config
    from tests.test_console import cli

    root = tmp_path / "sbx"
    code = cli_main(["sandbox", "up", "--root", str(root), "--slurm"])
    out = capsys.readouterr().out
    try:
        assert code == 0 and "sandbox HPC (Slurm) is up" in out
        config = load_config(root / "config.yaml")
        assert config.hosts[0].hpc.backend == "slurm" and [s.name for s in config.hosts[0].slots] == ["gpu_a", "gpu_b"]
        code, out, _ = cli(capsys, config, "doctor")
        assert code == 0, out
        assert "OK   slurm: sbatch 22." in out and "OK   slurm partitions: gpu_a -> gpu, gpu_b -> gpu" in out

        ctx = ctx_for(SimpleNamespace(config=config))
        case = submitted(ctx, "sleeper", seconds=60)
        wait_until(lambda: json.loads(cli(capsys, config, "show", str(case.case_id), "--json")[1])["remote"]
                   .get("state") == "running", timeout=30, interval=0.3, message="shown running")
        code, out, err = cli(capsys, config, "cancel", str(case.case_id))
        assert code == 0 and f"sigterm {case.task_id}" in out, err

        broken = yaml.safe_load((root / "config.yaml").read_text())
        broken["slurm"]["partitions"]["gpu_b"]["partition"] = "a100"
        (root / "broken.yaml").write_text(yaml.safe_dump(broken))
        code, out, _ = cli(capsys, load_config(root / "broken.yaml"), "doctor")
        assert code == 1 and "FAIL slurm partitions: PartitionProblem: partition 'a100' of slot gpu_b does not exist" in out
    finally:
        assert cli_main(["sandbox", "down", "--root", str(root)]) == 0
        shutil.rmtree(yaml.safe_load((root / "config.yaml").read_text())["hpc"]["control_dir"], ignore_errors=True)


def test_a_controller_outage_changes_nothing_and_uses_no_attempt(tmp_path, sshd, own_slurm):
    """slurmctld down: the poller cannot tell (no change), a submit makes no job and uses no attempt."""
    from tests.conftest import SlurmHpc

    cluster = own_slurm()
    h = SlurmHpc(tmp_path / "hpc", sshd, cluster)
    try:
        ctx = ctx_for(h)
        running = submitted(ctx, "running through it", seconds=20)
        cluster.stop_daemon("slurmctld")
        drop_and_register(ctx, "submitted during it")
        shift = 1000.0                                      # ctx's clock, not the tick's now, dates the event
        ctx.clock = lambda: time.time() + shift
        began = time.time()
        submitter.tick(ctx, began)
        waiting = get_case(ctx.conn, running.case_id + 1)
        assert waiting.status is CaseStatus.SUBMITTED and waiting.attempts == 0
        # Short, in Slurm's words (issue 16): what failed, what the exit code means, stderr's first line.
        assert waiting.error_type == "SlurmOutage" and waiting.error_message == (
            "sbatch: SlurmOutage: sbatch failed (exit 88: the look for an earlier task of the case failed; "
            "Slurm controller unreachable): slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
        retry = case_events(ctx.conn, waiting.case_id)[-1]
        assert retry["to_status"] == "submitted" and waiting.error_message in retry["detail"]
        assert "pueue" not in retry["detail"] and "#!/bin/bash" not in retry["detail"]
        assert retry["at"] - (began + shift) >= 2.5         # squeue gave up after 3 s: dated after it
        ctx.clock = time.time
        assert poller.tick(ctx, time.time() + 48 * 3600) == 0                  # no timeout without an answer
        assert get_case(ctx.conn, running.case_id).status is CaseStatus.RUNNING
        cluster.start()
        submitter.tick(ctx, waiting.next_attempt_at + 1)
        assert get_case(ctx.conn, waiting.case_id).status is CaseStatus.RUNNING
    finally:
        h.close()


def drop_and_register(ctx, name, **kwargs):
    from tests.test_workers import registered
    return registered(ctx, name, **kwargs)


# -- no case name can shift a Slurm field (issue 16) ------------------------------------------------

PRINTABLE = "".join(chr(c) for c in range(32, 127) if chr(c) != "/")
HOSTILE = [PRINTABLE, "pt|01\ttab 환자 🩻", "100% %j %% \\ dose|x"]


def test_cases_with_any_name_run_complete_and_bring_their_results_back(slurm_hpc):
    """Every printable character, a tab, '|' and unicode: each job keeps its folder and its slot."""
    h = slurm_hpc()
    ctx = ctx_for(h)
    ids = [drop_and_register(ctx, name, seconds=0.3).case_id for name in HOSTILE]
    seen = {}                                                            # job id -> what squeue said of it

    def all_final():
        submitter.tick(ctx, time.time())                                 # two slots: the third waits its turn
        seen.update({job.job_id: job for job in h.jobs()})
        poller.tick(ctx, time.time())
        return all(get_case(ctx.conn, i).status in (CaseStatus.COMPLETED, CaseStatus.FAILED) for i in ids)
    wait_until(all_final, timeout=90, interval=0.2, message="every case final")
    for case in (get_case(ctx.conn, i) for i in ids):
        job = seen[case.task_id]
        assert (job.name, job.work_dir, job.comment) == (case.label, case.remote_dir, f"mqic_slot={case.slot}")
        assert case.remote_dir.endswith(case.folder_name) and case.case_name in HOSTILE
        assert case.status is CaseStatus.COMPLETED and case.outcome == "success", case.error_message
        assert case.attempts == 0
        assert list(Path(case.case_path, "output").iterdir())            # results came back
        assert "exit record" in case_events(ctx.conn, case.case_id)[-1]["detail"]
        assert Path(case.remote_dir, ".mqic", f"slurm-{case.task_id}.out").is_file()  # the job's output


@pytest.mark.parametrize("name", ["crashed|after sbatch", "crashed|after\tsbatch 환자 \\ %j"])
def test_a_recovered_job_with_a_hostile_name_is_settled_from_the_record_in_its_own_folder(slurm_hpc, name):
    """Recovery takes the folder from squeue; the job then ends and Slurm forgets it: the exit
    record must be read from that folder (a shifted field read it from a cut path: "vanished")."""
    from shared.recovery import recover_expired_claims
    from shared.claims import claim_next_case

    h = slurm_hpc()
    ctx = ctx_for(h)
    host = ctx.hosts["hpc"]
    case = drop_and_register(ctx, name, seconds=4)
    assert submitter.host_ready(ctx, host)
    claim = claim_next_case(ctx.conn, worker="dead:1", now=time.time() - 1000, lease_seconds=10)
    remote_dir = host.remote.upload(Path(case.case_path), case.folder_name, case_id=case.case_id).remote_dir
    host.backend.submit(slot=claim.group, label=case.label, workdir=remote_dir,
                        command=submitter.render_command(host.config.hpc.remote_command, case, remote_dir),
                        env=submitter.task_env(case, remote_dir, None))
    assert recover_expired_claims(ctx, time.time()) == 1
    case = get_case(ctx.conn, case.case_id)
    assert case.status is CaseStatus.RUNNING and case.remote_dir == remote_dir   # squeue's %Z, whole
    case = poll_until_final(ctx, case.case_id, timeout=60)
    assert case.status is CaseStatus.COMPLETED and case.attempts == 0, case.error_message
    assert "exit record" in case_events(ctx.conn, case.case_id)[-1]["detail"]
