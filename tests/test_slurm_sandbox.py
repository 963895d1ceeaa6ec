"""sandbox.slurm: a real single-node Slurm, driven with the commands and parsers of shared.backends.slurm_parse.

Skipped only when Slurm cannot run here (its Debian packages are missing, which
scripts/setup.sh installs as root, or the tests do not run as root).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.slurm import SandboxSlurm, missing_binaries
from sandbox.waiting import wait_until
from shared import tasks
from shared.backends import slurm_parse as sp
from shared.backends.slurm import SQUEUE_FIELDS
from shared.backends.slurm_parse import SlurmErrorKind as Kind, TaskState

pytestmark = pytest.mark.system  # every test here starts real processes

GPU = sp.SubmitSettings("gpu", gres="gpu:1", time_limit_seconds=600)
PROJECT = Path(__file__).resolve().parent.parent


def skip_unless_slurm_can_run(accounting: bool = False) -> None:
    if os.geteuid() != 0:
        pytest.skip("the Slurm sandbox needs root (slurmd starts jobs as their user)")
    missing = missing_binaries(accounting)
    if missing:
        pytest.skip(f"Slurm packages not installed ({', '.join(missing)}); run scripts/setup.sh as root")


def started(sandbox: SandboxSlurm) -> SandboxSlurm:
    """Start it, or stop what did start: pytest deletes old tmp folders, not the daemons in them."""
    try:
        sandbox.start()
    except BaseException:
        sandbox.stop()
        raise
    return sandbox


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    skip_unless_slurm_can_run()
    sandbox = started(SandboxSlurm(tmp_path_factory.mktemp("slurm"), kill_wait=5, message_timeout=4))
    yield sandbox
    sandbox.stop()


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster for one test that stops daemons or the whole cluster."""
    skip_unless_slurm_can_run()
    made: list[SandboxSlurm] = []

    def build(name: str = "slurm", **settings) -> SandboxSlurm:
        made.append(SandboxSlurm(tmp_path / name, **settings))
        return started(made[-1])

    yield build
    for sandbox in made:
        sandbox.stop()


# --- helpers: what the Slurm backend will do, without ssh ------------------------------------

def submit(cluster: SandboxSlurm, case_id: int, command: str, settings: sp.SubmitSettings = GPU) -> tuple[int, Path]:
    case_dir = cluster.root / "cases" / f"{case_id}_case"
    (case_dir / sp.MQIC_DIR).mkdir(parents=True, exist_ok=True)
    script = sp.batch_script(case_id, str(case_dir), tasks.wrap_command(command), settings,
                             env={"MQIC_CASE_ID": str(case_id)})
    result = cluster.run(sp.sbatch_argv(case_id, str(case_dir), settings), stdin=script)
    assert result.returncode == 0, result.stderr
    return sp.parse_sbatch(result.stdout), case_dir


def queued(cluster: SandboxSlurm, names=()) -> dict[int, sp.QueuedJob]:
    """Our jobs as the backend lists them (``names``: only those)."""
    fmt = sp.MarkedFormat.fresh(SQUEUE_FIELDS)
    result = cluster.run(sp.squeue_argv(fmt=fmt.text))
    assert result.returncode == 0, result.stderr
    return {job.job_id: job for job in sp.parse_marked_squeue(result.stdout, fmt) if not names or job.name in names}


def wait_for_state(cluster: SandboxSlurm, job_id: int, *states: TaskState, timeout: float = 40) -> sp.QueuedJob:
    def reached():
        job = queued(cluster).get(job_id)
        return job if job is not None and job.verdict.state in states else None
    return wait_until(reached, timeout=timeout, interval=0.2, message=f"job {job_id} in {states}")


def failure(cluster: SandboxSlurm, argv: list[str]) -> sp.SlurmError:
    result = cluster.run(argv)
    assert result.returncode != 0, result.stdout
    return sp.SlurmError(argv, result.returncode, result.stderr, result.stdout)


def record(case_dir: Path) -> int:
    return int((case_dir / tasks.EXIT_RECORD).read_text())


def processes_with_conf(cluster: SandboxSlurm) -> list[int]:
    marker = f"SLURM_CONF={cluster.endpoint.slurm_conf}".encode()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                environ = Path(f"/proc/{name}/environ").read_bytes()
                state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in environ.split(b"\0") and state not in ("Z", "X"):
                found.append(int(name))
    return found


# --- the cluster ----------------------------------------------------------------------------------

def test_the_sandbox_starts_in_seconds_and_start_is_idempotent(cluster):
    assert cluster.is_running()
    print(f"slurm sandbox start-up: {cluster.startup_seconds:.2f} s")
    assert cluster.startup_seconds < 10
    ports = cluster.ports
    cluster.start()
    assert cluster.ports == ports and cluster.startup_seconds < 1
    partitions = sp.parse_partitions(cluster.run(sp.sinfo_argv()).stdout)
    assert sorted(partitions) == ["debug", "gpu"] and partitions["debug"].default
    assert sp.parse_version(cluster.run(sp.version_argv()).stdout).startswith("22.05")


def test_a_case_job_runs_and_records_its_exit_status(cluster):
    job_id, case_dir = submit(cluster, 101, 'echo "gpu=$CUDA_VISIBLE_DEVICES case=$MQIC_CASE_ID"; exit 3')
    mine = queued(cluster, [sp.job_name(101)])
    assert list(mine) == [job_id] and mine[job_id].case_id == 101 and mine[job_id].partition == "gpu"
    finished = wait_for_state(cluster, job_id, TaskState.FAILED)
    assert finished.verdict.ended and finished.started is not None
    assert finished.verdict == sp.JobVerdict(TaskState.FAILED, ended=True, detail="NonZeroExitCode")
    assert record(case_dir) == 3
    output = Path(sp.output_path(str(case_dir), job_id)).read_text()
    assert output.strip() in ("gpu=0 case=101", "gpu=1 case=101")


def test_one_squeue_shows_every_job_of_ours(cluster):
    first, _ = submit(cluster, 102, "sleep 300")
    second, _ = submit(cluster, 103, "exit 0")
    wait_for_state(cluster, second, TaskState.SUCCESS)
    jobs = queued(cluster)
    assert {jobs[first].case_id, jobs[second].case_id} == {102, 103}
    assert jobs[first].verdict.state in (TaskState.WAITING, TaskState.RUNNING)
    assert cluster.run(sp.scancel_argv([first])).returncode == 0
    wait_for_state(cluster, first, TaskState.KILLED)


def test_scancel_term_ends_the_job_and_a_signal_leaves_no_record(cluster):
    """As shared/backends/slurm.py says: a signalled job has no record; squeue tells its end."""
    job_id, case_dir = submit(cluster, 104, "touch started; sleep 300")
    wait_for_state(cluster, job_id, TaskState.RUNNING)
    wait_until(lambda: (case_dir / "started").exists(), timeout=20, message="the command to start")
    result = cluster.run(sp.scancel_argv([job_id], signal="TERM"))
    assert result.returncode == 0, result.stderr
    wait_for_state(cluster, job_id, TaskState.FAILED, timeout=cluster.settings.kill_wait + 10)
    assert not (case_dir / tasks.EXIT_RECORD).exists()


def test_plain_scancel_kills_the_job_and_leaves_no_record(cluster):
    job_id, case_dir = submit(cluster, 105, "touch started; sleep 300")
    wait_until(lambda: (case_dir / "started").exists(), timeout=20, message="the command to start")
    assert cluster.run(sp.scancel_argv([job_id])).returncode == 0
    ended = wait_for_state(cluster, job_id, TaskState.KILLED, timeout=cluster.settings.kill_wait + 10)
    assert ended.state == "CANCELLED"
    assert not (case_dir / tasks.EXIT_RECORD).exists()


def test_a_cancel_of_an_unknown_job_succeeds_silently_and_a_signal_says_invalid(cluster):
    assert cluster.run(sp.scancel_argv([99999])).returncode == 0
    assert failure(cluster, sp.scancel_argv([99999], signal="TERM")).kind is Kind.INVALID_JOB_ID


def test_a_wrong_partition_is_refused_at_submit(cluster):
    case_dir = cluster.root / "cases" / "106_case"
    argv = sp.sbatch_argv(106, str(case_dir), sp.SubmitSettings("nosuchpart"))
    result = cluster.run(argv, stdin=sp.batch_script(106, str(case_dir), "true", sp.SubmitSettings("x")))
    error = sp.SlurmError(argv, result.returncode, result.stderr, result.stdout)
    assert error.kind is Kind.INVALID_PARTITION and not error.kind.submit_may_have_landed


def test_sbatch_exits_255_of_its_own_for_a_bad_time(cluster):
    """Why SUBMIT_SCRIPT (shared/backends/slurm.py) turns sbatch's 255 into 254: ssh's own is 255."""
    case_dir = cluster.root / "cases" / "110_case"
    argv = [*sp.sbatch_argv(110, str(case_dir), GPU), "--time=abc"]
    result = cluster.run(argv, stdin="#!/bin/bash\ntrue\n")
    assert result.returncode == 255
    assert sp.classify_error(result.stderr, result.returncode) is Kind.UNSATISFIABLE


def test_a_third_gpu_job_waits_for_a_free_gpu(cluster):
    first, _ = submit(cluster, 107, "sleep 300")
    second, _ = submit(cluster, 108, "sleep 300")
    third, third_dir = submit(cluster, 109, "exit 0")
    wait_for_state(cluster, first, TaskState.RUNNING)
    wait_for_state(cluster, second, TaskState.RUNNING)
    assert queued(cluster)[third].verdict == sp.JobVerdict(TaskState.WAITING, detail="Resources")
    cluster.run(sp.scancel_argv([first]))
    wait_for_state(cluster, third, TaskState.SUCCESS)
    assert record(third_dir) == 0
    cluster.run(sp.scancel_argv([second]))


# --- outages, neighbours, stopping, ssh ---------------------------------------------------------

def test_a_controller_outage_is_could_not_tell_and_heals(own_cluster):
    cluster = own_cluster(message_timeout=3)
    job_id, case_dir = submit(cluster, 301, "touch started; sleep 4")
    wait_until(lambda: (case_dir / "started").exists(), timeout=20, message="the command to start")
    cluster.stop_daemon("slurmctld")
    assert not cluster.is_running()
    error = failure(cluster, sp.squeue_argv(fmt="%i"))
    assert error.kind is Kind.CONTROLLER_DOWN and error.kind.transient
    cluster.start()
    assert cluster.is_running()
    wait_for_state(cluster, job_id, TaskState.SUCCESS, timeout=60)  # the job ran on meanwhile
    assert record(case_dir) == 0


def test_two_sandboxes_run_side_by_side(cluster, own_cluster):
    other = own_cluster("other")
    assert set(vars(other.ports).values()).isdisjoint(vars(cluster.ports).values())
    job_id, _ = submit(other, 401, "sleep 300")
    assert other.is_running() and cluster.is_running()
    assert job_id in queued(other) and all(job.case_id != 401 for job in queued(cluster).values())
    other.stop()
    assert cluster.is_running() and not other.is_running()


def test_stop_cancels_the_jobs_and_leaves_no_process(own_cluster):
    cluster = own_cluster()
    job_id, case_dir = submit(cluster, 501, "touch started; sleep 300")
    wait_until(lambda: (case_dir / "started").exists(), timeout=20, message="the command to start")
    assert processes_with_conf(cluster)
    cluster.stop()
    assert not cluster.is_running()
    assert processes_with_conf(cluster) == []
    assert not list((cluster.root / "run").glob("*.pid"))
    assert not (case_dir / tasks.EXIT_RECORD).exists()


def test_the_wrappers_submit_over_ssh(cluster, sshd):
    """The HPC side of our system: sbatch and squeue over a non-interactive ssh, via <root>/bin."""
    if not sshd.is_running():
        sshd.start()
    bin_dir = str(cluster.endpoint.bin_dir)
    case_dir = cluster.root / "cases" / "601_case"
    settings = sp.SubmitSettings("debug")
    command = (f"mkdir -p {shlex.quote(str(case_dir / sp.MQIC_DIR))} && "
               + shlex.join(sp.sbatch_argv(601, str(case_dir), settings, bin_dir=bin_dir)))
    ssh = [*sshd.endpoint.ssh_base_argv(), command]
    submitted = subprocess.run(ssh, input=sp.batch_script(601, str(case_dir), tasks.wrap_command("exit 5"), settings),
                               capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = sp.parse_sbatch(submitted.stdout)

    def over_ssh():
        fmt = sp.MarkedFormat.fresh(SQUEUE_FIELDS)
        argv = [*sshd.endpoint.ssh_base_argv(), shlex.join(sp.squeue_argv(fmt=fmt.text, bin_dir=bin_dir))]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        jobs = {job.job_id: job for job in sp.parse_marked_squeue(result.stdout, fmt)}
        return job_id in jobs and jobs[job_id].verdict.ended and jobs[job_id]

    assert wait_until(over_ssh, timeout=40, interval=0.3, message="the job over ssh").verdict.state is TaskState.FAILED
    assert record(case_dir) == 5


def test_the_command_line(tmp_path):
    skip_unless_slurm_can_run()
    root = tmp_path / "cli"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sandbox.slurm", *args, "--root", str(root)],
                              capture_output=True, text=True, timeout=120, cwd=PROJECT)

    try:
        up = cli("up")
        assert up.returncode == 0, up.stderr
        endpoint = json.loads(up.stdout)
        assert endpoint["running"] and endpoint["slurm_conf"] == str(root / "etc" / "slurm.conf")
        assert cli("status").returncode == 0
        wrapper = subprocess.run(["env", "-i", f"{endpoint['bin_dir']}/sinfo", "--noheader", "--format=%T"],
                                 capture_output=True, text=True, timeout=30)
        assert wrapper.stdout.split() == ["idle"]  # no SLURM_CONF in the environment: the wrapper sets it
    finally:
        down = cli("down", "--purge")
    assert down.returncode == 0 and json.loads(down.stdout)["running"] is False
    assert not root.exists()
    assert cli("status").returncode == 3
