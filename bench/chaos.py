"""The chaos run: a few hundred cases under real supervisord while everything breaks; nothing may be lost.

One command::

    .venv/bin/python bench/chaos.py [--cases N] [--duration SECONDS] [--seed S] [--scratch DIR]

It starts the sandbox HPC (real sshd + pueue stand-in, ``sandbox.hpc.up``) and supervisord with
``bench/supervisord.chaos.conf`` (one scanner, two submitters, two pollers, two reapers), drops
cases over time (some set to fail) and, for ``--duration`` seconds:

- SIGKILLs random workers (the process alone, or its whole process group with its ssh/scp);
- SIGKILLs workers inside the danger zones, through audit hooks every worker loads from
  ``hooks/sitecustomize.py``: right after a claim, mid-upload, between ``pueue add`` and recording
  the task id, between a database update and its spool move; and kills the owner of a
  ``submitting`` case it sees in the database;
- stops sshd twice (killing the open sessions), restarts the pueue daemon (running tasks become
  Killed, groups with queued tasks paused), makes ``status --json`` print garbage, and kills
  running remote tasks with ``pueue kill``. Every task it kills is recorded as a victim.

Then it waits until every case is final and prints a table; exit status 1 on any violation of
``check_final_state`` (lost, duplicated, wrongly failed, misplaced, ...). Tests import
``ChaosPlan``, ``run_chaos`` and ``check_final_state``.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/chaos.py` puts bench/, not the repo, on sys.path
    sys.path.insert(0, str(REPO))

ZONES = ("after_claim", "mid_upload", "after_add", "before_move")
SPOOL_STAGES = ("queued", "active", "done", "failed")
RESULT_DIR = "output"  # the sandbox fetches hpc.result_files = ["output/*"]


# ---------------------------------------------------------------------------------------------
# Crash hooks: loaded into every worker by hooks/sitecustomize.py (stdlib only, no project imports)
# ---------------------------------------------------------------------------------------------

def install_crash_hooks(tokens_dir: str, hits_dir: str) -> None:
    """Make this process SIGKILL itself in a danger zone whenever a token for that zone exists.

    The driver drops files ``<zone>-<n>`` into ``tokens_dir``; the first worker to reach the
    zone deletes one (only one process can win the unlink), writes ``<zone>-<pid>`` into
    ``hits_dir`` and dies. Zones, seen through Python audit events:

    - ``after_claim``: the first remote command after a claim (removing old upload leftovers);
    - ``mid_upload``: a random 20-300 ms after scp starts (the scp child lives on, orphaned);
    - ``after_add``: the spool lock taken right after ``pueue add`` returned, i.e. before the
      task id is recorded;
    - ``before_move``: a rename into a spool stage, i.e. after the status commit, before the move.
    """
    state = {"busy": False, "add_sent": False}

    def take(zone: str) -> bool:
        try:
            names = sorted(n for n in os.listdir(tokens_dir) if n.startswith(zone + "-"))
        except OSError:
            return False
        for name in names:
            try:
                os.unlink(os.path.join(tokens_dir, name))
            except OSError:
                continue
            return True
        return False

    def die(zone: str) -> None:
        with open(os.path.join(hits_dir, f"{zone}-{os.getpid()}"), "w") as record:
            record.write(" ".join(sys.argv))
        os.kill(os.getpid(), signal.SIGKILL)

    def on_popen(args: tuple) -> None:
        argv = [str(word) for word in (args[1] or [])]
        text = " ".join(argv)
        if "--print-task-id" in text:
            state["add_sent"] = True
        elif "rm -rf" in text and ".mqic-upload-" in text and take("after_claim"):
            die("after_claim")
        elif argv and os.path.basename(argv[0]) == "scp" and take("mid_upload"):
            delay = random.uniform(0.02, 0.3)
            threading.Timer(delay, die, args=("mid_upload",)).start()

    def on_event(event: str, args: tuple) -> None:
        if event == "subprocess.Popen":
            on_popen(args)
        elif event == "open" and state["add_sent"] and str(args[0]).endswith(".spool.lock"):
            state["add_sent"] = False
            if take("after_add"):
                die("after_add")
        elif event == "os.rename" and os.path.basename(os.path.dirname(str(args[1]))) in SPOOL_STAGES:
            if take("before_move"):
                die("before_move")

    def hook(event: str, args: tuple) -> None:
        if state["busy"] or event not in ("subprocess.Popen", "open", "os.rename"):
            return
        state["busy"] = True
        try:
            on_event(event, args)
        finally:
            state["busy"] = False

    sys.addaudithook(hook)


def write_sitecustomize(hooks_dir: Path, tokens_dir: Path, hits_dir: Path) -> Path:
    """Write ``hooks_dir/sitecustomize.py`` that installs the crash hooks in every worker."""
    hooks_dir.mkdir(parents=True, exist_ok=True)
    target = hooks_dir / "sitecustomize.py"
    target.write_text(
        "# Written by bench/chaos.py: SIGKILL this worker in danger zones when a token says so.\n"
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from bench.chaos import install_crash_hooks\n"
        f"install_crash_hooks({str(tokens_dir)!r}, {str(hits_dir)!r})\n")
    return target


# ---------------------------------------------------------------------------------------------
# The checker: what "nothing lost" means, on the final database, spool and pueue state
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expected:
    """What the checker knows: each dropped case's mode, and the labels whose task we killed."""
    modes: dict[str, str]
    victims: frozenset[str] = frozenset()


@dataclass
class Verdict:
    counts: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def add(self, key: str, message: str | None = None, amount: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + amount
        if message:
            self.violations.append(message)

    @property
    def ok(self) -> bool:
        return not self.violations


def check_final_state(db_path: Path, spool_root: Path, watch_path: Path, status_json: str,
                      expected: Expected, groups: tuple[str, ...] = ()) -> Verdict:
    """Check every invariant of a finished run; each broken one is a line in ``violations``.

    Every dropped case has exactly one row, final, its folder in the right stage; one remote
    task per label (a second only after the first was proven gone); a failure only for its true
    reason (mode=fail: ``failed`` exit 1; a recorded victim: ``killed``); no slot busy; every
    event chain a path through the ALLOWED tables; nothing left in the drop folder, the staging
    or rejected folders, nor a stray folder in a stage; ``PRAGMA integrity_check`` ok.
    """
    from shared import pueue
    from shared.db import connect

    verdict = Verdict()
    conn = connect(db_path, readonly=True)
    try:
        rows = [dict(r) for r in conn.execute("SELECT * FROM cases ORDER BY case_id")]
        events = _events_by_case(conn)
        _check_integrity(conn, verdict)
        _check_slots(conn, verdict)
        _check_slot_chains(conn, verdict)
    finally:
        conn.close()
    snapshot = pueue.parse_status(status_json)
    _check_rows_against_drops(rows, expected, verdict)
    for row in rows:
        _check_case(row, events.get(row["case_id"], []), snapshot, expected, spool_root, verdict)
    _check_orphan_tasks(rows, snapshot, verdict)
    _check_groups_running(snapshot, groups, verdict)
    _check_folders(rows, spool_root, watch_path, verdict)
    return verdict


def _events_by_case(conn) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for row in conn.execute("SELECT * FROM case_events ORDER BY event_id"):
        grouped.setdefault(row["case_id"], []).append(dict(row))
    return grouped


def _check_integrity(conn, verdict: Verdict) -> None:
    result = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    verdict.add("integrity_errors", None, 0)
    if result != ["ok"]:
        verdict.add("integrity_errors", f"PRAGMA integrity_check: {result[:3]}")


def _check_slots(conn, verdict: Verdict) -> None:
    verdict.add("busy_slots", None, 0)
    for row in conn.execute("SELECT * FROM gpu_resources WHERE status != 'available'"):
        verdict.add("busy_slots", f"slot {row['pueue_group']} left {row['status']} "
                                  f"(case {row['assigned_case_id']})")


def chain_problems(moves: list[tuple[str | None, str]], allowed: dict, final: str | None) -> list[str]:
    """Why a list of (from, to) events is not a valid path through ``allowed`` ending at ``final``.

    ``allowed`` is one of the tables of ``shared.states``. The first move must come from
    nothing; a move to the same status (a review flag) is allowed anywhere.
    """
    table = {str(frm.value): {str(to.value) for to in tos} for frm, tos in allowed.items()}
    problems, current = [], None
    for index, (frm, to) in enumerate(moves):
        if frm != current:
            problems.append(f"event {index}: from {frm} but the status was {current}")
        elif frm is not None and to != frm and to not in table[frm]:
            problems.append(f"event {index}: {frm} -> {to} is not allowed")
        current = to
    if final is not None and current != final:
        problems.append(f"events end at {current} but the row says {final}")
    return problems


def _check_slot_chains(conn, verdict: Verdict) -> None:
    from shared.states import SLOT_ALLOWED
    verdict.add("bad_event_chains", None, 0)
    slots = {r["pueue_group"]: r["status"] for r in conn.execute("SELECT * FROM gpu_resources")}
    moves: dict[str, list] = {}
    for row in conn.execute("SELECT * FROM slot_events ORDER BY event_id"):
        moves.setdefault(row["pueue_group"], []).append((row["from_status"], row["to_status"]))
    for group, chain in moves.items():
        for problem in chain_problems(chain, SLOT_ALLOWED, slots.get(group)):
            verdict.add("bad_event_chains", f"slot {group}: {problem}")


def _check_rows_against_drops(rows: list[dict], expected: Expected, verdict: Verdict) -> None:
    names = [row["case_name"] for row in rows]
    verdict.add("cases", None, len(expected.modes))
    for name in expected.modes:
        if names.count(name) == 0:
            verdict.add("lost", f"case {name!r} was dropped but has no row")
        elif names.count(name) > 1:
            verdict.add("duplicates", f"case {name!r} registered {names.count(name)} times")
    for name in sorted(set(names) - set(expected.modes)):
        verdict.add("duplicates", f"row for {name!r} that nobody dropped")
    verdict.add("lost", None, 0)
    verdict.add("duplicates", None, 0)


def _check_case(row: dict, events: list[dict], snapshot, expected: Expected, spool_root: Path,
                verdict: Verdict) -> None:
    from shared.states import ALLOWED
    case = f"case {row['case_id']} ({row['case_name']!r})"
    if row["status"] not in ("completed", "failed"):
        verdict.add("lost", f"{case} never finished: {row['status']}")
        return
    verdict.add(row["status"])
    for problem in chain_problems([(e["from_status"], e["to_status"]) for e in events], ALLOWED, row["status"]):
        verdict.add("bad_event_chains", f"{case}: {problem}")
    if row["needs_review"]:
        verdict.add("flagged_for_review", f"{case} flagged for review: {row['review_reason']}")
    _check_stage(row, case, spool_root, verdict)
    tasks = snapshot.by_label(f"mqic_case_{row['case_id']}")
    _check_tasks(row, case, tasks, events, verdict)
    _check_true_reason(row, case, tasks, expected, verdict)


def _check_stage(row: dict, case: str, spool_root: Path, verdict: Verdict) -> None:
    stage = "done" if row["status"] == "completed" else "failed"
    path = Path(row["case_path"])
    if row["spool_stage"] != stage or path.parent != spool_root / stage or not path.is_dir():
        verdict.add("misplaced", f"{case} is {row['status']} but its folder is {path} "
                                 f"(stage {row['spool_stage']}, exists: {path.is_dir()})")
    elif row["status"] == "completed" and not any((path / RESULT_DIR).glob("*")):
        verdict.add("results_lost", f"{case} completed but {path / RESULT_DIR} holds no results")


def _check_tasks(row: dict, case: str, tasks: list, events: list[dict], verdict: Verdict) -> None:
    retried_after_absence = any("TaskVanished" in e["detail"] for e in events)
    if len(tasks) > 1 and not retried_after_absence:
        verdict.add("duplicate_tasks", f"{case} has {len(tasks)} remote tasks: {[t.id for t in tasks]}")
    if row["status"] == "completed" and not any(t.id == row["pueue_task_id"] and t.state.value == "success"
                                                for t in tasks):
        verdict.add("wrongly_completed", f"{case} completed but task {row['pueue_task_id']} did not succeed")


def _check_true_reason(row: dict, case: str, tasks: list, expected: Expected, verdict: Verdict) -> None:
    mode = expected.modes.get(row["case_name"], "ok")
    label = f"mqic_case_{row['case_id']}"
    if row["status"] == "completed":
        if mode == "fail":
            verdict.add("wrongly_completed", f"{case} was set to fail but completed")
        return
    if mode == "fail" and row["outcome"] == "failed" and row["exit_code"] == 1:
        verdict.add("failed_as_designed")
        if "FATAL ERROR" not in (row["log_tail"] or ""):
            verdict.add("log_tail_lost", f"{case} failed as designed but its log tail lacks the "
                                         f"simulator's FATAL ERROR line: {row['log_tail']!r}")
    elif label in expected.victims and row["outcome"] == "killed":
        verdict.add("killed_victims")
    else:
        verdict.add("wrongly_failed", f"{case} (mode {mode}) failed with outcome {row['outcome']}: "
                                      f"{row['error_type']}: {(row['error_message'] or '')[:200]}")


def _check_orphan_tasks(rows: list[dict], snapshot, verdict: Verdict) -> None:
    ids = {f"mqic_case_{row['case_id']}" for row in rows}
    verdict.add("orphan_tasks", None, 0)
    for task in snapshot.tasks.values():
        if task.label and task.label.startswith("mqic_case_") and task.label not in ids:
            verdict.add("orphan_tasks", f"remote task {task.id} carries {task.label}, which no case has")


def _check_groups_running(snapshot, groups: tuple[str, ...], verdict: Verdict) -> None:
    for group in groups:
        info = snapshot.groups.get(group)
        if info is None or info.paused:
            verdict.add("paused_groups", f"pueue group {group} is {info and info.status} at the end")


def _check_folders(rows: list[dict], spool_root: Path, watch_path: Path, verdict: Verdict) -> None:
    owned = {row["case_path"] for row in rows}
    verdict.add("stray_folders", None, 0)
    verdict.add("results_lost", None, 0)
    verdict.add("log_tail_lost", None, 0)
    for stage in SPOOL_STAGES:
        for entry in sorted((spool_root / stage).iterdir()):
            if str(entry) not in owned:
                verdict.add("stray_folders", f"{entry} belongs to no case")
    for where in (spool_root / "rejected", spool_root / ".staging", watch_path):
        leftovers = sorted(p.name for p in where.iterdir()) if where.is_dir() else []
        if leftovers:
            verdict.add("stray_folders", f"{where} is not empty: {leftovers[:5]}")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChaosPlan:
    """How big and how hostile a run is; times in seconds."""
    cases: int = 300
    duration: float = 240.0
    seed: int = 1
    fail_ratio: float = 0.15
    big_ratio: float = 0.1
    groups: int = 4
    kill_every: float = 5.0
    settle_timeout: float = 420.0


@dataclass(frozen=True)
class CaseSpec:
    name: str
    mode: str
    seconds: float
    big: bool
    marker: bool


def case_specs(plan: ChaosPlan) -> list[CaseSpec]:
    """The cases of a run, reproducible from the seed; a few carry hostile names."""
    rng = random.Random(plan.seed)
    hostile = (" pt 'q' $(touch pwned)", " `id`; x", " 환자 \"d\"", " -rf --help")
    specs = []
    for index in range(plan.cases):
        mode = "fail" if rng.random() < plan.fail_ratio else "ok"
        name = f"c{index:04d}_{mode}" + (hostile[index % len(hostile)] if index % 9 == 4 else "")
        specs.append(CaseSpec(name=name, mode=mode, seconds=round(rng.uniform(0.3, 1.8), 2),
                              big=rng.random() < plan.big_ratio, marker=rng.random() < 0.5))
    return specs


class Supervisor:
    """supervisord with bench/supervisord.chaos.conf in ``home``, talked to over its XML-RPC socket."""

    def __init__(self, home: Path, config_path: Path):
        import shutil
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "bench" / "supervisord.chaos.conf", home / "supervisord.conf")
        if not (home / ".venv").exists():
            (home / ".venv").symlink_to(Path(sys.prefix))
        for sub in ("run", "logs", "tokens", "hits"):
            (home / sub).mkdir(exist_ok=True)
        write_sitecustomize(home / "hooks", home / "tokens", home / "hits")
        self.env = {**os.environ, "MQIC_CONFIG": str(config_path)}
        self._rpc = None

    def start(self) -> None:
        import subprocess
        subprocess.run([str(Path(sys.prefix) / "bin" / "supervisord"), "-c", str(self.home / "supervisord.conf")],
                       check=True, env=self.env, cwd=self.home, timeout=30)

    @property
    def rpc(self):
        if self._rpc is None:
            import xmlrpc.client
            from supervisor.xmlrpc import SupervisorTransport
            transport = SupervisorTransport(None, None, f"unix://{self.home / 'run' / 'supervisor.sock'}")
            self._rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        return self._rpc

    def running_pids(self) -> dict[str, int]:
        """{process name: pid} of the workers that are RUNNING right now."""
        return {p["name"]: p["pid"] for p in self.rpc.supervisor.getAllProcessInfo()
                if p["statename"] == "RUNNING" and p["pid"]}

    def shutdown(self) -> None:
        import subprocess
        subprocess.run([str(Path(sys.prefix) / "bin" / "supervisorctl"), "-c", str(self.home / "supervisord.conf"),
                        "shutdown"], capture_output=True, env=self.env, cwd=self.home, timeout=120)
        deadline = time.monotonic() + 60
        while (self.home / "run" / "supervisord.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.2)


@dataclass
class Disturbances:
    """What the driver did, for the table and for the checker (victims)."""
    sigkills: int = 0
    group_kills: int = 0
    owner_kills: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ZONES, 0))
    outages: int = 0
    restarts: int = 0
    paused_by_restart: int = 0
    garbage_polls: int = 0
    remote_kills: int = 0
    victims: set[str] = field(default_factory=set)


@dataclass
class ChaosResult:
    plan: ChaosPlan
    verdict: Verdict
    done: Disturbances
    zone_hits: dict[str, int]
    elapsed: float
    settled: bool

    @property
    def ok(self) -> bool:
        return self.verdict.ok and self.settled

    def table(self) -> str:
        """The summary as a Markdown table (pasted into docs/chaos.md)."""
        v, d = self.verdict.counts, self.done
        rows = [
            ("cases dropped", self.plan.cases),
            ("completed", v.get("completed", 0)),
            ("failed as designed (mode=fail, exit 1)", v.get("failed_as_designed", 0)),
            ("failed because we killed their task (victims)", v.get("killed_victims", 0)),
            ("worker SIGKILLs at random (process / process group)", f"{d.sigkills} ({d.sigkills - d.group_kills} / {d.group_kills})"),
            ("owner of a `submitting` case SIGKILLed", d.owner_kills),
        ]
        rows += [(f"danger zone `{zone}`: deaths / tokens", f"{self.zone_hits.get(zone, 0)} / {d.tokens[zone]}")
                 for zone in ZONES]
        rows += [
            ("sshd outages (sessions killed)", d.outages),
            ("pueue daemon restarts (groups paused)", f"{d.restarts} ({d.paused_by_restart})"),
            ("garbage `status --json` answers", d.garbage_polls),
            ("remote tasks killed (`pueue kill`)", d.remote_kills),
            ("**lost** (no row, or never final)", v.get("lost", 0)),
            ("**duplicates** (registrations + remote tasks per label)", v.get("duplicates", 0) + v.get("duplicate_tasks", 0)),
            ("**wrongly failed**", v.get("wrongly_failed", 0)),
            ("**wrongly completed**", v.get("wrongly_completed", 0)),
            ("**misplaced / stray folders**", v.get("misplaced", 0) + v.get("stray_folders", 0)),
            ("**completed without their results**", v.get("results_lost", 0)),
            ("**failed without their log tail**", v.get("log_tail_lost", 0)),
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


class ChaosRun:
    """One chaos run in ``scratch``: sandbox HPC, supervisord, feeder, disturbances, check."""

    def __init__(self, plan: ChaosPlan, scratch: Path, say: Callable[[str], None] = say_now):
        self.plan, self.scratch, self.say = plan, Path(scratch).resolve(), say
        self.rng = random.Random(plan.seed + 1)
        self.specs = case_specs(plan)
        self.done = Disturbances()
        self.t0 = time.monotonic()
        self.sandbox = None
        self.supervisor: Supervisor | None = None
        self.groups = tuple(f"gpu_{chr(ord('a') + i)}" for i in range(plan.groups))

    # -- set-up -------------------------------------------------------------------------------
    def start(self) -> None:
        from sandbox.hpc import up
        groups = {name: {"gpu": index} for index, name in enumerate(self.groups)}
        self.sandbox = up(self.scratch / "hpc", groups=groups,
                          scanner={"quiescence_period_seconds": 0.5, "rescan_interval_seconds": 2},
                          hpc={"connect_timeout_seconds": 3, "command_timeout_seconds": 8},
                          main_loop={"interval_seconds": 0.4, "lease_seconds": 12, "max_attempts": 100,
                                     "backoff_base_seconds": 1, "backoff_cap_seconds": 4,
                                     "running_case_timeout_hours": 2, "stuck_after_minutes": 60},
                          logging={"json_stdout": False})
        self.config = self._load_config()
        assert self.config.pueue.resume_paused_groups  # sandbox.hpc's default; up() cannot take a pueue section
        self.supervisor = Supervisor(self.scratch / "sup", self.sandbox.config_path)
        self.supervisor.start()
        self.note(f"sandbox HPC and supervisord up in {self.scratch}")

    def _load_config(self):
        from shared.config import load_config
        return load_config(self.sandbox.config_path)

    def note(self, message: str) -> None:
        self.say(f"[{time.monotonic() - self.t0:7.1f}s] {message}")

    # -- feeding --------------------------------------------------------------------------------
    def feed(self, stop: threading.Event) -> None:
        """Drop the cases evenly over the first 70 % of the run (folders appear atomically)."""
        from sandbox.casegen import make_case
        spacing = 0.7 * self.plan.duration / max(1, len(self.specs))
        for index, spec in enumerate(self.specs):
            if stop.wait(max(0.0, self.t0 + index * spacing - time.monotonic())):
                return
            make_case(self.config.scanner.watch_path, spec.name, atomic=True, seconds=spec.seconds, batches=3,
                      mode=spec.mode, deliveries=3 if spec.big else 1, layers_per_delivery=3 if spec.big else 2,
                      ptn_bytes=700_000 if spec.big else 20_000, marker="_CASE_READY" if spec.marker else None,
                      seed=index)

    # -- disturbances -----------------------------------------------------------------------------
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
        self.done.tokens[zone] += 1
        (self.supervisor.home / "tokens" / f"{zone}-{self.done.tokens[zone]}").touch()

    def zone_hits(self) -> dict[str, int]:
        hits = dict.fromkeys(ZONES, 0)
        for entry in (self.supervisor.home / "hits").iterdir():
            zone = entry.name.rsplit("-", 1)[0]
            hits[zone] = hits.get(zone, 0) + 1
        return hits

    def sshd(self):
        from sandbox.sshd import SandboxSshd
        return SandboxSshd.from_state(self.scratch / "hpc" / "sshd")

    def outage_begins(self) -> None:
        self.sshd().stop(kill_sessions=True)
        self.done.outages += 1
        self.note("sshd stopped, sessions killed")

    def outage_ends(self) -> None:
        self.sshd().start()
        self.note("sshd started again")

    def tasks(self) -> list:
        """Every task, read with ``log --json`` so that our reads never eat a garbage answer."""
        from shared import pueue
        answer = self.sandbox.pueue_cli("log", "--json", "--all", "--lines", "1")
        return [entry.task for entry in pueue.parse_log(answer.stdout).values()]

    def paused_groups(self) -> list[str]:
        from shared import pueue
        groups = pueue.parse_groups(self.sandbox.pueue_cli("group", "--json").stdout)
        return sorted(name for name, group in groups.items() if group.paused)

    def final_status_json(self) -> str:
        """``status --json`` for the checker (retried past any garbage answer still pending)."""
        from shared import pueue
        from shared.errors import BadOutput
        for _ in range(20):
            text = self.sandbox.pueue_cli("status", "--json").stdout
            try:
                pueue.parse_status(text)
                return text
            except BadOutput:
                continue
        return text

    def killed_labels(self) -> set[str]:
        from shared.pueue import TaskState
        return {t.label for t in self.tasks()
                if t.label and t.label.startswith("mqic_case_") and t.state is TaskState.KILLED}

    def running_tasks(self, patience: float = 6.0) -> list:
        """Our running tasks, waiting up to ``patience`` seconds for at least one."""
        from shared.pueue import TaskState
        deadline = time.monotonic() + patience
        while True:
            running = [t for t in self.tasks() if t.state is TaskState.RUNNING
                       and t.label and t.label.startswith("mqic_case_")]
            if running or time.monotonic() > deadline:
                return running
            time.sleep(0.1)

    def restart_pueue_daemon(self) -> None:
        """Crash and restart pueued; queued work (a foreign task behind ours) gets its group paused."""
        before = self.killed_labels()
        for group in sorted({t.group for t in self.running_tasks()})[:2]:
            self.sandbox.pueue_cli("add", "-g", group, "--", "sleep 0.2", check=False)
        self.sandbox.ctl("restart")
        victims = self.killed_labels() - before
        paused = self.paused_groups()
        self.done.victims |= victims
        self.done.restarts += 1
        self.done.paused_by_restart += len(paused)
        self.note(f"pueue daemon restarted: {len(victims)} tasks killed, paused groups {paused}")

    def garbage(self, count: int = 5) -> None:
        self.sandbox.ctl("garbage", str(count))
        self.done.garbage_polls += count
        self.note(f"next {count} status answers are garbage")

    def kill_remote_task(self) -> None:
        running = self.running_tasks()
        if not running:
            return
        task = self.rng.choice(running)
        answer = self.sandbox.pueue_cli("kill", str(task.id), check=False)
        if "being killed" in answer.stdout + answer.stderr:
            self.done.victims.add(task.label)
            self.done.remote_kills += 1
            self.note(f"killed remote task {task.id} ({task.label})")

    # -- schedule ---------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[float, str, Callable[[], None]]]:
        """(second, name, action) for the whole run, sorted by time."""
        d = self.plan.duration
        outage = min(12.0, max(3.0, 0.05 * d))
        plan: list[tuple[float, str, Callable[[], None]]] = []
        for start in (0.25, 0.6):
            plan += [(start * d, "outage", self.outage_begins), (start * d + outage, "heal", self.outage_ends)]
        plan += [(f * d, "restart", self.restart_pueue_daemon) for f in ((0.4, 0.8) if d >= 120 else (0.45,))]
        plan += [(f * d, "garbage", self.garbage) for f in (0.33, 0.7)]
        kills = max(3, int(d / 25))
        plan += [((i + 0.5) / kills * 0.85 * d, "remote kill", self.kill_remote_task) for i in range(kills)]
        plan += [((i + 0.3) / kills * 0.85 * d, "owner kill", self.kill_owner_of_a_claim) for i in range(kills)]
        tokens = max(2, int(d / 30))
        for offset, zone in enumerate(ZONES):
            plan += [((i + 0.1 + offset * 0.05) / tokens * 0.8 * d, zone, lambda z=zone: self.drop_token(z))
                     for i in range(tokens)]
        randoms = int(d / self.plan.kill_every)
        plan += [((i + 0.7) * self.plan.kill_every, "random kill", self.kill_random_worker) for i in range(randoms)]
        return sorted(plan, key=lambda item: item[0])

    def disturb(self) -> None:
        for at, name, action in self.schedule():
            pause = self.t0 + at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                action()
            except Exception as exc:  # a disturbance that could not happen is reported, not fatal
                self.note(f"{name} could not be done: {type(exc).__name__}: {exc}")
        if not self.sshd().is_running():
            self.outage_ends()

    # -- the end ----------------------------------------------------------------------------------
    def settled(self) -> bool:
        from shared.db import connect
        conn = connect(self.config.database_path, readonly=True)
        try:
            rows = conn.execute("SELECT COUNT(*), SUM(status IN ('completed','failed')) FROM cases").fetchone()
            busy = conn.execute("SELECT COUNT(*) FROM gpu_resources WHERE status != 'available'").fetchone()[0]
        finally:
            conn.close()
        waiting = [n for n in os.listdir(self.config.scanner.watch_path)]
        return rows[0] == len(self.specs) and rows[1] == rows[0] and busy == 0 and not waiting

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
        stop = threading.Event()
        try:
            self.start()
            feeder = threading.Thread(target=self.feed, args=(stop,), name="feeder", daemon=True)
            feeder.start()
            self.disturb()
            feeder.join()
            self.note("chaos over; waiting for every case to be final")
            settled = self.wait_for_the_end()
            self.supervisor.shutdown()
            return self.judge(settled)
        finally:
            stop.set()
            self.tear_down()

    def judge(self, settled: bool) -> ChaosResult:
        verdict = check_final_state(self.config.database_path, self.config.spool_path,
                                    self.config.scanner.watch_path, self.final_status_json(),
                                    Expected(modes={s.name: s.mode for s in self.specs},
                                             victims=frozenset(self.done.victims)), groups=self.groups)
        return ChaosResult(plan=self.plan, verdict=verdict, done=self.done, zone_hits=self.zone_hits(),
                           elapsed=time.monotonic() - self.t0, settled=settled)

    def tear_down(self) -> None:
        """Stop supervisord (if still up), the pueue daemon and sshd; the files stay for inspection."""
        from sandbox.hpc import down
        if self.supervisor is not None and (self.supervisor.home / "run" / "supervisord.pid").exists():
            self.supervisor.shutdown()
        if self.sandbox is not None:
            down(self.scratch / "hpc")
            from shared.remote import Remote
            Remote(self.config.hpc).close()


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
    parser.add_argument("--scratch", type=Path, default=None, help="work folder (default: a new one in /tmp)")
    args = parser.parse_args(argv)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="mqic-chaos-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop supervisord, sshd, pueued
    plan = ChaosPlan(cases=args.cases, duration=args.duration, seed=args.seed, groups=args.groups)
    result = run_chaos(plan, scratch)
    print()
    print(result.table())
    for line in result.verdict.violations:
        print(f"VIOLATION: {line}")
    print(f"\n{'OK: nothing lost' if result.ok else 'FAILED'} (files kept in {scratch})")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
