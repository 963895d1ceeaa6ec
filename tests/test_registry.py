"""One registry of schedulers, typed failures, and no scheduler named outside its backend (issue 17).

Fast: no process is started. Each backend module registers one ``Scheduler`` entry;
what a failed remote command means is a type, decided where its text is read (each
backend for its scheduler's words, ``shared.remote`` for the OS's); and no module
outside ``shared/backends/`` names pueue or Slurm in code.
"""
from __future__ import annotations

import ast
import importlib
import io
import json
import re
import tokenize
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from shared import backends, config as config_module, gpus, tasks
from shared.backends import Scheduler, backend_for, model, pueue, pueue_parse, scheduler, slurm
from shared.checks import Check
from shared.errors import (AlreadySubmitted, ConfigError, RemoteError, ResourceShortage, SchedulerOutage,
                           SlotLost, SubmitLockBusy, SubmitUncertain, TransientRemoteError, Unreachable,
                           WorkdirMissing)
from shared.lifecycle import is_transient
from shared.remote import remote_error, transfer_failure
from tests import batch_fakes
from tests.conftest import make_config, make_hosts_config

ROOT = Path(__file__).resolve().parents[1]
PUEUE_DATA = ROOT / "tests" / "data" / "pueue" / "cli_responses.json"


class FakeRunner:
    """Answers every call with ``reply`` (a str is stdout, an exception is raised); records the argv."""

    def __init__(self, reply):
        self.reply, self.argvs = reply, []

    def run(self, argv, *, timeout=None):
        if batch_fakes.is_batch(argv):  # a submit batch: each item answers as a call of its own
            return batch_fakes.run_items(argv, lambda item: self.run(item, timeout=timeout))
        self.argvs.append(list(argv))
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply


# -- the registry ---------------------------------------------------------------------------------------

def test_every_name_the_config_accepts_resolves_to_its_own_entry():
    assert config_module.BACKENDS == backends.NAMES == tuple(backends.MODULES)
    for name in backends.NAMES:
        entry = scheduler(name)
        assert isinstance(entry, Scheduler) and entry.name == name
        assert entry is importlib.import_module(backends.MODULES[name]).SCHEDULER  # one entry, in its module
        assert entry.check_names and callable(entry.build) and callable(entry.doctor_checks)
        assert entry.words.scheduler and entry.words.submit and entry.words.task


@pytest.mark.parametrize("name", ["sge", "", "Pueue", None])
def test_an_unknown_name_is_a_config_error_naming_the_key_and_the_known_names(name):
    with pytest.raises(ConfigError) as caught:
        scheduler(name)
    said = str(caught.value)
    assert said.startswith("hpc.backend: got ") and repr(name) in said
    assert all(known in said for known in backends.NAMES)


def test_backend_for_builds_each_hosts_backend_through_its_entry(tmp_path):
    runner = FakeRunner("")
    config = make_hosts_config(tmp_path, [
        {"name": "box", "groups": {"gpu_a": {"gpu": 0}}},
        {"name": "cluster", "backend": "slurm", "partitions": {"gpu_a": {"partition": "gpu"}}},
    ])
    made = {host.name: backend_for(config, host, runner) for host in config.hosts}
    assert isinstance(made["box"], pueue.PueueBackend) and isinstance(made["cluster"], slurm.SlurmBackend)
    for host in config.hosts:
        backend = made[host.name]
        assert backend.kind == host.backend and backend.words is scheduler(host.backend).words


def test_capabilities_are_the_entrys_not_a_name_read_elsewhere(tmp_path):
    assert (pueue.SCHEDULER.pauses_slots, pueue.SCHEDULER.gpus_visible) == (True, True)
    assert (slurm.SCHEDULER.pauses_slots, slurm.SCHEDULER.gpus_visible) == (False, False)
    config = make_config(tmp_path, pueue={"resume_paused_groups": True})
    host = config.hosts[0]
    slurm_host = replace(host, hpc=replace(host.hpc, backend="slurm"))
    assert backends.resumes_paused_slots(config, host)
    assert not backends.resumes_paused_slots(config, slurm_host)  # Slurm never pauses: never resumed
    assert not backends.resumes_paused_slots(make_config(tmp_path, pueue={"resume_paused_groups": False}), host)
    assert gpus.sees_gpus(SimpleNamespace(config=host)) and not gpus.sees_gpus(SimpleNamespace(config=slurm_host))


def test_skipped_doctor_lines_name_the_entrys_checks(tmp_path):
    from console.cli import skipped_checks
    host = make_config(tmp_path).hosts[0]
    lines = [check.name for check in skipped_checks(host, "skipped: ssh is not reachable")]
    assert lines == [*pueue.SCHEDULER.check_names, "remote base dir", "transfer"]
    assert all(isinstance(check, Check) for check in skipped_checks(host, "why"))


# -- typed failures: each backend reads its own scheduler's words -------------------------------------

def pueue_capture(name: str) -> list[RemoteError]:
    """The RemoteErrors the captured ``pueue`` client answers of command ``name`` (v3 and v4)."""
    command = next(c for c in json.loads(PUEUE_DATA.read_text())["commands"] if c["name"] == name)
    answers = [command[key] for key in ("v3", "v4", "both") if command.get(key)]
    return [RemoteError(["pueue", name], a["exit"], a["stderr"], a["stdout"]) for a in answers if a["exit"] != 0]


@pytest.mark.parametrize("capture, typed", [
    ("daemon_not_running_socket_missing", SchedulerOutage),
    ("daemon_never_started_no_config", SchedulerOutage),
    ("add_unknown_group", SlotLost),
    ("kill_unknown_group", SlotLost),
    ("parallel_unknown_group", SlotLost),
    ("add_missing_dependency", RemoteError),
    ("add_missing_workdir", RemoteError),
    ("group_add_existing", RemoteError),
    ("kill_finished", RemoteError),
])
def test_pueue_texts_become_types_in_one_place(capture, typed):
    errors = pueue_capture(capture)
    assert errors
    for error in errors:
        classified = pueue_parse.classify_error(error)
        assert type(classified) is typed
        assert (classified.argv, classified.exit_code, classified.stderr, classified.stdout) == (
            error.argv, error.exit_code, error.stderr, error.stdout)


def test_a_stale_pueue_socket_is_an_outage_too():
    stale = RemoteError(["pueue", "status"], 1, "Error: Failed to initialize client.\n\nCaused by:\n"
                        "    0: Connection refused (os error 111)\n")
    assert type(pueue_parse.classify_error(stale)) is SchedulerOutage


ADD_FAILURES = [
    (RemoteError(["sh"], 1, "Error: Failed to receive message from daemon\n\nCaused by:\n"
                 "    0: Connection reset by peer (os error 104)\n"), SubmitUncertain, "the task may have been added"),
    (RemoteError(["sh"], 137, ""), SubmitUncertain, "killed after the command timeout"),
    (pueue_capture("add_unknown_group")[0], SlotLost, "pueue add failed (exit 1): Group gpu_c doesn't exists"),
    (pueue_capture("daemon_never_started_no_config")[0], SchedulerOutage, "Couldn't find a configuration file"),
    (pueue_capture("add_missing_dependency")[0], RemoteError, "pueue add failed (exit 1): Unable to setup"),
    (RemoteError(["sh"], 85, "another submission of mqic_case_7 holds its lock"), SubmitLockBusy, "in flight"),
    (RemoteError(["sh"], 86, ""), WorkdirMissing, "does not exist"),
    (RemoteError(["sh"], 87, "mqic_case_7 already has a task"), AlreadySubmitted, "already exists"),
]


@pytest.mark.parametrize("error, typed, said", ADD_FAILURES)
def test_what_a_failed_pueue_add_means(error, typed, said):
    backend = pueue.PueueBackend(FakeRunner(error), ["pueue"], 20)
    with pytest.raises(typed) as caught:
        backend.submit(slot="gpu_a", label="mqic_case_7", workdir="/r/7", command="true", env={})
    assert type(caught.value) is typed and said in str(caught.value)
    assert "#!/" not in str(caught.value) and "flock" not in str(caught.value)


def test_the_submitter_decides_from_the_type_alone():
    from workers.submitter import may_have_been_stored
    for _error, typed, _said in ADD_FAILURES:
        raised = typed(["sh"], 1, "") if issubclass(typed, RemoteError) else typed("x")
        assert may_have_been_stored(raised) is (not issubclass(typed, RemoteError))
    assert may_have_been_stored(Unreachable("ssh: timeout"))


def test_slurm_keeps_a_resource_shortage_from_the_remote_layer():
    """A full disk while the job script is written (exit 89) passes: the typed shortage survives sbatch's reading."""
    short = remote_error(["sh"], 89, "mkdir: cannot create directory '.mqic': No space left on device")
    made = slurm.SlurmBackend(FakeRunner(short), {"gpu_a": slurm.sp.SubmitSettings(partition="gpu")}, timeout=20)
    with pytest.raises(ResourceShortage) as caught:
        made.submit(slot="gpu_a", label="mqic_case_7", workdir="/r/7", command="true", env={})
    assert str(caught.value).startswith("sbatch failed (exit 89") and is_transient(caught.value)


# -- typed failures: the OS's words, read in shared.remote --------------------------------------------

@pytest.mark.parametrize("text", [
    "tar: ./big.bin: Cannot write: No space left on device",
    "mkdir: cannot create directory 'x': Disk quota exceeded",
    "sh: fork: Resource temporarily unavailable",
    "bash: /r/7/run.sh: Too many open files",
])
def test_the_remote_layer_types_a_shortage_of_the_hpcs_system(text):
    assert type(remote_error(["sh", "-c", "x"], 1, text)) is ResourceShortage
    assert type(transfer_failure("scp upload", 1, text)) is ResourceShortage


def test_any_other_remote_failure_stays_a_plain_remote_error():
    assert type(remote_error(["ls"], 2, "ls: cannot access 'x': No such file or directory")) is RemoteError
    assert type(transfer_failure("scp upload", 1, "scp: /x: Permission denied")) is RemoteError


# -- attempts and retries: types only ---------------------------------------------------------------

@pytest.mark.parametrize("error, counted, transient", [
    (ResourceShortage(["sh"], 1, "No space left on device"), True, True),
    (SlotLost(["pueue"], 1, "Group gpu_a doesn't exists. Use one of these: []"), True, True),
    (SchedulerOutage(["pueue"], 1, "while connecting to daemon"), False, True),
    (slurm.SlurmOutage(["sbatch"], 1, "Unable to contact slurm controller (connect failure)"), False, True),
    (RemoteError(["sh"], 1, "Permission denied"), True, False),
    # the words alone mean nothing any more: only the layer that read them gives the type
    (RemoteError(["sh"], 1, "No space left on device"), True, False),
    (RemoteError(["pueue"], 1, "I/O error at path /run/pueue.socket while connecting to daemon"), True, False),
    (RemoteError(["pueue"], 1, "Group gpu_a doesn't exists. Use one of these: []"), True, False),
])
def test_attempts_and_retries_read_types_never_text(error, counted, transient):
    assert tasks.counts_as_attempt(error) is counted
    assert is_transient(error) is transient
    assert isinstance(error, TransientRemoteError) is (counted and transient)


def test_the_submit_refusals_are_declared_once_in_shared_errors():
    from shared import errors
    for name in ("WorkdirMissing", "AlreadySubmitted", "SubmitLockBusy", "SubmitUncertain"):
        assert issubclass(getattr(errors, name), errors.RemoteFailure) and not hasattr(model, name)


# -- no scheduler named outside its backend --------------------------------------------------------

SCHEDULER_WORD = re.compile(r"pueue|slurm", re.IGNORECASE)
# The database keeps the seed's column names (issue 17); SQL may name them, code says task_id and slot
# (``shared.store.FIELD_COLUMNS`` maps the two).
SEED_COLUMNS = re.compile(r"pueue_task_id|pueue_group")
# Where a scheduler may be named: its own folder, and the sandbox command, which starts a pueue
# stand-in or a real Slurm. The config reader is scanned like the rest: what a scheduler needs of
# the config is declared in its module (its registry entry's slot keys, sections and host keys);
# only the help texts of config keys (README's table) and docstrings may name one.
ALLOWED_FUNCTIONS = {"console/cli.py": {"cmd_sandbox", "add_sandbox_parser"}}
# A config key's declaration, ``setting(kind, default, help, shown=...)`` or ``Setting(...)``:
# its help and shown texts are documentation (README's configuration table), its default is code.
DECLARATIONS = {"setting", "Setting"}
TEXTS = tuple(getattr(tokenize, name) for name in ("NAME", "STRING", "FSTRING_MIDDLE") if hasattr(tokenize, name))


def generic_modules() -> list[Path]:
    found = [*ROOT.glob("shared/*.py"), *ROOT.glob("workers/*.py"), *ROOT.glob("console/**/*.py")]
    return sorted(found)


def documentation(tree: ast.AST) -> list[ast.expr]:
    """The docstrings of ``tree``, and the help and shown texts of its config key declarations."""
    found = []
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            found.append(body[0].value)
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in DECLARATIONS:
            found += [*node.args[2:4], *(k.value for k in node.keywords if k.arg in ("help", "shown"))]
    return found


def scheduler_words_in_code(source: str, allowed: set[str] = frozenset()) -> list[str]:
    """``line: token`` for each name or string literal naming a scheduler (docstrings, help texts of
    config keys, comments, seed columns in strings and the functions in ``allowed`` aside)."""
    tree = ast.parse(source)
    spans = [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in documentation(tree)]
    allowed_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in allowed:
            allowed_lines.update(range(node.lineno, node.end_lineno + 1))
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in TEXTS or any(start <= token.start < end for start, end in spans):
            continue
        text = token.string if token.type == tokenize.NAME else SEED_COLUMNS.sub("", token.string)
        if token.start[0] in allowed_lines or not SCHEDULER_WORD.search(text):
            continue
        found.append(f"{token.start[0]}: {token.string[:80]}")
    return found


def test_no_module_outside_the_backends_names_a_scheduler_in_code():
    named = {}
    for path in generic_modules():
        name = path.relative_to(ROOT).as_posix()
        if words := scheduler_words_in_code(path.read_text(), ALLOWED_FUNCTIONS.get(name, set())):
            named[name] = words
    assert named == {}, "name the scheduler through the registry (shared.backends) or backend.words"
    assert ROOT / "shared" / "config.py" in generic_modules()  # the config reader too (issue 17)


def test_the_name_check_sees_what_it_should():
    """The check itself: a name or a string in code is caught (a seed column's name as an attribute too);
    a docstring, a comment, a seed column in SQL and an allowed function are not."""
    source = ('"""pueue in a docstring."""\nimport x  # pueue in a comment\n'
              'a = x.pueue_task_id\nb = "SELECT pueue_group FROM t"\nc = x.pueue\nd = f"{x} Slurm job"\n'
              'def sandbox():\n    return "--slurm"\n')
    found = scheduler_words_in_code(source, {"sandbox"})
    assert [line.split(":")[0] for line in found] == ["3", "5", "6"]
    assert len(scheduler_words_in_code(source)) == 4


def test_the_name_check_reads_a_config_keys_help_as_documentation_and_the_rest_as_code():
    source = ('command: str = setting(command_line, "pueue", "path of pueue (pueue only)",\n'
              '                       shown="`pueue`")\n'
              'other = Setting(kind, None, "the slurm partitions "\n'
              '                "of a Slurm host")\n'
              'x = setting(kind, None, help=f"{y} slurm")\n'
              'sections["slurm"] = read(SlurmConfig, s)\n'
              'why = f"not used with hpc.backend {b}: the slots are slurm.partitions"\n'
              'def f(c):\n    return c.pueue.log_lines\n')
    found = scheduler_words_in_code(source)
    assert [line.split(": ", 1)[1] for line in found] == [
        '"pueue"', '"slurm"', "SlurmConfig",
        *(['f"not used with hpc.backend {b}: the slots are slurm.partitions"'] if len(TEXTS) == 2 else
          [": the slots are slurm.partitions"]),
        "pueue"]
