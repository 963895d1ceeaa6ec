"""Hostile input, one table: each row is a bad (or strange) input, the clear error it must give,
and proof that the system still runs: after every row a good case goes all the way through.

Hostile names must SUCCEED intact: the remote command writes ``{case_name}`` (quoted by the
submitter) into ``arrived_name.txt``, which comes back with the results and must equal the name,
and no ``pwned*`` file may appear anywhere.
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from sandbox.casegen import make_case
from sandbox.hpc import remote_command
from shared.backends import pueue_parse
from shared.config import parse_config
from shared.errors import BadOutput, ConfigError
from shared.states import CaseStatus
from shared.store import Case, case_from_row, get_case
from shared.worker import Context, build_context
from tests.conftest import wait_until
from workers import poller, reaper, scanner, submitter

ARRIVED = "arrived_name.txt"
_names = itertools.count()


class Rig:
    """A sandbox HPC, a worker context on its database, and the ticks that drive cases."""

    def __init__(self, h, caplog):
        self.h, self.caplog = h, caplog
        self.ctx = build_context(h.config, "hostile")
        self.cleanups: list[Callable[[], object]] = []

    # -- cases ----------------------------------------------------------------------------------
    def drop(self, name: str, **kwargs) -> Path:
        options = {"seconds": 0.1, "batches": 1, "deliveries": 1, "layers_per_delivery": 1, "atomic": True}
        return make_case(self.h.config.scanner.watch_path, name, **{**options, **kwargs})

    def scan(self, ctx: Context | None = None) -> None:
        now = time.time()
        scanner.tick(ctx or self.ctx, now)
        scanner.tick(ctx or self.ctx, now + 100)          # past the quiescence period

    def cases_named(self, name: str) -> list[Case]:
        rows = self.ctx.conn.execute("SELECT * FROM cases WHERE case_name = ? ORDER BY case_id", (name,))
        return [case_from_row(r) for r in rows]

    def drive(self, case_id: int, ctx: Context | None = None, timeout: float = 60) -> Case:
        """Tick submitter, poller and reaper until the case is final."""
        ctx = ctx or self.ctx

        def final() -> Case | None:
            now = time.time()
            submitter.tick(ctx, now)
            poller.tick(ctx, now)
            reaper.tick(ctx, now)
            case = get_case(ctx.conn, case_id)
            return case if case.status in (CaseStatus.COMPLETED, CaseStatus.FAILED) else None
        return wait_until(final, timeout=timeout, interval=0.05, message=f"case {case_id} final")

    def run_through(self, name: str, **kwargs) -> Case:
        self.drop(name, **kwargs)
        self.scan()
        return self.drive(self.cases_named(name)[-1].case_id)

    def good_case_goes_through(self) -> None:
        case = self.run_through(f"good_{next(_names)}")
        assert (case.status, case.outcome) == (CaseStatus.COMPLETED, "success"), case
        assert list(Path(case.case_path, "output").iterdir())

    # -- what the system said -------------------------------------------------------------------
    def rejected(self) -> str:
        return "\n".join(p.read_text() for p in self.ctx.spool.stage_dir("rejected").glob("*.reason.txt"))

    def log(self) -> str:
        return self.caplog.text

    # -- variants -------------------------------------------------------------------------------
    def config_data(self) -> dict:
        return yaml.safe_load(self.h.config_path.read_text())

    def ctx_with(self, **sections: dict) -> Context:
        """A second worker context on the same database, with some config sections changed."""
        data = self.config_data()
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        data["hpc"]["control_dir"] = f"/tmp/mqic-h-{os.getpid()}-{next(_names)}"  # no shared master
        ctx = build_context(parse_config(data, self.h.config_path), f"variant_{next(_names)}")
        self.cleanups.append(lambda: (ctx.hosts["hpc"].remote.close(), shutil.rmtree(ctx.hosts["hpc"].remote.control_dir, ignore_errors=True)))
        return ctx

    def close(self) -> None:
        for cleanup in self.cleanups:
            cleanup()


@pytest.fixture
def rig(hpc, caplog):
    caplog.set_level("INFO", logger="mqic")
    h = hpc(groups={"gpu_a": {"gpu": 0}},
            hpc={"remote_command": remote_command() + f" && printf %s {{case_name}} > {ARRIVED}",
                 "result_files": ["output/*", ARRIVED]},
            main_loop={"backoff_base_seconds": 30, "max_attempts": 3})
    made = Rig(h, caplog)
    yield made
    made.close()


# -- the rows ------------------------------------------------------------------------------------

def name_arrives_intact(name: str, **drop_options) -> Callable[[Rig], str]:
    def action(rig: Rig) -> str:
        case = rig.run_through(name, **drop_options)
        assert case.case_name == name
        arrived = Path(case.case_path, ARRIVED).read_bytes().decode("utf-8")
        assert arrived == name, f"the HPC saw {arrived!r}"
        assert os.path.basename(case.remote_dir) == case.folder_name
        planted = [*rig.h.root.rglob("pwned*"), *(p for d in (Path.home(), Path.cwd(), Path("/tmp"))
                                                  for p in d.glob("pwned*"))]
        assert planted == [], "a name ran a command"
        return f"{case.status.value} {case.outcome}"
    return action


def rejected_item(make: Callable[[Path], object]) -> Callable[[Rig], str]:
    def action(rig: Rig) -> str:
        make(rig.h.config.scanner.watch_path)
        rig.scan()
        rig.scan()                                         # an empty folder needs two quiet looks
        assert os.listdir(rig.h.config.scanner.watch_path) == []
        assert rig.ctx.conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0] == 0
        return rig.rejected()
    return action


def case_with_symlink_outside(watch: Path) -> None:
    make_case(watch, "escape", deliveries=1, layers_per_delivery=1)
    os.symlink("/etc/passwd", watch / "escape" / "passwd")


def case_with_fifo(watch: Path) -> None:
    make_case(watch, "fifo", deliveries=1, layers_per_delivery=1)
    os.mkfifo(watch / "fifo" / "pipe")


def growing_folder(rig: Rig) -> str:
    folder = rig.h.config.scanner.watch_path / "growing"
    folder.mkdir()
    t0 = time.time()
    for step in range(4):
        (folder / f"layer_{step}.ptn").write_bytes(b"x" * (step + 1))
        os.utime(folder / f"layer_{step}.ptn", (t0 + step, t0 + step))
        scanner.tick(rig.ctx, t0 + 1.5 * step)           # a change every 1.5 s, quiescence is 2 s
        assert rig.cases_named("growing") == [], "taken while still growing"
    scanner.tick(rig.ctx, t0 + 4.5 + 2)
    [case] = rig.cases_named("growing")
    return f"registered once quiet, with {len(os.listdir(case.case_path))} files"


def unreadable_file(rig: Rig) -> str:
    """Root reads everything; a scanner without CAP_DAC_OVERRIDE/READ_SEARCH sees mode 000 as denied."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's override of file modes")
    folder = rig.drop("secret")
    (folder / "RP.locked.dcm").write_bytes(b"DICM")
    (folder / "RP.locked.dcm").chmod(0o000)
    code = ("import sys, time; from shared.config import load_config; from shared.worker import build_context;"
            "from workers import scanner; ctx = build_context(load_config(sys.argv[1]), 'scanner');"
            "now = time.time(); scanner.tick(ctx, now); scanner.tick(ctx, now + 100)")
    result = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c",
                             code, str(rig.h.config_path)], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0 and "setpriv" in result.stderr:
        pytest.skip(f"cannot drop capabilities here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    return rig.rejected()


def dropped_twice(rig: Rig) -> str:
    first = rig.run_through("twice")
    second = rig.run_through("twice")
    assert first.case_id != second.case_id and first.case_path != second.case_path
    return " ".join(f"{c.status.value}" for c in rig.cases_named("twice"))


def removed_after_detection(rig: Rig) -> str:
    folder = rig.drop("fleeting", atomic=False)
    scanner.tick(rig.ctx, time.time())                    # seen, not quiet yet
    shutil.rmtree(folder)
    scanner.tick(rig.ctx, time.time() + 100)
    assert rig.cases_named("fleeting") == [] and rig.rejected() == ""
    return "forgotten"


def bad_config(section: str, values: dict) -> Callable[[Rig], str]:
    def action(rig: Rig) -> str:
        data = rig.config_data()
        data.setdefault(section, {}).update(values)
        with pytest.raises(ConfigError) as error:
            parse_config(data, rig.h.config_path)
        return str(error.value)
    return action


def held_back_by(variant: Callable[[Rig], dict], *, expect_status: CaseStatus = CaseStatus.SUBMITTED):
    """Submit one case through a context with a broken setting; return the case's error."""
    def action(rig: Rig) -> str:
        ctx = rig.ctx_with(**variant(rig))
        rig.drop("victim", ptn_bytes=2_000_000)
        rig.scan(ctx)
        submitter.tick(ctx, time.time())
        [case] = rig.cases_named("victim")
        assert case.status is expect_status, case
        return f"{case.error_type}: {case.error_message} | {rig.log()}"
    return action


def missing_key(rig: Rig) -> dict:
    return {"hpc": {"identity_file": str(rig.h.root / "no-such-key")}}


def unknown_host_key(rig: Rig) -> dict:
    fake = rig.h.root / "known_hosts_other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(rig.h.root / "other_host")], check=True)
    endpoint = rig.h.sshd.endpoint
    key = " ".join((rig.h.root / "other_host.pub").read_text().split()[:2])
    fake.write_text(f"[{endpoint.host}]:{endpoint.port} {key}\n")
    rig.known_hosts_before = fake.read_text()
    return {"hpc": {"known_hosts_file": str(fake)}}


def unknown_host_key_is_refused(rig: Rig) -> str:
    text = held_back_by(unknown_host_key)(rig)
    assert (rig.h.root / "known_hosts_other").read_text() == rig.known_hosts_before, "the key was accepted"
    return text


def mounted_base(options: str) -> Callable[[Rig], dict]:
    def variant(rig: Rig) -> dict:
        base = rig.h.root / f"mnt-{next(_names)}"
        base.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(base)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        rig.cleanups.append(lambda: subprocess.run(["umount", "-l", str(base)], capture_output=True))
        return {"hpc": {"remote_base_dir": str(base)}}
    return variant


def unknown_group(rig: Rig) -> str:
    assert submitter.host_ready(rig.ctx, rig.ctx.hosts["hpc"])
    rig.h.pueue("group", "remove", "gpu_a")
    wait_until(lambda: "gpu_a" not in rig.h.status()["groups"], message="group removed")
    rig.drop("groupless")
    rig.scan()
    submitter.tick(rig.ctx, time.time())
    [case] = rig.cases_named("groupless")
    assert case.status is CaseStatus.SUBMITTED            # retried: the submitter recreates the group
    error = case.error_message
    rig.ctx.conn.execute("UPDATE cases SET next_attempt_at = NULL WHERE case_id = ?", (case.case_id,))
    assert rig.drive(case.case_id).status is CaseStatus.COMPLETED
    return error


SHIM = """#!{python}
import json, subprocess, sys
override = {override!r}
real = subprocess.run([{pueue!r}, *sys.argv[1:]], capture_output=True, text=True)
try:
    spec = json.load(open(override))
except OSError:
    spec = None
if spec is None or sys.argv[1:3] != ["status", "--json"] or real.returncode != 0:
    sys.stdout.write(real.stdout); sys.stderr.write(real.stderr); sys.exit(real.returncode)
if "raw" in spec:
    sys.stdout.write(spec["raw"]); sys.exit(0)
document = json.loads(real.stdout)
for task in document["tasks"].values():
    if spec.get("drop"):
        task.pop(spec["drop"], None)
    else:
        task["status"] = spec["status"]
print(json.dumps(document))
"""


def odd_status(spec: dict) -> Callable[[Rig], str]:
    """``status --json`` answers ``spec`` (through a shim on the HPC) while a case runs: no change."""
    def action(rig: Rig) -> str:
        shim, override = rig.h.root / "pueue-shim", rig.h.root / "status-override.json"
        shim.write_text(SHIM.format(python=sys.executable, override=str(override), pueue=str(rig.h.bin["pueue"])))
        shim.chmod(0o755)
        ctx = rig.ctx_with(hpc={"pueue_command": shlex.quote(str(shim))})
        rig.drop("steady", seconds=0.3)
        rig.scan(ctx)
        submitter.tick(ctx, time.time())
        [case] = rig.cases_named("steady")
        assert case.status is CaseStatus.RUNNING
        override.write_text(json.dumps(spec))
        wait_until(lambda: rig.h.tasks_labelled(case.label)[0]["status"].get("Done"), message="task done")
        for _ in range(3):
            poller.tick(ctx, time.time())
        after = get_case(ctx.conn, case.case_id)
        assert (after.status, after.outcome, after.status_updated_at) == (CaseStatus.RUNNING, None,
                                                                          case.status_updated_at)
        override.unlink()
        assert rig.drive(case.case_id, ctx).status is CaseStatus.COMPLETED   # readable again: it completes
        return rig.log()
    return action


def standin_garbage(rig: Rig) -> str:
    rig.drop("amid garbage", seconds=0.3)
    rig.scan()
    submitter.tick(rig.ctx, time.time())
    [case] = rig.cases_named("amid garbage")
    rig.h.ctl("garbage", "3")
    for _ in range(3):
        poller.tick(rig.ctx, time.time())
    assert get_case(rig.ctx.conn, case.case_id).status is CaseStatus.RUNNING
    assert rig.drive(case.case_id).status is CaseStatus.COMPLETED
    return rig.log()


def parser_says(text: str) -> Callable[[Rig], str]:
    def action(rig: Rig) -> str:
        with pytest.raises(BadOutput) as error:
            pueue_parse.parse_status(text)
        return str(error.value)
    return action


V4_DONE = {"Done": {"enqueued_at": "2025-01-01T00:00:00Z", "start": "2025-01-01T00:00:01Z",
                    "end": "2025-01-01T00:00:02Z", "result": "Exploded"}}


@dataclass(frozen=True)
class Row:
    id: str
    action: Callable[[Rig], str]
    expect: str
    went_through: bool = False  # the row's own case completed: it is the good case


ROWS = [
    # Names: they must arrive intact and run nothing.
    Row("name with spaces", name_arrives_intact("pt  with   spaces"), "completed success", True),
    Row("name with single quotes", name_arrives_intact("pt 'o'brien'"), "completed success", True),
    Row("name with double quotes", name_arrives_intact('pt "double" q'), "completed success", True),
    Row("name with $()", name_arrives_intact("pt $(touch pwned_dollar)"), "completed success", True),
    Row("name with backticks", name_arrives_intact("pt `touch pwned_tick`"), "completed success", True),
    Row("name with ;", name_arrives_intact("pt; touch pwned_semi; x"), "completed success", True),
    Row("name with a newline", name_arrives_intact("pt\ntouch pwned_newline"), "completed success", True),
    Row("name with a leading -", name_arrives_intact("-rf --help"), "completed success", True),
    Row("name with globs and ~ $HOME", name_arrives_intact("pt * ? [a] ~ $HOME \\ ${x}"), "completed success", True),
    Row("unicode name", name_arrives_intact("환자 Müller ✓ ﬁ"), "completed success", True),
    Row("250-byte name", name_arrives_intact("n" * 130 + "환" * 40, atomic=False), "completed success", True),
    # Things in the drop folder that are not cases.
    Row("a file instead of a folder", rejected_item(lambda w: (w / "notes.txt").write_text("hi")),
        "is a file, not a folder"),
    Row("an empty folder", rejected_item(lambda w: (w / "empty").mkdir()), "is an empty folder"),
    Row("a symlink to outside", rejected_item(lambda w: os.symlink("/etc", w / "etc-link")), "is a symlink"),
    Row("a symlink inside leading outside", rejected_item(case_with_symlink_outside),
        "symlink leading outside the case"),
    Row("a fifo inside", rejected_item(case_with_fifo), "contains a special file"),
    Row("an unreadable file", unreadable_file, "unreadable file: RP.locked.dcm"),
    Row("a folder still growing", growing_folder, "registered once quiet, with 4 files"),
    Row("the same name dropped twice", dropped_twice, "completed completed", True),
    Row("a folder removed after detection", removed_after_detection, "forgotten"),
    # Configuration.
    Row("config: a number that is text", bad_config("scanner", {"quiescence_period_seconds": "soon"}),
        "scanner.quiescence_period_seconds: got 'soon', expected a number"),
    Row("config: port 0", bad_config("hpc", {"port": 0}), "hpc.port: got 0, expected an integer >= 1"),
    Row("config: unknown transfer", bad_config("hpc", {"transfer": "ftp"}), "expected one of scp, tar, rsync"),
    Row("config: a typo in a key", bad_config("main_loop", {"lease_secnds": 5}), "main_loop.lease_secnds: unknown key"),
    Row("config: a password", bad_config("hpc", {"password": "hunter2"}), "passwords and passphrases are never accepted"),
    Row("config: host key checking off", bad_config("hpc", {"ssh_command": "ssh -o StrictHostKeyChecking=no"}),
        "weakens key or host-key checking"),
    Row("config: relative remote dir", bad_config("hpc", {"remote_base_dir": "mqic/cases"}),
        "expected an absolute path"),
    Row("config: remote dir with $()", bad_config("hpc", {"remote_base_dir": "/tmp/$(reboot)"}),
        "expected an absolute path or one under ~/"),
    Row("config: progress pattern without groups", bad_config("pueue", {"progress_pattern": "batch (\\d+)"}),
        "expected named groups 'done' and 'total'"),
    # The HPC side.
    Row("a missing key file", held_back_by(missing_key), "no-such-key not accessible: No such file or directory"),
    Row("an unknown host key", unknown_host_key_is_refused, "host key changed: possible interception"),
    Row("a remote dir that is not writable", held_back_by(mounted_base("ro,size=1m"), expect_status=CaseStatus.FAILED),
        "Read-only file system"),
    Row("a full remote disk", held_back_by(mounted_base("size=1m")), "No space left on device"),
    Row("pueue missing on the HPC", held_back_by(lambda rig: {"hpc": {"pueue_command": "/nonexistent/pueue"}}),
        "/nonexistent/pueue: No such file or directory"),
    Row("an unknown pueue group", unknown_group, "Group gpu_a doesn't exists"),
    # pueue answers we cannot read.
    Row("status: garbage from the stand-in", standin_garbage, "status could not be read (BadOutput"),
    Row("status: an unknown variant", odd_status({"status": {"Frozen": {"since": 1}}}), "unknown state"),
    Row("status: an unknown Done result", odd_status({"status": V4_DONE}), "unknown state"),
    Row("status: Failed without a number", odd_status({"status": {"Done": {"result": {"Failed": "x"}}}}),
        "unknown state"),
    Row("status: a task without status", odd_status({"drop": "status"}), "task without status"),
    Row("status: truncated JSON", odd_status({"raw": '{"tasks": {"0": {"id": 0,'}), "not JSON"),
    Row("status: tasks as a list", parser_says('{"tasks": [], "groups": {}}'), "expected {'tasks'"),
    Row("status: an empty answer", parser_says(""), "empty output"),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_hostile_input_gives_a_clear_error_and_the_system_keeps_running(rig, row):
    said = row.action(rig)
    assert row.expect in said, f"expected {row.expect!r} in:\n{said[-3000:]}"
    if not row.went_through:
        rig.good_case_goes_through()
