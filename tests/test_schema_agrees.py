"""The schema's CHECK lists (shared/db.py, frozen in released migrations) name exactly the states of shared/states.py."""
from __future__ import annotations

import re
from pathlib import Path

from shared import db, spool
from shared.priority import PRIORITIES
from shared.states import CaseStatus, Outcome, SlotStatus, sql_list


def names(sql_list_text: str) -> set[str]:
    return set(re.findall(r"'([a-z_]+)'", sql_list_text))


def test_the_schema_lists_every_case_status_slot_status_outcome_and_stage():
    assert names(db.CASE_STATUSES) == {s.value for s in CaseStatus}
    assert names(db.SLOT_STATUSES) == {s.value for s in SlotStatus}
    assert names(db.OUTCOMES) == {o.value for o in Outcome}
    assert names(db.STAGES) == {"incoming", *spool.STAGES}


def test_the_schema_maps_each_status_to_the_spool_stage_the_spool_keeps_it_in():
    pairs = dict(re.findall(r"WHEN '([a-z]+)' THEN '([a-z]+)'", db.STAGE_MISMATCH))
    otherwise = re.search(r"ELSE '([a-z]+)'", db.STAGE_MISMATCH)[1]
    assert {s: pairs.get(s.value, otherwise) for s in CaseStatus} == {s: spool.stage_for(s) for s in CaseStatus}


def test_the_priority_check_names_every_priority():
    assert names(re.search(r"priority IN \(([^)]*)\)", "\n".join(db.MIGRATIONS))[1]) == set(PRIORITIES)


def test_status_literals_for_sql_are_the_quoted_values():
    assert CaseStatus.COMPLETED.sql == "'completed'"
    assert sql_list(CaseStatus.RUNNING, SlotStatus.ZOMBIE) == "'running', 'zombie'"


STATUS_LITERAL = re.compile(r"status\s*(?:=|<>|IN\s*\()[^\n]*'(?:%s)'" % "|".join(
    [s.value for s in CaseStatus] + [s.value for s in SlotStatus]))


def test_no_query_outside_the_schema_spells_a_status_name():
    """Queries take status names from states.py (``.sql``, ``sql_list``); only db.py's frozen migrations spell them."""
    root = Path(__file__).resolve().parents[1]
    spelled = [f"{path.relative_to(root)}:{number}" for folder in ("shared", "workers", "console")
               for path in sorted((root / folder).rglob("*.py")) if path.name != "db.py"
               for number, line in enumerate(path.read_text().splitlines(), 1) if STATUS_LITERAL.search(line)]
    assert spelled == []
