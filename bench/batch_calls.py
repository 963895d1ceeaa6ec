"""Batch calls: 10 cases brought to the HPC one by one (upload + submit each) or as one batch.

One by one is what the submitter does today: ``Remote.upload`` (copy, then verify-and-rename)
and ``Backend.submit`` per case, so three remote calls per case. The batch is
``Remote.upload_many`` (ONE tar stream for all, ONE verify-and-rename call) and
``Backend.submit_batch`` (ONE remote call for all the adds): three calls for the lot.
Remote calls are the sessions the sandbox sshd started (its log), connections the new
logins (all calls share one ControlMaster connection). Every case lands and gets its task;
the figures are the median of the repeats, each repeat with fresh case ids.

    .venv/bin/python bench/batch_calls.py [--quick] [--cases 10] [--backend pueue|slurm]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.common import Workspace, median, sshd_counts, table  # noqa: E402
from sandbox.casegen import make_case, make_realistic_case  # noqa: E402
from shared import tasks  # noqa: E402
from shared.backends import SubmitItem, backend_for  # noqa: E402
from shared.remote import Remote, UploadCase, UploadResult  # noqa: E402

SLOT = "gpu_0"


class Bench:
    def __init__(self, ws: Workspace):
        self.ws = ws
        self.config = ws.config
        self.host = self.config.hosts[0]
        self.remote = Remote(self.host.hpc)
        self.backend = backend_for(self.config, self.host, self.remote)
        self.backend.ensure_slots({slot.name: slot.parallel for slot in self.host.slots})
        self.remote.base_dir()  # resolved once; not part of a case
        self.next_id = 1

    def item(self, case_id: int, remote_dir: str) -> SubmitItem:
        return SubmitItem(slot=SLOT, label=f"mqic_case_{case_id}", workdir=remote_dir,
                          command=tasks.wrap_command("true"), env={"MQIC_CASE_ID": str(case_id)})

    def ids(self, count: int) -> list[int]:
        first, self.next_id = self.next_id, self.next_id + count
        return list(range(first, first + count))

    def one_by_one(self, folders: list[Path]) -> None:
        for case_id, folder in zip(self.ids(len(folders)), folders):
            landed = self.remote.upload(folder, f"{case_id}_{folder.name}", case_id=case_id)
            self.backend.submit(**vars(self.item(case_id, landed.remote_dir)))

    def batched(self, folders: list[Path]) -> None:
        ids = self.ids(len(folders))
        landed = self.remote.upload_many([UploadCase(folder, f"{case_id}_{folder.name}", case_id)
                                          for case_id, folder in zip(ids, folders)])
        assert all(isinstance(outcome, UploadResult) for outcome in landed), landed
        outcomes = self.backend.submit_batch([self.item(case_id, outcome.remote_dir)
                                              for case_id, outcome in zip(ids, landed)])
        assert all(isinstance(outcome, int) for outcome in outcomes), outcomes

    def measure(self, way, folders: list[Path]) -> tuple[float, int, int]:
        before = sshd_counts(self.ws.sshd_log)
        start = time.perf_counter()
        way(folders)
        wall = time.perf_counter() - start
        spent = sshd_counts(self.ws.sshd_log) - before
        return wall, spent.sessions, spent.connections


def workspace(backend: str, keep: bool) -> Workspace:
    if backend == "slurm":
        return Workspace("batch", keep=keep, slurm={"gpus": 1},
                         partitions={SLOT: {"partition": "gpu", "gres": "gpu:1"}})
    return Workspace("batch", groups=common.groups_of(1), keep=keep)


def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--cases", type=int, default=10)
        parser.add_argument("--backend", choices=("pueue", "slurm"), default="pueue")
    args = common.bench_args(__doc__.splitlines()[0], argv, extra)
    repeats = 1 if args.quick else 3
    kinds = {"tiny (9 files, 0.3 MB)": lambda parent, name: make_case(parent, name)}
    if not args.quick:
        kinds["realistic (220 files, 45 MB)"] = lambda parent, name: make_realistic_case(parent, name, seed=3)
    print(common.machine_line())
    rows = []
    with workspace(args.backend, args.keep) as ws:
        bench = Bench(ws)
        for kind, maker in kinds.items():
            folders = [maker(ws.staging, f"{kind.split()[0]}_{i}") for i in range(args.cases)]
            for label, way in (("one by one: upload + submit each", bench.one_by_one),
                               ("batch: upload_many + submit_batch", bench.batched)):
                runs = [bench.measure(way, folders) for _ in range(repeats)]
                wall = median([r[0] for r in runs])
                rows.append([kind, label, runs[-1][1], runs[-1][2], round(wall, 2),
                             round(wall / args.cases * 1000)])
        bench.remote.close()
    print(table(["cases", "way", "remote calls", "new logins", "wall s", "ms per case"], rows,
                title=f"{args.cases} cases to one {args.backend} host (median of {repeats})"))
    print(common.machine_line("end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
