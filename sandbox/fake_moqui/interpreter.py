#!/usr/bin/env python3
"""A fake MOQUI interpreter step: reads ``moqui_tps.in`` in the cwd, prints a few lines, exits 0.

It stands for the real step that turns a treatment plan into simulator input.
The only knob is ``"interpreter_mode": "fail"`` in ``mqi_fake.json`` (or
``MQI_FAKE_INTERPRETER=fail`` in the environment when that key is absent),
which makes it print ``ERROR: ...`` and exit 1.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from moquisim import read_tps as read_parameters  # same folder: on sys.path when run as a script

TPS_FILE = "moqui_tps.in"
FAKE_FILE = "mqi_fake.json"


def interpreter_mode(case_dir: Path) -> str:
    """``mqi_fake.json``'s ``interpreter_mode`` wins over ``MQI_FAKE_INTERPRETER``; default ``ok``."""
    try:
        data = json.loads((case_dir / FAKE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        data = {}
    return str(data.get("interpreter_mode") or os.environ.get("MQI_FAKE_INTERPRETER") or "ok")


def delivery_folders(case_dir: Path) -> list[Path]:
    return sorted(p for p in case_dir.iterdir() if p.is_dir() and (p / "PlanInfo.txt").exists())


def main() -> int:
    case_dir = Path.cwd()
    parameters = read_parameters(case_dir)
    print(f"[interpreter] MOQUI TPS interpreter (sandbox fake) in {case_dir}", flush=True)
    print(f"[interpreter] read {len(parameters)} parameters from {TPS_FILE}", flush=True)
    for folder in delivery_folders(case_dir):
        layers = len(list(folder.glob("*.ptn")))
        print(f"[interpreter] delivery {folder.name}: {layers} energy layers", flush=True)
    if interpreter_mode(case_dir) == "fail":
        print("ERROR: interpreter could not read the RT plan (fake failure)", flush=True)
        return 1
    print("[interpreter] done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
