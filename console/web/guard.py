"""Who may act from the browser: the operators' token, the sign-in cookie and the cross-site checks.

Nothing here reads the database. The token lives in ``web.token_file`` (mode 0600, never in
config.yaml); the sign-in cookie and each form's CSRF field are HMACs of it, so nothing is kept
in memory between requests and a restart does not sign anyone out.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shared.config import WebConfig
from shared.errors import MqicError

COOKIE = "mqic_auth"
SIGN_IN_SECONDS = 12 * 3600
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class TokenFileError(MqicError):
    """``web.token_file`` is missing, empty, or readable by others: the program refuses to start."""


def read_token(path: Path) -> str:
    """The token in ``path``; TokenFileError unless the file is ours, a regular file and mode 0600.
    The checks are made on the opened file (O_NOFOLLOW), so a swap after them cannot slip in."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TokenFileError(f"web.token_file {path}: not found (create it: "
                             f"umask 077; openssl rand -hex 32 > {path})") from None
    except OSError:  # ELOOP: a symbolic link
        raise TokenFileError(f"web.token_file {path}: expected a regular file (not a link or folder)") from None
    try:
        check_token_file(path, os.fstat(fd))
    except TokenFileError:
        os.close(fd)
        raise
    with os.fdopen(fd, encoding="utf-8") as file:
        token = file.read().strip()
    if len(token) < 16:
        raise TokenFileError(f"web.token_file {path}: the token is shorter than 16 characters")
    return token


def check_token_file(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise TokenFileError(f"web.token_file {path}: expected a regular file (not a link or folder)")
    if stat.S_IMODE(info.st_mode) != 0o600 or info.st_uid != os.getuid():
        raise TokenFileError(f"web.token_file {path}: mode {stat.S_IMODE(info.st_mode):04o}, owner uid "
                             f"{info.st_uid}; expected mode 0600 and owned by us (chmod 600 {path})")


@dataclass(frozen=True)
class Guard:
    """The action policy of one running program: ``token`` None means read-only."""
    token: str | None
    allowed_hosts: frozenset[str]
    reason: str  # why actions are off (shown on the page); "" when they are on

    @property
    def actions(self) -> bool:
        return self.token is not None

    def _mac(self, purpose: str, value: str) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def token_matches(self, given: str | None) -> bool:
        return self.token is not None and given is not None and same_text(given.strip(), self.token)

    def new_cookie(self, now: float) -> str:
        nonce = f"{int(now)}-{secrets.token_hex(16)}"
        return f"{nonce}.{self._mac('auth', nonce)}"

    def signed_in(self, cookie: str | None, now: float) -> str | None:
        """The nonce of a valid, unexpired sign-in cookie, else None."""
        if self.token is None or not cookie or "." not in cookie:
            return None
        nonce, mac = cookie.rsplit(".", 1)
        issued = nonce.split("-", 1)[0]
        stamp = whole_number(issued)
        if stamp is None or not 0 <= now - stamp <= SIGN_IN_SECONDS:
            return None
        return nonce if same_text(mac, self._mac("auth", nonce)) else None

    def csrf_for(self, nonce: str) -> str:
        return self._mac("csrf", nonce)[:40]

    def csrf_matches(self, nonce: str, given: str | None) -> bool:
        return given is not None and same_text(given, self.csrf_for(nonce))

    def host_allowed(self, host_header: str) -> bool:
        """The Host header names this server (a DNS-rebinding page's Host is the attacker's name)."""
        return host_name(host_header) in self.allowed_hosts

    @staticmethod
    def same_origin(origin: str | None, referer: str | None, host_header: str) -> bool:
        """The request comes from one of our own pages: its Origin (or, without one, its Referer)
        names the host it was sent to. A form posted from another site fails this."""
        source = origin if origin and origin != "null" else referer
        try:
            return bool(source) and urlsplit(source).netloc.lower() == host_header.lower()
        except ValueError:  # a malformed address, such as an unclosed "[": not ours
            return False


def whole_number(text: str, high: int = 2**62) -> int | None:
    """``text`` as a whole number from 0 to ``high``, else None. Only ASCII digits (``int()``
    also reads "²" as a digit and fails on it), and few of them: ``int()`` refuses more than
    4,300 digits, and a bigger number than ``high`` cannot be meant."""
    if text.isascii() and text.isdigit() and len(text) <= len(str(high)) and int(text) <= high:
        return int(text)
    return None


def same_text(given: str, expected: str) -> bool:
    """A constant-time comparison that also takes what a client sends outside ASCII (as bytes;
    ``hmac.compare_digest`` refuses non-ASCII ``str``)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def host_name(host_header: str) -> str:
    """The lower-case name in a Host header; "" when it is malformed."""
    try:
        return (urlsplit(f"//{host_header}").hostname or "").lower()
    except ValueError:
        return ""


def guard_for(web: WebConfig) -> Guard:
    """The policy ``web`` asks for; TokenFileError when actions are on and the token file is unsafe."""
    allowed = frozenset({web.host.lower(), *LOOPBACK_NAMES, *web.allowed_hosts})
    if not web.actions:
        reason = ("read-only: this page is reachable from the network and no token is configured"
                  if not web.loopback else "read-only: actions are off (web.actions: false)")
        return Guard(token=None, allowed_hosts=allowed, reason=reason)
    assert web.token_file is not None  # the config refuses actions without a token file
    return Guard(token=read_token(web.token_file), allowed_hosts=allowed, reason="")
