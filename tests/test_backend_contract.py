"""One contract, every backend: what a worker may rely on from ``ctx.backend``.

Run against the pueue stand-in (the ``hpc`` fixture), a real single-node Slurm (the
``slurm_hpc`` fixture) and a box without a scheduler (``direct_hpc``), all over the session's
real sshd (the system tier), and against the HPC in memory of the fast tier
(``tests/memory_hpc.py``, no process: its programs below stand for the shell commands here,
and each call costs one second of its clock, which the waits below let pass). Each backend's slot holds one task at a time, so the next one waits. The Slurm runs
skip, saying why, only where Slurm cannot run here (not root, packages missing).
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared import errors, tasks
from shared.backends import Backend, SubmitItem, backend_for, model, pueue
from shared.config import Config
from shared.errors import RemoteError
from shared.remote import Remote
from tests.conftest import wait_until

SLOT = "gpu_a"


@dataclass
class Host:
    config: Config
    remote: Remote
    backend: Backend

    @property
    def base(self) -> Path:
        return Path(self.config.hosts[0].hpc.remote_base_dir)

    def case_dir(self, name: str) -> str:
        folder = self.base / name
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    def submit(self, case_id: int, command: str, *, workdir: str | None = None, require_workdir: bool = False) -> int:
        workdir = workdir or self.case_dir(f"case_{case_id}")
        return self.backend.submit(slot=SLOT, label=f"mqic_case_{case_id}", workdir=workdir,
                                   command=tasks.wrap_command(command), require_workdir=require_workdir,
                                   env={"MQIC_CASE_ID": str(case_id), "MQIC_CASE_NAME": f"case {case_id}",
                                        "MQIC_REMOTE_DIR": workdir})

    def item(self, case_id: int, command: str, *, workdir: str | None = None,
             require_workdir: bool = False) -> SubmitItem:
        """One case of a batch, as ``submit`` would send it."""
        workdir = workdir or self.case_dir(f"case_{case_id}")
        return SubmitItem(slot=SLOT, label=f"mqic_case_{case_id}", workdir=workdir, command=tasks.wrap_command(command),
                          env={"MQIC_CASE_ID": str(case_id), "MQIC_CASE_NAME": f"case {case_id}",
                               "MQIC_REMOTE_DIR": workdir}, require_workdir=require_workdir)

    def labelled(self, case_id: int) -> list[int]:
        return [task.id for task in self.backend.snapshot().by_label(f"mqic_case_{case_id}")]

    def task(self, task_id: int) -> model.TaskInfo | None:
        return self.backend.snapshot().tasks.get(task_id)

    def wait_running(self, task_id: int) -> model.TaskInfo:
        return wait_until(lambda: (t := self.task(task_id)) is not None and t.state.is_active and t,
                          timeout=30, interval=0.2, message=f"task {task_id} running")

    def wait_ended(self, task_id: int) -> None:
        """Finished, or no longer listed (Slurm leaves out what only the exit record can tell)."""
        wait_until(lambda: (t := self.task(task_id)) is None or t.is_done, timeout=30, interval=0.2,
                   message=f"task {task_id} ended")


def _sleeps(seconds: float, say=(), code: int = 0):
    def program(run):
        for line in say if not run.memory.get("said") else ():
            run.say(line.format(pwd=run.workdir))
        run.memory["said"] = True
        return code if run.elapsed >= seconds else None
    return program


def _where_then(code: int):
    def program(run):
        Path(run.workdir, "where.txt").write_text(
            f"{run.env['MQIC_CASE_ID']}:{run.env['MQIC_CASE_NAME']}:{run.workdir}\n")
        return code
    return program


# The memory HPC runs Python programs: one for each command this suite submits.
MEMORY_PROGRAMS = {
    "sleep 30": _sleeps(30), "sleep 60": _sleeps(60), "true": _sleeps(0),
    'echo "$MQIC_CASE_ID:$MQIC_CASE_NAME:$PWD" > where.txt; true': _where_then(0),
    'echo "$MQIC_CASE_ID:$MQIC_CASE_NAME:$PWD" > where.txt; exit 3': _where_then(3),
    "for i in 1 2 3 4 5; do echo line $i; done; sleep 30": _sleeps(30, [f"line {i}" for i in range(1, 6)]),
    'echo "in $PWD"; sleep 3; exit 4': _sleeps(3, ["in {pwd}"], code=4),
}


def memory_host(request) -> Host:
    sandbox = request.getfixturevalue("memory_hpc")(groups={SLOT: {"gpu": 0}}, programs=MEMORY_PROGRAMS)
    sandbox.clock.now = time.time()        # the test compares the HPC's clock with ours
    sandbox.hpc.seconds_per_call = 1.0      # time passes on the HPC while the waits below look
    [made] = sandbox.hosts().values()
    return Host(sandbox.config, made.remote, made.backend)


@pytest.fixture(params=[pytest.param("pueue", marks=pytest.mark.system),
                        pytest.param("slurm", marks=pytest.mark.system),
                        pytest.param("direct", marks=pytest.mark.system), "memory"])
def host(request):
    if request.param == "memory":  # the fast tier's: no process
        made = memory_host(request)
        made.base.mkdir(parents=True, exist_ok=True)
        made.backend.ensure_slots({SLOT: 1})
        return made
    if request.param == "pueue":
        config = request.getfixturevalue("hpc")(groups={SLOT: {"gpu": 0}}).config
    elif request.param == "direct":  # no scheduler: its slot is one GPU of the box, one task at a time
        config = request.getfixturevalue("direct_hpc")(groups={SLOT: {"gpu": 0}}).config
    else:  # its slot asks for both GPUs of the one node, so a second job waits
        build = request.getfixturevalue("slurm_hpc")
        config = build(partitions={SLOT: {"partition": "gpu", "gres": "gpu:2"}}).config
    remote = Remote(config.hosts[0].hpc)
    made = Host(config, remote, backend_for(config, config.hosts[0], remote))
    made.base.mkdir(parents=True, exist_ok=True)
    made.backend.ensure_slots({SLOT: 1})
    return made


def test_a_submitted_task_carries_our_label_and_slot_on_the_hpc_clock(host):
    workdir = host.case_dir("case_1")
    task_id = host.submit(1, "sleep 30", workdir=workdir)
    snapshot = host.backend.snapshot()
    task = snapshot.tasks[task_id]
    assert (task.label, task.group, task.path) == ("mqic_case_1", SLOT, workdir) and not task.is_done
    assert abs(snapshot.hpc_time - time.time()) < 5           # the HPC's clock (here: the same machine)
    started = host.wait_running(task_id).start
    assert started is not None and started.tzinfo is not None and abs(started.timestamp() - time.time()) < 30


def test_a_second_submit_of_a_label_is_refused(host):
    task_id = host.submit(2, "sleep 30")
    with pytest.raises(errors.AlreadySubmitted):
        host.submit(2, "true")
    assert [t.id for t in host.backend.snapshot().by_label("mqic_case_2") if not t.is_done] == [task_id]


def test_a_missing_workdir_is_refused_and_nothing_is_added(host):
    with pytest.raises(errors.WorkdirMissing):
        host.submit(3, "true", workdir=str(host.base / "gone"), require_workdir=True)
    assert host.backend.snapshot().by_label("mqic_case_3") == []


@pytest.mark.parametrize("command, status", [("true", 0), ("exit 3", 3)])
def test_the_task_runs_in_its_folder_and_leaves_its_exit_record(host, command, status):
    workdir = host.case_dir("case_4")
    task_id = host.submit(4, f'echo "$MQIC_CASE_ID:$MQIC_CASE_NAME:$PWD" > where.txt; {command}', workdir=workdir)

    def record():
        found = tasks.read_exit_records(host.remote, [workdir])[workdir]
        return (found,) if found is not tasks.Record.MISSING else None

    assert wait_until(record, timeout=30, interval=0.2, message="exit record") == (status,)
    assert Path(workdir, "where.txt").read_text() == f"4:case 4:{workdir}\n"
    host.wait_ended(task_id)


def test_logs_are_the_tail_of_each_task(host):
    task_id = host.submit(5, "for i in 1 2 3 4 5; do echo line $i; done; sleep 30")
    task = host.wait_running(task_id)

    def tail():
        lines = host.backend.logs([task], 2).get(task_id, "").splitlines()
        return lines if lines == ["line 4", "line 5"] else None

    wait_until(tail, timeout=20, interval=0.2, message="the last two lines")


@pytest.mark.parametrize("gently", [True, False])
def test_stop_ends_a_running_task(host, gently):
    task_id = host.submit(6, "sleep 60")
    host.wait_running(task_id)
    result = host.backend.stop([task_id], gently=gently)
    assert result.killed == (task_id,) and result.failed == ()
    host.wait_ended(task_id)


def test_remove_takes_a_waiting_task_out_and_leaves_a_running_one(host):
    running = host.submit(7, "sleep 60")
    host.wait_running(running)
    waiting = host.submit(8, "sleep 60")
    assert host.task(waiting).state.is_waiting
    result = host.backend.remove([waiting, running])
    assert (result.killed, result.failed) == ((waiting,), (running,))
    gone = host.task(waiting)
    assert gone is None or not gone.state.is_waiting
    assert host.task(running).state.is_active


def test_ensure_slots_is_idempotent_and_the_version_is_known(host):
    assert host.backend.ensure_slots({SLOT: 1}) == []
    assert host.backend.version()[0].isdigit()
    assert host.backend.add_lands_within() > host.config.hosts[0].hpc.command_timeout_seconds


HOSTILE_FOLDER = "case_9 " + "".join(chr(c) for c in range(32, 127) if chr(c) != "/") + "\ttab 환자"


def test_a_folder_with_any_name_is_reported_whole_and_its_record_and_logs_are_found(host):
    """Every printable ASCII character, a tab and unicode in the folder (issue 16): nothing shifts."""
    workdir = host.case_dir(HOSTILE_FOLDER)
    task_id = host.submit(9, 'echo "in $PWD"; sleep 3; exit 4', workdir=workdir)
    task = host.wait_running(task_id)
    assert (task.label, task.group, task.path) == ("mqic_case_9", SLOT, workdir)
    wait_until(lambda: host.backend.logs([task], 5).get(task_id) == f"in {workdir}", timeout=20, interval=0.2,
               message="its log")
    wait_until(lambda: tasks.read_exit_records(host.remote, [workdir])[workdir] == 4, timeout=30, interval=0.2,
               message="its exit record")


def test_a_failed_submit_says_what_failed_in_the_backends_words(host):
    """The exit code's meaning and the first line of stderr, never the submit script (issue 16)."""
    (host.base / ".mqic-locks").write_text("not a folder: the submit cannot take its lock")
    with pytest.raises(RemoteError) as caught:
        host.submit(10, "true")
    said = str(caught.value)
    assert said.startswith(f"{host.backend.words.submit} failed (exit 89: the submit could not be prepared")
    assert "mkdir" in said and "flock" not in said and "\n" not in said and len(said) < 400
    others = {"pueue": ("sbatch",), "slurm": ("pueue",), "direct": ("sbatch", "pueue"),
              "memory": ("sbatch",)}[host.backend.kind]
    assert not [other for other in others if other in said.lower()]


# -- batches: several submits in ONE remote call (issue 19) ------------------------------------------

def test_a_batch_gives_each_case_its_own_outcome_and_a_second_batch_adds_nothing(host):
    """One label already has a task, one workdir is missing: one id, AlreadySubmitted, WorkdirMissing."""
    existing = host.submit(21, "sleep 60")
    batch = [host.item(20, "sleep 60"), host.item(21, "true"),
             host.item(22, "true", workdir=str(host.base / "gone"), require_workdir=True)]
    added, refused, missing = host.backend.submit_batch(batch)
    assert isinstance(added, int) and type(refused) is errors.AlreadySubmitted and type(missing) is errors.WorkdirMissing
    assert (host.labelled(20), host.labelled(21), host.labelled(22)) == ([added], [existing], [])
    again = host.backend.submit_batch(batch)
    assert [type(o) for o in again] == [errors.AlreadySubmitted, errors.AlreadySubmitted, errors.WorkdirMissing]
    assert (host.labelled(20), host.labelled(21), host.labelled(22)) == ([added], [existing], [])


def test_each_item_of_a_batch_takes_its_own_lock_and_label_check(host):
    """The same case twice in one batch: the second item sees the first one's task."""
    first, second = host.backend.submit_batch([host.item(23, "sleep 60"), host.item(23, "sleep 60")])
    assert isinstance(first, int) and type(second) is errors.AlreadySubmitted and host.labelled(23) == [first]


class CutAfterFirstItem:
    """The real runner, but the batch's answer is lost after the first item's record."""

    def __init__(self, remote: Remote):
        self.remote = remote

    def run(self, argv, *, timeout=None):
        text = self.remote.run(argv, timeout=timeout)
        return text[:text.index(f"{argv[4]}S1")]


def test_items_whose_answer_was_cut_are_uncertain_and_found_by_label(host):
    if host.backend.kind == "memory":
        pytest.skip("cuts the real batch script's answer: the memory HPC runs no script")
    cut = backend_for(host.config, host.config.hosts[0], CutAfterFirstItem(host.remote))
    first, second, third = cut.submit_batch([host.item(24, "sleep 60"), host.item(25, "sleep 60"),
                                             host.item(26, "true", workdir=str(host.base / "gone"),
                                                       require_workdir=True)])
    assert isinstance(first, int) and host.labelled(24) == [first]
    assert type(second) is errors.SubmitUncertain and type(third) is errors.SubmitUncertain
    assert len(host.labelled(25)) == 1 and host.labelled(26) == []   # recovery's look by label tells each apart


# -- pueue: one label lookup per batch, and only where it cannot miss a task ---------------------

COUNTING_PUEUE = """#!/bin/sh
# Logs each call; after the first `status` answer, "another submitter" adds {sneak} (its lock taken).
echo "$1" >> {log}
if [ "$1" = status ] && [ ! -e {once} ]; then
  {real} "$@"; code=$?
  : > {once}
  {real} add --group {slot} --label {sneak} -- sleep 60 > /dev/null
  exit $code
fi
exec {real} "$@"
"""


@pytest.fixture
def pueue_host(request):
    config = request.getfixturevalue("hpc")(groups={SLOT: {"gpu": 0}}).config
    remote = Remote(config.hosts[0].hpc)
    made = Host(config, remote, backend_for(config, config.hosts[0], remote))
    made.base.mkdir(parents=True, exist_ok=True)
    made.backend.ensure_slots({SLOT: 1})
    return made


@pytest.mark.system
def test_a_batch_of_new_cases_looks_the_labels_up_once_but_an_earlier_submit_is_looked_up_afresh(pueue_host, tmp_path):
    """Issue 19: one `pueue status` for a batch of labels never submitted before. A label whose
    submit began before (its lock file exists: a retry, a recovery, another submitter) is looked up
    afresh under its lock: here another submitter adds mqic_case_43 right after the batch's lookup,
    and the batch must not add it a second time."""
    host = pueue_host
    log, once = tmp_path / "calls.log", tmp_path / "once"
    real = " ".join(shlex.quote(word) for word in host.config.hosts[0].hpc.pueue_command)
    wrapper = tmp_path / "pueue"
    wrapper.write_text(COUNTING_PUEUE.format(log=shlex.quote(str(log)), once=shlex.quote(str(once)), real=real,
                                             slot=SLOT, sneak="mqic_case_43"))
    wrapper.chmod(0o755)
    (host.base / ".mqic-locks").mkdir(exist_ok=True)
    (host.base / ".mqic-locks" / "mqic_case_43.lock").touch()         # its submit began before

    outcomes = pueue.submit_batch(host.remote, [str(wrapper)],
                                  [host.item(40, "sleep 60"), host.item(41, "sleep 60"), host.item(43, "sleep 60"),
                                   host.item(42, "sleep 60")], timeout=30)

    assert [type(o) for o in outcomes] == [int, int, errors.AlreadySubmitted, int], outcomes
    assert [len(host.labelled(n)) for n in (40, 41, 42, 43)] == [1, 1, 1, 1]    # none twice
    assert log.read_text().split().count("status") == 2                       # the batch's, and 43's own
