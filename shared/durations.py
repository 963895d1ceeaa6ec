"""Durations in words for messages and notices: ``45 s``, ``12 min``, ``3 h``, ``2.5 d``.

Settings such as ``retention.*_days`` and ``notify.unreachable_after_minutes`` accept
fractions, so a duration may be seconds long: it is never printed as ``0.0 d`` or ``0 min``.
"""
from __future__ import annotations


def in_words(seconds: float) -> str:
    """The duration in the largest unit that keeps it at least 1 (seconds, minutes, hours, days)."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return _trim(seconds / 3600) + " h"
    return _trim(seconds / 86400) + " d"


def _trim(value: float) -> str:
    """One decimal below 10 (``2.5``), none above (``36``); no trailing ``.0``."""
    text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
    return text[:-2] if text.endswith(".0") else text
