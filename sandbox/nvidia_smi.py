#!/usr/bin/env python3
"""A stand-in for ``nvidia-smi`` on the sandbox HPC: fake GPUs that take load from the fake simulation.

It answers the queries MQI Communicator sends, in the real tool's layouts
(``tests/captures/nvidia-smi/``): ``--query-gpu=...`` and ``--query-compute-apps=...``
with ``--format=csv[,noheader][,nounits]``, a lost GPU's error line (exit 15), the
driver's failure text (exit 9) and ``No devices were found`` (exit 6).

State lives in one folder (``$MQI_FAKE_GPU_DIR``, the host's ``gpus/`` folder):

- ``board.json``: how many GPUs, their memory and UUIDs (``init``);
- ``load/<pid>.json``: written by the fake simulation while it runs (``gpu`` from its
  ``CUDA_VISIBLE_DEVICES``, its memory, ``busy``: false while it hangs); entries of dead
  processes are ignored;
- ``control.json``: ``idle`` (every GPU at 0 %), ``lost`` (indexes), ``foreign`` (processes
  of someone else: gpu, pid, memory_mb), ``failure`` (``driver`` or ``no-devices``),
  ``hang_seconds`` (sleep before answering).

Control: ``python -m sandbox.nvidia_smi --ctl DIR init|idle on|off|lost IDX|found IDX|
foreign IDX MEMORY_MB [PID]|clear-foreign|failure driver|no-devices|none|hang SECONDS|reset``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

DIR_ENV = "MQI_FAKE_GPU_DIR"
PORTS_FILE = "ports.json"
GPU_FIELDS = {"index", "uuid", "name", "pci.bus_id", "utilization.gpu", "memory.used", "memory.total",
              "temperature.gpu"}
APP_FIELDS = {"gpu_uuid", "pid", "used_memory", "process_name"}
UNITS = {"utilization.gpu": "%", "memory.used": "MiB", "memory.total": "MiB", "used_memory": "MiB"}
HEADERS = {"used_memory": "used_gpu_memory"}
DRIVER_FAILED = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                 "Make sure that the latest NVIDIA driver is installed and running.\n")
EXIT_LOST, EXIT_DRIVER, EXIT_NO_DEVICES, EXIT_ARGS = 15, 9, 6, 2
IDLE_UTILIZATION, BUSY_UTILIZATION, FOREIGN_UTILIZATION = 0, 96, 40


def _read(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return default


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


def init_board(folder: Path, count: int = 2, memory_mb: int = 16384) -> None:
    """Create the board (idempotent: an existing one keeps its UUIDs and control)."""
    folder = Path(folder)
    if (folder / "board.json").exists():
        return
    seed = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()
    uuids = [f"GPU-{seed[:8]}-{seed[8:12]}-{i:04x}-{seed[12:16]}-{seed[16:28]}" for i in range(count)]
    (folder / "load").mkdir(parents=True, exist_ok=True)
    _write(folder / "board.json", {"count": count, "memory_total_mb": memory_mb, "uuids": uuids})
    _write(folder / "control.json", {})


def control(folder: Path, **changes) -> dict:
    """Merge ``changes`` into ``control.json``; return the new control."""
    current = _read(Path(folder) / "control.json", {})
    current.update(changes)
    _write(Path(folder) / "control.json", current)
    return current


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def loads(folder: Path) -> list[dict]:
    """The fake simulations running now (entries of dead processes are ignored)."""
    found = []
    for path in sorted((Path(folder) / "load").glob("*.json")):
        entry = _read(path, None)
        if isinstance(entry, dict) and _alive(int(entry.get("pid", 0))):
            found.append(entry)
    return found


def _processes(folder: Path, ctl: dict) -> list[dict]:
    ours = [{"gpu": str(e["gpu"]), "pid": int(e["pid"]), "memory_mb": int(e.get("memory_mb", 0)),
             "busy": bool(e.get("busy", True)), "name": "python3"} for e in loads(folder)]
    theirs = [{"gpu": str(f["gpu"]), "pid": int(f["pid"]), "memory_mb": int(f["memory_mb"]), "busy": True,
               "name": "/usr/bin/python3", "foreign": True} for f in ctl.get("foreign", [])]
    return ours + theirs


def gpu_states(folder: Path) -> list[dict]:
    """Every GPU as the board, the running simulations and the control make it now."""
    board = _read(Path(folder) / "board.json", {"count": 0, "memory_total_mb": 0, "uuids": []})
    ctl = _read(Path(folder) / "control.json", {})
    processes = _processes(folder, ctl)
    states = []
    for index in range(board["count"]):
        mine = [p for p in processes if p["gpu"] in (str(index), board["uuids"][index])]
        busy = 0 if ctl.get("idle") else min(100, sum(
            BUSY_UTILIZATION if not p.get("foreign") else FOREIGN_UTILIZATION for p in mine if p["busy"]))
        states.append({"index": index, "uuid": board["uuids"][index], "lost": index in ctl.get("lost", []),
                       "utilization": busy, "memory_used": 1 + sum(p["memory_mb"] for p in mine),
                       "memory_total": board["memory_total_mb"], "temperature": 30 + busy * 45 // 100,
                       "processes": mine, "bus": f"00000000:{index + 0x17:02X}:00.0"})
    return states


def _cell(field: str, value, units: bool) -> str:
    unit = UNITS.get(field)
    return f"{value} {unit}" if units and unit else str(value)


def _gpu_value(state: dict, field: str):
    return {"index": state["index"], "uuid": state["uuid"], "name": "NVIDIA Sandbox GPU",
            "pci.bus_id": state["bus"], "utilization.gpu": state["utilization"],
            "memory.used": state["memory_used"], "memory.total": state["memory_total"],
            "temperature.gpu": state["temperature"]}[field]


def _app_value(state: dict, process: dict, field: str):
    return {"gpu_uuid": state["uuid"], "pid": process["pid"], "used_memory": process["memory_mb"],
            "process_name": process["name"]}[field]


def _header(fields: list[str]) -> str:
    return ", ".join(f"{HEADERS.get(f, f)} [{UNITS[f]}]" if f in UNITS else HEADERS.get(f, f) for f in fields)


def lost_line(state: dict) -> str:
    bus = state["bus"][4:]  # the error names the bus id with a 4-digit domain
    return f"Unable to determine the device handle for GPU {bus}: GPU is lost.  Reboot the system to recover this GPU"


def render(folder: Path, query: str, fields: list[str], header: bool, units: bool) -> tuple[str, int]:
    """The text and exit code of one query, as the real tool prints them."""
    ctl = _read(Path(folder) / "control.json", {})
    if ctl.get("failure") == "driver":
        return DRIVER_FAILED, EXIT_DRIVER
    states = gpu_states(folder)
    if ctl.get("failure") == "no-devices" or not states:
        return "No devices were found\n", EXIT_NO_DEVICES
    lines = [_header(fields)] if header else []
    for state in states:
        if state["lost"]:
            lines.append(lost_line(state))
        elif query == "gpu":
            lines.append(", ".join(_cell(f, _gpu_value(state, f), units) for f in fields))
        else:
            lines += [", ".join(_cell(f, _app_value(state, p, f), units) for f in fields) for p in state["processes"]]
    code = EXIT_LOST if any(s["lost"] for s in states) else 0
    return "".join(line + "\n" for line in lines), code


def parse_args(args: list[str]) -> tuple[str, list[str], bool, bool]:
    query, fields, fmt = None, [], None
    for arg in args:
        name, _, value = arg.partition("=")
        if name in ("--query-gpu", "--query-compute-apps"):
            query, fields = ("gpu" if name == "--query-gpu" else "apps"), value.split(",")
        elif name == "--format":
            fmt = value.split(",")
        else:
            raise ValueError(f"Invalid combination of input arguments: {arg}")
    known = GPU_FIELDS if query == "gpu" else APP_FIELDS
    if query is None or fmt is None or fmt[0] != "csv" or not set(fields) <= known:
        raise ValueError("Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.")
    return query, fields, "noheader" not in fmt, "nounits" not in fmt


def tool_main(args: list[str], folder: Path) -> int:
    try:
        query, fields, header, units = parse_args(args)
    except ValueError as exc:
        sys.stdout.write(f"{exc}\n")
        return EXIT_ARGS
    time.sleep(float(_read(folder / "control.json", {}).get("hang_seconds", 0)))
    text, code = render(folder, query, fields, header, units)
    sys.stdout.write(text)
    return code


def ctl_main(args: list[str]) -> int:
    folder, command, rest = Path(args[0]), args[1], args[2:]
    if command == "init":
        init_board(folder, *(int(a) for a in rest))
    elif command == "idle":
        control(folder, idle=rest[0] == "on")
    elif command in ("lost", "found"):
        lost = set(_read(folder / "control.json", {}).get("lost", []))
        lost = lost | {int(rest[0])} if command == "lost" else lost - {int(rest[0])}
        control(folder, lost=sorted(lost))
    elif command == "foreign":
        pid = int(rest[2]) if len(rest) > 2 else 4_000_000 + int(rest[0])
        current = _read(folder / "control.json", {}).get("foreign", [])
        control(folder, foreign=current + [{"gpu": rest[0], "pid": pid, "memory_mb": int(rest[1])}])
    elif command == "clear-foreign":
        control(folder, foreign=[])
    elif command == "failure":
        control(folder, failure=None if rest[0] == "none" else rest[0])
    elif command == "hang":
        control(folder, hang_seconds=float(rest[0]))
    elif command == "reset":
        _write(folder / "control.json", {})
    else:
        sys.stderr.write(f"unknown control command {command!r}\n")
        return EXIT_ARGS
    return 0


def write_wrapper(bin_dir: Path, folder: Path, python: str = sys.executable) -> Path:
    """``bin_dir/nvidia-smi``: runs this stand-in on ``folder``'s board (created if missing)."""
    init_board(folder)
    target = Path(bin_dir) / "nvidia-smi"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"#!/bin/sh\n{DIR_ENV}={shlex.quote(str(Path(folder).resolve()))} exec "
                      f"{shlex.quote(python)} {shlex.quote(str(Path(__file__).resolve()))} \"$@\"\n")
    target.chmod(0o755)
    return target


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--ctl"]:
        return ctl_main(args[1:])
    folder = board_folder(dict(os.environ))
    if folder is None:
        sys.stdout.write(DRIVER_FAILED)
        return EXIT_DRIVER
    return tool_main(args, folder)


def board_folder(environ: dict[str, str]) -> Path | None:
    """The board of the host this ssh session reached: ``ports.json`` in the wrapper's folder maps
    an sshd port to a host's board (two sandbox hosts share one ``gpus.command``), else its own."""
    if not environ.get(DIR_ENV):
        return None
    folder = Path(environ[DIR_ENV])
    words = environ.get("SSH_CONNECTION", "").split()
    ports = _read(folder / PORTS_FILE, {})
    return Path(ports[words[3]]) if len(words) == 4 and words[3] in ports else folder


def map_ports(folder: Path, boards: dict[int, Path]) -> None:
    """Write ``ports.json``: which board answers a session that came in on which sshd port."""
    _write(Path(folder) / PORTS_FILE, {str(port): str(Path(board).resolve()) for port, board in boards.items()})


if __name__ == "__main__":
    sys.exit(main())
