"""The pueue driver over real ssh against the stand-in, in both pueue JSON formats."""
from __future__ import annotations

import time

import pytest

from shared import errors
from shared.backends import model, pueue
from shared.backends.common import parse_progress
from shared.errors import BadOutput, RemoteError, SchedulerOutage, SlotLost
from shared.remote import Remote
from tests.conftest import wait_until


@pytest.fixture(params=["v3", "v4"])
def driver(request, hpc):
    h = hpc(pueue_format=request.param, groups={"gpu_a": {"gpu": 0}, "gpu_b": {"gpu": 1}})
    remote = Remote(h.config.hosts[0].hpc)
    cmd = list(h.config.hosts[0].hpc.pueue_command)
    assert sorted(pueue.ensure_groups(remote, cmd, {"gpu_a": 1, "gpu_b": 1})) == ["gpu_a", "gpu_b"]
    return h, remote, cmd, request.param


def test_version_matches_format(driver):
    _h, remote, cmd, fmt = driver
    assert pueue.version(remote, cmd).startswith("4." if fmt == "v4" else "3.")


def test_submit_status_logs_and_label_lookup(driver, tmp_path):
    h, remote, cmd, _fmt = driver
    workdir = tmp_path / "case dir"
    workdir.mkdir()
    command = "echo 'Generating particles for (3 of 4 batches)'; echo \"$CUDA_VISIBLE_DEVICES $PUEUE_GROUP\""
    task_id = pueue.submit(remote, cmd, group="gpu_a", label="mqic_case_1", workdir=str(workdir),
                           command=command, env={"CUDA_VISIBLE_DEVICES": "0"})
    done = wait_until(lambda: pueue.statuses(remote, cmd).tasks[task_id].is_done and
                      pueue.statuses(remote, cmd).tasks[task_id], message="task done")
    assert done.state is model.TaskState.SUCCESS and done.label == "mqic_case_1" and done.group == "gpu_a"
    assert done.path == str(workdir) and done.start is not None and done.end is not None
    output = pueue.logs(remote, cmd, [task_id], lines=5)[task_id]
    assert output.splitlines()[-1] == "0 gpu_a"
    assert parse_progress(output) == 75.0
    snapshot = pueue.statuses(remote, cmd)
    assert [t.id for t in snapshot.by_label("mqic_case_1")] == [task_id] and snapshot.by_label("mqic_case_") == []
    assert abs(snapshot.hpc_time - time.time()) < 5          # the HPC's clock (here: the same machine)
    with pytest.raises(errors.AlreadySubmitted):               # one task per label, whatever happens
        pueue.submit(remote, cmd, group="gpu_a", label="mqic_case_1", workdir=str(workdir), command="true")
    h.ctl("stop")
    with pytest.raises(SchedulerOutage, match="while connecting to daemon"):  # no attempt is used
        pueue.statuses(remote, cmd)


def test_failures_map_to_their_states(driver, tmp_path):
    _h, remote, cmd, fmt = driver
    ids = {
        "failed": pueue.submit(remote, cmd, group="gpu_a", label="f", workdir=str(tmp_path), command="exit 3"),
        "typo": pueue.submit(remote, cmd, group="gpu_b", label="t", workdir=str(tmp_path), command="no_such_cmd_x"),
    }
    snapshot = wait_until(lambda: (s := pueue.statuses(remote, cmd)) and all(s.tasks[i].is_done for i in ids.values()) and s,
                          message="both done")
    assert (snapshot.tasks[ids["failed"]].state, snapshot.tasks[ids["failed"]].exit_code) == (model.TaskState.FAILED, 3)
    assert snapshot.tasks[ids["typo"]].exit_code == 127
    if fmt == "v3":  # v3 stores a missing working directory; the task fails to spawn
        gone = pueue.submit(remote, cmd, group="gpu_a", label="s", workdir=str(tmp_path / "missing"), command="true")
        state = wait_until(lambda: (t := pueue.statuses(remote, cmd).tasks[gone]).is_done and t, message="spawn")
        assert state.state is model.TaskState.FAILED_TO_SPAWN
    else:            # v4.0.3+ refuses it on the client
        with pytest.raises(RemoteError, match="canonicalize"):
            pueue.submit(remote, cmd, group="gpu_a", label="s", workdir=str(tmp_path / "missing"), command="true")


def test_kill_only_with_ids_and_reports_what_failed(driver, tmp_path):
    _h, remote, cmd, _fmt = driver
    task_id = pueue.submit(remote, cmd, group="gpu_a", label="k", workdir=str(tmp_path), command="sleep 60")
    wait_until(lambda: pueue.statuses(remote, cmd).tasks[task_id].state is model.TaskState.RUNNING, message="running")
    result = pueue.kill(remote, cmd, [task_id, 99])
    assert result.killed == (task_id,) and result.failed == (99,)
    wait_until(lambda: pueue.statuses(remote, cmd).tasks[task_id].state is model.TaskState.KILLED, message="killed")
    with pytest.raises(ValueError):
        pueue.kill(remote, cmd, [])


def test_garbage_status_is_bad_output(driver):
    h, remote, cmd, _fmt = driver
    h.ctl("garbage", "1")
    with pytest.raises(BadOutput):
        pueue.statuses(remote, cmd)
    assert pueue.statuses(remote, cmd).paused_slots == ()  # the next answer reads again


def test_unknown_group_is_a_lost_slot(driver, tmp_path):
    _h, remote, cmd, _fmt = driver
    with pytest.raises(SlotLost, match="doesn't exists"):
        pueue.submit(remote, cmd, group="gpu_zz", label="x", workdir=str(tmp_path), command="true")


def test_require_workdir_checks_the_folder_in_the_same_call(driver, tmp_path):
    h, remote, cmd, _fmt = driver
    with pytest.raises(errors.WorkdirMissing):
        pueue.submit(remote, cmd, group="gpu_a", label="w", workdir=str(tmp_path / "gone"), command="true",
                     require_workdir=True)
    assert h.tasks_labelled("w") == []
    assert pueue.submit(remote, cmd, group="gpu_a", label="w", workdir=str(tmp_path), command="true",
                        require_workdir=True) >= 0
