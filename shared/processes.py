"""Local processes (standard library only: ``shared.share_child`` imports it and must start fast)."""
from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while a process with this id exists (one of another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
