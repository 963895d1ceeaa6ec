"""Configuration: defaults, one precise message (key, value, expectation) per mistake, every mistake in one
run, and README's table made from the same declarations."""
from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared import backends
from shared.backends import Scheduler, SlotConfig, SlotKeys, pueue, slurm
from shared.config import PLAIN_SECTIONS, SCHEDULER_SECTIONS, load_config, parse_config, readme_with_config_table
from shared.config_keys import (NAME, Entries, Problems, Section, command_line, joined, markdown_table, number, read,
                                rows, setting, settings, text)
from shared.errors import ConfigError
from tests.conftest import base_config_data, make_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid():
    config = load_config(REPO / "config" / "config.yaml")
    assert config.root_dir == REPO
    assert config.database_path == REPO / "database" / "mqi_communicator.db"
    assert [g.name for g in config.hosts[0].groups] == ["gpu_a", "gpu_b"]


def test_defaults_and_relative_paths(tmp_path):
    config = make_config(tmp_path)
    assert config.scanner.watch_path == tmp_path / "incoming"
    assert config.scanner.ready_marker is None
    assert config.main_loop.running_case_timeout_hours == 24
    assert config.hosts[0].hpc.remote_command == "python interpreter.py && python moquisim.py"
    assert config.hosts[0].hpc.ssh_command == ("ssh",)
    assert config.metrics.port == 8000 and config.metrics.host == "127.0.0.1"
    assert config.logging.timezone == "Asia/Seoul"
    assert config.hosts[0].groups[0].gpu == "0"


def test_commands_are_split_into_words(tmp_path):
    config = make_config(tmp_path, hpc={"ssh_command": "ssh -o 'ProxyJump=bastion host'"})
    assert config.hosts[0].hpc.ssh_command == ("ssh", "-o", "ProxyJump=bastion host")


BAD = [
    ({"scanner": {"quiescence_period_seconds": "soon"}},
     "scanner.quiescence_period_seconds: got 'soon', expected a number"),
    ({"scanner": {"quiescence_period_seconds": -1}},
     "scanner.quiescence_period_seconds: got -1, expected a number >= 0"),
    ({"hpc": {"port": "22x"}}, "hpc.port: got '22x', expected an integer"),
    ({"hpc": {"port": 0}}, "hpc.port: got 0, expected an integer >= 1"),
    ({"hpc": {"host": ""}}, "hpc.host: got '', expected a non-empty string"),
    ({"hpc": {"password": "hunter2"}}, "hpc.password: passwords and passphrases are never accepted"),
    ({"hpc": {"key_passphrase": "x"}}, "hpc.key_passphrase: passwords and passphrases are never accepted"),
    ({"hpc": {"transfer": "ftp"}}, "hpc.transfer: got 'ftp', expected one of scp, tar, rsync"),
    ({"hpc": {"hots": "x"}}, "hpc.hots: unknown key"),
    ({"hpc": {"remote_command": "run ${HOME}/x"}}, "hpc.remote_command: got 'run ${HOME}/x', expected a command whose only placeholders"),
    ({"hpc": {"remote_command": 'echo "{case_name}"'}},
     "expected placeholders outside quotes: {case_name} is inside quotes"),
    ({"hpc": {"remote_command": "run --dir='{remote_dir}'"}},
     "expected placeholders outside quotes: {remote_dir} is inside quotes"),
    ({"hpc": {"ssh_command": "ssh -o StrictHostKeyChecking=no"}}, "hpc.ssh_command: got 'ssh -o StrictHostKeyChecking=no', expected no option that weakens"),
    ({"hpc": {"remote_base_dir": "cases"}}, "hpc.remote_base_dir: got 'cases', expected an absolute path or one under ~/"),
    ({"hpc": {"remote_base_dir": "/scratch/my cases;rm"}}, "hpc.remote_base_dir: got '/scratch/my cases;rm', expected an absolute path"),
    ({"hpc": {"ssh_command": "ssh -o 'unclosed"}}, "hpc.ssh_command: got \"ssh -o 'unclosed\", expected a command line"),
    ({"hpc": {"result_files": ["/etc/passwd"]}}, "hpc.result_files: got '/etc/passwd', expected a path inside the case folder"),
    ({"pueue": {"groups": {}}}, "pueue.groups: got {}, expected a non-empty mapping"),
    ({"pueue": {"groups": {"gpu a;rm": {}}}}, "pueue.groups: got group name 'gpu a;rm'"),
    ({"pueue": {"groups": {"gpu_a": {"gpu": "0; rm -rf /"}}}}, "pueue.groups.gpu_a.gpu: got '0; rm -rf /'"),
    ({"pueue": {"progress_pattern": "(unclosed"}}, "pueue.progress_pattern: got '(unclosed', expected a regular expression"),
    ({"pueue": {"progress_pattern": "batch (\\d+)"}}, "expected named groups 'done' and 'total'"),
    ({"main_loop": {"max_attempts": 0}}, "main_loop.max_attempts: got 0, expected an integer >= 1"),
    ({"main_loop": {"interval_seconds": 0}}, "main_loop.interval_seconds: got 0, expected a number > 0"),
    ({"main_loop": {"lease_seconds": 30}, "hpc": {"command_timeout_seconds": 60}},
     "main_loop.lease_seconds: got 30, expected more than the command_timeout_seconds of host hpc (60)"),
    ({"logging": {"timezone": "Mars/Olympus"}}, "logging.timezone: got 'Mars/Olympus', expected an IANA time zone"),
    ({"logging": {"json_stdout": "yes"}}, "logging.json_stdout: got 'yes', expected true or false"),
    ({"scanner": {"ready_marker": "../x"}}, "scanner.ready_marker: got '../x', expected a plain file name"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_values_name_key_value_and_expectation(tmp_path, override, message):
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, **override)
    assert message in str(caught.value)


def test_missing_required_key(tmp_path):
    data = base_config_data(tmp_path)
    del data["hpc"]["remote_base_dir"]
    with pytest.raises(ConfigError, match=r"hpc.remote_base_dir: missing, this key is required"):
        parse_config(data, tmp_path / "c.yaml")


def test_unknown_section_and_non_mapping(tmp_path):
    data = base_config_data(tmp_path) | {"hcp": {}}
    with pytest.raises(ConfigError, match="hcp: unknown section"):
        parse_config(data, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="scanner: got 'x', expected a mapping"):
        parse_config(base_config_data(tmp_path) | {"scanner": "x"}, tmp_path / "c.yaml")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("scanner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


@pytest.mark.system
def test_program_exits_2_with_one_clear_line(tmp_path):
    data = base_config_data(tmp_path)
    data["hpc"]["password"] = "secret"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "console.cli", "--config", str(path), "status"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "hpc.password: passwords and passphrases are never accepted" in result.stderr
    assert "Traceback" not in result.stderr


# -- the Slurm backend ---------------------------------------------------------------------------

def slurm_data(tmp_path: Path, partitions=None, **slurm) -> dict:
    data = base_config_data(tmp_path)
    del data["pueue"]
    data["hpc"]["backend"] = "slurm"
    data["slurm"] = {"partitions": partitions if partitions is not None else
                     {"gpu_a": {"partition": "gpu", "gres": "gpu:1", "account": "physics", "qos": "normal",
                                "extra_sbatch": ["--mem=16G", "#SBATCH --cpus-per-task=4"]},
                      "gpu_b": {"partition": "gpu", "gres": "gpu:a100:1"}}, **slurm}
    return data


def test_slurm_partitions_are_our_slots(tmp_path):
    config = parse_config(slurm_data(tmp_path, bin_dir="/opt/slurm/bin"), tmp_path / "c.yaml")
    assert isinstance(config.hosts[0].slot_config, slurm.SlurmConfig)
    assert config.hosts[0].hpc.backend == "slurm" and config.hosts[0].slot_config.bin_dir == "/opt/slurm/bin"
    first = config.hosts[0].slot_config.partitions[0]
    assert (first.name, first.partition, first.account, first.qos, first.gres) == ("gpu_a", "gpu", "physics", "normal", "gpu:1")
    assert first.extra_sbatch == ("--mem=16G", "#SBATCH --cpus-per-task=4")
    assert [(s.name, s.gpu, s.gres, s.parallel) for s in config.hosts[0].slots] == [("gpu_a", None, "gpu:1", 1),
                                                                         ("gpu_b", None, "gpu:a100:1", 1)]


def test_pueue_groups_are_our_slots_by_default(tmp_path):
    config = make_config(tmp_path)
    host = config.hosts[0]
    assert host.hpc.backend == "pueue" and isinstance(host.slot_config, pueue.GroupsConfig)
    assert [g.name for g in host.groups] == ["gpu_a", "gpu_b"]  # its slot keys, read as the host's own
    with pytest.raises(AttributeError):
        host.partitions  # noqa: B018 -- a key of another scheduler's slots
    assert [(s.name, s.gpu, s.gres) for s in config.hosts[0].slots] == [("gpu_a", "0", None), ("gpu_b", "1", None)]


SLURM_BAD = [
    ({"partitions": {}}, "slurm.partitions: got {}, expected a mapping of slot names to partition settings"),
    ({"partitions": {"gpu a": {"partition": "gpu"}}}, "slurm.partitions: got slot name 'gpu a'"),
    ({"partitions": {"gpu_a": {"gres": "gpu:1"}}}, "slurm.partitions.gpu_a.partition: missing, this key is required"),
    ({"partitions": {"gpu_a": {"partition": None}}},  # was taken as no partition at all
     "slurm.partitions.gpu_a.partition: got None, expected one word"),
    ({"partitions": {"gpu_a": {"partition": "gpu --uid=0"}}},
     "slurm.partitions.gpu_a.partition: got 'gpu --uid=0', expected one word"),
    ({"partitions": {"gpu_a": {"partition": "gpu", "gres": "-gpu"}}}, "slurm.partitions.gpu_a.gres: got '-gpu'"),
    ({"partitions": {"gpu_a": {"partition": "gpu", "extra_sbatch": ["mem=16G"]}}},
     "slurm.partitions.gpu_a.extra_sbatch: got 'mem=16G', expected one sbatch option"),
    ({"partitions": {"gpu_a": {"partition": "gpu", "extra_sbatch": ["--mem=1G\n--uid=0"]}}},
     "slurm.partitions.gpu_a.extra_sbatch: got '--mem=1G\\n--uid=0'"),
    ({"partitions": {"gpu_a": {"partition": "gpu", "gpu": 0}}}, "slurm.partitions.gpu_a.gpu: unknown key"),
    ({"bin_dir": "bin"}, "slurm.bin_dir: got 'bin', expected an absolute folder on the HPC"),
]


@pytest.mark.parametrize("slurm,message", SLURM_BAD, ids=[m.split(":")[0] for _, m in SLURM_BAD])
def test_bad_slurm_values_are_named(tmp_path, slurm, message):
    data = slurm_data(tmp_path)
    data["slurm"].update(slurm)
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path / "c.yaml")
    assert message in str(caught.value)


def test_slurm_and_pueue_slots_are_not_mixed(tmp_path):
    with pytest.raises(ConfigError, match="slurm: given, but hpc.backend is 'pueue'"):
        parse_config(base_config_data(tmp_path) | {"slurm": {"partitions": {"a": {"partition": "gpu"}}}},
                     tmp_path / "c.yaml")
    data = slurm_data(tmp_path)
    data["pueue"] = {"groups": {"gpu_a": {}}}
    with pytest.raises(ConfigError, match="pueue.groups: not used with hpc.backend slurm"):
        parse_config(data, tmp_path / "c.yaml")
    data = slurm_data(tmp_path)
    del data["slurm"]
    with pytest.raises(ConfigError, match="slurm.partitions: got None"):
        parse_config(data, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="hpc.backend: got 'condor', expected one of pueue, slurm"):
        make_config(tmp_path, hpc={"backend": "condor"})


def hosts_data(tmp_path: Path, hosts: list) -> dict:
    data = base_config_data(tmp_path)
    del data["pueue"]["groups"]
    return {**data, "hosts": hosts}


def test_hosts_take_their_defaults_from_hpc_and_name_their_own_slots(tmp_path):
    data = hosts_data(tmp_path, [
        {"name": "gpu1", "host": "gpu1.example.org", "groups": {"gpu_a": {"gpu": 0, "depth": 2}, "gpu_b": {"gpu": 1}}},
        {"name": "cluster", "host": "login.example.org", "user": "physics", "backend": "slurm",
         "bin_dir": "/opt/slurm/bin", "partitions": {"a100": {"partition": "gpu", "gres": "gpu:1", "depth": 4}}}])
    config = parse_config(data, tmp_path / "c.yaml")
    gpu1, cluster = config.hosts
    assert (gpu1.name, gpu1.hpc.host, gpu1.hpc.user, gpu1.backend) == ("gpu1", "gpu1.example.org", "root", "pueue")
    assert [(s.name, s.gpu, s.depth) for s in gpu1.slots] == [("gpu_a", "0", 2), ("gpu_b", "1", 1)]
    assert (cluster.hpc.user, cluster.backend, cluster.bin_dir) == ("physics", "slurm", "/opt/slurm/bin")
    assert [(s.name, s.gres, s.depth) for s in cluster.slots] == [("a100", "gpu:1", 4)]
    assert cluster.hpc.identity_file == gpu1.hpc.identity_file      # from hpc:, the defaults
    assert config.seat_count == 7 and config.host("cluster") is cluster and config.host("nope") is None


def test_the_one_host_of_an_hpc_section_is_named_hpc_unless_named(tmp_path):
    assert make_config(tmp_path).hosts[0].name == "hpc"
    assert make_config(tmp_path, hpc={"name": "gpu1"}).hosts[0].name == "gpu1"


@pytest.mark.parametrize("hosts, message", [
    ([], "hosts: got [], expected a list of hosts, each with a name, ssh settings and groups (pueue) or partitions "
         "(Slurm)"),
    ([{"host": "x", "groups": ["g"]}], "hosts[0].name: got None, expected a host name"),
    ([{"name": "a b", "groups": ["g"]}], "hosts[0].name: got 'a b', expected a host name"),
    ([{"name": "a", "groups": ["g"]}, {"name": "a", "groups": ["g"]}], "hosts[1].name: got 'a', expected a name no other"),
    ([{"name": "a"}], "hosts.a.groups: got None, expected a non-empty mapping of group names"),
    ([{"name": "a", "groups": {"g": {"depth": 0}}}], "hosts.a.groups.g.depth: got 0, expected an integer >= 1"),
    ([{"name": "a", "groups": ["g"], "gruops": 1}], "hosts.a.gruops: unknown key"),
    ([{"name": "a", "backend": "slurm"}], "hosts.a.partitions: got None, expected a mapping of slot names"),
])
def test_bad_hosts_are_named_precisely(tmp_path, hosts, message):
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(hosts_data(tmp_path, hosts), tmp_path / "c.yaml")
    assert message in str(info.value)


def test_hosts_refuse_the_single_host_slot_sections(tmp_path):
    data = {**base_config_data(tmp_path), "hosts": [{"name": "a", "groups": ["g"]}]}
    with pytest.raises(ConfigError, match="pueue.groups: not used with hosts"):
        parse_config(data, tmp_path / "c.yaml")
    data = {**hosts_data(tmp_path, [{"name": "a", "groups": ["g"]}]), "slurm": {"bin_dir": "/opt/slurm/bin"}}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path / "c.yaml")
    assert str(caught.value).splitlines() == [
        "slurm: not used with hosts: give each Slurm host its partitions and bin_dir"]


def test_a_direct_host_takes_the_pueue_groups_and_refuses_a_slurm_section(tmp_path):
    config = make_config(tmp_path, hpc={"backend": "direct"})
    assert [(s.name, s.gpu) for s in config.hosts[0].slots] == [("gpu_a", "0"), ("gpu_b", "1")]
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, hpc={"backend": "direct"}, slurm={"partitions": {"a": {"partition": "gpu"}}})
    assert str(caught.value).splitlines() == [
        "slurm: given, but hpc.backend is 'direct' (set hpc.backend: slurm to use it)"]


def test_an_unknown_backend_is_its_one_problem_not_its_slots(tmp_path):
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, hpc={"backend": "sge"}, slurm={"partitions": {"a": {"partition": "gpu"}}})
    assert [line.split(", expected")[0] for line in str(caught.value).splitlines()] == ["hpc.backend: got 'sge'"]
    hosts = [{"name": "a", "backend": "sge", "groups": ["g"], "partitions": {"p": {"partition": "gpu"}}}]
    with pytest.raises(ConfigError) as caught:
        parse_config(hosts_data(tmp_path, hosts), tmp_path / "c.yaml")
    assert [line.split(", expected")[0] for line in str(caught.value).splitlines()] == ["hosts.a.backend: got 'sge'"]


def test_the_keys_a_scheduler_adds_to_hpc_are_read_on_every_host(tmp_path):
    """``pueue_command`` is pueue's, declared in its module; as before, any host may give it."""
    config = parse_config(hosts_data(tmp_path, [
        {"name": "box", "groups": ["g"], "pueue_command": "/opt/pueue/bin/pueue --color never"},
        {"name": "cluster", "backend": "slurm", "partitions": {"a": {"partition": "gpu"}}}]), tmp_path / "c.yaml")
    box, cluster = config.hosts
    assert box.hpc.pueue_command == ("/opt/pueue/bin/pueue", "--color", "never")
    assert cluster.hpc.pueue_command == ("pueue",) and cluster.partitions[0].partition == "gpu"
    with pytest.raises(ConfigError, match="hosts.box.pueue_command: got 'ssh -o BatchMode=no'"):
        parse_config(hosts_data(tmp_path, [{"name": "box", "groups": ["g"], "pueue_command": "ssh -o BatchMode=no"}]),
                     tmp_path / "c.yaml")


# -- every key declared once; every problem in one run ---------------------------------------------

def test_every_problem_of_the_file_is_reported_in_one_run_each_naming_its_key(tmp_path):
    data = base_config_data(tmp_path)
    data["scanner"]["quiescence_period_seconds"] = "soon"
    data["hpc"].update(port=0, hots="x", password="hunter2")
    del data["hpc"]["user"]
    data["pueue"]["groups"]["gpu_b"] = {"gpu": "0; rm -rf /", "depth": 0}
    data["gpus"] = {"idel_percent": 5, "interval_seconds": 0}
    data["web"] = {"actions": True}
    data["hcp"] = {}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path / "c.yaml")
    lines = str(caught.value).splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "hpc.password: passwords and passphrases are never accepted in the config; use key authentication",
        "hcp: unknown section",
        "scanner.quiescence_period_seconds: got 'soon', expected a number",
        "hpc.user: missing, this key is required",
        "hpc.port: got 0, expected an integer >= 1",
        "pueue.groups.gpu_b.gpu: got '0; rm -rf /', expected a GPU index such as 0 or '0,1'",
        "pueue.groups.gpu_b.depth: got 0, expected an integer >= 1",
        "gpus.interval_seconds: got 0, expected a number >= 0.5",
        "hpc.hots: unknown key",
        "gpus.idel_percent: unknown key",
        "web.actions: got true, expected web.token_file too"]
    assert "hcp: unknown section (did you mean hpc? known: root_dir, scanner, hpc," in lines[1]
    assert "hpc.hots: unknown key (did you mean host? known keys: backend," in lines[8]
    assert "gpus.idel_percent: unknown key (did you mean idle_percent?" in lines[9]


def test_an_unknown_key_with_no_close_name_asks_to_check_the_spelling(tmp_path):
    with pytest.raises(ConfigError, match=r"scanner.zzz: unknown key \(check the spelling; known keys: quiescence"):
        make_config(tmp_path, scanner={"zzz": 1})


def test_checks_across_keys_skip_a_value_that_has_its_own_problem(tmp_path):
    with pytest.raises(ConfigError) as caught:       # 120 (the default) <= 200 would be a second, false problem
        make_config(tmp_path, main_loop={"lease_seconds": "long"}, hpc={"command_timeout_seconds": 200},
                    scanner={"ready_marker": "a/b", "urgent_marker": "a/b"}, retention={"remote_days": -1})
    assert str(caught.value).splitlines() == [
        "scanner.ready_marker: got 'a/b', expected a plain file name",
        "scanner.urgent_marker: got 'a/b', expected a plain file name",
        "main_loop.lease_seconds: got 'long', expected a number",
        "retention.remote_days: got -1, expected a number > 0"]


def test_a_password_inside_a_hosts_entry_is_refused(tmp_path):
    data = hosts_data(tmp_path, [{"name": "a", "groups": ["g"]}, {"name": "b", "groups": ["g"], "passphrase": "x"}])
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path / "c.yaml")
    assert str(caught.value).splitlines() == [
        "hosts[1].passphrase: passwords and passphrases are never accepted in the config; use key authentication "
        "(hpc.identity_file) with ssh-agent"]


def test_the_dataclass_defaults_are_the_loaders_defaults(tmp_path):
    config = make_config(tmp_path)
    for name, cls in {**SCHEDULER_SECTIONS, **PLAIN_SECTIONS}.items():
        if not any(isinstance(f.default, Path) for f in dataclasses.fields(cls)):  # paths: taken from root_dir
            assert getattr(config, name) == cls(), name
    hpc = config.hosts[0].hpc
    assert (hpc.port, hpc.ssh_command, hpc.transfer, hpc.result_files, hpc.backend) == (22, ("ssh",), "tar", (), "pueue")
    assert (config.database_path, config.spool_path, config.logging.file, config.unhealthy_after_seconds) == (
        tmp_path / "db" / "test.db", tmp_path / "spool", tmp_path / "logs" / "test.log", 300)
    assert make_config(tmp_path, hpc={"name": "x"}).hosts[0].groups[0].depth == 1
    assert hpc.pueue_command == ("pueue",)  # a key pueue adds to hpc, declared in its module


def test_a_module_declares_its_own_section_with_the_same_mechanism(tmp_path):
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Plugin:
        speed: int = setting(number(minimum=1, integer=True), 3, "how fast")
        label: str = setting(text, help="its name")
    problems = Problems()
    section = Section("plugin", {"speed": 0, "colour": "red"}, problems)
    read(Plugin, section)
    section.finish()
    assert problems.lines[0] == "plugin.speed: got 0, expected an integer >= 1"
    assert problems.lines[1] == "plugin.label: missing, this key is required"
    assert problems.lines[2].startswith("plugin.colour: unknown key (check the spelling; known keys: label, speed)")
    assert Plugin(label="x").speed == 3
    assert markdown_table(rows("plugin", Plugin)).splitlines()[2:] == [
        "| `plugin.speed` | 3 | how fast |", "| `plugin.label` | required | its name |"]


# -- a scheduler's part of the config: declared in its module, read by the registry -------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class Lane:
    name: str
    width: int = setting(number(minimum=1, integer=True), 1, "cases the lane holds at once")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lanes:
    lanes: tuple[Lane, ...] = setting(Entries(Lane, "lane name", NAME, "a mapping of lane names"), None, "its lanes")
    queue: str | None = setting(lambda value: value, None, "its queue")

    def slots(self) -> tuple[SlotConfig, ...]:
        return tuple(SlotConfig(name=lane.name, depth=lane.width) for lane in self.lanes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FarmKeys:
    farm_command: tuple[str, ...] = setting(command_line, "farm", "where farm is on the HPC")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FarmConfig:
    patience: int = setting(number(integer=True), 3, "how patient farm is")


@pytest.fixture
def config_with_farm(monkeypatch):
    """shared/config.py, loaded afresh as its own module, with a fourth scheduler ``farm`` in the registry
    that declares its slots (``farm.lanes``, ``farm.queue``), a section (``barn``) and a key of ``hpc``."""
    import importlib.util
    import types
    module = types.ModuleType("tests.farm_scheduler")
    module.SCHEDULER = Scheduler(
        name="farm", words=pueue.WORDS, build=lambda *args: None, doctor_checks=lambda *args: [],
        check_names=("farm",), slot_keys=SlotKeys(section="farm", keys=Lanes, noun="farm"),
        sections={"barn": FarmConfig}, host_keys=FarmKeys)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(backends.MODULES, "farm", module.__name__)
    monkeypatch.setattr(backends, "NAMES", tuple(backends.MODULES))
    spec = importlib.util.spec_from_file_location("config_with_farm", REPO / "shared" / "config.py")
    probe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, probe)
    spec.loader.exec_module(probe)
    return probe


def test_a_new_scheduler_brings_its_config_with_no_edit_of_the_config_reader(tmp_path, config_with_farm):
    data = base_config_data(tmp_path)
    del data["pueue"]
    data["hpc"].update(backend="farm", farm_command="/opt/farm -q")
    data["farm"] = {"lanes": {"l1": {"width": 2}, "l2": {}}, "queue": "night"}
    data["barn"] = {"patience": 7}
    config = config_with_farm.parse_config(data, tmp_path / "c.yaml")
    host = config.hosts[0]
    assert [(s.name, s.depth) for s in host.slots] == [("l1", 2), ("l2", 1)] and host.queue == "night"
    assert host.hpc.farm_command == ("/opt/farm", "-q") and config.barn.patience == 7
    assert config.pueue.log_lines == 15  # the other schedulers' sections are still read
    table = config_with_farm.config_table()
    for row in ("| `hpc.farm_command` | `farm` |", "| `farm.lanes` | none | its lanes |",
                "| `farm.lanes.<name>.width` | 1 |", "| `farm.queue` | none |", "| `barn.patience` | 3 |"):
        assert row in table
    assert "farm" not in (REPO / "shared" / "config.py").read_text()


def test_a_new_schedulers_slots_are_refused_where_they_do_not_belong(tmp_path, config_with_farm):
    data = base_config_data(tmp_path) | {"farm": {"lanes": ["l1"]}, "barn": {"patience": "x"}}
    with pytest.raises(ConfigError) as caught:
        config_with_farm.parse_config(data, tmp_path / "c.yaml")
    assert str(caught.value).splitlines() == [
        "farm: given, but hpc.backend is 'pueue' (set hpc.backend: farm to use it)",
        "barn.patience: got 'x', expected an integer"]
    hosts = hosts_data(tmp_path, [{"name": "f", "backend": "farm"}]) | {"farm": {"queue": "q"}}
    with pytest.raises(ConfigError) as caught:
        config_with_farm.parse_config(hosts, tmp_path / "c.yaml")
    assert str(caught.value).splitlines() == [
        "farm: not used with hosts: give each farm host its lanes and queue",
        "hosts.f.lanes: got None, expected a mapping of lane names"]
    with pytest.raises(ConfigError, match="hpc.backend: got 'sge', expected one of pueue, slurm, direct, farm"):
        config_with_farm.parse_config(base_config_data(tmp_path) | {"hpc": {"backend": "sge"}}, tmp_path / "c.yaml")


def test_joined_sections_keep_their_keys_and_refuse_one_declared_twice():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Base:
        speed: int = setting(number(), 1, "how fast")

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Extra:
        colour: str = setting(text, "red", "which colour")

    made = joined(Base, keys=[Extra], fields=[("more", int)])
    assert made.__name__ == "Base" and list(settings(made)) == ["speed", "colour"]
    assert made(more=2) == made(speed=1, colour="red", more=2)
    with pytest.raises(TypeError, match="Base: declared twice: speed"):
        joined(Base, keys=[dataclasses.make_dataclass("Twin", [("speed", int, setting(number(), 2, ""))],
                                                      frozen=True, kw_only=True)])
    with pytest.raises(TypeError, match="declared twice: colour"):
        joined(Base, keys=[Extra], fields=[("colour", str)])


def test_no_backend_module_imports_the_config_reader():
    """shared.config reads every registry entry when it is imported: a backend importing it would be a cycle."""
    import ast
    for path in sorted((REPO / "shared" / "backends").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "shared.config" not in imported, path.name
        assert not any(isinstance(node, ast.ImportFrom) and node.module == "shared"
                       and any(alias.name == "config" for alias in node.names) for node in ast.walk(tree)), path.name


def test_readme_configuration_table_is_the_one_the_declarations_give():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme_with_config_table(readme) == readme, "README's configuration table drifted: run scripts/config-table.py"


def test_config_table_script_rewrites_only_the_table_and_checks_it(tmp_path):
    spec = importlib.util.spec_from_file_location("config_table", REPO / "scripts" / "config-table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    drifted = tmp_path / "README.md"
    drifted.write_text(readme.replace("| `hpc.port` | 22 | ssh port |", "| `hpc.port` | 2222 | ssh port |"))
    assert script.main(["--check", "--readme", str(drifted)]) == 1
    assert script.main(["--readme", str(drifted)]) == 0
    assert drifted.read_text() == readme
    assert script.main(["--check", "--readme", str(drifted)]) == 0
