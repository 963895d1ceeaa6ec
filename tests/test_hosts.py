"""Several hosts and slots with depth, at the level of the workers' ticks (issue 11).

Two sandbox hosts share the session's sshd but each has its own pueue stand-in and
remote folder; "host down" is the same host reached through a port nobody listens on,
in a second context over the same database.
"""
from __future__ import annotations

import time

import yaml

from shared.config import parse_config
from shared.liveness import down_hosts
from shared.seats import all_slots, get_slot
from shared.states import CaseStatus, SlotStatus
from shared.store import get_case
from shared.worker import build_context
from tests.test_workers import drop, poll_until_final
from workers import poller, reaper, scanner, submitter


def host_entry(h, name: str, groups: dict, **override) -> dict:
    data = yaml.safe_load(h.config_path.read_text())
    return {"name": name, **data["hpc"], "groups": groups, **override}


def two_hosts(hpc, groups_a=None, groups_b=None, **b_override):
    """A config with hosts a and b (own pueue each); returns (config, stand-in of a, stand-in of b)."""
    a, b = hpc(), hpc()
    data = yaml.safe_load(a.config_path.read_text())
    del data["hpc"], data["pueue"]["groups"]
    data["hosts"] = [host_entry(a, "a", groups_a or {"gpu_a": {"gpu": 0}}),
                     host_entry(b, "b", groups_b or {"gpu_a": {"gpu": 0}}, **b_override)]
    return parse_config(data, a.config_path), a, b


def context(config, name="test"):
    ctx = build_context(config, name)
    ctx.clock = time.time
    return ctx


def register(ctx, *names, seconds=0.3):
    for name in names:
        drop(ctx.config, name, seconds=seconds)
    scanner.tick(ctx, time.time())
    scanner.tick(ctx, time.time() + 100)
    return [get_case(ctx.conn, row[0]) for row in ctx.conn.execute("SELECT case_id FROM cases ORDER BY case_id")]


def dead_port_twin(config, host_name: str):
    """The same config with ``host_name`` reached through a port nobody listens on."""
    data = yaml.safe_load(config.source.read_text())
    data.pop("hpc", None)
    data["pueue"].pop("groups", None)
    data["hosts"] = []
    for host in config.hosts:
        entry = yaml.safe_load(config.source.read_text())["hpc"] | {"name": host.name,
                                                                    "remote_base_dir": host.hpc.remote_base_dir,
                                                                    "pueue_command": " ".join(host.hpc.pueue_command),
                                                                    "groups": {s.name: {"gpu": s.gpu, "depth": s.depth}
                                                                               for s in host.slots}}
        if host.name == host_name:
            entry["port"] = 9  # discard: nothing listens, so every connect is refused
        data["hosts"].append(entry)
    return parse_config(data, config.source)


def test_cases_go_to_idle_gpus_on_both_hosts_and_complete_on_each(hpc):
    config, a, b = two_hosts(hpc)
    ctx = context(config)
    first, second = register(ctx, "one", "two")
    assert submitter.tick(ctx, time.time()) == 1 and submitter.tick(ctx, time.time()) == 1
    hosts = {get_case(ctx.conn, c.case_id).host for c in (first, second)}
    assert hosts == {"a", "b"}                                          # one idle GPU on each
    for case in (first, second):
        done = poll_until_final(ctx, case.case_id)
        assert done.status is CaseStatus.COMPLETED
        stand_in = a if done.host == "a" else b
        assert [t["path"] for t in stand_in.tasks_labelled(case.label)] == [done.remote_dir]
    assert {s.status for s in all_slots(ctx.conn)} == {SlotStatus.AVAILABLE}


def test_depth_two_queues_the_next_case_behind_the_running_one(hpc):
    h = hpc(groups={"gpu_a": {"gpu": 0, "depth": 2}})
    ctx = context(h.config)
    first, second, third = register(ctx, "one", "two", "three", seconds=4)
    for _ in range(3):
        submitter.tick(ctx, time.time())
    states = {c.case_id: get_case(ctx.conn, c.case_id).status for c in (first, second, third)}
    assert states == {first.case_id: CaseStatus.RUNNING, second.case_id: CaseStatus.RUNNING,
                      third.case_id: CaseStatus.SUBMITTED}                     # two seats, one GPU
    [queued] = h.tasks_labelled(second.label)
    assert queued["group"] == "gpu_a" and "Queued" in str(queued["status"])   # waits in pueue, not with us
    poller.tick(ctx, time.time())
    assert get_case(ctx.conn, second.case_id).started_at is None              # its clock has not started
    assert poll_until_final(ctx, first.case_id).status is CaseStatus.COMPLETED
    submitter.tick(ctx, time.time())                                          # the freed seat takes the third
    assert get_case(ctx.conn, third.case_id).status is CaseStatus.RUNNING
    for case in (second, third):
        assert poll_until_final(ctx, case.case_id).status is CaseStatus.COMPLETED


def test_a_queued_case_is_not_flagged_stuck_while_it_waits_its_turn(hpc):
    h = hpc(groups={"gpu_a": {"gpu": 0, "depth": 2}}, main_loop={"stuck_after_minutes": 1})
    ctx = context(h.config)
    first, second = register(ctx, "long", "next", seconds=30)
    submitter.tick(ctx, time.time())
    submitter.tick(ctx, time.time())
    later = time.time() + 45                                # past half of stuck_after: the poller vouches
    poller.tick(ctx, later)
    reaper.flag_stuck(ctx, later + 30)                      # 75 s after the submit, 30 s after the poll
    assert get_case(ctx.conn, second.case_id).started_at is None       # still queued behind the first
    assert not get_case(ctx.conn, second.case_id).needs_review
    h.pueue("kill", "--all")


def test_a_zombie_seat_is_freed_when_its_own_case_has_no_task_left_though_others_run(hpc):
    h = hpc(groups={"gpu_a": {"gpu": 0, "depth": 2}})
    ctx = context(h.config)
    drop(ctx.config, "fails", mode="fail")
    drop(ctx.config, "runs", seconds=20)
    scanner.tick(ctx, time.time())
    scanner.tick(ctx, time.time() + 100)
    submitter.tick(ctx, time.time())
    submitter.tick(ctx, time.time())
    failing, running = [get_case(ctx.conn, r[0]) for r in ctx.conn.execute("SELECT case_id FROM cases ORDER BY case_id")]
    assert poll_until_final(ctx, failing.case_id).status is CaseStatus.FAILED
    zombie = next(s for s in all_slots(ctx.conn) if s.assigned_case_id == failing.case_id)
    assert zombie.status is SlotStatus.ZOMBIE
    reaper.tick(ctx, time.time())                   # the other case runs in the group: that is no reason to wait
    assert get_slot(ctx.conn, "gpu_a", seat=zombie.seat).status is SlotStatus.AVAILABLE
    assert get_case(ctx.conn, running.case_id).status is CaseStatus.RUNNING
    h.pueue("kill", "--all")


def test_a_host_that_is_down_loses_only_its_own_seats_and_its_cases_wait(hpc):
    config, a, b = two_hosts(hpc)
    ctx = context(config)
    on_b, *_ = register(ctx, "on-b")
    ctx.conn.execute("INSERT INTO drains (host, since, drained_by) VALUES ('a', 0, 't')")
    submitter.tick(ctx, time.time())                                        # only b has room now
    assert get_case(ctx.conn, on_b.case_id).host == "b"
    ctx.conn.execute("DELETE FROM drains")
    blind = context(dead_port_twin(config, "b"), "blind")                   # b unreachable from here
    poller.tick(blind, time.time())
    assert list(down_hosts(blind.conn)) == ["b"]
    assert get_case(blind.conn, on_b.case_id).status is CaseStatus.RUNNING   # could not tell: no change
    later = register(blind, "meanwhile")[-1]
    started = time.time()
    assert submitter.tick(blind, started) == 1 and time.time() - started < 5  # b costs no connect timeout
    assert get_case(blind.conn, later.case_id).host == "a"
    reaper.tick(ctx, time.time() + reaper.PROBE_DOWN_SECONDS + 1)            # b answers the probe again
    assert down_hosts(ctx.conn) == {}
    for case in (on_b, later):
        assert poll_until_final(ctx, case.case_id).status is CaseStatus.COMPLETED
    assert get_slot(ctx.conn, "gpu_a", host="b").status is SlotStatus.AVAILABLE


def test_pre_uploads_spread_over_the_hosts_one_per_seat(hpc):
    config, a, b = two_hosts(hpc)
    ctx = context(config)
    register(ctx, "busy-1", "busy-2", seconds=20)
    submitter.tick(ctx, time.time())
    submitter.tick(ctx, time.time())                        # both GPUs busy now
    waiting = register(ctx, "next-1", "next-2", "next-3")[2:]
    assert submitter.stage_tick(ctx, time.time()) == 1
    assert submitter.stage_tick(ctx, time.time()) == 1
    assert submitter.stage_tick(ctx, time.time()) == 0      # one pre-upload per seat is enough
    staged = [get_case(ctx.conn, c.case_id) for c in waiting]
    assert sorted(c.host for c in staged if c.staged_at) == ["a", "b"]
    for stand_in in (a, b):
        stand_in.pueue("kill", "--all")


def test_with_depth_two_the_stager_uploads_ahead_even_while_a_seat_is_free(hpc):
    """Bug (bench/gpu_idle_gap.py): the stager only ran once every seat was taken, so with depth 2
    (a seat nearly always free) every case was uploaded at its claim and the queue never filled.
    It leaves the head of the queue, which the free seat takes next, to the claim."""
    h = hpc(groups={"gpu_a": {"gpu": 0, "depth": 2}})
    ctx = context(h.config)
    busy, *waiting = register(ctx, "busy", "next-1", "next-2", "next-3", seconds=20)
    submitter.tick(ctx, time.time())                         # one seat taken, one free
    assert submitter.stage_tick(ctx, time.time()) == 1       # room: the free seat and the slot's next case
    assert submitter.stage_tick(ctx, time.time()) == 1
    assert submitter.stage_tick(ctx, time.time()) == 0
    staged = [c.case_id for c in waiting if get_case(ctx.conn, c.case_id).staged_at]
    assert staged == [c.case_id for c in waiting[1:]]         # not next-1: the free seat takes it now
    submitter.tick(ctx, time.time())
    assert get_case(ctx.conn, waiting[0].case_id).status is CaseStatus.RUNNING
    events = [r["detail"] for r in ctx.conn.execute("SELECT detail FROM case_events WHERE case_id = ?",
                                                    (waiting[1].case_id,))]
    assert any(d.startswith("pre-uploaded to hpc:") for d in events)
    h.pueue("kill", "--all")
