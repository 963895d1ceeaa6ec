"""The nvidia-smi parser on every captured output shape (tests/captures/nvidia-smi/), and the probe script run by sh."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shared.errors import BadOutput
from shared.gpus_parse import (GpuApp, GpuReading, ToolHung, ToolMissing, parse_compute_apps, parse_probe,
                               parse_query_gpu, probe_argv)

CAPTURES = Path(__file__).parent / "captures" / "nvidia-smi"


def capture(name: str) -> str:
    return (CAPTURES / name).read_text()


def test_every_capture_is_covered_by_a_test_below():
    covered = {"query-gpu.nounits.csv", "query-gpu.header-units.csv", "query-gpu.noheader-units.csv",
               "query-gpu.not-supported.csv", "query-gpu.na.csv", "query-gpu.one-lost.txt",
               "query-gpu.unknown-error.txt", "no-devices.txt", "driver-failed.txt", "compute-apps.nounits.csv",
               "compute-apps.header-units.csv", "compute-apps.header-only.csv", "compute-apps.empty.csv",
               "compute-apps.na.csv", "garbage.html.txt", "garbage.bad-number.csv", "README.md"}
    assert {p.name for p in CAPTURES.iterdir()} == covered


def test_nounits():
    query = parse_query_gpu(capture("query-gpu.nounits.csv"))
    assert query.gpus == (GpuReading(0, "GPU-67a571b1-79ee-1016-8ea3-c1fff3f1c1d2", 98, 10567, 11264, 76),
                          GpuReading(1, "GPU-3e34e62f-d88e-f448-415e-be2cbf2c6178", 0, 1, 11264, 31))
    assert query.lost == () and query.failure is None


@pytest.mark.parametrize("name", ["query-gpu.header-units.csv", "query-gpu.noheader-units.csv"])
def test_units_with_and_without_header(name):
    first = parse_query_gpu(capture(name)).gpus[0]
    assert first == GpuReading(0, "GPU-a44622e3-2296-6285-0a86-84d0f6c67900", 100, 106091, 143771, 64)


def test_not_supported_and_na_are_unknown_values():
    assert parse_query_gpu(capture("query-gpu.not-supported.csv")).gpus[0].utilization is None
    na = parse_query_gpu(capture("query-gpu.na.csv")).gpus
    assert na[0].temperature is None and na[0].utilization == 0
    assert (na[1].utilization, na[1].memory_used_mb, na[1].memory_total_mb, na[1].temperature) == (None, None, None, 45)


def test_a_lost_gpu_among_answering_ones():
    query = parse_query_gpu(capture("query-gpu.one-lost.txt"))
    assert [g.index for g in query.gpus] == [0, 2]
    assert len(query.lost) == 1 and "GPU is lost" in query.lost[0] and query.failure is None


def test_the_only_gpu_in_unknown_error():
    query = parse_query_gpu(capture("query-gpu.unknown-error.txt"))
    assert query.gpus == () and "Unknown Error" in query.lost[0]


@pytest.mark.parametrize("name, words", [("no-devices.txt", "No devices were found"),
                                         ("driver-failed.txt", "couldn't communicate with the NVIDIA driver")])
def test_tool_failures(name, words):
    query = parse_query_gpu(capture(name))
    assert query.gpus == () and words in query.failure


@pytest.mark.parametrize("name", ["garbage.html.txt", "garbage.bad-number.csv"])
def test_garbage_is_bad_output(name):
    with pytest.raises(BadOutput):
        parse_query_gpu(capture(name))
    with pytest.raises(BadOutput):
        parse_compute_apps(capture(name))


def test_compute_apps_shapes():
    apps = parse_compute_apps(capture("compute-apps.nounits.csv"))
    assert apps[0] == GpuApp("GPU-67a571b1-79ee-1016-8ea3-c1fff3f1c1d2", 3858903, 6265)
    assert len(apps) == 3
    assert parse_compute_apps(capture("compute-apps.header-units.csv")) == (
        GpuApp("GPU-a44622e3-2296-6285-0a86-84d0f6c67900", 1328667, 130004),)
    assert parse_compute_apps(capture("compute-apps.header-only.csv")) == ()
    assert parse_compute_apps(capture("compute-apps.empty.csv")) == ()
    assert parse_compute_apps(capture("compute-apps.na.csv"))[0].memory_mb is None


def fake_tool(tmp_path: Path, gpus: str, apps: str, code: int = 0, sleep: float = 0) -> Path:
    (tmp_path / "gpus.txt").write_text(gpus)
    (tmp_path / "apps.txt").write_text(apps)
    tool = tmp_path / "fake-smi"
    tool.write_text(f"#!/bin/sh\nsleep {sleep}\ncase \"$1\" in --query-gpu=*) cat {tmp_path}/gpus.txt;; "
                    f"*) cat {tmp_path}/apps.txt;; esac\nexit {code}\n")
    tool.chmod(0o755)
    return tool


def run_probe(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout


@pytest.mark.system
def test_probe_script_reads_clock_gpus_apps_and_our_case_from_the_environment(tmp_path):
    ours = subprocess.Popen(["sleep", "30"], env={"MQIC_CASE_ID": "42", "PATH": "/usr/bin:/bin"})
    theirs = subprocess.Popen(["sleep", "30"], env={"PATH": "/usr/bin:/bin"})
    try:
        uuid = "GPU-67a571b1-79ee-1016-8ea3-c1fff3f1c1d2"
        tool = fake_tool(tmp_path, capture("query-gpu.nounits.csv"),
                         f"{uuid}, {ours.pid}, 900\n{uuid}, {theirs.pid}, 2000\n")
        probe = parse_probe(run_probe(probe_argv((str(tool),), 5)))
    finally:
        ours.kill(), theirs.kill()
    assert probe.host_time > 1.7e9 and len(probe.query.gpus) == 2
    assert {(a.pid, a.case_id) for a in probe.apps} == {(ours.pid, 42), (theirs.pid, None)}


@pytest.mark.system
def test_probe_with_a_lost_gpu_exit_15(tmp_path):
    tool = fake_tool(tmp_path, capture("query-gpu.one-lost.txt"), "", code=15)
    probe = parse_probe(run_probe(probe_argv((str(tool),), 5)))
    assert len(probe.query.lost) == 1 and probe.apps == ()


@pytest.mark.system
def test_probe_command_missing_hung_or_cut_short(tmp_path):
    with pytest.raises(ToolMissing):
        parse_probe(run_probe(probe_argv((str(tmp_path / "no-such-smi"),), 5)))
    slow = fake_tool(tmp_path, capture("query-gpu.nounits.csv"), "", sleep=3)
    with pytest.raises(ToolHung):
        parse_probe(run_probe(probe_argv((str(slow),), 1)))
    with pytest.raises(BadOutput):
        parse_probe("1700000000\n@@mqic-gpus gpus\n0, GPU-x, 1, 2, 3, 4\n")
