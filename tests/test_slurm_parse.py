"""shared.backends.slurm_parse: builders, parsers and the state mapping, on every captured Slurm 22.05 output.

The captures in tests/data/slurm/ are copies of ../shared/reference/slurm/ (real runs on
Debian 12). Each ``$ command`` there is followed by its stdout, stderr and exit code; every one
of them goes through the parser that reads that kind of output, or through ``classify_error``
when it failed. The batch script is run for real by bash in tmp_path (no Slurm needed).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from shared import tasks
from shared.backends import slurm_parse as sp
from shared.backends.slurm_parse import SlurmErrorKind as Kind, TaskState
from shared.errors import BadOutput, RemoteError

DATA = Path(__file__).parent / "data" / "slurm"
_CAPTURE = re.compile(
    r"^\$ (?P<command>[^\n]*)\n--- stdout ---\n(?P<stdout>.*?)--- stderr ---\n(?P<stderr>.*?)"
    r"--- exit (?P<exit>\d+), ", re.S | re.M)


@dataclass(frozen=True)
class Capture:
    file: str
    command: str
    stdout: str
    stderr: str
    exit_code: int

    @property
    def argv(self) -> list[str]:
        """The Slurm command itself: without a leading ``cd X &&`` or a trailing ``| head``."""
        lexer = shlex.shlex(self.command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        if "&&" in words:
            words = words[len(words) - words[::-1].index("&&"):]
        return words[:words.index("|")] if "|" in words else words

    def option(self, *names: str) -> str | None:
        argv = self.argv
        for index, word in enumerate(argv):
            for name in names:
                if word == name and index + 1 < len(argv):
                    return argv[index + 1]
                if word.startswith(name + "="):
                    return word[len(name) + 1:]
        return None

    def __str__(self) -> str:
        return f"{self.file}: {self.command[:100]}"


def load_captures() -> list[Capture]:
    captures = []
    for path in sorted(DATA.glob("*.txt")):
        for match in _CAPTURE.finditer(path.read_text()):
            captures.append(Capture(path.name, match["command"], match["stdout"], match["stderr"],
                                    int(match["exit"])))
    return captures


CAPTURES = load_captures()


def captures_of(program: str, exit_code: int | None = None) -> list[Capture]:
    return [c for c in CAPTURES if c.argv[0] == program and (exit_code is None or c.exit_code == exit_code)]


def captured(file_prefix: str, command_part: str) -> Capture:
    """The one capture of that file whose command contains ``command_part``."""
    found = [c for c in CAPTURES if c.file.startswith(file_prefix) and command_part in c.command]
    assert len(found) == 1, (file_prefix, command_part, [str(c) for c in found])
    return found[0]


def test_the_captures_are_all_read():
    assert len(CAPTURES) == 167
    assert {c.argv[0] for c in CAPTURES} == {"sbatch", "squeue", "scontrol", "scancel", "sacct",
                                              "sacctmgr", "sinfo"}


# ---------------------------------------------------------------------------
# Every capture through its parser
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("capture", [c for c in CAPTURES if c.exit_code != 0], ids=str)
def test_every_captured_failure_is_classified(capture):
    kind = sp.classify_error(capture.stderr + capture.stdout, capture.exit_code)
    assert kind is not Kind.OTHER, capture.stderr


@pytest.mark.parametrize("capture", captures_of("sbatch", exit_code=0), ids=str)
def test_every_captured_submit_gives_its_job_id(capture):
    if "--version" in capture.argv:
        assert sp.parse_version(capture.stdout) == "22.05.8"
        return
    job_id = sp.parse_sbatch(capture.stdout)
    assert str(job_id) in capture.stdout


@pytest.mark.parametrize("capture", [c for c in captures_of("squeue", exit_code=0)
                                     if c.option("--format") is not None], ids=str)
def test_every_captured_squeue_format_line_is_a_job(capture):
    jobs = read_bar_squeue(capture.stdout, capture.option("--format"))
    assert len(jobs) == len(capture.stdout.splitlines())
    for job in jobs:
        assert str(job.job_id) in capture.stdout and job.name in capture.stdout
        assert job.verdict.state is not TaskState.UNKNOWN or job.state == "NODE_FAIL"


@pytest.mark.parametrize("capture", [c for c in CAPTURES if c.argv[1:] == ["--version"]], ids=str)
def test_every_captured_version_is_read(capture):
    assert sp.parse_version(capture.stdout) == "22.05.8"


@pytest.mark.parametrize("capture", [c for c in captures_of("sinfo", exit_code=0)
                                     if c.option("--format") == sp.SINFO_FORMAT], ids=str)
def test_every_captured_sinfo_in_our_format_is_read(capture):
    partitions = sp.parse_partitions(capture.stdout)
    assert partitions["debug"].default and partitions["debug"].available
    assert partitions["debug"].time_limit_seconds == 3600 and partitions["debug"].nodes == 1


@pytest.mark.parametrize("capture", captures_of("scancel", exit_code=0), ids=str)
def test_a_successful_scancel_prints_nothing(capture):
    # Exit 0 and silence also for unknown and finished ids: its success proves nothing.
    assert capture.stdout == "" and capture.stderr == ""


# ---------------------------------------------------------------------------
# What the captures mean
# ---------------------------------------------------------------------------

FORMAT_6 = "%i|%j|%T|%r|%S|%M"
# The format of most captures: the free-text reason last, so a '|' in it stays in it.
BAR_FORMAT = "%i|%j|%T|%P|%V|%S|%M|%r"


def read_bar_squeue(stdout: str, fmt: str = BAR_FORMAT) -> tuple[sp.QueuedJob, ...]:
    """The jobs of a captured ``squeue --format=A|B|...`` read by the backend's own parser.

    Each line is split at its first bars (as many as the format has, so the last field
    keeps any '|') and printed again between markers for ``parse_marked_squeue``.
    """
    codes = fmt.split("|")
    marked = sp.MarkedFormat(tuple(codes), "~mqic-test~")
    rows = [dict(zip(codes, line.split("|", len(codes) - 1))) for line in stdout.splitlines() if line.strip()]
    return sp.parse_marked_squeue(render_marked(rows, marked), marked)


def test_squeue_reads_queued_running_and_held_jobs():
    jobs = read_bar_squeue(captured("02", f"squeue --noheader --format '{FORMAT_6}'").stdout, FORMAT_6)
    by_id = {job.job_id: job for job in jobs}
    assert by_id[3] == sp.QueuedJob(3, "mqic_case_8", "PENDING", "Resources", started=None, elapsed_seconds=0)
    assert by_id[3].verdict == sp.JobVerdict(TaskState.WAITING, detail="Resources")
    assert by_id[6].verdict.detail == "JobHeldUser"
    assert by_id[1].started == datetime(2026, 12, 1, 4, 54, 47) and by_id[1].elapsed_seconds == 3
    assert by_id[1].verdict == sp.JobVerdict(TaskState.RUNNING)
    assert (by_id[1].case_id, by_id[6].case_id) == (7, None)


def test_squeue_of_jobs_that_exceed_a_partition_limit_says_why_they_wait():
    jobs = read_bar_squeue(captured("07", "squeue --noheader --format '%i|%j|%T|%r'").stdout, "%i|%j|%T|%r")
    assert [(job.reason, job.verdict.state, job.verdict.detail) for job in jobs] == [
        ("PartitionConfig", TaskState.WAITING, "PartitionConfig"),
        ("PartitionTimeLimit", TaskState.WAITING, "PartitionTimeLimit")]


def test_squeue_with_all_states_shows_just_finished_jobs():
    capture = captured("04", "squeue -t all --noheader")
    verdicts = {job.job_id: job.verdict.state for job in read_bar_squeue(capture.stdout, FORMAT_6)}
    assert verdicts == {3: TaskState.SUCCESS, 4: TaskState.SUCCESS, 6: TaskState.WAITING,
                        5: TaskState.RUNNING}


def test_squeue_of_a_purged_job_is_invalid_job_id_not_a_failure():
    purged = [c for c in CAPTURES if c.argv[:3] in (["squeue", "-j", "3"], ["scontrol", "show", "job"])
              and c.exit_code == 1 and "Invalid job id" in c.stderr]
    assert len(purged) >= 3 and all(sp.classify_error(c.stderr, c.exit_code) is Kind.INVALID_JOB_ID for c in purged)
    assert not Kind.INVALID_JOB_ID.transient  # the caller turns "unknown id" into "ask the record"


EXPECTED_KINDS = [
    ("07", "--partition nosuchpart", Kind.INVALID_PARTITION),
    ("07", "--gres=gpu:5", Kind.UNSATISFIABLE),
    ("07", "--gres=foo:1", Kind.UNSATISFIABLE),
    ("07", "--gres=gpu:tesla:1", Kind.UNSATISFIABLE),
    ("07", "--time=abc", Kind.UNSATISFIABLE),
    ("07", "no_such_script.sh", Kind.BAD_REQUEST),
    ("07", "noshebang.sh", Kind.BAD_REQUEST),
    ("07", "--nodelist=othernode", Kind.UNSATISFIABLE),
    ("07", "--bogus-option", Kind.BAD_REQUEST),
    ("07", "--job-name e12", Kind.BAD_REQUEST),
    ("08", "sacct -j 27", Kind.ACCOUNTING_DISABLED),
    ("08", "sacctmgr list cluster", Kind.ACCOUNTING_DISABLED),
    ("06", "scancel abc", Kind.BAD_REQUEST),
    ("11", "sacct -j 1 --format", Kind.ACCOUNTING_DOWN),
]


@pytest.mark.parametrize("file_prefix, command_part, kind", EXPECTED_KINDS)
def test_captured_failures_have_their_meaning(file_prefix, command_part, kind):
    failed = [c for c in CAPTURES if c.file.startswith(file_prefix) and command_part in c.command
              and c.exit_code != 0]
    assert failed
    for capture in failed:
        assert sp.classify_error(capture.stderr, capture.exit_code) is kind, capture.stderr


def test_an_enforced_partition_limit_is_unsatisfiable():
    enforced = [c for c in captures_of("sbatch") if c.file.startswith("07") and c.exit_code == 1
                and ("e4" in c.argv or "e6" in c.argv)]
    assert len(enforced) == 2
    assert {sp.classify_error(c.stderr, c.exit_code) for c in enforced} == {Kind.UNSATISFIABLE}


def test_every_command_while_slurmctld_is_down_is_controller_down():
    down = [c for c in CAPTURES if c.file.startswith("10") and c.exit_code != 0]
    assert {c.argv[0] for c in down} == {"sbatch", "squeue", "scontrol", "scancel", "sinfo"}
    assert 8 in {c.exit_code for c in down}  # scancel's own code
    for capture in down:
        kind = sp.classify_error(capture.stderr + capture.stdout, capture.exit_code)
        assert kind is Kind.CONTROLLER_DOWN and kind.transient and not kind.submit_may_have_landed


def test_an_unknown_format_field_is_reported_on_stderr_with_exit_0():
    capture = captured("02", "ExitCode'")
    assert capture.exit_code == 0
    assert sp.classify_error(capture.stderr, capture.exit_code) is Kind.BAD_REQUEST


@pytest.mark.parametrize("stderr, exit_code, kind", [
    ("scancel: error: Kill job error on job id 99999: Invalid job id specified", 1, Kind.INVALID_JOB_ID),
    ("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", 1,
     Kind.CONTROLLER_TIMEOUT),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination "
     "specified", 1, Kind.INVALID_ACCOUNT),
    ("sbatch: error: Batch job submission failed: Invalid qos specification", 1, Kind.INVALID_QOS),
    ("sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, "
     "user's size and/or time limits)", 1, Kind.LIMIT_REACHED),
    # Seen on this machine: a client run without SLURM_CONF.
    ("squeue: error: _establish_config_source: failed to fetch config\n"
     "squeue: fatal: Could not establish a configuration source", 1, Kind.NOT_CONFIGURED),
    ("bash: line 1: sbatch: command not found", 127, Kind.NOT_INSTALLED),
    ("something nobody has seen", 1, Kind.OTHER),
])
def test_failures_from_the_man_pages_and_elsewhere(stderr, exit_code, kind):
    assert sp.classify_error(stderr, exit_code) is kind


def test_transient_kinds_are_could_not_tell():
    assert {kind for kind in Kind if kind.transient} == {
        Kind.CONTROLLER_DOWN, Kind.CONTROLLER_TIMEOUT, Kind.ACCOUNTING_DOWN, Kind.LIMIT_REACHED, Kind.OTHER}
    assert Kind.CONTROLLER_TIMEOUT.submit_may_have_landed and not Kind.INVALID_PARTITION.submit_may_have_landed


def test_slurm_error_classifies_a_remote_error():
    capture = captured("07", "--partition nosuchpart")
    error = sp.SlurmError.from_remote_error(
        RemoteError(capture.argv, capture.exit_code, capture.stderr, capture.stdout))
    assert isinstance(error, RemoteError) and error.kind is Kind.INVALID_PARTITION
    assert error.exit_code == 1 and "nosuchpart" in str(error)


# ---------------------------------------------------------------------------
# The state mapping, state by state
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("state, reason, expected", [
    ("PENDING", "Resources", sp.JobVerdict(TaskState.WAITING, detail="Resources")),
    ("PENDING", "PartitionTimeLimit", sp.JobVerdict(TaskState.WAITING, detail="PartitionTimeLimit")),
    ("REQUEUED", "", sp.JobVerdict(TaskState.WAITING)),
    ("REQUEUE_HOLD", "", sp.JobVerdict(TaskState.WAITING)),
    ("REQUEUE_FED", "", sp.JobVerdict(TaskState.WAITING)),
    ("RESV_DEL_HOLD", "", sp.JobVerdict(TaskState.WAITING)),
    ("SPECIAL_EXIT", "", sp.JobVerdict(TaskState.WAITING)),
    ("RUNNING", "None", sp.JobVerdict(TaskState.RUNNING)),
    ("CONFIGURING", "", sp.JobVerdict(TaskState.RUNNING, detail="configuring")),
    ("COMPLETING", "", sp.JobVerdict(TaskState.RUNNING, detail="completing")),
    ("SUSPENDED", "", sp.JobVerdict(TaskState.RUNNING, detail="suspended")),
    ("STOPPED", "", sp.JobVerdict(TaskState.RUNNING, detail="stopped")),
    ("SIGNALING", "", sp.JobVerdict(TaskState.RUNNING, detail="signaling")),
    ("STAGE_OUT", "", sp.JobVerdict(TaskState.RUNNING, detail="stage_out")),
    ("RESIZING", "", sp.JobVerdict(TaskState.RUNNING, detail="resizing")),
    ("COMPLETED", "None", sp.JobVerdict(TaskState.SUCCESS, ended=True)),
    ("FAILED", "NonZeroExitCode", sp.JobVerdict(TaskState.FAILED, ended=True, detail="NonZeroExitCode")),
    ("FAILED", "JobLaunchFailure", sp.JobVerdict(TaskState.FAILED, ended=True, detail="JobLaunchFailure")),
    ("CANCELLED", "None", sp.JobVerdict(TaskState.KILLED, ended=True, detail="cancelled")),
    ("CANCELLED by 1000", "", sp.JobVerdict(TaskState.KILLED, ended=True, detail="cancelled by uid 1000")),
    ("TIMEOUT", "TimeLimit", sp.JobVerdict(TaskState.TIMED_OUT, ended=True, detail="time limit reached")),
    ("DEADLINE", "", sp.JobVerdict(TaskState.TIMED_OUT, ended=True, detail="deadline reached")),
    ("OUT_OF_MEMORY", "", sp.JobVerdict(TaskState.FAILED, ended=True, detail="out of memory")),
    ("PREEMPTED", "", sp.JobVerdict(TaskState.KILLED, ended=True, detail="preempted")),
    ("BOOT_FAIL", "", sp.JobVerdict(TaskState.KILLED, ended=True, detail="node boot failure")),
    ("NODE_FAIL", "NodeDown", sp.JobVerdict(
        TaskState.UNKNOWN, ended=True,
        detail="node failed; the job's processes may have run on: read the exit-status record")),
    ("REVOKED", "", sp.JobVerdict(TaskState.UNKNOWN, ended=True, detail="revoked by a federation sibling")),
    ("TELEPORTED", "", sp.JobVerdict(TaskState.UNKNOWN, detail="unknown Slurm state 'TELEPORTED'")),
    ("", "", sp.JobVerdict(TaskState.UNKNOWN, detail="unknown Slurm state ''")),
])
def test_map_job_state(state, reason, expected):
    assert sp.map_job_state(state, reason) == expected


def test_every_state_of_the_reference_table_is_mapped():
    # SLURM.md section 3, then the rest of squeue's JOB STATE CODES (man squeue, 22.05).
    table = ["PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "COMPLETED", "FAILED", "CANCELLED",
             "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REQUEUED",
             "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "SUSPENDED",
             "RESV_DEL_HOLD", "REQUEUE_FED", "REVOKED", "SPECIAL_EXIT"]
    for state in table:
        verdict = sp.map_job_state(state)
        assert verdict.detail != f"unknown Slurm state {state!r}", state
        # "Could not tell" is never "failed", and only an ended job has an outcome.
        assert verdict.ended == (verdict.state in (TaskState.SUCCESS, TaskState.FAILED, TaskState.KILLED,
                                                   TaskState.TIMED_OUT) or state in ("NODE_FAIL", "REVOKED"))


# ---------------------------------------------------------------------------
# Parsers on bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n", "sbatch: error: x", "12 13", "abc", "Submitted batch job"])
def test_parse_sbatch_refuses_garbage(text):
    with pytest.raises(BadOutput):
        sp.parse_sbatch(text)


def test_parse_sbatch_forms():
    assert sp.parse_sbatch("12\n") == 12
    assert sp.parse_sbatch("12;sandbox\n") == 12
    assert sp.parse_sbatch("sbatch: warning: something\n12\n") == 12
    assert sp.parse_sbatch("Submitted batch job 2\n") == 2


@pytest.mark.parametrize("line", [
    "12|mqic_case_1|running|p|N/A|N/A|0:01|None",                  # not a state word
    "12|mqic_case_1|RUNNING|p|N/A|yesterday|0:01|None",            # not a time
    "12|mqic_case_1|RUNNING|p|N/A|N/A|a while|None",               # not a duration
])
def test_squeue_lines_that_do_not_fit_are_bad_output(line):
    with pytest.raises(BadOutput):
        read_bar_squeue(line + "\n")


def test_squeue_keeps_a_reason_with_the_delimiter_and_skips_array_jobs():
    text = ("12|mqic_case_1|PENDING|gpu|2026-12-01T04:54:47|N/A|0:00|ReqNodeNotAvail, a|b|c\n"
            "13_[1-4]|other|PENDING|gpu|2026-12-01T04:54:47|N/A|0:00|Priority\n"
            "14|mqic_case_2|RUNNING|gpu|2026-12-01T04:54:47|2026-12-01T04:55:00|1-02:03:04|None\n")
    first, second = read_bar_squeue(text)
    assert first.reason == "ReqNodeNotAvail, a|b|c" and first.partition == "gpu"
    assert first.submitted == datetime(2026, 12, 1, 4, 54, 47) and first.started is None
    assert second.elapsed_seconds == ((24 + 2) * 60 + 3) * 60 + 4 and second.case_id == 2


def test_squeue_of_nothing_is_no_job():
    assert sp.parse_marked_squeue("", sp.MarkedFormat.fresh(BAR_FORMAT.split("|"))) == ()


@pytest.mark.parametrize("text, seconds", [
    ("0:00", 0), ("0:03", 3), ("59:57", 3597), ("1:00:00", 3600), ("00:01:20", 80),
    ("1-00:00:00", 86400), ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
    ("UNLIMITED", None), ("infinite", None), ("INVALID", None), ("N/A", None), ("", None),
])
def test_parse_duration(text, seconds):
    assert sp.parse_duration(text) == seconds


def test_parse_times():
    assert sp.parse_slurm_time("2026-12-01T04:54:47") == datetime(2026, 12, 1, 4, 54, 47)
    assert [sp.parse_slurm_time(text) for text in ("N/A", "Unknown", "None", "")] == [None] * 4
    with pytest.raises(BadOutput):
        sp.parse_slurm_time("2026-12-01 04:54")


def test_job_names():
    assert sp.job_name(7) == "mqic_case_7"
    assert [sp.case_id_from_job_name(name) for name in
            ("mqic_case_7", "mqic_case_", "mqic_case_7x", "mqic_held", "allocation", "mqic_case_٣")] == [
        7, None, None, None, None, None]


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------

def test_sbatch_argv():
    settings = sp.SubmitSettings("gpu", account="physics", qos="normal", gres="gpu:1",
                                 time_limit_seconds=24 * 3600)
    assert sp.sbatch_argv(7, "/scratch/mqic/7_case", settings) == [
        "sbatch", "--parsable", "--job-name=mqic_case_7", "--chdir=/scratch/mqic/7_case",
        "--output=/dev/null", "--partition=gpu", "--account=physics",
        "--qos=normal", "--gres=gpu:1", "--time=1-00:00:00", "--no-requeue"]
    minimal = sp.sbatch_argv(8, "/s/8/", sp.SubmitSettings("debug", requeue=True),
                             script_path="/s/8/.mqic/job.sh", bin_dir="/opt/slurm/bin/")
    assert minimal == ["/opt/slurm/bin/sbatch", "--parsable", "--job-name=mqic_case_8", "--chdir=/s/8",
                       "--output=/dev/null", "--partition=debug", "--requeue",
                       "/s/8/.mqic/job.sh"]


def test_no_slurm_filename_pattern_ever_sees_the_folder():
    """Slurm expands '%' in --output and drops every pattern at a '\\': the script opens the file."""
    folder = "/s/9_100%dose %j \\ x"
    argv = sp.sbatch_argv(9, folder, sp.SubmitSettings("gpu"))
    assert f"--chdir={folder}" in argv and "--output=/dev/null" in argv
    assert [word for word in argv if "%" in word] == [f"--chdir={folder}"]
    assert sp.output_path(folder, 41) == f"{folder}/.mqic/slurm-41.out"


@pytest.mark.parametrize("remote_dir, settings", [
    ("relative/dir", sp.SubmitSettings("gpu")),
    ("~/mqic/7", sp.SubmitSettings("gpu")),
    ("/s/7\0x", sp.SubmitSettings("gpu")),
    ("/s/7", sp.SubmitSettings("")),
    ("/s/7", sp.SubmitSettings("--wrap=evil")),
    ("/s/7", sp.SubmitSettings("gpu", account="a b")),
    ("/s/7", sp.SubmitSettings("gpu", time_limit_seconds=0)),
])
def test_sbatch_argv_refuses_bad_values(remote_dir, settings):
    with pytest.raises(ValueError):
        sp.sbatch_argv(7, remote_dir, settings)


def test_format_time_limit_rounds_up_to_minutes():
    assert sp.format_time_limit(1) == "0-00:01:00"
    assert sp.format_time_limit(61) == "0-00:02:00"
    assert sp.format_time_limit(3600) == "0-01:00:00"
    assert sp.format_time_limit(36.5 * 3600) == "1-12:30:00"


def test_other_argv_builders():
    assert sp.squeue_argv(fmt=BAR_FORMAT) == ["squeue", "--me", "--noheader", "--states=all", f"--format={BAR_FORMAT}"]
    assert sp.squeue_argv(fmt=BAR_FORMAT, bin_dir="/b")[0] == "/b/squeue"
    assert sp.scancel_argv([5]) == ["scancel", "5"]
    assert sp.scancel_argv([5, 6], signal="TERM") == ["scancel", "--signal=TERM", "--full", "5", "6"]
    assert sp.sinfo_argv() == ["sinfo", "--noheader", f"--format={sp.SINFO_FORMAT}"]
    assert sp.version_argv() == ["sbatch", "--version"]


@pytest.mark.parametrize("build", [
    lambda: sp.scancel_argv([0]),
    lambda: sp.scancel_argv([]),
    lambda: sp.scancel_argv([1], signal="TERM; rm"),
])
def test_argv_builders_refuse_bad_input(build):
    with pytest.raises(ValueError):
        build()


# ---------------------------------------------------------------------------
# The batch script, run by bash
# ---------------------------------------------------------------------------

def write_script(tmp_path: Path, command: str, **kwargs) -> tuple[Path, Path]:
    case_dir = tmp_path / "case"
    case_dir.mkdir(exist_ok=True)
    settings = kwargs.pop("settings", sp.SubmitSettings("gpu"))
    script = tmp_path / "job.sh"
    script.write_text(sp.batch_script(7, str(case_dir), command, settings, **kwargs))
    return script, case_dir


def run_script(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30, cwd="/")


@pytest.mark.system
def test_the_script_runs_in_the_case_folder_with_its_environment(tmp_path):
    evil = "$(touch pwned) `touch pwned2` \"'"
    script, case_dir = write_script(tmp_path, 'pwd > where; [[ -n "$MQIC_CASE_NAME" ]] && printf %s "$MQIC_CASE_NAME" > name',
                                    env={"MQIC_CASE_NAME": evil, "MQIC_CASE_ID": "7"})
    assert run_script(script).returncode == 0
    assert (case_dir / "where").read_text().strip() == str(case_dir)
    assert (case_dir / "name").read_text() == evil  # bash, not sh: [[ ]] works
    assert not list(tmp_path.rglob("pwned*"))


@pytest.mark.system
def test_the_script_refuses_a_missing_folder(tmp_path):
    script, case_dir = write_script(tmp_path, "sleep 0")
    assert run_script(script).returncode == 0
    os.rename(case_dir, tmp_path / "moved")
    result = run_script(script)
    assert result.returncode == 1 and "mqic: cannot enter" in result.stderr


def test_extra_sbatch_lines_come_first(tmp_path):
    settings = sp.SubmitSettings("gpu", extra_sbatch_lines=("--mem=16G", "#SBATCH --cpus-per-task=4"))
    script, _ = write_script(tmp_path, "true", settings=settings)
    lines = script.read_text().splitlines()
    # sbatch stops reading #SBATCH lines at the first command.
    assert lines[:3] == ["#!/bin/bash", "#SBATCH --mem=16G", "#SBATCH --cpus-per-task=4"]


@pytest.mark.parametrize("line", ["--mem=1G\nrm -rf /", "mem=1G", "#SBATCH", "--mem=1G\rX"])
def test_extra_sbatch_lines_are_one_option_each(line):
    with pytest.raises(ValueError):
        sp.batch_script(7, "/s/7", "true", sp.SubmitSettings("gpu", extra_sbatch_lines=(line,)))


@pytest.mark.parametrize("command, env", [("", None), ("  ", None), ("true", {"BAD-NAME": "x"})])
def test_batch_script_refuses_bad_input(command, env):
    with pytest.raises(ValueError):
        sp.batch_script(7, "/s/7", command, sp.SubmitSettings("gpu"), env=env)


# ---------------------------------------------------------------------------
# What the Slurm backend adds: work dir and comment in squeue, the slot comment, a script
# that leaves the record to the command's own wrapper
# ---------------------------------------------------------------------------

def test_squeue_reads_the_work_dir_and_the_comment():
    fmt = "%i|%j|%T|%P|%V|%S|%M|%Z|%k|%r"
    [ours, other] = read_bar_squeue("5|mqic_case_5|RUNNING|gpu|N/A|N/A|0:01|/r/5 x|mqic_slot=gpu_a|None\n"
                                    "6|x|PENDING|gpu|N/A|N/A|0:00|/tmp|(null)|reason with | bar\n", fmt)
    assert (ours.work_dir, ours.comment) == ("/r/5 x", "mqic_slot=gpu_a")
    assert (other.work_dir, other.comment, other.reason) == ("/tmp", "", "reason with | bar")


def test_sbatch_argv_carries_a_comment_of_one_word():
    argv = sp.sbatch_argv(5, "/r/5", sp.SubmitSettings("gpu"), comment="mqic_slot=gpu_a")
    assert argv[-1] == "--comment=mqic_slot=gpu_a"
    with pytest.raises(ValueError):
        sp.sbatch_argv(5, "/r/5", sp.SubmitSettings("gpu"), comment="two words")


@pytest.mark.system
def test_without_its_own_record_the_script_execs_the_command_in_the_folder(tmp_path):
    script, case_dir = write_script(tmp_path, 'pwd > where; printf %s "$MQIC_CASE_NAME" > name; exit 5',
                                    env={"MQIC_CASE_NAME": "$(touch pwned)"})
    assert "exec /bin/bash -c" in script.read_text() and "trap" not in script.read_text()
    assert run_script(script).returncode == 5
    assert (case_dir / "where").read_text().strip() == str(case_dir)
    assert (case_dir / "name").read_text() == "$(touch pwned)" and not list(tmp_path.rglob("pwned"))
    assert not (case_dir / tasks.EXIT_RECORD).exists()   # the wrapped command writes it, not the script


# ---------------------------------------------------------------------------
# No folder name can shift a field (issue 16): squeue read with a fresh marker
# ---------------------------------------------------------------------------

PRINTABLE = "".join(chr(c) for c in range(32, 127) if chr(c) != "/")
HOSTILE_NAMES = [
    *PRINTABLE,                                    # every printable ASCII character alone
    PRINTABLE,                                     # and all of them in one name
    "\t", "|", "a|b|c", "tab\there", "new\nline", "환자 é ü 🩻", "  spaces at both ends  ", "(null)",
    "%j %% %x \\", "~mqic-0123456789abcdef~", "\x1f\x1e", "None", "Unknown", "mqic_slot=gpu_b",
]
# The codes the backend reads, the work dir and the comment before the reason.
BACKEND_CODES = ("%i", "%j", "%T", "%P", "%V", "%S", "%M", "%Z", "%k", "%r")


def render_marked(rows: list[dict[str, str]], fmt: sp.MarkedFormat) -> str:
    """What squeue prints for ``--format=<fmt.text>``: the values as they are, between markers."""
    return "".join(fmt.mark + fmt.mark.join(row[code] for code in fmt.codes) + fmt.mark + "\n" for row in rows)


def captured_rows() -> list[dict[str, str]]:
    """Every job line of every captured ``squeue --format`` as code -> value."""
    rows = []
    for capture in captures_of("squeue", exit_code=0):
        fmt = capture.option("--format")
        if fmt is None:
            continue
        codes = fmt.split("|")
        rows += [dict(zip(codes, line.split("|", len(codes) - 1))) for line in capture.stdout.splitlines()]
    return rows


def test_the_marked_format_is_the_codes_between_fresh_markers():
    first, second = sp.MarkedFormat.fresh(BACKEND_CODES), sp.MarkedFormat.fresh(BACKEND_CODES)
    assert first.mark != second.mark and first.mark.startswith("~mqic-")
    assert first.text == first.mark + first.mark.join(BACKEND_CODES) + first.mark


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_no_case_name_shifts_a_field_of_any_captured_job(name):
    fmt = sp.MarkedFormat.fresh(BACKEND_CODES)
    work_dir = f"/scratch/mqic/12_{name}"
    rows = [{"%P": "gpu", "%V": "2026-12-01T04:54:40", "%S": "N/A", "%M": "0:00", "%r": "None", **row,
             "%Z": work_dir, "%k": "mqic_slot=gpu_a"} for row in captured_rows()]
    jobs = sp.parse_marked_squeue(render_marked(rows, fmt), fmt)
    assert len(jobs) == len(rows) > 10
    for job, row in zip(jobs, rows):
        assert (job.job_id, job.name, job.state, job.partition) == (int(row["%i"]), row["%j"], row["%T"], "gpu")
        assert (job.work_dir, job.comment, job.reason) == (work_dir, "mqic_slot=gpu_a", row["%r"])


@pytest.mark.parametrize("name", ["a|b", "pt\t01", PRINTABLE])
def test_the_old_bar_format_was_shifted_by_such_a_name(name):
    """Why the backend reads markers: with '|' between fields the slot became the partition."""
    line = f"5|mqic_case_5|RUNNING|gpu|N/A|N/A|0:01|/r/5_{name}|mqic_slot=gpu_a|None\n"
    fmt = sp.MarkedFormat.fresh(BACKEND_CODES)
    values = ["5", "mqic_case_5", "RUNNING", "gpu", "N/A", "N/A", "0:01", f"/r/5_{name}", "mqic_slot=gpu_a", "None"]
    [marked] = sp.parse_marked_squeue(render_marked([dict(zip(BACKEND_CODES, values))], fmt), fmt)
    assert (marked.work_dir, marked.comment) == (f"/r/5_{name}", "mqic_slot=gpu_a")
    if "|" in name:
        [shifted] = read_bar_squeue(line, "|".join(BACKEND_CODES))
        assert shifted.work_dir != marked.work_dir and shifted.comment != "mqic_slot=gpu_a"


def test_a_foreign_job_with_any_name_and_comment_cannot_disturb_ours():
    fmt = sp.MarkedFormat.fresh(BACKEND_CODES)
    base = {"%T": "RUNNING", "%P": "gpu", "%V": "N/A", "%S": "N/A", "%M": "0:01", "%r": "None"}
    foreign = {**base, "%i": "6", "%j": f"x{fmt.mark[:-1]}\n7|mqic_case_7", "%Z": "/tmp/\n", "%k": "|||"}
    ours = {**base, "%i": "7", "%j": "mqic_case_7", "%Z": "/r/7_a\nb", "%k": "mqic_slot=gpu_a"}
    other, mine = sp.parse_marked_squeue(render_marked([foreign, ours], fmt), fmt)
    assert (other.job_id, other.name, other.work_dir, other.comment) == (6, foreign["%j"], "/tmp/\n", "|||")
    assert (mine.job_id, mine.work_dir, mine.comment) == (7, "/r/7_a\nb", "mqic_slot=gpu_a")


@pytest.mark.parametrize("text", [
    "stray text",                                    # no marker at all
    "{m}5{m}mqic_case_5{m}RUNNING{m}\n",             # a field missing
    "x{m}5{m}mqic_case_5{m}RUNNING{m}gpu{m}\n",      # text before the first marker
    "{m}5{m}mqic_case_5{m}RUNNING{m}gpu{m}junk\n",   # text after the last one
    "{m}5{m}mqic_case_5{m}running{m}gpu{m}\n",       # not a state word
])
def test_marked_output_that_does_not_fit_is_bad_output(text):
    fmt = sp.MarkedFormat("%i %j %T %P".split(), "~mqic-00~")
    with pytest.raises(BadOutput):
        sp.parse_marked_squeue(text.format(m=fmt.mark), fmt)


def test_marked_output_of_nothing_is_no_job_and_array_jobs_are_left_out():
    fmt = sp.MarkedFormat(("%i", "%j", "%T"), "~m~")
    assert sp.parse_marked_squeue("", fmt) == () and sp.parse_marked_squeue("\n", fmt) == ()
    assert sp.parse_marked_squeue("~m~13_[1-4]~m~x~m~PENDING~m~\n", fmt) == ()
    with pytest.raises(ValueError):
        sp.parse_marked_squeue("", sp.MarkedFormat(("%i", "%Z"), "~m~"))


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
@pytest.mark.system
def test_every_case_name_goes_into_sbatch_and_the_script_as_it_is(tmp_path, name):
    folder = tmp_path / f"12_{name}"
    folder.mkdir()
    argv = sp.sbatch_argv(12, str(folder), sp.SubmitSettings("gpu"), script_path=f"{folder}/.mqic/job.sh")
    assert f"--chdir={folder}" in argv and argv[-1] == f"{folder}/.mqic/job.sh"
    script = tmp_path / "job.sh"
    script.write_text(sp.batch_script(12, str(folder), "pwd > where", sp.SubmitSettings("gpu")))
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30, cwd="/",
                            env={**os.environ, "SLURM_JOB_ID": "41"})
    assert result.returncode == 0, result.stderr
    assert (folder / "where").read_text() == f"{folder}\n"
    assert (folder / ".mqic" / "slurm-41.out").exists()       # the script opened its output itself
