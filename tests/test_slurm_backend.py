"""shared.backends.slurm without a cluster: the job mapping, the log framing, what a failed submit means.

Replies are the captured outputs of Slurm 22.05 (tests/data/slurm) replayed by a runner
that records its calls; the same backend runs against a real cluster in
tests/test_backend_contract.py and tests/test_slurm_workers.py.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest

from shared import tasks
from shared.backends import common, pueue, slurm, slurm_parse as sp
from shared.backends.model import TaskState
from shared.errors import AlreadySubmitted, SubmitLockBusy, SubmitUncertain, WorkdirMissing
from shared.errors import BadOutput, RemoteError
from tests.test_pueue_parse import FakeRunner

SETTINGS = {"gpu_a": sp.SubmitSettings("gpu", gres="gpu:1", time_limit_seconds=3600)}
CLOCK = 1764579000
LINES = """11|mqic_case_1|PENDING|gpu|2026-12-01T08:00:00|2026-12-01T09:00:00|0:00|/r/1_case|mqic_slot=gpu_a|Resources
12|mqic_case_2|RUNNING|gpu|2026-12-01T08:00:00|2026-12-01T08:00:05|1:00|/r/2_case|mqic_slot=gpu_b|None
13|mqic_case_3|COMPLETED|gpu|2026-12-01T08:00:00|2026-12-01T08:00:05|1:00|/r/3_case|mqic_slot=gpu_a|None
14|mqic_case_4|FAILED|gpu|2026-12-01T08:00:00|2026-12-01T08:00:05|1:00|/r/4_case|mqic_slot=gpu_a|NonZeroExitCode
15|mqic_case_5|CANCELLED|debug|2026-12-01T08:00:00|2026-12-01T08:00:05|1:00|/r/5_case|(null)|None
16|mqic_case_6|TIMEOUT|gpu|2026-12-01T08:00:00|2026-12-01T08:00:05|1:00|/r/6_case|mqic_slot=gpu_a|TimeLimit
17|mqic_case_7|NODE_FAIL|gpu|2026-12-01T08:00:00|2026-12-01T08:00:05|1:00|/r/7_case|mqic_slot=gpu_a|NodeDown
18|mqic_case_8|OUT_OF_MEMORY|gpu|2026-12-01T08:00:00|2026-12-01T08:00:05|1:00|/r/8_case|mqic_slot=gpu_a|None
19|other|SHINY_NEW|gpu|N/A|N/A|0:00|/home/x|a|b|c
"""
ROWS = [dict(zip(slurm.SQUEUE_FIELDS, line.split("|", len(slurm.SQUEUE_FIELDS) - 1))) for line in LINES.splitlines()]


def squeue_output(fmt: sp.MarkedFormat, rows=ROWS, clock=CLOCK) -> str:
    """What the snapshot's call prints: the clock line, then each job's values between the markers."""
    jobs = "".join(fmt.mark + fmt.mark.join(row[code] for code in fmt.codes) + fmt.mark + "\n" for row in rows)
    return f"mqic-clock {clock}\n{jobs}"


def squeue_reply(argv: list[str]) -> str:
    """The snapshot's answer, in the format (and with the marker) that its argv asked for."""
    text = next(word for word in argv if word.startswith("--format="))[len("--format="):]
    mark = text[:text.index("%i")]
    return squeue_output(sp.MarkedFormat(tuple(text.strip(mark).split(mark)), mark))


def snapshot_of(rows=ROWS):
    fmt = sp.MarkedFormat.fresh(slurm.SQUEUE_FIELDS)
    return slurm.parse_snapshot(squeue_output(fmt, rows), fmt)


class Runner(FakeRunner):
    """A FakeRunner whose replies may also be functions of the argv."""

    def run(self, argv, *, timeout=None):
        reply = super().run(argv, timeout=timeout)
        return reply(argv) if callable(reply) else reply


def backend(*replies) -> tuple[slurm.SlurmBackend, FakeRunner]:
    runner = Runner(*replies)
    return slurm.SlurmBackend(runner, SETTINGS, timeout=20, bin_dir="/opt/slurm/bin"), runner


def test_the_snapshot_is_one_call_with_the_clock_and_utc_times():
    made, runner = backend(squeue_reply)
    snapshot = made.snapshot()
    [(argv, timeout)] = runner.calls
    assert argv[:5] == ["sh", "-c", slurm.CLOCKED, "sh", slurm.CLOCK_PREFIX] and timeout == 20
    assert argv[5:8] == ["env", "TZ=UTC", "/opt/slurm/bin/squeue"] and "--me" in argv and "--states=all" in argv
    assert snapshot.hpc_time == 1764579000 and snapshot.paused_slots == ()
    running = snapshot.tasks[12]
    assert (running.label, running.group, running.state, running.path) == ("mqic_case_2", "gpu_b", TaskState.RUNNING,
                                                                           "/r/2_case")
    assert running.start == datetime(2026, 12, 1, 8, 0, 5, tzinfo=timezone.utc)


def test_each_job_state_maps_onto_ours_or_is_left_to_the_exit_record():
    tasks_ = snapshot_of().tasks
    waiting = tasks_[11]
    assert (waiting.state, waiting.start, waiting.detail) == (TaskState.QUEUED, None, "Resources")  # no estimate
    assert 13 not in tasks_ and 14 not in tasks_ and 18 not in tasks_  # ended by themselves: the record has the code
    assert 17 not in tasks_                                             # node failure: only the record can tell
    cancelled = tasks_[15]
    assert (cancelled.state, cancelled.group, cancelled.is_done) == (TaskState.KILLED, "debug", True)  # no comment
    limit = tasks_[16]
    assert (limit.state, limit.detail, limit.is_done) == (TaskState.FAILED, "time limit reached", True)
    unknown = tasks_[19]
    assert (unknown.state, unknown.is_done, unknown.label) == (TaskState.UNKNOWN, False, "other")


@pytest.mark.parametrize("text", ["", "mqic-clock soon\n", "{jobs}", "mqic-clock 1\n" + LINES])
def test_a_snapshot_without_its_clock_or_its_markers_is_bad_output(text):
    fmt = sp.MarkedFormat.fresh(slurm.SQUEUE_FIELDS)
    with pytest.raises(BadOutput):
        slurm.parse_snapshot(text.format(jobs=squeue_output(fmt).split("\n", 1)[1]), fmt)


def test_logs_are_one_call_framed_by_a_mark_nobody_prints():
    tasks_ = snapshot_of().tasks
    wanted = [tasks_[12], tasks_[11], tasks_[15]]

    def reply(argv, **_):
        mark = argv[5]
        return (f"{mark} 12\nline 1\nline 2\n\n{mark} 11\n\n{mark} 15\nno newline at the end\n")

    made, runner = backend()
    runner.run = lambda argv, timeout=None: (runner.calls.append((argv, timeout)), reply(argv))[1]
    assert made.logs(wanted, 2) == {12: "line 1\nline 2", 11: "", 15: "no newline at the end"}
    [(argv, _)] = runner.calls
    assert argv[4] == "2" and argv[6:8] == ["12", "/r/2_case/.mqic/slurm-12.out"]


def test_stop_reports_jobs_slurm_has_forgotten_as_failed():
    refusal = RemoteError(["scancel"], 1, "scancel: error: Kill job error on job id 99: Invalid job id specified\n")
    made, runner = backend(refusal, "")
    assert made.stop([12, 99], gently=True) == slurm.KillResult(killed=(12,), failed=(99,))
    assert runner.argvs[0] == ["/opt/slurm/bin/scancel", "--signal=TERM", "--full", "12", "99"]
    assert made.stop([12], gently=False).killed == (12,)
    assert runner.argvs[1] == ["/opt/slurm/bin/scancel", "12"]


def test_stop_propagates_a_controller_outage():
    made, _ = backend(RemoteError(["scancel"], 8, "scancel: error: Unable to contact slurm controller (connect failure)"))
    with pytest.raises(sp.SlurmError) as caught:
        made.stop([12], gently=True)
    assert caught.value.kind is sp.SlurmErrorKind.CONTROLLER_DOWN


def test_remove_says_removed_for_what_is_no_longer_active():
    made, runner = backend("12\n40\n")
    assert made.remove([11, 12, 13]) == slurm.KillResult(killed=(11, 13), failed=(12,))
    argv = runner.argvs[0]
    assert argv[:5] == ["sh", "-c", slurm.REMOVE_SCRIPT, "sh", "/opt/slurm/bin/scancel"] and argv[-3:] == ["11", "12", "13"]


def test_submit_is_one_call_with_the_script_and_the_slot_in_the_comment():
    made, runner = backend("42\n")
    command = tasks.wrap_command("echo 'it''s' $(id)")
    job_id = made.submit(slot="gpu_a", label="mqic_case_7", workdir="/r/7 case", command=command,
                         env={"MQIC_CASE_NAME": "pt $(id)"}, require_workdir=True)
    assert job_id == 42
    [(argv, timeout)] = runner.calls
    assert argv[:3] == ["sh", "-c", slurm.SUBMIT_SCRIPT] and timeout == 20
    assert argv[4:9] == ["mqic_case_7", "20", "/r/7 case", "1", "/opt/slurm/bin/squeue"]
    script, sbatch = argv[9], argv[10:]
    assert script.startswith("#!/bin/bash\n") and "export MQIC_CASE_NAME='pt $(id)'" in script
    assert script.rstrip().endswith(f"exec /bin/bash -c {sp._quote(command)}")   # the wrapper writes the record
    assert "exit_status" not in script.replace(sp._quote(command), "")
    assert sbatch[0] == "/opt/slurm/bin/sbatch" and "--comment=mqic_slot=gpu_a" in sbatch
    assert "--job-name=mqic_case_7" in sbatch and "--gres=gpu:1" in sbatch and sbatch[-1] == "/r/7 case/.mqic/slurm-job.sh"


@pytest.mark.parametrize("label", ["mqic_case_07", "case_7", "mqic_case_7;x"])
def test_submit_refuses_a_label_that_is_not_a_job_name_of_ours(label):
    made, _ = backend()
    with pytest.raises(ValueError):
        made.submit(slot="gpu_a", label=label, workdir="/r/7", command="true", env={})


OUTAGE = "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)"
SQUEUE_OUTAGE = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"


@pytest.mark.parametrize("code, stderr, expected, counted", [
    (86, "", WorkdirMissing, None),
    (87, "mqic_case_7 already has job(s) 12", AlreadySubmitted, None),
    (85, "another submission", SubmitLockBusy, None),
    (1, OUTAGE, slurm.SlurmOutage, False),                     # no job; the outage uses no attempt
    (88, SQUEUE_OUTAGE, slurm.SlurmOutage, False),             # the label check could not run: no job
    (1, "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", SubmitUncertain, None),
    (137, "", SubmitUncertain, None),                          # sbatch killed by its time limit: it may have landed
    (1, "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     sp.SlurmError, True),
    (89, "mkdir: cannot create directory '.mqic': Permission denied", sp.SlurmError, True),
])
def test_what_a_failed_submit_means(code, stderr, expected, counted):
    made, _ = backend(RemoteError(["sh"], code, stderr))
    with pytest.raises(expected) as caught:
        made.submit(slot="gpu_a", label="mqic_case_7", workdir="/r/7", command="true", env={})
    assert type(caught.value) is expected
    if counted is not None:
        assert tasks.counts_as_attempt(caught.value) is counted
    said = str(caught.value)
    assert "pueue" not in said and "#!/bin/bash" not in said and "flock" not in said and len(said) < 400
    if stderr and expected not in (AlreadySubmitted, SubmitLockBusy):
        assert said.startswith(f"sbatch failed (exit {code}") and stderr.splitlines()[0] in said


def test_a_failed_submit_says_what_failed_in_a_few_words():
    """The exit code's meaning and the first line of stderr, not the submit script (issue 16)."""
    argv = ["sh", "-c", slurm.SUBMIT_SCRIPT, "sh", "mqic_case_7", "20", "/r/7", "0", "squeue", "#!/bin/bash\n..."]
    cases = {
        (88, SQUEUE_OUTAGE + "\nsecond line"):
            f"sbatch failed (exit 88: the look for an earlier task of the case failed; Slurm controller "
            f"unreachable): {SQUEUE_OUTAGE}",
        (1, OUTAGE): f"sbatch failed (exit 1: Slurm controller unreachable): {OUTAGE}",
        (1, "sbatch: error: invalid partition specified: a100\nsbatch: error: Batch job submission failed"):
            "sbatch failed (exit 1: invalid partition): sbatch: error: invalid partition specified: a100",
        (89, ""): "sbatch failed (exit 89: the submit could not be prepared on the HPC (lock folder, "
                  "environment or job script))",
    }
    for (code, stderr), expected in cases.items():
        made, _ = backend(RemoteError(argv, code, stderr))
        with pytest.raises(RemoteError) as caught:
            made.submit(slot="gpu_a", label="mqic_case_7", workdir="/r/7", command="true", env={})
        assert str(caught.value) == expected and caught.value.argv[:5] == argv[:5]   # its argv is kept for the log


def test_any_slurm_error_names_its_command_not_the_script():
    error = sp.SlurmError(["sh", "-c", "long script", "sh", "/opt/slurm/bin/scancel", "12"], 8,
                          "scancel: error: Unable to contact slurm controller (connect failure)\n")
    assert str(error) == ("scancel failed (exit 8: Slurm controller unreachable): "
                          "scancel: error: Unable to contact slurm controller (connect failure)")


def test_the_backend_speaks_slurm_words():
    made, _ = backend()
    assert (made.words.scheduler, made.words.task, made.words.submit, made.words.stop) == (
        "Slurm", "job", "sbatch", "scancel")
    assert "pueue" not in " ".join(vars(made.words).values())


def test_every_case_name_keeps_its_job_in_its_slot_and_its_folder():
    from tests.test_slurm_parse import HOSTILE_NAMES
    rows = [{**ROWS[1], "%i": str(100 + i), "%j": f"mqic_case_{100 + i}", "%Z": f"/r/{100 + i}_{name}"}
            for i, name in enumerate(HOSTILE_NAMES)]
    tasks_ = snapshot_of(rows).tasks
    assert len(tasks_) == len(HOSTILE_NAMES)
    for i, name in enumerate(HOSTILE_NAMES):
        task = tasks_[100 + i]
        assert (task.label, task.group, task.path, task.state) == (
            f"mqic_case_{100 + i}", "gpu_b", f"/r/{100 + i}_{name}", TaskState.RUNNING)


def test_ensure_slots_names_a_missing_partition_and_one_too_short():
    sinfo = "debug*|up|infinite|1|idle|vm\ngpu|up|1:00:00|1|idle|vm\n"
    made, runner = backend(sinfo)
    assert made.ensure_slots({"gpu_a": 1}) == []
    assert runner.argvs[0][0] == "/opt/slurm/bin/sinfo"
    short = slurm.SlurmBackend(FakeRunner(sinfo), {"gpu_a": sp.SubmitSettings("gpu", time_limit_seconds=7200)}, 20)
    with pytest.raises(slurm.PartitionProblem, match=r"partition 'gpu' of slot gpu_a allows 0-01:00:00, less than"):
        short.ensure_slots({"gpu_a": 1})
    missing = slurm.SlurmBackend(FakeRunner(sinfo), {"gpu_a": sp.SubmitSettings("a100")}, 20)
    with pytest.raises(RemoteError, match=r"partition 'a100' of slot gpu_a does not exist on the cluster "
                                          r"\(sinfo lists: debug, gpu\)"):
        missing.ensure_slots({"gpu_a": 1})


def test_our_time_limit_comes_after_our_own_timeout_and_its_grace():
    assert slurm.time_limit_seconds(24, 30) == 24 * 3600 + 30 + slurm.TIME_LIMIT_MARGIN_SECONDS


def test_the_first_line_of_stderr_keeps_what_a_heading_introduces():
    from shared.backends.common import first_line
    assert first_line("\n  sbatch: error: one\nsbatch: error: two\n") == "sbatch: error: one"
    assert first_line("Error:\n  Failed to canonicalize path\n  more\n") == "Error: Failed to canonicalize path"
    assert first_line("") == "" and len(first_line("x" * 1000)) == 303


@pytest.mark.parametrize("script", [common.LOCKED_SUBMIT_PRELUDE, pueue.ADD_SCRIPT, slurm.SUBMIT_SCRIPT])
def test_the_submit_scripts_take_their_exit_codes_from_the_named_constants(script):
    assert not re.search(r"@[A-Z0-9_]*@", script)
    assert common.with_exit_codes("exit @LABEL_EXISTS_EXIT@") == f"exit {common.LABEL_EXISTS_EXIT}"
    with pytest.raises(KeyError):
        common.with_exit_codes("exit @NO_SUCH_EXIT@")
