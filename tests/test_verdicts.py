"""The verdict table (``shared.verdicts``), walked whole: every combination of facts either has
exactly one row or is refused (``Unlisted``); every situation the resolvers can report has a
row and every row is such a situation; "could not tell" always waits. Fast tier: no process."""
from __future__ import annotations

import dataclasses
import itertools
from datetime import datetime, timezone
from pathlib import Path

import pytest

from shared import tasks, verdicts
from shared.backends import model
from shared.errors import ClaimExpired
from shared.states import CaseStatus, Outcome, SlotStatus
from shared.store import Case
from shared.tasks import Found, Record
from shared.verdicts import Action, Facts, Phase, Sender

T = model.TaskState
ROOT = Path(__file__).resolve().parents[1]
STARTED = datetime(2026, 1, 1, tzinfo=timezone.utc)


def every_facts():
    """Every combination of every value each field of ``Facts`` can hold (None: does not apply)."""
    return [Facts(*values) for values in itertools.product(
        list(Phase), list(Found), [None, *T], [None, *Sender], [None, False, True], [None, False, True])]


def case(**fields) -> Case:
    """A case as a frozen row (the resolvers only read it): running as task 3 in gpu_a."""
    base = {f.name: None for f in dataclasses.fields(Case) if f.default is dataclasses.MISSING}
    base |= dict(case_id=7, case_name="c", status=CaseStatus.RUNNING, case_path="/spool/active/7_c",
                 submitted_at=0.0, status_updated_at=0.0, progress=0.0, attempts=0, needs_review=False,
                 task_id=3, slot="gpu_a", host="hpc", remote_dir="/remote/7_c")
    return Case(**(base | fields))


def snapshot(*listed: model.TaskInfo) -> model.Snapshot:
    return model.Snapshot(tasks={t.id: t for t in listed}, hpc_time=STARTED.timestamp() + 60)


def task(state: T, label: str = "mqic_case_7") -> model.TaskInfo:
    return model.TaskInfo(id=3, label=label, group="gpu_a", state=state, start=STARTED,
                          exit_code=1 if state is T.FAILED else None)


RECORDS = [None, Record.UNREADABLE, Record.MISSING, 0, 1, 137]


def every_link() -> list[tuple[Phase, tasks.Link]]:
    """Every kind of link the two resolvers can return: each task state listed, or no task with each
    exit record (or none read), a case without a remote folder, and a claim whose add may still land."""
    links = []
    for state in T:
        links.append((Phase.RUNNING, tasks.resolve(case(), snapshot(task(state)))))
        links.append((Phase.CLAIM, tasks.resolve_claim(case(status=CaseStatus.SUBMITTING), snapshot(task(state)),
                                                       None, add_may_land=False)))
    for record in RECORDS:
        records = {} if record is None else {"/remote/7_c": record}
        links.append((Phase.RUNNING, tasks.resolve(case(), snapshot(), records)))
        links.append((Phase.CLAIM, tasks.resolve_claim(case(status=CaseStatus.SUBMITTING), snapshot(), record,
                                                       add_may_land=False)))
    links.append((Phase.RUNNING, tasks.resolve(case(remote_dir=None), snapshot())))
    links.append((Phase.CLAIM, tasks.resolve_claim(case(remote_dir=None), snapshot(), None, add_may_land=False)))
    links.append((Phase.CLAIM, tasks.resolve_claim(case(), snapshot(), None, add_may_land=True)))
    return links


def reachable_facts() -> set[Facts]:
    return {verdicts.facts_of(link, phase, by_us=by_us, overdue=overdue)
            for phase, link in every_link() for by_us in (False, True) for overdue in (False, True)}


def test_the_table_printed():
    """Shown with ``pytest -s``; also in docs/verdicts.md."""
    print("\n" + verdicts.markdown())
    assert verdicts.markdown().count("\n") == len(verdicts.ROWS) + 2


def test_every_combination_has_one_row_or_is_refused():
    listed = []
    for facts in every_facts():
        try:
            listed.append((facts, verdicts.verdict(facts)))
        except verdicts.Unlisted as exc:
            assert str(facts) in str(exc)
    assert dict(listed) == verdicts.TABLE
    assert len(listed) == len(verdicts.ROWS)


def test_every_situation_the_resolvers_report_has_a_row_and_every_row_is_one():
    reachable = reachable_facts()
    unlisted = [f for f in reachable if f not in verdicts.TABLE]
    assert unlisted == [], f"no row for {unlisted}"
    assert set(verdicts.TABLE) == reachable, f"rows no situation reaches: {set(verdicts.TABLE) - reachable}"


def test_an_unlisted_combination_is_an_error_never_a_default():
    with pytest.raises(verdicts.Unlisted, match="no verdict"):
        verdicts.verdict(Facts(Phase.RUNNING, Found.WAITING, result=T.SUCCESS))
    with pytest.raises(verdicts.Unlisted):
        verdicts.verdict(Facts(Phase.RUNNING, Found.RUNNING))  # overdue must be said


def row_id(row) -> str:
    return "/".join(verdicts._cell(getattr(row, f.name)) for f in dataclasses.fields(row)) if isinstance(row, Facts) else ""


@pytest.mark.parametrize("facts, then", verdicts.ROWS, ids=row_id)
def test_each_row_keeps_the_rules_of_its_action(facts, then):
    if facts.found is Found.UNKNOWN:  # could not tell: no change, or a listed task taken as the case's own
        assert then.action in (Action.WAIT, Action.ADOPT)
    if then.action in (Action.WAIT, Action.ADOPT):
        assert (then.outcome, then.slot, then.uses_attempt, then.error_type) == (None, None, False, None)
    elif then.action is Action.COMPLETE:
        assert (then.outcome, then.slot, then.uses_attempt) == (Outcome.SUCCESS, SlotStatus.AVAILABLE, False)
    elif then.action in (Action.FAIL, Action.TIME_OUT):  # the task may linger: the reaper frees the seat
        assert then.slot is SlotStatus.ZOMBIE and not then.uses_attempt and then.outcome and then.error_type
    else:
        assert then.action is Action.REQUEUE
        assert then.slot is SlotStatus.AVAILABLE and then.uses_attempt and then.outcome and then.error_type
    assert then.why


def test_could_not_tell_never_fails_a_case():
    for phase in Phase:
        for link in (tasks.resolve(case(), snapshot(task(T.UNKNOWN))), tasks.resolve(case(), snapshot(), {}),
                     tasks.resolve(case(), snapshot(), {"/remote/7_c": Record.UNREADABLE})):
            for by_us, overdue in itertools.product((False, True), repeat=2):
                ruling = verdicts.verdict_for(link, phase, by_us=by_us, overdue=overdue)
                assert ruling.action in (Action.WAIT, Action.ADOPT) and ruling.outcome is None


# -- the behaviour the table took over, pinned ------------------------------------------------------

# What the poller's own mapping (FAILED_OUTCOMES) and error names were before the table.
FORMER_FAILURES = {T.FAILED: (Outcome.FAILED, "TaskFailed"), T.FAILED_TO_SPAWN: (Outcome.FAILED_TO_SPAWN, "TaskFailedToSpawn"),
                   T.DEPENDENCY_FAILED: (Outcome.FAILED, "TaskDependencyFailed"),
                   T.ERRORED: (Outcome.FAILED, "TaskErrored")}


@pytest.mark.parametrize("state", list(FORMER_FAILURES))
def test_a_failed_task_fails_the_case_with_its_outcome(state):
    ruling = verdicts.verdict_for(tasks.resolve(case(), snapshot(task(state))), Phase.RUNNING)
    assert (ruling.action, ruling.outcome, ruling.error_type) == (Action.FAIL, *FORMER_FAILURES[state])


@pytest.mark.parametrize("record, action, outcome", [(0, Action.COMPLETE, Outcome.SUCCESS),
                                                     (3, Action.FAIL, Outcome.FAILED),
                                                     (137, Action.FAIL, Outcome.FAILED)])
def test_a_forgotten_task_is_settled_from_its_exit_record(record, action, outcome):
    link = tasks.resolve(case(), snapshot(), {"/remote/7_c": record})
    assert verdicts.facts_of(link, Phase.RUNNING).from_record
    ruling = verdicts.verdict_for(link, Phase.RUNNING)
    assert (ruling.action, ruling.outcome) == (action, outcome)


def test_a_task_killed_by_others_requeues_using_an_attempt_and_one_killed_by_us_changes_nothing():
    link = tasks.resolve(case(), snapshot(task(T.KILLED)))
    others = verdicts.verdict_for(link, Phase.RUNNING)
    assert (others.action, others.outcome, others.uses_attempt, others.error_type) == \
        (Action.REQUEUE, Outcome.KILLED, True, "TaskKilled")
    assert verdicts.verdict_for(link, Phase.RUNNING, by_us=True).action is Action.WAIT


@pytest.mark.parametrize("outcome, ours", [(None, False), ("killed", False), ("failed", False),
                                           ("timed_out", True), ("cancelled", True)])
def test_we_sent_the_signal_when_the_case_says_it_was_timed_out_or_cancelled(outcome, ours):
    assert verdicts.killed_by_us(outcome) is ours


def test_a_task_proven_absent_requeues_using_an_attempt():
    for link in (tasks.resolve(case(), snapshot(), {"/remote/7_c": Record.MISSING}),
                 tasks.resolve(case(remote_dir=None), snapshot())):
        ruling = verdicts.verdict_for(link, Phase.RUNNING)
        assert (ruling.action, ruling.outcome, ruling.uses_attempt, ruling.error_type) == \
            (Action.REQUEUE, Outcome.VANISHED, True, "TaskVanished")


def test_only_a_running_task_past_the_limit_times_out():
    running = tasks.resolve(case(), snapshot(task(T.RUNNING)))
    assert verdicts.verdict_for(running, Phase.RUNNING, overdue=True).action is Action.TIME_OUT
    assert verdicts.verdict_for(running, Phase.RUNNING, overdue=False).action is Action.WAIT
    for state in (T.QUEUED, T.SUCCESS, T.FAILED):  # finished in time, however late we look; not started yet
        link = tasks.resolve(case(), snapshot(task(state)))
        assert verdicts.verdict_for(link, Phase.RUNNING, overdue=True) == verdicts.verdict_for(link, Phase.RUNNING)


def test_a_claim_adopts_any_labelled_task_in_its_group_and_waits_while_the_add_may_land():
    claimed = case(status=CaseStatus.SUBMITTING, task_id=None)
    for state in T:
        link = tasks.resolve_claim(claimed, snapshot(task(state)), None, add_may_land=True)
        assert link.task is not None and verdicts.verdict_for(link, Phase.CLAIM).action is Action.ADOPT
    elsewhere = dataclasses.replace(task(T.RUNNING), group="gpu_b")  # an orphan, for the reaper
    waiting = tasks.resolve_claim(claimed, snapshot(elsewhere), None, add_may_land=True)
    assert verdicts.verdict_for(waiting, Phase.CLAIM).action is Action.WAIT
    ran = tasks.resolve_claim(claimed, snapshot(), 0, add_may_land=False)
    assert verdicts.verdict_for(ran, Phase.CLAIM).action is Action.ADOPT


def test_an_expired_claim_with_nothing_left_requeues_as_the_attempt_count_by_type_says():
    link = tasks.resolve_claim(case(status=CaseStatus.SUBMITTING), snapshot(), Record.MISSING, add_may_land=False)
    ruling = verdicts.verdict_for(link, Phase.CLAIM)
    assert (ruling.action, ruling.outcome, ruling.error_type) == (Action.REQUEUE, Outcome.SUBMIT_ERROR, "ClaimExpired")
    assert ruling.uses_attempt is tasks.counts_as_attempt(ClaimExpired("claim expired"))


def test_docs_verdicts_md_is_the_table_printed():
    assert (ROOT / "docs" / "verdicts.md").read_text() == verdicts.DOC_HEAD + verdicts.markdown(), \
        "regenerate: python -m shared.verdicts > docs/verdicts.md"


# -- carried out: what a requeue verdict records (real SQLite and spool, no process) ---------------

def running_case(conn, spool, tmp_path, now: float) -> Case:
    from shared.spool import settle_folder
    from shared.claims import claim_next_case
    from shared.seats import SeatSpec, sync_slots
    from shared.store import get_case, register_case, transition
    folder = tmp_path / "incoming" / "c"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.dcm").write_bytes(b"x")
    registered = register_case(conn, case_name="c", source_path=str(folder), now=now, worker="scanner")
    with spool.lock():
        settle_folder(conn, spool, registered.case_id, now=now, worker="scanner")
    sync_slots(conn, [SeatSpec("hpc", "gpu_a", 0)], now=now, worker="t")
    claim = claim_next_case(conn, worker="submitter", now=now, lease_seconds=60)
    assert transition(conn, claim.case.case_id, CaseStatus.SUBMITTING, CaseStatus.RUNNING, now=now, worker="t",
                      fields={"task_id": 3, "remote_dir": "/remote/1_c", "running_since": now})
    return get_case(conn, claim.case.case_id)


def test_a_requeue_verdict_uses_an_attempt_and_records_its_outcome_once_attempts_run_out(conn, spool, tmp_path):
    from shared.config import MainLoopConfig
    from shared.lifecycle import requeue_or_fail
    from shared.store import get_case
    killed = verdicts.verdict_for(tasks.resolve(case(), snapshot(task(T.KILLED))), Phase.RUNNING)
    policy = MainLoopConfig(max_attempts=2, backoff_base_seconds=30)
    seat = "SELECT status FROM gpu_resources"
    for attempt, status in ((1, CaseStatus.SUBMITTED), (2, CaseStatus.FAILED)):
        now = 1000.0 * attempt
        running = running_case(conn, spool, tmp_path, now) if attempt == 1 else _run_again(conn, now)
        assert requeue_or_fail(conn, spool, running, policy, killed.error_type, "poll: TaskKilled: task 3 was killed",
                               counted=killed.uses_attempt, retry=True, outcome=killed.outcome,
                               slot_to=killed.slot, now=now, worker="poller") is status
        after = get_case(conn, running.case_id)
        assert (after.status, after.attempts, after.error_type) == (status, attempt, "TaskKilled")
        assert conn.execute(seat).fetchone()[0] == SlotStatus.AVAILABLE.value
    assert after.outcome == Outcome.KILLED.value and after.completed_at == 2000.0
    assert after.next_attempt_at == 1000.0 + 30  # the first requeue waited the backoff


def _run_again(conn, now: float) -> Case:
    from shared.claims import claim_next_case
    from shared.store import get_case, transition
    claim = claim_next_case(conn, worker="submitter", now=now, lease_seconds=60)
    assert transition(conn, claim.case.case_id, CaseStatus.SUBMITTING, CaseStatus.RUNNING, now=now, worker="t",
                      fields={"task_id": 4, "remote_dir": "/remote/1_c", "running_since": now})
    return get_case(conn, claim.case.case_id)
