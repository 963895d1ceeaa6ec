"""submitter: claims a ``submitted`` case with a free seat on some host, uploads it there, submits it.

A seat is one of a slot's ``depth`` places on one host (``shared.claims.claim_next_case``
picks it: idle GPUs first, then the host the case was pre-uploaded to). Each host has
its own connection and readiness, so a host that is down or not ready only loses its
own seats.

The process runs one claim loop and one stager loop per host (threads, each with its own
database connection): a host whose every remote call takes seconds slows only its own
claims, uploads, submits and pre-uploads. The main loop recovers expired claims. ``tick``
and ``stage_tick`` do the same work in one thread, all hosts in turn (tests, one pass).

Exactly-once rule: a failure *before* the submit was sent (upload, verify) sends
the case back to ``submitted`` at once; a failure *at or after* it (the submit may
have landed) leaves the case ``submitting`` with its lease cut short, so that
``recover_claim`` looks the task up by label before anything is retried. Which is which
the backend says by the error's type (``shared.errors``), never by its text.
"""
from __future__ import annotations

import shlex
import sys
import threading
import math
import statistics
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

from shared import eta, tasks
from shared.backends import SubmitItem
from shared.claims import (
    Claim, claim_for_staging, claim_next_case, free_slots, idle_slots, mark_staged, release_staging,
    renew_lease, staged_waiting)
from shared.db import connect
from shared.doorbell import listen, ring
from shared.errors import (HostKeyMismatch, MqicError, RemoteError, RemoteFailure, ResourceShortage, SlotLost,
                           Unreachable, WorkdirMissing)
from shared.lifecycle import move_case, retry_or_fail
from shared.logs import for_case
from shared.maintenance import is_drained
from shared.recovery import recover_expired_claims
from shared.remote import UploadCase
from shared.states import CaseStatus
from shared.store import Case, SUBMIT_CLEARS, cases_with_status, update_case
from shared.worker import (REPEAT_LOG_SECONDS, Context, Host, note_reach, per_item, reachable_hosts, start_host_loops,
                           wake_loops, worker_main, worth_logging)

STAGER = "stager"             # the stager loops are named <worker>-stager@<host>
UPLOADS_TIMED = 20            # a host's upload time is the median of its last uploads in this process
PACE_READ_EVERY = 60.0        # seconds: a host's run time (shared.eta.host_paces) is read again this often
SPACE_PAUSE_SECONDS = 300.0   # a pre-upload refused for space: no pre-upload to that host for this long
BATCH_MOST = 16               # cases a host's claim loop takes at once: up in one stream, submitted in one call



class LeaseLost(MqicError):
    """Another worker recovered this claim while we were still working on it."""


def render_command(template: str, case: Case, remote_dir: str) -> str:
    """The remote command for a case, wrapped so that it leaves its exit record.

    ``{case_id}``, ``{case_name}``, ``{remote_dir}`` are shell-quoted (the config
    refuses them inside quotes, where quoting would not protect).
    """
    command = template.format(case_id=case.case_id, case_name=shlex.quote(case.case_name),
                              remote_dir=shlex.quote(remote_dir))
    return tasks.wrap_command(command)


def task_env(case: Case, remote_dir: str, gpu: str | None) -> dict[str, str]:
    """What the task finds in its environment: the case, its folder, and its GPU."""
    env = {"MQIC_CASE_ID": str(case.case_id), "MQIC_CASE_NAME": case.case_name, "MQIC_REMOTE_DIR": remote_dir}
    return env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu}


@contextmanager
def lease_keeper(ctx: Context, case_ids: Sequence[int], status: CaseStatus) -> Iterator[set[int]]:
    """Renew the claims' leases in the background while a long upload runs.

    Yields the set of the case ids whose lease was lost (someone recovered that claim).
    """
    stop, lost = threading.Event(), set()
    lease = ctx.config.main_loop.lease_seconds

    def renew() -> None:
        conn = connect(ctx.config.database_path, migrate=False)
        try:
            while len(lost) < len(case_ids) and not stop.wait(lease / 3):
                lost.update(case_id for case_id in case_ids if case_id not in lost and not renew_lease(
                    conn, case_id, worker=ctx.worker_id, now=ctx.clock(), lease_seconds=lease, status=status))
        finally:
            conn.close()

    thread = threading.Thread(target=renew, name=f"lease-{case_ids[0]}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()


# What became of one case's upload: its folder on the HPC, or why it is not there.
UploadDone = str | RemoteFailure | LeaseLost


def upload_cases(ctx: Context, host: Host, cases: Sequence[Case],
                 status: CaseStatus = CaseStatus.SUBMITTING) -> dict[int, UploadDone]:
    """Upload the case folders to ``host`` in ONE stream, each verified and renamed into place on its
    own (``Remote.upload_many``), while keeping their claims' leases alive. Per case id: its folder
    on the HPC, its own failure, or LeaseLost when its claim was recovered meanwhile."""
    with lease_keeper(ctx, [case.case_id for case in cases], status) as lost:
        started = time.monotonic()
        outcomes = host.remote.upload_many([UploadCase(Path(case.case_path), case.folder_name, case.case_id)
                                            for case in cases])
        took = time.monotonic() - started
    cut_off = [outcome for outcome in outcomes if isinstance(outcome, (Unreachable, HostKeyMismatch))]
    if cut_off:
        note_reach(ctx, host, cut_off[0])  # no new claims for this host until it answers again
    if any(not isinstance(outcome, RemoteFailure) for outcome in outcomes):
        ctx.memory.upload_seconds.setdefault(host.name, deque(maxlen=UPLOADS_TIMED)).append(took / len(cases))
    done: dict[int, UploadDone] = {}
    for case, outcome in zip(cases, outcomes):
        if isinstance(outcome, RemoteFailure):
            done[case.case_id] = outcome
        elif case.case_id in lost:
            done[case.case_id] = LeaseLost(f"case {case.case_id}: claim lost during upload")
        else:
            done[case.case_id] = outcome.remote_dir
    return done


def staging_host(ctx: Context, now: float) -> Host | None:
    """The ready host with the most room for pre-uploads (``staging_room``), if any has room."""
    best, best_room = None, 0
    for host in ready_hosts(ctx):
        room = staging_room(ctx, host, now)
        if room > best_room:
            best, best_room = host, room
    return best


def staging_room(ctx: Context, host: Host, now: float) -> int:
    """How many more cases to pre-upload to ``host`` now: none while it is not ready, drained, or held
    back for space; else one per free seat (each claim then needs one remote call, not an upload)
    plus ``pre_upload_depth`` (the cases that follow as seats free), less those already there, and
    never past the host's seats (the space rule)."""
    if host.name not in {h.name for h in ready_hosts(ctx)} or is_drained(ctx.conn, host.name) or \
            ctx.memory.staging_paused_until.get(host.name, 0.0) > now:
        return 0
    wanted = free_slots(ctx.conn, ready_seats([host])) + pre_upload_depth(ctx, host, now)
    return min(wanted, host_seats(host)) - staged_waiting(ctx.conn, host.name)


def host_seats(host: Host) -> int:
    return sum(slot.depth for slot in host.config.slots)


def pre_upload_depth(ctx: Context, host: Host, now: float) -> int:
    """How many cases ``host`` keeps uploaded ahead for the seats that free next: those its GPUs
    free while one more case goes up (GPUs × upload time / run time), at least one per slot.

    Run time: the host's pace (``shared.eta.host_paces``: its recent runs, else all hosts', else
    the running cases' progress). Upload time: the median of this process's recent uploads to it,
    else the pace's measured hand-off (claim to task on the HPC)."""
    pace = host_pace(ctx, host, now)
    timed = ctx.memory.upload_seconds.get(host.name)
    upload = statistics.median(timed) if timed else pace.handoff_seconds
    gpus = sum(slot.parallel for slot in host.config.slots)
    freeing = math.ceil(gpus * upload / max(pace.run_seconds, 1.0))
    return max(len(host.config.slots), freeing)


def host_pace(ctx: Context, host: Host, now: float) -> eta.Pace:
    """The host's pace, read again at most every ``PACE_READ_EVERY`` seconds."""
    read_at, pace = ctx.memory.paces.get(host.name, (None, None))
    if pace is None or now - read_at >= PACE_READ_EVERY or now < read_at:
        running = cases_with_status(ctx.conn, CaseStatus.RUNNING, limit=eta.RECENT_RUNS)
        pace = eta.host_paces(ctx.conn, [host.name], now, running)[host.name]
        ctx.memory.paces[host.name] = (now, pace)
    return pace


def stage_tick(ctx: Context, now: float) -> int:
    """One pre-upload to the host with the most room (``staging_host``), in this thread: a pass
    over all hosts for tests; the process runs ``stage_on`` in a loop per host instead."""
    host = staging_host(ctx, now)
    return 0 if host is None else stage_on(ctx, host, now, most=1)


def stage_on(ctx: Context, host: Host, now: float, *, most: int = BATCH_MOST) -> int:
    """A host's stager pass: upload the next waiting cases ahead to ``host``, as many as it has room
    for (up to ``most``), in one stream.

    Runs beside the claim loops, so a seat is handed a case that is already on the HPC, and a
    freed seat its next case at once even while an upload is under way. It leaves the cases at
    the head of the queue that the next claim pass takes to the claims.
    """
    room = staging_room(ctx, host, now)
    cases = claim_for_staging_many(ctx, now, min(room, most)) if room > 0 else []
    if not cases:
        return 0
    uploads = upload_cases(ctx, host, cases, CaseStatus.SUBMITTED)
    for case in cases:
        with per_item(ctx, case.case_id, "prestage"):
            record_pre_upload(ctx, host, case, uploads[case.case_id], now)
    return len(cases)


def claim_for_staging_many(ctx: Context, now: float, most: int) -> list[Case]:
    """Up to ``most`` cases taken for a pre-upload, past those the next claim pass takes (as many as
    there are free seats, up to ``BATCH_MOST``): with many seats free (a start, a new host) the
    cases after that pass go up while its own upload and submit run, not after them."""
    skip = min(free_slots(ctx.conn, ready_seats(ready_hosts(ctx))), BATCH_MOST)
    cases: list[Case] = []
    while len(cases) < most:
        case = claim_for_staging(ctx.conn, worker=ctx.worker_id, now=now,
                                 lease_seconds=ctx.config.main_loop.lease_seconds,
                                 max_wait_seconds=ctx.config.scheduling.max_wait_seconds, skip=skip)
        if case is None:
            break
        cases.append(case)
    return cases


def record_pre_upload(ctx: Context, host: Host, case: Case, done: UploadDone, now: float) -> None:
    """Record a pre-upload, or let the case go back to the queue to be uploaded when it is claimed."""
    if not isinstance(done, str):
        release_staging(ctx.conn, case.case_id, worker=ctx.worker_id)
        ctx.log.warning("case %d: pre-upload failed (%s); it will be uploaded when claimed", case.case_id,
                        done, extra=for_case(case.case_id, "prestage", done))
        if isinstance(done, ResourceShortage):  # no room on the HPC: hold the pre-uploads there back
            ctx.memory.staging_paused_until[host.name] = now + SPACE_PAUSE_SECONDS
        return
    if mark_staged(ctx.conn, case, host=host.name, remote_dir=done, worker=ctx.worker_id, now=ctx.clock(),
                   detail=f"pre-uploaded to {host.name}:{done}"):
        ctx.log.info("case %d pre-uploaded to %s", case.case_id, host.name,
                     extra=for_case(case.case_id, "prestage"))


def submit_claims(ctx: Context, host: Host, ready: Sequence[tuple[Claim, str, bool]]) -> None:
    """Submit the claimed cases whose folders are on ``host`` ((claim, remote_dir, pre-uploaded)) in
    ONE remote call (``Backend.submit_batch``), each with its own lock and label check.

    First each claim is made sure of (with a fresh lease and the time its add can land by): a claim
    recovered meanwhile is left alone. A pre-uploaded case's item first checks that its folder is
    still there (WorkdirMissing otherwise): it is uploaded again and submitted on its own.
    """
    sending = [(claim, remote_dir, staged) for claim, remote_dir, staged in ready
               if still_ours(ctx, host, claim.case, remote_dir)]
    if not sending:
        return
    items = [SubmitItem(slot=claim.group, label=claim.case.label, workdir=remote_dir,
                        command=render_command(host.config.hpc.remote_command, claim.case, remote_dir),
                        env=task_env(claim.case, remote_dir, claim.gpu), require_workdir=staged)
             for claim, remote_dir, staged in sending]
    outcomes = host.backend.submit_batch(items)
    seen = ctx.clock()  # what failed is recorded when the answer came: after the remote call
    for (claim, remote_dir, _), outcome in zip(sending, outcomes):
        case = claim.case
        with per_item(ctx, case.case_id, "submit"):
            if isinstance(outcome, WorkdirMissing):  # the pre-uploaded folder vanished: upload it now
                ctx.log.warning("case %d: %s; uploading again", case.case_id, outcome,
                                extra=for_case(case.case_id, "submit", outcome))
                process_claims(ctx, host, [replace(claim, case=replace(case, staged_at=None))])
            elif isinstance(outcome, RemoteFailure):
                submit_failed(ctx, host, case, outcome, seen)
            else:
                record_running(ctx, claim, outcome, remote_dir, ctx.clock())


def still_ours(ctx: Context, host: Host, case: Case, remote_dir: str) -> bool:
    """Make sure our claim still stands before its submit is sent: a fresh lease, and the time by
    which the add can land (``add_uncertain_until``), recorded before the add may happen."""
    now = ctx.clock()
    fields = {"remote_dir": remote_dir, "lease_until": now + ctx.config.main_loop.lease_seconds,
              "add_uncertain_until": now + host.backend.add_lands_within()}
    if update_case(ctx.conn, case.case_id, CaseStatus.SUBMITTING, fields, guard={"claimed_by": ctx.worker_id}):
        return True
    ctx.log.warning("case %d: claim lost before %s", case.case_id, host.backend.words.submit,
                    extra=for_case(case.case_id, "submit"))
    return False


def record_running(ctx: Context, claim: Claim, task_id: int, remote_dir: str, now: float) -> None:
    case = claim.case
    moved = move_case(ctx.conn, ctx.spool, case, CaseStatus.RUNNING, now=now, worker=ctx.name,
                      detail=f"task {task_id} in {claim.slot.name}",
                      fields={**SUBMIT_CLEARS, "task_id": task_id, "remote_dir": remote_dir,
                              "started_at": None, "running_since": now, "progress": 0.0,
                              "error_type": None, "error_message": None},
                      guard={"claimed_by": ctx.worker_id})
    if moved:
        ring(ctx.spool.root, "poller")
        ctx.log.info("case %d submitted as task %d (%s)", case.case_id, task_id, claim.slot.name,
                     extra=for_case(case.case_id, "submit"))


def may_have_been_stored(exc: RemoteFailure) -> bool:
    """True unless the failed submit proves that no task was created: only a ``RemoteError``
    (the scheduler's own refusal, an outage) does. ``SubmitUncertain`` (an answer lost),
    ``AlreadySubmitted``, ``SubmitLockBusy``, ``Unreachable``... cannot tell."""
    return not isinstance(exc, RemoteError)


def leave_for_recovery(ctx: Context, case: Case, error: Exception, now: float) -> None:
    """The submit may or may not have happened: let recovery decide by label.

    It adopts a task found by label at once; "no task" counts only once the add can no
    longer land (``add_uncertain_until``, set before the add was sent).
    """
    update_case(ctx.conn, case.case_id, CaseStatus.SUBMITTING,
                {"lease_until": now, "error_type": type(error).__name__, "error_message": str(error)[:2000]},
                guard={"claimed_by": ctx.worker_id})
    ctx.log.warning("case %d: submit outcome unknown (%s); reconciling by label", case.case_id,
                    error, extra=for_case(case.case_id, "submit", error))


def process_claims(ctx: Context, host: Host, claims: Sequence[Claim]) -> None:
    """Bring the claimed cases to ``host`` and submit them: the folders not pre-uploaded go up in
    one stream (``upload_cases``), then every case whose folder is there is submitted in one call
    (``submit_claims``). Each case's failure is its own."""
    staged = {claim.case.case_id for claim in claims if pre_uploaded(claim.case)}
    missing = [claim.case for claim in claims if claim.case.case_id not in staged]
    uploads = upload_cases(ctx, host, missing) if missing else {}
    ready = []
    for claim in claims:
        case = claim.case
        done = case.remote_dir if case.case_id in staged else uploads[case.case_id]
        if isinstance(done, str):
            ready.append((claim, done, case.case_id in staged))
        else:
            with per_item(ctx, case.case_id, "upload"):
                upload_failed(ctx, case, done)
    submit_claims(ctx, host, ready)


def pre_uploaded(case: Case) -> bool:
    """The case's folder is already on its host: a claim submits it without an upload."""
    return case.staged_at is not None and bool(case.remote_dir)


def upload_failed(ctx: Context, case: Case, exc: RemoteFailure | LeaseLost) -> None:
    """Nothing was sent to the scheduler: the case goes back to the queue (or fails for good)."""
    if isinstance(exc, LeaseLost):
        ctx.log.warning("%s", exc, extra=for_case(case.case_id, "upload", exc))
        return
    status = retry_or_fail(ctx.conn, ctx.spool, case, ctx.config.main_loop, exc, now=ctx.clock(),
                           worker=ctx.name, operation="upload", guard={"claimed_by": ctx.worker_id})
    ctx.log.warning("case %d: upload failed (%s); case is now %s", case.case_id, exc,
                    status and status.value, extra=for_case(case.case_id, "upload", exc))


def submit_failed(ctx: Context, host: Host, case: Case, exc: RemoteFailure, now: float) -> None:
    """A submit that failed: let recovery look for its task by label, or retry if none can exist.

    The texts name the host's own scheduler (``backend.words``) and say what failed in a few
    words (the backend's message), never the submit script.
    """
    if may_have_been_stored(exc):
        leave_for_recovery(ctx, case, exc, now)
        return
    if isinstance(exc, SlotLost):
        ctx.memory.hosts_ready.discard(host.name)  # make the slots sure again before the retry
    status = retry_or_fail(ctx.conn, ctx.spool, case, ctx.config.main_loop, exc, now=now,
                           worker=ctx.name, operation=host.backend.words.submit, guard={"claimed_by": ctx.worker_id})
    ctx.log.error("case %d: submit failed (%s: %s); case is now %s", case.case_id, type(exc).__name__, exc,
                  status and status.value, extra=for_case(case.case_id, "submit", exc))


def host_ready(ctx: Context, host: Host) -> bool:
    """Make a host's slots usable once per process (create the missing ones, or check that they exist),
    again after the scheduler lost one (``SlotLost``). A host that fails is asked again next pass."""
    ready = ctx.memory.hosts_ready
    if host.name in ready:
        return True
    try:
        created = host.backend.ensure_slots({s.name: s.parallel for s in host.config.slots})
    except RemoteFailure as exc:
        note_reach(ctx, host, exc)
        # A missing partition stays missing until the config is fixed: say so now and then, not every pass.
        if worth_logging(ctx, f"slots:{host.name}:{type(exc).__name__}", ctx.clock(), REPEAT_LOG_SECONDS):
            ctx.log.warning("host %s: cannot make sure of the slots (%s); not submitting there until it is fixed",
                            host.name, exc, extra=for_case(None, "ensure_groups", exc))
        return False
    note_reach(ctx, host, None)
    if created:
        ctx.log.info("host %s: created slots %s", host.name, ", ".join(created), extra=for_case(None, "ensure_groups"))
    ready.add(host.name)
    return True


def ready_hosts(ctx: Context) -> list[Host]:
    """The hosts whose slots were made sure of (those not yet are not asked here: see ``host_ready``)."""
    ready = ctx.memory.hosts_ready
    return [host for host in reachable_hosts(ctx) if host.name in ready]


def ready_seats(hosts: list[Host]) -> list[tuple[str, str]]:
    """The (host, slot) pairs of ``hosts``: where a claim may put a case."""
    return [(host.name, slot.name) for host in hosts for slot in host.config.slots]


def tick(ctx: Context, now: float) -> int:
    """One pass in this thread, all hosts in turn: recover dead claims, make the hosts ready, then
    claim and submit at most one case on any of them (tests; the process runs ``recover_tick``
    and a ``claim_on`` loop per host)."""
    done = recover_expired_claims(ctx, now)
    began = ctx.clock()
    ready = [host for host in reachable_hosts(ctx) if host_ready(ctx, host)]
    return done + (claim_and_submit(ctx, now + ctx.clock() - began) if ready else 0)


def recover_tick(ctx: Context, now: float) -> int:
    """The process's main loop: expired claims, each resolved from one snapshot of its host."""
    return recover_expired_claims(ctx, now)


def claim_on(ctx: Context, host: Host, now: float, *, most: int = BATCH_MOST) -> int:
    """A host's claim loop: make it ready, then claim and submit up to ``most`` cases on its seats."""
    began = ctx.clock()
    if host.name not in {h.name for h in reachable_hosts(ctx)} or not host_ready(ctx, host):
        return 0
    # Making a host ready is remote work that can outlast a lease: the claims' time moves on with it.
    return claim_and_submit(ctx, now + ctx.clock() - began, host, most=most)


def claim_and_submit(ctx: Context, now: float, host: Host | None = None, *, most: int = 1) -> int:
    """Claim up to ``most`` cases for free seats (of ``host``: see ``claim_next_case``; else of any
    ready host) and submit them, those of one host together; how many cases were claimed."""
    idle = idle_slots(ctx.conn, host and host.name)
    claims = claim_cases(ctx, now, host, most)
    if not claims:
        wake_stagers(ctx)
        return 0
    wake_loops(ctx)  # seats were taken: stagers may upload ahead, the other hosts' claims look again
    for host_name in dict.fromkeys(claim.host for claim in claims):
        for together in idle_gpus_first([claim for claim in claims if claim.host == host_name], idle):
            only = together[0].case.case_id if len(together) == 1 else None  # an error of a batch is no one case's
            with per_item(ctx, only, "submit"):  # on a crash the leases expire; recovery takes over
                process_claims(ctx, ctx.hosts[host_name], together)
    return len(claims)


def idle_gpus_first(claims: Sequence[Claim], idle: set[tuple[str, str]]) -> list[list[Claim]]:
    """One host's claims as the batches to send: when several GPUs had nothing on them (``idle``: a
    start, a host back), the first claim of each goes in a batch before the others if those still
    have folders to upload, so the idle GPUs do not wait for the uploads of cases that will only
    queue. One idle GPU among busy ones (its queue ran dry) keeps one batch: a second remote call
    costs about what it would save, and under load those calls are what slows the pace."""
    first: list[Claim] = []
    later: list[Claim] = []
    for claim in claims:
        pair = (claim.host, claim.group)
        fresh = pair in idle and all((c.host, c.group) != pair for c in first)
        (first if fresh else later).append(claim)
    if len(first) < 2 or not later or all(pre_uploaded(claim.case) for claim in later):
        return [list(claims)]
    return [first, later]


def claim_cases(ctx: Context, now: float, host: Host | None, most: int) -> list[Claim]:
    """Up to ``most`` claims, one compare-and-set each, in claim order."""
    claims: list[Claim] = []
    while len(claims) < most:
        claim = claim_next_case(ctx.conn, worker=ctx.worker_id, now=now,
                                lease_seconds=ctx.config.main_loop.lease_seconds,
                                seats=ready_seats(ready_hosts(ctx)), host=host and host.name,
                                max_wait_seconds=ctx.config.scheduling.max_wait_seconds)
        if claim is None:
            break
        ctx.log.info("case %d claimed with slot %s (attempt %d)", claim.case.case_id, claim.slot.name,
                     claim.case.attempts + 1, extra=for_case(claim.case.case_id, "claim"))
        claims.append(claim)
    return claims


def wake_stagers(ctx: Context) -> None:
    wake_loops(ctx, containing=f"-{STAGER}@")  # a wake is only a hint: waking one more loop costs a pass


def start_loops(ctx: Context) -> None:
    """The process's loops: per host a claim loop and a stager, all sharing which hosts are ready
    and how long uploads take; the doorbell wakes every one."""
    shared = ("hosts_ready", "upload_seconds")
    loops = start_host_loops(ctx, ctx.name, claim_on, drain=True, shared=shared)
    loops += start_host_loops(ctx, f"{ctx.name}-{STAGER}", stage_on, drain=True, shared=shared)
    listen(ctx.spool.root, "submitter", ctx.wake, *(loop.wake for loop in loops))


def main(argv=None) -> int:
    return worker_main("mqic-submitter", "submitter", recover_tick, argv, prepare=start_loops, drain=True,
                       one_pass=tick)


if __name__ == "__main__":
    sys.exit(main())
