"""Realistic MOQUI case folders for tests and the sandbox (see MOQUI.md).

A case folder holds one RT plan ``RP.<uid>.dcm``, ``moqui_tps.in`` (``key value``
lines), delivery sub-folders named ``YYYYMMDDhhmmss00`` with one ``*.ptn`` and
one ``*.mgn`` per energy layer plus ``PlanInfo.txt`` and ``PlanRange.txt``, and
``mqi_fake.json`` telling the fake simulator (``sandbox/fake_moqui``) how to
behave. An optional ready-marker file is written last.

By default the files appear one by one in the final folder, like a slow copy
(tests also want growing folders); ``atomic=True`` builds the folder under a
hidden temporary name beside it and renames it into place at the end.

Usage::

    make_case(tmp_path, "case_01", seconds=0.3, marker="_CASE_READY")
    make_realistic_case(tmp_path, "case_02")          # about 220 files / 45 MB

or ``python -m sandbox.casegen DIR NAME [--realistic] [--seconds S] ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from datetime import datetime, timedelta
from pathlib import Path

DICOM_PREAMBLE = bytes(128) + b"DICM"
UID_ROOT = "1.2.826.0.1.3680043.8.498"
REALISTIC = {"deliveries": 3, "layers_per_delivery": 35, "ptn_bytes": 420_000, "mgn_bytes": 3_500,
             "rp_bytes": 700_000, "vary_sizes": True}


def make_case(parent: Path, name: str, *, layers_per_delivery: int = 3, deliveries: int = 3,
              ptn_bytes: int = 30_000, seconds: float = 1, batches: int = 10, mode: str = "ok",
              marker: str | None = None, atomic: bool = False, rp_bytes: int = 16_384,
              mgn_bytes: int = 2_048, vary_sizes: bool = False, seed: int | None = None) -> Path:
    """Create the case folder ``parent/name`` and return its path.

    Sizes are exact unless ``vary_sizes`` (then ``ptn_bytes`` and ``mgn_bytes``
    are means and each file differs, like real layers). ``seconds``, ``batches``
    and ``mode`` go to ``mqi_fake.json``. ``marker`` names an empty file written
    last. ``seed`` makes the content reproducible. Raises FileExistsError if the
    folder exists.
    """
    parent = Path(parent)
    final = parent / name
    if final.exists():
        raise FileExistsError(final)
    rng = random.Random(seed)
    target = parent / f".{name}.partial-{rng.getrandbits(32):08x}" if atomic else final
    target.mkdir(parents=True)
    _write(target / f"RP.{_uid(rng)}.dcm", DICOM_PREAMBLE + rng.randbytes(max(0, rp_bytes - len(DICOM_PREAMBLE))))
    _write(target / "moqui_tps.in", tps_text(rng).encode())
    for index, folder in enumerate(_delivery_names(rng, deliveries), start=1):
        _write_delivery(target / folder, index, layers_per_delivery, ptn_bytes, mgn_bytes, vary_sizes, rng)
    fake = {"seconds": seconds, "batches": batches, "mode": mode}
    _write(target / "mqi_fake.json", json.dumps(fake).encode())
    if marker:
        _write(target / marker, b"")
    if atomic:
        os.rename(target, final)
    return final


def make_realistic_case(parent: Path, name: str, **overrides) -> Path:
    """A case like MOQUI's sample: 3 deliveries of 35 layers, about 220 files and 45 MB."""
    return make_case(parent, name, **{**REALISTIC, **overrides})


def tps_text(rng: random.Random) -> str:
    """``moqui_tps.in``: simulator parameters as ``key value`` lines (under 1 KB)."""
    lines = {
        "GPUID": "0", "RandomSeed": str(-rng.randrange(1, 2**31)), "UseAbsolutePath": "false",
        "Verbosity": "0", "UsingPhantomGeo": "true", "TotalThreads": "-1", "MaxHistoriesPerBatch": "10000",
        "ParentDir": ".", "DicomDir": ".", "logFilePath": ".", "GantryNum": "1", "OutputDir": "output",
        "OutputFormat": "raw", "OverwriteResults": "true", "SimulationType": "perBeam", "BeamNumbers": "0",
        "ParticlesPerHistory": "1", "SourceType": "FluenceMap", "Scorer": "Dose", "SupressStd": "true",
        "ReadStructure": "true", "ROIName": "External",
    }
    return "".join(f"{key} {value}\n" for key, value in lines.items())


def _uid(rng: random.Random) -> str:
    return f"{UID_ROOT}.{rng.randrange(10**9, 10**10)}.{rng.randrange(10**5, 10**6)}"


def _delivery_names(rng: random.Random, count: int) -> list[str]:
    start = datetime(2024, 1, 1) + timedelta(seconds=rng.randrange(0, 300 * 86400))
    return [f"{start + timedelta(minutes=7 * i):%Y%m%d%H%M%S}00" for i in range(count)]


def _write_delivery(folder: Path, beam: int, layers: int, ptn_bytes: int, mgn_bytes: int, vary: bool,
                    rng: random.Random) -> None:
    folder.mkdir()
    rows = []
    energy = 70.0 + 100.0 * rng.random()
    ptn_sizes, mgn_sizes = _sizes(ptn_bytes, layers, vary, rng), _sizes(mgn_bytes, layers, vary, rng)
    for layer in range(1, layers + 1):
        stem = f"{beam:02d}_{layer:03d}"
        _write(folder / f"{stem}.ptn", rng.randbytes(ptn_sizes[layer - 1]))
        _write(folder / f"{stem}.mgn", rng.randbytes(mgn_sizes[layer - 1]))
        rows.append(f"{layer},{energy - 1.5 * layer:.2f},{stem}.ptn,{stem}.mgn\n")
    info = {"DICOM_BEAM_NUMBER": beam, "TCSC_FIELD_NUMBER": beam, "BEAM_NAME": f"Field {beam}",
            "GANTRY_ANGLE": (beam * 120) % 360, "NUMBER_OF_LAYERS": layers}
    _write(folder / "PlanInfo.txt", "".join(f"{key},{value}\n" for key, value in info.items()).encode())
    _write(folder / "PlanRange.txt", ("LAYER,ENERGY_MEV,PTN_FILE,MGN_FILE\n" + "".join(rows)).encode())


def _sizes(mean: int, count: int, vary: bool, rng: random.Random) -> list[int]:
    """``count`` sizes: all exactly ``mean``, or spread evenly from 7% to 193% of it, shuffled."""
    if not vary:
        return [mean] * count
    sizes = [int(mean * (0.07 + 1.86 * (i + 0.5) / count)) for i in range(count)]
    rng.shuffle(sizes)
    return sizes


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.casegen", description="Create a MOQUI case folder.")
    parser.add_argument("dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--realistic", action="store_true", help="about 220 files / 45 MB")
    parser.add_argument("--layers", type=int, dest="layers_per_delivery")
    parser.add_argument("--deliveries", type=int)
    parser.add_argument("--ptn-bytes", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--batches", type=int)
    parser.add_argument("--mode", choices=("ok", "fail", "hang", "crash"))
    parser.add_argument("--marker")
    parser.add_argument("--atomic", action="store_true")
    parser.add_argument("--seed", type=int)
    args = vars(parser.parse_args(argv))
    parent, name, realistic = args.pop("dir"), args.pop("name"), args.pop("realistic")
    options = {key: value for key, value in args.items() if value not in (None, False)}
    maker = make_realistic_case if realistic else make_case
    print(maker(parent, name, **options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
