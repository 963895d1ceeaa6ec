"""Two of each worker on one database: no double submission, no lost update, no stray folder.

Real processes (``python -m workers.X --name X_i``) against the sandbox HPC, then contention
on the database itself (threads, each with its own connection), then the races between
pollers that the chaos run found (see docs/chaos.md), pinned down deterministically on the
HPC in memory (``tests/memory_hpc.py``, the fast tier).
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.chaos import Expected, chain_problems, check_final_state
from sandbox.casegen import make_case
from shared import tasks, verdicts
from shared.backends import model
from shared.claims import claim_next_case
from shared.db import connect
from shared.seats import SeatSpec, sync_slots
from shared.states import ALLOWED, CaseStatus, SlotStatus
from shared.store import get_case, register_case, transition
from tests.conftest import wait_until
from workers import poller, reaper, scanner, submitter

GROUPS = {"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}, "gpu_c": {"gpu": 2}}
FAST = {"scanner": {"quiescence_period_seconds": 0.3, "rescan_interval_seconds": 1},
        "hpc": {"command_timeout_seconds": 8},
        "main_loop": {"interval_seconds": 0.2, "poll_interval_seconds": 0.2, "lease_seconds": 10,
                      "backoff_base_seconds": 0.5, "backoff_cap_seconds": 2, "max_attempts": 20}}


def start_workers(h, log_dir: Path) -> list[subprocess.Popen]:
    """One scanner and two each of submitter, poller and reaper, as real processes."""
    names = ["scanner"] + [f"{program}_{i}" for program in ("submitter", "poller", "reaper") for i in (1, 2)]
    procs = []
    for name in names:
        module = name.split("_")[0]
        with open(log_dir / f"{name}.err", "w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", f"workers.{module}", "--config", str(h.config_path), "--name", name],
                stdout=subprocess.DEVNULL, stderr=err))
    return procs


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_two_submitters_pollers_and_reapers_lose_nothing_and_submit_once(hpc, tmp_path):
    h = hpc(groups=GROUPS, **FAST)
    modes = {f"k{i:02d}": "fail" if i % 5 == 2 else "ok" for i in range(15)}
    procs = start_workers(h, tmp_path)
    try:
        for name, mode in modes.items():
            make_case(h.config.scanner.watch_path, name, atomic=True, seconds=0.3, batches=2, mode=mode,
                      deliveries=1, layers_per_delivery=1)
        conn = connect(h.config.database_path)

        def all_final() -> bool:
            final = conn.execute("SELECT COUNT(*) FROM cases WHERE status IN ('completed','failed')").fetchone()[0]
            busy = conn.execute("SELECT COUNT(*) FROM gpu_resources WHERE status != 'available'").fetchone()[0]
            return final == len(modes) and busy == 0

        wait_until(all_final, timeout=90, interval=0.3, message="every case final, every slot free")
        conn.close()
    finally:
        stop_workers(procs)
    verdict = check_final_state(h.config.database_path, h.config.spool_path, h.config.scanner.watch_path,
                                h.pueue("status", "--json").stdout, Expected(modes=modes), groups=tuple(GROUPS))
    assert verdict.violations == []
    assert verdict.counts["completed"] == 12 and verdict.counts["failed_as_designed"] == 3


def test_concurrent_claims_never_take_a_case_or_a_slot_twice(tmp_path):
    db = tmp_path / "state.db"
    conn = connect(db)
    sync_slots(conn, [SeatSpec("hpc", f"g{i}", 0) for i in range(4)], now=0, worker="setup")
    for i in range(12):
        register_case(conn, case_name=f"c{i}", source_path=f"/nowhere/c{i}", now=i, worker="setup")
    conn.execute("UPDATE cases SET spool_stage = 'queued'")  # as the scanner leaves them
    claims: list[tuple[int, str]] = []
    start = threading.Barrier(6)

    def claimer(index: int) -> None:
        own = connect(db, migrate=False)
        start.wait()
        for _ in range(6):
            claim = claim_next_case(own, worker=f"w{index}", now=100, lease_seconds=60)
            if claim is not None:
                claims.append((claim.case.case_id, claim.group))
        own.close()

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claims) == 4                                   # one per slot, never more
    assert len({case for case, _ in claims}) == 4 and len({group for _, group in claims}) == 4
    for case_id, group in claims:
        row = conn.execute("SELECT assigned_case_id, status FROM gpu_resources WHERE pueue_group = ?",
                           (group,)).fetchone()
        assert tuple(row) == (case_id, "assigned")


def test_concurrent_moves_of_one_case_have_exactly_one_winner(tmp_path):
    db = tmp_path / "state.db"
    conn = connect(db)
    case = register_case(conn, case_name="contended", source_path="/nowhere", now=0, worker="setup")
    transition(conn, case.case_id, CaseStatus.SUBMITTED, CaseStatus.SUBMITTING, now=1, worker="setup")
    transition(conn, case.case_id, CaseStatus.SUBMITTING, CaseStatus.RUNNING, now=2, worker="setup")
    wins: list[str] = []
    start = threading.Barrier(8)

    def finisher(index: int) -> None:
        own = connect(db, migrate=False)
        start.wait()
        to = (CaseStatus.COMPLETED, CaseStatus.FAILED, CaseStatus.SUBMITTED)[index % 3]
        if transition(own, case.case_id, CaseStatus.RUNNING, to, now=3, worker=f"w{index}"):
            wins.append(to.value)
        own.close()

    threads = [threading.Thread(target=finisher, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1
    moves = [(r["from_status"], r["to_status"]) for r in
             conn.execute("SELECT * FROM case_events WHERE case_id = ? ORDER BY event_id", (case.case_id,))]
    assert chain_problems(moves, ALLOWED, wins[0]) == []
    assert get_case(conn, case.case_id).status.value == wins[0]


# -- the poller races the chaos run found -----------------------------------------------------------

def running_case_with_finished_task(sandbox, name: str):
    """A case running on the HPC in memory whose task has just finished, and what a look says of it."""
    ctx = sandbox.context("poller_1")
    make_case(sandbox.config.scanner.watch_path, name, atomic=True, seconds=0.1, batches=1, deliveries=1,
              layers_per_delivery=1)
    scanner.tick(ctx, ctx.clock() - 100)
    scanner.tick(ctx, ctx.clock())
    submitter.tick(ctx, ctx.clock())
    case = get_case(ctx.conn, 1)
    assert case.status is CaseStatus.RUNNING
    sandbox.clock.advance(1)
    link = tasks.resolve(case, ctx.hosts["hpc"].snapshot())
    assert link.found is tasks.Found.FINISHED
    return ctx, case, link


def stage_entries(ctx, stage: str) -> list[str]:
    return sorted(p.name for p in ctx.spool.stage_dir(stage).iterdir())


def test_a_second_poller_finishing_the_same_case_leaves_no_stray_folder(memory_hpc):
    """Bug: complete() downloads into case.case_path before its compare-and-set; the poller
    that loses the race re-creates ``spool/active/<case>/output`` after the winner moved it."""
    h = memory_hpc(groups={"gpu_a": {"gpu": 0}})
    ctx_a, case, task = running_case_with_finished_task(h, "raced")
    ctx_b = h.context("poller_2")
    assert poller.complete(ctx_a, ctx_a.hosts["hpc"], case, task, h.clock())
    assert not poller.complete(ctx_b, ctx_b.hosts["hpc"], case, task, h.clock())     # read before A moved it: stale
    done = get_case(ctx_a.conn, case.case_id)
    assert done.status is CaseStatus.COMPLETED and list(Path(done.case_path, "output").iterdir())
    assert stage_entries(ctx_a, "active") == []


def test_results_land_in_the_case_folder_even_when_its_row_lags_behind_the_folder(memory_hpc):
    """Bug: settle_folder renames first and records the new path after; a poller reading the row in
    between (or after a crash there) downloads into the old path. The case completes without its
    results, and its input folder is left behind in a stage."""
    h = memory_hpc(groups={"gpu_a": {"gpu": 0}})
    ctx, case, task = running_case_with_finished_task(h, "lagging")
    queued = ctx.spool.stage_dir("queued") / case.folder_name
    ctx.conn.execute("UPDATE cases SET spool_stage = 'queued', case_path = ? WHERE case_id = ?",
                     (str(queued), case.case_id))                 # the folder is already in active
    stale = get_case(ctx.conn, case.case_id)
    assert poller.apply(ctx, ctx.hosts["hpc"], stale, task, model.Snapshot({}, {}), {}, h.clock())
    done = get_case(ctx.conn, case.case_id)
    assert done.status is CaseStatus.COMPLETED
    assert list(Path(done.case_path, "output").iterdir()), "the results must be in the done folder"
    assert (Path(done.case_path) / "mqi_fake.json").is_file(), "the case itself must be in the done folder"
    assert (stage_entries(ctx, "queued"), stage_entries(ctx, "active")) == ([], [])


def test_a_reconcile_during_the_download_does_not_split_the_case(memory_hpc):
    """A crash right after a status commit leaves the folder behind; the reconcile that moves it
    may run while the poller downloads into the path it read before."""
    from shared.spool import reconcile
    h = memory_hpc(groups={"gpu_a": {"gpu": 0}})
    ctx, case, task = running_case_with_finished_task(h, "moved")
    queued = ctx.spool.stage_dir("queued") / case.folder_name
    Path(case.case_path).rename(queued)                           # row says running, folder still queued
    ctx.conn.execute("UPDATE cases SET spool_stage = 'queued', case_path = ? WHERE case_id = ?",
                     (str(queued), case.case_id))
    stale = get_case(ctx.conn, case.case_id)                      # the poller reads ...
    assert reconcile(ctx.conn, ctx.spool, now=h.clock(), worker="reaper_1") == 1   # ... the reaper moves
    assert poller.complete(ctx, ctx.hosts["hpc"], stale, task, h.clock())
    done = get_case(ctx.conn, case.case_id)
    assert done.status is CaseStatus.COMPLETED and (Path(done.case_path) / "mqi_fake.json").is_file()
    assert list(Path(done.case_path, "output").iterdir()), "the results must be in the done folder"
    assert (stage_entries(ctx, "queued"), stage_entries(ctx, "active")) == ([], [])
    assert ctx.conn.execute("SELECT status FROM gpu_resources").fetchone()[0] == SlotStatus.AVAILABLE.value


@pytest.mark.system  # it starts a process, for the pid of a dead one
def test_a_poller_killed_while_downloading_leaves_no_staging_folder_for_good(memory_hpc):
    """Found by the long chaos run. Results are fetched into ``spool/.staging/results-<id>.<pid>``
    and removed in a ``finally``; a SIGKILL skips that, and nothing ever removes the folder
    (result files can be large). Housekeeping must sweep scratch folders of dead processes."""
    h = memory_hpc(groups={"gpu_a": {"gpu": 0}})
    ctx = h.context("reaper_1")
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = ctx.spool.root / ".staging" / f"results-7.{dead.pid}"
    (leftover / "output").mkdir(parents=True)
    (leftover / "output" / "dose.raw").write_bytes(b"\0" * 1024)
    mine = ctx.spool.staging_dir("results-8")                  # a live process's folder stays
    mine.mkdir(parents=True)
    reaper.tick(ctx, h.clock())
    assert not leftover.exists(), "a dead poller's staging folder was never swept"
    assert mine.exists()


def test_a_poller_that_read_a_case_before_its_requeue_cannot_touch_its_next_run(memory_hpc):
    """Bug (two-host chaos, depth 2): poller B read case 22 running as task 21; poller A requeued it
    (killed by a signal we did not send) and a submitter ran it again as task 33; B's stale pass then
    moved the NEW run back to submitted ("task 21 vanished"), a second submitter re-uploaded the
    folder under the running task 33, and the case failed. Every poller change is now guarded on
    the run it read (``running_since``, task id)."""
    h = memory_hpc(groups={"gpu_a": {"gpu": 0}})
    ctx, first_run, link = running_case_with_finished_task(h, "requeued")
    host = ctx.hosts["hpc"]
    killed = verdicts.verdict_for(dataclasses.replace(link, result=model.TaskState.KILLED), verdicts.Phase.RUNNING)
    assert poller.run_again(ctx, first_run, killed, "killed by someone", h.clock())
    host.backend.remove([first_run.task_id])
    h.clock.advance(60)
    submitter.tick(ctx, h.clock())                                     # the next run, after the backoff
    next_run = get_case(ctx.conn, first_run.case_id)
    assert next_run.status is CaseStatus.RUNNING and next_run.running_since != first_run.running_since
    gone = tasks.Link(tasks.Found.ABSENT, detail="read before the requeue")
    assert not poller.apply(ctx, host, first_run, gone, model.Snapshot({}, {}), {}, h.clock())
    assert not poller.complete(ctx, host, first_run, link, h.clock())
    assert not poller.update_progress(ctx, first_run, link, "Generating particles for (1 of 2 batches)", h.clock())
    now = get_case(ctx.conn, first_run.case_id)
    assert (now.status, now.task_id, now.running_since, now.progress) == \
        (CaseStatus.RUNNING, next_run.task_id, next_run.running_since, next_run.progress)
    seat = next(s for s in reaper.all_slots(ctx.conn) if s.assigned_case_id == first_run.case_id)
    assert seat.status is SlotStatus.ASSIGNED                          # the next run keeps its GPU
