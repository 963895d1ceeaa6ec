"""Operator actions from the browser or a script: retry, cancel, acknowledge, priority, drain, resume.

Off unless ``web.actions`` is on (then ``web.token_file`` holds the token). A browser signs in
once with the token (an HttpOnly, SameSite=Strict cookie) and each form carries a CSRF field
derived from it; a script sends ``Authorization: Bearer <token>`` instead. Every action is a POST
whose Host names this server and whose Origin (or Referer) is this server, and it goes through
the same guarded operations as ``mqic`` (``shared.actions``, ``shared.priority``,
``shared.maintenance``), recorded as ``web:<client address>``.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Callable

from flask import Flask, abort, jsonify, make_response, redirect, render_template, request

from shared import actions, maintenance
from shared.config import Config
from shared.db import connect
from shared.doorbell import ring
from shared.errors import MqicError
from shared.priority import set_priority
from shared.spool import Spool
from console.web.guard import COOKIE, SIGN_IN_SECONDS, Guard, whole_number
from console.web.reader import Reader

CASE_ACTIONS = ("retry", "cancel", "ack", "priority")
HOST_ACTIONS = ("drain", "resume")


class Refused(Exception):
    """The action was not done; the message says why (answered 409)."""


def install(app: Flask, config: Config, guard: Guard, reader: Reader, clock: Callable[[], float]) -> None:
    @app.post("/login")
    def login():
        check_request(guard, bearer_allowed=False)
        if not guard.token_matches(request.form.get("token")):
            abort(403, "wrong token")
        response = make_response(redirect(safe_back(request.form.get("back")), code=303))
        response.set_cookie(COOKIE, guard.new_cookie(clock()), max_age=SIGN_IN_SECONDS, httponly=True,
                            samesite="Strict", secure=request.is_secure, path="/")
        return response

    @app.post("/logout")
    def logout():
        check_request(guard, bearer_allowed=False)
        response = make_response(redirect("/", code=303))
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.post("/action/<name>")
    def form_action(name: str):
        who = authorise(guard, clock, form=True)
        message, code = run(config, reader, name, request.form, who, clock())
        return render_template("done.html", message=message, ok=code == 200,
                               back=safe_back(request.form.get("back"))), code

    @app.post("/api/actions/<name>")
    def api_action(name: str):
        who = authorise(guard, clock, form=False)
        fields = request.get_json(silent=True) if request.is_json else request.form
        if fields is not None and not hasattr(fields, "get"):
            abort(400, "the body must be a JSON object or a form, such as {\"case_id\": 12}")
        message, code = run(config, reader, name, fields or {}, who, clock())
        return jsonify({"ok": code == 200, "message": message}), code


def check_request(guard: Guard, *, bearer_allowed: bool) -> None:
    """403 unless actions are on and (for a browser) the request came from our page (the Host
    was checked for every request)."""
    if not guard.actions:
        abort(403, f"actions are not allowed here ({guard.reason})")
    if bearer_allowed and bearer() is not None:
        return  # a browser cannot send this header cross-site without our consent (no CORS)
    if not guard.same_origin(request.headers.get("Origin"), request.headers.get("Referer"), request.host):
        abort(403, "cross-site request refused (its Origin is not this server)")


def bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:] if header.startswith("Bearer ") else None


def authorise(guard: Guard, clock: Callable[[], float], *, form: bool) -> str:
    """Who acts (``web:<address>``), or 403: a valid token, or a sign-in cookie plus its CSRF field."""
    check_request(guard, bearer_allowed=not form)
    if not form:
        if not guard.token_matches(bearer()):
            abort(403, "missing or wrong token (send Authorization: Bearer <token>)")
    else:
        nonce = guard.signed_in(request.cookies.get(COOKIE), clock())
        if nonce is None:
            abort(403, "sign in with the operators' token first")
        if not guard.csrf_matches(nonce, request.form.get("csrf")):
            abort(403, "the form's CSRF field is missing or wrong; reload the page and try again")
    return f"web:{request.remote_addr}"


def safe_back(value: str | None) -> str:
    """A local path to return to (never another site). Only visible ASCII: browsers drop a tab
    or newline from a link, so "/<tab>/evil.example" would be "//evil.example", another site."""
    if value and value.startswith("/") and not value.startswith("//") and \
            all(" " < ch < "\x7f" and ch != "\\" for ch in value):
        return value
    return "/"


def run(config: Config, reader: Reader, name: str, fields: Any, who: str, now: float) -> tuple[str, int]:
    """Do action ``name``; (what happened, HTTP status)."""
    if name not in CASE_ACTIONS + HOST_ACTIONS:
        abort(404, f"no action {name!r} (known: {', '.join(CASE_ACTIONS + HOST_ACTIONS)})")
    conn = connect(Path(config.database_path), migrate=False)
    try:
        if name in CASE_ACTIONS:
            message = case_action(config, conn, name, case_id_of(fields), fields, who, now)
        else:
            message = host_action(config, conn, name, fields, who, now)
    except (Refused, MqicError) as exc:
        return f"refused: {exc}", 409
    finally:
        conn.close()
    reader.cache.clear()
    return message, 200


def case_id_of(fields: Any) -> int:
    value = str(fields.get("case_id", ""))
    case_id = whole_number(value)
    if case_id is None:
        abort(400, f"case_id: got {value[:40]!r}, expected a case number")
    return case_id


def case_action(config: Config, conn: sqlite3.Connection, name: str, case_id: int, fields: Any, who: str,
                now: float) -> str:
    op = actions.Operator(conn, config, who)
    if name == "retry":
        (_, outcome), = actions.retry(op, [case_id], now=now)
        if outcome.startswith("refused"):
            raise Refused(outcome.removeprefix("refused: "))
        return f"case {case_id}: {outcome}"
    if name == "cancel":
        case, stopped = actions.cancel(op, case_id, now=now)
        return f"case {case_id} cancelled (was {case.status.value}); {stopped}"
    if name == "ack":
        _, cleared, acknowledged = actions.acknowledge(op, case_id, now=now)
        done = [text for flag, text in ((cleared, "review flag cleared"), (acknowledged, "failure acknowledged")) if flag]
        return f"case {case_id}: {' and '.join(done)}"
    priority = str(fields.get("priority", ""))
    case = set_priority(conn, case_id, priority, now=now, worker=who)
    return f"case {case_id}: priority {case.priority}"


def host_action(config: Config, conn: sqlite3.Connection, name: str, fields: Any, who: str, now: float) -> str:
    host = maintenance.check_host(config, str(fields.get("host", "")) or None)
    if name == "drain":
        reason = str(fields.get("reason", ""))[:200]
        new = maintenance.drain(conn, host, now=now, by=who, reason=reason)
        return f"host {host}: {'drained' if new else 'already drained'}; no new claims there"
    ended = maintenance.resume(conn, host)
    if ended is None:
        return f"host {host}: was not drained"
    ring(Spool(config.spool_path).ensure().root, "submitter")
    return f"host {host}: resumed"
