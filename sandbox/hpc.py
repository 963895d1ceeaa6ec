"""The sandbox HPC: a real sshd on 127.0.0.1 plus the pueue stand-in (or a real single-node
Slurm), and a config pointing at it; optionally a second host beside it.

``up(root)`` starts both (idempotent) and writes ``root/config.yaml``; ``up(root, slurm=True)``
starts ``sandbox.slurm.SandboxSlurm`` in ``root/slurm`` instead of the stand-in and writes a
config with ``hpc.backend: slurm``. ``up(root, second_host="pueue"|"slurm")`` adds a second
host with its own sshd (own port, keys and known_hosts) in ``root/hosts/<name>/`` and its own
pueue stand-in home or Slurm cluster there, so stopping one host's sshd takes down only that
host; the config then has a ``hosts:`` list (``gpu1`` and ``gpu2``, or a pueue host and
``cluster``), each with its own remote folder, and ``hpc:`` gives their common defaults.
``down(root)`` stops whatever runs. Used by ``mqic sandbox up|down``, the end-to-end tests
and the benchmarks.

``up(root, ..., login_delays={"gpu2": 3.0})`` makes a host slow: every remote command,
transfer or shell on it first waits that many seconds in its login path (``sandbox.sshd``'s
``login_delay``; ``host.sshd.set_login_delay(S)`` changes it while it runs), like a busy
login node. The host of a one-host sandbox is named ``hpc``.
"""
from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from sandbox import nvidia_smi
from sandbox.pueue_standin import write_wrappers
from sandbox.slurm import CLIENT_COMMANDS, SandboxSlurm, SandboxSlurmError
from sandbox.sshd import SandboxSshd, SshEndpoint

FAKE_MOQUI = Path(__file__).resolve().parent / "fake_moqui"
DEFAULT_GROUPS = {"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}}
# Two slots on the sandbox cluster's one node with its two (fake) GPUs.
DEFAULT_PARTITIONS = {"gpu_a": {"partition": "gpu", "gres": "gpu:1"},
                      "gpu_b": {"partition": "gpu", "gres": "gpu:1"}}
HOST_KINDS = ("pueue", "slurm")
GPUS_DIR = "gpus"  # root/gpus (a host's folder/gpus): the nvidia-smi stand-in's board, beside remote/
HOSTS_DIR = "hosts"  # root/hosts/<name>/: a second host's sshd, pueue home or cluster, remote folder


@dataclass(frozen=True)
class SandboxHost:
    """One sandbox host: its sshd (in ``folder/sshd``), its scheduler and its remote folder."""
    name: str
    backend: str  # "pueue" or "slurm"
    folder: Path
    endpoint: SshEndpoint
    bin: dict[str, Path]  # the pueue stand-in's wrappers, or the cluster's client wrappers
    remote_base: Path

    @property
    def sshd(self) -> SandboxSshd:
        """This host's sshd (stop it for an outage of this host alone; ``start()`` heals it)."""
        return SandboxSshd.from_state(self.folder / "sshd")

    def ctl(self, *args: str) -> str:
        """Run a stand-in control command (format, restart, stop, start, garbage)."""
        return subprocess.run([str(self.bin["pueue-standin-ctl"]), *args], check=True,
                              capture_output=True, text=True, timeout=60).stdout

    def pueue_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin["pueue"]), *args], capture_output=True, text=True, timeout=60,
                              check=check)

    def gpus(self, *args: str) -> None:
        """Steer this host's fake GPUs (``sandbox.nvidia_smi`` control: idle on, lost 1, foreign 0 900, ...)."""
        if nvidia_smi.ctl_main([str(self.folder / GPUS_DIR), *args]) != 0:
            raise ValueError(f"bad GPU control command: {args!r}")


@dataclass(frozen=True)
class Sandbox:
    """What ``up`` started: its hosts, first one first, and the config written for them."""
    root: Path
    config_path: Path
    hosts: tuple[SandboxHost, ...]

    @property
    def endpoint(self) -> SshEndpoint:
        return self.hosts[0].endpoint

    @property
    def bin(self) -> dict[str, Path]:
        return self.hosts[0].bin

    @property
    def pueue(self) -> Path:
        return self.bin["pueue"]

    def host(self, name: str) -> SandboxHost:
        return next(host for host in self.hosts if host.name == name)

    def ctl(self, *args: str) -> str:
        """Run a stand-in control command on the first host (format, restart, stop, start, garbage)."""
        return self.hosts[0].ctl(*args)

    def pueue_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.hosts[0].pueue_cli(*args, check=check)

    def gpus(self, *args: str) -> None:
        """Steer the first host's fake GPUs (see ``SandboxHost.gpus``)."""
        self.hosts[0].gpus(*args)


def remote_command(python: str = sys.executable) -> str:
    py = shlex.quote(python)
    return (f"{py} {shlex.quote(str(FAKE_MOQUI / 'interpreter.py'))} && "
            f"{py} {shlex.quote(str(FAKE_MOQUI / 'moquisim.py'))}")


def ssh_settings(endpoint: SshEndpoint) -> dict:
    """The ``hpc`` keys that reach ``endpoint``."""
    return {"host": endpoint.host, "port": endpoint.port, "user": endpoint.user,
            "identity_file": str(endpoint.identity_file), "known_hosts_file": str(endpoint.known_hosts_file)}


def host_entry(name: str, endpoint: SshEndpoint, remote_base: Path, *, pueue_bin: Path | None = None,
               groups: dict | None = None, slurm_bin: Path | None = None, partitions: dict | None = None) -> dict:
    """One entry of a config's ``hosts:`` list: ssh settings, remote folder and slots.

    With ``slurm_bin`` it is a Slurm host (``partitions``), else a pueue host (``pueue_bin``, ``groups``).
    """
    entry = {"name": name, **ssh_settings(endpoint), "remote_base_dir": str(remote_base)}
    if slurm_bin is not None:
        return {**entry, "backend": "slurm", "bin_dir": str(slurm_bin), "partitions": partitions or DEFAULT_PARTITIONS}
    return {**entry, "pueue_command": shlex.quote(str(pueue_bin)), "groups": groups or DEFAULT_GROUPS}


def config_data(root: Path, endpoint: SshEndpoint | None, pueue_bin: Path | None, *, project_root: Path,
                groups: dict | None = None, slurm_bin: Path | None = None, partitions: dict | None = None,
                hosts: list[dict] | None = None, **sections: dict) -> dict:
    """A complete config for the sandbox; ``sections`` override keys per section.

    With ``hosts`` (entries from ``host_entry``) the config has a ``hosts:`` list and
    ``hpc:`` holds only the defaults they share (``endpoint`` and the slot arguments are
    not used). Else one host: with ``slurm_bin`` (the sandbox cluster's wrappers) the
    backend is Slurm with ``partitions`` as its slots, else pueue (``pueue_bin``) with ``groups``.
    """
    data = {
        "root_dir": str(project_root),
        "scanner": {"watch_path": str(root / "incoming"), "quiescence_period_seconds": 2,
                    "ready_marker": "_CASE_READY", "rescan_interval_seconds": 5},
        "hpc": {"remote_base_dir": str(root / "remote"),
                "control_dir": f"/tmp/mqic-sbx-{hashlib.sha1(str(root).encode()).hexdigest()[:10]}",
                "remote_command": remote_command(), "result_files": ["output/*"],
                "connect_timeout_seconds": 5, "command_timeout_seconds": 30},
        "pueue": {"resume_paused_groups": True},
        "main_loop": {"interval_seconds": 0.5, "running_case_timeout_hours": 1,
                      "stuck_after_minutes": 30, "backoff_base_seconds": 2, "backoff_cap_seconds": 30},
        "database": {"path": str(root / "mqi_communicator.db")},
        "spool": {"path": str(root / "spool")},
        "logging": {"file": str(root / "logs" / "communicator_local.log")},
        "metrics": {"port": 8000},
    }
    if hosts is not None:
        del data["hpc"]["remote_base_dir"]  # each host has its own
        sections_before = list(data)[:list(data).index("hpc") + 1]
        data = {**{key: data[key] for key in sections_before}, "hosts": hosts, **data}  # hosts after hpc
    else:
        if endpoint is None:
            raise ValueError("config_data: one host needs its ssh endpoint (or give hosts)")
        data["hpc"] = {**ssh_settings(endpoint), **data["hpc"]}
        if slurm_bin is not None:
            data["hpc"]["backend"] = "slurm"
            data["slurm"] = {"bin_dir": str(slurm_bin), "partitions": partitions or DEFAULT_PARTITIONS}
        else:
            data["hpc"]["pueue_command"] = shlex.quote(str(pueue_bin))
            data["pueue"]["groups"] = groups or DEFAULT_GROUPS
            data["gpus"] = {"command": shlex.quote(str(Path(pueue_bin).parent / "nvidia-smi"))}  # the stand-in's
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def up(root: Path, *, project_root: Path | None = None, groups: dict | None = None,
       pueue_format: str = "v4", slurm: bool = False, partitions: dict | None = None,
       second_host: str | None = None, second_groups: dict | None = None,
       login_delays: dict[str, float] | None = None, **sections: dict) -> Sandbox:
    """Start (or re-attach to) the sandbox HPC under ``root`` and write its config.

    ``slurm``: a real single-node Slurm (needs root and its Debian packages; raises
    SandboxSlurmError otherwise) instead of the pueue stand-in. ``second_host``
    ("pueue" or "slurm"): a second host with its own sshd; the first is then named
    ``gpu1`` (``cluster`` with ``slurm``), the second ``gpu2`` (``cluster`` for Slurm,
    one cluster only) with ``second_groups``; ``partitions`` are the Slurm host's.
    ``login_delays``: {host name: seconds} every login to that host waits first (a slow host).
    """
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("incoming", "remote", "logs"):
        (root / sub).mkdir(exist_ok=True)
    project = project_root or Path(__file__).resolve().parents[1]
    first_kind = "slurm" if slurm else "pueue"
    delays = login_delays or {}
    if second_host is None:
        first = start_host(root, "hpc", first_kind, root, pueue_format=pueue_format, login_delay=delays.get("hpc"))
        data = config_data(root, first.endpoint, first.bin.get("pueue"), project_root=project, groups=groups,
                           slurm_bin=first.bin["sbatch"].parent if slurm else None, partitions=partitions,
                           **sections)
        return _write_config(root, data, (first,))
    if second_host not in HOST_KINDS:
        raise ValueError(f"second_host: got {second_host!r}, expected one of {', '.join(HOST_KINDS)}")
    if slurm and second_host == "slurm":
        raise ValueError("second_host: the sandbox runs one Slurm cluster; make one of the hosts pueue")
    first_name = "cluster" if slurm else "gpu1"
    first = start_host(root, first_name, first_kind, root, pueue_format=pueue_format,
                       login_delay=delays.get(first_name))
    second_name = "cluster" if second_host == "slurm" else "gpu2"
    second = start_host(root, second_name, second_host, root / HOSTS_DIR / second_name, pueue_format=pueue_format,
                        login_delay=delays.get(second_name))
    entries = [_entry(first, groups, partitions), _entry(second, second_groups, partitions)]
    data = config_data(root, None, None, project_root=project, hosts=entries, **sections)
    share_gpu_stand_in(data, (first, second))
    return _write_config(root, data, (first, second))


def share_gpu_stand_in(data: dict, hosts: tuple[SandboxHost, ...]) -> None:
    """``gpus.command`` is one for all hosts: point it at the first pueue host's stand-in and let
    the stand-in answer each ssh session with the board of the host (sshd port) it came in on."""
    pueue_hosts = [host for host in hosts if host.backend == "pueue"]
    if not pueue_hosts:
        return
    nvidia_smi.map_ports(pueue_hosts[0].folder / GPUS_DIR,
                         {host.endpoint.port: host.folder / GPUS_DIR for host in pueue_hosts})
    data.setdefault("gpus", {}).setdefault("command", shlex.quote(str(pueue_hosts[0].bin["nvidia-smi"])))


def _entry(host: SandboxHost, groups: dict | None, partitions: dict | None) -> dict:
    if host.backend == "slurm":
        return host_entry(host.name, host.endpoint, host.remote_base, slurm_bin=host.bin["sbatch"].parent,
                          partitions=partitions)
    return host_entry(host.name, host.endpoint, host.remote_base, pueue_bin=host.bin["pueue"], groups=groups)


def _write_config(root: Path, data: dict, hosts: tuple[SandboxHost, ...]) -> Sandbox:
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return Sandbox(root=root, config_path=config_path, hosts=hosts)


def start_host(root: Path, name: str, backend: str, folder: Path, *, pueue_format: str = "v4",
               login_delay: float | None = None) -> SandboxHost:
    """Start (or re-attach to) one host in ``folder``: its sshd, then its pueue stand-in or Slurm.

    The first host lives in ``root`` itself (``root/sshd``, ``root/bin``, ``root/remote``), as
    it always has; its remote folder is ``folder/remote``. ``login_delay``: a slow host (every
    login waits that many seconds; see ``sandbox.sshd``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "remote").mkdir(exist_ok=True)
    endpoint = SandboxSshd(folder / "sshd", login_delay=login_delay).start()
    if backend == "slurm":
        bin_dir = start_slurm(folder / "slurm")
        wrappers = {command: bin_dir / command for command in CLIENT_COMMANDS}
    else:
        wrappers = start_standin(folder, pueue_format)
    return SandboxHost(name=name, backend=backend, folder=folder, endpoint=endpoint, bin=wrappers,
                       remote_base=folder / "remote")


def start_slurm(root: Path) -> Path:
    """Start (or re-attach to) the sandbox cluster in ``root``; the folder of its client wrappers."""
    cluster = SandboxSlurm(root)
    try:
        return cluster.start().bin_dir
    except SandboxSlurmError:
        cluster.stop()  # a half-started cluster is of no use
        raise


def start_standin(root: Path, pueue_format: str) -> dict[str, Path]:
    """The pueue stand-in's wrappers in ``root/bin``, its daemon started (idempotent)."""
    wrappers = write_wrappers(root / "bin", root / "pueue", sys.executable)
    wrappers["nvidia-smi"] = nvidia_smi.write_wrapper(root / "bin", root / GPUS_DIR)
    subprocess.run([str(wrappers["pueue-standin-ctl"]), "format", pueue_format], check=True,
                   capture_output=True, timeout=30)
    subprocess.run([str(wrappers["pueued"]), "-d"], check=True, capture_output=True, timeout=30)
    return wrappers


def down(root: Path) -> None:
    """Stop every host's pueue daemon or Slurm (killing their tasks) and sshd; keep the files."""
    root = root.resolve()
    hosts_dir = root / HOSTS_DIR
    for folder in [root, *(sorted(hosts_dir.iterdir()) if hosts_dir.is_dir() else [])]:
        stop_host(folder)


def stop_host(folder: Path) -> None:
    """Stop what runs in one host's folder: pueue stand-in daemon, Slurm, sshd."""
    ctl = folder / "bin" / "pueue-standin-ctl"
    if ctl.exists():
        subprocess.run([str(ctl), "stop"], capture_output=True, timeout=30)
    if (folder / "slurm" / "state.json").exists():
        SandboxSlurm.from_state(folder / "slurm").stop()
    if (folder / "sshd" / "state.json").exists():
        SandboxSshd.from_state(folder / "sshd").stop()
