"""The stand-in's quick client: ``pueue ...`` answered by the daemon itself.

Real pueue's client is a compiled program that answers in milliseconds. The stand-in's full
client (``pueue_standin.py``) is a Python file of 2,000 lines whose start alone took ~75 ms, more
than most of what a benchmark measures, so every ``add`` and every poll was charged that much.
This file imports only what it needs to talk to the daemon: it sends its words, working
directory and environment, and the daemon reads them exactly as the full client would
(``pueue_standin.client_request``) and sends back what to print.

It hands over to the full client when the daemon cannot be reached (which then prints pueue's
own error, or answers ``--version`` alone) and when the daemon says so (a chaos control is
pending for this call). Once its request is sent it never hands over: the daemon may have acted.
"""
from __future__ import annotations

import json
import os
import pwd
import socket
import sys

STANDIN_ENV = "PUEUE_STANDIN_DIR"
FULL_CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pueue_standin.py")
_DIR_FDS: dict[str, int] = {}


def socket_path(root: str) -> str:
    """The daemon's socket in the data directory ``root`` (one per user, like pueue's)."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = os.environ.get("USER", "user")
    return os.path.join(root, f"pueue_{user}.socket")


def unix_address(path: str) -> str:
    """An address for ``path`` that fits AF_UNIX's 108 bytes (via /proc/self/fd if needed)."""
    text = str(path)
    if len(text.encode()) < 100:
        return text
    parent, name = os.path.split(text)
    if parent not in _DIR_FDS:
        _DIR_FDS[parent] = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{_DIR_FDS[parent]}/{name}"


def ask(root: str, argv: list[str]) -> dict | None:
    """The daemon's answer to these words; None when it could not be reached or hands them back."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(unix_address(socket_path(root)))
    except OSError:
        sock.close()
        return None
    with sock:
        sock.settimeout(60)
        request = {"cmd": "client", "argv": argv, "cwd": _cwd(), "env": dict(os.environ)}
        sock.sendall(json.dumps(request).encode())
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    reply = json.loads(b"".join(chunks) or b"null")
    if reply is None:
        raise ConnectionError("the daemon closed the connection without an answer")
    return None if reply.get("delegate") else reply


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None  # removed under us: the daemon answers as the full client would


def main(argv: list[str]) -> int:
    root = os.environ.get(STANDIN_ENV, "")
    if root:
        try:
            reply = ask(root, argv)
        except (OSError, ValueError) as err:  # sent, then no answer: never ask twice
            return _failed_exchange(err)
        if reply is not None:
            sys.stdout.write(reply["stdout"])
            sys.stdout.flush()
            sys.stderr.write(reply["stderr"])
            return reply["exit"]
    os.execv(sys.executable, [sys.executable, FULL_CLIENT, *argv])
    return 127  # not reached


def _failed_exchange(err: Exception) -> int:
    """What the full client prints when the daemon took the request but no answer came back."""
    sys.path.insert(0, os.path.dirname(FULL_CLIENT))
    import pueue_standin as full  # the rare path may pay the full import

    fmt = full.load_settings(full.paths_from_env()).format
    sys.stderr.write(full.client_error_text(fmt, ["Failed to receive message from daemon", str(err)],
                                            "pueue_lib/src/network/protocol.rs:91"))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
