"""Hosts in parallel (issue 19): a slow host never delays another host's claims, uploads, submits,
pre-uploads or polls; poll stamps are the time the answer was seen; the pre-upload depth rule.

The slow host is made by a wrapper around ssh (``hpc.ssh_command``) that sleeps the seconds
written in a file before every session (the shared connection's own control commands excepted),
like a busy login node; the file is read at each call, so a test sets things up at full speed
first. Assertions are orderings of recorded times, never "faster than N seconds".
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import yaml

from sandbox.casegen import make_case
from shared.claims import claim_next_case
from shared.config import load_config
from shared.db import connect
from shared.seats import SeatSpec, sync_slots
from shared.states import CaseStatus
from shared.store import get_case, register_case
from shared.worker import build_context, wake_loops
from tests.conftest import make_hosts_config, wait_until
from workers import poller, scanner, submitter

NOW = 1_700_000_000.0
SLOW = 3  # seconds every remote command of the slow host waits first


# -- the claim of one host's loop (fast tier) ---------------------------------------------------------

def seats(conn, *specs):
    sync_slots(conn, [SeatSpec(*spec) for spec in specs], now=NOW, worker="t")


def waiting(conn, name: str, at: float, priority: str = "normal") -> int:
    case_id = register_case(conn, case_name=name, source_path=f"/drop/{name}", now=at, worker="scanner",
                            priority=priority).case_id
    conn.execute("UPDATE cases SET spool_stage = 'queued' WHERE case_id = ?", (case_id,))  # as the scanner
    return case_id


def test_a_hosts_claim_leaves_the_head_case_to_the_host_with_the_idle_gpu(conn):
    seats(conn, ("a", "gpu", 0), ("b", "gpu", 0), ("b", "gpu", 1))
    busy = waiting(conn, "busy", NOW)
    assert claim_next_case(conn, worker="w", now=NOW + 1, lease_seconds=60, seats=[("b", "gpu")]).case.case_id == busy
    first, second = waiting(conn, "first", NOW + 2), waiting(conn, "second", NOW + 3)
    # b's free seat queues behind its running case; a's GPU is idle: the head case is a's
    claim = claim_next_case(conn, worker="b-loop", now=NOW + 4, lease_seconds=60, host="b")
    assert (claim.case.case_id, claim.host) == (second, "b")
    assert claim_next_case(conn, worker="b-loop", now=NOW + 5, lease_seconds=60, host="b") is None  # b is full
    claim = claim_next_case(conn, worker="a-loop", now=NOW + 6, lease_seconds=60, host="a")
    assert (claim.case.case_id, claim.host) == (first, "a")


def test_a_hosts_claim_takes_nothing_planned_for_another_host(conn):
    seats(conn, ("a", "gpu", 0), ("b", "gpu", 0), ("b", "gpu", 1))
    assert claim_next_case(conn, worker="w", now=NOW, lease_seconds=60, host="b") is None  # no case
    busy = waiting(conn, "busy", NOW)
    assert claim_next_case(conn, worker="w", now=NOW + 1, lease_seconds=60, host="b") is None  # a's idle GPU wins the tie
    assert claim_next_case(conn, worker="w", now=NOW + 1, lease_seconds=60, seats=[("b", "gpu")]).case.case_id == busy
    waiting(conn, "only", NOW + 2)
    assert claim_next_case(conn, worker="b-loop", now=NOW + 3, lease_seconds=60, host="b") is None  # a's idle GPU
    assert claim_next_case(conn, worker="a-loop", now=NOW + 4, lease_seconds=60, host="a").host == "a"


@pytest.mark.parametrize("seed", range(8))
def test_claims_by_host_loops_hand_out_what_one_claim_at_a_time_would(tmp_path, seed):
    """Whatever order the hosts' loops claim in, each case gets the seat the one-at-a-time claim
    gave it (urgent first, idle GPUs first, its pre-upload host first)."""
    rng = random.Random(seed)
    layout = [(host, f"g{g}", seat) for host in "abc" for g in range(rng.randint(1, 2))
              for seat in range(rng.randint(1, 2))]
    busy = rng.sample(range(len(layout)), k=len(layout) // 3)  # seats already taken
    draws = [(rng.choice(["normal", "normal", "urgent"]), rng.choice([None, "a", "b", "c"]))
             for _ in range(len(layout) + 2)]
    handed = []
    for by_host in (False, True):
        conn = connect(tmp_path / f"{by_host}.db")
        seats(conn, *layout)
        for index in busy:  # a zombie seat counts as taken, like an assigned one
            conn.execute("UPDATE gpu_resources SET status = 'zombie' WHERE slot_id = ?", (index + 1,))
        for i, (priority, staged_on) in enumerate(draws):
            case_id = waiting(conn, f"c{i}", NOW + i, priority)
            if staged_on:
                conn.execute("UPDATE cases SET host = ?, remote_dir = ?, staged_at = ? WHERE case_id = ?",
                             (staged_on, f"/r/{case_id}", NOW + i, case_id))
        order, got = random.Random(seed + 100), {}
        while True:
            hosts = order.sample("abc", 3)
            claim = next((c for h in hosts if (c := claim_next_case(conn, worker=h, now=NOW + 50, lease_seconds=60,
                                                                    host=h))), None) if by_host else \
                claim_next_case(conn, worker="one", now=NOW + 50, lease_seconds=60)
            if claim is None:
                break
            got[claim.case.case_name] = (claim.host, claim.group, claim.slot.seat)
        handed.append(got)
        conn.close()
    assert handed[0] and handed[1] == handed[0]


# -- the pre-upload depth rule (fast tier) -------------------------------------------------------------

HOSTS = [{"name": "wide", "host": "127.0.0.1", "groups": {f"g{i}": {"gpu": i, "depth": 2} for i in range(4)}},
         {"name": "small", "host": "127.0.0.1", "port": 2222, "groups": {"g0": {"gpu": 0}}}]


@pytest.fixture
def desk(tmp_path):
    ctx = build_context(make_hosts_config(tmp_path, HOSTS), "submitter")
    ctx.memory.hosts_ready.update(ctx.hosts)
    yield ctx
    ctx.conn.close()


def ran(ctx, host: str, seconds: float, count: int = 5) -> None:
    """``count`` completed runs of ``seconds`` on ``host``, an hour ago."""
    for i in range(count):
        case_id = waiting(ctx.conn, f"old-{host}-{i}", NOW - 3600 + i)
        ctx.conn.execute("UPDATE cases SET status = 'completed', host = ?, started_at = ?, completed_at = ?"
                         " WHERE case_id = ?", (host, NOW - 3000 + i, NOW - 3000 + i + seconds, case_id))


def test_with_nothing_measured_a_host_keeps_one_case_ahead_per_slot(desk):
    assert submitter.pre_upload_depth(desk, desk.hosts["wide"], NOW) == 4
    assert submitter.pre_upload_depth(desk, desk.hosts["small"], NOW) == 1
    # every seat free: one pre-upload per free seat plus the depth, but never more than the seats
    assert submitter.staging_room(desk, desk.hosts["wide"], NOW) == 8
    assert submitter.staging_room(desk, desk.hosts["small"], NOW) == 1


def test_the_depth_covers_the_seats_that_free_while_one_case_uploads(desk):
    ran(desk, "wide", seconds=20)                         # 4 GPUs, 20 s runs: a GPU frees every 5 s
    wide = desk.hosts["wide"]
    desk.memory.upload_seconds["wide"] = [2.0, 2.0, 3.0]  # uploads of 2 s: 4 x 2 / 20 -> 1, one per slot wins
    assert submitter.pre_upload_depth(desk, wide, NOW) == 4
    desk.memory.upload_seconds["wide"] = [30.0, 30.0]    # 30 s: six seats free meanwhile
    assert submitter.pre_upload_depth(desk, wide, NOW) == 6
    desk.memory.upload_seconds["wide"] = [300.0]          # 60 wanted, 8 seats: the space rule caps it
    assert submitter.pre_upload_depth(desk, wide, NOW) == 60
    assert submitter.staging_room(desk, wide, NOW) == 8


def test_without_an_upload_timed_the_measured_hand_off_stands_in(desk):
    ran(desk, "wide", seconds=10)
    for i in range(3):                                   # claim -> running in 25 s
        case_id = waiting(desk.conn, f"run{i}", NOW - 100)
        desk.conn.execute("INSERT INTO case_events (case_id, from_status, to_status, at, worker, detail)"
                          " VALUES (?, 'submitted', 'submitting', ?, 'submitter', 'claimed')", (case_id, NOW - 100))
        desk.conn.execute("UPDATE cases SET status = 'running', host = 'wide', pueue_group = 'g0',"
                          " running_since = ? WHERE case_id = ?", (NOW - 75, case_id))
    pace = submitter.host_pace(desk, desk.hosts["wide"], NOW)
    assert (pace.run_seconds, pace.handoff_seconds) == (10, 25)
    assert submitter.pre_upload_depth(desk, desk.hosts["wide"], NOW) == 10   # ceil(4 x 25 / 10)


def test_pre_uploads_already_there_count_and_a_space_refusal_holds_them_back(desk):
    small = desk.hosts["small"]
    case_id = waiting(desk.conn, "staged", NOW)
    desk.conn.execute("UPDATE cases SET host = 'small', remote_dir = '/r/1', staged_at = ? WHERE case_id = ?",
                      (NOW, case_id))
    assert submitter.staging_room(desk, small, NOW) == 0   # its one seat's worth is there already
    assert submitter.staging_room(desk, desk.hosts["wide"], NOW) == 8
    desk.memory.staging_paused_until["wide"] = NOW + submitter.SPACE_PAUSE_SECONDS
    assert submitter.staging_room(desk, desk.hosts["wide"], NOW + 1) == 0
    assert submitter.staging_room(desk, desk.hosts["wide"], NOW + submitter.SPACE_PAUSE_SECONDS) == 8


# -- two sandbox hosts, the first one slow (system tier) ------------------------------------------------

SLOW_SSH = """#!/bin/sh
# A busy login node: every session waits first; the shared connection's control commands do not.
case " $* " in *" -O "*|*" -M "*) ;; *) sleep "$(cat {delay})";; esac
exec ssh "$@"
"""


class SlowFirstHost:
    """Two sandbox hosts, ``gpu1`` (first in the config) behind the slow ssh wrapper."""

    def __init__(self, two_hosts, tmp_path: Path, **settings):
        self.two = two_hosts(**settings)
        self.delay = tmp_path / "delay"
        self.delay.write_text("0")
        wrapper = tmp_path / "slow-ssh"
        wrapper.write_text(SLOW_SSH.format(delay=self.delay))
        wrapper.chmod(0o755)
        data = yaml.safe_load(self.two.config_path.read_text())
        assert [h["name"] for h in data["hosts"]] == ["gpu1", "gpu2"]
        data["hosts"][0]["ssh_command"] = str(wrapper)
        self.two.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        self.config = load_config(self.two.config_path)
        self.ctx = build_context(self.config, "submitter")

    def slow(self, seconds: float = SLOW) -> None:
        self.delay.write_text(str(seconds))

    def drop(self, *names: str, seconds: float) -> list[int]:
        for name in names:
            make_case(self.config.scanner.watch_path, name, seconds=seconds, batches=2, deliveries=1,
                      layers_per_delivery=1, atomic=True)
        scanner.tick(self.ctx, time.time())
        scanner.tick(self.ctx, time.time() + 100)
        return [r[0] for r in self.ctx.conn.execute("SELECT case_id FROM cases ORDER BY case_id")]

    def stop_loops(self) -> None:
        self.ctx.stop.set()
        wake_loops(self.ctx)
        for thread in self.ctx.memory.helper_threads:
            thread.join(timeout=120)
            assert not thread.is_alive(), thread.name

    def close(self) -> None:
        self.slow(0)
        for host in ("gpu1", "gpu2"):
            self.two.host(host).pueue_cli("kill", "--all")
        self.ctx.conn.close()


def event_times(conn, to_status: str, detail_like: str = "%") -> dict[int, float]:
    """Per case, the time of its newest move to ``to_status`` whose detail matches."""
    rows = conn.execute("SELECT case_id, MAX(at) FROM case_events WHERE to_status = ? AND detail LIKE ?"
                        " GROUP BY case_id", (to_status, detail_like))
    return {case_id: at for case_id, at in rows}


@pytest.fixture
def slow_first(two_hosts, tmp_path):
    made = []

    def build(**settings) -> SlowFirstHost:
        made.append(SlowFirstHost(two_hosts, tmp_path, **settings))
        return made[-1]

    yield build
    for world in made:
        world.close()


def test_a_slow_host_delays_neither_the_claims_and_submits_nor_the_pre_uploads_of_another(slow_first):
    w = slow_first(groups={"gpu_a": {"gpu": 0}},
                   second_groups={"gpu_a": {"gpu": 0, "depth": 2}, "gpu_b": {"gpu": 1, "depth": 2}})
    ctx = w.ctx
    for host in ctx.hosts.values():                        # made ready at full speed, as on a long-running process
        assert submitter.host_ready(ctx, host)
    # 5 seats; of the 7 waiting, the fast host's stager takes at most its 4 seats' worth in one batch,
    # so cases are left for the slow host's stager whichever of the two claims first
    w.drop(*(f"case{i}" for i in range(12)), seconds=120)
    w.slow()
    submitter.start_loops(ctx)                             # the process's loops: per host a claim loop and a stager
    try:
        wait_until(lambda: len(event_times(ctx.conn, "running")) == 5, timeout=120,
                   message="every seat's case submitted")
        wait_until(lambda: len(event_times(ctx.conn, "submitted", "pre-uploaded to gpu1:%")) >= 1, timeout=120,
                   message="a case pre-uploaded to the slow host")
    finally:
        w.stop_loops()
    host_of = {c: get_case(ctx.conn, c).host for c in event_times(ctx.conn, "running")}
    claimed, running = event_times(ctx.conn, "submitting"), event_times(ctx.conn, "running")
    [slow_case] = [c for c, h in host_of.items() if h == "gpu1"]
    fast_cases = [c for c, h in host_of.items() if h == "gpu2"]
    assert len(fast_cases) == 4
    # whichever host claimed first, the fast host's cases (one batch) were all running within less
    # than two of the slow host's calls after the first claim, long before the slow host's submit
    first_claim = min(claimed.values())
    assert max(running[c] for c in fast_cases) - first_claim < 2 * SLOW, (claimed, running)
    assert all(running[c] < running[slow_case] for c in fast_cases), (claimed, running)
    staged_fast = sorted(event_times(ctx.conn, "submitted", "pre-uploaded to gpu2:%").values())
    staged_slow = sorted(event_times(ctx.conn, "submitted", "pre-uploaded to gpu1:%").values())
    assert len(staged_fast) >= 2                           # gpu2: one case ahead per slot
    assert staged_fast[1] < staged_slow[0]                 # both before the slow host's first was up


def test_a_slow_host_does_not_delay_another_hosts_polls(slow_first):
    w = slow_first(groups={"gpu_a": {"gpu": 0}}, second_groups={"gpu_a": {"gpu": 0}})
    ctx = w.ctx
    slow_case, fast_case = w.drop("on-slow", "on-fast", seconds=0.2)
    for _ in range(2):
        assert submitter.tick(ctx, time.time()) == 1
    assert {get_case(ctx.conn, slow_case).host, get_case(ctx.conn, fast_case).host} == {"gpu1", "gpu2"}
    if get_case(ctx.conn, slow_case).host != "gpu1":
        slow_case, fast_case = fast_case, slow_case
    for host in ("gpu1", "gpu2"):
        wait_until(lambda: all("Done" in str(t["status"]) for t in w.two.tasks(host)), timeout=60,
                   message=f"the task on {host} ended")
    w.slow()
    poller.start_host_polls(ctx)                           # the process's poll loops, one per host
    try:
        wait_until(lambda: get_case(ctx.conn, slow_case).status is CaseStatus.COMPLETED, timeout=120,
                   message="the slow host's case completed")
    finally:
        w.stop_loops()
    slow, fast = get_case(ctx.conn, slow_case), get_case(ctx.conn, fast_case)
    assert fast.status is CaseStatus.COMPLETED
    # gpu1 comes first in the config: polled host after host, its case would have completed first
    assert fast.completed_at < slow.completed_at


def test_completed_at_is_when_the_result_was_seen_not_when_the_pass_began(slow_first):
    """Bug: the poller stamped completed_at with its pass's start, a slow status call (or a whole
    pass over the hosts before it) earlier than the result was seen."""
    w = slow_first(groups={"gpu_a": {"gpu": 0}}, second_groups={"gpu_a": {"gpu": 0}})
    ctx = w.ctx
    [case_id] = w.drop("quick", seconds=0.2)
    ctx.conn.execute("INSERT INTO drains (host, since, drained_by) VALUES ('gpu2', 0, 'test')")  # gpu1 takes it
    assert submitter.tick(ctx, time.time()) == 1 and get_case(ctx.conn, case_id).host == "gpu1"
    wait_until(lambda: all("Done" in str(t["status"]) for t in w.two.tasks("gpu1")), timeout=60,
               message="the task ended")
    w.slow()
    began = time.time()
    assert poller.tick(ctx, began) == 1
    case = get_case(ctx.conn, case_id)
    assert case.status is CaseStatus.COMPLETED
    assert case.completed_at >= began + SLOW              # the status call alone waited SLOW seconds first
