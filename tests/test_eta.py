"""ETAs (shared/eta.py) on real SQLite files, rows written with the calls the workers use, a fixed clock."""
from __future__ import annotations

import json
import re
import time

import pytest

from shared import eta
from shared.claims import claim_next_case, URGENT_FIRST
from shared.db import connect
from shared.liveness import note_remote
from shared.maintenance import drain
from shared.seats import release_slot_of, seat_specs, sync_slots
from shared.states import CaseStatus, SlotStatus
from shared.store import case_from_row, register_case, transition, update_case
from tests.conftest import cli, make_config, make_hosts_config
from tests.test_console import top_once


NOW = 1_000_000.0
HANDOFF = 10.0  # claim -> running row in every recorded run


class Desk:
    """Cases in any state, moved by the store's own guarded calls (no spool, no process)."""

    def __init__(self, config, now: float = NOW):
        self.config, self.now = config, now
        self.conn = connect(config.database_path)
        sync_slots(self.conn, seat_specs(config), now=now - 86400, worker="test")

    def waiting(self, name: str, at: float, priority: str = "normal") -> int:
        case_id = register_case(self.conn, case_name=name, source_path=f"/drop/{name}", now=at, worker="scanner",
                                priority=priority).case_id
        self.conn.execute("UPDATE cases SET spool_stage = 'queued' WHERE case_id = ?", (case_id,))  # as the scanner
        return case_id

    def running(self, name: str, claimed: float, *, started: float | None = None, seats=None,
                progress: float = 0.0, reported: float | None = None) -> int:
        """Claimed at ``claimed``, on the HPC ``HANDOFF`` later, started at ``started`` (None: queued there)."""
        self.waiting(name, claimed - 5)
        claim = claim_next_case(self.conn, worker="submitter:1", now=claimed, lease_seconds=120, seats=seats)
        assert claim.case.case_name == name
        on_hpc = claimed + HANDOFF
        assert transition(self.conn, claim.case.case_id, CaseStatus.SUBMITTING, CaseStatus.RUNNING, now=on_hpc,
                          worker="test", fields={"running_since": on_hpc, "task_id": claim.case.case_id,
                                                 "claimed_by": None, "lease_until": None})
        if started is not None:  # what the poller writes: the scheduler's start, then progress
            fields = {"started_at": started, "status_updated_at": reported or started, "progress": progress}
            assert update_case(self.conn, claim.case.case_id, CaseStatus.RUNNING, fields)
        return claim.case.case_id

    def completed(self, name: str, claimed: float, run_seconds: float, seats=None) -> int:
        case_id = self.running(name, claimed, started=claimed + HANDOFF, seats=seats)
        done = claimed + HANDOFF + run_seconds
        assert transition(self.conn, case_id, CaseStatus.RUNNING, CaseStatus.COMPLETED, now=done, worker="test",
                          fields={"completed_at": done, "outcome": "success", "progress": 100.0})
        case = self.conn.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        assert release_slot_of(self.conn, case_from_row(case), SlotStatus.AVAILABLE, now=done, worker="test")
        return case_id

    def history(self, runs: list[float], seats=None) -> None:
        """Completed runs of these lengths, long before NOW."""
        for i, seconds in enumerate(runs):
            self.completed(f"old{i}_{seats}", self.now - 50_000 + i * 1000, seconds, seats=seats)

    def estimate(self) -> dict[int, eta.Eta]:
        return eta.estimate(self.conn, self.config, self.now)


@pytest.fixture
def one_gpu(tmp_path):
    desk = Desk(make_config(tmp_path, pueue={"groups": {"gpu_a": {"gpu": 0}}}))
    yield desk
    desk.conn.close()


HOSTS = [{"name": "gpu1", "host": "127.0.0.1", "groups": {"gpu_a": {"gpu": 0}}},
         {"name": "gpu2", "host": "127.0.0.2", "groups": {"gpu_a": {"gpu": 0}}}]


@pytest.fixture
def two_hosts(tmp_path):
    desk = Desk(make_hosts_config(tmp_path, HOSTS))
    yield desk
    desk.conn.close()


def test_a_running_case_finishes_when_its_progress_rate_says(one_gpu):
    case_id = one_gpu.running("a", NOW - 120, started=NOW - 100, progress=25.0, reported=NOW - 20)
    found = one_gpu.estimate()[case_id]
    assert found.kind == "finish"
    assert found.at == pytest.approx(NOW - 100 + 80 * 4)  # 25 % after 80 s: 320 s in all
    assert "25% done 1m20s after its start" in found.basis and "progress rate" in found.basis


def test_with_a_measured_median_the_rate_counts_for_the_fraction_done(one_gpu):
    one_gpu.history([300.0])
    case_id = one_gpu.running("a", NOW - 120, started=NOW - 100, progress=25.0, reported=NOW - 20)
    found = one_gpu.estimate()[case_id]
    assert found.at == pytest.approx(NOW - 100 + 0.25 * 320 + 0.75 * 300)
    assert found.basis == ("25% done 1m20s after its start (progress rate, weighted 25% against the median"
                           " of 1 run on hpc)")


def test_without_progress_a_running_case_takes_the_hosts_recent_median_run(one_gpu):
    one_gpu.history([200.0, 300.0, 400.0])
    case_id = one_gpu.running("a", NOW - 70, started=NOW - 50)
    paces = eta.host_paces(one_gpu.conn, ["hpc", "elsewhere"], NOW, [])
    assert (paces["hpc"].run_seconds, paces["hpc"].basis) == (300.0, "median of 3 runs on hpc")
    assert paces["elsewhere"].basis == "median of 3 runs on all hosts"  # none of its own
    assert not eta.host_paces(one_gpu.conn, ["hpc"], NOW - 49_900, [])["hpc"].measured  # none completed by then
    found = one_gpu.estimate()[case_id]
    assert (found.kind, found.at) == ("finish", NOW - 50 + 300)
    assert "no progress yet" in found.basis and "median of 3 runs on hpc" in found.basis


def test_a_case_past_its_projection_is_due_now_not_in_the_past(one_gpu):
    one_gpu.history([100.0])
    case_id = one_gpu.running("a", NOW - 520, started=NOW - 500)
    found = one_gpu.estimate()[case_id]
    assert found.at == NOW and "overdue" in found.basis


def test_a_case_slower_than_its_last_report_is_projected_from_now_and_at_100_percent_ends_now(one_gpu):
    slow = one_gpu.running("a", NOW - 120, started=NOW - 100, progress=50.0, reported=NOW - 80)
    found = one_gpu.estimate()[slow]
    assert found.at == NOW + 100  # 50 % took at least 100 s: 200 s in all
    assert update_case(one_gpu.conn, slow, CaseStatus.RUNNING, {"progress": 100.0, "status_updated_at": NOW - 1})
    found = one_gpu.estimate()[slow]
    assert (found.at, found.basis) == (NOW, "100% done: its results are on the way")


def test_waiting_cases_start_one_after_another_behind_the_running_one(one_gpu):
    one_gpu.history([300.0, 300.0])
    running = one_gpu.running("a", NOW - 170, started=NOW - 150, progress=50.0, reported=NOW)  # ends NOW + 150
    first, second = one_gpu.waiting("b", NOW - 30), one_gpu.waiting("c", NOW - 20)
    found = one_gpu.estimate()
    assert found[running].at == NOW + 150
    assert (found[first].kind, found[first].at) == ("start", NOW + 150 + HANDOFF)
    assert found[second].at == NOW + 150 + HANDOFF + 300 + HANDOFF
    assert found[first].basis.startswith("1st in the queue (normal), 1 GPU taking cases")
    assert found[second].basis.startswith("2nd in the queue")


def test_a_case_backing_off_lets_the_ready_case_behind_it_take_the_free_seat(one_gpu):
    one_gpu.history([300.0, 300.0])
    paused = one_gpu.waiting("paused", NOW - 60)
    one_gpu.conn.execute("UPDATE cases SET next_attempt_at = ? WHERE case_id = ?", (NOW + 3600, paused))
    ready = one_gpu.waiting("ready", NOW - 30)
    found = one_gpu.estimate()
    assert found[ready].at == NOW + HANDOFF                      # the claim skips a case in backoff
    assert found[paused].at == NOW + 3600 + HANDOFF              # its seat is free again by then
    assert "backing off" in found[paused].basis


def test_an_urgent_case_starts_before_older_normal_ones_and_a_starved_one_before_it(tmp_path):
    desk = Desk(make_config(tmp_path, pueue={"groups": {"gpu_a": {"gpu": 0}}}, scheduling={"max_wait_minutes": 60}))
    desk.history([300.0])
    desk.running("a", NOW - 20, started=NOW)  # ends NOW + 300
    normal = desk.waiting("n", NOW - 600)
    urgent = desk.waiting("u", NOW - 10, priority="urgent")
    found = desk.estimate()
    assert found[urgent].at == NOW + 300 + HANDOFF
    assert found[normal].at == NOW + 300 + HANDOFF + 300 + HANDOFF
    assert "(urgent)" in found[urgent].basis
    starved = desk.waiting("s", NOW - 7200)  # waited past max_wait: counts as urgent, and is older
    found = desk.estimate()
    assert found[starved].at < found[urgent].at < found[normal].at
    desk.conn.close()


def test_a_drained_or_unreachable_host_takes_no_waiting_case(two_hosts):
    two_hosts.history([300.0], seats=[("gpu1", "gpu_a")])
    two_hosts.history([600.0], seats=[("gpu2", "gpu_a")])
    busy = two_hosts.running("a", NOW - 20, started=NOW, seats=[("gpu1", "gpu_a")])  # gpu1 busy until NOW + 300
    waiting = two_hosts.waiting("w", NOW - 5)
    assert two_hosts.estimate()[waiting].at == NOW + HANDOFF  # gpu2 is idle
    assert "median of 1 run on gpu2" in two_hosts.estimate()[waiting].basis
    drain(two_hosts.conn, "gpu2", now=NOW, by="test")
    found = two_hosts.estimate()
    assert found[waiting].at == NOW + 300 + HANDOFF and "1 GPU taking cases" in found[waiting].basis
    assert found[busy].kind == "finish"  # a drain stops claims, not the running case
    note_remote(two_hosts.conn, "gpu1", "poller", ok=False, now=NOW, error="Unreachable")
    found = two_hosts.estimate()
    assert waiting not in found and busy in found  # nothing takes claims: no start to promise


def test_depth_two_a_case_queued_on_the_hpc_starts_when_the_running_one_ends(tmp_path):
    desk = Desk(make_config(tmp_path, pueue={"groups": {"gpu_a": {"gpu": 0, "depth": 2}}}))
    desk.history([300.0])
    running = desk.running("a", NOW - 80, started=NOW - 60, progress=20.0, reported=NOW)  # ends NOW + 240
    queued = desk.running("b", NOW - 30)  # in pueue's queue behind "a"
    waiting = desk.waiting("c", NOW - 5)
    found = desk.estimate()
    assert found[running].at == NOW + 240
    assert (found[queued].kind, found[queued].at) == ("start", NOW + 240)
    assert "queued on hpc/gpu_a" in found[queued].basis
    # both seats are held: "c" is claimed when "a" ends, uploads while "b" runs, starts after "b"
    assert found[waiting].at == NOW + 240 + 300


def test_a_case_being_submitted_starts_one_upload_after_its_claim(one_gpu):
    one_gpu.history([300.0])
    one_gpu.waiting("a", NOW - 10)
    claim = claim_next_case(one_gpu.conn, worker="submitter:1", now=NOW - 4, lease_seconds=120)
    found = one_gpu.estimate()[claim.case.case_id]
    assert (found.kind, found.at) == ("start", NOW - 4 + HANDOFF)
    assert "being submitted to hpc/gpu_a" in found.basis


def test_with_no_history_at_all_the_default_is_used(one_gpu):
    waiting = one_gpu.waiting("w", NOW - 10)
    found = one_gpu.estimate()[waiting]
    assert found.at == NOW + eta.DEFAULT_HANDOFF_SECONDS and "default" in found.basis


def test_before_any_run_completed_the_run_in_flight_gives_the_pace(one_gpu):
    one_gpu.running("a", NOW - 60, started=NOW - 40, progress=50.0, reported=NOW)
    waiting = one_gpu.waiting("w2", NOW - 5)
    found = one_gpu.estimate()[waiting]
    assert "projected from 1 running case" in found.basis
    assert found.at == NOW + 40 + HANDOFF  # the upload of the case in flight is measured too


def test_finished_cases_get_no_eta(one_gpu):
    one_gpu.history([300.0, 200.0])
    assert one_gpu.estimate() == {}


def test_the_queries_read_unfinished_cases_and_recent_runs_by_index(one_gpu):
    def plan(sql: str, params=()) -> str:
        return " ".join(r[3] for r in one_gpu.conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))

    recent = plan(eta.RECENT_SQL, (10,))
    assert "USING INDEX cases_by_status" in recent and "TEMP B-TREE" not in recent
    assert "USING INDEX cases_by_status" in plan(eta.HELD_SQL)
    waiting = f"SELECT * FROM cases WHERE status = 'submitted' ORDER BY {URGENT_FIRST}"
    assert "USING INDEX cases_by_status" in plan(waiting, {"aged": NOW})


# -- mqic show and mqic-top ----------------------------------------------------------------------------

@pytest.fixture
def live(tmp_path):
    """Real time: one run of 300 s done, "a" half done after 150 s (ends in 150 s), "b" waiting behind it."""
    desk = Desk(make_config(tmp_path, pueue={"groups": {"gpu_a": {"gpu": 0}}}), now=time.time())
    desk.history([300.0])
    desk.ids = {"a": desk.running("a", desk.now - 170, started=desk.now - 150, progress=50.0, reported=desk.now),
                "b": desk.waiting("b", desk.now - 30)}
    yield desk
    desk.conn.close()


@pytest.mark.system
def test_show_prints_the_eta_with_its_basis_and_times_in_the_configured_zone(live, capsys):
    code, out, err = cli(capsys, live.config, "show", str(live.ids["a"]))
    assert code == 0, err
    assert re.search(r"^\s+eta: ends \d{4}-\d\d-\d\d \d\d:\d\d:\d\d KST \(in 2m[23]\ds\); 50% done 2m30s after its"
                     r" start \(progress rate, weighted 50% against the median of 1 run on hpc\)$",
                     out, re.MULTILINE), out
    assert re.search(r"^\s+running_since: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d KST$", out, re.MULTILINE), out  # not an epoch
    code, out, _ = cli(capsys, live.config, "show", str(live.ids["b"]))
    assert re.search(r"eta: starts about \S+ \S+ KST \(in 2m[34]\ds\); 1st in the queue \(normal\)", out), out
    code, out, _ = cli(capsys, live.config, "show", str(live.ids["b"]), "--json")
    shown = json.loads(out)["eta"]
    assert shown["kind"] == "start" and shown["at"] == pytest.approx(live.now + 150 + HANDOFF, abs=1)
    code, out, _ = cli(capsys, live.config, "show", "1")  # the completed run
    assert code == 0 and "eta:" not in out


@pytest.mark.system
def test_top_shows_an_eta_column_for_running_and_waiting_cases(live):
    result = top_once(live.config, 200)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines()
             if re.match(r"\s*\d+\s+(a|b|old)", line)}
    assert re.search(r"ends \d\d:\d\d:\d\d \(in 2m[23]\ds\)", lines["a"]), result.stdout
    assert re.search(r"starts ~\d\d:\d\d:\d\d \(in 2m[34]\ds\)", lines["b"]), result.stdout
    assert lines["old0_None"].rstrip().endswith("-")  # a completed case has none
