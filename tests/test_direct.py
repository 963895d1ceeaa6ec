"""The direct backend (no scheduler): its pure reading of what its scripts print, how it builds its
one call, and (system tier, over the real sshd) what only it has to prove: a task outlives the ssh
connection, a signal from someone else is KILLED, a task whose runner and group are both gone is
left to its exit record, a removed waiting task never starts. The contract suite covers the rest."""
from __future__ import annotations

import os
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from shared import errors, tasks
from shared.backends import backend_for, direct, model
from shared.backends.common import CLOCK_PREFIX, LABEL_EXISTS_EXIT, LOCK_BUSY_EXIT, WORKDIR_MISSING_EXIT
from shared.backends.direct import DirectBackend, Record, SlotProblem, task_of_record
from shared.errors import BadOutput, RemoteError
from shared.remote import Remote
from tests import batch_fakes
from tests.conftest import make_config, wait_until

MARK = "--mqic-direct-0123--"
T0 = 1_767_225_600  # 2026-01-01 00:00:00 UTC


def record(**fields) -> Record:
    values = dict(id=7, label="mqic_case_7", slot="gpu0", workdir="/w/case 7", enqueued=str(T0), start="",
                  end="", live="1")
    return Record(**{**values, **fields})


def printed(*records: Record, clock: int = T0 + 60) -> str:
    """What SNAPSHOT_SCRIPT prints for ``records``."""
    lines = [f"{CLOCK_PREFIX}{clock}"]
    for r in records:
        fields = (r.label, r.slot, r.workdir, r.enqueued, r.start, r.end)
        lines.append(f"{MARK}T{r.id}{MARK}" + "".join(f"{value}{MARK}" for value in fields) + f"{r.live}{MARK}")
    return "\n".join(lines) + "\n"


# -- the one mapping of a record onto our words --------------------------------------------------------

@pytest.mark.parametrize("end, state, exit_code", [
    (f"{T0 + 9} 0", model.TaskState.SUCCESS, None),
    (f"{T0 + 9} 3", model.TaskState.FAILED, 3),
    (f"{T0 + 9} 137", model.TaskState.FAILED, 137),         # the command's own process killed: its exit
    (f"{T0 + 9} signal", model.TaskState.KILLED, None),     # its whole group signalled: no exit recorded
    (f"{T0 + 9} spawn", model.TaskState.FAILED_TO_SPAWN, None),
])
def test_an_end_stamp_gives_the_outcome(end, state, exit_code):
    task = task_of_record(record(start=str(T0 + 1), end=end, live="-"))
    assert (task.state, task.exit_code, task.is_done) == (state, exit_code, True)
    assert task.end == datetime.fromtimestamp(T0 + 9, tz=timezone.utc)


def test_a_live_task_is_queued_until_it_has_started_then_running():
    queued = task_of_record(record())
    assert queued.state is model.TaskState.QUEUED and queued.start is None and not queued.is_done
    running = task_of_record(record(start=str(T0 + 5)))
    assert running.state is model.TaskState.RUNNING and running.start == datetime.fromtimestamp(T0 + 5, tz=timezone.utc)
    assert (running.label, running.group, running.path) == ("mqic_case_7", "gpu0", "/w/case 7")


@pytest.mark.parametrize("fields", [
    {"live": "0"},                                    # neither runner nor group alive, no end stamp
    {"live": "0", "start": str(T0 + 1)},
    {"live": "-", "end": "garbage"},                  # an end stamp we cannot read: never "failed"
])
def test_what_only_the_exit_record_can_tell_is_left_out(fields):
    assert task_of_record(record(**fields)) is None


# -- reading the scripts' output -------------------------------------------------------------------------

def test_a_snapshot_keeps_any_folder_name_whole_on_the_hosts_clock():
    hostile = "case 9 " + "".join(chr(c) for c in range(32, 127) if chr(c) != "/") + "\ttab\nline 환자 T1"
    text = printed(record(id=1, workdir=hostile, start=str(T0)), record(id=2, live="0"),
                   record(id=3, label="mqic_case_3", end=f"{T0} 0", live="-"))
    snapshot = direct.parse_snapshot(text, MARK)
    assert snapshot.hpc_time == T0 + 60 and snapshot.paused_slots == ()
    assert sorted(snapshot.tasks) == [1, 3]
    assert snapshot.tasks[1].path == hostile and snapshot.by_label("mqic_case_3")[0].state is model.TaskState.SUCCESS


@pytest.mark.parametrize("text", [
    "no clock\n",
    f"{CLOCK_PREFIX}{T0}\n{MARK}T1{MARK}mqic_case_1{MARK}gpu0{MARK}/w",       # cut short
    f"{CLOCK_PREFIX}{T0}\n{MARK}Tx{MARK}" + f"a{MARK}" * 6 + f"1{MARK}\n",     # not an id
])
def test_output_that_cannot_be_read_is_bad_output(text):
    with pytest.raises(BadOutput):
        direct.parse_snapshot(text, MARK)


def test_an_empty_state_folder_is_an_empty_snapshot():
    assert direct.parse_snapshot(f"{CLOCK_PREFIX}{T0}\n", MARK).tasks == {}


def test_stop_and_remove_answers_list_every_id_once():
    answer = "killed 4\nfailed 5\n"
    assert direct.parse_acted(answer, [4, 5, 6], "killed") == model.KillResult(killed=(4,), failed=(5, 6))
    assert direct.parse_acted("removed 1\nremoved 2\n", [1, 2], "removed").killed == (1, 2)


def test_logs_are_read_per_task_whatever_the_last_line():
    text = f"{MARK} 1\nline 1\nline 2\n\n{MARK} 2\nno newline at the end\n{MARK} 3\n\n"
    assert direct.parse_logs(text, MARK) == {1: "line 1\nline 2", 2: "no newline at the end", 3: ""}


# -- the one call it builds (a runner that only records: no process) -------------------------------------

class Recorder:
    def __init__(self, answer: str = "12\n", error: RemoteError | None = None):
        self.answer, self.error, self.calls = answer, error, []

    def run(self, argv, *, timeout=None):
        if batch_fakes.is_batch(argv):  # a submit batch: each item answers as a call of its own
            return batch_fakes.run_items(argv, lambda item: self.run(item, timeout=timeout))
        self.calls.append(list(argv))
        if self.error is not None:
            raise self.error
        return self.answer


def backend(runner, slots=None) -> DirectBackend:
    return DirectBackend(runner, "~/mqic", slots or {"gpu0": "0", "cpu": None}, timeout=20)


def test_submit_passes_every_value_as_its_own_word_and_the_slots_gpu():
    runner = Recorder()
    hostile = "/w/x'; rm -rf ~; echo '$(id)"
    assert backend(runner).submit(slot="gpu0", label="mqic_case_12", workdir=hostile, command="run 'it'",
                                  env={"MQIC_CASE_NAME": "a b;$(id)"}) == 12
    (argv,) = runner.calls
    assert argv[:3] == ["bash", "-c", direct.SUBMIT_SCRIPT] and argv[4:6] == ["~/mqic", "20"]
    assert argv[6:11] == ["mqic_case_12", hostile, "0", "gpu0", "run 'it'"]
    assert argv[11] == direct.RUNNER_SCRIPT
    assert argv[12:] == ["CUDA_VISIBLE_DEVICES=0", "MQIC_CASE_NAME=a b;$(id)"]
    assert hostile not in direct.SUBMIT_SCRIPT and "rm -rf ~" not in "".join(argv[:6])


def test_the_env_given_wins_over_the_slots_gpu_and_a_slot_without_gpu_sets_none():
    runner = Recorder()
    backend(runner).submit(slot="gpu0", label="mqic_case_1", workdir="/w", command="true",
                           env={"CUDA_VISIBLE_DEVICES": "3"})
    backend(runner).submit(slot="cpu", label="mqic_case_2", workdir="/w", command="true", env={})
    assert runner.calls[0][12:] == ["CUDA_VISIBLE_DEVICES=3"] and runner.calls[1][12:] == []


@pytest.mark.parametrize("kwargs, problem", [
    ({"label": "mqic case 1"}, "label"),
    ({"slot": "gpu9"}, "slot"),
    ({"env": {"BAD NAME": "x"}}, "environment"),
])
def test_a_bad_submit_is_refused_before_any_call(kwargs, problem):
    runner = Recorder()
    args = {"slot": "gpu0", "label": "mqic_case_1", "workdir": "/w", "command": "true", "env": {}, **kwargs}
    with pytest.raises(ValueError, match=problem):
        backend(runner).submit(**args)
    assert runner.calls == []


@pytest.mark.parametrize("code, refusal", [
    (LABEL_EXISTS_EXIT, errors.AlreadySubmitted), (WORKDIR_MISSING_EXIT, errors.WorkdirMissing),
    (LOCK_BUSY_EXIT, errors.SubmitLockBusy),
])
def test_the_locked_submits_exit_codes_are_typed_refusals(code, refusal):
    runner = Recorder(error=RemoteError(["bash"], code, "said no"))
    with pytest.raises(refusal):
        backend(runner).submit(slot="gpu0", label="mqic_case_1", workdir="/w", command="true", env={})


def test_a_submit_that_prints_no_id_is_bad_output():
    with pytest.raises(BadOutput):
        backend(Recorder(answer="")).submit(slot="gpu0", label="mqic_case_1", workdir="/w", command="true", env={})


def test_a_slot_running_more_than_one_task_or_not_configured_is_refused_without_a_call():
    runner = Recorder()
    with pytest.raises(SlotProblem, match="one task at a time"):
        backend(runner).ensure_slots({"gpu0": 2})
    with pytest.raises(SlotProblem, match="not configured"):
        backend(runner).ensure_slots({"gpu7": 1})
    assert runner.calls == []


def test_stop_and_remove_need_ids():
    for act in (lambda b: b.stop([], gently=True), lambda b: b.remove([]), lambda b: b.remove([-1])):
        with pytest.raises(ValueError):
            act(backend(Recorder()))


def test_the_config_names_a_direct_host_with_pueue_like_groups(tmp_path):
    config = make_config(tmp_path, hpc={"backend": "direct"}, pueue={"groups": {"gpu0": {"gpu": 0}}})
    host = config.hosts[0]
    made = backend_for(config, host, Recorder())
    assert isinstance(made, DirectBackend) and made.slots == {"gpu0": "0"} and made.base_dir == "/tmp/mqic-remote"
    assert [(s.name, s.gpu) for s in host.slots] == [("gpu0", "0")]


# -- what only the direct backend has to prove (real sshd) ------------------------------------------------

SLOT = "gpu0"


@pytest.fixture
def box(direct_hpc):
    h = direct_hpc(groups={SLOT: {"gpu": 2}})
    remote = Remote(h.config.hosts[0].hpc)
    made = backend_for(h.config, h.config.hosts[0], remote)
    made.ensure_slots({SLOT: 1})
    return h, remote, made


def start(box, case_id: int, command: str) -> int:
    h, _, made = box
    workdir = h.root / "remote" / f"case_{case_id}"
    workdir.mkdir(exist_ok=True)
    return made.submit(slot=SLOT, label=f"mqic_case_{case_id}", workdir=str(workdir),
                       command=tasks.wrap_command(command), env={"MQIC_CASE_ID": str(case_id)})


def state_of(made, task_id: int):
    task = made.snapshot().tasks.get(task_id)
    return task and task.state


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_task_outlives_the_ssh_connection_and_sees_its_slots_gpu(box):
    h, remote, made = box
    task_id = start(box, 1, 'echo "gpu=$CUDA_VISIBLE_DEVICES"; sleep 3')
    wait_until(lambda: state_of(made, task_id) is model.TaskState.RUNNING, timeout=20, message="running")
    remote.close()                                         # the ssh master and every session on it end
    wait_until(lambda: state_of(made, task_id) is model.TaskState.SUCCESS, timeout=30, message="success")
    assert (h.root / "remote" / "case_1" / tasks.OUTPUT_RECORD).read_text() == "gpu=2\n"


def test_a_signal_we_did_not_send_is_killed_not_failed(box):
    h, _, made = box
    task_id = start(box, 2, "sleep 60")
    wait_until(lambda: state_of(made, task_id) is model.TaskState.RUNNING, timeout=20, message="running")
    os.killpg(int(h.task_file(task_id, "pgid")), signal.SIGTERM)   # someone else's hand, on the task's group
    wait_until(lambda: state_of(made, task_id) is model.TaskState.KILLED, timeout=20, message="killed")
    assert not (h.root / "remote" / "case_2" / tasks.EXIT_RECORD).exists()


def test_a_task_whose_runner_and_group_are_gone_is_left_to_its_exit_record_and_its_label_freed(box):
    """Like a reboot: no end stamp and nothing alive. Never "failed" by guess; a new submit is taken."""
    h, _, made = box
    task_id = start(box, 3, "sleep 60")
    wait_until(lambda: state_of(made, task_id) is model.TaskState.RUNNING, timeout=20, message="running")
    runner, group = int(h.task_file(task_id, "runner")), int(h.task_file(task_id, "pgid"))
    os.killpg(runner, signal.SIGKILL)
    os.killpg(group, signal.SIGKILL)
    wait_until(lambda: task_id not in made.snapshot().tasks, timeout=20, message="left out")
    again = start(box, 3, "true")
    assert again > task_id
    wait_until(lambda: state_of(made, again) is model.TaskState.SUCCESS, timeout=20, message="the new one ran")


def test_a_removed_waiting_task_never_starts_and_its_runner_ends(box):
    h, _, made = box
    first = start(box, 4, "sleep 60")
    wait_until(lambda: state_of(made, first) is model.TaskState.RUNNING, timeout=20, message="running")
    waiting = start(box, 5, "echo ran > ran.txt")
    assert state_of(made, waiting) is model.TaskState.QUEUED
    runner = int(h.task_file(waiting, "runner"))
    assert made.remove([waiting]) == model.KillResult(killed=(waiting,), failed=())
    wait_until(lambda: not alive(runner), timeout=10, message="its runner ended")
    assert made.stop([first], gently=False).killed == (first,)
    wait_until(lambda: state_of(made, first) is model.TaskState.KILLED, timeout=20, message="first ended")
    later = start(box, 8, "true")  # once the slot has run a later task, a surviving runner would have had it
    wait_until(lambda: state_of(made, later) is model.TaskState.SUCCESS, timeout=20, message="a later task ran")
    assert not (h.root / "remote" / "case_5" / "ran.txt").exists() and waiting not in made.snapshot().tasks


def test_the_version_names_bash_and_ids_are_never_reused(box):
    h, _, made = box
    assert "bash, direct" in made.version()
    first = start(box, 6, "true")
    wait_until(lambda: state_of(made, first) is model.TaskState.SUCCESS, timeout=20, message="done")
    assert made.remove([first]).killed == (first,)
    assert start(box, 7, "true") == first + 1
    assert not Path(h.tasks_dir, str(first)).exists()


def test_the_readme_example_is_a_valid_direct_config(tmp_path):
    import yaml
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example, = [yaml.safe_load(block.split("```")[0]) for block in readme.split("```yaml\n")[1:]
                if "backend: direct" in block.split("```")[0]]
    config = make_config(tmp_path, hpc=example["hpc"], pueue=example["pueue"])
    host = config.hosts[0]
    assert host.backend == "direct" and [(s.name, s.gpu) for s in host.slots] == [("gpu0", "0"), ("gpu1", "1")]


def test_a_record_ended_more_than_a_day_ago_is_dropped_by_the_next_submit(box):
    """So a snapshot stays short on a box that runs for years; the exit record in the folder stays."""
    h, _, made = box
    old, recent = start(box, 9, "true"), start(box, 10, "true")
    wait_until(lambda: state_of(made, recent) is model.TaskState.SUCCESS and state_of(made, old)
               is model.TaskState.SUCCESS, timeout=20, message="both done")
    (h.tasks_dir / str(old) / "end").write_text(f"{int(time.time()) - direct.ENDED_KEPT_SECONDS - 60} 0")
    again = start(box, 9, "true")                                   # its label is free again too
    assert old not in made.snapshot().tasks and recent in made.snapshot().tasks and again > recent
    assert (h.root / "remote" / "case_9" / tasks.EXIT_RECORD).is_file()
