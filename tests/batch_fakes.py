"""Fake answers to a submit batch (``shared.backends.common.BATCH_SCRIPT``), built in Python.

A fake runner that answers one call at a time hands a batch to ``run_items``: each item is
run as the call of its own it would have been before batches (the same argv), and its
stdout or ``RemoteError`` becomes its record in the batch's answer. Any other failure is the
call's own (an ``Unreachable`` loses the whole answer).
"""
from __future__ import annotations

from typing import Callable, Sequence

from shared.backends.common import BATCH_SCRIPT, EXEC_ITEM
from shared.errors import RemoteError

# ["sh", "-c", BATCH_SCRIPT, "sh", mark, limit, shell, script, n, words..., n, words...]
_HEAD = 8


def is_batch(argv: Sequence[str]) -> bool:
    return len(argv) > 2 and argv[2] == BATCH_SCRIPT


def mark_of(argv: Sequence[str]) -> str:
    return argv[4]


def item_argvs(argv: Sequence[str]) -> list[list[str]]:
    """Each item's argv, as a call of its own: ``[shell, "-c", script, shell, *words]``, or the
    words alone for an item that only runs them (``EXEC_ITEM``: ``run_each``)."""
    shell, script = argv[6], argv[7]
    rest, items = list(argv[_HEAD:]), []
    while rest:
        count, rest = int(rest[0]), rest[1:]
        words = rest[:count]
        items.append(words if script == EXEC_ITEM else [shell, "-c", script, shell, *words])
        rest = rest[count:]
    return items


def record(mark: str, index: int, code: int, stdout: str = "", stderr: str = "") -> str:
    """One item's record, as BATCH_SCRIPT prints it (its stdout without trailing newlines)."""
    return f"{mark}S{index}{mark}{stderr}{mark}{stdout.rstrip(chr(10))}{mark}{code}{mark}\n"


def run_items(argv: Sequence[str], run_one: Callable[[list[str]], str]) -> str:
    """The batch's answer when each item's own call is ``run_one(item argv)``."""
    mark, answer = mark_of(argv), []
    for index, item in enumerate(item_argvs(argv)):
        try:
            answer.append(record(mark, index, 0, run_one(item)))
        except RemoteError as error:
            answer.append(record(mark, index, error.exit_code, error.stdout, error.stderr))
    return "".join(answer)
