"""shared.backends.pueue and pueue_parse: state mapping, parsers and driver, on the reference samples of pueue v3 and v4."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from shared import errors
from shared.backends import model, pueue, pueue_parse
from shared.backends.common import BATCH_SCRIPT, parse_progress
from shared.errors import BadOutput, RemoteError, Unreachable
from shared.backends.model import TaskState
from tests import batch_fakes

DATA = Path(__file__).parent / "data" / "pueue"
PUEUE = ["/opt/bin/pueue"]
CEST = timezone(timedelta(hours=2))
VERSIONS = ("v3", "v4")

# id -> (state, exit code) for the 13 tasks of status_v3.json / status_v4.json
EXPECTED_STATES = {
    0: (TaskState.SUCCESS, None),
    1: (TaskState.FAILED, 1),
    2: (TaskState.KILLED, None),
    3: (TaskState.FAILED_TO_SPAWN, None),
    4: (TaskState.RUNNING, None),
    5: (TaskState.PAUSED, None),
    6: (TaskState.QUEUED, None),
    7: (TaskState.RUNNING, None),
    8: (TaskState.QUEUED, None),
    9: (TaskState.QUEUED, None),    # Stashed: held back, waiting for us (the word is in detail)
    10: (TaskState.QUEUED, None),   # Stashed
    11: (TaskState.QUEUED, None),   # Locked
    12: (TaskState.DEPENDENCY_FAILED, None),
}
SPAWN_ERROR = (
    'Failed to spawn child 3 with err: Os { code: 2, kind: NotFound, message: "No such file or directory" }'
)
DAEMON_DOWN = "daemon_not_running_socket_missing"


def sample(name: str) -> str:
    return (DATA / name).read_text()


def status_text(version: str) -> str:
    return sample(f"status_{version}.json")


def cli(name: str, version: str) -> dict:
    """stdout/stderr/exit of one cli_responses.json command for a version."""
    command = next(c for c in json.loads(sample("cli_responses.json"))["commands"] if c["name"] == name)
    return command.get(version) or command["both"]


def cli_reply(name: str, version: str):
    """What a runner gives for that command: stdout on exit 0, else the RemoteError it raises."""
    response = cli(name, version)
    if response["exit"] == 0:
        return response["stdout"]
    return RemoteError(["pueue", name], response["exit"], response["stderr"], response["stdout"])


class FakeRunner:
    """Replays canned replies in order (a str is stdout, an exception is raised); records calls."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.calls: list[tuple[list[str], float | None]] = []

    def run(self, argv, *, timeout=None):
        if batch_fakes.is_batch(argv):  # a submit batch: each item answers as a call of its own
            return batch_fakes.run_items(argv, lambda item: self.run(item, timeout=timeout))
        self.calls.append((list(argv), timeout))
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    @property
    def argvs(self) -> list[list[str]]:
        return [argv for argv, _ in self.calls]


def with_status(version: str, task_id: int, status) -> str:
    """The status sample with one task's status replaced."""
    document = json.loads(status_text(version))
    document["tasks"][str(task_id)]["status"] = status
    return json.dumps(document)


# --- state mapping ---------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_every_sample_task_maps_to_its_state(version):
    snapshot = pueue_parse.parse_status(status_text(version))
    mapped = {task_id: (task.state, task.exit_code) for task_id, task in snapshot.tasks.items()}
    assert mapped == EXPECTED_STATES
    assert snapshot.tasks[3].detail == SPAWN_ERROR
    assert [snapshot.tasks[i].detail for i in (9, 10, 11)] == ["stashed", "stashed", "locked"]
    assert all(task.detail == "" for task_id, task in snapshot.tasks.items() if task_id not in (3, 9, 10, 11))


def test_v3_and_v4_map_the_same_tasks_alike():
    v3 = pueue_parse.parse_status(status_text("v3")).tasks
    v4 = pueue_parse.parse_status(status_text("v4")).tasks
    for task_id in EXPECTED_STATES:
        assert pueue_parse.map_task_status(_raw_status("v3", task_id)) == pueue_parse.map_task_status(_raw_status("v4", task_id))
        assert (v3[task_id].label, v3[task_id].group, v3[task_id].is_done) == (
            v4[task_id].label, v4[task_id].group, v4[task_id].is_done)


def _raw_status(version: str, task_id: int):
    return json.loads(status_text(version))["tasks"][str(task_id)]["status"]


@pytest.mark.parametrize("raw", [
    {"Done": {"Weird": 1}},
    {"Done": {"enqueued_at": None, "start": None, "end": None, "result": "Frobnicated"}},
    {"NewState": {}},
    "Frobnicated",
    {"Done": {"Failed": "one"}},
    {"Done": {"Failed": True}},
    {"Done": {"FailedToSpawn": 3}},
    {"Done": None},
    {"Queued": 5},
    {"Queued": {}, "Running": {}},
    None,
    7,
    [],
])
def test_unknown_status_shapes_are_unknown_never_failed(raw):
    state, exit_code, detail = pueue_parse.map_task_status(raw)
    assert (state, exit_code) == (TaskState.UNKNOWN, None)
    assert detail == json.dumps(raw, sort_keys=True)


def test_unknown_done_result_counts_as_done_but_not_as_failure():
    weird_done = {"Done": {"enqueued_at": None, "start": None, "end": "2025-06-14T09:12:41Z", "result": "New"}}
    task = pueue_parse.parse_status(with_status("v4", 0, weird_done)).tasks[0]
    assert task.state is TaskState.UNKNOWN and task.is_done and not task.state.is_failure
    assert task.end == datetime(2025, 6, 14, 9, 12, 41, tzinfo=timezone.utc)
    running_unknown = pueue_parse.parse_status(with_status("v4", 4, {"Teleporting": {}})).tasks[4]
    assert running_unknown.state is TaskState.UNKNOWN and not running_unknown.is_done


def test_state_helpers():
    assert {s for s in TaskState if s.is_done} == {
        TaskState.SUCCESS, TaskState.FAILED, TaskState.KILLED, TaskState.FAILED_TO_SPAWN,
        TaskState.DEPENDENCY_FAILED, TaskState.ERRORED}
    assert {s for s in TaskState if s.is_active} == {TaskState.RUNNING, TaskState.PAUSED}
    assert {s for s in TaskState if s.is_waiting} == {TaskState.QUEUED}
    assert not TaskState.SUCCESS.is_failure and TaskState.KILLED.is_failure
    assert pueue_parse.map_task_status({"Done": "Errored"}) == (TaskState.ERRORED, None, "")


# --- status: fields, times, groups -----------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_status_fields_and_groups(version):
    snapshot = pueue_parse.parse_status(status_text(version))
    task = snapshot.tasks[8]
    assert (task.id, task.label, task.group, task.path) == (8, "mqic_case_16", "gpu_b", "/scratch/alice/mqic")
    assert task.command == "python -u run_case.py --config cases/case_16.yaml"
    assert pueue_parse.parse_status_groups(status_text(version)) == {
        "default": pueue_parse.GroupInfo("default", "Running", 1),
        "gpu_a": pueue_parse.GroupInfo("gpu_a", "Running", 2),
        "gpu_b": pueue_parse.GroupInfo("gpu_b", "Running", 1),
    }
    assert snapshot.paused_slots == ()


def test_v3_times_are_top_level():
    tasks = pueue_parse.parse_status(status_text("v3")).tasks
    assert tasks[0].enqueued_at == datetime(2024, 5, 21, 9, 12, 3, 418273, tzinfo=CEST)
    assert tasks[0].start == datetime(2024, 5, 21, 9, 12, 3, 604818, tzinfo=CEST)
    assert tasks[0].end == datetime(2024, 5, 21, 9, 12, 41, 902117, tzinfo=CEST)
    assert tasks[4].end is None and tasks[6].start is None
    assert tasks[9].enqueued_at is None


def test_v4_times_are_nested_in_the_status():
    tasks = pueue_parse.parse_status(status_text("v4")).tasks
    assert tasks[0].enqueued_at == datetime(2025, 6, 14, 9, 12, 3, 418251, tzinfo=CEST)
    assert tasks[0].start == datetime(2025, 6, 14, 9, 12, 3, 561904, tzinfo=CEST)
    assert tasks[0].end == datetime(2025, 6, 14, 9, 12, 41, 902117, tzinfo=CEST)
    assert tasks[4].start == datetime(2025, 6, 14, 9, 32, 2, 311207, tzinfo=CEST) and tasks[4].end is None
    assert tasks[11].enqueued_at == datetime(2025, 6, 14, 10, 48, 33, 430165, tzinfo=CEST)  # Locked{previous}
    assert tasks[10].enqueued_at is None and tasks[10].start is None  # Stashed carries enqueue_at only


@pytest.mark.parametrize("text, expected", [
    ("2025-06-14T09:12:03.418251207+02:00", datetime(2025, 6, 14, 9, 12, 3, 418251, tzinfo=CEST)),
    ("2025-06-14T07:12:03.418251207Z", datetime(2025, 6, 14, 7, 12, 3, 418251, tzinfo=timezone.utc)),
    ("2025-06-14T07:12:03.418Z", datetime(2025, 6, 14, 7, 12, 3, 418000, tzinfo=timezone.utc)),
    ("2025-06-14T07:12:03.418251+00:00", datetime(2025, 6, 14, 7, 12, 3, 418251, tzinfo=timezone.utc)),
    ("2025-06-14T07:12:03Z", datetime(2025, 6, 14, 7, 12, 3, tzinfo=timezone.utc)),
    ("2025-06-14T02:12:03-05:00", datetime(2025, 6, 14, 2, 12, 3, tzinfo=timezone(timedelta(hours=-5)))),
])
def test_pueue_times_parse_to_aware_datetimes(text, expected):
    parsed = pueue_parse.parse_pueue_time(text)
    assert parsed == expected and parsed.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize("text", ["2025-06-14 07:12:03", "2025-06-14T07:12:03", "yesterday", ""])
def test_pueue_time_rejects_other_formats(text):
    with pytest.raises(ValueError):
        pueue_parse.parse_pueue_time(text)


def test_unreadable_time_becomes_none_without_failing_the_snapshot():
    document = json.loads(status_text("v3"))
    document["tasks"]["0"]["start"] = "last tuesday"
    task = pueue_parse.parse_status(json.dumps(document)).tasks[0]
    assert task.start is None and task.state is TaskState.SUCCESS


def test_status_after_a_warning_line_and_v4_reset_and_paused_groups():
    document = json.loads(status_text("v4"))
    document["groups"]["gpu_a"]["status"] = "Paused"
    document["groups"]["gpu_b"]["status"] = "Reset"
    text = "Different daemon version detected '3.4.0'. Consider restarting the daemon.\n" + json.dumps(document) + "\n"
    snapshot = pueue_parse.parse_status(text)
    assert snapshot.paused_slots == ("gpu_a",)
    groups = pueue_parse.parse_status_groups(text)
    assert groups["gpu_b"].status == "Reset" and not groups["gpu_b"].paused
    assert len(snapshot.tasks) == 13


def _without(version: str, task_id: int, key: str) -> str:
    document = json.loads(status_text(version))
    del document["tasks"][str(task_id)][key]
    return json.dumps(document)


@pytest.mark.parametrize("text", [
    "",
    "   \n",
    "garbage",
    "Error: Failed to initialize client.",
    status_text("v4")[:-40],
    status_text("v3")[: len(status_text("v3")) // 2],
    "[]",
    "13",
    '{"tasks": [], "groups": {}}',
    '{"groups": {}}',
    '{"tasks": {}, "groups": []}',
    '{"tasks": {"0": "Running"}, "groups": {}}',
    '{"tasks": {}, "groups": {"default": {"status": "Running"}}}',
    _without("v4", 4, "id"),
    _without("v3", 4, "group"),
    _without("v4", 4, "status"),
])
def test_bad_status_output_raises_bad_output(text):
    with pytest.raises(BadOutput):
        pueue_parse.parse_status(text)


def test_bad_output_carries_a_short_excerpt():
    with pytest.raises(BadOutput) as caught:
        pueue_parse.parse_status("x" * 5000)
    assert "xxx" in str(caught.value) and len(str(caught.value)) < 400


# --- logs --------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_log_json_of_both_versions(version):
    entries = pueue_parse.parse_log(sample(f"log_{version}.json"))
    assert sorted(entries) == [0, 1]
    assert entries[0].task.state is TaskState.SUCCESS and entries[0].task.label == "mqic_case_01"
    assert entries[1].task.state is TaskState.FAILED and entries[1].task.exit_code == 1
    assert entries[0].output.splitlines()[-1] == "[mqic] prep finished in 38.3 s"
    assert entries[1].output.endswith("RuntimeError: dose file missing for beam 3")
    assert not entries[0].log_missing


def test_full_log_keeps_the_file_verbatim():
    entry = pueue_parse.parse_log(sample("log_v4_task1_full.json"))[1]
    assert entry.output.startswith("[mqic] case 07: loading") and entry.output.endswith("beam 3\n")


def test_queued_task_has_no_log_file():
    entry = pueue_parse.parse_log(sample("log_v4_queued_task.json"))[6]
    assert (entry.output, entry.log_missing, entry.task.state) == ("", True, TaskState.QUEUED)


def test_log_for_unknown_ids_is_empty():
    assert pueue_parse.parse_log(cli("log_json_unknown_ids", "v4")["stdout"]) == {}


@pytest.mark.parametrize("text", [
    "", "garbage", sample("log_v4.json")[:-5], "[]", '{"x": {"task": {}, "output": ""}}',
    '{"0": "output"}', '{"0": {"output": "no task"}}', '{"0": {"task": {"id": 0}, "output": ""}}',
])
def test_bad_log_output_raises_bad_output(text):
    with pytest.raises(BadOutput):
        pueue_parse.parse_log(text)


# --- simulator log markers ---------------------------------------------------

MOQUI_LOG = "\n".join([
    "MOQUI starting with 40 batches",
    "Generating particles for (1 of 40 batches)",
    "Generating particles for (2 of 40 batches)",
    "Generating particles for (10 of 40 batches)",
])


def test_progress_from_the_newest_progress_line():
    assert parse_progress(MOQUI_LOG) == 25.0
    assert parse_progress(MOQUI_LOG + "\nGenerating particles for (40 of 40 batches)\nTotal execution time: 3 s") == 100.0


def test_progress_none_without_a_progress_line_or_with_zero_total():
    assert parse_progress("MOQUI starting with 40 batches") is None
    assert parse_progress("") is None
    assert parse_progress("Generating particles for (0 of 0 batches)") is None


def test_progress_with_a_configured_pattern():
    assert parse_progress("step 3/4\nstep 1/4", r"step (?P<done>\d+)/(?P<total>\d+)") == 25.0


# --- small text outputs ------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_task_id_from_add(version):
    assert pueue_parse.parse_task_id(cli("add_print_task_id", version)["stdout"]) == 13
    assert pueue_parse.parse_task_id(cli("v3_version_mismatch_warning", version)["stdout"]) == 13


@pytest.mark.parametrize("stdout", ["", "\n", "New task added (id 13).\n", "13\nwarning\n", "-1", "13 14"])
def test_task_id_rejects_anything_else(stdout):
    with pytest.raises(BadOutput):
        pueue_parse.parse_task_id(stdout)


def test_version_and_groups():
    assert pueue_parse.parse_version(cli("version", "v3")["stdout"]) == "3.4.1"
    assert pueue_parse.parse_version(cli("version", "v4")["stdout"]) == "4.0.4"
    with pytest.raises(BadOutput):
        pueue_parse.parse_version("command not found")
    groups = pueue_parse.parse_groups(sample("group_v3_v4.json"))
    assert groups == pueue_parse.parse_groups(cli("group_json", "v3")["stdout"])
    assert groups["gpu_a"] == pueue_parse.GroupInfo("gpu_a", "Running", 2)
    for bad in ("", "garbage", "[]", '{"gpu_a": {"status": "Running"}}', '{"gpu_a": 2}'):
        with pytest.raises(BadOutput):
            pueue_parse.parse_groups(bad)


def read_kill_reply(stdout, stderr, exit_code, ids):
    """How the pueue driver reads a ``pueue kill`` reply (``pueue._act_on_ids``)."""
    return pueue_parse._parse_id_reply("kill", pueue_parse._KILLED_LINE, stdout, stderr, exit_code, ids)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name, ids, killed, failed", [
    ("kill_running", [4], (4,), ()),
    ("kill_signal_ids", [4], (4,), ()),
    ("kill_finished", [0], (), (0,)),
    ("kill_nonexistent", [99], (), (99,)),
    ("kill_queued", [6], (), (6,)),
    ("kill_mixed", [4, 0], (4,), (0,)),
])
def test_kill_output_samples(version, name, ids, killed, failed):
    response = cli(name, version)
    assert read_kill_reply(response["stdout"], response["stderr"], response["exit"], ids) == (killed, failed)


def test_kill_output_that_does_not_account_for_every_id_is_bad_output():
    with pytest.raises(BadOutput):
        read_kill_reply("Tasks are being killed: 4\n", "", 0, [4, 5])
    with pytest.raises(BadOutput):
        read_kill_reply("", cli(DAEMON_DOWN, "v4")["stderr"], 1, [4])
    with pytest.raises(BadOutput):
        read_kill_reply("", "error: unexpected argument", 2, [])


# --- driver ------------------------------------------------------------------

TRICKY_COMMAND = """cd "case dir" && python interpreter.py --name 'O'"'"'Brien' ; echo $(hostname) `id` > out.txt"""


def test_add_argv_keeps_options_first_and_the_command_one_word():
    argv = pueue_parse.add_argv(PUEUE, group="gpu_a", label="mqic_case_12", workdir="/scratch/c 12", command=TRICKY_COMMAND)
    assert argv == [
        "/opt/bin/pueue", "add", "--print-task-id", "--group", "gpu_a", "--label", "mqic_case_12",
        "--working-directory", "/scratch/c 12", "--", TRICKY_COMMAND,
    ]


def test_add_argv_with_env_prefix_pins_the_gpu():
    argv = pueue_parse.add_argv(["pueue"], group="gpu_1", label="l", workdir="/w", command="run",
                          env={"CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "4"})
    assert argv[:4] == ["env", "CUDA_VISIBLE_DEVICES=1", "OMP_NUM_THREADS=4", "pueue"]
    assert pueue_parse.add_argv(["pueue"], group="g", label="l", workdir="/w", command="run", env={})[0] == "pueue"


@pytest.mark.parametrize("kwargs", [
    {"workdir": "relative/dir"},
    {"workdir": "~/cases"},
    {"command": "  "},
    {"label": ""},
    {"env": {"BAD NAME": "1"}},
    {"env": {"A=B": "1"}},
])
def test_add_argv_refuses_what_would_break_later(kwargs):
    arguments = {"group": "g", "label": "l", "workdir": "/w", "command": "run", **kwargs}
    with pytest.raises(ValueError):
        pueue_parse.add_argv(PUEUE, **arguments)


@pytest.mark.parametrize("version", VERSIONS)
def test_submit_returns_the_id_even_after_a_version_warning(version):
    runner = FakeRunner(cli("v3_version_mismatch_warning", version)["stdout"])
    task_id = pueue.submit(runner, PUEUE, group="gpu_a", label="mqic_case_20", workdir="/scratch/alice/mqic",
                           command=TRICKY_COMMAND, env={"CUDA_VISIBLE_DEVICES": "0"}, timeout=30)
    assert task_id == 13
    [(argv, timeout)] = runner.calls
    assert argv[:3] == ["sh", "-c", pueue.ADD_SCRIPT] and timeout == 30
    assert argv[4:9] == ["/opt/bin/pueue", "mqic_case_20", "30", "/scratch/alice/mqic", "0"]
    assert argv[9:11] == ["CUDA_VISIBLE_DEVICES=0", "--mqic-add--"] and argv[-1] == TRICKY_COMMAND


@pytest.mark.parametrize("code, error", [(86, errors.WorkdirMissing), (87, errors.AlreadySubmitted),
                                         (85, errors.SubmitLockBusy)])
def test_submit_refusals_of_the_add_script_are_typed(code, error):
    runner = FakeRunner(RemoteError(["sh"], code, ""))
    with pytest.raises(error):
        pueue.submit(runner, PUEUE, group="gpu_a", label="mqic_case_1", workdir="/w", command="ls")


def test_submit_refuses_a_label_the_script_could_not_match_exactly():
    with pytest.raises(ValueError):
        pueue.submit(FakeRunner(), PUEUE, group="g", label='x" y', workdir="/w", command="ls")


def test_submit_propagates_pueue_failures():
    runner = FakeRunner(cli_reply("add_unknown_group", "v4"))
    with pytest.raises(RemoteError):
        pueue.submit(runner, PUEUE, group="gpu_c", label="l", workdir="/w", command="ls")


@pytest.mark.parametrize("version", VERSIONS)
def test_statuses_is_one_call_that_also_reads_the_hpc_clock(version):
    runner = FakeRunner("mqic-clock 1767225600\n" + status_text(version))
    snapshot = pueue.statuses(runner, PUEUE, timeout=20)
    [(argv, timeout)] = runner.calls
    assert argv[-4:] == ["mqic-clock ", "/opt/bin/pueue", "status", "--json"] and timeout == 20
    assert len(snapshot.tasks) == 13 and snapshot.hpc_time == 1767225600


@pytest.mark.parametrize("text", [status_text("v4"), "mqic-clock soon\n{}", "", "mqic-clock 12\ngarbage"])
def test_a_status_without_a_readable_clock_is_bad_output(text):
    with pytest.raises(BadOutput):
        pueue_parse.parse_clocked_status(text)


def test_by_label_is_an_exact_match_in_id_order():
    document = json.loads(status_text("v3"))
    document["tasks"]["13"] = dict(document["tasks"]["1"], id=13, status="Running")  # resubmitted case 07
    document["tasks"]["14"] = dict(document["tasks"]["1"], id=14, label="mqic_case_0")
    snapshot = pueue_parse.parse_status(json.dumps(document))
    assert [(t.id, t.state) for t in snapshot.by_label("mqic_case_07")] == [(1, TaskState.FAILED), (13, TaskState.RUNNING)]
    assert snapshot.by_label("mqic_case_1") == []


@pytest.mark.parametrize("version", VERSIONS)
def test_logs_is_one_call_for_all_ids(version):
    runner = FakeRunner(sample(f"log_{version}.json"))
    outputs = pueue.logs(runner, PUEUE, [0, 1, 1], lines=20, timeout=5)
    assert runner.calls == [(["/opt/bin/pueue", "log", "--json", "--lines", "20", "0", "1"], 5)]
    assert outputs[0].endswith("prep finished in 38.3 s") and outputs[1].endswith("beam 3")


def test_logs_without_ids_makes_no_call_and_queued_logs_are_empty():
    runner = FakeRunner(sample("log_v4_queued_task.json"))
    assert pueue.logs(runner, PUEUE, []) == {} and runner.calls == []
    assert pueue.logs(runner, PUEUE, [6]) == {6: ""}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name, ids, expected", [
    ("kill_running", [4], model.KillResult((4,), ())),
    ("kill_finished", [0], model.KillResult((), (0,))),
    ("kill_mixed", [4, 0], model.KillResult((4,), (0,))),
])
def test_kill_driver(version, name, ids, expected):
    runner = FakeRunner(cli_reply(name, version))
    assert pueue.kill(runner, PUEUE, ids) == expected
    assert runner.argvs == [["/opt/bin/pueue", "kill", *map(str, ids)]]


@pytest.mark.parametrize("ids", [[], (), [True], [-1], ["4"]])
def test_kill_refuses_empty_or_odd_ids_without_calling(ids):
    runner = FakeRunner()
    with pytest.raises(ValueError):
        pueue.kill(runner, PUEUE, ids)
    assert runner.calls == []


@pytest.mark.parametrize("version", VERSIONS)
def test_kill_propagates_other_remote_errors(version):
    with pytest.raises(RemoteError):
        pueue.kill(FakeRunner(cli_reply(DAEMON_DOWN, version)), PUEUE, [4])
    with pytest.raises(Unreachable):
        pueue.kill(FakeRunner(Unreachable("ssh exit 255")), PUEUE, [4])


@pytest.mark.parametrize("version", VERSIONS)
def test_ensure_groups_creates_missing_and_fixes_limits(version):
    runner = FakeRunner(
        cli("group_json", version)["stdout"],
        "Parallel tasks setting for group \"gpu_b\" adjusted\n",
        cli("group_add_new", version)["stdout"],
        LISTED_C,
    )
    created = pueue.ensure_groups(runner, PUEUE, {"gpu_a": 2, "gpu_b": 3, "gpu_c": 2})
    assert created == ["gpu_c"]
    assert runner.argvs == [
        ["/opt/bin/pueue", "group", "--json"],
        ["/opt/bin/pueue", "parallel", "3", "-g", "gpu_b"],
        ["/opt/bin/pueue", "group", "add", "gpu_c", "-p", "2"],
        ["/opt/bin/pueue", "group", "--json"],                  # it returns once gpu_c is listed
    ]


LISTED_C = '{"default":{"status":"Running","parallel_tasks":1},"gpu_c":{"status":"Running","parallel_tasks":2}}'


def test_ensure_groups_returns_only_once_a_v3_group_is_listed(monkeypatch):
    monkeypatch.setattr(pueue.time, "sleep", lambda seconds: None)
    none = '{"default":{"status":"Running","parallel_tasks":1}}'
    runner = FakeRunner(none, cli("group_add_new", "v3")["stdout"], none, none, LISTED_C)  # v3: made 0.2 s later
    assert pueue.ensure_groups(runner, PUEUE, {"gpu_c": 2}) == ["gpu_c"]
    assert runner.argvs[-3:] == [["/opt/bin/pueue", "group", "--json"]] * 3


def test_ensure_groups_makes_every_missing_group_in_one_remote_call():
    every = {f"gpu_{n}": {"status": "Running", "parallel_tasks": 1} for n in range(48)}
    runner = FakeRunner('{"default":{"status":"Running","parallel_tasks":1}}',
                        *[cli("group_add_new", "v4")["stdout"]] * 48, json.dumps(every))
    sent = []
    run = runner.run
    runner.run = lambda argv, *, timeout=None: sent.append(argv) or run(argv, timeout=timeout)
    created = pueue.ensure_groups(runner, PUEUE, {f"gpu_{n}": 1 for n in range(48)})
    assert created == [f"gpu_{n}" for n in range(48)]
    remote_calls = [argv for argv in sent if argv[:2] == ["sh", "-c"] or argv[1:] == ["group", "--json"]]
    assert len(remote_calls) == 3 and batch_fakes.is_batch(remote_calls[1])  # group --json, the 48 adds, listed?
    assert runner.argvs[1:-1] == [["/opt/bin/pueue", "group", "add", f"gpu_{n}", "-p", "1"] for n in range(48)]


def test_ensure_groups_asks_again_when_the_answer_was_cut_short():
    class CutRunner(FakeRunner):
        def run(self, argv, *, timeout=None):
            answer = super().run(argv, timeout=timeout)
            return answer[: len(answer) // 2] if len(argv) > 2 and argv[2] == BATCH_SCRIPT else answer

    runner = CutRunner('{"default":{"status":"Running","parallel_tasks":1}}', *["ok"] * 4)
    with pytest.raises(BadOutput):
        pueue.ensure_groups(runner, PUEUE, {f"gpu_{n}": 1 for n in range(4)})


@pytest.mark.parametrize("version", VERSIONS)
def test_ensure_groups_tolerates_a_concurrent_creation(version):
    runner = FakeRunner('{"default":{"status":"Running","parallel_tasks":1}}', cli_reply("group_add_existing", version), "")
    assert pueue.ensure_groups(runner, PUEUE, {"gpu_a": 2}) == []
    assert runner.argvs[-1] == ["/opt/bin/pueue", "parallel", "2", "-g", "gpu_a"]


def test_ensure_groups_propagates_other_failures():
    runner = FakeRunner('{"default":{"status":"Running","parallel_tasks":1}}', cli_reply(DAEMON_DOWN, "v4"))
    with pytest.raises(RemoteError):
        pueue.ensure_groups(runner, PUEUE, {"gpu_a": 2})


def test_resume_group_and_version():
    runner = FakeRunner(cli("start_group", "v4")["stdout"], cli("version", "v4")["stdout"])
    assert pueue.resume_group(runner, PUEUE, "gpu_a") is None
    assert pueue.version(runner, PUEUE) == "4.0.4"
    assert runner.argvs == [["/opt/bin/pueue", "start", "-g", "gpu_a"], ["/opt/bin/pueue", "--version"]]
