"""The baseline: the original tool's naive way, re-implemented faithfully so we can time it.

One loop; after every pass it sleeps a fixed 10 s. A pass:

1. scans the drop folder: a folder holding the ready marker is a new case (kept in memory);
2. for every running case, downloads the whole ``pueue status --json`` over its own fresh
   ssh connection (one status download per running case) and looks its task up; a finished
   task frees its GPU group, and a successful one has its results fetched with ``scp -r``;
3. for every free GPU group and waiting case: ``scp -r`` of the case folder, then
   ``pueue add`` (with ``CUDA_VISIBLE_DEVICES``) over another fresh connection.

Every command opens a FRESH ssh connection (``-o ControlMaster=no -o ControlPath=none``):
key exchange and authentication each time. No temporary name, no verification, no
retries and no database: this code exists only to be timed against ours.

Polling before submitting within a pass is the order most favourable to the baseline (a
GPU freed in a pass is reused in the same pass), so the ratios we report are, if anything,
flattering to it.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sandbox.sshd import SshEndpoint

NAIVE_INTERVAL_SECONDS = 10.0
LABEL_PREFIX = "naive_"


class NaiveCommandFailed(Exception):
    pass


@dataclass
class NaiveCase:
    name: str
    path: Path
    seen_at: float
    group: str | None = None
    task_id: int | None = None
    remote_dir: str | None = None
    submitted_at: float | None = None
    done_at: float | None = None
    result: str | None = None


@dataclass
class NaiveCommunicator:
    """The original loop against one HPC endpoint; ``groups`` maps a pueue group to its GPU."""

    endpoint: SshEndpoint
    pueue_command: str
    watch: Path
    remote_base: str
    groups: dict[str, str | None]
    remote_command: str
    marker: str = "_CASE_READY"
    interval: float = NAIVE_INTERVAL_SECONDS
    cases: dict[str, NaiveCase] = field(default_factory=dict)
    busy: dict[str, str] = field(default_factory=dict)  # group -> case name
    commands: int = 0
    passes: int = 0

    # -- one fresh connection per command --------------------------------------------------
    def _options(self) -> list[str]:
        e = self.endpoint
        return ["-i", str(e.identity_file), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={e.known_hosts_file}", "-o", "StrictHostKeyChecking=yes",
                "-o", "ControlMaster=no", "-o", "ControlPath=none"]

    def ssh(self, command: str) -> str:
        e = self.endpoint
        argv = ["ssh", "-p", str(e.port), *self._options(), f"{e.user}@{e.host}", command]
        return self._run(argv)

    def scp(self, source: str, target: str) -> str:
        argv = ["scp", "-P", str(self.endpoint.port), *self._options(), "-q", "-r", source, target]
        return self._run(argv)

    def _run(self, argv: list[str]) -> str:
        self.commands += 1
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise NaiveCommandFailed(f"{argv[0]} exit {done.returncode}: {done.stderr.strip()[-300:]}")
        return done.stdout

    @property
    def host(self) -> str:
        return f"{self.endpoint.user}@{self.endpoint.host}"

    # -- setup (not timed) ------------------------------------------------------------------------
    def create_groups(self) -> None:
        self.ssh(f"mkdir -p {shlex.quote(self.remote_base)}")
        for group in self.groups:
            try:
                self.ssh(f"{self.pueue_command} group add {shlex.quote(group)} -p 1")
            except NaiveCommandFailed as exc:
                if "already exists" not in str(exc):
                    raise

    # -- the loop -------------------------------------------------------------------------------------
    def run_until(self, expected: int, timeout: float, on_pass: Callable[[], None] | None = None) -> None:
        """Run passes (sleeping ``interval`` after each) until ``expected`` cases are done."""
        deadline = time.monotonic() + timeout
        while True:
            self.one_pass()
            if on_pass:
                on_pass()
            if sum(1 for c in self.cases.values() if c.done_at) >= expected:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"naive loop: {expected} cases not done within {timeout:g}s")
            time.sleep(self.interval)

    def one_pass(self) -> None:
        self.passes += 1
        self.scan()
        self.poll()
        self.submit()

    def scan(self) -> None:
        for item in sorted(self.watch.iterdir()):
            if item.name not in self.cases and (item / self.marker).is_file():
                self.cases[item.name] = NaiveCase(item.name, item, seen_at=time.time())

    def poll(self) -> None:
        for group, name in list(self.busy.items()):
            case = self.cases[name]
            status = json.loads(self.ssh(f"{self.pueue_command} status --json"))
            task = status["tasks"].get(str(case.task_id))
            if task is None or not _is_done(task["status"]):
                continue
            case.result = _result(task["status"])
            if case.result == "Success":
                try:
                    self.scp(f"{self.host}:{case.remote_dir}/output", str(case.path))
                except NaiveCommandFailed:
                    pass  # the original logged and went on
            case.done_at = time.time()
            del self.busy[group]

    def submit(self) -> None:
        waiting = [c for c in self.cases.values() if c.submitted_at is None]
        for group, gpu in self.groups.items():
            if group in self.busy or not waiting:
                continue
            case = waiting.pop(0)
            case.remote_dir = f"{self.remote_base}/{case.name}"
            self.scp(str(case.path), f"{self.host}:{case.remote_dir}")
            env = f"env CUDA_VISIBLE_DEVICES={gpu} " if gpu is not None else ""
            out = self.ssh(f"{env}{self.pueue_command} add --print-task-id --group {shlex.quote(group)}"
                           f" --label {LABEL_PREFIX}{shlex.quote(case.name)}"
                           f" --working-directory {shlex.quote(case.remote_dir)}"
                           f" -- {shlex.quote(self.remote_command)}")
            case.task_id = int(out.strip().splitlines()[-1])
            case.group, case.submitted_at = group, time.time()
            self.busy[group] = case.name


def _is_done(status: object) -> bool:
    return status == "Done" or (isinstance(status, dict) and "Done" in status)


def _result(status: object) -> str:
    """"Success", "Failed", ... from a v3 or v4 Done status."""
    payload = status["Done"] if isinstance(status, dict) else status
    if isinstance(payload, dict) and "result" in payload:
        payload = payload["result"]
    return payload if isinstance(payload, str) else next(iter(payload))


def for_workspace(ws, interval: float = NAIVE_INTERVAL_SECONDS) -> NaiveCommunicator:
    """A naive communicator aimed at a bench ``Workspace``'s sandbox, with its groups and command."""
    config = ws.config
    return NaiveCommunicator(
        endpoint=ws.sandbox.endpoint, pueue_command=shlex.join(config.hosts[0].hpc.pueue_command),
        watch=config.scanner.watch_path, remote_base=f"{config.hosts[0].hpc.remote_base_dir}/naive",
        groups={g.name: g.gpu for g in config.hosts[0].groups}, remote_command=config.hosts[0].hpc.remote_command,
        marker=config.scanner.ready_marker or "_CASE_READY", interval=interval)
