"""The pueue stand-in, the fake MOQUI and the case generator, driven as real processes.

Every test gets its own data directory and daemon; the client runs as a
subprocess exactly as the ssh driver would run it. Expected texts come from the
reference samples in ``tests/data/pueue`` (copied from the shared reference).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from sandbox import casegen
from sandbox.pueue_standin import write_wrappers
from tests.conftest import wait_until

pytestmark = pytest.mark.system  # every test here starts real processes

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "sandbox" / "pueue_standin.py"
QUICK_CLIENT = REPO / "sandbox" / "pueue_client.py"
FAKE_MOQUI = REPO / "sandbox" / "fake_moqui"
SAMPLES = Path(__file__).parent / "data" / "pueue"
PY = sys.executable

# Key order of a task in `status --json` (PUEUE.md section 2); checked against the samples too.
V3_TASK_KEYS = ["id", "created_at", "enqueued_at", "original_command", "command", "path", "envs", "group",
                "dependencies", "priority", "label", "status", "prev_status", "start", "end"]
V4_TASK_KEYS = ["id", "created_at", "original_command", "command", "path", "envs", "group", "dependencies",
                "priority", "label", "status"]


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` seconds."""
    return wait_until(condition, timeout=timeout, interval=0.03, message=what)


@dataclass
class Standin:
    """One stand-in installation: its data dir, and helpers to run its client and controls."""

    data_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "PUEUE_STANDIN_DIR": str(self.data_dir), **extra}

    def run(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
        """Its client as ``bin/pueue`` runs it (the quick client, which hands what it does not
        answer to the full one); the daemon and the controls as ``pueued`` and the ctl do."""
        program = [str(STANDIN)] if args[:1] in (("--daemon",), ("--ctl",)) else ["-S", str(QUICK_CLIENT)]
        return subprocess.run([PY, *program, *args], env=env or self.env(), cwd=cwd,
                              capture_output=True, text=True, timeout=30)

    def full(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
             ) -> subprocess.CompletedProcess:
        """The full client alone (``pueue_standin.py``), never the quick one."""
        return subprocess.run([PY, str(STANDIN), *args], env=env or self.env(), cwd=cwd,
                              capture_output=True, text=True, timeout=30)

    def ok(self, *args: str, **kwargs: Any) -> str:
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def ctl(self, *args: str) -> str:
        return self.ok("--ctl", *args)

    def add(self, command: str, *options: str, **kwargs: Any) -> int:
        return int(self.ok("add", "-p", *options, "--", command, **kwargs).strip().splitlines()[-1])

    def status(self) -> dict[str, Any]:
        return json.loads(self.ok("status", "--json"))

    def task(self, task_id: int) -> dict[str, Any]:
        return self.status()["tasks"][str(task_id)]

    def wait_state(self, task_id: int, state: str, timeout: float = 10.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            task = self.task(task_id)
            return task if state_of(task) == state else None

        return wait_for(reached, timeout, f"task {task_id} to be {state}")

    def wait_done(self, task_id: int, timeout: float = 10.0) -> dict[str, Any]:
        return self.wait_state(task_id, "Done", timeout)


def state_of(task: dict[str, Any]) -> str:
    """The status variant's name in both shapes ("Queued", "Done", ...)."""
    status = task["status"]
    return status if isinstance(status, str) else next(iter(status))


def result_of(task: dict[str, Any]) -> Any:
    done = task["status"]["Done"]
    return done["result"] if isinstance(done, dict) and "result" in done else done


def log_output(standin: Standin, task_id: int, *options: str) -> str:
    return json.loads(standin.ok("log", "--json", *options, str(task_id)))[str(task_id)]["output"]


@pytest.fixture
def standin(tmp_path: Path):
    instance = Standin(tmp_path / "pueue-data")
    out = instance.ok("--daemon", "-d")
    assert out == "Pueued is now running in the background\n"
    yield instance
    instance.run("--ctl", "stop")


@pytest.fixture(scope="module")
def cli_responses() -> dict[str, dict[str, Any]]:
    path = SAMPLES / "cli_responses.json"
    if not path.exists():
        pytest.skip("reference sample cli_responses.json is missing")
    return {entry["name"]: entry for entry in json.loads(path.read_text())["commands"]}


def expected(entry: dict[str, Any], fmt: str) -> dict[str, Any]:
    return entry.get("both") or entry[fmt]


def without_location(text: str) -> str:
    return re.sub(r"(Location:\n   ).*", r"\1<source file>:<line>", text)


def make_reference_groups(standin: Standin, fmt: str) -> None:
    """default (1), gpu_a (2), gpu_b (1), like the samples; then switch to ``fmt``."""
    standin.ok("group", "add", "gpu_a", "-p", "2")
    standin.ok("group", "add", "gpu_b")
    standin.ctl("format", fmt)


# ---------------------------------------------------------------------------
# add, environment, scheduling
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["v3", "v4"])
def test_add_print_task_id_prints_only_the_id(standin: Standin, fmt: str):
    standin.ctl("format", fmt)
    assert standin.ok("add", "-p", "--", "true") == "0\n"
    assert standin.ok("add", "-p", "-l", "mqic_case_1", "true") == "1\n"
    assert standin.ok("add", "--", "true") == "New task added (id 2).\n"


def test_task_runs_in_its_working_dir_with_pueue_env_and_captured_env(standin: Standin, tmp_path: Path):
    workdir = tmp_path / "case dir"
    workdir.mkdir()
    standin.ok("group", "add", "gpu_a")
    command = 'pwd; echo "$PUEUE_GROUP/$PUEUE_WORKER_ID/$MQIC_PROBE"'
    task_id = standin.add(command, "-g", "gpu_a", "-w", str(workdir), env=standin.env(MQIC_PROBE="from-client"))
    task = standin.wait_done(task_id)
    assert result_of(task) == "Success"
    assert log_output(standin, task_id) == f"{workdir}\ngpu_a/0/from-client"
    assert task["envs"]["MQIC_PROBE"] == "from-client"
    assert list(task["envs"])[-2:] == ["PUEUE_GROUP", "PUEUE_WORKER_ID"]
    assert "PUEUE_STANDIN_DIR" not in task["envs"]


def test_parallel_one_group_keeps_the_second_task_queued_until_the_first_ends(standin: Standin, tmp_path: Path):
    gate = tmp_path / "gate"
    standin.ok("group", "add", "gpu_a", "-p", "1")
    wait_gate = f"while [ ! -e '{gate}' ]; do sleep 0.02; done"
    first = standin.add(wait_gate, "-g", "gpu_a")
    second = standin.add("echo second", "-g", "gpu_a")
    standin.wait_state(first, "Running")
    assert state_of(standin.task(second)) == "Queued"
    gate.touch()
    assert result_of(standin.wait_done(second)) == "Success"
    assert result_of(standin.task(first)) == "Success"


def test_priority_dependencies_delay_and_immediate(standin: Standin):
    standin.ok("pause", "-g", "default")
    low, high, tie = (standin.add("true", "-o", str(p)) for p in (0, 5, 5))
    failing = standin.add("exit 2", "-o", "9")
    dependant = standin.add("echo never", "-o", "9", "-a", str(failing))  # the helper ends options with `--`
    delayed = standin.add("true", "-d", "1")
    assert standin.task(delayed)["status"]["Stashed"]["enqueue_at"] is not None
    immediate = standin.add("true", "-i")
    assert result_of(standin.wait_done(immediate)) == "Success"
    standin.ok("start", "-g", "default")
    for task_id in (low, high, tie, delayed):
        standin.wait_done(task_id)
    starts = {i: standin.task(i)["status"]["Done"]["start"] for i in (low, high, tie, failing)}
    assert sorted(starts, key=starts.get) == [failing, high, tie, low]
    assert result_of(standin.task(dependant)) == "DependencyFailed"


def test_concurrent_clients_get_distinct_ids(standin: Standin):
    standin.ok("pause", "-g", "default")
    clients = [subprocess.Popen([PY, str(STANDIN), "add", "-p", "--", f"echo {n}"], env=standin.env(),
                                stdout=subprocess.PIPE, text=True) for n in range(8)]
    ids = sorted(int(client.communicate(timeout=30)[0]) for client in clients)
    assert ids == list(range(8))
    assert sorted(int(key) for key in standin.status()["tasks"]) == ids


def test_a_new_task_starts_and_finishes_promptly(standin: Standin):
    from datetime import datetime

    task = standin.wait_done(standin.add("true"))["status"]["Done"]
    created = datetime.fromisoformat(standin.task(0)["created_at"])
    start, end = datetime.fromisoformat(task["start"]), datetime.fromisoformat(task["end"])
    assert (start - created).total_seconds() < 0.1
    assert (end - start).total_seconds() < 0.5


# ---------------------------------------------------------------------------
# JSON shapes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["v3", "v4"])
def test_status_json_has_the_reference_key_order(standin: Standin, fmt: str, tmp_path: Path):
    sample_path = SAMPLES / f"status_{fmt}.json"
    keys = V3_TASK_KEYS if fmt == "v3" else V4_TASK_KEYS
    standin.ctl("format", fmt)
    done = standin.add("true")
    standin.wait_done(done)
    running = standin.add(f"while [ ! -e '{tmp_path / 'gate'}' ]; do sleep 0.02; done")
    queued = standin.add("true")
    stashed = standin.add("true", "-s")
    standin.wait_state(running, "Running")
    line = standin.ok("status", "--json")
    assert line.endswith("}\n") and line.count("\n") == 1
    status = json.loads(line)
    assert list(status) == ["tasks", "groups"]
    assert status["groups"] == {"default": {"status": "Running", "parallel_tasks": 1}}
    for task in status["tasks"].values():
        assert list(task) == keys
    assert [state_of(status["tasks"][str(i)]) for i in (done, running, queued, stashed)] == \
        ["Done", "Running", "Queued", "Stashed"]
    if sample_path.exists():
        sample = json.loads(sample_path.read_text())
        assert all(list(task) == keys for task in sample["tasks"].values())
        assert_same_status_shapes(status["tasks"], sample["tasks"])


def assert_same_status_shapes(ours: dict[str, Any], sample: dict[str, Any]) -> None:
    """For every status variant we produced, the nested keys equal the sample's."""
    def shape(task: dict[str, Any]) -> Any:
        status = task["status"]
        if isinstance(status, str):
            return status
        name, payload = next(iter(status.items()))
        return name, list(payload) if isinstance(payload, dict) else type(payload).__name__

    sample_shapes = {state_of(task): shape(task) for task in sample.values() if state_of(task) != "Done"}
    sample_shapes["Done"] = shape(sample["0"])
    for task in ours.values():
        assert shape(task) == sample_shapes[state_of(task)]


@pytest.mark.parametrize("fmt", ["v3", "v4"])
def test_results_success_failed_127_and_killed(standin: Standin, fmt: str):
    standin.ctl("format", fmt)
    standin.ok("parallel", "0")
    ids = [standin.add(command) for command in ("true", "exit 3", "no_such_command_mqic", "sleep 30")]
    standin.wait_state(ids[3], "Running")
    assert standin.run("kill", str(ids[3])).stdout == f"Tasks are being killed: {ids[3]}\n"
    results = [result_of(standin.wait_done(task_id)) for task_id in ids]
    assert results == ["Success", {"Failed": 3}, {"Failed": 127}, "Killed"]


def test_missing_working_dir_is_failed_to_spawn_in_v3_and_a_client_error_in_v4(standin: Standin,
                                                                                 tmp_path: Path):
    missing = str(tmp_path / "nope")
    v4 = standin.run("add", "-w", missing, "--", "ls")
    assert (v4.returncode, v4.stdout) == (1, "")
    assert "0: Failed to canonicalize given working directory path\n   1: No such file or directory (os error 2)" \
        in v4.stderr
    standin.ctl("format", "v3")
    task_id = standin.add("ls", "-w", missing)
    task = standin.wait_done(task_id)
    assert task["path"] == missing
    assert result_of(task) == {"FailedToSpawn": f'Failed to spawn child {task_id} with err: Os {{ code: 2, '
                                                'kind: NotFound, message: "No such file or directory" }'}
    assert "PUEUE_GROUP" not in task["envs"]


# ---------------------------------------------------------------------------
# kill, log, texts of the reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["v3", "v4"])
def test_kill_texts_for_finished_unknown_and_mixed_ids(standin: Standin, fmt: str,
                                                       cli_responses: dict[str, Any]):
    standin.ctl("format", fmt)
    finished = standin.add("true")
    standin.wait_done(finished)
    running = standin.add("sleep 30")
    standin.wait_state(running, "Running")
    assert finished == 0  # the reference's finished task is 0 and its unknown one 99
    for name in ("kill_finished", "kill_nonexistent"):
        entry = cli_responses[name]
        want = expected(entry, fmt)
        got = standin.run(*entry["argv"][1:])
        assert (got.stdout, got.stderr, got.returncode) == (want["stdout"], want["stderr"], want["exit"]), name
    mixed = standin.run("kill", str(running), str(finished))
    assert (mixed.stdout, mixed.returncode) == (
        f"Tasks are being killed: {running}\nThe command failed for tasks: {finished}\n", 0)
    assert result_of(standin.wait_done(running)) == "Killed"


@pytest.mark.parametrize("how", ["sigterm", "15", "SIGTERM"])
def test_kill_with_sigterm_is_killed_unless_the_program_catches_it_and_exits(standin: Standin, how: str):
    """PUEUE.md: Killed means ended by a signal; a program that catches SIGTERM and exits 1 is Failed(1)."""
    standin.ok("parallel", "0")
    plain = standin.add("sleep 30")
    catcher = standin.add("trap 'exit 1' TERM; while :; do sleep 0.05; done")
    for task_id in (plain, catcher):
        standin.wait_state(task_id, "Running")
        assert standin.run("kill", "-s", how, str(task_id)).stdout == f"Tasks are being killed: {task_id}\n"
    assert result_of(standin.wait_done(plain)) == "Killed"
    assert result_of(standin.wait_done(catcher)) == {"Failed": 1}


def test_clean_removes_finished_tasks_and_their_logs_but_keeps_what_a_waiting_task_needs(standin: Standin):
    standin.ok("group", "add", "gpu_b")
    standin.ok("pause", "-g", "gpu_b")
    needed, failed, other_group = standin.add("true"), standin.add("exit 2"), standin.add("true", "-g", "gpu_b")
    for task_id in (needed, failed):
        standin.wait_done(task_id)
    waiting = standin.add("true", "-g", "gpu_b", "-a", str(needed))
    assert standin.ok("clean", "-s", "-g", "default") == \
        "All successfully finished tasks have been removed from group 'default'\n"
    assert sorted(map(int, standin.status()["tasks"])) == [needed, failed, other_group, waiting]
    assert standin.ok("clean") == "All finished tasks have been removed\n"
    assert sorted(map(int, standin.status()["tasks"])) == [needed, other_group, waiting]
    assert not (standin.data_dir / "task_logs" / f"{failed}.log").exists()
    assert standin.ok("clean", "-g", "no_such_group") == "All finished tasks have been removed from group 'no_such_group'\n"


@pytest.mark.parametrize("fmt", ["v3", "v4"])
def test_remove_and_kill_refuse_what_pueue_refuses(standin: Standin, fmt: str, cli_responses: dict[str, Any]):
    """PUEUE.md: only Running/Paused tasks can be killed, only Queued/Stashed/Done/Locked removed;
    partial success exits 0. Replayed against the reference texts (their ids 0 done, 4 running, 6 queued)."""
    make_reference_groups(standin, fmt)
    standin.ok("pause", "-g", "gpu_b")
    for _ in range(4):
        standin.wait_done(standin.add("true"))
    standin.wait_state(standin.add("sleep 30"), "Running")
    assert [standin.add("true", "-g", "gpu_b") for _ in range(2)] == [5, 6]
    for name in ("remove_running", "kill_queued", "remove_mixed"):
        want, got = expected(cli_responses[name], fmt), standin.run(*cli_responses[name]["argv"][1:])
        assert (got.stdout, got.stderr, got.returncode) == (want["stdout"], want["stderr"], want["exit"]), name
    assert standin.ok("remove", "6") == "Tasks removed from list: 6\n"
    assert sorted(map(int, standin.status()["tasks"])) == [1, 2, 3, 4, 5]


def test_remove_and_clean_free_ids_that_the_next_add_reuses_as_max_plus_one(standin: Standin):
    """PUEUE.md: a new id is max(existing)+1, or 0 when there are no tasks."""
    for _ in range(3):
        standin.wait_done(standin.add("true"))
    assert standin.ok("remove", "2") == "Tasks removed from list: 2\n"
    assert standin.add("true") == 2                      # the freed top id comes back
    standin.wait_done(2)
    assert standin.ok("remove", "1") == "Tasks removed from list: 1\n"
    assert standin.add("true") == 3                      # a freed id below the max does not
    standin.wait_done(3)
    standin.ok("clean")
    assert standin.status()["tasks"] == {}
    assert standin.ctl("foreign-add", "0.2") == "0\n"   # another user's task takes id 0 again
    task = standin.wait_done(0)
    assert (task["label"], task["group"], task["command"], result_of(task)) == \
        ("other_user_job", "default", "sleep 0.2; exit 0", "Success")


def test_foreign_add_takes_a_label_a_group_or_none(standin: Standin):
    standin.ok("group", "add", "gpu_a")
    first = int(standin.ctl("foreign-add", "--label", "bob", "-g", "gpu_a", "0"))
    second = int(standin.ctl("foreign-add", "--no-label", "0"))
    assert (standin.task(first)["label"], standin.task(first)["group"]) == ("bob", "gpu_a")
    assert standin.task(second)["label"] is None
    assert standin.run("--ctl", "foreign-add", "--label", "x", "--no-label").returncode == 2


def test_log_json_gives_the_last_15_lines_by_default(standin: Standin):
    task_id = standin.add("seq 1 40")
    standin.wait_done(task_id)
    assert log_output(standin, task_id) == "\n".join(str(n) for n in range(26, 41))
    assert log_output(standin, task_id, "--lines", "3") == "38\n39\n40"
    assert log_output(standin, task_id, "--full") == "".join(f"{n}\n" for n in range(1, 41))
    entry = json.loads(standin.ok("log", "--json", str(task_id)))[str(task_id)]
    assert entry["task"]["envs"] == {} and list(entry) == ["task", "output"]
    assert standin.ok("log", "--json", "99") == "{}\n"


def test_log_of_a_task_that_never_ran_reports_the_missing_log_file(standin: Standin):
    standin.ok("pause", "-g", "default")
    task_id = standin.add("true")
    output = log_output(standin, task_id)
    log_path = standin.data_dir / "task_logs" / f"{task_id}.log"
    assert output == (f'(Pueue error) Failed to get log file handle: I/O error at path "{log_path}" '
                      "while getting log file handle:\nNo such file or directory (os error 2)")


@pytest.mark.parametrize("fmt", ["v3", "v4"])
def test_log_without_ids_is_all_tasks_in_v3_and_the_default_group_in_v4(standin: Standin, fmt: str):
    standin.ok("group", "add", "gpu_a")
    standin.ctl("format", fmt)
    standin.add("true")
    standin.add("true", "-g", "gpu_a")
    assert list(json.loads(standin.ok("log", "--json"))) == (["0", "1"] if fmt == "v3" else ["0"])
    all_flag = standin.run("log", "--all", "--json")
    if fmt == "v3":
        assert all_flag.returncode == 2 and all_flag.stderr.startswith("error: unexpected argument '--all' found")
    else:
        assert list(json.loads(all_flag.stdout)) == ["0", "1"]


REPLAYED = [
    "add_unknown_group", "add_missing_dependency", "add_conflicting_flags", "kill_nonexistent",
    "kill_unknown_group", "group_add_existing", "group_remove_nonempty", "group_remove_default",
    "group_json", "parallel_unknown_group", "status_json_unknown_group", "status_text_unknown_group",
    "log_json_unknown_ids", "version", "kill_group", "kill_signal_group", "pause_group", "start_group",
    "parallel_group", "clean_group", "clean_successful_group", "clean_all",
]


@pytest.mark.parametrize("fmt", ["v3", "v4"])
def test_reference_commands_print_exactly_what_pueue_prints(standin: Standin, fmt: str,
                                                           cli_responses: dict[str, Any]):
    make_reference_groups(standin, fmt)
    standin.add("true", "-s", "-g", "gpu_a")
    for name in REPLAYED + (["v3_has_no_log_all"] if fmt == "v3" else []):
        entry = cli_responses[name]
        got = standin.run(*entry["argv"][1:])
        want = expected(entry, fmt)
        assert (got.stdout, got.stderr, got.returncode) == (want["stdout"], want["stderr"], want["exit"]), name


@pytest.mark.parametrize("fmt", ["v3", "v4"])
def test_group_add_and_remove_texts(standin: Standin, fmt: str, cli_responses: dict[str, Any]):
    standin.ctl("format", fmt)
    assert standin.run("group", "add", "gpu_c", "-p", "2").stdout == expected(cli_responses["group_add_new"],
                                                                               fmt)["stdout"]
    wait_for(lambda: "gpu_c" in standin.status()["groups"], 5, "gpu_c to exist")
    assert standin.status()["groups"]["gpu_c"] == {"status": "Running", "parallel_tasks": 2}
    assert standin.run("group", "remove", "gpu_c").stdout == expected(cli_responses["group_remove_ok"],
                                                                      fmt)["stdout"]
    wait_for(lambda: "gpu_c" not in standin.status()["groups"], 5, "gpu_c to be gone")


# ---------------------------------------------------------------------------
# Daemon down, restart, chaos
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["v3", "v4"])
def test_client_errors_when_the_daemon_never_started_or_is_down(tmp_path: Path, fmt: str,
                                                                cli_responses: dict[str, Any]):
    standin = Standin(tmp_path / "data")
    standin.ctl("format", fmt)
    never = standin.run("status", "--json")
    want = expected(cli_responses["daemon_never_started_no_config"], fmt)
    assert (never.stdout, without_location(never.stderr), never.returncode) == \
        (want["stdout"], want["stderr"], want["exit"])
    standin.ok("--daemon", "-d")
    standin.ctl("stop")
    down = standin.run("status", "--json")
    want = expected(cli_responses["daemon_not_running_socket_missing"], fmt)
    socket_path = str(standin.data_dir / f"pueue_{_user()}.socket")
    reference = want["stderr"].replace("/run/user/1000/pueue_alice.socket", socket_path)
    assert (down.stdout, without_location(down.stderr), down.returncode) == ("", reference, 1)
    standin.ctl("start")
    assert standin.status()["tasks"] == {}
    standin.ctl("stop")


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def test_pueued_d_exits_0_even_when_a_daemon_already_runs(standin: Standin):
    pid = standin.ctl("pid").strip()
    again = standin.run("--daemon", "-d")
    assert (again.stdout, again.returncode) == ("Pueued is now running in the background\n", 0)
    assert standin.ctl("pid").strip() == pid


@pytest.mark.parametrize("fmt", ["v3", "v4"])
def test_restart_kills_running_tasks_and_pauses_groups_with_queued_tasks(standin: Standin, fmt: str,
                                                                         tmp_path: Path):
    make_reference_groups(standin, fmt)
    pid_file = tmp_path / "task.pid"
    running = standin.add(f"echo $$ > '{pid_file}'; sleep 30", "-g", "gpu_b")
    queued = standin.add("true", "-g", "gpu_b")
    stashed = standin.add("true", "-s")
    standin.wait_state(running, "Running")
    task_pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 5, "task pid"))
    standin.ctl("restart")
    status = standin.status()
    task = status["tasks"][str(running)]
    assert result_of(task) == "Killed"
    if fmt == "v3":
        assert task["end"] is None and task["start"] is not None
    else:
        assert task["status"]["Done"]["end"] is not None
    assert state_of(status["tasks"][str(queued)]) == "Queued"
    assert state_of(status["tasks"][str(stashed)]) == "Stashed"
    assert {name: group["status"] for name, group in status["groups"].items()} == \
        {"default": "Running", "gpu_a": "Running", "gpu_b": "Paused"}
    wait_for(lambda: not _alive(task_pid), 5, "the task's process to be gone")
    standin.ok("start", "-g", "gpu_b")
    assert result_of(standin.wait_done(queued)) == "Success"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_garbage_control_breaks_the_next_status_json_calls(standin: Standin):
    standin.ctl("garbage", "2")
    for _ in range(2):
        broken = standin.run("status", "--json")
        assert broken.returncode == 0
        with pytest.raises(ValueError):
            json.loads(broken.stdout)
    assert standin.status()["tasks"] == {}


def added_client(standin: Standin, *add_args: str) -> subprocess.Popen:
    """A ``pueue add -p`` client whose stdout we hold (a pipe, like ssh's channel)."""
    return subprocess.Popen([PY, str(STANDIN), "add", "-p", *add_args], env=standin.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def labelled(standin: Standin, label: str) -> list[dict[str, Any]]:
    return [t for t in standin.status()["tasks"].values() if t["label"] == label]


def test_lose_add_stores_the_task_and_the_client_gives_up_silently_once_its_reader_is_gone(standin: Standin):
    standin.ctl("lose-add", "1")
    client = added_client(standin, "-l", "mqic_case_1", "--", "true")
    task = wait_for(lambda: labelled(standin, "mqic_case_1"), 10, "the task to be stored")[0]
    assert result_of(standin.wait_done(task["id"])) == "Success"  # it runs normally
    assert client.poll() is None                                   # the answer has not come
    client.stdout.close()                                          # our ssh gives up
    assert client.wait(timeout=5) == 1
    assert client.stderr.read() == b""
    assert standin.add("true", "-l", "mqic_case_2") == 1          # only the next N adds lose their answer


def test_a_lost_add_answer_arrives_late_to_a_reader_that_waits_long_enough(standin: Standin):
    standin.ctl("lose-add", "1", "--hang", "0.5")
    began = time.monotonic()
    assert standin.ok("add", "-p", "--", "true") == "0\n"
    assert time.monotonic() - began >= 0.5


def test_lose_add_late_stores_the_task_only_after_the_client_gave_up(standin: Standin):
    standin.ctl("lose-add", "1", "--late", "1.5")
    began = time.monotonic()
    client = added_client(standin, "-l", "mqic_case_7", "--", "true")
    time.sleep(0.3)  # the quantity under test: our ssh gives up before the daemon stores the task
    client.stdout.close()
    assert client.wait(timeout=5) == 1
    assert labelled(standin, "mqic_case_7") == []
    task = wait_for(lambda: labelled(standin, "mqic_case_7"), 10, "the late store")[0]
    assert time.monotonic() - began >= 1.5
    assert result_of(standin.wait_done(task["id"])) == "Success"


def test_lose_add_counts_only_adds_whose_label_has_the_prefix(standin: Standin):
    standin.ctl("lose-add", "1", "--label", "mqic_case_", "--hang", "30")
    assert standin.add("true") == 0                                # no label: answered at once
    assert standin.ctl("foreign-add", "0") == "1\n"               # nor another user's task
    client = added_client(standin, "-l", "mqic_case_3", "--", "true")
    wait_for(lambda: labelled(standin, "mqic_case_3"), 10, "the task to be stored")
    client.stdout.close()
    assert client.wait(timeout=5) == 1
    assert standin.run("--ctl", "lose-add", "x").returncode == 2


def test_idle_daemon_uses_almost_no_cpu(standin: Standin):
    pid = int(standin.ctl("pid"))
    standin.wait_done(standin.add("true"))

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_seconds()
    time.sleep(2.0)  # the quantity under test is CPU used while nothing happens
    assert cpu_seconds() - before < 0.1


def test_wrappers_behave_like_the_real_commands(tmp_path: Path):
    data_dir = tmp_path / "data"
    wrappers = write_wrappers(tmp_path / "bin", data_dir, PY)
    assert set(wrappers) == {"pueue", "pueued", "pueue-standin-ctl"}
    assert wrappers["pueue"].read_text().startswith("#!/bin/sh\n")
    bare_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}

    def run(name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(wrappers[name]), *args], env=bare_env, capture_output=True, text=True,
                              timeout=30)

    try:
        assert run("pueued", "-d").stdout == "Pueued is now running in the background\n"
        assert run("pueue", "add", "-p", "--", "echo via-wrapper").stdout == "0\n"
        assert run("pueue", "--version").stdout == "pueue 4.0.4\n"
        run("pueue-standin-ctl", "format", "v3")
        assert run("pueue", "--version").stdout == "pueue 3.4.1\n"
        wait_for(lambda: '"Done":"Success"' in run("pueue", "status", "--json").stdout, 10, "task 0 done")
    finally:
        run("pueue-standin-ctl", "stop")


# ---------------------------------------------------------------------------
# Fake MOQUI and the case generator
# ---------------------------------------------------------------------------

MOQUI_COMMAND = f"{PY} {FAKE_MOQUI / 'interpreter.py'} && {PY} {FAKE_MOQUI / 'moquisim.py'}"


def test_a_generated_case_runs_the_fake_moqui_to_success(standin: Standin, tmp_path: Path):
    case = casegen.make_case(tmp_path, "case_01", seconds=0.3, batches=3, marker="_CASE_READY")
    task_id = standin.add(MOQUI_COMMAND, "-w", str(case), "-l", "mqic_case_01")
    assert result_of(standin.wait_done(task_id)) == "Success"
    output = log_output(standin, task_id, "--full")
    assert "with 3 batches" in output
    assert "Generating particles for (3 of 3 batches)" in output
    assert re.search(r"^Total execution time: [\d.]+ s$", output, re.M)
    assert (case / "output" / "Dose.mhd").exists() and (case / "output" / "dose.raw").stat().st_size == 4000


def test_fake_moqui_fail_and_crash_modes(standin: Standin, tmp_path: Path):
    standin.ok("parallel", "2")
    failing = casegen.make_case(tmp_path, "failing", seconds=0.2, batches=4, mode="fail")
    crashing = casegen.make_case(tmp_path, "crashing", seconds=0.2, batches=4, mode="crash")
    fail_id = standin.add(MOQUI_COMMAND, "-w", str(failing))
    crash_id = standin.add(MOQUI_COMMAND, "-w", str(crashing))
    assert result_of(standin.wait_done(fail_id)) == {"Failed": 1}
    assert "FATAL ERROR" in log_output(standin, fail_id)
    assert result_of(standin.wait_done(crash_id)) in ({"Failed": 139}, "Killed")
    assert "Segmentation fault" in log_output(standin, crash_id)
    assert not (crashing / "core").exists()


def test_fake_moqui_case_file_wins_over_the_environment(tmp_path: Path):
    case = casegen.make_case(tmp_path, "case", seconds=0.05, batches=2, mode="ok")
    env = {**os.environ, "MQI_FAKE_MODE": "fail", "MQI_FAKE_BATCHES": "7"}
    run = subprocess.run([PY, str(FAKE_MOQUI / "moquisim.py")], cwd=case, env=env, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0 and "with 2 batches" in run.stdout
    (case / "mqi_fake.json").unlink()
    env["MQI_FAKE_SECONDS"] = "0.05"
    run = subprocess.run([PY, str(FAKE_MOQUI / "moquisim.py")], cwd=case, env=env, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 1 and "with 7 batches" in run.stdout


def test_casegen_writes_a_realistic_case_layout(tmp_path: Path):
    case = casegen.make_case(tmp_path, "small", layers_per_delivery=2, deliveries=3, ptn_bytes=1000,
                             marker="_CASE_READY", atomic=True, seed=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]
    deliveries = sorted(p for p in case.iterdir() if p.is_dir())
    assert len(deliveries) == 3 and all(re.fullmatch(r"\d{16}", p.name) for p in deliveries)
    assert sorted(p.name for p in deliveries[0].iterdir()) == \
        ["01_001.mgn", "01_001.ptn", "01_002.mgn", "01_002.ptn", "PlanInfo.txt", "PlanRange.txt"]
    assert (deliveries[0] / "01_001.ptn").stat().st_size == 1000
    assert "DICOM_BEAM_NUMBER,1" in (deliveries[0] / "PlanInfo.txt").read_text()
    assert len(list(case.glob("RP.*.dcm"))) == 1
    assert json.loads((case / "mqi_fake.json").read_text()) == {"seconds": 1, "batches": 10, "mode": "ok"}
    assert all(len(line.split()) == 2 for line in (case / "moqui_tps.in").read_text().splitlines())


def test_casegen_realistic_preset_is_about_220_files_and_45_mb(tmp_path: Path):
    case = casegen.make_realistic_case(tmp_path, "real", marker="_CASE_READY")
    files = [p for p in case.rglob("*") if p.is_file()]
    assert 200 <= len(files) <= 240
    assert 40e6 <= sum(p.stat().st_size for p in files) <= 50e6


# -- the quick client (sandbox/pueue_client.py) --------------------------------------------------

def test_the_quick_client_answers_add_and_status_without_starting_the_full_client(standin, tmp_path):
    (tmp_path / "work" / "sub").mkdir(parents=True)
    imports = subprocess.run([PY, "-S", "-X", "importtime", str(QUICK_CLIENT), "add", "-p", "-w", "sub", "--", "true"],
                             env=standin.env(), cwd=tmp_path / "work", capture_output=True, text=True, timeout=30)
    assert imports.returncode == 0, imports.stderr
    assert "pueue_standin" not in imports.stderr                      # the 2,000 lines were never imported
    task = standin.task(int(imports.stdout.strip()))
    assert task["path"] == str((tmp_path / "work" / "sub").resolve())  # relative -w: the client's folder, not the daemon's
    assert task["envs"].get("PUEUE_STANDIN_DIR") is None and task["envs"]["PATH"] == os.environ["PATH"]


def test_the_quick_and_the_full_client_print_the_same(standin, tmp_path):
    standin.add("echo one", "-l", "first")
    for words in (["status", "--json"], ["status"], ["status", "--json", "label=first"], ["status", "nonsense=1"],
                  ["add", "-w", str(tmp_path / "missing"), "--", "true"], ["add", "--bogus"]):
        quick, full = standin.run(*words), standin.full(*words)
        assert (quick.returncode, quick.stderr) == (full.returncode, full.stderr), words
        if words[:2] != ["status", "--json"]:
            assert quick.stdout == full.stdout, words


def test_the_quick_client_hands_over_when_the_daemon_is_down_and_when_an_answer_is_to_be_lost(standin):
    standin.ctl("lose-add", "1", "--hang", "0")                        # needs the full client's hold on stdout
    standin.ok("add", "-l", "lost_one", "--", "true")                  # our reader stayed: the answer comes late
    assert "lose-add: the answer to the add labelled lost_one is lost" in (standin.data_dir / "daemon.log").read_text()
    assert [t["label"] for t in standin.status()["tasks"].values()] == ["lost_one"]  # stored once
    standin.ctl("stop")
    quick, full = standin.run("status", "--json"), standin.full("status", "--json")
    assert quick.returncode == full.returncode == 1 and quick.stderr == full.stderr and "connecting to daemon" in quick.stderr


def test_pueue_shutdown_through_the_quick_client_stops_the_daemon(standin):
    assert standin.run("shutdown").returncode == 0
    wait_for(lambda: standin.run("--ctl", "pid").returncode == 1, what="the daemon to stop")
    assert "connecting to daemon" in standin.run("status").stderr
