"""``mqic service``: run supervisord (and so every worker) as a systemd service, and back up daily.

Three units, rendered here from the install's own paths (one place for their text):

- ``mqic.service`` starts ``supervisord -n -c supervisord.conf`` at boot as an unprivileged user,
  restarts it if it dies, and stops it with SIGTERM, which supervisord passes on so each worker
  finishes the step in hand (``TimeoutStopSec`` exceeds the longest ``stopwaitsecs``);
- ``mqic-backup.service`` + ``mqic-backup.timer`` run ``mqic backup --keep N`` every day
  (``Persistent``: a day missed while the machine was off runs at the next boot).

A system install (as root) writes to ``/etc/systemd/system`` with ``User=``; ``--user`` writes
to ``~/.config/systemd/user`` for the account itself (boot start then needs
``loginctl enable-linger``). Nothing is enabled behind the operator's back: the commands to
enable and start are printed.
"""
from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SYSTEM_DIR = Path("/etc/systemd/system")
UNITS = ("mqic.service", "mqic-backup.service", "mqic-backup.timer")
STOP_MARGIN_SECONDS = 60


@dataclass(frozen=True)
class Install:
    """What the units need to know about this install."""
    project: Path  # the folder holding supervisord.conf
    venv: Path
    config: Path
    user: str | None  # None: a --user install (the account running systemd --user)
    keep: int = 14

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def longest_stop_wait(supervisord_conf: Path) -> int:
    """The largest ``stopwaitsecs`` in supervisord.conf: how long a clean stop may take."""
    waits = [int(w) for w in re.findall(r"^stopwaitsecs\s*=\s*(\d+)", supervisord_conf.read_text(), re.M)]
    return max(waits, default=10)


def quoted(*words: str) -> str:
    """A systemd command line: each word in double quotes (systemd's own quoting, not a shell's)."""
    return " ".join('"' + w.replace("\\", "\\\\").replace('"', '\\"') + '"' for w in words)


def main_unit(install: Install) -> str:
    conf = str(install.project / "supervisord.conf")
    stop = longest_stop_wait(install.project / "supervisord.conf") + STOP_MARGIN_SECONDS
    user = f"User={install.user}\n" if install.user else ""
    return f"""[Unit]
Description=MQI Communicator (supervisord with the scanner, submitter, poller, reaper, exporter and web dashboard)
Documentation=file://{install.project / 'README.md'}
After=network-online.target remote-fs.target
Wants=network-online.target

[Service]
Type=simple
{user}WorkingDirectory={install.project}
Environment={quoted("MQIC_CONFIG=" + str(install.config))}
ExecStartPre={quoted(shutil.which("mkdir") or "/bin/mkdir", "-p", str(install.project / "run"),
                     str(install.project / "logs"))}
ExecStart={quoted(install.bin("supervisord"), "-n", "-c", conf)}
Restart=on-failure
RestartSec=5
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={stop}

[Install]
WantedBy={"multi-user.target" if install.user else "default.target"}
"""


def backup_unit(install: Install) -> str:
    user = f"User={install.user}\n" if install.user else ""
    return f"""[Unit]
Description=MQI Communicator database backup (keeps the newest {install.keep})

[Service]
Type=oneshot
{user}WorkingDirectory={install.project}
ExecStart={quoted(install.bin("mqic"), "--config", str(install.config), "backup", "--keep", str(install.keep))}
"""


def backup_timer() -> str:
    return """[Unit]
Description=Daily MQI Communicator database backup

[Timer]
OnCalendar=daily
RandomizedDelaySec=15min
Persistent=true

[Install]
WantedBy=timers.target
"""


def render(install: Install) -> dict[str, str]:
    """Unit file name -> its text."""
    return {"mqic.service": main_unit(install), "mqic-backup.service": backup_unit(install),
            "mqic-backup.timer": backup_timer()}


def unit_dir(user_mode: bool) -> Path:
    if user_mode:
        return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "systemd" / "user"
    return SYSTEM_DIR


def check_user(name: str) -> None:
    """Refuse an account that does not exist or is root: the workers need no privilege."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"user {name!r} does not exist; create it first (the account that owns the ssh key)")
    if entry.pw_uid == 0:
        raise ValueError("refusing to run MQI Communicator as root: name the unprivileged account with --as USER")


def write_units(install: Install, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render(install).items():
        path = folder / name
        path.write_text(text)
        path.chmod(0o644)
        written.append(path)
    return written


def next_steps(user_mode: bool, user: str | None) -> list[str]:
    ctl = "systemctl --user" if user_mode else "systemctl"
    steps = [f"{ctl} daemon-reload", f"{ctl} enable --now mqic.service mqic-backup.timer"]
    if user_mode:
        steps.append(f"loginctl enable-linger {shlex.quote(user or pwd.getpwuid(os.getuid()).pw_name)}"
                     "   # start at boot without a login")
    return steps


def systemctl_state(unit: str, user_mode: bool) -> str:
    """``enabled/active`` as systemctl says, or why it cannot tell."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return "systemctl not found"
    base = [systemctl, "--user"] if user_mode else [systemctl]
    states = []
    for verb in ("is-enabled", "is-active"):
        try:
            result = subprocess.run([*base, verb, unit], capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return "systemctl did not answer"
        answer = (result.stdout.strip() or result.stderr.strip()).splitlines()
        states.append(answer[0] if answer else f"exit {result.returncode}")
    return "/".join(states)


def status_lines(install_project: Path, user_mode: bool) -> list[str]:
    folder = unit_dir(user_mode)
    lines = []
    for name in UNITS:
        path = folder / name
        if not path.exists():
            lines.append(f"{name}: not installed in {folder} (mqic service install{' --user' if user_mode else ''})")
            continue
        lines.append(f"{name}: {path} ({systemctl_state(name, user_mode)})")
    conf = install_project / "supervisord.conf"
    venv_bin = Path(sys.prefix) / "bin"
    result = subprocess.run([str(venv_bin / "supervisorctl"), "-c", str(conf), "status"], capture_output=True,
                            text=True, timeout=30)
    lines.append("supervisord: " + (result.stdout.strip().replace("\n", "\n  ") or result.stderr.strip()
                                    or f"supervisorctl exit {result.returncode}"))
    return lines
