"""The sandbox HPC: a real sshd on 127.0.0.1 plus the pueue stand-in (or a real single-node
Slurm), and a config pointing at it.

``up(root)`` starts both (idempotent) and writes ``root/config.yaml``; ``up(root, slurm=True)``
starts ``sandbox.slurm.SandboxSlurm`` in ``root/slurm`` instead of the stand-in and writes a
config with ``hpc.backend: slurm``; ``down(root)`` stops whatever runs. Used by
``mqic sandbox up|down``, the end-to-end tests and the benchmarks.
"""
from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from sandbox.pueue_standin import write_wrappers
from sandbox.slurm import CLIENT_COMMANDS, SandboxSlurm, SandboxSlurmError
from sandbox.sshd import SandboxSshd, SshEndpoint

FAKE_MOQUI = Path(__file__).resolve().parent / "fake_moqui"
DEFAULT_GROUPS = {"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}}
# Two slots on the sandbox cluster's one node with its two (fake) GPUs.
DEFAULT_PARTITIONS = {"gpu_a": {"partition": "gpu", "gres": "gpu:1"},
                      "gpu_b": {"partition": "gpu", "gres": "gpu:1"}}


@dataclass(frozen=True)
class Sandbox:
    root: Path
    endpoint: SshEndpoint
    bin: dict[str, Path]
    config_path: Path

    @property
    def pueue(self) -> Path:
        return self.bin["pueue"]

    def ctl(self, *args: str) -> str:
        """Run a stand-in control command (format, restart, stop, start, garbage)."""
        return subprocess.run([str(self.bin["pueue-standin-ctl"]), *args], check=True,
                              capture_output=True, text=True, timeout=60).stdout

    def pueue_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.pueue), *args], capture_output=True, text=True, timeout=60,
                              check=check)


def remote_command(python: str = sys.executable) -> str:
    py = shlex.quote(python)
    return (f"{py} {shlex.quote(str(FAKE_MOQUI / 'interpreter.py'))} && "
            f"{py} {shlex.quote(str(FAKE_MOQUI / 'moquisim.py'))}")


def config_data(root: Path, endpoint: SshEndpoint, pueue_bin: Path | None, *, project_root: Path,
                groups: dict | None = None, slurm_bin: Path | None = None, partitions: dict | None = None,
                **sections: dict) -> dict:
    """A complete config for the sandbox; ``sections`` override keys per section.

    With ``slurm_bin`` (the sandbox cluster's wrappers) the backend is Slurm with
    ``partitions`` as its slots, else pueue (``pueue_bin``) with ``groups``.
    """
    data = {
        "root_dir": str(project_root),
        "scanner": {"watch_path": str(root / "incoming"), "quiescence_period_seconds": 2,
                    "ready_marker": "_CASE_READY", "rescan_interval_seconds": 5},
        "hpc": {"host": endpoint.host, "port": endpoint.port, "user": endpoint.user,
                "identity_file": str(endpoint.identity_file),
                "known_hosts_file": str(endpoint.known_hosts_file),
                "remote_base_dir": str(root / "remote"),
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
    if slurm_bin is not None:
        data["hpc"]["backend"] = "slurm"
        data["slurm"] = {"bin_dir": str(slurm_bin), "partitions": partitions or DEFAULT_PARTITIONS}
    else:
        data["hpc"]["pueue_command"] = shlex.quote(str(pueue_bin))
        data["pueue"]["groups"] = groups or DEFAULT_GROUPS
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def up(root: Path, *, project_root: Path | None = None, groups: dict | None = None,
       pueue_format: str = "v4", slurm: bool = False, partitions: dict | None = None,
       **sections: dict) -> Sandbox:
    """Start (or re-attach to) the sandbox HPC under ``root`` and write its config.

    ``slurm``: a real single-node Slurm (needs root and its Debian packages; raises
    SandboxSlurmError otherwise) instead of the pueue stand-in.
    """
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("incoming", "remote", "logs"):
        (root / sub).mkdir(exist_ok=True)
    endpoint = SandboxSshd(root / "sshd").start()
    project = project_root or Path(__file__).resolve().parents[1]
    if slurm:
        bin_dir = start_slurm(root / "slurm")
        wrappers = {name: bin_dir / name for name in CLIENT_COMMANDS}
        data = config_data(root, endpoint, None, slurm_bin=bin_dir, partitions=partitions,
                           project_root=project, **sections)
    else:
        wrappers = start_standin(root, pueue_format)
        data = config_data(root, endpoint, wrappers["pueue"], groups=groups, project_root=project, **sections)
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return Sandbox(root=root, endpoint=endpoint, bin=wrappers, config_path=config_path)


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
    subprocess.run([str(wrappers["pueue-standin-ctl"]), "format", pueue_format], check=True,
                   capture_output=True, timeout=30)
    subprocess.run([str(wrappers["pueued"]), "-d"], check=True, capture_output=True, timeout=30)
    return wrappers


def down(root: Path) -> None:
    """Stop the sandbox's pueue daemon or Slurm (killing their tasks) and sshd; keep the files."""
    root = root.resolve()
    ctl = root / "bin" / "pueue-standin-ctl"
    if ctl.exists():
        subprocess.run([str(ctl), "stop"], capture_output=True, timeout=30)
    if (root / "slurm" / "state.json").exists():
        SandboxSlurm.from_state(root / "slurm").stop()
    if (root / "sshd" / "state.json").exists():
        SandboxSshd.from_state(root / "sshd").stop()
