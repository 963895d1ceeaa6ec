"""GPU telemetry, fast tier: readings stored, the rules (idle, foreign, lost) tick by tick on a real SQLite
file with an injected clock; then the probe and the loop against the real sshd and the nvidia-smi stand-in."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from sandbox import nvidia_smi
from shared import gpus
from shared.claims import claim_next_case
from shared.config import GpusConfig
from shared.db import SCHEMA_VERSION, connect, schema_version
from shared.gpus_parse import GpuApp, GpuQuery, GpuReading, Probe, parse_compute_apps, parse_query_gpu
from shared.seats import SeatSpec, slot_of_case, sync_slots
from shared.states import CaseStatus, SlotStatus
from shared.store import get_case, register_case, transition

NOW = 1_800_000_000.0
UUID0, UUID1 = "GPU-aaaa-0", "GPU-bbbb-1"
CONFIG = GpusConfig(idle_percent=5, idle_minutes=10, foreign_memory_mb=100)


def probe(t: float, util0: float | None = 95, util1: float | None = 0, apps=(), lost=(), failure=None,
          only=None) -> Probe:
    readings = (GpuReading(0, UUID0, util0, 3000, 16384, 70), GpuReading(1, UUID1, util1, 1, 16384, 31))
    if only is not None:
        readings = tuple(r for r in readings if r.index in only)
    query = GpuQuery(failure=failure) if failure else GpuQuery(gpus=readings, lost=tuple(lost))
    return Probe(host_time=t, query=query, apps=tuple(apps))


def seats(conn):
    sync_slots(conn, [SeatSpec("hpc", "gpu_a", 0, "0"), SeatSpec("hpc", "gpu_b", 0, "1")], now=NOW, worker="t")


def queued_case(conn, name: str) -> None:
    """A registered case whose folder is in spool/queued, as the scanner leaves it."""
    case = register_case(conn, case_name=name, source_path=f"/drop/{name}", now=NOW, worker="t")
    conn.execute("UPDATE cases SET spool_stage = 'queued' WHERE case_id = ?", (case.case_id,))


def running_case(conn, name="c", started_at=NOW):
    queued_case(conn, name)
    claim = claim_next_case(conn, worker="w", now=NOW, lease_seconds=60)
    assert transition(conn, claim.case.case_id, CaseStatus.SUBMITTING, CaseStatus.RUNNING, now=NOW, worker="w",
                      fields={"started_at": started_at, "running_since": NOW})
    return get_case(conn, claim.case.case_id), claim.slot


def claimable_groups(conn) -> list[str]:
    taken = []
    for i in range(3):
        queued_case(conn, f"new{i}")
    while (claim := claim_next_case(conn, worker="w", now=NOW + 1, lease_seconds=60)) is not None:
        taken.append(claim.group)
    return sorted(taken)


def test_the_migration_is_the_newest(conn):
    assert schema_version(conn) == SCHEMA_VERSION
    assert conn.execute("SELECT COUNT(*) FROM gpus").fetchone()[0] == 0


def test_a_reading_is_stored_newest_and_in_history_and_our_process_is_matched(conn):
    seats(conn)
    case, _slot = running_case(conn)
    apps = [GpuApp(UUID0, 111, 2048, case.case_id), GpuApp(UUID0, 222, 50, 999)]  # 999: no such case of ours
    views = gpus.record(conn, "hpc", probe(NOW, apps=apps), CONFIG, now=NOW)
    gpu0 = views[0]
    assert (gpu0.utilization, gpu0.memory_used_mb, gpu0.temperature, gpu0.answering) == (95, 3000, 70, True)
    assert gpu0.case_ids == [case.case_id] and gpu0.foreign_processes == 0  # 50 MiB stranger: under the limit
    gpus.record(conn, "hpc", probe(NOW + 10), CONFIG, now=NOW + 10)
    assert [r["utilization"] for r in gpus.history(conn, "hpc", 0, 0)] == [95, 95]
    assert gpus.prune_history(conn, NOW + 5) == 2 and len(gpus.history(conn, "hpc", 0, 0)) == 1


def test_idle_gpu_flags_the_running_case_after_idle_minutes_on_the_hpc_clock_and_never_fails_it(conn):
    seats(conn)
    case, _ = running_case(conn, started_at=NOW)
    for minute in range(0, 10):
        views = gpus.record(conn, "hpc", probe(NOW + 60 * minute, util0=1), CONFIG, now=NOW + 60 * minute)
        assert gpus.flag_idle_cases(conn, "hpc", views, CONFIG, now=NOW, worker="t") == []
    views = gpus.record(conn, "hpc", probe(NOW + 600, util0=2), CONFIG, now=NOW + 600)
    flagged = gpus.flag_idle_cases(conn, "hpc", views, CONFIG, now=NOW + 600, worker="t")
    assert [case_id for case_id, _ in flagged] == [case.case_id]
    after = get_case(conn, case.case_id)
    assert after.status is CaseStatus.RUNNING and after.needs_review
    assert after.review_reason.startswith("GPU idle while running: GPU 0 on hpc")


def test_a_busy_reading_restarts_the_idle_count_and_idle_before_the_start_does_not_count(conn):
    seats(conn)
    case, _ = running_case(conn, started_at=NOW + 300)  # the task started 5 min into the idle streak
    for t in (0, 300, 540):
        views = gpus.record(conn, "hpc", probe(NOW + t, util0=0), CONFIG, now=NOW + t)
    views = gpus.record(conn, "hpc", probe(NOW + 600, util0=0), CONFIG, now=NOW + 600)
    assert gpus.flag_idle_cases(conn, "hpc", views, CONFIG, now=NOW, worker="t") == []  # 5 min since the start
    gpus.record(conn, "hpc", probe(NOW + 660, util0=80), CONFIG, now=NOW + 660)
    views = gpus.record(conn, "hpc", probe(NOW + 1200, util0=0), CONFIG, now=NOW + 1200)
    assert gpus.flag_idle_cases(conn, "hpc", views, CONFIG, now=NOW, worker="t") == []  # streak began at 1200
    views = gpus.record(conn, "hpc", probe(NOW + 1800, util0=0), CONFIG, now=NOW + 1800)
    assert len(gpus.flag_idle_cases(conn, "hpc", views, CONFIG, now=NOW, worker="t")) == 1


def test_unknown_utilization_is_never_idle(conn):
    seats(conn)
    running_case(conn)
    for t in (0, 700):
        views = gpus.record(conn, "hpc", probe(NOW + t, util0=None), CONFIG, now=NOW + t)
    assert gpus.flag_idle_cases(conn, "hpc", views, CONFIG, now=NOW, worker="t") == []


def test_foreign_process_keeps_new_cases_off_its_gpu_only_with_avoid_foreign(conn):
    seats(conn)
    foreign = [GpuApp(UUID1, 4242, 900, None)]
    gpus.record(conn, "hpc", probe(NOW, apps=foreign), CONFIG, now=NOW)
    assert gpus.gpu_views(conn)[1].foreign_processes == 1
    assert claimable_groups(conn) == ["gpu_a", "gpu_b"]  # avoid_foreign off: shown, not avoided


def test_with_avoid_foreign_the_gpu_gets_no_new_case_until_free_and_a_running_case_keeps_its_seat(conn):
    seats(conn)
    avoid = GpusConfig(avoid_foreign=True, foreign_memory_mb=100)
    case, slot = running_case(conn)  # on gpu_a (GPU 0)
    stranger = [GpuApp(UUID0, 4242, 900, None), GpuApp(UUID1, 4243, 900, None)]
    gpus.record(conn, "hpc", probe(NOW, apps=stranger), avoid, now=NOW)
    assert claimable_groups(conn) == []  # GPU 1 held back; GPU 0's seat is still the running case's
    assert get_case(conn, case.case_id).status is CaseStatus.RUNNING and slot.slot == "gpu_a"
    assert slot_of_case(conn, case.case_id).status is SlotStatus.ASSIGNED
    gpus.record(conn, "hpc", probe(NOW + 10), avoid, now=NOW + 10)  # the stranger left
    assert claimable_groups(conn) == ["gpu_b"]


def test_a_lost_gpu_is_shown_and_its_seats_get_no_new_case_until_it_answers_again(conn):
    seats(conn)
    gpus.record(conn, "hpc", probe(NOW), CONFIG, now=NOW)
    lost = "Unable to determine the device handle for GPU 0000:18:00.0: GPU is lost.  Reboot the system"
    views = gpus.record(conn, "hpc", probe(NOW + 10, lost=[lost], only={0}), CONFIG, now=NOW + 10)
    assert [(v.index, v.answering, v.blocks_claims) for v in views] == [(0, True, False), (1, False, True)]
    assert "GPU is lost" in views[1].error and views[1].uuid == UUID1
    assert claimable_groups(conn) == ["gpu_a"]
    gpus.record(conn, "hpc", probe(NOW + 20), CONFIG, now=NOW + 20)
    assert claimable_groups(conn) == ["gpu_b"]


def test_a_lost_gpu_never_seen_before_takes_its_place_in_the_numbering(conn):
    text = (Path(__file__).parent / "captures" / "nvidia-smi" / "query-gpu.one-lost.txt").read_text()
    views = gpus.record(conn, "hpc", Probe(NOW, parse_query_gpu(text)), CONFIG, now=NOW)
    assert [(v.index, v.answering) for v in views] == [(0, True), (1, False), (2, True)]


def test_the_drivers_failure_marks_every_known_gpu_not_answering(conn):
    seats(conn)
    gpus.record(conn, "hpc", probe(NOW), CONFIG, now=NOW)
    views = gpus.record(conn, "hpc", probe(NOW + 10, failure="NVIDIA-SMI has failed because ..."), CONFIG,
                        now=NOW + 10)
    assert [v.answering for v in views] == [False, False] and claimable_groups(conn) == []


def test_apply_config_recomputes_blocks_and_telemetry_off_blocks_nothing(conn):
    seats(conn)
    gpus.record(conn, "hpc", probe(NOW, apps=[GpuApp(UUID1, 1, 900, None)]), GpusConfig(avoid_foreign=True),
                now=NOW)
    assert gpus.gpu_views(conn)[1].blocks_claims
    gpus.apply_config(conn, GpusConfig(avoid_foreign=False))
    assert not gpus.gpu_views(conn)[1].blocks_claims
    gpus.record(conn, "hpc", probe(NOW, only={0}, lost=["Unable to determine ...: GPU is lost"]), CONFIG, now=NOW)
    gpus.apply_config(conn, GpusConfig(enabled=False))
    assert not any(v.blocks_claims for v in gpus.gpu_views(conn))


def test_seat_pinned_by_uuid_or_to_several_gpus_is_held_back_too(conn):
    sync_slots(conn, [SeatSpec("hpc", "by_uuid", 0, UUID1), SeatSpec("hpc", "pair", 0, "0, 1"),
                      SeatSpec("hpc", "unpinned", 0, None)], now=NOW, worker="t")
    gpus.record(conn, "hpc", probe(NOW), CONFIG, now=NOW)  # GPU 1's UUID is known from then on
    gpus.record(conn, "hpc", probe(NOW, only={0}, lost=["Unable to determine ...: GPU is lost"]), CONFIG, now=NOW)
    assert claimable_groups(conn) == ["unpinned"]


def seed_gpus(config) -> None:
    """Two GPUs on host ``hpc`` with a reading each: GPU 0 busy with case 1, GPU 1 with a stranger's process."""
    conn = connect(config.database_path)
    try:
        gpus.record(conn, "hpc", probe(time.time(), apps=[GpuApp(UUID0, 11, 2048, 1), GpuApp(UUID1, 12, 900, None)]),
                    config.gpus, now=time.time())
    finally:
        conn.close()


def test_the_exporter_shows_each_gpus_reading_and_leaves_out_what_it_did_not_report(tmp_path):
    from tests.conftest import make_config
    from workers.exporter import DbCollector
    config = make_config(tmp_path)
    seed_gpus(config)
    conn = connect(config.database_path)
    lost = "Unable to determine the device handle for GPU 0000:18:00.0: GPU is lost."
    gpus.record(conn, "hpc", probe(time.time(), only={0}, lost=[lost]), config.gpus, now=time.time())
    conn.close()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in DbCollector(config).collect() for s in f.samples}
    gpu0, gpu1 = (("gpu", "0"), ("host", "hpc")), (("gpu", "1"), ("host", "hpc"))
    assert samples[("mqi_gpu_utilization_percent", gpu0)] == 95
    assert samples[("mqi_gpu_memory_used_bytes", gpu0)] == 3000 * 1024 * 1024
    assert samples[("mqi_gpu_temperature_celsius", gpu0)] == 70
    assert samples[("mqi_gpu_answering", gpu1)] == 0 and ("mqi_gpu_utilization_percent", gpu1) not in samples


# -- the nvidia-smi stand-in follows the real formats ---------------------------------------

def stand_in(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    wrapper = nvidia_smi.write_wrapper(tmp_path / "bin", tmp_path / "gpus")
    return subprocess.run([str(wrapper), *args], capture_output=True, text=True, timeout=30)


QUERY = "--query-gpu=index,uuid,utilization.gpu,memory.used,memory.total,temperature.gpu"
APPS = "--query-compute-apps=gpu_uuid,pid,used_memory"


@pytest.mark.system
@pytest.mark.parametrize("fmt", ["csv", "csv,noheader", "csv,noheader,nounits"])
def test_the_stand_in_prints_every_format_the_parser_reads(tmp_path, fmt):
    folder = tmp_path / "gpus"
    nvidia_smi.init_board(folder)
    nvidia_smi.ctl_main([str(folder), "foreign", "1", "900", "4242"])
    out = stand_in(tmp_path, QUERY, f"--format={fmt}")
    assert out.returncode == 0 and out.stdout.startswith("index, uuid, utilization.gpu [%]") == ("noheader" not in fmt)
    readings = parse_query_gpu(out.stdout).gpus
    assert [(r.index, r.utilization) for r in readings] == [(0, 0), (1, 40)]
    apps = parse_compute_apps(stand_in(tmp_path, APPS, f"--format={fmt}").stdout)
    assert [(a.gpu_uuid, a.pid, a.memory_mb) for a in apps] == [(readings[1].uuid, 4242, 900)]


@pytest.mark.system
def test_the_stand_in_loses_a_gpu_fails_and_finds_no_devices_like_the_real_tool(tmp_path):
    folder = tmp_path / "gpus"
    nvidia_smi.init_board(folder)
    nvidia_smi.ctl_main([str(folder), "lost", "1"])
    out = stand_in(tmp_path, QUERY, "--format=csv,noheader,nounits")
    assert out.returncode == 15 and "GPU is lost.  Reboot the system" in out.stdout
    assert len(parse_query_gpu(out.stdout).lost) == 1
    nvidia_smi.ctl_main([str(folder), "failure", "driver"])
    out = stand_in(tmp_path, QUERY, "--format=csv,noheader,nounits")
    assert out.returncode == 9 and parse_query_gpu(out.stdout).failure.startswith("NVIDIA-SMI has failed")
    nvidia_smi.ctl_main([str(folder), "failure", "no-devices"])
    assert parse_query_gpu(stand_in(tmp_path, QUERY, "--format=csv").stdout).failure == "No devices were found"


@pytest.mark.system
def test_the_fake_simulation_loads_its_gpu_while_it_runs(tmp_path):
    folder = tmp_path / "gpus"
    nvidia_smi.init_board(folder)
    case = tmp_path / "case"
    case.mkdir()
    (case / "mqi_fake.json").write_text('{"seconds": 30, "batches": 30, "mode": "ok"}')
    env = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "1", "MQI_FAKE_GPU_DIR": str(folder)}
    from sandbox.hpc import FAKE_MOQUI
    import sys
    sim = subprocess.Popen([sys.executable, str(FAKE_MOQUI / "moquisim.py")], cwd=case, env=env,
                           stdout=subprocess.DEVNULL)
    try:
        from tests.conftest import wait_until
        wait_until(lambda: nvidia_smi.gpu_states(folder)[1]["utilization"] > 90, timeout=10, message="GPU 1 busy")
        states = nvidia_smi.gpu_states(folder)
        assert states[0]["utilization"] == 0 and states[1]["processes"][0]["pid"] == sim.pid
    finally:
        sim.kill()
        sim.wait()
    assert nvidia_smi.gpu_states(folder)[1]["utilization"] == 0  # a dead process holds nothing


def test_gpus_keys_have_defaults_and_are_checked(tmp_path):
    from shared.errors import ConfigError
    from tests.conftest import make_config
    defaults = make_config(tmp_path).gpus
    assert defaults == GpusConfig(enabled=True, interval_seconds=10, command=("nvidia-smi",), idle_percent=5,
                                  idle_minutes=10, foreign_memory_mb=100, avoid_foreign=False)
    custom = make_config(tmp_path, gpus={"command": "/opt/nv/bin/nvidia-smi -i 0,1", "avoid_foreign": True})
    assert custom.gpus.command == ("/opt/nv/bin/nvidia-smi", "-i", "0,1") and custom.gpus.avoid_foreign
    for bad, key in (({"interval_seconds": 0}, "gpus.interval_seconds"), ({"avoid_foreign": "yes"}, "gpus.avoid_foreign"),
                     ({"idle_minutes": -1}, "gpus.idle_minutes"), ({"idel_percent": 5}, "gpus.idel_percent")):
        with pytest.raises(ConfigError, match=key):
            make_config(tmp_path, gpus=bad)


def test_two_pollers_share_one_probe_per_interval_and_a_clock_set_back_does_not_stop_probes(db_path):
    first, second = connect(db_path), connect(db_path)
    turns = [(gpus.take_probe_turn(first, "hpc", t, 10), gpus.take_probe_turn(second, "hpc", t + 0.1, 10))
             for t in (NOW, NOW + 5, NOW + 10.5)]
    assert turns == [(True, False), (False, False), (True, False)]
    assert gpus.take_probe_turn(first, "gpu2", NOW, 10)  # each host has its own turn
    assert gpus.take_probe_turn(second, "hpc", NOW - 3600, 10)  # the clock went back an hour
    first.close(), second.close()


def test_mqic_status_and_show_print_each_gpu_and_the_running_cases_gpu(tmp_path, capsys, monkeypatch):
    from tests.conftest import cli, make_config
    monkeypatch.setenv("COLUMNS", "200")
    config = make_config(tmp_path)
    conn = connect(config.database_path)
    seats(conn)
    case, _ = running_case(conn, "plan_7")
    apps = [GpuApp(UUID0, 11, 2048, case.case_id), GpuApp(UUID1, 12, 900, None)]
    gpus.record(conn, "hpc", probe(time.time(), apps=apps), config.gpus, now=time.time())
    conn.close()
    code, out, _ = cli(capsys, config, "status")
    assert code == 0 and "GPUs (nvidia-smi)" in out
    assert re.search(rf"hpc\s+0\s.*95%.*2\.9/16\.0 GiB\s+70C\s+case {case.case_id} plan_7", out), out
    assert re.search(r"hpc\s+1\s.*0%.*someone else's process \(1\)", out), out
    code, out, _ = cli(capsys, config, "show", str(case.case_id))
    assert code == 0 and "gpu: hpc GPU 0: utilization 95%, memory 2.9/16.0 GiB, 70C (read 0s ago)" in out
