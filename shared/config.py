"""Configuration: one YAML file, validated at start into frozen dataclasses.

Every key is declared once, as a field of its section's dataclass made with
``shared.config_keys.setting`` (how its value is read, its default, its help); the loader
reads every section from those declarations and README's configuration table is
generated from them (``scripts/config-table.py``). A bad file gives one ``ConfigError``
listing every problem, one per line, each naming the key, the value and what was
expected; programs turn it into exit code 2. Relative paths are resolved against
``root_dir``, which defaults to the parent of the folder that holds the config file (the
project root for ``config/config.yaml``).

What a scheduler needs of the config is its registry entry's part (``shared.backends``),
declared in its own module: where a host's slots are configured and how they are read
(``slot_keys``), the top-level sections it declares (``sections``, found as
``config.<name>``) and the keys it adds to ``hpc`` and every ``hosts`` entry
(``host_keys``, found as ``host.hpc.<key>``). This module reads them for every entry, so
it names no scheduler, and adding one needs no edit here.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from shared.backends import DEFAULT, NAMES, SlotConfig, SlotKeys, schedulers
from shared.backends import scheduler as scheduler_entry
from shared.config_keys import (BAD, NAME, Entries, Invalid, Problems, Section, Setting, bad, choice, command_line,
                                did_you_mean, flag, joined, known, local_path, markdown_table, number, optional, read,
                                regex, replace_between, rows, setting, settings, text)
from shared.errors import ConfigError

DEFAULT_CONFIG = "config/config.yaml"
DEFAULT_REMOTE_COMMAND = "python interpreter.py && python moquisim.py"
SECRET_KEY = re.compile(r"pass(word|wd|phrase)?$|secret|^pwd$", re.IGNORECASE)
TRANSFER_METHODS = ("scp", "tar", "rsync")
BACKENDS = NAMES  # the registry's names (shared.backends.MODULES)
NOTIFY_EVENTS = ("completed", "failed", "flagged", "unreachable", "share")
SAFE_REMOTE_PATH = re.compile(r"^~?[A-Za-z0-9_./+-]*$")
DEFAULT_HOST_NAME = "hpc"  # the name of the one host of a config without ``hosts:``
LISTEN = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d{1,5})$")

# What the schedulers declare (each registry entry's part of the config, see the module's docstring).
SCHEDULERS = schedulers()
SLOT_KEYS: tuple[SlotKeys, ...] = tuple(dict.fromkeys(entry.slot_keys for entry in SCHEDULERS))  # some share one
SCHEDULER_SECTIONS: dict[str, type] = {name: cls for entry in SCHEDULERS for name, cls in entry.sections.items()}


# -- kinds: how one value is read (each returns the value or raises Invalid) --------------------

def file_name(value: Any) -> str:
    name = text(value)
    if "/" in name or name in (".", ".."):
        raise bad(name, "a plain file name")
    return name


def command_template(value: Any) -> str:
    """``hpc.remote_command``: placeholders {case_id}, {case_name}, {remote_dir}, none inside quotes."""
    value = text(value)
    try:
        value.format(case_id=1, case_name="name", remote_dir="/dir")
    except (KeyError, IndexError, ValueError) as exc:
        raise bad(value, f"a command whose only placeholders are {{case_id}}, {{case_name}}, {{remote_dir}} "
                         f"(write a literal brace twice: {{{{ }}}}); problem: {exc!r}") from None
    quoted = quoted_placeholder(value)
    if quoted:
        raise bad(value, f"placeholders outside quotes: {quoted} is inside quotes, where its shell quoting does "
                         f"not protect; write it bare, or use the environment variables \"$MQIC_CASE_ID\", "
                         f"\"$MQIC_CASE_NAME\", \"$MQIC_REMOTE_DIR\"")
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


def remote_path(value: Any) -> str:
    value = text(value)
    if not SAFE_REMOTE_PATH.match(value) or value.startswith("~") and value not in ("~",) and not value.startswith("~/"):
        raise bad(value, "an absolute path or one under ~/ made of letters, digits and _ . / + -")
    if not value.startswith(("/", "~")):
        raise bad(value, "an absolute path or one under ~/")
    return value.rstrip("/") or "/"


def relative_globs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise bad(value, "a list of file names or globs")
    for item in value:
        if item.startswith("/") or ".." in Path(item).parts:
            raise bad(item, "a path inside the case folder")
    return tuple(value)


def host_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise bad(value, "a host name of letters, digits, '_', '-', '.'")
    return value


def host_list(value: Any) -> list:
    if not isinstance(value, list) or not value:
        slots = " or ".join(f"{_first_key(keys)} ({keys.noun})" for keys in SLOT_KEYS)
        raise bad(value, f"a list of hosts, each with a name, ssh settings and {slots}")
    return value


def time_zone(value: Any) -> str:
    text(value)
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise bad(value, "an IANA time zone such as Asia/Seoul") from None
    return value


def share_marker(value: Any) -> str:
    if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
        raise bad(value, "a plain file name such as .mqic-share")
    return value


def argument_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(w, str) and w for w in value):
        raise bad(value, "a list of arguments such as [curl, --data-binary, '@-', URL] (no shell; the event JSON "
                         "arrives on stdin)")
    return tuple(value)


def notify_events(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(e, str) for e in value) or \
            not set(value) <= set(NOTIFY_EVENTS):
        raise bad(value, f"a list of {', '.join(NOTIFY_EVENTS)}")
    return tuple(value)


def listen_address(value: Any) -> str:
    match = LISTEN.match(text(value))
    if match is None or not 0 <= int(match["port"]) <= 65535:  # 0: any free port (tests)
        raise bad(value, "HOST:PORT such as 127.0.0.1:8080 or [::1]:8080")
    return value


def host_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.:-]+", v)
                                              for v in value):
        raise bad(value, "a list of host names such as [mqic.clinic.local]")
    return tuple(v.lower() for v in value)


def root_dir(value: Any) -> Path:
    return Path(os.path.expanduser(str(value)))


# -- the sections: every key declared once --------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ScannerConfig:
    watch_path: Path = setting(local_path, help="drop folder watched for case folders")
    quiescence_period_seconds: float = setting(
        number(), 5, "a folder is ready when nothing in it changed this long")
    ready_marker: str | None = setting(
        optional(file_name), None, "file name (e.g. `_CASE_READY`) that makes a folder ready at once")
    rescan_interval_seconds: float = setting(
        number(positive=True), 10, "full rescan interval even without inotify events")
    urgent_marker: str | None = setting(
        optional(file_name), "_URGENT",
        "file name that makes a dropped case urgent (`null`: off); must differ from `ready_marker`")
    urgent_name_pattern: str | None = setting(
        optional(regex), None, "regular expression (Python `re.search`) on the folder name that makes a dropped "
                               "case urgent, e.g. `^STAT_`")


@dataclass(frozen=True, kw_only=True)
class HpcConfig:
    """How to reach one host and run a case there (the ``hpc`` section, or one ``hosts`` entry)."""
    host: str = setting(text, help="the HPC login's host name or address")
    user: str = setting(text, help="the account used on it")
    port: int = setting(number(minimum=1, integer=True), 22, "ssh port")
    identity_file: Path = setting(local_path, help="private key (ssh-agent may hold its passphrase)")
    known_hosts_file: Path = setting(local_path, help="host keys checked strictly; an unknown key is refused")
    remote_base_dir: str = setting(
        remote_path, help="absolute or `~/…` (expanded on the HPC); letters, digits, `_ . / + -`")
    backend: str = setting(
        choice(*BACKENDS), DEFAULT, "`pueue` (slots are `pueue.groups`), `slurm` (slots are `slurm.partitions`, "
                                    "see \"Running on a Slurm cluster\") or `direct` (no scheduler; slots are "
                                    "`pueue.groups`, see \"Running on one GPU box without a scheduler\")")
    ssh_command: tuple[str, ...] = setting(
        command_line, "ssh", "command plus extra options (e.g. `ssh -o ProxyJump=bastion`); options weakening host-key "
                        "or key checks are refused")
    scp_command: tuple[str, ...] = setting(
        command_line, "scp", "as `ssh_command`, for scp; `scp -O` (legacy protocol) where the HPC's sshd has no SFTP "
                        "server")
    connect_timeout_seconds: float = setting(number(positive=True), 10, "ssh connect timeout")
    command_timeout_seconds: float = setting(number(positive=True), 60, "limit for one remote command")
    upload_timeout_seconds: float = setting(number(positive=True), 3600, "limit for one upload")
    control_dir: Path | None = setting(
        optional(local_path), None,
        "private folder of the shared ControlMaster socket, created 0700 when missing; used only when it is a "
        "real folder (not a symlink), owned by us, mode 0700 exactly: otherwise nothing is sent to the HPC "
        "(`UnsafeControlDir`, treated as unreachable, no case fails) and the log and `mqic doctor` say what is "
        "wrong and the fix", shown="`/tmp/mqic-ssh-<uid>`")
    control_persist_seconds: int = setting(
        number(integer=True), 600, "how long the shared connection stays up when idle")
    transfer: str = setting(
        choice(*TRANSFER_METHODS), "tar",
        "`tar` (one stream over the shared ssh connection; needs only ssh and tar; fastest for many files), `scp` "
        "or `rsync` (resumable). OpenSSH 9 `scp` needs an SFTP server on the HPC: without one the upload fails "
        "with `TransferUnsupported` (a configuration error, not an outage) whose message names the fix, "
        "`transfer: tar` or `scp_command: \"scp -O\"`; cases wait (no attempt used up) until the configuration "
        "is fixed")
    remote_command: str = setting(
        command_template, DEFAULT_REMOTE_COMMAND,
        "run in the remote case folder; the task's environment holds `MQIC_CASE_ID`, `MQIC_CASE_NAME` and "
        "`MQIC_REMOTE_DIR` (use them as `\"$MQIC_CASE_NAME\"`); the placeholders `{case_id}`, `{case_name}`, "
        "`{remote_dir}` are substituted shell-quoted and refused inside quotes (where quoting does not protect); "
        "write a literal brace twice. The command is wrapped so that its exit status lands in "
        "`.mqic/exit_status` and its output in `.mqic/output.log` in the case folder")
    result_files: tuple[str, ...] = setting(
        relative_globs, [],
        "files/globs (relative to the case folder) fetched back into the local case folder on success, as one "
        "tar stream checked member by member: only regular files and folders inside the case folder; an "
        "absolute name, a `..`, any link (symbolic or hard, even one pointing inside), a device or a fifo is "
        "refused (`UnsafeMember` naming the member, nothing written outside). Our checks run on every Python; "
        "the `data` extraction filter runs as well where Python has it (3.11.4+)")


# ``hpc`` holds the keys every scheduler adds to it (such as where its command is) after its own.
HpcConfig = joined(HpcConfig, keys=[entry.host_keys for entry in SCHEDULERS if entry.host_keys is not None])

HOST_NAME = Setting(host_name, DEFAULT_HOST_NAME, "the host's name in the database, logs, metrics and "
                                                  "`mqic drain` (a config without `hosts:`)")
HOSTS = Setting(host_list, None, "several hosts: a list of entries, each with `name`, any `hpc.*` key (the `hpc:` "
                                 "section gives the defaults) and `groups` (pueue) or `partitions` and `bin_dir` "
                                 "(Slurm); see \"Several hosts\"")


@dataclass(frozen=True)
class HostConfig:
    """One HPC host: how to reach it (``hpc``), its scheduler and its slots.

    ``slot_config`` holds the keys that configure its slots, read as its scheduler's
    ``slot_keys`` declare them (None when its backend is unknown); they are also read as the
    host's own attributes (``host.groups`` on a pueue host). ``slots`` are the same, in our
    words.
    """
    name: str
    hpc: HpcConfig
    slot_config: Any = None

    @property
    def backend(self) -> str:
        return self.hpc.backend

    @property
    def slots(self) -> tuple[SlotConfig, ...]:
        """Its slots in our words, whatever its scheduler calls them."""
        return () if self.slot_config is None else self.slot_config.slots()

    def __getattr__(self, name: str) -> Any:
        slot_config = self.__dict__.get("slot_config")
        if name.startswith("_") or slot_config is None or name not in settings(type(slot_config)):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(slot_config, name)


@dataclass(frozen=True, kw_only=True)
class MainLoopConfig:
    interval_seconds: float = setting(
        number(positive=True), 1,
        "pause between passes of a worker with nothing to do (doorbells cut it short)")
    poll_interval_seconds: float = setting(
        number(positive=True), 0.25,
        "pause between two `pueue status` calls of the poller (one call per pass, whatever the number of cases)")
    running_case_timeout_hours: float = setting(
        number(positive=True), 24,
        "a task running longer than this, measured on the HPC's clock from its start there, is failed "
        "(`timed_out`) and stopped. On Slurm each job's `--time` is this plus `kill_grace_seconds` plus 10 "
        "minutes, so our own timeout acts first")
    kill_grace_seconds: float = setting(number(), 30, "a task we stop gets SIGTERM, then SIGKILL after this long")
    stuck_after_minutes: float = setting(number(positive=True), 60, "no change for this long flags a case for review")
    max_attempts: int = setting(
        number(minimum=1, integer=True), 5,
        "failures of the case itself retried up to this many attempts (an unreachable HPC or a pueued that is "
        "down never uses one up)")
    backoff_base_seconds: float = setting(
        number(), 30, "retry delay `backoff_base_seconds·2^(attempt-1)`, capped at `backoff_cap_seconds`")
    backoff_cap_seconds: float = setting(number(), 900, "the longest retry delay")
    lease_seconds: float = setting(
        number(positive=True), 120,
        "claim lease (renewed during uploads); more than every host's `command_timeout_seconds`")


@dataclass(frozen=True, kw_only=True)
class SchedulingConfig:
    max_wait_minutes: float = setting(
        number(positive=True), 60,
        "a normal case that has waited longer than this is claimed like an urgent one (no starvation)")

    @property
    def max_wait_seconds(self) -> float:
        """A normal case waiting longer than this is claimed like an urgent one."""
        return self.max_wait_minutes * 60


@dataclass(frozen=True, kw_only=True)
class ResultsConfig:
    deliver_to: Path | None = setting(
        optional(local_path), None,
        "folder (e.g. the TPS import share) that receives each completed case's result files as "
        "`<case name>/…`, whole; needs `hpc.result_files`; must be outside the drop folder and the spool")
    checksums: bool = setting(
        flag, True, "check every delivered copy against the sha256 recorded when the results were fetched "
                    "(false: sizes only). The record itself (size and sha256 of every fetched file) is always kept")
    retry_seconds: float = setting(
        number(positive=True), 60,
        "a failed delivery, or a share recorded as not answering or not mounted, is tried again after this long "
        "(for as long as it takes); also the lease of a delivery in hand (renewed while its copy is alive)")
    share_timeout_seconds: float = setting(
        number(positive=True), 30,
        "every operation on `deliver_to` runs in a child process; one that shows no sign of life (a file or 1 MiB "
        "copied, a check done) for this long is killed and abandoned, and the share recorded as not answering")
    expect_mount: bool = setting(
        flag, True, "deliver only when `deliver_to` is a mount point (`os.path.ismount`), so an unmounted share is "
                    "never filled underneath its mount point; `false` for a plain local folder")
    share_marker: str | None = setting(
        optional(share_marker), None,
        "a file name (e.g. `.mqic-share`) the operator created on the share: deliver only when "
        "`deliver_to/<marker>` exists (instead of the mount-point check; for a `deliver_to` below a share's "
        "mount point)")


@dataclass(frozen=True, kw_only=True)
class RetentionConfig:
    remote_days: float | None = setting(
        optional(number(positive=True)), None,
        "remove a case's folder on the HPC this many days after it ended, under the rules of \"Clean-up\"; needs "
        "`hpc.result_files`; fractions allowed (`0.5` = 12 h)", shown="none (keep)")
    local_days: float | None = setting(
        optional(number(positive=True)), None,
        "remove a completed case's `spool/done` folder this many days after completion (the database row "
        "stays); fractions allowed", shown="none (keep)")


@dataclass(frozen=True, kw_only=True)
class NotifyConfig:
    command: tuple[str, ...] = setting(
        argument_list, None, "list of arguments (no shell) run with the event as JSON on standard input, see "
                             "\"Notices\"")
    events: tuple[str, ...] = setting(notify_events, list(NOTIFY_EVENTS), "which events are sent")
    timeout_seconds: float = setting(
        number(positive=True), 10,
        "a notifier still running after this long is killed (with what it started) and counted as failed")
    unreachable_after_minutes: float = setting(
        number(positive=True), 10,
        "one notice per host once it has been unreachable this long, one when it answers again; fractions "
        "allowed (`0.5` = 30 s)")
    max_attempts: int = setting(number(minimum=1, integer=True), 3, "a failed notice is run at most this many times")
    retry_seconds: float = setting(number(positive=True), 60, "a failed notice is retried after this long")


@dataclass(frozen=True, kw_only=True)
class DatabaseConfig:
    path: Path = setting(local_path, "database/mqi_communicator.db", "SQLite state")


@dataclass(frozen=True, kw_only=True)
class SpoolConfig:
    path: Path = setting(local_path, "spool", "stage folders")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    file: Path = setting(local_path, "logs/communicator_local.log", "readable rotating log")
    level: str = setting(choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", "lowest level logged")
    max_bytes: int = setting(number(minimum=1024, integer=True), 10 * 1024 * 1024,
                             "size at which the log file is rotated", shown="10485760 (10 MiB)")
    backup_count: int = setting(number(integer=True), 5, "rotated log files kept")
    timezone: str = setting(time_zone, "Asia/Seoul", "timezone of every timestamp")
    json_stdout: bool = setting(flag, True, "JSON lines on stdout (captured by supervisord)")


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    host: str = setting(text, "127.0.0.1", "address of the Prometheus exporter")
    port: int = setting(number(minimum=1, integer=True), 8000, "port of the Prometheus exporter")


@dataclass(frozen=True, kw_only=True)
class HealthConfig:
    unhealthy_after_seconds: float = setting(
        number(positive=True), 300, "heartbeat age that makes a worker stale")


@dataclass(frozen=True, kw_only=True)
class WebConfig:
    """The web dashboard (``python -m console.web.server``): where it listens and whether it may act."""
    listen: str = setting(
        listen_address, "127.0.0.1:8080",
        "where the web dashboard listens (`HOST:PORT`, `[::1]:PORT`; port 0 picks a free one, for tests)")
    actions: bool = setting(flag, False, "operator actions from the browser; true needs `web.token_file`")
    token_file: Path | None = setting(
        optional(local_path), None,
        "file holding the operators' token (at least 16 characters), mode 0600 and ours, else the program "
        "refuses to start; never put the token itself in config.yaml")
    allowed_hosts: tuple[str, ...] = setting(
        host_names, [],
        "names by which browsers reach the page besides the listen address and `localhost` (e.g. the reverse "
        "proxy's `mqic.clinic.local`, or the workstation's address when `web.listen` is `0.0.0.0`); a request "
        "whose `Host` is none of them is refused, pages included (DNS rebinding)")
    refresh_seconds: float = setting(number(positive=True), 2, "how often an open page fetches its live parts")
    cache_seconds: float = setting(number(minimum=0), 1, "one database read serves every browser for this long")

    @property
    def host(self) -> str:
        match = LISTEN.match(self.listen)
        return match["v6"] or match["host"]

    @property
    def port(self) -> int:
        return int(LISTEN.match(self.listen)["port"])

    @property
    def loopback(self) -> bool:
        """True when only this machine can reach the page (127.0.0.0/8, ::1, localhost)."""
        return self.host == "localhost" or self.host == "::1" or self.host.startswith("127.")


@dataclass(frozen=True, kw_only=True)
class GpusConfig:
    """nvidia-smi telemetry on the hosts whose GPUs the login session sees (see ``shared.gpus``)."""
    enabled: bool = setting(
        flag, True, "nvidia-smi telemetry on the pueue hosts (see \"The GPUs themselves\"); `false`: no call, and "
                    "nothing read earlier holds a seat back")
    interval_seconds: float = setting(number(minimum=0.5), 10, "at most one remote call per host this often (≥ 0.5)")
    command: tuple[str, ...] = setting(
        command_line, "nvidia-smi", "command line of nvidia-smi on the HPC (e.g. `/usr/bin/nvidia-smi`); run with the "
                               "two `--query-…` options")
    idle_percent: float = setting(number(positive=True), 5, "a GPU under this utilization counts as idle")
    idle_minutes: float = setting(
        number(positive=True), 10,
        "a running case whose GPU stayed idle this long (HPC clock) is flagged for review, \"GPU idle while "
        "running\"; never failed")
    foreign_memory_mb: float = setting(
        number(), 100, "a process that is not one of our cases and holds more GPU memory than this is \"someone "
                       "else's process\" (unknown memory counts)")
    avoid_foreign: bool = setting(
        flag, False, "`true`: a GPU with someone else's process gets no new case until it is free again; a case "
                     "already on it keeps its seat")


ROOT_DIR = Setting(root_dir, None, "the folder relative paths are taken from",
                   shown="the folder above the config file's folder")


@dataclass(frozen=True, kw_only=True)
class Config:
    root_dir: Path
    source: Path
    scanner: ScannerConfig
    hosts: tuple[HostConfig, ...]
    main_loop: MainLoopConfig
    database: DatabaseConfig
    spool: SpoolConfig
    logging: LoggingConfig
    metrics: MetricsConfig
    health: HealthConfig
    scheduling: SchedulingConfig
    results: ResultsConfig
    retention: RetentionConfig
    notify: NotifyConfig
    web: WebConfig
    gpus: GpusConfig

    @property
    def database_path(self) -> Path:
        return self.database.path

    @property
    def spool_path(self) -> Path:
        return self.spool.path

    @property
    def unhealthy_after_seconds(self) -> float:
        return self.health.unhealthy_after_seconds

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


# The config holds the sections the schedulers declare too, each under its name (``config.<name>``).
Config = joined(Config, fields=SCHEDULER_SECTIONS.items())


# -- reading the file ----------------------------------------------------------------------------

PLAIN_SECTIONS = {"main_loop": MainLoopConfig, "database": DatabaseConfig, "spool": SpoolConfig,
                  "logging": LoggingConfig, "metrics": MetricsConfig, "health": HealthConfig,
                  "scheduling": SchedulingConfig, "results": ResultsConfig, "retention": RetentionConfig,
                  "notify": NotifyConfig, "web": WebConfig, "gpus": GpusConfig}
# The sections of the schedulers, each entry's slot section then its own: they come after ``hosts``.
SCHEDULER_SECTION_NAMES = tuple(dict.fromkeys(name for entry in SCHEDULERS
                                              for name in (entry.slot_keys.section, *entry.sections)))
SECTIONS = ("root_dir", "scanner", "hpc", "hosts", *SCHEDULER_SECTION_NAMES, *PLAIN_SECTIONS)


def _refuse_secrets(data: Any, problems: Problems, prefix: str = "") -> None:
    """Record every key that looks like a password, at any depth (``hosts`` entries too)."""
    if isinstance(data, list):
        for index, item in enumerate(data):
            _refuse_secrets(item, problems, f"{prefix[:-1]}[{index}].")
    elif isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}{key}"
            if _secret(str(key)):
                problems.add(name, "passwords and passphrases are never accepted in the config; use key "
                                   "authentication (hpc.identity_file) with ssh-agent")
            else:
                _refuse_secrets(value, problems, f"{name}.")


def _secret(key: str) -> bool:
    return SECRET_KEY.search(key) is not None


def _first_key(keys: SlotKeys) -> str:
    """The key that names a host's slots (``groups``, ``partitions``)."""
    return next(iter(settings(keys.keys)))


def _alone(keys: SlotKeys) -> bool:
    """True when the section of ``keys`` holds nothing else (no scheduler declares it as a section)."""
    return keys.section not in SCHEDULER_SECTIONS


def _owners(keys: SlotKeys) -> str:
    return " or ".join(entry.name for entry in SCHEDULERS if entry.slot_keys == keys)


def _unused_slot_keys(keys: SlotKeys, section: Section, why: str | None) -> None:
    """The slot keys of ``keys`` in ``section``, which this config does not use: record ``why`` for each
    one given (for the section, when it holds them alone); ``why`` None: record nothing."""
    names = list(section.data) if _alone(keys) else list(settings(keys.keys))
    section.used.update(names)
    given = [name for name in names if name in section.data]
    if why is None or not given:
        return
    if _alone(keys):
        section.problems.add(section.name, why)
    else:
        for name in given:
            section.problem(name, why)


def _host(name: str, s: Section) -> HostConfig:
    """A ``hosts`` entry: its ssh and command keys, and its slots as its backend reads them.

    Each host names its own slots: a key of named entries (its groups, its partitions) has no
    default here.
    """
    hpc = read(HpcConfig, s)
    if hpc.backend is BAD:  # its problem is recorded; the slots cannot be told apart
        s.used.update(key for keys in SLOT_KEYS for key in settings(keys.keys))
        return HostConfig(name=name, hpc=hpc)
    keys = scheduler_entry(hpc.backend).slot_keys
    named = {key: None for key, declared in settings(keys.keys).items() if isinstance(declared.kind, Entries)}
    return HostConfig(name=name, hpc=hpc, slot_config=read(keys.keys, s, defaults=named))


def _single_host(sections: dict[str, Section]) -> HostConfig:
    """The one host of a config without ``hosts:``: ``hpc``, with its slots from its backend's section."""
    hpc_section = sections["hpc"]
    name = hpc_section.get("name", HOST_NAME)
    hpc = read(HpcConfig, hpc_section)
    chosen = None if hpc.backend is BAD else scheduler_entry(hpc.backend).slot_keys
    for keys in SLOT_KEYS:
        if keys == chosen:
            continue
        if chosen is None:  # its problem is recorded; the slots cannot be told apart
            why = None
        elif _alone(keys):
            why = f"given, but hpc.backend is {hpc.backend!r} (set hpc.backend: {_owners(keys)} to use it)"
        else:
            why = f"not used with hpc.backend {hpc.backend}: the slots are {chosen.section}.{_first_key(chosen)}"
        _unused_slot_keys(keys, sections[keys.section], why)
    if chosen is None:
        return HostConfig(name=name, hpc=hpc)
    return HostConfig(name=name, hpc=hpc, slot_config=read(chosen.keys, sections[chosen.section]))


def _hosts(raw: Any, sections: dict[str, Section]) -> tuple[HostConfig, ...]:
    """The ``hosts:`` list; each entry is ``hpc:`` (the defaults) overridden by the entry's own keys."""
    defaults = sections["hpc"]
    defaults.used.update(defaults.data)  # the hosts' defaults, checked in each host
    for keys in SLOT_KEYS:
        _unused_slot_keys(keys, sections[keys.section], f"not used with hosts: give each {keys.noun} host its "
                                                        f"{' and '.join(settings(keys.keys))}")
    try:
        entries = HOSTS.kind(raw)
    except Invalid as exc:
        defaults.problems.add("hosts", str(exc))
        return ()
    hosts: list[HostConfig] = []
    for index, entry in enumerate(entries):
        host = _host_entry(index, entry, defaults, [h.name for h in hosts])
        if host is not None:
            hosts.append(host)
    return tuple(hosts)


def _host_entry(index: int, entry: Any, defaults: Section, taken: list[str]) -> HostConfig | None:
    """One ``hosts`` entry, or None when it has no usable name (its problem recorded)."""
    problems = defaults.problems
    if not isinstance(entry, dict):
        problems.add(f"hosts[{index}]", f"got {entry!r}, expected a mapping with name, host, groups ...")
        return None
    try:
        name = HOST_NAME.kind(entry.get("name"))
    except Invalid as exc:
        problems.add(f"hosts[{index}].name", str(exc))
        return None
    if name in taken:
        problems.add(f"hosts[{index}].name", f"got {name!r}, expected a name no other host has")
        return None
    s = Section(f"hosts.{name}", {**defaults.data, **entry}, problems, defaults.root)
    s.used.add("name")
    host = _host(name, s)
    s.finish(ignore=_secret)
    return host


# -- checks across keys (each skips a value whose own problem was recorded) -----------------------

def _check_markers(config: Config) -> Iterator[tuple[str, str]]:
    ready, urgent = config.scanner.ready_marker, config.scanner.urgent_marker
    if known(ready, urgent) and urgent is not None and urgent == ready:
        yield "scanner.urgent_marker", (f"got {urgent!r}, expected a name other than scanner.ready_marker (a ready "
                                        f"case would always be urgent)")


def _check_web_token(config: Config) -> Iterator[tuple[str, str]]:
    if config.web.actions is True and config.web.token_file is None:
        yield "web.actions", ("got true, expected web.token_file too (the file holding the operators' token, mode "
                              "0600): actions from the browser always need the token")


def _check_lease(config: Config) -> Iterator[tuple[str, str]]:
    lease = config.main_loop.lease_seconds
    for host in config.hosts:
        timeout = host.hpc.command_timeout_seconds
        if known(lease, timeout) and lease <= timeout:
            yield "main_loop.lease_seconds", (f"got {lease!r}, expected more than the command_timeout_seconds of "
                                              f"host {host.name} ({timeout!r}), or a slow submit could outlive its "
                                              f"claim")


def _check_delivery(config: Config) -> Iterator[tuple[str, str]]:
    target = config.results.deliver_to
    if target is None or target is BAD:
        return
    for host in config.hosts:
        if host.hpc.result_files == ():
            yield "results.deliver_to", (f"got {str(target)!r}, expected result_files of host {host.name} to name "
                                         f"the result files to deliver (it is empty)")
    # Lexical only: resolving would stat the share, and a hung share would hang every program at start.
    target = Path(os.path.normpath(target))
    for key, folder in (("scanner.watch_path", config.scanner.watch_path), ("spool.path", config.spool_path)):
        if folder is BAD:
            continue
        folder = Path(os.path.normpath(folder))
        if target == folder or folder in target.parents:
            yield "results.deliver_to", f"got {str(target)!r}, expected a folder outside {key} ({folder})"


def _check_retention(config: Config) -> Iterator[tuple[str, str]]:
    days = config.retention.remote_days
    if days is None or days is BAD:
        return
    for host in config.hosts:
        if host.hpc.result_files == ():
            yield "retention.remote_days", (f"got {days!r}, expected result_files of host {host.name} to name the "
                                            f"result files (it is empty, so the HPC folder holds the only copy)")


CHECKS = (_check_markers, _check_web_token, _check_lease, _check_delivery, _check_retention)


def parse_config(data: Any, source: Path) -> Config:
    """Validate the parsed YAML ``data`` read from ``source``; raise one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: got {type(data).__name__}, expected a mapping of sections")
    problems = Problems()
    _refuse_secrets(data, problems)
    for key in data:
        if key not in SECTIONS and not _secret(str(key)):
            problems.add(str(key), f"unknown section ({did_you_mean(str(key), SECTIONS)}known: {', '.join(SECTIONS)})")
    root = ROOT_DIR.kind(data.get("root_dir") or source.resolve().parent.parent)
    sections = {name: Section(name, data.get(name), problems, root)
                for name in SECTIONS if name not in ("root_dir", "hosts")}
    scanner = read(ScannerConfig, sections["scanner"])  # problems are listed in the order of the sections
    hosts = _hosts(data["hosts"], sections) if "hosts" in data else (_single_host(sections),)
    plain = {name: read(cls, sections[name]) for name, cls in {**SCHEDULER_SECTIONS, **PLAIN_SECTIONS}.items()}
    for section in sections.values():
        section.finish(ignore=_secret)
    config = Config(root_dir=root, source=source, scanner=scanner, hosts=hosts, **plain)
    for check in CHECKS:
        for key, problem in check(config):
            problems.add(key, problem)
    problems.raise_if_any()
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the YAML file at ``path``; raise ConfigError naming every problem (one per line)."""
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
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None  # one line
    return parse_config(data, source)


def default_config_path() -> str:
    """``$MQIC_CONFIG`` when set, else ``config/config.yaml``."""
    return os.environ.get("MQIC_CONFIG") or DEFAULT_CONFIG


# -- README's configuration table ------------------------------------------------------------------

TABLE_BEGIN = "<!-- config-table: generated from the config key declarations by scripts/config-table.py -->"
TABLE_END = "<!-- /config-table -->"


def readme_with_config_table(readme: str) -> str:
    """README's text with its configuration table (between TABLE_BEGIN and TABLE_END) made from the declarations."""
    return replace_between(readme, TABLE_BEGIN, TABLE_END, config_table())


def config_table() -> str:
    """README's configuration table (markdown): every key declared above, in README's order."""
    return markdown_table([
        ("root_dir", ROOT_DIR), *rows("scanner", ScannerConfig),
        ("hpc.name", HOST_NAME), *rows("hpc", HpcConfig), ("hosts", HOSTS),
        *[row for name in SCHEDULER_SECTION_NAMES for row in _scheduler_rows(name)],
        *[row for name, cls in PLAIN_SECTIONS.items() for row in rows(name, cls)],
    ])


def _scheduler_rows(name: str) -> list[tuple[str, Setting]]:
    """The rows of a scheduler's section: the slot keys read from it, then the keys it declares."""
    slot_rows = [row for keys in SLOT_KEYS if keys.section == name for row in rows(name, keys.keys)]
    return slot_rows + (rows(name, SCHEDULER_SECTIONS[name]) if name in SCHEDULER_SECTIONS else [])
