"""Shared fixtures: real SQLite files and real folders in tmp_path, never mocks."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sandbox.waiting import wait_until  # noqa: F401  (re-exported for the tests)
from shared.config import Config, parse_config
from shared.db import connect
from shared.spool import Spool


# -- the two tiers -----------------------------------------------------------------------------------
# The system tier starts real processes (sshd, the pueue stand-in, supervisord, Slurm, a browser); the
# fast tier starts none. A test is in the system tier when it asks for one of these fixtures or is
# marked `system`; under MQIC_TEST_TIER=fast any process a test starts fails it, so the split stays true.
SYSTEM_FIXTURES = {"sshd", "remote_config", "hpc", "slurm_cluster", "own_slurm", "slurm_hpc", "two_hosts",
                   "direct_hpc"}


def pytest_configure(config):
    config.addinivalue_line("markers", "system: starts real processes (the system tier; see README, Tests)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)


@pytest.fixture(autouse=True)
def no_process_in_the_fast_tier(request, monkeypatch):
    if os.environ.get("MQIC_TEST_TIER") != "fast":
        return

    def refuse(*_args, **_kwargs):
        raise AssertionError(f"{request.node.nodeid} started a process, so it belongs to the system tier: "
                             "mark it `@pytest.mark.system` (or give it a system fixture)")
    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(os, "posix_spawn", refuse)


def base_config_data(tmp_path: Path) -> dict:
    """A valid config dict whose paths all live under ``tmp_path``."""
    return {
        "root_dir": str(tmp_path),
        "scanner": {"watch_path": "incoming", "quiescence_period_seconds": 2},
        "hpc": {"host": "127.0.0.1", "user": "root", "identity_file": "keys/id",
                "known_hosts_file": "keys/known_hosts", "remote_base_dir": "/tmp/mqic-remote"},
        "pueue": {"groups": {"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}}},
        "database": {"path": "db/test.db"},
        "spool": {"path": "spool"},
        "logging": {"file": "logs/test.log", "json_stdout": True},
    }


def make_config(tmp_path: Path, **overrides: dict) -> Config:
    data = base_config_data(tmp_path)
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    source = tmp_path / "config.yaml"
    source.write_text(yaml.safe_dump(data))
    return parse_config(data, source)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db" / "state.db"


@pytest.fixture
def conn(db_path: Path):
    connection = connect(db_path)
    yield connection
    connection.close()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool").ensure()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """One real sshd on 127.0.0.1 for the whole session (tests that stop it restart it)."""
    from sandbox.sshd import SandboxSshd

    server = SandboxSshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


def hpc_overrides(endpoint, remote_base: Path, control_dir: Path, **extra) -> dict:
    return {"host": endpoint.host, "port": endpoint.port, "user": endpoint.user,
            "identity_file": str(endpoint.identity_file),
            "known_hosts_file": str(endpoint.known_hosts_file),
            "remote_base_dir": str(remote_base), "control_dir": str(control_dir),
            "connect_timeout_seconds": 3, "command_timeout_seconds": 20, **extra}


@pytest.fixture
def remote_config(tmp_path, sshd):
    """A config whose HPC is the sandbox sshd; the remote base dir lives in tmp_path."""
    if not sshd.is_running():
        sshd.start()
    control = Path(f"/tmp/mqic-t-{os.getpid()}-{next(_counter)}")
    config = make_config(tmp_path, hpc=hpc_overrides(sshd.endpoint, tmp_path / "remote", control))
    yield config
    from shared.remote import Remote
    Remote(config.hosts[0].hpc).close()
    shutil.rmtree(control, ignore_errors=True)


_counter = itertools.count()


class Hpc:
    """A per-test sandbox HPC: the session sshd plus a fresh pueue stand-in daemon."""

    def __init__(self, root: Path, sshd, **sections):
        from sandbox.hpc import config_data
        from sandbox.pueue_standin import write_wrappers
        from shared.config import parse_config

        self.root, self.sshd = root, sshd
        self.bin = write_wrappers(root / "bin", root / "pueue")
        from sandbox.nvidia_smi import write_wrapper
        self.bin["nvidia-smi"] = write_wrapper(root / "bin", root / "gpus")
        self.ctl("format", sections.pop("pueue_format", "v4"))
        subprocess.run([str(self.bin["pueued"]), "-d"], check=True, capture_output=True, timeout=30)
        groups = sections.pop("groups", None)
        overrides = {"main_loop": {"backoff_base_seconds": 10, "lease_seconds": 60},
                     "scanner": {"ready_marker": None}, "web": {"listen": "127.0.0.1:0"}}
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        data = config_data(root, sshd.endpoint, self.bin["pueue"], project_root=root, groups=groups,
                           **overrides)
        data["hpc"]["control_dir"] = f"/tmp/mqic-t-{os.getpid()}-{next(_counter)}"
        (root / "incoming").mkdir(exist_ok=True)
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(data))
        self.config = parse_config(data, self.config_path)

    def ctl(self, *args: str) -> str:
        return subprocess.run([str(self.bin["pueue-standin-ctl"]), *args], check=True,
                              capture_output=True, text=True, timeout=60).stdout

    def pueue(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin["pueue"]), *args], capture_output=True, text=True, timeout=60)

    def gpus(self, *args: str) -> None:
        """Steer the fake GPUs (``sandbox.nvidia_smi`` control: idle on, lost 1, foreign 0 900, ...)."""
        from sandbox.nvidia_smi import ctl_main
        assert ctl_main([str(self.root / "gpus"), *args]) == 0

    def status(self) -> dict:
        import json
        return json.loads(self.pueue("status", "--json").stdout)

    def tasks_labelled(self, label: str) -> list[dict]:
        return [t for t in self.status()["tasks"].values() if t["label"] == label]

    def close(self) -> None:
        subprocess.run([str(self.bin["pueue-standin-ctl"]), "stop"], capture_output=True, timeout=60)
        from shared.remote import Remote
        Remote(self.config.hosts[0].hpc).close()
        shutil.rmtree(self.config.hosts[0].hpc.control_dir, ignore_errors=True)


@pytest.fixture
def hpc(tmp_path, sshd):
    if not sshd.is_running():
        sshd.start()
    made = []

    def build(**sections) -> Hpc:
        made.append(Hpc(tmp_path / f"hpc{len(made)}", sshd, **sections))
        return made[-1]

    yield build
    for item in made:
        item.close()


@pytest.fixture
def memory_hpc(tmp_path):
    """Builder ``memory_hpc(groups=..., hosts=..., programs=..., **sections)`` of a sandbox whose HPC
    lives in memory (``tests/memory_hpc.py``) on an injected clock: the fast tier's worker tests."""
    from tests.memory_hpc import MemorySandbox
    made = []

    def build(**settings):
        made.append(MemorySandbox(tmp_path / f"memory{len(made)}", **settings))
        return made[-1]

    return build


# -- Slurm: a real single-node cluster for the session, one config per test --------------------

def skip_unless_slurm_can_run() -> None:
    """Skip, saying why, where the sandbox Slurm cannot run (not root, packages missing)."""
    from sandbox.slurm import missing_binaries
    if os.geteuid() != 0:
        pytest.skip("the Slurm sandbox needs root (slurmd starts jobs as their user)")
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm packages not installed ({', '.join(missing)}); run scripts/setup.sh as root")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """One sandbox Slurm for the session (tests cancel their own jobs when they end)."""
    skip_unless_slurm_can_run()
    from sandbox.slurm import SandboxSlurm

    cluster = SandboxSlurm(tmp_path_factory.mktemp("slurm"), kill_wait=3, message_timeout=4)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture
def own_slurm(tmp_path):
    """A sandbox Slurm for one test that stops its daemons (slurmctld down is an outage)."""
    skip_unless_slurm_can_run()
    from sandbox.slurm import SandboxSlurm
    made = []

    def build(**settings):
        made.append(SandboxSlurm(tmp_path / f"slurm{len(made)}", **{"kill_wait": 3, "message_timeout": 4, **settings}))
        try:
            made[-1].start()
        except BaseException:
            made[-1].stop()
            raise
        return made[-1]

    yield build
    for cluster in made:
        cluster.stop()


class SlurmHpc:
    """A per-test sandbox HPC on Slurm: the session sshd and cluster, a config with ``backend: slurm``."""

    def __init__(self, root: Path, sshd, cluster, partitions: dict | None = None, **sections):
        from sandbox.hpc import config_data
        from shared.config import parse_config

        self.root, self.sshd, self.cluster = root, sshd, cluster
        overrides = {"main_loop": {"backoff_base_seconds": 10, "lease_seconds": 60},
                     "scanner": {"ready_marker": None}, "web": {"listen": "127.0.0.1:0"}}
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        data = config_data(root, sshd.endpoint, None, slurm_bin=cluster.endpoint.bin_dir, partitions=partitions,
                           project_root=root, **overrides)
        data["hpc"]["control_dir"] = f"/tmp/mqic-t-{os.getpid()}-{next(_counter)}"
        (root / "incoming").mkdir(parents=True, exist_ok=True)
        (root / "remote").mkdir(exist_ok=True)
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(data))
        self.config = parse_config(data, self.config_path)

    def jobs(self) -> list:
        """Every job of this test (its work dir is under this test's remote folder), from squeue."""
        from shared.backends import slurm, slurm_parse as sp
        argv, fmt = slurm.squeue_call()
        result = self.cluster.run(argv)
        assert result.returncode == 0, result.stderr
        base = str(self.root / "remote")
        return [job for job in sp.parse_marked_squeue(result.stdout, fmt) if job.work_dir.startswith(base)]

    def close(self) -> None:
        active = [job.job_id for job in self.jobs() if not job.verdict.ended]
        if active:
            self.cluster.run(["scancel", *map(str, active)])
            wait_until(lambda: not [j for j in self.jobs() if not j.verdict.ended], timeout=30,
                       message="this test's jobs ended")
        from shared.remote import Remote
        Remote(self.config.hosts[0].hpc).close()
        shutil.rmtree(self.config.hosts[0].hpc.control_dir, ignore_errors=True)


@pytest.fixture
def slurm_hpc(tmp_path, sshd, slurm_cluster):
    if not sshd.is_running():
        sshd.start()
    made = []

    def build(**sections) -> SlurmHpc:
        made.append(SlurmHpc(tmp_path / f"slurm-hpc{len(made)}", sshd, slurm_cluster, **sections))
        return made[-1]

    yield build
    for item in made:
        item.close()


# -- direct: a GPU box without a scheduler (the session sshd), one config per test -----------------

class DirectHpc:
    """A per-test GPU box without a scheduler: the session sshd, a config with ``hpc.backend: direct``
    (its slots are ``groups``, like pueue's), the nvidia-smi stand-in on its PATH of commands."""

    def __init__(self, root: Path, sshd, groups: dict | None = None, **sections):
        from sandbox.hpc import config_data
        from sandbox.nvidia_smi import write_wrapper
        from shared.config import parse_config

        self.root, self.sshd = root, sshd
        nvidia_smi = write_wrapper(root / "bin", root / "gpus")
        overrides = {"main_loop": {"backoff_base_seconds": 10, "lease_seconds": 60},
                     "scanner": {"ready_marker": None}, "web": {"listen": "127.0.0.1:0"}}
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        data = config_data(root, sshd.endpoint, nvidia_smi.parent / "pueue", project_root=root, groups=groups,
                           **overrides)
        del data["hpc"]["pueue_command"]
        data["hpc"]["backend"] = "direct"
        data["hpc"]["control_dir"] = f"/tmp/mqic-t-{os.getpid()}-{next(_counter)}"
        (root / "incoming").mkdir(parents=True, exist_ok=True)
        (root / "remote").mkdir(exist_ok=True)
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(data))
        self.config = parse_config(data, self.config_path)

    @property
    def tasks_dir(self) -> Path:
        from shared.backends.direct import STATE_FOLDER
        return self.root / "remote" / STATE_FOLDER / "tasks"

    def task_file(self, task_id: int, name: str) -> str:
        return (self.tasks_dir / str(task_id) / name).read_text()

    def close(self) -> None:
        """End what this test's tasks left running: each runner's and task's own process group."""
        import signal
        for task in self.tasks_dir.glob("*") if self.tasks_dir.is_dir() else ():
            for name in ("runner", "pgid"):
                pid = (task / name).read_text().strip() if (task / name).is_file() else ""
                if pid.isdigit():
                    try:
                        os.killpg(int(pid), signal.SIGKILL)
                    except OSError:
                        pass
        from shared.remote import Remote
        Remote(self.config.hosts[0].hpc).close()
        shutil.rmtree(self.config.hosts[0].hpc.control_dir, ignore_errors=True)


@pytest.fixture
def direct_hpc(tmp_path, sshd):
    if not sshd.is_running():
        sshd.start()
    made = []

    def build(**sections) -> DirectHpc:
        made.append(DirectHpc(tmp_path / f"direct-hpc{len(made)}", sshd, **sections))
        return made[-1]

    yield build
    for item in made:
        item.close()


# -- several hosts (issue 11) ----------------------------------------------------------------------

def make_hosts_config(tmp_path: Path, hosts: list[dict], **overrides: dict) -> Config:
    """Like ``make_config``, with a ``hosts:`` list instead of the one host of ``hpc`` and
    ``pueue.groups``; ``hpc`` (``base_config_data`` plus ``overrides``) gives each host's defaults."""
    data = base_config_data(tmp_path)
    del data["pueue"]["groups"]
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    data["hosts"] = hosts
    source = tmp_path / "config.yaml"
    source.write_text(yaml.safe_dump(data))
    return parse_config(data, source)


# -- Two sandbox hosts at once (issue 11): each with its own sshd and pueue home or Slurm ---------

class TwoHosts:
    """A per-test sandbox with two hosts (``sandbox.hpc.up(second_host=...)``) and its config.

    Hosts are ``gpu1`` and ``gpu2`` (two pueue stand-ins), or ``gpu1`` and ``cluster`` (Slurm);
    ``host(name).sshd.stop()`` takes down that host alone.
    """

    def __init__(self, root: Path, second: str, *, groups: dict | None = None, second_groups: dict | None = None,
                 partitions: dict | None = None, **sections):
        from sandbox import hpc
        from shared.config import load_config

        self.root = root
        overrides = {"main_loop": {"backoff_base_seconds": 10, "lease_seconds": 60},
                     "scanner": {"ready_marker": None},
                     "hpc": {"control_dir": f"/tmp/mqic-t-{os.getpid()}-{next(_counter)}"},
                     "web": {"listen": "127.0.0.1:0"}}
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        self.sandbox = hpc.up(root, project_root=root, groups=groups, second_host=second,
                              second_groups=second_groups, partitions=partitions, **overrides)
        self.config_path = self.sandbox.config_path
        self.config = load_config(self.config_path)

    def host(self, name: str):
        return self.sandbox.host(name)

    def tasks(self, name: str) -> list[dict]:
        """Every task of pueue host ``name``, from its own ``pueue status --json``."""
        import json
        return list(json.loads(self.host(name).pueue_cli("status", "--json").stdout)["tasks"].values())


@pytest.fixture
def two_hosts(tmp_path):
    """Builder ``two_hosts(second="pueue"|"slurm", groups=..., second_groups=..., **sections)``;
    everything it started is stopped at the end (Slurm: skipped where it cannot run)."""
    from sandbox import hpc
    roots, made = [], []

    def build(second: str = "pueue", **settings) -> TwoHosts:
        if second == "slurm":
            skip_unless_slurm_can_run()
        roots.append(tmp_path / f"hosts{len(roots)}")
        made.append(TwoHosts(roots[-1], second, **settings))
        return made[-1]

    yield build
    from shared.remote import Remote
    for item in made:
        for host in item.config.hosts:
            Remote(host.hpc).close()
        shutil.rmtree(item.config.hosts[0].hpc.control_dir, ignore_errors=True)
    for root in roots:
        hpc.down(root)  # also what a half-started up() left running


def cli(capsys, config, *args: str) -> tuple[int, str, str]:
    """Run ``mqic --config CONFIG ARGS`` in this process; (exit code, stdout, stderr)."""
    from console.cli import main as cli_main
    try:
        code = cli_main(["--config", str(config.source), *args])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def get_slot(conn, slot: str, *, host: str = "hpc", seat: int = 0):
    """Seat ``seat`` of ``slot`` on ``host`` (the default names the one host of a config without ``hosts:``)."""
    from shared.seats import slot_from_row
    row = conn.execute("SELECT * FROM gpu_resources WHERE host = ? AND pueue_group = ? AND seat = ?",
                       (host, slot, seat)).fetchone()
    return None if row is None else slot_from_row(row)
