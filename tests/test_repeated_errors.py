"""An unexpected error that repeats on one case flags it for review instead of looping silently.

Driven through the real poller's tick against the sandbox HPC: the case's task has
succeeded, but a plain file named ``output`` sits in the local case folder where the
results must go, so filing them fails the same way on every pass.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from shared.states import CaseStatus
from shared.store import case_events, get_case
from tests.conftest import wait_until
from tests.test_workers import ctx_for, submitted
from workers import poller


def flagged_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "flagged for review" in r.getMessage()]


def test_a_repeating_unexpected_error_flags_the_case_once_and_a_success_resets_the_count(hpc, caplog):
    h = hpc()
    ctx = ctx_for(h)
    case = submitted(ctx, "blocked results", seconds=0.1)
    wait_until(lambda: h.tasks_labelled(case.label)[0]["status"].get("Done"), message="task done")
    (Path(case.case_path) / "output").write_text("in the way")  # result_files: output/*
    remote_dir = get_case(ctx.conn, case.case_id).remote_dir
    caplog.set_level(logging.INFO, logger="mqic")

    def passes(n: int) -> None:
        for _ in range(n):
            poller.tick(ctx, time.time())

    passes(2)
    assert not get_case(ctx.conn, case.case_id).needs_review
    os.rename(remote_dir, remote_dir + ".away")  # one pass where the download fails as a RemoteFailure:
    passes(1)                                   # the poll of this case succeeds, the count restarts
    os.rename(remote_dir + ".away", remote_dir)
    passes(2)
    assert not get_case(ctx.conn, case.case_id).needs_review
    passes(1)                                   # third unexpected error in a row
    flagged = get_case(ctx.conn, case.case_id)
    assert flagged.needs_review and flagged.status is CaseStatus.RUNNING  # flagged, never failed
    assert flagged.review_reason.startswith("poll failed 3 times in a row: FileExistsError: ")
    assert "output" in flagged.review_reason
    assert any("flagged for review: poll failed 3 times" in e["detail"] for e in case_events(ctx.conn, case.case_id))
    passes(2)
    assert len(flagged_lines(caplog)) == 1                      # logged once
    tracebacks = [r for r in caplog.records if r.exc_info and "failed unexpectedly" in r.getMessage()]
    assert len(tracebacks) == 5                                 # not after the flag: one line each

    (Path(case.case_path) / "output").unlink()
    passes(1)
    done = get_case(ctx.conn, case.case_id)
    assert done.status is CaseStatus.COMPLETED and list(Path(done.case_path, "output").iterdir())
