"""Several hosts and slots with depth, at the level of the workers' ticks (issue 11).

Fast tier: each host is an HPC in memory (``tests/memory_hpc.py``) with its own scheduler and
disk, all on one injected clock; "host down" is that host's ``down`` switch. The same behaviour
through real sshds, pueue stand-ins and Slurm is proven end to end in ``test_e2e_hosts.py`` and
``test_e2e_host_edge.py``.
"""
from __future__ import annotations

from shared.liveness import down_hosts
from shared.seats import all_slots
from shared.states import CaseStatus, SlotStatus
from shared.store import get_case
from tests.conftest import get_slot
from tests.test_workers import drop, run_until_final
from workers import poller, reaper, scanner, submitter


def two_hosts(memory_hpc, groups_a=None, groups_b=None):
    """A sandbox with hosts a and b (a scheduler and a disk each), one GPU each unless told."""
    return memory_hpc(hosts=[{"name": "a", "groups": groups_a or {"gpu_a": {"gpu": 0}}},
                             {"name": "b", "groups": groups_b or {"gpu_a": {"gpu": 0}}}])


def register(ctx, *names, seconds=0.3):
    for name in names:
        drop(ctx.config, name, seconds=seconds)
    scanner.tick(ctx, ctx.clock() - 100)
    scanner.tick(ctx, ctx.clock())
    return [get_case(ctx.conn, row[0]) for row in ctx.conn.execute("SELECT case_id FROM cases ORDER BY case_id")]


def test_cases_go_to_idle_gpus_on_both_hosts_and_complete_on_each(memory_hpc):
    sandbox = two_hosts(memory_hpc)
    ctx = sandbox.context()
    first, second = register(ctx, "one", "two")
    assert submitter.tick(ctx, ctx.clock()) == 1 and submitter.tick(ctx, ctx.clock()) == 1
    hosts = {get_case(ctx.conn, c.case_id).host for c in (first, second)}
    assert hosts == {"a", "b"}                                          # one idle GPU on each
    for case in (first, second):
        done = run_until_final(ctx, case.case_id)
        assert done.status is CaseStatus.COMPLETED
        assert [t.path for t in sandbox.tasks_labelled(case.label, host=done.host)] == [done.remote_dir]
    assert {s.status for s in all_slots(ctx.conn)} == {SlotStatus.AVAILABLE}


def test_depth_two_queues_the_next_case_behind_the_running_one(memory_hpc):
    sandbox = memory_hpc(groups={"gpu_a": {"gpu": 0, "depth": 2}})
    ctx = sandbox.context()
    first, second, third = register(ctx, "one", "two", "three", seconds=4)
    for _ in range(3):
        submitter.tick(ctx, ctx.clock())
    states = {c.case_id: get_case(ctx.conn, c.case_id).status for c in (first, second, third)}
    assert states == {first.case_id: CaseStatus.RUNNING, second.case_id: CaseStatus.RUNNING,
                      third.case_id: CaseStatus.SUBMITTED}                     # two seats, one GPU
    [queued] = sandbox.tasks_labelled(second.label)
    assert queued.group == "gpu_a" and queued.state.is_waiting               # waits in the scheduler, not with us
    poller.tick(ctx, ctx.clock())
    assert get_case(ctx.conn, second.case_id).started_at is None              # its clock has not started
    assert run_until_final(ctx, first.case_id).status is CaseStatus.COMPLETED
    submitter.tick(ctx, ctx.clock())                                          # the freed seat takes the third
    assert get_case(ctx.conn, third.case_id).status is CaseStatus.RUNNING
    for case in (second, third):
        assert run_until_final(ctx, case.case_id).status is CaseStatus.COMPLETED


def test_a_queued_case_is_not_flagged_stuck_while_it_waits_its_turn(memory_hpc):
    sandbox = memory_hpc(groups={"gpu_a": {"gpu": 0, "depth": 2}}, main_loop={"stuck_after_minutes": 1})
    ctx = sandbox.context()
    first, second = register(ctx, "long", "next", seconds=30)
    submitter.tick(ctx, ctx.clock())
    submitter.tick(ctx, ctx.clock())
    later = ctx.clock() + 45                                # past half of stuck_after: the poller vouches
    poller.tick(ctx, later)
    reaper.flag_stuck(ctx, later + 30)                      # 75 s after the submit, 30 s after the poll
    assert get_case(ctx.conn, second.case_id).started_at is None       # still queued behind the first
    assert not get_case(ctx.conn, second.case_id).needs_review


def test_a_zombie_seat_is_freed_when_its_own_case_has_no_task_left_though_others_run(memory_hpc):
    sandbox = memory_hpc(groups={"gpu_a": {"gpu": 0, "depth": 2}})
    ctx = sandbox.context()
    drop(ctx.config, "fails", mode="fail")
    drop(ctx.config, "runs", seconds=20)
    scanner.tick(ctx, ctx.clock() - 100)
    scanner.tick(ctx, ctx.clock())
    submitter.tick(ctx, ctx.clock())
    submitter.tick(ctx, ctx.clock())
    failing, running = [get_case(ctx.conn, r[0]) for r in ctx.conn.execute("SELECT case_id FROM cases ORDER BY case_id")]
    assert run_until_final(ctx, failing.case_id).status is CaseStatus.FAILED
    zombie = next(s for s in all_slots(ctx.conn) if s.assigned_case_id == failing.case_id)
    assert zombie.status is SlotStatus.ZOMBIE
    reaper.tick(ctx, ctx.clock())                   # the other case runs in the group: that is no reason to wait
    assert get_slot(ctx.conn, "gpu_a", seat=zombie.seat).status is SlotStatus.AVAILABLE
    assert get_case(ctx.conn, running.case_id).status is CaseStatus.RUNNING


def test_a_host_that_is_down_loses_only_its_own_seats_and_its_cases_wait(memory_hpc):
    sandbox = two_hosts(memory_hpc)
    ctx = sandbox.context()
    on_b, *_ = register(ctx, "on-b")
    ctx.conn.execute("INSERT INTO drains (host, since, drained_by) VALUES ('a', 0, 't')")
    submitter.tick(ctx, ctx.clock())                                        # only b has room now
    assert get_case(ctx.conn, on_b.case_id).host == "b"
    ctx.conn.execute("DELETE FROM drains")
    b = sandbox.hpcs["b"]
    b.down = True                                                           # b unreachable from here
    poller.tick(ctx, ctx.clock())
    assert list(down_hosts(ctx.conn)) == ["b"]
    assert get_case(ctx.conn, on_b.case_id).status is CaseStatus.RUNNING    # could not tell: no change
    later = register(ctx, "meanwhile")[-1]
    calls_to_b = len(b.calls)
    assert submitter.tick(ctx, ctx.clock()) == 1 and len(b.calls) == calls_to_b   # b costs not even a call
    assert get_case(ctx.conn, later.case_id).host == "a"
    b.down = False
    sandbox.clock.advance(reaper.PROBE_DOWN_SECONDS + 1)
    reaper.tick(ctx, ctx.clock())                                           # b answers the probe again
    assert down_hosts(ctx.conn) == {}
    for case in (on_b, later):
        assert run_until_final(ctx, case.case_id).status is CaseStatus.COMPLETED
    assert get_slot(ctx.conn, "gpu_a", host="b").status is SlotStatus.AVAILABLE


def test_pre_uploads_spread_over_the_hosts_one_per_seat(memory_hpc):
    sandbox = two_hosts(memory_hpc)
    ctx = sandbox.context()
    register(ctx, "busy-1", "busy-2", seconds=20)
    submitter.tick(ctx, ctx.clock())
    submitter.tick(ctx, ctx.clock())                        # both GPUs busy now
    waiting = register(ctx, "next-1", "next-2", "next-3")[2:]
    assert submitter.stage_tick(ctx, ctx.clock()) == 1
    assert submitter.stage_tick(ctx, ctx.clock()) == 1
    assert submitter.stage_tick(ctx, ctx.clock()) == 0      # one pre-upload per seat is enough
    staged = [get_case(ctx.conn, c.case_id) for c in waiting]
    assert sorted(c.host for c in staged if c.staged_at) == ["a", "b"]


def test_with_depth_two_the_stager_uploads_ahead_even_while_a_seat_is_free(memory_hpc):
    """Bug (bench/gpu_idle_gap.py): the stager only ran once every seat was taken, so with depth 2
    (a seat nearly always free) every case was uploaded at its claim and the queue never filled.
    It leaves the head of the queue, which the free seat takes next, to the claim."""
    sandbox = memory_hpc(groups={"gpu_a": {"gpu": 0, "depth": 2}})
    ctx = sandbox.context()
    busy, *waiting = register(ctx, "busy", "next-1", "next-2", "next-3", seconds=20)
    submitter.tick(ctx, ctx.clock())                         # one seat taken, one free
    assert submitter.stage_tick(ctx, ctx.clock()) == 1       # room: the free seat and the slot's next case
    assert submitter.stage_tick(ctx, ctx.clock()) == 1
    assert submitter.stage_tick(ctx, ctx.clock()) == 0
    staged = [c.case_id for c in waiting if get_case(ctx.conn, c.case_id).staged_at]
    assert staged == [c.case_id for c in waiting[1:]]         # not next-1: the free seat takes it now
    submitter.tick(ctx, ctx.clock())
    assert get_case(ctx.conn, waiting[0].case_id).status is CaseStatus.RUNNING
    events = [r["detail"] for r in ctx.conn.execute("SELECT detail FROM case_events WHERE case_id = ?",
                                                    (waiting[1].case_id,))]
    assert any(d.startswith("pre-uploaded to hpc:") for d in events)
