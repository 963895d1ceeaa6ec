"""Configuration: one YAML file, validated at start into frozen dataclasses.

Every problem is reported as one ``ConfigError`` naming the key, the value and
what was expected; programs turn it into exit code 2. Relative paths are
resolved against ``root_dir``, which defaults to the parent of the folder that
holds the config file (the project root for ``config/config.yaml``).
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from shared.backends import NAMES as SCHEDULER_NAMES
from shared.backends.slurm_parse import sbatch_line
from shared.errors import ConfigError

DEFAULT_CONFIG = "config/config.yaml"
DEFAULT_REMOTE_COMMAND = "python interpreter.py && python moquisim.py"
DEFAULT_PROGRESS_PATTERN = r"Generating particles for \((?P<done>\d+) of (?P<total>\d+) batches\)"
GROUP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
SECRET_KEY = re.compile(r"pass(word|wd|phrase)?$|secret|^pwd$", re.IGNORECASE)
TRANSFER_METHODS = ("scp", "tar", "rsync")
BACKENDS = SCHEDULER_NAMES  # the registry's names (shared.backends.MODULES)
SLURM_WORD = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+=-]{0,127}$")
NOTIFY_EVENTS = ("completed", "failed", "flagged", "unreachable", "share")
SAFE_REMOTE_PATH = re.compile(r"^~?[A-Za-z0-9_./+-]*$")
INSECURE_SSH_OPTION = re.compile(
    r"StrictHostKeyChecking\s*=?\s*(no|off|accept-new)|PasswordAuthentication\s*=?\s*yes|"
    r"BatchMode\s*=?\s*no|UserKnownHostsFile\s*=?\s*/dev/null", re.IGNORECASE)
DEFAULT_HOST_NAME = "hpc"  # the name of the one host of a config without ``hosts:``
_REQUIRED = object()


@dataclass(frozen=True)
class ScannerConfig:
    watch_path: Path
    quiescence_period_seconds: float = 5.0
    ready_marker: str | None = None
    rescan_interval_seconds: float = 10.0
    urgent_marker: str | None = "_URGENT"
    urgent_name_pattern: str | None = None


@dataclass(frozen=True)
class HpcConfig:
    host: str
    user: str
    identity_file: Path
    known_hosts_file: Path
    remote_base_dir: str
    port: int = 22
    ssh_command: tuple[str, ...] = ("ssh",)
    scp_command: tuple[str, ...] = ("scp",)
    pueue_command: tuple[str, ...] = ("pueue",)
    connect_timeout_seconds: float = 10.0
    command_timeout_seconds: float = 60.0
    upload_timeout_seconds: float = 3600.0
    control_dir: Path | None = None
    control_persist_seconds: int = 600
    remote_command: str = DEFAULT_REMOTE_COMMAND
    transfer: str = "tar"
    result_files: tuple[str, ...] = ()
    backend: str = "pueue"


@dataclass(frozen=True)
class GroupConfig:
    name: str
    gpu: str | None = None
    parallel: int = 1
    depth: int = 1


@dataclass(frozen=True)
class PartitionConfig:
    """One slot of ours on a Slurm cluster: the partition its jobs go to, and how."""
    name: str
    partition: str
    account: str | None = None
    qos: str | None = None
    gres: str | None = None
    extra_sbatch: tuple[str, ...] = ()
    depth: int = 1


@dataclass(frozen=True)
class SlurmConfig:
    partitions: tuple[PartitionConfig, ...]
    bin_dir: str = ""


@dataclass(frozen=True)
class SlotConfig:
    """A slot of ours on one host, whatever the backend: a pueue group or a Slurm partition entry.

    ``depth`` is how many of our cases it holds at once, running or queued behind each
    other on the HPC (each is one seat row in the database). ``gpu`` pins a device
    (pueue: ``CUDA_VISIBLE_DEVICES``); ``gres`` asks Slurm for one.
    """
    name: str
    gpu: str | None = None
    gres: str | None = None
    parallel: int = 1
    depth: int = 1


@dataclass(frozen=True)
class HostConfig:
    """One HPC host: how to reach it (``hpc``), its scheduler and its slots."""
    name: str
    hpc: HpcConfig
    groups: tuple[GroupConfig, ...] = ()
    slurm: SlurmConfig | None = None

    @property
    def backend(self) -> str:
        return self.hpc.backend

    @property
    def slots(self) -> tuple[SlotConfig, ...]:
        """The Slurm partition entries on a Slurm host, else the pueue groups."""
        if self.slurm is not None:
            return tuple(SlotConfig(name=p.name, gres=p.gres, depth=p.depth) for p in self.slurm.partitions)
        return tuple(SlotConfig(name=g.name, gpu=g.gpu, parallel=g.parallel, depth=g.depth) for g in self.groups)


@dataclass(frozen=True)
class PueueConfig:
    resume_paused_groups: bool = False
    log_lines: int = 15
    progress_pattern: str = DEFAULT_PROGRESS_PATTERN


@dataclass(frozen=True)
class MainLoopConfig:
    interval_seconds: float = 1.0
    poll_interval_seconds: float = 0.25
    running_case_timeout_hours: float = 24.0
    stuck_after_minutes: float = 60.0
    max_attempts: int = 5
    backoff_base_seconds: float = 30.0
    backoff_cap_seconds: float = 900.0
    lease_seconds: float = 120.0
    kill_grace_seconds: float = 30.0


@dataclass(frozen=True)
class SchedulingConfig:
    max_wait_minutes: float = 60.0

    @property
    def max_wait_seconds(self) -> float:
        """A normal case waiting longer than this is claimed like an urgent one."""
        return self.max_wait_minutes * 60


@dataclass(frozen=True)
class ResultsConfig:
    deliver_to: Path | None = None
    checksums: bool = True
    retry_seconds: float = 60.0
    share_timeout_seconds: float = 30.0
    expect_mount: bool = True
    share_marker: str | None = None


@dataclass(frozen=True)
class RetentionConfig:
    remote_days: float | None = None
    local_days: float | None = None


@dataclass(frozen=True)
class NotifyConfig:
    command: tuple[str, ...] = ()
    events: tuple[str, ...] = NOTIFY_EVENTS
    timeout_seconds: float = 10.0
    unreachable_after_minutes: float = 10.0
    max_attempts: int = 3
    retry_seconds: float = 60.0


@dataclass(frozen=True)
class LoggingConfig:
    file: Path
    level: str = "INFO"
    max_bytes: int = 10 * 1024 * 1024
    backup_count: int = 5
    timezone: str = "Asia/Seoul"
    json_stdout: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 8000


@dataclass(frozen=True)
class WebConfig:
    """The web dashboard (``python -m console.web.server``): where it listens and whether it may act."""
    host: str = "127.0.0.1"
    port: int = 8080
    actions: bool = False
    token_file: Path | None = None
    refresh_seconds: float = 2.0
    cache_seconds: float = 1.0
    allowed_hosts: tuple[str, ...] = ()

    @property
    def loopback(self) -> bool:
        """True when only this machine can reach the page (127.0.0.0/8, ::1, localhost)."""
        return self.host == "localhost" or self.host == "::1" or self.host.startswith("127.")


@dataclass(frozen=True)
class GpusConfig:
    """nvidia-smi telemetry on the hosts whose GPUs the login session sees (see ``shared.gpus``)."""
    enabled: bool = True
    interval_seconds: float = 10.0
    command: tuple[str, ...] = ("nvidia-smi",)
    idle_percent: float = 5.0
    idle_minutes: float = 10.0
    foreign_memory_mb: float = 100.0
    avoid_foreign: bool = False


@dataclass(frozen=True)
class Config:
    root_dir: Path
    source: Path
    scanner: ScannerConfig
    hosts: tuple[HostConfig, ...]
    pueue: PueueConfig
    main_loop: MainLoopConfig
    database_path: Path
    spool_path: Path
    logging: LoggingConfig
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    unhealthy_after_seconds: float = 300.0
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    web: WebConfig = field(default_factory=WebConfig)
    gpus: GpusConfig = field(default_factory=GpusConfig)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.logging.timezone)

    def host(self, name: str | None) -> HostConfig | None:
        """The configured host called ``name`` (None: not configured)."""
        return next((h for h in self.hosts if h.name == name), None)

    @property
    def seat_count(self) -> int:
        """How many cases all hosts hold at once (every slot's depth)."""
        return sum(slot.depth for host in self.hosts for slot in host.slots)


class _Section:
    """Reads one mapping of the YAML file, remembering which keys were used."""

    def __init__(self, name: str, data: Any, root: Path):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: got {data!r}, expected a mapping of keys")
        self.name, self.data, self.root, self.used = name, data, root, set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def raw(self, key: str, default: Any) -> Any:
        self.used.add(key)
        value = self.data.get(key, default)
        if value is _REQUIRED:
            raise ConfigError(f"{self.key(key)}: missing, this key is required")
        return value

    def number(self, key: str, default: Any = _REQUIRED, *, minimum: float = 0,
               integer: bool = False, positive: bool = False) -> Any:
        value = self.raw(key, default)
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise ConfigError(f"{self.key(key)}: got {value!r}, expected {kind}")
        if value < minimum or (positive and value <= 0):
            bound = f"> {minimum}" if positive else f">= {minimum}"
            raise ConfigError(f"{self.key(key)}: got {value!r}, expected {kind} {bound}")
        return value

    def optional_number(self, key: str, **limits: Any) -> Any:
        """A number, or None when the key is absent or null."""
        if self.raw(key, None) is None:
            return None
        return self.number(key, **limits)

    def text(self, key: str, default: Any = _REQUIRED, *, optional: bool = False) -> Any:
        value = self.raw(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{self.key(key)}: got {value!r}, expected a non-empty string")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(key)}: got {value!r}, expected true or false")
        return value

    def path(self, key: str, default: Any = _REQUIRED) -> Path:
        value = Path(os.path.expanduser(self.text(key, default)))
        return value if value.is_absolute() else (self.root / value)

    def command(self, key: str, default: str) -> tuple[str, ...]:
        value = self.text(key, default)
        if INSECURE_SSH_OPTION.search(value):
            raise ConfigError(f"{self.key(key)}: got {value!r}, expected no option that weakens "
                              f"key or host-key checking (hosts are verified against hpc.known_hosts_file)")
        try:
            words = tuple(shlex.split(value))
        except ValueError as exc:
            raise ConfigError(f"{self.key(key)}: got {value!r}, expected a command line ({exc})") from None
        if not words:
            raise ConfigError(f"{self.key(key)}: got {value!r}, expected a command line")
        return words

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(key, default)
        if value not in choices:
            raise ConfigError(f"{self.key(key)}: got {value!r}, expected one of {', '.join(choices)}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used, key=str)
        if unknown:
            raise ConfigError(f"{self.key(str(unknown[0]))}: unknown key (check the spelling; "
                              f"known keys: {', '.join(sorted(self.used))})")


def _refuse_secrets(data: Any, prefix: str = "") -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}{key}"
            if SECRET_KEY.search(str(key)):
                raise ConfigError(f"{name}: passwords and passphrases are never accepted in the "
                                  f"config; use key authentication (hpc.identity_file) with ssh-agent")
            _refuse_secrets(value, f"{name}.")


def _file_name(s: _Section, key: str, default: str | None) -> str | None:
    name = s.text(key, default, optional=True)
    if name is not None and ("/" in name or name in (".", "..")):
        raise ConfigError(f"{s.key(key)}: got {name!r}, expected a plain file name")
    return name


def _scanner(s: _Section) -> ScannerConfig:
    marker = _file_name(s, "ready_marker", None)
    urgent = _file_name(s, "urgent_marker", "_URGENT")
    if urgent is not None and urgent == marker:
        raise ConfigError(f"scanner.urgent_marker: got {urgent!r}, expected a name other than "
                          f"scanner.ready_marker (a ready case would always be urgent)")
    pattern = s.text("urgent_name_pattern", None, optional=True)
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"scanner.urgent_name_pattern: got {pattern!r}, expected a regular "
                              f"expression ({exc})") from None
    return ScannerConfig(
        watch_path=s.path("watch_path"),
        quiescence_period_seconds=s.number("quiescence_period_seconds", 5),
        ready_marker=marker,
        rescan_interval_seconds=s.number("rescan_interval_seconds", 10, positive=True),
        urgent_marker=urgent,
        urgent_name_pattern=pattern,
    )


def _hpc(s: _Section) -> HpcConfig:
    """The ssh, folder and command settings of one host (the ``hpc`` section or a ``hosts`` entry)."""
    control_dir = s.raw("control_dir", None)
    return HpcConfig(
        host=s.text("host"),
        user=s.text("user"),
        port=s.number("port", 22, minimum=1, integer=True),
        identity_file=s.path("identity_file"),
        known_hosts_file=s.path("known_hosts_file"),
        remote_base_dir=_remote_path(s, "remote_base_dir"),
        ssh_command=s.command("ssh_command", "ssh"),
        scp_command=s.command("scp_command", "scp"),
        pueue_command=s.command("pueue_command", "pueue"),
        connect_timeout_seconds=s.number("connect_timeout_seconds", 10, positive=True),
        command_timeout_seconds=s.number("command_timeout_seconds", 60, positive=True),
        upload_timeout_seconds=s.number("upload_timeout_seconds", 3600, positive=True),
        control_dir=None if control_dir is None else s.path("control_dir"),
        control_persist_seconds=s.number("control_persist_seconds", 600, integer=True),
        remote_command=_command_template(s),
        transfer=s.choice("transfer", "tar", TRANSFER_METHODS),
        result_files=_string_list(s, "result_files"),
        backend=s.choice("backend", "pueue", BACKENDS),
    )


def _command_template(s: _Section) -> str:
    value = s.text("remote_command", DEFAULT_REMOTE_COMMAND)
    try:
        value.format(case_id=1, case_name="name", remote_dir="/dir")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"hpc.remote_command: got {value!r}, expected a command whose only placeholders are "
                          f"{{case_id}}, {{case_name}}, {{remote_dir}} (write a literal brace twice: {{{{ }}}}); "
                          f"problem: {exc!r}") from None
    quoted = quoted_placeholder(value)
    if quoted:
        raise ConfigError(f"hpc.remote_command: got {value!r}, expected placeholders outside quotes: {quoted} is "
                          f"inside quotes, where its shell quoting does not protect; write it bare, or use the "
                          f"environment variables \"$MQIC_CASE_ID\", \"$MQIC_CASE_NAME\", \"$MQIC_REMOTE_DIR\"")
    return value


def quoted_placeholder(template: str) -> str | None:
    """The first ``{placeholder}`` that stands inside single or double quotes, else None."""
    quote, i = "", 0
    while i < len(template):
        char = template[i]
        if char == "\\" and quote != "'":
            i += 2
            continue
        if char in "'\"" and quote in ("", char):
            quote = "" if quote else char
        elif char == "{" and template.startswith("{{", i):
            i += 2
            continue
        elif char == "{" and quote:
            return template[i:template.index("}", i) + 1]
        i += 1
    return None


def _remote_path(s: _Section, key: str) -> str:
    value = s.text(key)
    if not SAFE_REMOTE_PATH.match(value) or value.startswith("~") and value not in ("~",) and not value.startswith("~/"):
        raise ConfigError(f"{s.key(key)}: got {value!r}, expected an absolute path or one under ~/ "
                          f"made of letters, digits and _ . / + -")
    if not value.startswith(("/", "~")):
        raise ConfigError(f"{s.key(key)}: got {value!r}, expected an absolute path or one under ~/")
    return value.rstrip("/") or "/"


def _string_list(s: _Section, key: str) -> tuple[str, ...]:
    value = s.raw(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{s.key(key)}: got {value!r}, expected a list of file names or globs")
    for item in value:
        if item.startswith("/") or ".." in Path(item).parts:
            raise ConfigError(f"{s.key(key)}: got {item!r}, expected a path inside the case folder")
    return tuple(value)


def _depth(s: _Section) -> int:
    return s.number("depth", 1, minimum=1, integer=True)


def _group(section: str, name: Any, spec: Any) -> GroupConfig:
    if not isinstance(name, str) or not GROUP_NAME.match(name):
        raise ConfigError(f"{section}: got group name {name!r}, expected letters, digits, '_', '-', '.'")
    s = _Section(f"{section}.{name}", spec, Path("."))
    gpu = s.raw("gpu", None)
    if gpu is not None and (isinstance(gpu, bool) or not re.fullmatch(r"[0-9A-Za-z,:-]+", str(gpu))):
        raise ConfigError(f"{section}.{name}.gpu: got {gpu!r}, expected a GPU index such as 0 or '0,1'")
    group = GroupConfig(name=name, gpu=None if gpu is None else str(gpu),
                        parallel=s.number("parallel", 1, minimum=1, integer=True), depth=_depth(s))
    s.finish()
    return group


def _groups(section: str, raw_groups: Any) -> tuple[GroupConfig, ...]:
    if isinstance(raw_groups, list):
        raw_groups = {name: {} for name in raw_groups}
    if not isinstance(raw_groups, dict) or not raw_groups:
        raise ConfigError(f"{section}: got {raw_groups!r}, expected a non-empty mapping of group names")
    return tuple(_group(section, name, spec) for name, spec in raw_groups.items())


def _pueue(s: _Section) -> PueueConfig:
    pattern = s.text("progress_pattern", DEFAULT_PROGRESS_PATTERN)
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"pueue.progress_pattern: got {pattern!r}, expected a regular expression ({exc})") from None
    if not {"done", "total"} <= set(compiled.groupindex):
        raise ConfigError(f"pueue.progress_pattern: got {pattern!r}, expected named groups 'done' and 'total'")
    return PueueConfig(
        resume_paused_groups=s.flag("resume_paused_groups", False),
        log_lines=s.number("log_lines", 15, minimum=1, integer=True),
        progress_pattern=pattern,
    )


def _slot_name(section: str, name: Any) -> str:
    if not isinstance(name, str) or not GROUP_NAME.match(name):
        raise ConfigError(f"{section}: got slot name {name!r}, expected letters, digits, '_', '-', '.'")
    return name


def _slurm_word(s: _Section, key: str, required: bool = False) -> str | None:
    value = s.raw(key, _REQUIRED if required else None)
    if value is None:
        return None
    if not isinstance(value, str) or not SLURM_WORD.match(value):
        raise ConfigError(f"{s.key(key)}: got {value!r}, expected one word of letters, digits and _ . : + = -")
    return value


def _sbatch_lines(s: _Section) -> tuple[str, ...]:
    value = s.raw("extra_sbatch", [])
    if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
        raise ConfigError(f"{s.key('extra_sbatch')}: got {value!r}, expected a list of options such as --mem=16G")
    for line in value:
        try:
            sbatch_line(line)
        except ValueError:
            raise ConfigError(f"{s.key('extra_sbatch')}: got {line!r}, expected one sbatch option such as "
                              f"--mem=16G or '#SBATCH --cpus-per-task=4'") from None
    return tuple(value)


def _partition(section: str, name: Any, spec: Any) -> PartitionConfig:
    s = _Section(f"{section}.{_slot_name(section, name)}", spec, Path("."))
    partition = PartitionConfig(name=name, partition=_slurm_word(s, "partition", required=True),
                                account=_slurm_word(s, "account"), qos=_slurm_word(s, "qos"),
                                gres=_slurm_word(s, "gres"), extra_sbatch=_sbatch_lines(s), depth=_depth(s))
    s.finish()
    return partition


def _slurm(s: _Section, prefix: str) -> SlurmConfig:
    """Partitions and bin_dir, read from ``s`` (the ``slurm`` section, or a ``hosts`` entry)."""
    raw = s.raw("partitions", None)
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{prefix}partitions: got {raw!r}, expected a mapping of slot names to partition "
                          f"settings, e.g. {{gpu_a: {{partition: gpu, gres: 'gpu:1'}}}}")
    bin_dir = s.text("bin_dir", None, optional=True)
    if bin_dir is not None and not bin_dir.startswith("/"):
        raise ConfigError(f"{prefix}bin_dir: got {bin_dir!r}, expected an absolute folder on the HPC")
    return SlurmConfig(partitions=tuple(_partition(f"{prefix}partitions", name, spec) for name, spec in raw.items()),
                       bin_dir=bin_dir or "")


def _host_name(section: str, value: Any) -> str:
    if not isinstance(value, str) or not GROUP_NAME.match(value):
        raise ConfigError(f"{section}: got {value!r}, expected a host name of letters, digits, '_', '-', '.'")
    return value


def _single_host(sections: dict[str, _Section], pueue_data: Any) -> HostConfig:
    """The one host of a config without ``hosts:``: ``hpc`` with ``pueue.groups`` or ``slurm``."""
    hpc_section = sections["hpc"]
    name = _host_name("hpc.name", hpc_section.raw("name", DEFAULT_HOST_NAME))
    hpc = _hpc(hpc_section)
    slurm_section = sections["slurm"]
    if hpc.backend != "slurm":
        if slurm_section.data:
            raise ConfigError(f"slurm: given, but hpc.backend is {hpc.backend!r} (set hpc.backend: slurm to use it)")
        groups = _groups("pueue.groups", pueue_data.get("groups", {"default": {}})
                         if isinstance(pueue_data, dict) else {"default": {}})
        return HostConfig(name=name, hpc=hpc, groups=groups)
    if isinstance(pueue_data, dict) and "groups" in pueue_data:
        raise ConfigError("pueue.groups: not used with hpc.backend slurm: the slots are slurm.partitions")
    return HostConfig(name=name, hpc=hpc, slurm=_slurm(slurm_section, "slurm."))


def _hosts(raw: Any, defaults: Any, root: Path, data: dict) -> tuple[HostConfig, ...]:
    """The ``hosts:`` list; each entry is ``hpc:`` (the defaults) overridden by the entry's own keys."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"hosts: got {raw!r}, expected a list of hosts, each with a name, ssh settings and "
                          f"groups (pueue) or partitions (Slurm)")
    for key in ("slurm",):
        if data.get(key):
            raise ConfigError(f"{key}: not used with hosts: give each Slurm host its partitions and bin_dir")
    if isinstance(data.get("pueue"), dict) and "groups" in data["pueue"]:
        raise ConfigError("pueue.groups: not used with hosts: give each pueue host its groups")
    hosts: list[HostConfig] = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise ConfigError(f"hosts[{index}]: got {entry!r}, expected a mapping with name, host, groups ...")
        name = _host_name(f"hosts[{index}].name", entry.get("name"))
        if any(h.name == name for h in hosts):
            raise ConfigError(f"hosts[{index}].name: got {name!r}, expected a name no other host has")
        s = _Section(f"hosts.{name}", {**(defaults or {}), **entry}, root)
        s.raw("name", None)
        hpc = _hpc(s)
        if hpc.backend == "slurm":
            host = HostConfig(name=name, hpc=hpc, slurm=_slurm(s, f"hosts.{name}."))
        else:
            host = HostConfig(name=name, hpc=hpc, groups=_groups(f"hosts.{name}.groups", s.raw("groups", None)))
        s.finish()
        hosts.append(host)
    return tuple(hosts)


def _main_loop(s: _Section) -> MainLoopConfig:
    return MainLoopConfig(
        interval_seconds=s.number("interval_seconds", 1, positive=True),
        poll_interval_seconds=s.number("poll_interval_seconds", 0.25, positive=True),
        running_case_timeout_hours=s.number("running_case_timeout_hours", 24, positive=True),
        stuck_after_minutes=s.number("stuck_after_minutes", 60, positive=True),
        max_attempts=s.number("max_attempts", 5, minimum=1, integer=True),
        backoff_base_seconds=s.number("backoff_base_seconds", 30),
        backoff_cap_seconds=s.number("backoff_cap_seconds", 900),
        lease_seconds=s.number("lease_seconds", 120, positive=True),
        kill_grace_seconds=s.number("kill_grace_seconds", 30),
    )


def _logging(s: _Section) -> LoggingConfig:
    tz = s.text("timezone", "Asia/Seoul")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"logging.timezone: got {tz!r}, expected an IANA time zone such as Asia/Seoul") from None
    return LoggingConfig(
        file=s.path("file", "logs/communicator_local.log"),
        level=s.choice("level", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        max_bytes=s.number("max_bytes", 10 * 1024 * 1024, minimum=1024, integer=True),
        backup_count=s.number("backup_count", 5, integer=True),
        timezone=tz,
        json_stdout=s.flag("json_stdout", True),
    )


def _results(s: _Section) -> ResultsConfig:
    deliver_to = None if s.raw("deliver_to", None) is None else s.path("deliver_to")
    marker = s.raw("share_marker", None)
    if marker is not None and (not isinstance(marker, str) or not marker or "/" in marker or marker in (".", "..")):
        raise ConfigError(f"results.share_marker: got {marker!r}, expected a plain file name such as .mqic-share")
    return ResultsConfig(deliver_to=deliver_to, checksums=s.flag("checksums", True),
                         retry_seconds=s.number("retry_seconds", 60, positive=True),
                         share_timeout_seconds=s.number("share_timeout_seconds", 30, positive=True),
                         expect_mount=s.flag("expect_mount", True), share_marker=marker)


def _retention(s: _Section) -> RetentionConfig:
    return RetentionConfig(remote_days=s.optional_number("remote_days", positive=True),
                           local_days=s.optional_number("local_days", positive=True))


def _notify(s: _Section) -> NotifyConfig:
    command = s.raw("command", None)
    if command is None:
        command = []
    if not isinstance(command, list) or not all(isinstance(w, str) and w for w in command):
        raise ConfigError(f"notify.command: got {command!r}, expected a list of arguments such as "
                          f"[curl, --data-binary, '@-', URL] (no shell; the event JSON arrives on stdin)")
    events = s.raw("events", list(NOTIFY_EVENTS))
    if not isinstance(events, list) or not set(events) <= set(NOTIFY_EVENTS) or \
            not all(isinstance(e, str) for e in events):
        raise ConfigError(f"notify.events: got {events!r}, expected a list of {', '.join(NOTIFY_EVENTS)}")
    return NotifyConfig(
        command=tuple(command), events=tuple(events),
        timeout_seconds=s.number("timeout_seconds", 10, positive=True),
        unreachable_after_minutes=s.number("unreachable_after_minutes", 10, positive=True),
        max_attempts=s.number("max_attempts", 3, minimum=1, integer=True),
        retry_seconds=s.number("retry_seconds", 60, positive=True),
    )


LISTEN = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d{1,5})$")


def _web(s: _Section) -> WebConfig:
    listen = s.text("listen", "127.0.0.1:8080")
    match = LISTEN.match(listen)
    if match is None or not 0 <= int(match["port"]) <= 65535:  # 0: any free port (tests)
        raise ConfigError(f"web.listen: got {listen!r}, expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080")
    token_file = None if s.raw("token_file", None) is None else s.path("token_file")
    actions = s.flag("actions", False)
    if actions and token_file is None:
        raise ConfigError("web.actions: got true, expected web.token_file too (the file holding the operators' "
                          "token, mode 0600): actions from the browser always need the token")
    return WebConfig(host=match["v6"] or match["host"], port=int(match["port"]), actions=actions,
                     token_file=token_file,
                     refresh_seconds=s.number("refresh_seconds", 2, positive=True),
                     cache_seconds=s.number("cache_seconds", 1, minimum=0),
                     allowed_hosts=_host_names(s, "allowed_hosts"))


def _host_names(s: _Section, key: str) -> tuple[str, ...]:
    value = s.raw(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.:-]+", v)
                                              for v in value):
        raise ConfigError(f"{s.key(key)}: got {value!r}, expected a list of host names such as [mqic.clinic.local]")
    return tuple(v.lower() for v in value)


def _gpus(s: _Section) -> GpusConfig:
    return GpusConfig(
        enabled=s.flag("enabled", True),
        interval_seconds=s.number("interval_seconds", 10, minimum=0.5),
        command=s.command("command", "nvidia-smi"),
        idle_percent=s.number("idle_percent", 5, positive=True),
        idle_minutes=s.number("idle_minutes", 10, positive=True),
        foreign_memory_mb=s.number("foreign_memory_mb", 100),
        avoid_foreign=s.flag("avoid_foreign", False),
    )


def _check_retention(config: Config) -> None:
    days = config.retention.remote_days
    for host in config.hosts:
        if days is not None and not host.hpc.result_files:
            raise ConfigError(f"retention.remote_days: got {days!r}, expected result_files of host {host.name} to "
                              f"name the result files (it is empty, so the HPC folder holds the only copy)")


def _check_delivery(config: Config) -> None:
    target = config.results.deliver_to
    if target is None:
        return
    for host in config.hosts:
        if not host.hpc.result_files:
            raise ConfigError(f"results.deliver_to: got {str(target)!r}, expected result_files of host {host.name} "
                              f"to name the result files to deliver (it is empty)")
    # Lexical only: resolving would stat the share, and a hung share would hang every program at start.
    target = Path(os.path.normpath(target))
    for key, folder in (("scanner.watch_path", config.scanner.watch_path), ("spool.path", config.spool_path)):
        folder = Path(os.path.normpath(folder))
        if target == folder or folder in target.parents:
            raise ConfigError(f"results.deliver_to: got {str(target)!r}, expected a folder outside "
                              f"{key} ({folder})")


SECTIONS = ("root_dir", "scanner", "hpc", "hosts", "pueue", "slurm", "main_loop", "database", "spool",
            "logging", "metrics", "health", "scheduling", "results", "retention", "notify", "web", "gpus")


def parse_config(data: Any, source: Path) -> Config:
    """Validate the parsed YAML ``data`` read from ``source``; raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: got {type(data).__name__}, expected a mapping of sections")
    _refuse_secrets(data)
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(SECTIONS)})")
    root = Path(os.path.expanduser(str(data.get("root_dir") or source.resolve().parent.parent)))
    sections = {name: _Section(name, data.get(name), root) for name in SECTIONS[1:] if name != "hosts"}
    scanner = _scanner(sections["scanner"])  # errors are reported in the order of the sections
    if "hosts" in data:
        hosts = _hosts(data["hosts"], data.get("hpc"), root, data)
        sections["hpc"].used |= set(sections["hpc"].data)  # the hosts' defaults, checked in each host
        sections["slurm"].used |= set(sections["slurm"].data)
    else:
        hosts = (_single_host(sections, data.get("pueue")),)
    sections["pueue"].raw("groups", None)
    config = Config(
        root_dir=root,
        source=source,
        scanner=scanner,
        hosts=hosts,
        pueue=_pueue(sections["pueue"]),
        main_loop=_main_loop(sections["main_loop"]),
        database_path=sections["database"].path("path", "database/mqi_communicator.db"),
        spool_path=sections["spool"].path("path", "spool"),
        logging=_logging(sections["logging"]),
        metrics=MetricsConfig(host=sections["metrics"].text("host", "127.0.0.1"),
                              port=sections["metrics"].number("port", 8000, minimum=1, integer=True)),
        unhealthy_after_seconds=sections["health"].number("unhealthy_after_seconds", 300, positive=True),
        scheduling=SchedulingConfig(
            max_wait_minutes=sections["scheduling"].number("max_wait_minutes", 60, positive=True)),
        results=_results(sections["results"]),
        retention=_retention(sections["retention"]),
        notify=_notify(sections["notify"]),
        web=_web(sections["web"]),
        gpus=_gpus(sections["gpus"]),
    )
    for section in sections.values():
        section.finish()
    for host in config.hosts:
        if config.main_loop.lease_seconds <= host.hpc.command_timeout_seconds:
            raise ConfigError(f"main_loop.lease_seconds: got {config.main_loop.lease_seconds!r}, expected more than "
                              f"the command_timeout_seconds of host {host.name} ({host.hpc.command_timeout_seconds!r}),"
                              f" or a slow submit could outlive its claim")
    _check_delivery(config)
    _check_retention(config)
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the YAML file at ``path``; raise ConfigError naming the problem."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found (pass --config PATH or set MQIC_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    return parse_config(data, source)


def default_config_path() -> str:
    """``$MQIC_CONFIG`` when set, else ``config/config.yaml``."""
    return os.environ.get("MQIC_CONFIG") or DEFAULT_CONFIG
