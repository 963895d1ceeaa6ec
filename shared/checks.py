"""What ``mqic doctor`` prints: one ``Check`` per line, with the fix when it fails.

The checks of a scheduler live with its backend (each registry entry's ``doctor_checks``);
``console.cli`` runs them beside its own, so both build their lines from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from shared.errors import RemoteFailure


@dataclass(frozen=True)
class Check:
    """One line of the doctor: what was checked, whether it is fine, and how to fix it."""

    name: str
    ok: bool
    detail: str
    hint: str = ""
    warn: bool = False  # ok, but worth changing: never fails the doctor
    host: str | None = None  # the configured host it checked (None: a check of this workstation)

    def line(self) -> str:
        label = "FAIL" if not self.ok else ("WARN" if self.warn else "OK  ")
        text = f"{label} {self.name}: {self.detail}" + (f" (host {self.host})" if self.host is not None else "")
        return text if (self.ok and not self.warn) or not self.hint else f"{text} -> fix: {self.hint}"


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (ssh errors span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def attempt(name: str, action: Callable[[], str], hint: str) -> Check:
    """``action()``'s text as a passing check, or its remote (or local) failure with ``hint``."""
    try:
        return Check(name, True, action())
    except (RemoteFailure, OSError) as exc:
        return Check(name, False, one_line(exc), hint)


def setting(config, host, key: str, section: str = "hpc") -> str:
    """How a hint names a host's setting: ``hpc.KEY`` with one host, else ``KEY of host NAME``."""
    return f"{section}.{key}" if len(config.hosts) == 1 else f"{key} of host {host.name}"
