#!/usr/bin/env python3
"""A fake MOQUI GPU simulation that prints and writes what the real one does, quickly.

Run it in a case folder. It prints ``... with N batches``, then one flushed line
``Generating particles for (i of N batches)`` per batch spread over the run time,
writes ``<OutputDir>/dose.raw`` and ``<OutputDir>/Dose.mhd`` (``OutputDir`` from
``moqui_tps.in``, default ``output``) and ends with ``Total execution time: X s``.

Knobs: ``seconds`` (total run time, default 1), ``batches`` (default 10) and
``mode``:

- ``ok``: the normal run, exit 0;
- ``fail``: about halfway prints ``FATAL ERROR: ...`` and exits 1;
- ``hang``: about halfway stops printing and sleeps forever;
- ``crash``: about halfway prints ``Segmentation fault`` and kills itself with SIGSEGV.

Precedence, per knob, highest first:

1. ``mqi_fake.json`` in the case folder: ``{"seconds": .., "batches": .., "mode": ..}``;
2. ``moqui_tps.in`` keys ``MQI_FAKE_SECONDS``, ``MQI_FAKE_BATCHES``, ``MQI_FAKE_MODE``;
3. the environment variables of the same names;
4. the defaults.

So environment variables never override a value the case folder sets: a task
run through pueue over ssh gets the ssh session's environment, and the per-case
file is what tests use.

GPU load: while it runs, it keeps ``<gpus>/load/<pid>.json`` (its GPU from
``CUDA_VISIBLE_DEVICES``, ``memory_mb``, ``busy``: false while it hangs), which the
sandbox's ``nvidia-smi`` stand-in (``sandbox/nvidia_smi.py``) reads. ``<gpus>`` is
``$MQI_FAKE_GPU_DIR``, else the ``gpus`` folder beside the remote base folder
(``$MQIC_REMOTE_DIR/../../gpus``) when it exists; without one, nothing is written.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TPS_FILE = "moqui_tps.in"
FAKE_FILE = "mqi_fake.json"
MODES = ("ok", "fail", "hang", "crash")
DOSE_SHAPE = (10, 10, 10)
_KEYS = {"seconds": "MQI_FAKE_SECONDS", "batches": "MQI_FAKE_BATCHES", "mode": "MQI_FAKE_MODE"}


@dataclass(frozen=True)
class FakeRun:
    """How this fake run behaves."""

    seconds: float = 1.0
    batches: int = 10
    mode: str = "ok"
    output_dir: str = "output"


class BadKnob(ValueError):
    """A knob has a value the fake cannot use."""


def read_tps(case_dir: Path) -> dict[str, str]:
    try:
        lines = (case_dir / TPS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return {}
    pairs = (line.split(None, 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))
    return {pair[0]: (pair[1].strip() if len(pair) > 1 else "") for pair in pairs}


def read_fake_file(case_dir: Path) -> dict:
    try:
        data = json.loads((case_dir / FAKE_FILE).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise BadKnob(f"{FAKE_FILE} is not valid JSON: {err}") from None
    return data if isinstance(data, dict) else {}


def load_run(case_dir: Path, environ: dict[str, str]) -> FakeRun:
    """Resolve the knobs with the precedence of the module docstring; raise BadKnob on nonsense."""
    tps = read_tps(case_dir)
    fake = read_fake_file(case_dir)
    raw = {}
    for knob, key in _KEYS.items():
        for source in (fake.get(knob), tps.get(key), environ.get(key)):
            if source is not None and source != "":
                raw[knob] = source
                break
    try:
        run = FakeRun(seconds=float(raw.get("seconds", 1.0)), batches=int(raw.get("batches", 10)),
                      mode=str(raw.get("mode", "ok")), output_dir=tps.get("OutputDir", "output"))
    except (TypeError, ValueError) as err:
        raise BadKnob(str(err)) from None
    if run.mode not in MODES or run.batches < 1 or run.seconds < 0:
        raise BadKnob(f"unusable knobs: {run}")
    return run


def say(text: str) -> None:
    print(text, flush=True)


def write_dose(case_dir: Path, run: FakeRun) -> Path:
    """Write a small all-zero float32 dose grid and its MetaImage header."""
    out = case_dir / run.output_dir
    out.mkdir(parents=True, exist_ok=True)
    voxels = DOSE_SHAPE[0] * DOSE_SHAPE[1] * DOSE_SHAPE[2]
    (out / "dose.raw").write_bytes(bytes(4 * voxels))
    (out / "Dose.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"DimSize = {' '.join(map(str, DOSE_SHAPE))}\nElementSpacing = 2 2 2\n"
        "ElementType = MET_FLOAT\nElementDataFile = dose.raw\n")
    return out


def crash() -> None:
    say("Segmentation fault")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the case folder
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGSEGV)


GPU_MEMORY_MB = 2048


def gpu_folder(environ: dict[str, str]) -> Path | None:
    if environ.get("MQI_FAKE_GPU_DIR"):
        return Path(environ["MQI_FAKE_GPU_DIR"])
    if environ.get("MQIC_REMOTE_DIR"):
        beside = Path(environ["MQIC_REMOTE_DIR"]).parent.parent / "gpus"
        return beside if (beside / "board.json").exists() else None
    return None


def show_load(gpu: str, busy: bool) -> None:
    """Tell the sandbox's nvidia-smi that this process holds ``gpu`` (busy or hanging idle)."""
    folder = gpu_folder(dict(os.environ))
    if folder is None:
        return
    entry = folder / "load" / f"{os.getpid()}.json"
    entry.parent.mkdir(parents=True, exist_ok=True)
    temporary = entry.with_name(f".{entry.name}.tmp")
    temporary.write_text(json.dumps({"gpu": gpu.split(",")[0], "pid": os.getpid(), "memory_mb": GPU_MEMORY_MB,
                                     "busy": busy}))
    os.replace(temporary, entry)


def drop_load() -> None:
    folder = gpu_folder(dict(os.environ))
    if folder is not None:
        (folder / "load" / f"{os.getpid()}.json").unlink(missing_ok=True)


def simulate(case_dir: Path, run: FakeRun) -> int:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("PUEUE_WORKER_ID", "0"))
    show_load(gpu, busy=True)
    try:
        return simulate_on(case_dir, run, gpu)
    finally:
        drop_load()


def simulate_on(case_dir: Path, run: FakeRun, gpu: str) -> int:
    started = time.monotonic()
    say(f"MOQUI Monte Carlo dose engine (sandbox fake), GPU {gpu}")
    say(f"Reading parameters from {TPS_FILE}: {len(read_tps(case_dir))} keys")
    say(f"Simulating {run.batches * 10000} histories with {run.batches} batches")
    pause = run.seconds / run.batches
    trouble_at = max(1, run.batches // 2)
    for batch in range(1, run.batches + 1):
        time.sleep(pause)
        say(f"Generating particles for ({batch} of {run.batches} batches)")
        if batch == trouble_at and run.mode != "ok":
            if run.mode == "hang":
                show_load(gpu, busy=False)  # a hang that holds its GPU and leaves it idle
            return misbehave(run.mode)
    out = write_dose(case_dir, run)
    say(f"Dose written to {out.name}/Dose.mhd")
    say(f"Total execution time: {time.monotonic() - started:.2f} s")
    return 0


def misbehave(mode: str) -> int:
    if mode == "fail":
        say("FATAL ERROR: CUDA error: an illegal memory access was encountered (sandbox fake)")
        return 1
    if mode == "crash":
        crash()
    while True:  # hang
        time.sleep(3600)


def main() -> int:
    case_dir = Path.cwd()
    try:
        run = load_run(case_dir, dict(os.environ))
    except BadKnob as err:
        say(f"ERROR: {err}")
        return 2
    return simulate(case_dir, run)


if __name__ == "__main__":
    sys.exit(main())
