"""A host's claim loop and stager take several cases at once (issue 19): their folders go up in
one stream and their tasks are added in one call, each case keeping its own outcome.

Fast tier, on the HPC in memory (each ``upload``/``submit`` in ``MemoryHpc.calls`` is one remote
call). The batch scripts themselves, over a real sshd against every scheduler, are proven in
``test_submit_batch.py``, ``test_backend_contract.py`` and ``test_remote.py``.
"""
from __future__ import annotations

import shutil
from dataclasses import replace

from shared.claims import idle_slots
from shared.errors import SubmitUncertain, Unreachable
from shared.states import CaseStatus, SlotStatus
from shared.store import get_case
from tests.conftest import get_slot
from tests.test_hosts import register
from tests.test_workers import run_until_final
from workers import poller, submitter

FOUR_GPUS = {f"gpu_{n}": {"gpu": n} for n in range(4)}


def statuses(ctx, cases):
    return [get_case(ctx.conn, case.case_id).status for case in cases]


def test_a_claim_loop_uploads_its_cases_in_one_call_and_submits_them_in_one(memory_hpc):
    sandbox = memory_hpc(groups=FOUR_GPUS)
    ctx = sandbox.context()
    cases = register(ctx, "a", "b", "c", "d", "e")
    hpc, host = sandbox.hpc, ctx.hosts[sandbox.hpc.name]
    submitter.host_ready(ctx, host)
    before = len(hpc.calls)

    assert submitter.claim_on(ctx, host, ctx.clock()) == 4                 # four free seats: four claims
    assert hpc.calls[before:].count("upload") == 1 and hpc.calls[before:].count("submit") == 1
    assert statuses(ctx, cases) == [CaseStatus.RUNNING] * 4 + [CaseStatus.SUBMITTED]
    assert sorted(get_case(ctx.conn, c.case_id).slot for c in cases[:4]) == sorted(FOUR_GPUS)
    for case in cases[:4]:
        assert [t.path for t in sandbox.tasks_labelled(case.label)] == [get_case(ctx.conn, case.case_id).remote_dir]
        assert run_until_final(ctx, case.case_id).status is CaseStatus.COMPLETED


def test_the_stager_pre_uploads_as_many_as_there_is_room_for_in_one_call(memory_hpc):
    sandbox = memory_hpc(groups={"gpu_a": {"gpu": 0, "depth": 2}})
    ctx = sandbox.context()
    busy, *waiting = register(ctx, "busy", "next-1", "next-2", "next-3", seconds=20)
    submitter.tick(ctx, ctx.clock())                                         # one seat taken, one free
    hpc, host = sandbox.hpc, ctx.hosts[sandbox.hpc.name]
    before = len(hpc.calls)
    assert submitter.stage_on(ctx, host, ctx.clock()) == 2
    assert hpc.calls[before:].count("upload") == 1
    staged = [c.case_id for c in waiting if get_case(ctx.conn, c.case_id).staged_at]
    assert staged == [c.case_id for c in waiting[1:]]                        # the free seat takes next-1 itself


def test_pre_uploaded_cases_are_submitted_together_and_a_vanished_folder_is_uploaded_again(memory_hpc):
    sandbox = memory_hpc(groups=FOUR_GPUS)
    ctx = sandbox.context()
    busy = register(ctx, "b1", "b2", "b3", "b4", seconds=20)
    for _ in busy:
        submitter.tick(ctx, ctx.clock())
    waiting = register(ctx, "w1", "w2", "w3")[4:]
    host = ctx.hosts[sandbox.hpc.name]
    assert submitter.stage_on(ctx, host, ctx.clock()) == 3                   # no seat free: all three go ahead
    gone = get_case(ctx.conn, waiting[1].case_id)
    shutil.rmtree(gone.remote_dir)                                           # someone removed it on the HPC
    for case in busy:
        run_until_final(ctx, case.case_id)                                   # every seat free again
    before = len(sandbox.hpc.calls)
    assert submitter.claim_on(ctx, host, ctx.clock()) == 3
    assert sandbox.hpc.calls[before:].count("submit") == 2                   # the batch, then w2 alone
    assert sandbox.hpc.calls[before:].count("upload") == 1                   # w2 again, alone
    assert statuses(ctx, waiting) == [CaseStatus.RUNNING] * 3
    for case in waiting:
        assert [t.path for t in sandbox.tasks_labelled(case.label)] == [get_case(ctx.conn, case.case_id).remote_dir]
        assert run_until_final(ctx, case.case_id).status is CaseStatus.COMPLETED


def test_a_batch_whose_answer_was_lost_leaves_each_case_to_recovery_by_label(memory_hpc):
    sandbox = memory_hpc(groups=FOUR_GPUS)
    ctx = sandbox.context()
    cases = register(ctx, "a", "b", "c")
    hpc, host = sandbox.hpc, ctx.hosts[sandbox.hpc.name]
    submitter.host_ready(ctx, host)
    hpc.fail_next("submit", SubmitUncertain("the connection was cut after the adds"), after=True)

    assert submitter.claim_on(ctx, host, ctx.clock()) == 3
    assert statuses(ctx, cases) == [CaseStatus.SUBMITTING] * 3               # could not tell: no guess
    assert all(len(sandbox.tasks_labelled(c.label)) == 1 for c in cases)     # each add did land
    sandbox.clock.advance(1)
    submitter.recover_tick(ctx, ctx.clock())                                 # recovery finds each by its label
    assert statuses(ctx, cases) == [CaseStatus.RUNNING] * 3
    for case in cases:
        assert run_until_final(ctx, case.case_id).status is CaseStatus.COMPLETED
        assert len(sandbox.tasks_labelled(case.label)) == 1                  # none run twice


def test_an_upload_cut_off_sends_every_case_of_the_batch_back_and_frees_their_seats(memory_hpc):
    sandbox = memory_hpc(groups=FOUR_GPUS)
    ctx = sandbox.context()
    cases = register(ctx, "a", "b")
    hpc, host = sandbox.hpc, ctx.hosts[sandbox.hpc.name]
    submitter.host_ready(ctx, host)
    hpc.fail_next("upload", Unreachable("ssh: connect to host gpu port 22: Connection timed out"), times=2)

    assert submitter.claim_on(ctx, host, ctx.clock()) == 2
    assert statuses(ctx, cases) == [CaseStatus.SUBMITTED] * 2 and "submit" not in hpc.calls
    assert {get_slot(ctx.conn, name).status for name in FOUR_GPUS} == {SlotStatus.AVAILABLE}
    assert all(not sandbox.tasks_labelled(c.label) for c in cases)


def test_the_results_of_cases_one_pass_completes_come_in_one_download(memory_hpc):
    sandbox = memory_hpc(groups=FOUR_GPUS)
    ctx = sandbox.context()
    cases = register(ctx, "a", "b", "c", seconds=1)
    host = ctx.hosts[sandbox.hpc.name]
    submitter.host_ready(ctx, host)
    assert submitter.claim_on(ctx, host, ctx.clock()) == 3
    sandbox.clock.advance(5)                                                 # all three ended meanwhile
    before = len(sandbox.hpc.calls)

    assert poller.tick(ctx, ctx.clock()) == 3

    assert sandbox.hpc.calls[before:].count("download") == 1
    for case in cases:
        done = get_case(ctx.conn, case.case_id)
        assert done.status is CaseStatus.COMPLETED and done.result_checksums
        assert (ctx.spool.path_for(done) / "output").is_dir()


def test_with_many_seats_free_the_stager_uploads_the_cases_after_the_next_claim_pass(memory_hpc):
    """Bench (many_gpus): with every seat free the stager left all waiting cases to the claims, so
    at a start 48 GPUs were filled one claim pass (upload, then submit) after another."""
    twenty = {f"gpu_{n}": {"gpu": n} for n in range(20)}
    sandbox = memory_hpc(groups=twenty)
    ctx = sandbox.context()
    cases = register(ctx, *(f"case-{n}" for n in range(20)))
    host = ctx.hosts[sandbox.hpc.name]
    submitter.host_ready(ctx, host)

    assert submitter.stage_on(ctx, host, ctx.clock()) == 20 - submitter.BATCH_MOST
    staged = [c.case_id for c in cases if get_case(ctx.conn, c.case_id).staged_at]
    assert staged == [c.case_id for c in cases[submitter.BATCH_MOST:]]     # the head is the next claim pass's


def test_a_claim_made_after_a_slow_first_contact_is_stamped_and_leased_from_when_it_was_made(memory_hpc):
    sandbox = memory_hpc(groups=FOUR_GPUS)
    ctx = sandbox.context()
    case = register(ctx, "a")[0]
    host = ctx.hosts[sandbox.hpc.name]
    lease = ctx.config.main_loop.lease_seconds
    make_slots = host.backend.ensure_slots

    def slow_make_slots(wanted):                    # 48 groups on a busy login node: longer than a lease
        sandbox.clock.advance(lease + 10)
        return make_slots(wanted)

    host.backend.ensure_slots = slow_make_slots
    pass_began = ctx.clock()
    assert submitter.claim_on(ctx, host, pass_began) == 1
    claimed_at = ctx.conn.execute("SELECT at FROM case_events WHERE case_id = ? AND to_status = ?",
                                  (case.case_id, CaseStatus.SUBMITTING.value)).fetchone()[0]
    assert claimed_at >= pass_began + lease + 10    # not the pass's start: its lease would be born expired


def test_cases_for_idle_gpus_go_up_and_are_submitted_before_the_cases_that_will_only_queue(memory_hpc):
    sandbox = memory_hpc(groups={"gpu_a": {"gpu": 0, "depth": 2}, "gpu_b": {"gpu": 1, "depth": 2}})
    ctx = sandbox.context()
    cases = register(ctx, "a1", "b1", "a2", "b2")
    host = ctx.hosts[sandbox.hpc.name]
    submitter.host_ready(ctx, host)
    uploaded, upload_many = [], host.remote.upload_many

    def recorded(batch, **options):
        uploaded.append(sorted(item.case_id for item in batch))
        return upload_many(batch, **options)

    host.remote.upload_many = recorded
    before = len(sandbox.hpc.calls)
    assert submitter.claim_on(ctx, host, ctx.clock()) == 4
    ids = [case.case_id for case in cases]
    assert uploaded == [ids[:2], ids[2:]]                       # one case per idle GPU first, then their queue
    assert sandbox.hpc.calls[before:].count("submit") == 2
    first_two = {get_case(ctx.conn, i).slot for i in ids[:2]}
    assert first_two == {"gpu_a", "gpu_b"} and statuses(ctx, cases) == [CaseStatus.RUNNING] * 4


def test_pre_uploaded_cases_for_idle_and_busy_gpus_still_go_in_one_submit(memory_hpc):
    sandbox = memory_hpc(groups={"gpu_a": {"gpu": 0, "depth": 2}, "gpu_b": {"gpu": 1, "depth": 2}})
    ctx = sandbox.context()
    register(ctx, "a1", "b1", "a2", "b2")
    host = ctx.hosts[sandbox.hpc.name]
    submitter.host_ready(ctx, host)
    idle = idle_slots(ctx.conn, host.name)
    claims = submitter.claim_cases(ctx, ctx.clock(), host, 4)
    assert idle == {(host.name, "gpu_a"), (host.name, "gpu_b")}
    assert [len(batch) for batch in submitter.idle_gpus_first(claims, idle)] == [2, 2]
    staged = [replace(claim, case=replace(claim.case, staged_at=ctx.clock(), remote_dir=f"/hpc/{claim.case.case_id}"))
              for claim in claims]
    assert submitter.idle_gpus_first(claims[:2] + staged[2:], idle) == [claims[:2] + staged[2:]]  # nothing to wait for
    assert submitter.idle_gpus_first(claims, set()) == [claims]                                   # no GPU idle
    one_idle = {(host.name, "gpu_a")}                          # one queue ran dry among busy GPUs: one call
    assert submitter.idle_gpus_first([claims[0], claims[2]], one_idle) == [[claims[0], claims[2]]]
