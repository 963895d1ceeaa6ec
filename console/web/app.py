"""The dashboard's pages and JSON API (Flask): overview, cases, a case, plots, and guarded actions.

Pages are rendered on the server by Jinja2 with autoescaping, so every name, log line and error
text from the drop folder or the HPC is shown as text, and read-only content works without
JavaScript. ``static/app.js`` (no inline script: the Content-Security-Policy forbids it) swaps the
``data-live`` parts for fresh copies every ``web.refresh_seconds``.
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

from flask import Flask, Response, abort, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from shared import queries
from shared.config import Config
from shared.priority import PRIORITIES
from console.top import format_age, format_time
from console.web import operations
from console.web.guard import COOKIE, Guard, whole_number
from console.web.reader import Reader

HERE = Path(__file__).resolve().parent
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none';"
       " base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
FILTER_KEYS = ("q", "status", "host", "priority", "outcome", "review", "sort", "cursor", "limit")
MAX_LIMIT = 500
CASE_ID = f"<int(max={2**63 - 1}):case_id>"  # a larger number is no case: SQLite cannot even compare it


class BadParameter(Exception):
    """A query parameter the page cannot use: answered 400 with this message."""


def create_app(config: Config, guard: Guard, *, clock: Callable[[], float] = time.time) -> Flask:
    """The WSGI application (served by waitress in ``console.web.server``; tests use its test client)."""
    app = Flask(__name__, template_folder=str(HERE / "templates"), static_folder=str(HERE / "static"))
    app.config.update(SEND_FILE_MAX_AGE_DEFAULT=300)
    reader = Reader(config, clock)
    app.extensions["mqic"] = {"config": config, "guard": guard, "reader": reader, "clock": clock}
    install_filters(app, config)
    install_hooks(app, config, guard, clock)
    install_pages(app, config, reader, guard)
    install_api(app, reader)
    operations.install(app, config, guard, reader, clock)
    return app


# -- formatting -------------------------------------------------------------------------------------

def install_filters(app: Flask, config: Config) -> None:
    """The same time and duration words as ``mqic-top``, in the configured zone."""
    tz = config.tz
    app.add_template_filter(lambda stamp, full=False: format_time(stamp, tz, full=full), "when")
    app.add_template_filter(format_age, "age")
    app.add_template_global(tz.key, "tz_name")


# -- headers, errors --------------------------------------------------------------------------------

def install_hooks(app: Flask, config: Config, guard: Guard, clock: Callable[[], float]) -> None:
    @app.before_request
    def known_host() -> None:
        # A page on another site that rebinds its own name to this address (DNS rebinding)
        # reaches us with its name in Host: it must not read case names, nor act.
        if not guard.host_allowed(request.host):
            abort(403, f"host {request.host!r} is not one of this server's names (web.allowed_hosts)")

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        if not request.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.context_processor
    def page_globals() -> dict[str, Any]:
        nonce = guard.signed_in(request.cookies.get(COOKIE), clock())
        return {"guard": guard, "signed_in": nonce is not None,
                "csrf": guard.csrf_for(nonce) if nonce else "", "refresh": config.web.refresh_seconds,
                "now": clock()}

    @app.errorhandler(BadParameter)
    def bad_parameter(exc: BadParameter):
        return answer_error(400, str(exc))

    @app.errorhandler(sqlite3.Error)
    def database_error(exc: sqlite3.Error):
        return answer_error(503, f"the database cannot be read right now ({exc}); this page tries again")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return answer_error(exc.code or 500, exc.description or exc.name)


def wants_json() -> bool:
    return request.path.startswith("/api/")


def answer_error(code: int, message: str):
    if wants_json():
        return jsonify({"error": message}), code
    return render_template("error.html", code=code, message=message), code


# -- pages ------------------------------------------------------------------------------------------

def install_pages(app: Flask, config: Config, reader: Reader, guard: Guard) -> None:
    host_names = [h.name for h in config.hosts]

    @app.get("/")
    def overview_page():
        return render_template("overview.html", **reader.overview(), host_names=host_names)

    @app.get("/part/overview")
    def overview_part():
        # The live part holds nothing per browser, so every poller gets the same rendered copy.
        return reader.cache.get("overview.html", lambda: render_template("_overview.html", **reader.overview()))

    @app.get("/cases")
    def cases_page():
        wanted = case_filter(request.args)
        page = reader.cases(wanted)
        next_url = None
        if page.next_cursor is not None:
            args = {k: v for k, v in request.args.items() if k != "cursor"}
            next_url = "/cases?" + urlencode({**args, "cursor": page.next_cursor})
        return render_template("cases.html", page=page, wanted=wanted, host_names=host_names,
                               statuses=queries.STATUSES, priorities=PRIORITIES, outcomes=queries.OUTCOMES, next_url=next_url,
                               count_cap=queries.COUNT_CAP)

    @app.get(f"/cases/{CASE_ID}")
    def case_page(case_id: int):
        data = reader.case(case_id) or abort(404, f"case {case_id} not found")
        return render_template("case.html", **data)

    @app.get(f"/part/cases/{CASE_ID}")
    def case_part(case_id: int):
        def render() -> str:
            data = reader.case(case_id) or abort(404, f"case {case_id} not found")
            return render_template("_case.html", **data)
        return reader.cache.get(("case.html", case_id), render)

    @app.get("/plots")
    def plots_page():
        return render_template("plots.html", plots=reader.plots())


# -- JSON API ---------------------------------------------------------------------------------------

def install_api(app: Flask, reader: Reader) -> None:
    @app.get("/api/health")
    def api_health():
        health = reader.health()
        return jsonify(health), 200 if health["healthy"] else 503

    @app.get("/api/overview")
    def api_overview():
        data = reader.overview()
        view: queries.Overview = data["view"]
        return jsonify({"now": view.now, "totals": view.totals, "health": queries.to_jsonable(view.health),
                        "hosts": queries.to_jsonable(view.hosts), "slots": queries.to_jsonable(view.slots),
                        "workers": queries.to_jsonable(view.workers), "recent": queries.to_jsonable(view.recent),
                        "attention": queries.to_jsonable(data["attention"]),
                        "etas": {str(k): queries.to_jsonable(v) for k, v in data["etas"].items()}})

    @app.get("/api/cases")
    def api_cases():
        page = reader.cases(case_filter(request.args))
        return jsonify({"cases": queries.to_jsonable(page.cases), "matching": page.matching,
                        "matching_capped": page.matching > queries.COUNT_CAP, "next_cursor": page.next_cursor})

    @app.get(f"/api/cases/{CASE_ID}")
    def api_case(case_id: int):
        data = reader.case(case_id) or abort(404, f"case {case_id} not found")
        return jsonify({"case": queries.case_record(data["case"]), "events": data["events"],
                        "attempts": data["attempts"], "eta": queries.to_jsonable(data["eta"]),
                        "folders": data["folders"], "checksums": dict(data["checksums"])})


# -- query parameters -------------------------------------------------------------------------------

def case_filter(args: Any) -> queries.CaseFilter:
    """The listing ``args`` ask for; BadParameter (400) naming the parameter when one is wrong."""
    unknown = sorted(set(args) - set(FILTER_KEYS))
    if unknown:
        raise BadParameter(f"unknown parameter {unknown[0]!r} (known: {', '.join(FILTER_KEYS)})")
    repeated = sorted(key for key in set(args) if len(args.getlist(key)) > 1)
    if repeated:
        raise BadParameter(f"{repeated[0]}: given more than once (one value each)")
    text = args.get("q", "")
    for key in ("q", "host"):
        if len(args.get(key, "")) > 200:
            raise BadParameter(f"{key}: longer than 200 characters")
    return queries.CaseFilter(
        text=text, status=one_of(args, "status", queries.STATUSES), host=args.get("host") or None,
        priority=one_of(args, "priority", PRIORITIES), outcome=one_of(args, "outcome", queries.OUTCOMES),
        review={None: None, "yes": True, "no": False}[one_of(args, "review", ("yes", "no"))],
        sort=one_of(args, "sort", queries.SORTS) or "newest", cursor=number(args, "cursor", 1, 2**62),
        limit=number(args, "limit", 1, MAX_LIMIT) or 50)


def one_of(args: Any, key: str, allowed: tuple[str, ...]) -> str | None:
    value = args.get(key) or None
    if value is not None and value not in allowed:
        raise BadParameter(f"{key}: got {value!r}, expected one of {', '.join(allowed)}")
    return value


def number(args: Any, key: str, low: int, high: int) -> int | None:
    value = args.get(key) or None
    if value is None:
        return None
    found = whole_number(value, high)
    if found is None or found < low:
        raise BadParameter(f"{key}: got {value[:40]!r}, expected a whole number from {low} to {high}")
    return found
