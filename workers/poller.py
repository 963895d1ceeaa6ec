"""poller: follows every ``running`` case with one status and one log call per host per pass.

The process polls each host in a loop of its own (a thread with its own database connection),
so a host whose every remote call takes seconds never delays another host's polls; ``tick``
polls every host in turn in one thread (tests, one pass). A host last seen unreachable is
skipped (its cases wait, the reaper probes it). Whatever a pass records is stamped with the
time the host's answer was seen (``seen_at``), not the time the pass began.

What became of each case's task is found by ``shared.tasks.resolve`` from that one
fresh snapshot (and, for a task pueue no longer lists, from its exit record in the
case's remote folder, read for all such cases in one call); what happens to the case is
its row of the verdict table (``shared.verdicts``, printed in ``docs/verdicts.md``), which
this module only carries out:

- complete: results are fetched, the case completes and its slot is freed;
- fail: the case fails with its outcome, exit code and last log lines, and the slot
  becomes a zombie until the reaper sees the group idle;
- requeue (killed by a signal we did not send, or proven absent): the case runs again,
  one attempt used, with the verdict's outcome once ``max_attempts`` are used up;
- time out (running longer than ``running_case_timeout_hours`` on the HPC's own clock):
  failed (``timed_out``), slot zombie, the task sent SIGTERM (the reaper sends SIGKILL later);
- wait: a live task has its progress read; could not tell (unreachable, garbage, unknown
  state) changes nothing.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from shared import gpus, tasks, verdicts
from shared.backends import model, output_lines, progress_pattern, resumes_paused_slots
from shared.backends.common import parse_progress
from shared.delivery import fetched_record
from shared.doorbell import listen, ring
from shared.errors import RemoteFailure
from shared.lifecycle import move_case, requeue_or_fail
from shared.logs import for_case
from shared.remote import UnsafeMember
from shared.seats import release_slot_of
from shared.spool import merge_into, settle_folder
from shared.states import CaseStatus, SlotStatus
from shared.store import Case, cases_with_status, flag_for_review, get_case, update_case
from shared.verdicts import Action, Phase, Verdict
from shared.worker import (REPEAT_LOG_SECONDS, Context, Host, forget_logged, note_reach, on_reachable_hosts, per_item,
                           reachable_hosts, start_helper_loop, start_host_loops, worker_main, worth_logging)

WAITING_REFRESH_SHARE_OF_STUCK = 0.5  # see waiting_refresh_seconds


def this_run(case: Case) -> dict:
    """The columns that tell this run of a case from a later one: every change the poller makes
    is guarded on them, so a pass that read the case before it was requeued and submitted again
    (by another poller, a quick submitter) can never settle, free or update the new run."""
    return {"running_since": case.running_since, "task_id": case.task_id}


def fetch_snapshot(ctx: Context, host: Host) -> model.Snapshot | None:
    try:
        snapshot = host.snapshot()
    except RemoteFailure as exc:
        note_reach(ctx, host, exc)
        ctx.log.warning("host %s: status could not be read (%s: %s); nothing changed, trying again", host.name,
                        type(exc).__name__, exc, extra=for_case(None, "poll", exc) | {"host": host.name})
        return None
    note_reach(ctx, host, None)
    return snapshot


def fetch_records(ctx: Context, host: Host, cases: list[Case]) -> dict[str, tasks.ExitRecord]:
    """Exit records of the cases whose task the scheduler forgot, in one call ({} when it could not be read)."""
    try:
        return tasks.read_exit_records(host.remote, [c.remote_dir for c in cases], timeout=host.timeout)
    except RemoteFailure as exc:
        note_reach(ctx, host, exc)
        ctx.log.warning("exit records could not be read (%s); those cases wait", exc,
                        extra=for_case(None, "poll_records", exc))
        return {}


def fetch_logs(ctx: Context, host: Host, tasks_wanted: list[model.TaskInfo]) -> dict[int, str] | None:
    """The log tails of ``tasks_wanted`` by task id, or None when they could not be read this pass."""
    try:
        return host.backend.logs(tasks_wanted, output_lines(ctx.config))
    except RemoteFailure as exc:
        ctx.log.warning("%s could not be read (%s)", host.backend.words.logs, exc, extra=for_case(None, "poll_logs", exc))
        return None


def handle_paused_slots(ctx: Context, host: Host, snapshot: model.Snapshot, now: float) -> None:
    """Report a slot of ours the scheduler paused once (again every few minutes), and resume it
    where the scheduler can and the config asks for it (``shared.backends.resumes_paused_slots``)."""
    ours = {s.name for s in host.config.slots}
    paused = [slot for slot in snapshot.paused_slots if slot in ours]
    words, resume = host.backend.words, resumes_paused_slots(ctx.config, host.config)
    was_paused = ctx.memory.paused_slots
    for slot in set(was_paused.get(host.name, ())) - set(paused):
        forget_logged(ctx, f"paused:{host.name}:{slot}")
        ctx.log.info("host %s: %s %s is running again", host.name, words.slot, slot, extra={"operation": "poll"})
    was_paused[host.name] = paused
    for slot in paused:
        if worth_logging(ctx, f"paused:{host.name}:{slot}", now, REPEAT_LOG_SECONDS):
            ctx.log.error("host %s: %s %s is PAUSED (%s); queued cases wait%s", host.name, words.slot, slot,
                          words.paused_why, "; resuming it" if resume else
                          f"; resume it with `{words.resume.format(slot=slot)}`",
                          extra={"operation": "poll", "error_type": "SlotPaused"})
        if resume:
            try:
                host.backend.resume_slot(slot)
            except RemoteFailure as exc:
                ctx.log.warning("could not resume %s: %s", slot, exc, extra=for_case(None, "resume", exc))


def complete(ctx: Context, host: Host, case: Case, link: tasks.Link, now: float, verdict: Verdict | None = None,
             *, prefetched: bool = False) -> bool:
    """Fetch results into a private folder, then, only if this worker wins the move, file them.

    ``verdict``: the link's row of the verdict table (looked up when not given), which must say complete.
    ``prefetched``: the results are in that folder already (``prefetch_results``).
    """
    verdict = verdict or verdicts.verdict_for(link, Phase.RUNNING)
    if verdict.action is not Action.COMPLETE:
        raise ValueError(f"case {case.case_id}: the verdict is {verdict.action.value}, not complete")
    staging = results_staging(ctx, case)
    task_id = link.task.id if link.task else case.task_id
    try:
        if host.config.hpc.result_files:
            free_gpu_early(ctx, case, verdict.slot, now)
            if not prefetched and not fetch_results(ctx, host, case, link, staging):
                return False
        record = json.dumps(fetched_record(staging), sort_keys=True) if staging.exists() else None
        with ctx.spool.lock():
            current = get_case(ctx.conn, case.case_id)
            if current is None or current.status is not CaseStatus.RUNNING or \
                    this_run(current) != this_run(case):
                return False  # another poller finished it first, or it is running again as a new run
            folder = settle_folder(ctx.conn, ctx.spool, case.case_id, now=now, worker=ctx.name)
            if staging.exists() and folder is not None:  # None: flagged for review, results stay remote
                merge_into(staging, folder)
            else:
                record = None
            moved = move_case(ctx.conn, ctx.spool, current, CaseStatus.COMPLETED, now=now, worker=ctx.name,
                              detail=f"task {task_id} on {host.name} succeeded" + (f" ({link.detail})" if link.from_record else ""),
                              slot_to=verdict.slot, guard=this_run(case),
                              fields={"outcome": verdict.outcome.value, "exit_code": 0, "progress": 100.0,
                                      "completed_at": now, "task_id": task_id, "result_checksums": record})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if moved:
        ring(ctx.spool.root, "submitter")
        ctx.log.info("case %d completed", case.case_id, extra=for_case(case.case_id, "complete"))
    return moved


def free_gpu_early(ctx: Context, case: Case, slot_to: SlotStatus, now: float) -> None:
    """The task is over, so its GPU is free: hand the slot on before the download."""
    if release_slot_of(ctx.conn, case, slot_to, now=now, worker=ctx.name, guard=this_run(case),
                       detail=f"task of case {case.case_id} succeeded; results being fetched"):
        ring(ctx.spool.root, "submitter")


def prefetch_results(ctx: Context, host: Host, completing: list[Case], links: dict[int, tasks.Link],
                     rulings: dict[int, Verdict], now: float) -> set[int]:
    """The results of the cases a pass completes, in ONE download (``Remote.download_many``), each
    into the private folder ``complete`` uses; their GPUs are handed on first. The case ids
    fetched; a case left out (nothing to fetch, or the stream failed) is fetched by ``complete``
    on its own, which tells what is wrong."""
    if len(completing) < 2 or not host.config.hpc.result_files:
        return set()
    wanted = []
    for case in completing:
        free_gpu_early(ctx, case, rulings[case.case_id].slot, now)
        staging = results_staging(ctx, case)
        shutil.rmtree(staging, ignore_errors=True)  # an earlier attempt's leftovers are not these results
        wanted.append((result_folder(case, links[case.case_id]), staging))
    fetched = host.remote.download_many(wanted, host.config.hpc.result_files)
    for index, names in fetched.items():
        case_id = completing[index].case_id
        ctx.log.info("case %d: fetched %d result files", case_id, len(names), extra=for_case(case_id, "download"))
    return {completing[index].case_id for index in fetched}


def results_staging(ctx: Context, case: Case) -> Path:
    """The private folder a case's results are fetched into before ``complete`` files them."""
    return ctx.spool.staging_dir(f"results-{case.case_id}")


def result_folder(case: Case, link: tasks.Link) -> str:
    """Where the task ran on the HPC: the scheduler's working folder, else the one we recorded."""
    return (link.task.path if link.task else "") or case.remote_dir


def fetch_results(ctx: Context, host: Host, case: Case, link: tasks.Link, staging: Path) -> bool:
    staging.mkdir(parents=True, exist_ok=True)
    folder = result_folder(case, link)
    try:
        names = host.remote.download_results(folder, host.config.hpc.result_files, staging)
    except UnsafeMember as exc:  # never extracted; an operator must look at the remote folder
        if flag_for_review(ctx.conn, case, f"results refused: {exc}", now=ctx.clock(), worker=ctx.name):
            ctx.log.error("case %d: %s; flagged for review", case.case_id, exc,
                          extra=for_case(case.case_id, "download", exc))
        return False
    except RemoteFailure as exc:
        ctx.log.warning("case %d: result download failed (%s); will retry", case.case_id, exc,
                        extra=for_case(case.case_id, "download", exc))
        return False
    ctx.log.info("case %d: fetched %d result files", case.case_id, len(names),
                 extra=for_case(case.case_id, "download"))
    return True


def fail(ctx: Context, host: Host, case: Case, link: tasks.Link, verdict: Verdict,
         outputs: dict[int, str] | None, now: float) -> bool:
    """Fail the case with the verdict's outcome, the task's exit code and its last log lines."""
    log_tail = log_tail_of(ctx, host, case, link, outputs)
    if log_tail is None:
        return False  # the verdict stays; carry it out on a pass that can keep the log tail
    task_id = link.task.id if link.task else case.task_id
    detail = link.task.detail if link.task else ""
    reason = detail or (f"exit code {link.exit_code}" if link.exit_code is not None else link.result.value)
    moved = move_case(ctx.conn, ctx.spool, case, CaseStatus.FAILED, now=now, worker=ctx.name,
                      detail=f"task {task_id} on {host.name}: {link.result.value} ({reason})"
                             + (f"; {link.detail}" if link.from_record else ""),
                      slot_to=verdict.slot, guard=this_run(case),
                      fields={"outcome": verdict.outcome.value, "exit_code": link.exit_code, "completed_at": now,
                              "error_type": verdict.error_type, "error_message": reason[:2000],
                              "log_tail": log_tail[-4000:], "task_id": task_id})
    if moved:
        ring(ctx.spool.root, "reaper")
        ctx.log.error("case %d failed: %s (%s)", case.case_id, link.result.value, reason,
                      extra=for_case(case.case_id, "complete") | {"error_type": verdict.outcome.value})
    return moved


def log_tail_of(ctx: Context, host: Host, case: Case, link: tasks.Link,
                outputs: dict[int, str] | None) -> str | None:
    """The failed task's last log lines: from the scheduler, or from the wrapper's copy when it forgot the task."""
    if link.task is not None:
        return None if outputs is None else outputs.get(link.task.id, "")
    try:
        return tasks.read_output_tail(host.remote, case.remote_dir, output_lines(ctx.config), timeout=host.timeout)
    except RemoteFailure:
        return None


def requeue(ctx: Context, host: Host, case: Case, link: tasks.Link, verdict: Verdict, now: float) -> bool:
    """Run the case again. A task the scheduler still lists (a killed one) leaves its list
    first, so the label names only the retry's task."""
    words = host.backend.words
    if link.task is None:
        reason = f"task {case.task_id} ({case.label}) is no longer listed on {case.host}: {link.detail}"
        return run_again(ctx, case, verdict, reason, now)
    reason = (f"{words.task} {link.task.id} was {words.killed_by_others}"
              + (f": {link.task.detail}" if link.task.detail else ""))
    try:
        host.backend.remove([link.task.id])
    except RemoteFailure as exc:  # the label must name only the retry's task: try again next pass
        ctx.log.warning("case %d: cannot remove %s %d yet (%s)", case.case_id, words.task, link.task.id, exc,
                        extra=for_case(case.case_id, "requeue", exc))
        return False
    return run_again(ctx, case, verdict, reason, now)


def time_out(ctx: Context, host: Host, case: Case, link: tasks.Link, verdict: Verdict, now: float) -> bool:
    """Fail a case whose task ran too long on the HPC's clock, then ask the task to stop (SIGTERM)."""
    hours = ctx.config.main_loop.running_case_timeout_hours
    moved = move_case(ctx.conn, ctx.spool, case, CaseStatus.FAILED, now=now, worker=ctx.name,
                      detail=f"running longer than {hours:g} h on the HPC: stopping task {link.task.id}",
                      slot_to=verdict.slot, guard=this_run(case),
                      fields={"outcome": verdict.outcome.value, "completed_at": now, "task_id": link.task.id,
                              "error_type": verdict.error_type, "error_message": f"ran longer than {hours:g} h"})
    if not moved:
        return False
    ctx.log.error("case %d timed out after %g h; stopping task %d", case.case_id, hours, link.task.id,
                  extra=for_case(case.case_id, "timeout") | {"error_type": verdict.error_type})
    ring(ctx.spool.root, "reaper")
    failed = get_case(ctx.conn, case.case_id)
    try:
        tasks.stop(ctx.conn, host.backend, ctx.config.main_loop.kill_grace_seconds, failed, [link.task], now=now)
    except RemoteFailure as exc:
        ctx.log.warning("case %d: SIGTERM failed (%s); the reaper stops it", case.case_id, exc,
                        extra=for_case(case.case_id, "timeout", exc))
    return True


def run_again(ctx: Context, case: Case, verdict: Verdict, reason: str, now: float) -> bool:
    """No task of this attempt can run any more: the case runs again as the verdict says
    (its attempt used or not; failed with its outcome once attempts run out)."""
    status = requeue_or_fail(ctx.conn, ctx.spool, case, ctx.config.main_loop, verdict.error_type,
                             f"poll: {verdict.error_type}: {reason}", counted=verdict.uses_attempt, retry=True,
                             outcome=verdict.outcome, slot_to=verdict.slot, now=now, worker=ctx.name,
                             guard=this_run(case))
    ctx.log.warning("case %d: %s; case is now %s", case.case_id, reason, status and status.value,
                    extra=for_case(case.case_id, "poll") | {"error_type": verdict.error_type})
    ring(ctx.spool.root, "submitter")
    return status is not None


def waiting_refresh_seconds(ctx: Context) -> float:
    """How old a waiting case's ``status_updated_at`` gets before the poller renews it.

    Half of ``stuck_after_minutes``: renewed well before the reaper would flag the case as
    stuck, yet written at most about twice per stuck period rather than on every poll.
    """
    return ctx.config.main_loop.stuck_after_minutes * 60 * WAITING_REFRESH_SHARE_OF_STUCK


def update_progress(ctx: Context, case: Case, link: tasks.Link, output: str | None, now: float) -> bool:
    task, fields = link.task, {}
    if link.found is tasks.Found.WAITING and now - case.status_updated_at > waiting_refresh_seconds(ctx):
        fields["status_updated_at"] = now  # queued behind another case (depth > 1): waiting is not being stuck
    progress = parse_progress(output or "", progress_pattern(ctx.config))
    if progress is not None and abs(progress - case.progress) >= 0.01:
        fields["progress"] = progress
    if task.start is not None and case.started_at != task.start.timestamp():
        fields["started_at"] = task.start.timestamp()
    if not fields:
        return False
    fields["status_updated_at"] = now
    return update_case(ctx.conn, case.case_id, CaseStatus.RUNNING, fields, guard=this_run(case))


def verdict_of(ctx: Context, case: Case, link: tasks.Link, snapshot: model.Snapshot) -> Verdict:
    """The row of the verdict table for a running case whose task became ``link``."""
    overdue = tasks.overdue(link, snapshot, ctx.config.main_loop.running_case_timeout_hours * 3600)
    return verdicts.verdict_for(link, Phase.RUNNING, by_us=verdicts.killed_by_us(case.outcome), overdue=overdue)


def apply(ctx: Context, host: Host, case: Case, link: tasks.Link, snapshot: model.Snapshot,
          outputs: dict[int, str] | None, now: float) -> bool:
    """Decide one running case from what its task became; True when its row changed."""
    return carry_out(ctx, host, case, link, verdict_of(ctx, case, link, snapshot), outputs, now)


def carry_out(ctx: Context, host: Host, case: Case, link: tasks.Link, verdict: Verdict,
              outputs: dict[int, str] | None, now: float) -> bool:
    """Do what ``verdict`` says to one running case; True when its row changed."""
    action = verdict.action
    if action is Action.COMPLETE:
        return complete(ctx, host, case, link, now, verdict)
    if action is Action.FAIL:
        return fail(ctx, host, case, link, verdict, outputs, now)
    if action is Action.TIME_OUT:
        return time_out(ctx, host, case, link, verdict, now)
    if action is Action.REQUEUE:
        return requeue(ctx, host, case, link, verdict, now)
    if action is Action.WAIT:
        return wait(ctx, case, link, outputs, now)
    raise verdicts.Unlisted(f"the poller cannot carry out {action}")


def wait(ctx: Context, case: Case, link: tasks.Link, outputs: dict[int, str] | None, now: float) -> bool:
    """No status change: a live task has its progress read; "could not tell" is logged (now and then)."""
    if link.found in (tasks.Found.WAITING, tasks.Found.RUNNING):
        return update_progress(ctx, case, link, (outputs or {}).get(link.task.id), now)
    if link.found is tasks.Found.UNKNOWN and worth_logging(ctx, f"unknown:{case.case_id}", now, REPEAT_LOG_SECONDS):
        ctx.log.warning("case %d: could not tell what became of its task (%s); no change", case.case_id,
                        link.detail, extra=for_case(case.case_id, "poll") | {"error_type": "CouldNotTell"})
    return False


def needs_log(link: tasks.Link, verdict: Verdict) -> bool:
    """The scheduler's log of the task is read for a failure (its tail is kept) and for a running task's progress."""
    return link.task is not None and (verdict.action is Action.FAIL or
                                      (verdict.action is Action.WAIT and link.found is tasks.Found.RUNNING))


def tick(ctx: Context, now: float) -> int:
    """One pass over all running cases in this thread, host by host (a host that was last seen down is
    skipped). The process runs ``poll_on`` in a loop per host instead."""
    running = cases_with_status(ctx.conn, CaseStatus.RUNNING, limit=10_000)
    return sum(poll_host(ctx, host, cases, now)
               for host, cases in on_reachable_hosts(ctx, running, now, "running case(s)"))


def poll_on(ctx: Context, host: Host, now: float) -> int:
    """A host's poll loop: its running cases, unless it was last seen down."""
    if host.name not in {h.name for h in reachable_hosts(ctx)}:
        return 0
    running = [case for case in cases_with_status(ctx.conn, CaseStatus.RUNNING, limit=10_000) if case.host == host.name]
    return poll_host(ctx, host, running, now) if running else 0


def watch_tick(ctx: Context, now: float) -> int:
    """The process's main loop: says now and then that running cases wait for a host the config no longer has."""
    on_reachable_hosts(ctx, cases_with_status(ctx.conn, CaseStatus.RUNNING, limit=10_000), now, "running case(s)")
    return 0


def seen_at(ctx: Context, now: float, started: float) -> float:
    """``now`` moved on by the time the remote calls since ``started`` took on ``ctx.clock``: when
    their answer was seen. A stamp (``completed_at``, progress) is that, not the pass's start,
    which may be a slow call (or a whole pass) earlier."""
    return now + max(0.0, ctx.clock() - started)


def poll_host(ctx: Context, host: Host, running: list[Case], now: float) -> int:
    """One host's running cases: one status call, one log call (plus exit records if needed)."""
    started = ctx.clock()
    snapshot = fetch_snapshot(ctx, host)
    if snapshot is None:
        return 0
    forgotten = [case for case in running if tasks.needs_record(case, snapshot)]
    records = fetch_records(ctx, host, forgotten) if forgotten else {}
    seen = seen_at(ctx, now, started)
    handle_paused_slots(ctx, host, snapshot, seen)
    links, rulings = {}, {}
    for case in running:  # an Unlisted verdict is logged for its case (never a default); the others go on
        with per_item(ctx, case.case_id, "verdict"):
            links[case.case_id] = link = tasks.resolve(case, snapshot, records)
            rulings[case.case_id] = verdict_of(ctx, case, link, snapshot)
    decided = [case for case in running if case.case_id in rulings]
    changed = 0
    completing = [case for case in decided if rulings[case.case_id].action is Action.COMPLETE]
    prefetched: set[int] = set()
    with per_item(ctx, None, "download"):  # nothing fetched here: each case fetches its own below
        prefetched = prefetch_results(ctx, host, completing, links, rulings, seen)
    for case in completing:  # completions first, so freed GPUs are handed on before the log call
        with per_item(ctx, case.case_id, "poll"):
            changed += complete(ctx, host, case, links[case.case_id], seen, rulings[case.case_id],
                                prefetched=case.case_id in prefetched)
    wanted = [links[c.case_id].task for c in decided if needs_log(links[c.case_id], rulings[c.case_id])]
    outputs = fetch_logs(ctx, host, wanted) if wanted else {}
    seen = seen_at(ctx, now, started)
    for case in decided:
        if rulings[case.case_id].action is not Action.COMPLETE:
            with per_item(ctx, case.case_id, "poll"):
                changed += carry_out(ctx, host, case, links[case.case_id], rulings[case.case_id], outputs, seen)
    return changed


def poll_interval(ctx: Context) -> float:
    return ctx.config.main_loop.poll_interval_seconds


def start_host_polls(ctx: Context) -> None:
    """A poll loop per host; the doorbell wakes each (a submit, a cancel)."""
    loops = start_host_loops(ctx, ctx.name, poll_on, idle_wait=poll_interval)
    listen(ctx.spool.root, "poller", ctx.wake, *(loop.wake for loop in loops))


def start_gpu_telemetry(ctx: Context) -> None:
    """nvidia-smi telemetry in a thread of its own (own connection): a slow or hung nvidia-smi
    never delays a pass that settles cases. The poller hosts it because it follows the running
    cases that the readings are about; the reaper's day-to-day steps are slow by nature."""
    gpus.apply_config(ctx.conn, ctx.config.gpus)
    if ctx.config.gpus.enabled:
        start_helper_loop(ctx, f"{ctx.name}-gpus", gpus.tick)


def prepare(ctx: Context) -> None:
    start_host_polls(ctx)
    start_gpu_telemetry(ctx)


def main(argv=None) -> int:
    return worker_main("mqic-poller", "poller", watch_tick, argv, prepare=prepare, idle_wait=poll_interval,
                       one_pass=tick)


if __name__ == "__main__":
    sys.exit(main())
