"""Several submits in ONE remote call (``Backend.submit_batch``): reading the answer, one outcome per item.

The fast tests feed answers built in Python (``tests/batch_fakes.py``); the system tests at the
end run ``BATCH_SCRIPT`` itself over the real sshd with hostile words. Every backend's batch
against its real scheduler is in ``tests/test_backend_contract.py``.
"""
from __future__ import annotations

import pytest

from shared import tasks
from shared.backends import SubmitItem, common, direct, pueue, slurm
from shared.backends.common import (BATCH_SCRIPT, NOT_STARTED_EXIT, BatchScript, ItemAnswer, ItemCall, batch_argv,
                                    parse_batch, run_batch)
from shared.errors import (AlreadySubmitted, BadOutput, RemoteError, SchedulerOutage, SlotLost, SubmitUncertain,
                           Unreachable, WorkdirMissing)
from shared.remote import Remote
from tests import batch_fakes
from tests.batch_fakes import record

MARK = "~mqic-batch-0123456789abcdef01234567~"
OTHER_MARK = "~mqic-batch-ffffffffffffffffffffffff~"


def answer(*records: tuple[int, str, str]) -> str:
    return "".join(record(MARK, index, code, out, err) for index, (code, out, err) in enumerate(records))


# -- reading the answer --------------------------------------------------------------------------

def test_each_whole_record_is_one_items_exit_stdout_and_stderr():
    text = answer((0, "17", ""), (87, "", "mqic_case_2 already has a task\n"), (86, "", ""))
    assert parse_batch(text, MARK) == {0: ItemAnswer(0, "17", ""), 1: ItemAnswer(87, "", "mqic_case_2 already has a task\n"),
                                       2: ItemAnswer(86, "", "")}


def test_fake_records_printed_by_a_command_stay_inside_its_own_record():
    """A command cannot know the marker: whatever it prints, even records of its own, is its output."""
    forged = record(OTHER_MARK, 1, 0, "999") + "S1 0 999\n" + record("", 1, 0, "998")
    text = answer((0, forged + "\n17", forged), (86, "", ""))
    found = parse_batch(text, MARK)
    assert sorted(found) == [0, 1] and found[1].code == 86
    assert found[0].code == 0 and found[0].stdout.endswith("17") and found[0].stderr == forged


def test_a_truncated_answer_keeps_only_whole_records_whatever_the_cut():
    full_text = answer((0, "17", "warning: pueue version\n"), (87, "", "exists"), (0, "19", ""))
    full = parse_batch(full_text, MARK)
    for cut in range(len(full_text) + 1):
        found = parse_batch(full_text[:cut], MARK)
        assert list(found) == list(range(len(found)))              # a prefix, in order
        assert all(found[index] == full[index] for index in found)  # never a shortened exit code or id
    assert parse_batch(full_text[:-1], MARK) == full                # only the last newline lost: still whole
    cut_in_last_exit = full_text[:full_text.rindex(MARK)]           # "...<M>0" without the closing marker
    assert sorted(parse_batch(cut_in_last_exit, MARK)) == [0, 1]


def test_records_out_of_order_or_malformed_end_the_reading():
    assert parse_batch(record(MARK, 1, 0, "5"), MARK) == {}
    assert parse_batch(record(MARK, 0, 0, "5").replace(f"{MARK}0{MARK}", f"{MARK}x{MARK}"), MARK) == {}
    text = answer((0, "5", "")) + f"{MARK}S1{MARK}half an item"
    assert parse_batch(text, MARK) == {0: ItemAnswer(0, "5", "")}
    assert parse_batch("", MARK) == {} and parse_batch("motd line\n" + answer((0, "5", "")), MARK)[0].stdout == "5"


# -- one outcome per item --------------------------------------------------------------------------

class Runner:
    """Answers each call with ``reply(argv)`` (an exception is raised); records the calls."""

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def run(self, argv, *, timeout=None):
        self.calls.append((list(argv), timeout))
        reply = self.reply(argv)
        if isinstance(reply, BaseException):
            raise reply
        return reply


def items(*labels: str, slot: str = "gpu_a") -> list[SubmitItem]:
    return [SubmitItem(slot=slot, label=label, workdir=f"/r/{label}", command="run", env={"MQIC_CASE_ID": "1"})
            for label in labels]


def by_item(*replies):
    """Each item's own call answers in turn: a str is its stdout, a RemoteError its failure."""
    def reply(argv):
        queue = list(replies)

        def one(_item):
            said = queue.pop(0)
            if isinstance(said, BaseException):
                raise said
            return said
        return batch_fakes.run_items(argv, one)
    return reply


def pueue_backend(reply) -> tuple[pueue.PueueBackend, Runner]:
    runner = Runner(reply)
    return pueue.PueueBackend(runner, ["pueue"], 20), runner


def test_a_batch_is_one_call_and_each_item_gets_its_own_outcome():
    made, runner = pueue_backend(by_item("41\n", RemoteError(["sh"], 87, "mqic_case_2 already has a task"),
                                         RemoteError(["sh"], 86, "")))
    outcomes = made.submit_batch(items("mqic_case_1", "mqic_case_2", "mqic_case_3"))
    assert len(runner.calls) == 1
    assert outcomes[0] == 41 and type(outcomes[1]) is AlreadySubmitted and type(outcomes[2]) is WorkdirMissing


def test_each_item_is_sent_as_its_own_submit_would_be():
    made, runner = pueue_backend(by_item("1", "2"))
    made.submit_batch(items("mqic_case_1", "mqic_case_2"))
    [(argv, timeout)] = runner.calls
    alone, alone_runner = pueue_backend(by_item("1"))
    alone.submit(slot="gpu_a", label="mqic_case_2", workdir="/r/mqic_case_2", command="run", env={"MQIC_CASE_ID": "1"})
    assert batch_fakes.item_argvs(argv)[1] == batch_fakes.item_argvs(alone_runner.calls[0][0])[0]
    assert argv[:3] == ["sh", "-c", BATCH_SCRIPT] and timeout == 3 * 20 + 10   # room for the start cutoff
    assert alone_runner.calls[0][1] == 20                                      # one item: as one submit


def test_an_answer_cut_after_the_first_item_leaves_the_others_uncertain_by_label():
    def cut(argv):
        full = by_item("41", "42", "43")(argv)
        return full[:full.index(f"{batch_fakes.mark_of(argv)}S1")] + f"{batch_fakes.mark_of(argv)}S1"
    made, _ = pueue_backend(cut)
    first, second, third = made.submit_batch(items("mqic_case_1", "mqic_case_2", "mqic_case_3"))
    assert first == 41
    for outcome, label in ((second, "mqic_case_2"), (third, "mqic_case_3")):
        assert type(outcome) is SubmitUncertain and f"looking for {label}" in str(outcome)


@pytest.mark.parametrize("failure", [Unreachable("host: no answer within 70s"),
                                     RemoteError(["sh", "-c", BATCH_SCRIPT], 137, "Killed")])
def test_a_call_that_failed_leaves_every_item_without_a_record_uncertain(failure):
    made, _ = pueue_backend(lambda argv: failure)
    outcomes = made.submit_batch(items("mqic_case_1", "mqic_case_2"))
    assert [type(o) for o in outcomes] == [SubmitUncertain, SubmitUncertain]
    said = str(outcomes[0])
    assert outcomes[0].__cause__ is failure and "mqic_case_1" in said and "item()" not in said and "\n" not in said


def test_a_batch_killed_midway_keeps_the_records_it_printed():
    def killed(argv):
        printed = by_item("41", "42")(argv)
        cut = printed[:printed.index(f"{batch_fakes.mark_of(argv)}S1")]
        return RemoteError(list(argv), 137, "", cut)
    made, _ = pueue_backend(killed)
    outcomes = made.submit_batch(items("mqic_case_1", "mqic_case_2"))
    assert outcomes[0] == 41 and type(outcomes[1]) is SubmitUncertain


def test_an_item_not_started_in_time_proves_nothing_was_sent_and_uses_no_attempt():
    def late(argv):
        return record(batch_fakes.mark_of(argv), 0, 0, "41") + record(batch_fakes.mark_of(argv), 1, NOT_STARTED_EXIT)
    made, _ = pueue_backend(late)
    first, second = made.submit_batch(items("mqic_case_1", "mqic_case_2"))
    assert first == 41 and type(second) is SchedulerOutage and not tasks.counts_as_attempt(second)
    assert str(second).startswith("pueue add not sent") and "\n" not in str(second)


def test_per_item_failures_are_typed_as_the_single_submit_types_them():
    lost = RemoteError(["sh"], 1, "Error: Failed to receive message from daemon\n")
    gone = RemoteError(["sh"], 1, "Error: Group gpu_c doesn't exists. Use one of these: [\"default\"]\n")
    made, _ = pueue_backend(by_item(lost, gone, "no id here"))
    outcomes = made.submit_batch(items("mqic_case_1", "mqic_case_2", "mqic_case_3"))
    assert [type(o) for o in outcomes] == [SubmitUncertain, SlotLost, BadOutput]


def test_an_item_printing_fake_records_still_gives_its_own_id():
    made, _ = pueue_backend(lambda argv: batch_fakes.run_items(
        argv, lambda item: record(OTHER_MARK, 1, 87, "999", "") + "S1 87\n41\n"))
    assert made.submit_batch(items("mqic_case_1", "mqic_case_2")) == [41, 41]


def test_a_bad_item_refuses_the_whole_batch_before_any_call():
    made, runner = pueue_backend(by_item("1", "2"))
    with pytest.raises(ValueError):
        made.submit_batch([*items("mqic_case_1"), *items("bad label")])
    assert runner.calls == []


def test_no_items_no_call_and_a_batch_too_long_for_one_command_line_is_refused():
    made, runner = pueue_backend(by_item())
    assert made.submit_batch([]) == [] and runner.calls == []
    huge = [SubmitItem("gpu_a", f"mqic_case_{i}", f"/r/{i}", "x" * 5000) for i in range(30)]
    with pytest.raises(ValueError, match="submit fewer at once"):
        made.submit_batch(huge)
    assert runner.calls == []


def test_every_backend_sends_a_batch_as_one_call_with_its_own_script_per_item():
    made_slurm = slurm.SlurmBackend(Runner(by_item("12", "13;cluster")), {"gpu_a": slurm.sp.SubmitSettings(
        partition="gpu")}, timeout=20)
    made_direct = direct.DirectBackend(Runner(by_item("3", "4")), "~/mqic", {"gpu_a": "0"}, timeout=20)
    for made, script, ids in ((made_slurm, slurm.SUBMIT_SCRIPT, [12, 13]), (made_direct, direct.SUBMIT_SCRIPT, [3, 4])):
        assert made.submit_batch(items("mqic_case_1", "mqic_case_2")) == ids
        [(argv, _)] = made.runner.calls
        assert [item[2] for item in batch_fakes.item_argvs(argv)] == [script, script]


def test_a_batch_script_is_a_backend_choice_and_the_words_say_whose():
    how = BatchScript(shell="sh", script="echo", words=pueue.WORDS, read_id=int, failure=lambda e, l, w: e)
    outcomes = run_batch(Runner(lambda argv: Unreachable("down")), how,
                         [ItemCall("mqic_case_1", "/w", ())], limit="5", timeout=5)
    assert "the task may have been made" in str(outcomes[0])
    assert common.batch_timeout(None, 3) is None and common.batch_timeout(20, 1) == 20


def test_batch_argv_counts_each_items_words():
    argv = batch_argv(MARK, "20", "bash", "script", [ItemCall("a", "/w", ("x", "")), ItemCall("b", "/w", ())])
    assert argv[4:] == [MARK, "20", "bash", "script", "2", "x", "", "0"]
    assert batch_fakes.item_argvs(argv) == [["bash", "-c", "script", "bash", "x", ""], ["bash", "-c", "script", "bash"]]


# -- the script itself, over the real sshd ----------------------------------------------------------

HOSTILE_WORDS = ("", " ", "new\nline", "'quote'", '"dq"', "$(touch pwned)", "`id`", "*", "-n", "--", MARK, "S1",
                 "유니코드")
FORGED = "~mqic-batch-0~S1~mqic-batch-0~~mqic-batch-0~5~mqic-batch-0~0~mqic-batch-0~"
ECHO_SCRIPT = r"""
for w; do printf '[%s]' "$w"; done
printf 'stderr of %s\n' "$#" >&2
printf '%s\n' "FORGED" "FORGED" >&2   # what a hostile command might print: records of its own
[ "$1" = fail ] && exit 87
exit 0
""".replace("FORGED", FORGED)


@pytest.mark.system
def test_the_script_passes_every_word_of_every_item_and_reads_back_whole(remote_config):
    remote = Remote(remote_config.hosts[0].hpc)
    seen = []
    how = BatchScript(shell="sh", script=ECHO_SCRIPT, words=pueue.WORDS,
                      read_id=lambda out: seen.append(out) or len(seen), failure=lambda error, label, workdir: error)
    calls = [ItemCall("a", "/w", HOSTILE_WORDS), ItemCall("b", "/w", ("fail", *HOSTILE_WORDS[:3])),
             ItemCall("c", "/w", ())]
    outcomes = run_batch(remote, how, calls, limit="20", timeout=20)
    expected = "".join(f"[{w}]" for w in HOSTILE_WORDS)
    assert outcomes[0] == 1 and seen[0] == expected and outcomes[2] == 2 and seen[1] == ""
    failed = outcomes[1]
    assert isinstance(failed, RemoteError) and failed.exit_code == 87 and failed.stderr.startswith("stderr of 4\n")
    assert failed.argv[4:] == ["fail", *HOSTILE_WORDS[:3]] and failed.stderr.count(FORGED) == 2


@pytest.mark.system
def test_no_item_starts_once_the_batch_has_used_its_limit(remote_config):
    remote = Remote(remote_config.hosts[0].hpc)
    script = r"""[ "$1" = slow ] && sleep 2; echo 7"""
    how = BatchScript(shell="sh", script=script, words=pueue.WORDS, read_id=int, failure=lambda e, l, w: e)
    calls = [ItemCall("a", "/w", ("slow",)), ItemCall("b", "/w", ("fast",))]
    first, second = run_batch(remote, how, calls, limit="1", timeout=20)
    assert first == 7 and type(second) is SchedulerOutage and second.exit_code == NOT_STARTED_EXIT
