"""The chaos run: a few hundred cases under real supervisord while everything breaks; nothing may be lost.

One command::

    .venv/bin/python bench/chaos.py [--cases N] [--duration SECONDS] [--seed S] [--hosts 1|2] [--scratch DIR]

It starts the sandbox HPC (real sshd + pueue stand-in, ``sandbox.hpc.up``) and supervisord with
``bench/supervisord.chaos.conf`` (one scanner, two submitters, two pollers, two reapers), drops
cases over time (some set to fail, a few that outlast the case timeout) and, for ``--duration``
seconds:

- SIGKILLs random workers (the process alone, or its whole process group with its ssh/scp);
- SIGKILLs workers inside the danger zones, through audit hooks every worker loads from
  ``hooks/sitecustomize.py`` (``bench/chaos_hooks.py``), and kills the owner of a ``submitting``
  case it sees in the database;
- cuts the HPC off: new logins only (the shared ControlMaster connection survives), and whole
  outages that kill every session (the ControlMaster too), one of them longer than the case
  timeout;
- restarts the pueue daemon, makes ``status --json`` print garbage, and kills running tasks the
  way another user would (``pueue kill``): every task killed by a signal we did not send is a
  victim, which must be requeued and end on its own merits;
- stops the pollers, lets another user ``pueue clean`` our finished tasks and add a task of
  their own (which may take an id one of our cases recorded), then starts the pollers again;
- loses the answers of ``pueue add`` after the daemon acted (``pueue-standin-ctl lose-add``),
  once with the task stored only after our ssh gave up.

With ``--hosts 2`` a second sandbox HPC (its own sshd and pueue stand-in) joins as host
``gpu2`` of one config with a ``hosts:`` list (``gpu1`` is the first sandbox, which every
disturbance above still targets), and ``gpu2`` is down for ``--host-down`` seconds (60) while
cases are still being dropped: its sshd stops and every session dies, its ControlMaster too.
Meanwhile gpu1's pueue state is sampled every 0.5 s: the table gives the share of the samples
with cases waiting in which every gpu1 group runs a task of ours.

With ``--share`` every completed case's results are delivered to a real sshfs (FUSE) share
(``bench/chaos_share.py``, its own sshd), which hangs (its sftp-server stopped) for 12 % of the
run from the middle on, and is unmounted for 8 % later (a plain empty folder under its mount
point): 0 lost, 0 misdelivered (every delivered folder holds exactly the fetched files), nothing
written underneath, and no GPU seat stalled by it (a seat that became zombie during a share
episode freed within 15 s).

Then it waits until every case is final and prints a table; exit status 1 on any violation of
``bench.chaos_check.check_final_state`` (lost, run twice, wrongly failed, another user's task
touched, ...). Tests import ``ChaosPlan``, ``run_chaos`` and the checker from here.
"""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/chaos.py` puts bench/, not the repo, on sys.path
    sys.path.insert(0, str(REPO))

from bench.chaos_check import (Expected, Verdict, chain_problems, check_final_state,  # noqa: E402,F401
                               read_starts, recording_starts)
from bench.chaos_hooks import ZONES  # noqa: E402

COMMAND_TIMEOUT_S = 8.0  # hpc.command_timeout_seconds of the chaos config: when our ssh gives up
LEASE_S = 12.0  # main_loop.lease_seconds: when a dead submitter's claim is recovered
LATE_STORE_S = LEASE_S + 2  # a late-stored add lands after our ssh gave up and after the claim's lease
OUR_LABEL = "mqic_case_"
DROP_SHARE = 0.7  # cases are dropped over the first 70 % of the run
FORGETTING_AT = 0.35  # the pollers stop (another user cleans) at 35 % of the run, then the long outage
WAITING_ACTIONS = {"owner kill", "remote kill", "restart", "lose adds",
                   "clean, long outage, reused id", "host down", "share hangs", "share unmounted"}  # they wait for something: each runs in a thread
HOST_NAMES = ("gpu1", "gpu2")  # with --hosts 2; the one host of the one-host run keeps the default name
HOST_KEYS = ("host", "port", "user", "identity_file", "known_hosts_file", "remote_base_dir", "control_dir",
             "pueue_command")  # what the second sandbox's hosts: entry overrides of the hpc defaults
BUSY_SAMPLE_S = 0.5  # how often gpu1's GPUs are looked at (--hosts 2)


def write_sitecustomize(hooks_dir: Path, tokens_dir: Path, hits_dir: Path, taken_dir: Path) -> Path:
    """Write ``hooks_dir/sitecustomize.py`` that installs the crash hooks in every worker."""
    hooks_dir.mkdir(parents=True, exist_ok=True)
    target = hooks_dir / "sitecustomize.py"
    target.write_text(
        "# Written by bench/chaos.py: SIGKILL this worker in danger zones when a token says so.\n"
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from bench.chaos_hooks import install_crash_hooks\n"
        f"install_crash_hooks({str(tokens_dir)!r}, {str(hits_dir)!r}, {str(taken_dir)!r})\n")
    return target


# ---------------------------------------------------------------------------------------------
# The plan and the cases
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChaosPlan:
    """How big and how hostile a run is; times in seconds.

    ``case_timeout`` (``running_case_timeout_hours`` of the run, in seconds; 0: derived from
    the duration) is short so that an outage and a poller stop both outlast it; the
    ``long_cases`` simulate 2.5 times as long, so they really time out.
    """
    cases: int = 300
    duration: float = 240.0
    seed: int = 1
    fail_ratio: float = 0.15
    big_ratio: float = 0.1
    groups: int = 4
    kill_every: float = 5.0
    settle_timeout: float = 420.0
    case_timeout: float = 0.0
    long_cases: int = -1  # -1: one per 40 cases, at least 2
    hosts: int = 1  # 2: a second sandbox host, down for ``host_down`` seconds
    host_down: float = 60.0
    calm: bool = False  # with 2 hosts: gpu2's outage alone, no other disturbance (a control for the busy figure)
    depth: int = 1  # each group's depth: 2 keeps the next case queued in pueue behind the running one
    case_seconds: tuple[float, float] = (0.3, 1.8)  # how long an ordinary case simulates, drawn between these
    share: bool = False  # results delivered to a real sshfs share that hangs, then is unmounted

    @property
    def timeout(self) -> float:
        return self.case_timeout or max(12.0, min(30.0, 0.08 * self.duration))

    @property
    def long_seconds(self) -> float:
        return round(2.5 * self.timeout, 1)

    @property
    def long_count(self) -> int:
        return self.long_cases if self.long_cases >= 0 else max(2, self.cases // 40)

    @property
    def host_down_at(self) -> float:
        """When gpu2 goes down: early enough to be back before the pollers stop for the first
        time (our own chaos would stall gpu1 then too), never in the first 5 % of the run."""
        return max(0.05 * self.duration, FORGETTING_AT * self.duration - self.host_down - 2)


@dataclass(frozen=True)
class CaseSpec:
    name: str
    mode: str
    seconds: float
    big: bool
    marker: bool
    long: bool = False


def long_case_indices(plan: ChaosPlan) -> set[int]:
    """Where the long cases go: dropped between one timeout and a few seconds before the long
    outage is due (after the first poller stop), so that their timeout comes due while the HPC
    cannot be reached."""
    count = min(plan.long_count, plan.cases)
    spacing = DROP_SHARE * plan.duration / max(1, plan.cases)
    outage_at = FORGETTING_AT * plan.duration + plan.timeout / 2 + 3
    moments = (outage_at - plan.timeout * (0.9 - 0.7 * i / max(1, count - 1)) for i in range(count))
    return {min(plan.cases - 1, max(0, round(moment / spacing))) for moment in moments}


def case_specs(plan: ChaosPlan) -> list[CaseSpec]:
    """The cases of a run, reproducible from the seed; a few carry hostile names, a few run long."""
    rng = random.Random(plan.seed)
    hostile = (" pt 'q' $(touch pwned)", " `id`; x", " 환자 \"d\"", " -rf --help")
    long_at = long_case_indices(plan)
    specs = []
    for index in range(plan.cases):
        mode = "fail" if rng.random() < plan.fail_ratio else "ok"
        seconds, big, marker = round(rng.uniform(*plan.case_seconds), 2), rng.random() < plan.big_ratio, rng.random() < 0.5
        if index in long_at:
            specs.append(CaseSpec(name=f"c{index:04d}_long", mode="ok", seconds=plan.long_seconds, big=False,
                                  marker=marker, long=True))
            continue
        name = f"c{index:04d}_{mode}" + (hostile[index % len(hostile)] if index % 9 == 4 else "")
        specs.append(CaseSpec(name=name, mode=mode, seconds=seconds, big=big, marker=marker))
    return specs


# ---------------------------------------------------------------------------------------------
# supervisord
# ---------------------------------------------------------------------------------------------

class Supervisor:
    """supervisord with bench/supervisord.chaos.conf in ``home``, talked to over its XML-RPC socket."""

    def __init__(self, home: Path, config_path: Path):
        import shutil
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "bench" / "supervisord.chaos.conf", home / "supervisord.conf")
        if not (home / ".venv").exists():
            (home / ".venv").symlink_to(Path(sys.prefix))
        for sub in ("run", "logs", "tokens", "hits", "taken"):
            (home / sub).mkdir(exist_ok=True)
        write_sitecustomize(home / "hooks", home / "tokens", home / "hits", home / "taken")
        self.env = {**os.environ, "MQIC_CONFIG": str(config_path)}

    def start(self) -> None:
        subprocess.run([str(Path(sys.prefix) / "bin" / "supervisord"), "-c", str(self.home / "supervisord.conf")],
                       check=True, env=self.env, cwd=self.home, timeout=30)

    @property
    def rpc(self):
        """A new XML-RPC proxy (they are not thread-safe, and the driver has helper threads)."""
        import xmlrpc.client
        from supervisor.xmlrpc import SupervisorTransport
        transport = SupervisorTransport(None, None, f"unix://{self.home / 'run' / 'supervisor.sock'}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def running_pids(self) -> dict[str, int]:
        """{process name: pid} of the workers that are RUNNING right now."""
        return {p["name"]: p["pid"] for p in self.rpc.supervisor.getAllProcessInfo()
                if p["statename"] == "RUNNING" and p["pid"]}

    def set_running(self, prefix: str, running: bool) -> list[str]:
        """Stop (or start) every process whose name starts with ``prefix``; return the names changed."""
        import xmlrpc.client
        rpc, changed = self.rpc, []
        for info in rpc.supervisor.getAllProcessInfo():
            if not info["name"].startswith(prefix):
                continue
            action = rpc.supervisor.startProcess if running else rpc.supervisor.stopProcess
            try:
                action(f"{info['group']}:{info['name']}", True)
                changed.append(info["name"])
            except xmlrpc.client.Fault:  # already in that state
                continue
        return changed

    def shutdown(self) -> None:
        subprocess.run([str(Path(sys.prefix) / "bin" / "supervisorctl"), "-c", str(self.home / "supervisord.conf"),
                        "shutdown"], capture_output=True, env=self.env, cwd=self.home, timeout=120)
        deadline = time.monotonic() + 60
        while (self.home / "run" / "supervisord.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# What happened, and the report
# ---------------------------------------------------------------------------------------------

IDLE_REASONS = {  # why a gpu1 group runs no task of ours, from its seat and the case holding it
    "free": "seat free",
    "claim": "claimed (upload, add)",
    "dead claim": "claimed by a dead submitter (lease not yet recovered)",
    "no task": "case running, its task not (queued, or ended and not yet seen)",
}


@dataclass(frozen=True)
class BusySample:
    """gpu1 at one moment (--hosts 2): its groups that run a task of ours, why each of the others
    does not (a key of IDLE_REASONS), how many cases wait (``submitted``), and whether gpu2 or
    gpu1 itself was cut off (gpu1: an outage of every session, or our pollers stopped by the chaos)."""
    at: float
    gpu2_down: bool
    gpu1_cut: bool
    waiting: int
    running: frozenset[str]
    idle: tuple[tuple[str, str], ...] = ()  # (group, reason)


@dataclass(frozen=True)
class BusyFigure:
    """The share of samples, with cases waiting and gpu1 not cut off, in which every gpu1 group
    ran a task of ours; the mean share of its GPUs running one; why the idle ones were idle."""
    busy: int
    counted: int
    gpu_share: float
    idle: Counter
    left_out: int  # samples with cases waiting but gpu1 itself cut off

    @property
    def percent(self) -> float:
        return 100.0 * self.busy / self.counted if self.counted else 0.0

    def text(self) -> str:
        idle = sum(self.idle.values()) or 1
        why = ", ".join(f"{IDLE_REASONS[reason]} {100 * self.idle[reason] / idle:.0f} %" for reason in IDLE_REASONS)
        return (f"{self.percent:.0f} % of {self.counted} samples; GPUs running a task: {100 * self.gpu_share:.0f} %; "
                f"idle GPUs: {why}; {self.left_out} samples left out (gpu1 itself cut off)")


def busy_figure(samples: list[BusySample], groups: tuple[str, ...], gpu2_down: bool) -> BusyFigure:
    """How busy gpu1 kept its GPUs in the samples taken while gpu2 was down (or up)."""
    wanted = [s for s in samples if s.gpu2_down == gpu2_down and s.waiting]
    counted = [s for s in wanted if not s.gpu1_cut]
    share = sum(len(s.running & set(groups)) for s in counted) / (len(counted) * len(groups)) if counted else 0.0
    return BusyFigure(busy=sum(1 for s in counted if set(groups) <= s.running), counted=len(counted), gpu_share=share,
                      idle=Counter(reason for s in counted for _, reason in s.idle), left_out=len(wanted) - len(counted))


def idle_reason(holder: tuple[str, str | None] | None) -> str:
    """Why a group with no task of ours running is idle, from the (status, claimed_by) of the case on its seat."""
    if holder is None:
        return "free"
    status, claimed_by = holder
    if status == "submitting":
        return "claim" if pid_alive(claimed_by) else "dead claim"
    return "no task"


def pid_alive(claimed_by: str | None) -> bool:
    """Whether the worker named in ``claimed_by`` (``name:pid``, on this machine) still lives."""
    pid = (claimed_by or "").rpartition(":")[2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Disturbances:
    """What the driver did, for the table and for the checker."""
    sigkills: int = 0
    group_kills: int = 0
    owner_kills: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ZONES, 0))
    outages: Counter = field(default_factory=Counter)  # "logins" / "all"
    masters_cut: int = 0
    outage_windows: list[tuple[float, float]] = field(default_factory=list)  # "all" outages, epoch s
    long_outage: float = 0.0
    restarts: int = 0
    paused_by_restart: int = 0
    garbage_polls: int = 0
    remote_kills: int = 0
    victims: Counter = field(default_factory=Counter)  # label -> kills by a signal we did not send
    poller_stops: int = 0
    cleaned: dict[str, dict[int, str]] = field(default_factory=dict)  # label -> {task id: state} cleaned away
    lost_adds_armed: Counter = field(default_factory=Counter)  # "at once" / "stored late"
    foreign: dict[int, str] = field(default_factory=dict)  # another user's task id -> command
    foreign_excused: set[int] = field(default_factory=set)
    foreign_on_our_ids: list[tuple[int, list[int]]] = field(default_factory=list)
    host_down_windows: list[tuple[float, float]] = field(default_factory=list)  # gpu2 down, epoch s
    host_down_from: list[float] = field(default_factory=list)  # gpu2 down, seconds into the run
    host_masters_cut: int = 0
    started_on_gpu1_while_down: int = 0  # cases whose task was submitted on gpu1 while gpu2 was down
    on_gpu2_when_down: list[int] = field(default_factory=list)  # cases running or submitting there then
    busy: list[BusySample] = field(default_factory=list)
    share_windows: list[tuple[float, float]] = field(default_factory=list)  # the share hung or unmounted, epoch s
    share_faults: Counter = field(default_factory=Counter)  # "hung" / "unmounted"
    share: Counter = field(default_factory=Counter)  # bench.chaos_share.check_deliveries
    stalled: tuple[int, float] = (0, 0.0)  # bench.chaos_share.stalled_seats


@dataclass
class ChaosResult:
    plan: ChaosPlan
    verdict: Verdict
    done: Disturbances
    zone_hits: dict[str, int]
    zone_taken: dict[str, int]
    zone_batch_hits: dict[str, int]
    lost_adds: Counter
    elapsed: float
    settled: bool

    @property
    def ok(self) -> bool:
        share_bad = self.plan.share and (self.done.share["misdelivered"] or self.done.share["underneath"]
                                         or self.done.share["leftovers"] or self.done.share["undelivered"]
                                         or self.done.stalled[0])
        return self.verdict.ok and self.settled and not share_bad

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(f"gpu_{chr(ord('a') + i)}" for i in range(self.plan.groups))

    def busy(self, gpu2_down: bool = True) -> BusyFigure:
        """How busy gpu1 kept its GPUs while gpu2 was down (``gpu2_down=False``: while both were up)."""
        return busy_figure(self.done.busy, self.groups, gpu2_down)

    @property
    def unreached_zones(self) -> list[str]:
        """Zones armed but never died in (the token still waits, or its taker was killed first)."""
        return [zone for zone in ZONES if self.zone_hits.get(zone, 0) == 0 and self.done.tokens[zone]]

    def table(self) -> str:
        """The summary as a Markdown table (pasted into docs/chaos.md)."""
        v, d, plan = self.verdict.counts, self.done, self.plan
        rows = [
            ("cases dropped (long ones: simulate 2.5 x the case timeout)",
             f"{plan.cases} ({plan.long_count}: {plan.long_seconds:g} s, timeout {plan.timeout:g} s)"),
            ("completed", v.get("completed", 0)),
            ("failed as designed (mode=fail, exit 1)", v.get("failed_as_designed", 0)),
            ("long cases timed out / completed", f"{v.get('timed_out_as_designed', 0)} / "
                                                  f"{v.get('long_cases_completed', 0)}"),
            ("victims (killed by a signal we did not send) that completed / started again",
             f"{v.get('victims_completed', 0)} of {len(d.victims)} / {v.get('rerun_after_a_foreign_kill', 0)}"),
            ("worker SIGKILLs at random (process / process group)",
             f"{d.sigkills} ({d.sigkills - d.group_kills} / {d.group_kills})"),
            ("owner of a `submitting` case SIGKILLed", d.owner_kills),
        ]
        rows += [(f"danger zone `{zone}`: deaths (inside a batch of 2+ cases) / taken / armed",
                  f"{self.zone_hits.get(zone, 0)} ({self.zone_batch_hits.get(zone, 0)}) / "
                  f"{self.zone_taken.get(zone, 0)} / {d.tokens[zone]}")
                 for zone in ZONES]
        rows += [
            ("sshd outages: new logins only / all sessions (ControlMaster cut)",
             f"{d.outages['logins']} / {d.outages['all']} ({d.masters_cut})"),
            ("outage longer than the case timeout", f"{d.long_outage:.0f} s" if d.outages["all"] else "none"),
        ]
        if plan.hosts > 1:
            rows += [
                ("host gpu2 down, every session killed (ControlMaster cut)",
                 f"{len(d.host_down_windows)} x {plan.host_down:g} s, from "
                 f"{', '.join(f'{at:.0f}' for at in d.host_down_from) or '-'} s into the run ({d.host_masters_cut})"),
                ("cases on gpu2 when it went down (running or submitting)", len(d.on_gpu2_when_down)),
                ("cases that went running on gpu1 while gpu2 was down", d.started_on_gpu1_while_down),
                ("**gpu1 busy while gpu2 down** (every gpu1 group runs a task of ours, cases waiting)",
                 self.busy(True).text()),
                ("gpu1 busy while both hosts are up (the same measure)", self.busy(False).text()),
                ("final on gpu1 / gpu2: completed, failed",
                 " / ".join(f"{v.get(f'completed_on:{h}', 0)}, {v.get(f'failed_on:{h}', 0)}" for h in HOST_NAMES)),
            ]
        if plan.share:
            windows = ", ".join(f"{e - b:.0f} s" for b, e in d.share_windows)
            rows += [
                ("results share hung (sftp-server stopped) / unmounted", f"{d.share_faults['hung']} / "
                                                                        f"{d.share_faults['unmounted']} ({windows})"),
                ("results delivered whole (contents = the fetch record)", d.share["delivered"]),
                ("**misdelivered / not delivered / temporaries left**",
                 f"{d.share['misdelivered']} / {d.share['undelivered']} / {d.share['leftovers']}"),
                ("**written underneath the unmounted mount point**", d.share["underneath"]),
                ("**seats stalled by the share** (zombie > 15 s, begun in a share episode; longest)",
                 f"{d.stalled[0]} ({d.stalled[1]:.1f} s)"),
            ]
        rows += [
            ("pueue daemon restarts (groups paused)", f"{d.restarts} ({d.paused_by_restart})"),
            ("garbage `status --json` answers", d.garbage_polls),
            ("tasks killed by another user (`pueue kill`)", d.remote_kills),
            ("pollers stopped (our finished tasks another user cleaned or removed)",
             f"{d.poller_stops} ({sum(map(len, d.cleaned.values()))})"),
            ("`add` answers lost: at once / stored late (armed)",
             f"{self.lost_adds['at once']} / {self.lost_adds['stored late']} "
             f"({d.lost_adds_armed['at once']} / {d.lost_adds_armed['stored late']})"),
            ("another user's tasks (on an id one of our cases had recorded)",
             f"{len(d.foreign)} ({len(d.foreign_on_our_ids)})"),
            ("completed from the exit-status record (task cleaned away)", v.get("completed_from_the_record", 0)),
            ("**lost** (no row, or never final)", v.get("lost", 0)),
            ("**run twice** (starts beyond 1 + kills we did not send)", v.get("run_twice", 0)),
            ("**duplicates** (registrations + remote tasks per label)",
             v.get("duplicates", 0) + v.get("duplicate_tasks", 0)),
            ("**wrongly failed**", v.get("wrongly_failed", 0)),
            ("**failed while the HPC was unreachable**", v.get("failed_while_unreachable", 0)),
            ("**wrongly completed**", v.get("wrongly_completed", 0)),
            ("**foreign tasks touched**", v.get("foreign_touched", 0)),
            ("**misplaced / stray folders**", v.get("misplaced", 0) + v.get("stray_folders", 0)),
            ("**completed without their results**", v.get("results_lost", 0)),
            ("**failed without their log tail** (excused: task cleaned)",
             f"{v.get('log_tail_lost', 0)} ({v.get('log_tail_gone_with_a_cleaned_task', 0)})"),
            ("**slots left assigned/zombie**", v.get("busy_slots", 0)),
            ("**invalid event chains**", v.get("bad_event_chains", 0)),
            ("**flagged for review / orphan tasks**", v.get("flagged_for_review", 0) + v.get("orphan_tasks", 0)),
            ("**integrity_check errors**", v.get("integrity_errors", 0)),
            ("all final within the deadline", "yes" if self.settled else "NO"),
            ("wall time", f"{self.elapsed:.0f} s"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"| {'what':<{width}} | count |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
        return "\n".join(lines)


def say_now(line: str) -> None:
    print(line, flush=True)


def ours(task) -> bool:
    return bool(task.label and task.label.startswith(OUR_LABEL))


def killed_keys(tasks) -> set[tuple]:
    """The killed tasks among ``tasks``, each by id, label and start: ids are reused once a task
    is cleaned or removed, so an id alone may name another task a moment later."""
    from shared.backends.model import TaskState
    return {(t.id, t.label, t.start) for t in tasks if t.state is TaskState.KILLED}


def newly_killed(before: set[tuple], tasks) -> list:
    """The tasks killed now that were not killed ``before`` (a set of ``killed_keys``)."""
    from shared.backends.model import TaskState
    return [t for t in tasks if t.state is TaskState.KILLED and (t.id, t.label, t.start) not in before]


def two_hosts_config(target: Path, first: Path, second: Path, groups: dict) -> Path:
    """Write one config with a ``hosts:`` list to ``target``: ``gpu1`` is the sandbox of
    ``first`` (whose ``hpc`` section gives every host's defaults), ``gpu2`` the sandbox of
    ``second`` (its own sshd, pueue, remote folder and control folder); both with ``groups``."""
    import yaml
    data = yaml.safe_load(first.read_text())
    other = yaml.safe_load(second.read_text())["hpc"]
    del data["pueue"]["groups"]
    data["hosts"] = [{"name": HOST_NAMES[0], "groups": groups},
                     {"name": HOST_NAMES[1], **{key: other[key] for key in HOST_KEYS}, "groups": groups}]
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

class ChaosRun:
    """One chaos run in ``scratch``: sandbox HPC, supervisord, feeder, disturbances, check."""

    def __init__(self, plan: ChaosPlan, scratch: Path, say: Callable[[str], None] = say_now):
        self.plan, self.scratch, self.say = plan, Path(scratch).resolve(), say
        self.rng = random.Random(plan.seed + 1)
        self.specs = case_specs(plan)
        self.done = Disturbances(long_outage=plan.timeout + 4)
        self.t0 = time.monotonic()
        self.sandbox = None
        self.sandbox2 = None  # the second host (--hosts 2)
        self.config_path: Path | None = None
        self.supervisor: Supervisor | None = None
        self.groups = tuple(f"gpu_{chr(ord('a') + i)}" for i in range(plan.groups))
        self.gpu2_down = False
        self.gpu1_cut: set[str] = set()  # why gpu1 itself is cut off now: "outage", "pollers"
        self.starts_log = self.scratch / "hpc" / "simulation_starts.log"
        self.lock = threading.Lock()  # helper threads record victims too
        self.late_store_due = 0.0  # monotonic time by which a late-stored add has landed
        self.share = None  # bench.chaos_share.SshfsShare with --share
        self.share_sshd = None

    # -- set-up -------------------------------------------------------------------------------
    def start(self) -> None:
        from sandbox.hpc import remote_command, up
        groups = {name: {"gpu": index, "depth": self.plan.depth} for index, name in enumerate(self.groups)}
        sections = dict(scanner={"quiescence_period_seconds": 0.5, "rescan_interval_seconds": 2},
                        hpc={"connect_timeout_seconds": 3, "command_timeout_seconds": COMMAND_TIMEOUT_S,
                             "remote_command": recording_starts(remote_command(), self.starts_log)},
                        main_loop={"interval_seconds": 0.4, "lease_seconds": LEASE_S, "max_attempts": 100,
                                   "backoff_base_seconds": 1, "backoff_cap_seconds": 4,
                                   "running_case_timeout_hours": self.plan.timeout / 3600,
                                   "stuck_after_minutes": 60},
                        logging={"json_stdout": False})
        if self.plan.share:
            sections["results"] = self.start_share()
        self.sandbox = up(self.scratch / "hpc", groups=groups, **sections)
        self.config_path = self.sandbox.config_path
        if self.plan.hosts > 1:
            self.sandbox2 = up(self.scratch / "hpc2", groups=groups, **sections)
            self.config_path = two_hosts_config(self.scratch / "config.yaml", self.sandbox.config_path,
                                                self.sandbox2.config_path, groups)
        self.config = self._load_config()
        assert self.config.pueue.resume_paused_groups  # sandbox.hpc's default; up() cannot take a pueue section
        self.pueue("parallel", "0", "-g", "default")  # another user's tasks run side by side
        self.supervisor = Supervisor(self.scratch / "sup", self.config_path)
        self.supervisor.start()
        self.wait_for(self.database_ready, 60)  # on a loaded machine the first disturbances could beat the schema
        self.note(f"sandbox HPC{' (2 hosts)' if self.sandbox2 else ''} and supervisord up in {self.scratch}; "
                  f"case timeout {self.plan.timeout:g} s")

    def start_share(self) -> dict:
        """A real sshfs share through an sshd of its own; the config's ``results`` section."""
        from bench.chaos_share import SshfsShare, sshfs_missing
        from sandbox.sshd import SandboxSshd
        missing = sshfs_missing()
        if missing:
            raise RuntimeError(f"--share needs a real FUSE share: {missing}")
        self.share_sshd = SandboxSshd(self.scratch / "share" / "sshd")
        self.share_sshd.start()
        self.share = SshfsShare(self.share_sshd, self.scratch / "share")
        self.share.attach()
        return {"deliver_to": str(self.share.mount), "retry_seconds": 1, "share_timeout_seconds": 3}

    def share_trouble(self, kind: str, seconds: float) -> None:
        """The share hangs (``hung``) or is unmounted (``unmounted``) for ``seconds``, then is back."""
        begin = time.time()
        if kind == "hung":
            self.share.hang()
        else:
            self.share.detach()
        self.done.share_faults[kind] += 1
        self.note(f"results share {kind} for {seconds:.0f} s")
        time.sleep(seconds)
        if kind == "hung":
            self.share.answer()
        else:
            self.share.attach()
        self.done.share_windows.append((begin, time.time()))
        self.note(f"results share back after being {kind}")

    def database_ready(self) -> bool:
        """The workers have created the database and its schema (the driver reads it from then on)."""
        import sqlite3
        from shared.db import connect
        try:
            conn = connect(self.config.database_path, readonly=True)
        except sqlite3.Error:
            return False
        try:
            return conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'cases'").fetchone()[0] == 1
        except sqlite3.Error:
            return False
        finally:
            conn.close()

    def _load_config(self):
        from shared.config import load_config
        return load_config(self.config_path)

    def note(self, message: str) -> None:
        self.say(f"[{time.monotonic() - self.t0:7.1f}s] {message}")

    # -- feeding --------------------------------------------------------------------------------
    def feed(self, stop: threading.Event) -> None:
        """Drop the cases evenly over the first 70 % of the run (folders appear atomically)."""
        from sandbox.casegen import make_case
        spacing = DROP_SHARE * self.plan.duration / max(1, len(self.specs))
        for index, spec in enumerate(self.specs):
            if stop.wait(max(0.0, self.t0 + index * spacing - time.monotonic())):
                return
            make_case(self.config.scanner.watch_path, spec.name, atomic=True, seconds=spec.seconds,
                      batches=10 if spec.long else 3, mode=spec.mode, deliveries=3 if spec.big else 1,
                      layers_per_delivery=3 if spec.big else 2, ptn_bytes=700_000 if spec.big else 20_000,
                      marker="_CASE_READY" if spec.marker else None, seed=index)

    # -- the database and pueue as the driver sees them ------------------------------------------
    def pueue(self, *args: str, check: bool = True, sandbox=None) -> subprocess.CompletedProcess:
        """``pueue ARGS`` on the HPC's side (gpu1, or ``sandbox``), waiting (up to 10 s) through a
        daemon restart of our own.

        ``check``: raise CalledProcessError if pueue still fails (a refusal such as "The command
        failed for tasks" is an answer, not a failure, for the callers that pass ``check=False``).
        """
        return self.through_restarts([str((sandbox or self.sandbox).pueue), *args], check)

    def ctl(self, *args: str) -> str:
        """``pueue-standin-ctl ARGS`` (through a daemon restart too); its output."""
        return self.through_restarts([str(self.sandbox.bin["pueue-standin-ctl"]), *args], True).stdout

    @staticmethod
    def through_restarts(argv: list[str], check: bool) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + 10
        while True:
            answer = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            daemon_away = answer.returncode != 0 and "daemon" in answer.stderr + answer.stdout
            if not daemon_away or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if check:
            answer.check_returncode()
        return answer

    def tasks(self) -> list:
        """Every task, read with ``log --json`` so that our reads never eat a garbage answer."""
        from shared.backends import pueue_parse
        answer = self.pueue("log", "--json", "--all", "--lines", "1")
        return [entry.task for entry in pueue_parse.parse_log(answer.stdout).values()]

    def paused_groups(self) -> list[str]:
        from shared.backends import pueue_parse
        groups = pueue_parse.parse_groups(self.pueue("group", "--json").stdout)
        return sorted(name for name, group in groups.items() if group.paused)

    def final_status_json(self, sandbox=None) -> str:
        """``status --json`` of gpu1 (or ``sandbox``) for the checker (retried past any garbage answer still pending)."""
        from shared.backends import pueue_parse
        from shared.errors import BadOutput
        for _ in range(20):
            text = self.pueue("status", "--json", sandbox=sandbox).stdout
            try:
                pueue_parse.parse_status(text)
                return text
            except BadOutput:
                continue
        return text

    def running_tasks(self, patience: float = 6.0) -> list:
        """Our running tasks, waiting up to ``patience`` seconds for at least one."""
        from shared.backends.model import TaskState
        deadline = time.monotonic() + patience
        while True:
            running = [t for t in self.tasks() if t.state is TaskState.RUNNING and ours(t)]
            if running or time.monotonic() > deadline:
                return running
            time.sleep(0.1)

    # -- worker deaths ------------------------------------------------------------------------------
    def kill_random_worker(self) -> None:
        pids = self.supervisor.running_pids()
        if not pids:
            return
        name = self.rng.choice(sorted(pids))
        whole_group = self.rng.random() < 0.5 and os.getpgid(pids[name]) == pids[name]
        try:
            (os.killpg if whole_group else os.kill)(pids[name], signal.SIGKILL)
        except ProcessLookupError:
            return
        self.done.sigkills += 1
        self.done.group_kills += whole_group

    def kill_owner_of_a_claim(self, patience: float = 3.0) -> None:
        """Watch the database for a ``submitting`` case and SIGKILL the submitter that holds it."""
        from shared.db import connect
        conn = connect(self.config.database_path, readonly=True)
        try:
            deadline = time.monotonic() + patience
            while time.monotonic() < deadline:
                row = conn.execute("SELECT case_id, claimed_by FROM cases WHERE status = 'submitting'"
                                   " AND claimed_by IS NOT NULL ORDER BY random() LIMIT 1").fetchone()
                if row and self._kill_claimer(row["claimed_by"], row["case_id"]):
                    return
                time.sleep(0.02)
        finally:
            conn.close()

    def _kill_claimer(self, claimed_by: str, case_id: int) -> bool:
        name, _, pid_text = claimed_by.rpartition(":")
        name = name.partition("@")[0]  # a host's claim loop (<process>@<host>) is a thread of its process
        pid = int(pid_text) if pid_text.isdigit() else 0
        if self.supervisor.running_pids().get(name) != pid:
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.done.owner_kills += 1
        self.note(f"SIGKILLed {name} (pid {pid}) holding case {case_id}")
        return True

    def drop_token(self, zone: str) -> None:
        """Arm ``zone`` once more, unless a token for it still waits (then it stays armed)."""
        tokens = self.supervisor.home / "tokens"
        if any(name.startswith(zone + "-") for name in os.listdir(tokens)):
            return
        self.done.tokens[zone] += 1
        (tokens / f"{zone}-{self.done.tokens[zone]}").touch()

    def zone_records(self, folder: str) -> dict[str, int]:
        found = Counter(entry.name.split("-", 1)[0] for entry in (self.supervisor.home / folder).iterdir())
        return {zone: found.get(zone, 0) for zone in ZONES}

    def deaths_in_batches(self) -> dict[str, int]:
        """Per zone, the deaths inside a call that carried two cases or more (a batch)."""
        found: Counter = Counter()
        for entry in (self.supervisor.home / "hits").iterdir():
            first = entry.read_text().partition("\n")[0].split()
            if len(first) == 2 and first[0] == "cases" and first[1].isdigit() and int(first[1]) >= 2:
                found[entry.name.split("-", 1)[0]] += 1
        return {zone: found.get(zone, 0) for zone in ZONES}

    # -- the link to the HPC --------------------------------------------------------------------------
    def sshd(self):
        from sandbox.sshd import SandboxSshd
        return SandboxSshd.from_state(self.scratch / "hpc" / "sshd")

    def master_alive(self, host: int = 0) -> bool:
        """Whether our shared ControlMaster connection to a host (gpu1) answers (``ssh -O check``)."""
        from shared.remote import Remote
        remote = Remote(self.config.hosts[host].hpc)
        check = subprocess.run(["ssh", "-o", f"ControlPath={remote.control_path}", "-O", "check", remote.destination],
                               capture_output=True, timeout=10)
        return check.returncode == 0

    def outage_begins(self, kind: str) -> None:
        """``logins``: sshd stops listening, open connections live on; ``all``: every session dies too."""
        master_before = self.master_alive()
        self.sshd().stop(kill_sessions=kind == "all")
        self.done.outages[kind] += 1
        if kind == "all":
            self.done.outage_windows.append((time.time(), float("inf")))
            self.gpu1_cut.add("outage")
        master_after = self.master_alive()
        self.done.masters_cut += master_before and not master_after
        self.note(f"sshd stopped ({'every session killed' if kind == 'all' else 'new logins refused'}); "
                  f"ControlMaster before/after: {'up' if master_before else 'down'}/{'up' if master_after else 'down'}")

    def outage_ends(self) -> None:
        if self.done.outage_windows and self.done.outage_windows[-1][1] == float("inf"):
            begin = self.done.outage_windows[-1][0]
            self.done.outage_windows[-1] = (begin, time.time())
        self.sshd().start()
        self.gpu1_cut.discard("outage")
        self.note("sshd started again")

    def host_down(self, patience: float) -> None:
        """Once cases run on gpu2 (waiting up to ``patience`` s), gpu2 is down for ``plan.host_down``
        seconds: its sshd stops and every session dies, our ControlMaster to it too; its pueue
        daemon and the tasks running there live on."""
        from sandbox.sshd import SandboxSshd
        self.wait_for(lambda: self.running_cases(host=HOST_NAMES[1]), patience)
        sshd = SandboxSshd.from_state(self.scratch / "hpc2" / "sshd")
        on_gpu2 = self.cases_on(HOST_NAMES[1])
        master_before = self.master_alive(1)
        sshd.stop(kill_sessions=True)
        begin, self.gpu2_down = time.time(), True
        self.done.host_down_from.append(time.monotonic() - self.t0)
        self.done.on_gpu2_when_down += on_gpu2
        master_after = self.master_alive(1)
        self.done.host_masters_cut += master_before and not master_after
        self.note(f"gpu2 DOWN for {self.plan.host_down:g} s (every session killed); ControlMaster before/after: "
                  f"{'up' if master_before else 'down'}/{'up' if master_after else 'down'}; "
                  f"cases running or submitting there: {on_gpu2}")
        try:
            time.sleep(self.plan.host_down)
        finally:
            sshd.start()
            self.gpu2_down = False
            self.done.host_down_windows.append((begin, time.time()))
            self.done.started_on_gpu1_while_down += self.started_on(HOST_NAMES[0], *self.done.host_down_windows[-1])
            self.note(f"gpu2: sshd started again; {self.done.started_on_gpu1_while_down} cases went running "
                      f"on gpu1 meanwhile")

    def cases_on(self, host: str) -> list[int]:
        """Ids of the cases ``running`` or ``submitting`` on ``host``."""
        from shared.db import connect
        conn = connect(self.config.database_path, readonly=True)
        try:
            return [row[0] for row in conn.execute("SELECT case_id FROM cases WHERE host = ?"
                                                   " AND status IN ('running', 'submitting')", (host,))]
        finally:
            conn.close()

    def started_on(self, host: str, begin: float, end: float) -> int:
        """How many cases now on ``host`` went ``running`` there between ``begin`` and ``end`` (epoch s)."""
        from shared.db import connect
        conn = connect(self.config.database_path, readonly=True)
        try:
            return conn.execute("SELECT COUNT(DISTINCT e.case_id) FROM case_events AS e JOIN cases AS c"
                                " ON c.case_id = e.case_id WHERE e.to_status = 'running' AND c.host = ?"
                                " AND e.at BETWEEN ? AND ?", (host, begin, end)).fetchone()[0]
        finally:
            conn.close()

    # -- how busy gpu1 keeps its GPUs -----------------------------------------------------------------
    def sample_gpu1(self, stop: threading.Event) -> None:
        """Every BUSY_SAMPLE_S until ``stop``: gpu1's pueue state (the stand-in's state file, as
        ``pueue status`` reports it, without eating the garbage answers meant for our pollers),
        its seats and the cases waiting."""
        from shared.db import connect
        while not self.config.database_path.exists():  # the first worker creates it
            if stop.wait(BUSY_SAMPLE_S):
                return
        conn = connect(self.config.database_path, readonly=True)
        try:
            while not stop.wait(BUSY_SAMPLE_S):
                sample = self.busy_sample(conn)
                if sample is not None:
                    self.done.busy.append(sample)
        finally:
            conn.close()

    def write_windows(self, target: Path) -> None:
        """When the run began and when each host could not be reached (epoch s), for a closer look."""
        import json
        d = self.done
        target.write_text(json.dumps({"t0": time.time() - (time.monotonic() - self.t0),
                                      "gpu1_outages": d.outage_windows, "gpu2_down": d.host_down_windows}))

    def write_busy_samples(self, target: Path) -> None:
        """The samples, one JSON line each, for a closer look at how gpu1 was used."""
        import json
        if self.done.busy:
            target.write_text("".join(json.dumps({**dataclasses.asdict(s), "running": sorted(s.running),
                                                  "idle": dict(s.idle)}) + "\n" for s in self.done.busy))

    def busy_sample(self, conn) -> BusySample | None:
        from sandbox.pueue_standin import Paths, read_state
        at, gpu2_down, gpu1_cut = time.monotonic() - self.t0, self.gpu2_down, bool(self.gpu1_cut)
        try:
            tasks, _ = read_state(Paths(self.scratch / "hpc" / "pueue"))
        except (OSError, ValueError, TypeError):
            return None
        running = frozenset(t.group for t in tasks.values() if t.status == "Running" and ours(t))
        waiting = conn.execute("SELECT COUNT(*) FROM cases WHERE status = 'submitted'").fetchone()[0]
        held = {row[0]: row[1:] for row in conn.execute(
            "SELECT g.pueue_group, c.status, c.claimed_by FROM gpu_resources AS g LEFT JOIN cases AS c"
            " ON c.case_id = g.assigned_case_id WHERE g.host = ? AND g.status = 'assigned'", (HOST_NAMES[0],))}
        idle = tuple((group, idle_reason(held.get(group))) for group in self.groups if group not in running)
        return BusySample(at=at, gpu2_down=gpu2_down and self.gpu2_down, gpu1_cut=gpu1_cut or bool(self.gpu1_cut),
                          waiting=waiting, running=running, idle=idle)

    # -- pueue, as a crash and as other users ------------------------------------------------------------
    def restart_pueue_daemon(self) -> None:
        """Crash and restart pueued; queued work (a foreign task behind ours) gets its group paused.

        Not while a late-stored add is in flight: the crash would lose it, and what it is there
        to show with it."""
        while time.monotonic() < self.late_store_due:
            time.sleep(0.2)
        for group in sorted({t.group for t in self.running_tasks()})[:2]:
            self.pueue("add", "-g", group, "--", "sleep 0.2", check=False)
        before = killed_keys(self.tasks())
        self.sandbox.ctl("restart")
        killed = newly_killed(before, self.tasks())
        victims = [t.label for t in killed if ours(t)]
        with self.lock:
            self.done.victims.update(victims)
        self.done.foreign_excused |= {t.id for t in killed if t.id in self.done.foreign}
        paused = self.paused_groups()
        self.done.restarts += 1
        self.done.paused_by_restart += len(paused)
        self.note(f"pueue daemon restarted: {len(victims)} of our tasks killed {sorted(victims)}, "
                  f"paused groups {paused}")

    def garbage(self, count: int = 5) -> None:
        self.ctl("garbage", str(count))
        self.done.garbage_polls += count
        self.note(f"next {count} status answers are garbage")

    def kill_remote_task(self) -> None:
        """Another user runs ``pueue kill <id>`` on one of our running tasks: a signal we did not send."""
        running = self.running_tasks()
        if not running:
            return
        task = self.rng.choice(running)
        answer = self.pueue("kill", str(task.id), check=False)
        if "being killed" in answer.stdout + answer.stderr:
            with self.lock:
                self.done.victims[task.label] += 1
            self.done.remote_kills += 1
            self.note(f"another user killed remote task {task.id} ({task.label})")

    def running_cases(self, names: frozenset[str] | None = None, host: str | None = None) -> list[int]:
        """Ids of the cases ``running`` on gpu1 (or ``host``) in the database (only those named ``names``, if given)."""
        from shared.db import connect
        if not self.config.database_path.exists():  # no worker has created it yet
            return []
        conn = connect(self.config.database_path, readonly=True)
        try:
            rows = conn.execute("SELECT case_id, case_name FROM cases WHERE status = 'running' AND host = ?",
                                (host or self.config.hosts[0].name,)).fetchall()
            return [row[0] for row in rows if names is None or row[1] in names]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # created, its schema not committed yet (slow start under load)
                return []
            raise
        finally:
            conn.close()

    def wait_for(self, condition: Callable[[], object], patience: float) -> object:
        """Poll ``condition`` for up to ``patience`` seconds; its last value either way."""
        deadline = time.monotonic() + patience
        while not (value := condition()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return value

    def the_hpc_forgets(self) -> None:
        """One after the other, each once cases run: the pollers down for half the case timeout
        while another user runs ``pueue clean`` (finished tasks of running cases vanish unseen);
        the outage past the case timeout; the pollers down past it while another user's task
        takes a freed id that one of our running cases recorded."""
        patience = 0.1 * self.plan.duration
        self.attempt("pueue clean", lambda: self.pollers_down(self.plan.timeout / 2, patience,
                                                             self.clean_as_another_user, pause_submitters=False))
        self.attempt("long outage", lambda: self.long_outage(patience=1.5 * patience))
        self.attempt("reused id", lambda: self.pollers_down(self.plan.timeout + 4, patience,
                                                           self.reuse_an_id_as_another_user, pause_submitters=True))

    def long_outage(self, patience: float) -> None:
        """Once cases run (a long one, if one comes soon), cut everything off for longer than the
        timeout: their timeouts come due while nothing can reach the HPC."""
        long_ones = frozenset(spec.name for spec in self.specs if spec.long)
        running = self.wait_for(lambda: self.running_cases(long_ones), patience / 2) or \
            self.wait_for(self.running_cases, patience / 2)
        self.note(f"long outage begins; cases running: {running}")
        self.outage_begins("all")
        time.sleep(self.done.long_outage)
        self.outage_ends()

    def pollers_down(self, gap: float, patience: float, act: Callable[[], None], pause_submitters: bool) -> None:
        """Once cases run, our pollers stop for ``gap`` seconds while another user does ``act``
        (with our submitters paused meanwhile, if asked, so that no add of ours races theirs)."""
        self.wait_for(self.running_cases, patience)
        self.supervisor.set_running("poller", False)
        stopped_at = time.monotonic()
        self.gpu1_cut.add("pollers")
        self.done.poller_stops += 1
        self.note(f"pollers stopped for {gap:g} s; cases running: {self.running_cases()}")
        if pause_submitters:
            self.supervisor.set_running("submitter", False)
        try:
            act()
        finally:
            if pause_submitters:
                self.supervisor.set_running("submitter", True)
            time.sleep(max(0.0, stopped_at + gap - time.monotonic()))
            self.start_pollers()

    def start_pollers(self) -> None:
        started = self.supervisor.set_running("poller", True)
        self.gpu1_cut.discard("pollers")
        if started:
            self.note(f"pollers started again: {started}")

    def reuse_an_id_as_another_user(self) -> None:
        """Another user ``pueue remove``s our newest task once it finished (its case still
        ``running``, unseen) and adds a task of their own: ids are max+1, so it takes that id."""
        tasks = self.wait_for(self.tasks_once_the_newest_is_ours_done_and_running, max(2.0, self.plan.timeout / 3))
        if tasks:
            newest = max(tasks, key=lambda t: t.id)
            self.pueue("remove", str(newest.id))
            self.done.cleaned.setdefault(newest.label, {})[newest.id] = newest.state.value
            self.note(f"another user removed our finished task {newest.id} ({newest.label})")
        self.add_foreign_task(self.plan.timeout + 8)

    def tasks_once_the_newest_is_ours_done_and_running(self) -> list | None:
        """Every task, once the newest one is ours, done, and its case still ``running`` with it."""
        tasks = self.tasks()
        newest = max(tasks, key=lambda t: t.id, default=None)
        if newest is not None and ours(newest) and newest.state.is_done and self.cases_recording(newest.id, True):
            return tasks
        return None

    def cases_recording(self, task_id: int, running_only: bool = False) -> list[int]:
        """Ids of gpu1's cases whose row records ``task_id`` as their pueue task (only ``running`` ones)."""
        from shared.db import connect
        conn = connect(self.config.database_path, readonly=True)
        try:
            rows = conn.execute("SELECT case_id FROM cases WHERE pueue_task_id = ? AND host = ?"
                                + (" AND status = 'running'" if running_only else ""),
                                (task_id, self.config.hosts[0].name))
            return [r[0] for r in rows]
        finally:
            conn.close()

    def clean_as_another_user(self) -> None:
        """Another user's ``pueue clean`` of the GPU groups (their own default group stays, so that
        each of their tasks can be checked at the end)."""
        from shared.backends.model import TaskState
        tasks = self.tasks()
        finished = {t.id: (t.label, t.state.value) for t in tasks if ours(t) and t.state.is_done}
        for group in self.groups:
            self.pueue("clean", "-g", group)
        left = {t.id for t in self.tasks()}
        for task_id, (label, state) in finished.items():
            if task_id not in left:
                self.done.cleaned.setdefault(label, {})[task_id] = state
        self.note(f"another user ran `pueue clean`: our finished tasks "
                  f"{sorted(label for label, _ in finished.values())} are gone "
                  f"({sum(1 for t in tasks if ours(t) and t.state is TaskState.RUNNING)} still running)")

    def add_foreign_task(self, seconds: float) -> None:
        """Another user's ``sleep N; exit 0`` in the default group: it must run to its natural end."""
        task_id = int(self.ctl("foreign-add", "-g", "default", f"{seconds:g}"))
        self.done.foreign[task_id] = f"sleep {seconds:g}; exit 0"
        recorded = self.cases_recording(task_id)
        if recorded:
            self.done.foreign_on_our_ids.append((task_id, recorded))
        self.note(f"another user added task {task_id} ({seconds:g} s)"
                  + (f": an id that case(s) {recorded} recorded" if recorded else ""))

    def lose_adds(self, count: int, late: float = 0.0) -> None:
        """The next ``count`` of our ``pueue add`` answers are lost (the task stored ``late`` s after)."""
        kind = "stored late" if late else "at once"
        args = ["lose-add", str(count), "--label", OUR_LABEL, "--hang", f"{COMMAND_TIMEOUT_S + 4:g}"]
        self.ctl(*args, *(["--late", f"{late:g}"] if late else []))
        self.done.lost_adds_armed[kind] += count
        self.note(f"the answers of our next {count} `pueue add` are lost ({kind})")

    def lost_adds_pending(self) -> int:
        from sandbox.pueue_standin import Paths, load_settings
        return load_settings(Paths(self.scratch / "hpc" / "pueue")).lose_add

    def lose_adds_in_turn(self, until: float) -> None:
        """One add answer lost with the task stored late, then (once that one was taken) two lost at once."""
        late = LATE_STORE_S
        self.late_store_due = self.t0 + until  # until it is taken, a restart waits too
        self.lose_adds(1, late=late)
        while self.lost_adds_pending() and time.monotonic() < self.t0 + until:
            time.sleep(0.2)
        self.late_store_due = time.monotonic() + late + 1
        self.lose_adds(2)

    def lost_adds(self) -> Counter:
        """How many add answers the stand-in did lose, read from its daemon log."""
        try:
            lines = (self.scratch / "hpc" / "pueue" / "daemon.log").read_text().splitlines()
        except FileNotFoundError:
            return Counter()
        lost = [line for line in lines if "lose-add:" in line]
        return Counter("stored late" if "late" in line else "at once" for line in lost)

    # -- schedule ---------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[float, str, Callable[[], None]]]:
        """(second, name, action) for the whole run, sorted by time."""
        d = self.plan.duration
        if self.plan.calm:
            return [(self.plan.host_down_at, "host down", lambda: self.host_down(0.2 * d))]
        outage = min(12.0, max(3.0, 0.05 * d))
        plan: list[tuple[float, str, Callable[[], None]]] = [
            (0.08 * d, "lose adds", lambda: self.lose_adds_in_turn(until=0.5 * d)),
            (0.15 * d, "outage (logins)", lambda: self.outage_begins("logins")),
            (0.15 * d + outage, "heal", self.outage_ends),
            (FORGETTING_AT * d, "clean, long outage, reused id", self.the_hpc_forgets),
        ]
        if d >= 120:
            plan += [(0.9 * d, "outage (all)", lambda: self.outage_begins("all")),
                     (0.9 * d + outage, "heal", self.outage_ends)]
        plan += [(f * d, "restart", self.restart_pueue_daemon) for f in ((0.25, 0.45) if d >= 120 else (0.25,))]
        plan += [(f * d, "garbage", self.garbage) for f in (0.33, 0.75)]
        kills = max(3, int(d / 25))
        plan += [((i + 0.5) / kills * 0.85 * d, "remote kill", self.kill_remote_task) for i in range(kills)]
        plan += [((i + 0.3) / kills * 0.85 * d, "owner kill", self.kill_owner_of_a_claim) for i in range(kills)]
        tokens = max(1, int(d / 40))
        for offset, zone in enumerate(ZONES):
            plan += [((i + 0.1 + offset * 0.05) / tokens * 0.8 * d, zone, lambda z=zone: self.drop_token(z))
                     for i in range(tokens)]
        randoms = int(d / self.plan.kill_every)
        plan += [((i + 0.7) * self.plan.kill_every, "random kill", self.kill_random_worker) for i in range(randoms)]
        if self.plan.hosts > 1:
            plan.append((self.plan.host_down_at, "host down", lambda: self.host_down(0.2 * self.plan.duration)))
        if self.plan.share:
            plan += [(0.5 * d, "share hangs", lambda: self.share_trouble("hung", 0.12 * d)),
                     (0.7 * d, "share unmounted", lambda: self.share_trouble("unmounted", 0.08 * d))]
        return sorted(plan, key=lambda item: item[0])

    def disturb(self) -> None:
        """Run the schedule on time: actions that wait for something run in their own thread."""
        helpers = []
        for at, name, action in self.schedule():
            pause = self.t0 + at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            if name in WAITING_ACTIONS:
                helpers.append(threading.Thread(target=self.attempt, args=(name, action), name=name, daemon=True))
                helpers[-1].start()
            else:
                self.attempt(name, action)
        for helper in helpers:
            helper.join()
        if not self.sshd().is_running():
            self.outage_ends()
        self.start_pollers()
        self.note("disturbances over")

    def attempt(self, name: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # a disturbance that could not happen is reported, not fatal
            self.note(f"{name} could not be done: {type(exc).__name__}: {exc}")

    # -- the end ----------------------------------------------------------------------------------
    def settled(self) -> bool:
        from shared.db import connect
        conn = connect(self.config.database_path, readonly=True)
        try:
            rows = conn.execute("SELECT COUNT(*), SUM(status IN ('completed','failed')) FROM cases").fetchone()
            busy = conn.execute("SELECT COUNT(*) FROM gpu_resources WHERE status != 'available'").fetchone()[0]
            undelivered = conn.execute(
                "SELECT COUNT(*) FROM cases WHERE status = 'completed' AND delivered_at IS NULL AND completed_at >="
                " (SELECT value FROM settings WHERE key = 'results.deliver_since')").fetchone()[0]
        finally:
            conn.close()
        waiting = [n for n in os.listdir(self.config.scanner.watch_path)]
        return rows[0] == len(self.specs) and rows[1] == rows[0] and busy == 0 and not waiting and not undelivered

    def wait_for_the_end(self) -> bool:
        deadline = time.monotonic() + self.plan.settle_timeout
        last = 0.0
        while time.monotonic() < deadline:
            if self.settled():
                return True
            if time.monotonic() - last > 15:
                self.note("waiting for every case to be final ...")
                last = time.monotonic()
            time.sleep(1)
        return self.settled()

    def run(self) -> ChaosResult:
        stop, sampled = threading.Event(), threading.Event()
        try:
            self.start()
            feeder = threading.Thread(target=self.feed, args=(stop,), name="feeder", daemon=True)
            feeder.start()
            sampler = threading.Thread(target=self.sample_gpu1, args=(sampled,), name="sampler", daemon=True)
            if self.sandbox2 is not None:
                sampler.start()
            self.disturb()
            sampled.set()
            if sampler.is_alive():
                sampler.join()
            self.write_busy_samples(self.scratch / "gpu1_busy.jsonl")
            self.write_windows(self.scratch / "windows.json")
            feeder.join()
            self.note("chaos over; waiting for every case to be final")
            settled = self.wait_for_the_end()
            self.supervisor.shutdown()
            return self.judge(settled)
        finally:
            stop.set()
            sampled.set()
            self.tear_down()

    def expected(self) -> Expected:
        d = self.done
        expected = Expected(modes={s.name: s.mode for s in self.specs}, victims=dict(d.victims),
                            long_cases=frozenset(s.name for s in self.specs if s.long), cleaned=dict(d.cleaned),
                            starts=read_starts(self.starts_log), foreign=dict(d.foreign),
                            foreign_excused=frozenset(d.foreign_excused), outages=tuple(d.outage_windows))
        if self.sandbox2 is None:
            return expected
        return dataclasses.replace(expected, foreign_host=HOST_NAMES[0], host_outages={
            HOST_NAMES[0]: tuple(d.outage_windows), HOST_NAMES[1]: tuple(d.host_down_windows)})

    def final_status(self) -> str | dict[str, str]:
        """The one host's final ``status --json``; with two hosts, {host name: its answer}."""
        if self.sandbox2 is None:
            return self.final_status_json()
        return {HOST_NAMES[0]: self.final_status_json(), HOST_NAMES[1]: self.final_status_json(self.sandbox2)}

    def judge(self, settled: bool) -> ChaosResult:
        if self.share is not None:
            from bench.chaos_share import check_deliveries, stalled_seats
            self.share.detach()
            self.done.share = check_deliveries(self.config.database_path, self.share)
            self.done.stalled = stalled_seats(self.config.database_path, self.done.share_windows, 15.0)
        verdict = check_final_state(self.config.database_path, self.config.spool_path,
                                    self.config.scanner.watch_path, self.final_status(), self.expected(),
                                    groups=self.groups)
        return ChaosResult(plan=self.plan, verdict=verdict, done=self.done, zone_hits=self.zone_records("hits"),
                           zone_taken=self.zone_records("taken"), zone_batch_hits=self.deaths_in_batches(), lost_adds=self.lost_adds(),
                           elapsed=time.monotonic() - self.t0, settled=settled)

    def tear_down(self) -> None:
        """Stop supervisord (if still up), the pueue daemon and sshd; the files stay for inspection."""
        from sandbox.hpc import down
        if self.supervisor is not None and (self.supervisor.home / "run" / "supervisord.pid").exists():
            self.supervisor.shutdown()
        if self.plan.hosts > 1 and (self.scratch / "hpc2").is_dir():  # even if it did not come up whole
            down(self.scratch / "hpc2")
        if self.share is not None:
            self.share.close()
        if self.share_sshd is not None:
            self.share_sshd.stop()
        if self.sandbox is not None:
            down(self.scratch / "hpc")
            from shared.remote import Remote
            for host in self.config.hosts:
                Remote(host.hpc).close()


def run_chaos(plan: ChaosPlan, scratch: Path, say: Callable[[str], None] = say_now) -> ChaosResult:
    """Run the chaos described by ``plan`` in ``scratch`` and check the end state."""
    return ChaosRun(plan, scratch, say).run()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile
    parser = argparse.ArgumentParser(prog="bench/chaos.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=ChaosPlan.cases)
    parser.add_argument("--duration", type=float, default=ChaosPlan.duration, help="seconds of chaos")
    parser.add_argument("--seed", type=int, default=ChaosPlan.seed)
    parser.add_argument("--groups", type=int, default=ChaosPlan.groups, help="GPU slots (pueue groups)")
    parser.add_argument("--case-timeout", type=float, default=ChaosPlan.case_timeout,
                        help="running_case_timeout in seconds (default: 8 %% of the duration, 12-30 s)")
    parser.add_argument("--hosts", type=int, choices=(1, 2), default=ChaosPlan.hosts,
                        help="2: a second sandbox host (gpu2) joins, and is down for --host-down seconds")
    parser.add_argument("--host-down", type=float, default=ChaosPlan.host_down,
                        help="seconds gpu2 is down (--hosts 2)")
    parser.add_argument("--depth", type=int, default=ChaosPlan.depth,
                        help="cases each group holds at once (2: the next one queued behind the running one)")
    parser.add_argument("--case-seconds", type=float, nargs=2, default=ChaosPlan.case_seconds, metavar=("LOW", "HIGH"),
                        help="an ordinary case simulates between LOW and HIGH seconds")
    parser.add_argument("--calm", action="store_true",
                        help="with --hosts 2: gpu2's outage alone, no other disturbance (a control run)")
    parser.add_argument("--share", action="store_true",
                        help="deliver results to a real sshfs share that hangs, then is unmounted, mid-run")
    parser.add_argument("--scratch", type=Path, default=None, help="work folder (default: a new one in /tmp)")
    args = parser.parse_args(argv)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="mqic-chaos-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop supervisord, sshd, pueued
    plan = ChaosPlan(cases=args.cases, duration=args.duration, seed=args.seed, groups=args.groups,
                     case_timeout=args.case_timeout, hosts=args.hosts, host_down=args.host_down,
                     calm=args.calm and args.hosts > 1, depth=args.depth, case_seconds=tuple(args.case_seconds),
                     share=args.share)
    result = run_chaos(plan, scratch)
    print()
    print(result.table())
    for zone in result.unreached_zones:
        print(f"NOTE: danger zone {zone} was armed but no worker died in it")
    for line in result.verdict.violations:
        print(f"VIOLATION: {line}")
    print(f"\n{'OK: nothing lost' if result.ok else 'FAILED'} (files kept in {scratch})")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
