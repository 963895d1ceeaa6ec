"""nvidia-smi: the one remote probe per host and the pure parsing of what it prints.

``probe_argv`` builds ONE ``sh -c`` that prints the host's clock (``date +%s``), runs
``--query-gpu`` and ``--query-compute-apps`` (each under the HPC's ``timeout``), and for
every process on a GPU reads ``MQIC_CASE_ID`` from ``/proc/<pid>/environ`` (our task's
environment, inherited by everything the case starts; another user's process cannot be
read, so it is never taken for ours). ``parse_probe`` turns that into a ``Probe``.

The layouts are the tool's own (see ``tests/captures/nvidia-smi/``): CSV with or
without a header and units, ``[N/A]`` or ``[Not Supported]`` for a value the board
does not report, ``Unable to determine the device handle for GPU <bus>: GPU is lost``
for a GPU fallen off the bus, ``No devices were found``, and the driver's failure
text. Anything else is ``BadOutput``: the caller changes nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from shared.errors import BadOutput

GPU_FIELDS = ("index", "uuid", "utilization.gpu", "memory.used", "memory.total", "temperature.gpu")
APP_FIELDS = ("gpu_uuid", "pid", "used_memory")
MISSING = {"[N/A]", "[Not Supported]", "N/A", "[Unknown Error]", "[Insufficient Permissions]", "[GPU is lost]"}
LOST_LINE = re.compile(r"^Unable to determine the device handle for GPU\s*(?P<bus>[0-9A-Fa-f:.]+)?:\s*(?P<why>.+)$")
TOOL_FAILURES = (
    re.compile(r"^NVIDIA-SMI has failed because"),
    re.compile(r"^No devices were found"),
    re.compile(r"^Failed to initialize NVML"),
    re.compile(r"^Unable to determine the device handle"),
)
TIMED_OUT = 124  # coreutils timeout: the tool hung past the limit
NOT_FOUND = 127  # the shell found no such command
MARK = "@@mqic-gpus"


@dataclass(frozen=True)
class GpuReading:
    """One GPU as nvidia-smi reported it; None where it printed ``[N/A]``/``[Not Supported]``."""
    index: int
    uuid: str
    utilization: float | None
    memory_used_mb: float | None
    memory_total_mb: float | None
    temperature: float | None


@dataclass(frozen=True)
class GpuApp:
    """One compute process on a GPU; ``case_id`` when its environment names one of our cases."""
    gpu_uuid: str
    pid: int
    memory_mb: float | None
    case_id: int | None = None


@dataclass(frozen=True)
class GpuQuery:
    """What ``--query-gpu`` said: the GPUs that answered, the error lines of those that did not,
    and the tool's own failure (driver gone, no devices) when it could not list any."""
    gpus: tuple[GpuReading, ...] = ()
    lost: tuple[str, ...] = ()
    failure: str | None = None


@dataclass(frozen=True)
class Probe:
    """One host's answer: its clock, its GPUs and the processes on them."""
    host_time: float
    query: GpuQuery
    apps: tuple[GpuApp, ...] = field(default_factory=tuple)


class ToolMissing(BadOutput):
    """The configured nvidia-smi command does not exist on the host (exit 127)."""


class ToolHung(BadOutput):
    """nvidia-smi did not answer within the time limit (killed by ``timeout``)."""


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _number(text: str, what: str) -> float | None:
    value = text.strip()
    if value in MISSING:
        return None
    value = re.sub(r"\s*(%|MiB|C)$", "", value)
    try:
        return float(value)
    except ValueError:
        raise BadOutput(f"nvidia-smi: {what} is not a number: {text!r}") from None


def _is_header(cells: list[str], first: str) -> bool:
    return cells[0] == first


def _reading(cells: list[str]) -> GpuReading:
    if len(cells) != len(GPU_FIELDS):
        raise BadOutput(f"nvidia-smi --query-gpu: expected {len(GPU_FIELDS)} fields, got {cells!r}")
    if not cells[0].isdigit() or not cells[1]:
        raise BadOutput(f"nvidia-smi --query-gpu: bad index or uuid in {cells!r}")
    return GpuReading(index=int(cells[0]), uuid=cells[1],
                      utilization=_number(cells[2], "utilization.gpu"),
                      memory_used_mb=_number(cells[3], "memory.used"),
                      memory_total_mb=_number(cells[4], "memory.total"),
                      temperature=_number(cells[5], "temperature.gpu"))


def parse_query_gpu(text: str) -> GpuQuery:
    """Parse ``--query-gpu=index,uuid,utilization.gpu,memory.used,memory.total,temperature.gpu``
    (``csv`` with or without ``noheader``/``nounits``). Raises BadOutput on anything else."""
    lines = _lines(text)
    if lines and any(pattern.match(lines[0]) for pattern in TOOL_FAILURES) and \
            not any(LOST_LINE.match(line) for line in lines):
        return GpuQuery(failure=lines[0][:300])
    gpus, lost = [], []
    for line in lines:
        match = LOST_LINE.match(line)
        if match:
            lost.append(line[:300])
            continue
        cells = [cell.strip() for cell in line.split(",")]
        if _is_header(cells, "index"):
            continue
        gpus.append(_reading(cells))
    if not gpus and not lost:
        raise BadOutput(f"nvidia-smi --query-gpu printed nothing usable: {text[:200]!r}")
    return GpuQuery(gpus=tuple(gpus), lost=tuple(lost))


def parse_compute_apps(text: str) -> tuple[GpuApp, ...]:
    """Parse ``--query-compute-apps=gpu_uuid,pid,used_memory`` (any ``csv`` variant; empty: none)."""
    apps = []
    for line in _lines(text):
        if line.startswith("No running processes found") or any(p.match(line) for p in TOOL_FAILURES):
            continue  # no process; or a GPU that does not answer (the GPU query reports it)
        cells = [cell.strip() for cell in line.split(",")]
        if _is_header(cells, "gpu_uuid"):
            continue
        if len(cells) != len(APP_FIELDS) or not cells[1].isdigit() or not cells[0]:
            raise BadOutput(f"nvidia-smi --query-compute-apps: unexpected line {line[:200]!r}")
        apps.append(GpuApp(gpu_uuid=cells[0], pid=int(cells[1]), memory_mb=_number(cells[2], "used_memory")))
    return tuple(apps)


# The probe: positional arguments are the per-call time limit, then the command's words
# (never interpolated into the script).
PROBE_SCRIPT = f"""
t=$1; shift
date +%s
echo '{MARK} gpus'
timeout "$t" "$@" --query-gpu={",".join(GPU_FIELDS)} --format=csv,noheader,nounits 2>&1
echo "{MARK} rc $?"
apps=$(timeout "$t" "$@" --query-compute-apps={",".join(APP_FIELDS)} --format=csv,noheader,nounits 2>&1)
rc=$?
echo '{MARK} apps'
printf '%s\\n' "$apps"
echo "{MARK} rc $rc"
echo '{MARK} owners'
printf '%s\\n' "$apps" | while IFS=, read -r _uuid pid _mem; do
  pid=$(echo $pid)
  case "$pid" in ''|*[!0-9]*) continue;; esac
  id=$(tr '\\000' '\\n' < "/proc/$pid/environ" 2>/dev/null | sed -n 's/^MQIC_CASE_ID=//p' | head -n 1)
  echo "$pid ${{id:--}}"
done
echo '{MARK} end'
"""


def probe_argv(command: tuple[str, ...], per_call_timeout: float) -> list[str]:
    """The argv of the one remote call (``sh -c`` with the command's words as arguments)."""
    return ["sh", "-c", PROBE_SCRIPT, "sh", str(max(1, int(per_call_timeout))), *command]


def _sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {"clock": []}
    current = "clock"
    for line in text.splitlines():
        if line.startswith(MARK + " "):
            word = line[len(MARK) + 1:].split()
            if word and word[0] == "rc":
                sections[f"{current}.rc"] = word[1:]
            else:
                current = word[0] if word else "?"
                sections[current] = []
            continue
        sections.setdefault(current, []).append(line)
    if "end" not in sections:
        raise BadOutput(f"gpu probe: output cut short: {text[-200:]!r}")
    return sections


def _exit_code(sections: dict[str, list[str]], name: str) -> int:
    words = sections.get(f"{name}.rc") or ["?"]
    if not words[0].isdigit():
        raise BadOutput(f"gpu probe: no exit code for {name}")
    return int(words[0])


def _check_tool(code: int, text: str, what: str) -> None:
    if code == NOT_FOUND:
        raise ToolMissing(f"{what}: command not found on the host: {text.strip()[:200]}")
    if code == TIMED_OUT:
        raise ToolHung(f"{what}: nvidia-smi did not answer in time")


def _owners(lines: list[str]) -> dict[int, int]:
    owners = {}
    for line in lines:
        words = line.split()
        if len(words) == 2 and words[0].isdigit() and words[1].isdigit():
            owners[int(words[0])] = int(words[1])
    return owners


def parse_probe(text: str) -> Probe:
    """The probe's output as a ``Probe``; BadOutput (ToolMissing, ToolHung) when it says nothing usable."""
    sections = _sections(text)
    clock = _lines("\n".join(sections["clock"]))
    if not clock or not clock[-1].isdigit():
        raise BadOutput(f"gpu probe: no host clock in {text[:100]!r}")
    gpu_text = "\n".join(sections.get("gpus", []))
    _check_tool(_exit_code(sections, "gpus"), gpu_text, "--query-gpu")
    query = parse_query_gpu(gpu_text)
    apps: tuple[GpuApp, ...] = ()
    if query.failure is None:
        apps_text = "\n".join(sections.get("apps", []))
        _check_tool(_exit_code(sections, "apps"), apps_text, "--query-compute-apps")
        owners = _owners(sections.get("owners", []))
        apps = tuple(GpuApp(a.gpu_uuid, a.pid, a.memory_mb, owners.get(a.pid)) for a in parse_compute_apps(apps_text))
    return Probe(host_time=float(clock[-1]), query=query, apps=apps)

