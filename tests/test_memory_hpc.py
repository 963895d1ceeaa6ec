"""The HPC in memory keeps to the real thing's rules where the contract suite does not look."""
from __future__ import annotations

import pytest

from shared import tasks
from shared.errors import Unreachable
from tests.memory_hpc import MOQUI_COMMAND, sleeps


def test_a_host_that_is_down_answers_nothing_neither_scheduler_nor_shell(memory_hpc):
    sandbox = memory_hpc()
    [host] = sandbox.hosts().values()
    sandbox.hpc.down = True
    for call in (host.backend.snapshot, lambda: host.remote.run(["true"]), host.remote.base_dir,
                 lambda: tasks.read_exit_records(host.remote, ["/x"])):
        with pytest.raises(Unreachable):
            call()


def test_it_refuses_a_script_or_a_command_it_does_not_know(memory_hpc):
    sandbox = memory_hpc()
    [host] = sandbox.hosts().values()
    with pytest.raises(AssertionError, match="unknown remote script"):
        host.remote.run_script("rm -rf -- \"$1\"", "/")
    with pytest.raises(AssertionError, match="unknown remote command"):
        host.remote.run(["ls", "/"])
    host.backend.ensure_slots({"gpu_a": 1})
    with pytest.raises(AssertionError, match="no program for the command"):
        host.backend.submit(slot="gpu_a", label="mqic_case_1", workdir=str(sandbox.hpc.base), command="ls", env={})


def test_ids_are_never_reused_unless_asked_and_the_clock_moves_only_when_told(memory_hpc):
    sandbox = memory_hpc(programs={"sleep 5": sleeps(5)})
    [host] = sandbox.hosts().values()
    sandbox.hpc.base.mkdir(parents=True)
    host.backend.ensure_slots({"gpu_a": 1})
    submit = (lambda n: host.backend.submit(slot="gpu_a", label=f"mqic_case_{n}", workdir=str(sandbox.hpc.base),
                                            command="sleep 5", env={}))
    first = submit(1)
    assert host.backend.snapshot().tasks[first].state.is_active
    sandbox.clock.advance(5)
    assert host.backend.snapshot().tasks[first].state.is_done
    sandbox.hpc.clean()
    assert submit(2) == first + 1                                   # like a fresh id after `pueue clean`...
    sandbox.hpc.reuse_ids = True
    sandbox.clock.advance(5)
    sandbox.hpc.clean()
    assert submit(3) == 0                                           # ... unless the test asks for reuse
    assert not (sandbox.hpc.base / tasks.RECORD_DIR).exists()       # not wrapped: no exit record


def test_the_wrapped_fake_moqui_leaves_its_results_exit_record_and_output(memory_hpc):
    sandbox = memory_hpc()
    [host] = sandbox.hosts().values()
    workdir = sandbox.hpc.base / "case"
    workdir.mkdir(parents=True)
    (workdir / "mqi_fake.json").write_text('{"seconds": 1, "batches": 2, "mode": "ok"}')
    host.backend.ensure_slots({"gpu_a": 1})
    host.backend.submit(slot="gpu_a", label="mqic_case_1", workdir=str(workdir),
                        command=tasks.wrap_command(MOQUI_COMMAND), env={})
    assert tasks.read_exit_records(host.remote, [str(workdir)]) == {str(workdir): tasks.Record.MISSING}
    sandbox.clock.advance(1)
    assert tasks.read_exit_records(host.remote, [str(workdir)]) == {str(workdir): 0}
    assert (workdir / "output" / "dose.raw").is_file()
    assert "Generating particles for (2 of 2 batches)" in tasks.read_output_tail(host.remote, str(workdir), 5)
