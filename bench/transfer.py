"""Transfer: our verified upload (scp, tar, rsync) against plain ``scp -r`` and a raw tar stream.

Two cases: the realistic one (about 220 files, 45 MB) and a large one (4 files of random
data, about 1 GB; 200 MB with --quick). Ours is ``shared.remote.Remote.upload`` with each
``hpc.transfer`` method: it lands under a temporary name, is verified by file count and
bytes, and renamed into place; the verify+rename step (``finalize_many``) is also timed
on its own. Plain ``scp -r`` opens a fresh connection like the naive way; the raw
``tar -cf - | ssh 'tar -xf -'`` stream over the shared connection is the floor. Every
figure is the median of the repeats; the remote copy is removed between runs (not timed).

    .venv/bin/python bench/transfer.py [--quick]
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.common import Workspace, median, table  # noqa: E402
from sandbox.casegen import make_realistic_case  # noqa: E402
from shared.remote import Remote, folder_manifest  # noqa: E402

CHUNK = 4 * 1024 * 1024


def make_large_case(parent: Path, name: str, total_bytes: int, files: int = 4) -> Path:
    """``files`` files of random data adding up to ``total_bytes`` (real data: scp sends every byte)."""
    folder = parent / name
    folder.mkdir()
    per_file = total_bytes // files
    for index in range(files):
        with open(folder / f"beam_{index}.ptn", "wb") as handle:
            left = per_file
            while left > 0:
                handle.write(os.urandom(min(CHUNK, left)))
                left -= CHUNK
    (folder / "moqui_tps.in").write_text("GPUID 0\nOutputDir output\n")
    return folder


class Methods:
    """Each upload method as a callable ``(local_dir, name) -> (total, finalize) seconds``."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.hpc = ws.config.hosts[0].hpc
        self.remotes = {m: Remote(dataclasses.replace(self.hpc, transfer=m)) for m in ("scp", "tar", "rsync")}
        self.remotes["scp"].ensure_master()
        self.base = self.remotes["scp"].base_dir()
        for remote in self.remotes.values():
            remote.base_dir()  # resolved once per instance; not part of an upload
        self.case_id = 0

    def ours(self, method: str):
        remote = self.remotes[method]
        original = Remote.finalize_many
        spent = []

        def finalize(moves):
            start = time.perf_counter()
            try:
                return original(remote, moves)
            finally:
                spent.append(time.perf_counter() - start)

        remote.finalize_many = finalize

        def run(local: Path, name: str) -> tuple[float, float]:
            spent.clear()
            self.case_id += 1
            start = time.perf_counter()
            remote.upload(local, name, case_id=self.case_id)
            return time.perf_counter() - start, spent[-1]
        return run

    def plain_scp(self, local: Path, name: str) -> tuple[float, float]:
        argv = self.ws.ssh_argv(fresh=True)
        options = argv[1:-1]
        scp = ["scp", *_port_as_scp(options), "-q", "-r", str(local), f"{argv[-1]}:{self.base}/{name}"]
        start = time.perf_counter()
        subprocess.run(scp, check=True, capture_output=True)
        return time.perf_counter() - start, 0.0

    def raw_tar(self, local: Path, name: str) -> tuple[float, float]:
        argv = self.ws.ssh_argv(fresh=False)
        ssh = [argv[0], "-o", f"ControlPath={self.remotes['scp'].control_path}", "-o", "ControlMaster=no", *argv[1:]]
        dest = shlex.quote(f"{self.base}/{name}")
        pipeline = (f"set -o pipefail; tar -C {shlex.quote(str(local))} -cf - . | "
                    f"{shlex.join(ssh)} {shlex.quote(f'mkdir -p {dest} && tar -C {dest} -xf -')}")
        start = time.perf_counter()
        subprocess.run(["bash", "-c", pipeline], check=True, capture_output=True)
        return time.perf_counter() - start, 0.0

    def clean(self, name: str) -> None:
        shutil.rmtree(Path(self.base) / name, ignore_errors=True)  # the sandbox HPC is this machine

    def close(self) -> None:
        self.remotes["scp"].close()


def _port_as_scp(options: list[str]) -> list[str]:
    """ssh's ``-p PORT`` is scp's ``-P PORT``."""
    out = list(options)
    index = out.index("-p")
    out[index] = "-P"
    return out


FLOOR = "raw tar | ssh stream (floor)"


def case_rows(ws: Workspace, methods: Methods, label: str, folder: Path, repeats: int) -> list[list]:
    """Time every method on one case folder; one table row per method plus the local manifest."""
    plans = [("ours, hpc.transfer=scp", methods.ours("scp")), ("ours, hpc.transfer=tar", methods.ours("tar")),
             ("ours, hpc.transfer=rsync", methods.ours("rsync")),
             ("plain scp -r (fresh connection)", methods.plain_scp), (FLOOR, methods.raw_tar)]
    files, size = folder_manifest(folder)
    manifest_s = median([common.timed(lambda: folder_manifest(folder))[0] for _ in range(3)])
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _run in plans}
    used: dict[str, common.SshdCounts] = {}
    for attempt in range(repeats):  # methods interleaved, so drift hits them alike
        for name, run in plans:
            target = f"{label}_{attempt}"
            before = common.sshd_counts(ws.sshd_log)
            times[name].append(run(folder, target))
            used[name] = common.sshd_counts(ws.sshd_log) - before
            methods.clean(target)
    results = {name: (median([t for t, _ in got]), median([f for _, f in got])) for name, got in times.items()}
    floor = results[FLOOR][0]
    rows = [[f"{label} ({files} files, {size / 1e6:.0f} MB)", name, total, finalize or None, size / 1e6 / total,
             f"{total / floor:.2f}x", used[name].sessions, used[name].connections]
            for name, (total, finalize) in results.items()]
    return rows + [[f"{label}: local manifest (os.walk, part of ours)", "", manifest_s, None, None, "", None, None]]


def main(argv=None) -> int:
    args = common.bench_args(__doc__.splitlines()[0], argv)
    large_bytes = (200 if args.quick else 1024) * 1024 * 1024
    repeats = {"realistic": 1 if args.quick else 3, "large": 1 if args.quick else 2}
    print(common.machine_line())
    rows = []
    with Workspace("transfer", groups=common.groups_of(1), keep=args.keep) as ws:
        cases = {"realistic": make_realistic_case(ws.staging, "realistic", seed=3),
                 "large": make_large_case(ws.staging, "large", large_bytes)}
        methods = Methods(ws)
        try:
            shell_mux, shell_fresh = common.remote_shell_cost(ws)
            for label, folder in cases.items():
                rows += case_rows(ws, methods, label, folder, repeats[label])
        finally:
            methods.close()
    print()
    print(f"Transfer to the sandbox HPC (sshd on 127.0.0.1; medians of {repeats['realistic']} / {repeats['large']} runs)")
    print(table(["case", "method", "total s", "verify+rename s", "MB/s", "vs floor", "remote commands",
                 "new connections"], rows))
    print(f"\none remote `true` on this sandbox: {shell_mux * 1000:.0f} ms over the shared connection,"
          f" {shell_fresh * 1000:.0f} ms on a fresh one (mostly the remote login shell reading ~/.bashrc)")
    print(common.machine_line("end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
