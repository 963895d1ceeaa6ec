"""The web dashboard through Flask's test client, on a real SQLite file seeded by the real store calls."""
from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest

from shared.config import WebConfig
from shared.db import connect
from shared.errors import ConfigError
from shared.liveness import note_remote
from shared.states import CaseStatus
from shared.store import get_case, register_case
from tests.conftest import cli, make_config
from tests.test_console import seed
from console.web.app import create_app
from console.web.guard import TokenFileError, guard_for, read_token

HOSTILE = "<img src=x onerror=alert(1)>"
TOKEN = "s3cret-operator-token-0123456789"
ORIGIN = "http://localhost"


def app_for(config):
    return create_app(config, guard_for(config.web)).test_client()


@pytest.fixture
def world(tmp_path):
    config = make_config(tmp_path)
    now = time.time()
    ids = seed(config, now)
    conn = connect(config.database_path)
    hostile = register_case(conn, case_name=HOSTILE, source_path="/drop/x", now=now - 5, worker="scanner")
    ids["hostile"] = hostile.case_id
    conn.execute("UPDATE cases SET log_tail = ? WHERE case_id = ?",
                 ("line 1\n<script>alert('log')</script>\n\"quoted\" ünïcode ✓", ids["charlie"]))
    conn.close()
    return config, ids


@pytest.fixture
def client(world):
    return app_for(world[0])


@pytest.fixture
def operator_world(tmp_path):
    token_file = tmp_path / "web-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    config = make_config(tmp_path, web={"actions": True, "token_file": str(token_file)})
    ids = seed(config, time.time())
    return config, ids


def signed_in(config):
    client = app_for(config)
    answer = client.post("/login", data={"token": TOKEN, "back": "/"}, headers={"Origin": ORIGIN})
    assert answer.status_code == 303, answer.text
    page = client.get("/").text
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    return client, csrf


# -- pages ------------------------------------------------------------------------------------------

def test_overview_shows_attention_first_then_totals_hosts_seats_workers(world, client):
    config, ids = world
    page = client.get("/")
    assert page.status_code == 200
    text = page.text
    assert text.index('id="attention"') < text.index('id="health"') < text.index('id="hosts"') < text.index('id="seats"')
    assert "no progress for 61 min in running" in text                  # the review flag, at the top
    assert re.search(r'data-total="running">1<', text) and re.search(r'data-total="submitted">3<', text)
    assert "heartbeat is" in text and "poller" in text                  # the stale worker
    assert 'value="42.0"' in text                                        # alpha's progress bar
    assert f'href="/cases/{ids["alpha"]}"' in text


def test_every_page_escapes_hostile_names_and_log_lines(world, client):
    config, ids = world
    for url in ("/", "/part/overview", "/cases", f"/cases?q={HOSTILE}", f"/cases/{ids['hostile']}",
                f"/part/cases/{ids['hostile']}"):
        text = client.get(url).text
        assert HOSTILE not in text, url
        assert "<img" not in text, url
    assert "&lt;img src=x onerror=alert(1)&gt;" in client.get(f"/cases/{ids['hostile']}").text
    log_page = client.get(f"/cases/{ids['charlie']}").text
    assert "<script>alert" not in log_page and "&lt;script&gt;alert(&#39;log&#39;)&lt;/script&gt;" in log_page
    assert "ünïcode ✓" in log_page and "&#34;quoted&#34;" in log_page
    assert json.loads(client.get(f"/api/cases/{ids['hostile']}").text)["case"]["case_name"] == HOSTILE


def test_no_inline_script_and_a_strict_content_security_policy(client):
    answer = client.get("/")
    csp = answer.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert re.findall(r"<script(?![^>]*\bsrc=)", answer.text) == []     # every script is a file of ours
    assert " on" not in re.sub(r'"[^"]*"', '""', "".join(re.findall(r"<[a-z][^>]*>", answer.text)))  # no onclick=


def test_case_page_shows_fields_times_in_the_zone_events_attempts_and_folders(world, client):
    config, ids = world
    text = client.get(f"/cases/{ids['charlie']}").text
    assert "submit_error" in text and "RemoteError: pueue add: exit 1" in text
    assert "KST" in text                                               # Asia/Seoul, never a raw epoch number
    assert not re.search(r"\b1[6-9]\d{8}(\.\d+)?\b", text)
    assert f"{ids['charlie']}_charlie" in text and "failed" in text    # spool/failed/<id>_charlie
    assert "submitter:1" in text                                       # the attempt's claim
    assert client.get("/cases/999999").status_code == 404
    for url in ("/cases/", "/part/cases/", "/api/cases/"):                # past SQLite's integer: not found
        assert client.get(url + "9" * 30).status_code == 404, url


def test_case_list_filters_search_sorts_and_pages(world, client):
    config, ids = world
    api = lambda q: json.loads(client.get("/api/cases" + q).text)
    assert [c["case_name"] for c in api("?status=submitted")["cases"]] == [HOSTILE, "foxtrot", "delta"]
    assert [c["case_name"] for c in api("?q=rav")["cases"]] == ["bravo"]
    assert [c["case_id"] for c in api(f"?q={ids['echo']}")["cases"]] == [ids["echo"]]
    assert [c["case_name"] for c in api("?review=yes")["cases"]] == ["alpha"]
    assert [c["case_name"] for c in api("?outcome=submit_error")["cases"]] == ["charlie"]
    assert api("?priority=urgent")["cases"] == []
    assert [c["case_name"] for c in api("?host=hpc&sort=oldest")["cases"]] == ["alpha", "bravo", "charlie", "echo"]
    first = api("?limit=2")
    assert len(first["cases"]) == 2 and first["matching"] == 7
    second = api(f"?limit=2&cursor={first['next_cursor']}")
    assert second["cases"][0]["case_id"] < first["cases"][-1]["case_id"]
    assert api("?q=100%25")["cases"] == []                               # % is a character, not a wildcard
    page = client.get("/cases?status=failed").text
    assert "charlie" in page and "bravo" not in page and "1 matching cases" in page


@pytest.mark.parametrize("query, message", [
    ("?status=lost", "status: got 'lost', expected one of"), ("?limit=0", "limit: got '0'"),
    ("?limit=abc", "limit: got 'abc'"), ("?cursor=-1", "cursor"), ("?sort=random", "sort: got 'random'"),
    ("?review=maybe", "review"), ("?colour=red", "unknown parameter 'colour'"), ("?q=" + "x" * 201, "q: longer"),
    ("?limit=\u00b2", "limit: got"), ("?cursor=\u0661\u0662", "cursor: got"),          # Unicode digits int() reads
    ("?status=running&status=failed", "status: given more than once"),
    ("?cursor=" + "9" * 5000, "cursor: got")])                                        # past int()'s 4,300 digits
def test_bad_query_parameters_get_400_with_a_clear_message(client, query, message):
    api = client.get("/api/cases" + query)
    assert api.status_code == 400 and message in api.json["error"]
    page = client.get("/cases" + query)
    assert page.status_code == 400 and message.replace("'", "&#39;") in page.text


def test_a_search_for_unicode_digits_or_a_huge_number_finds_nothing_instead_of_failing(world, client):
    config, ids = world
    for text in ("\u00b2", "9" * 40, str(2**63)):
        answer = client.get("/api/cases", query_string={"q": text})
        assert answer.status_code == 200 and answer.json["cases"] == [], text
    assert client.get("/cases", query_string={"q": "9" * 40}).status_code == 200


def test_a_page_asked_for_by_another_name_is_refused(world, client, tmp_path):
    config, ids = world
    for url in ("/", f"/cases/{ids['hostile']}", "/api/cases", "/part/overview"):     # DNS rebinding reads nothing
        answer = client.get(url, headers={"Host": "evil.example"})
        assert answer.status_code == 403 and "alpha" not in answer.text, url
    assert client.get("/", headers={"Host": "127.0.0.1:8080"}).status_code == 200
    (tmp_path / "named").mkdir()
    named = make_config(tmp_path / "named", web={"allowed_hosts": ["mqic.clinic.local"]})
    seed(named, time.time())
    assert app_for(named).get("/api/cases", headers={"Host": "mqic.clinic.local"}).status_code == 200


def test_static_files_cannot_leave_their_folder(client):
    assert client.get("/static/app.js").status_code == 200
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/../../shared/config.py",
                 "/static//etc/passwd", "/static/%2fetc%2fpasswd"):
        answer = client.get(path, follow_redirects=True)
        assert answer.status_code == 404, path
        assert "import" not in answer.text and "root:" not in answer.text


def test_api_health_cases_and_one_case_have_stable_fields(world, client):
    config, ids = world
    health = client.get("/api/health")
    assert health.status_code == 503                                    # the poller's heartbeat is stale
    assert set(health.json) == {"healthy", "reasons", "drained", "notes", "hosts"}
    assert set(health.json["hosts"][0]) == {"host", "backend", "reachable", "down_since", "problem", "drained", "seats",
                                            "in_use", "running"}
    listing = client.get("/api/cases").json
    assert set(listing) == {"cases", "matching", "matching_capped", "next_cursor"}
    assert {"case_id", "case_name", "status", "progress", "host", "priority", "outcome", "needs_review",
            "submitted_at", "updated_at"} <= set(listing["cases"][0])
    one = client.get(f"/api/cases/{ids['bravo']}").json
    assert set(one) == {"case", "events", "attempts", "eta", "folders", "checksums"}
    assert one["case"]["status"] == "completed" and one["events"][0]["to_status"] == "submitted"
    assert client.get("/api/cases/424242").status_code == 404
    assert client.get("/api/overview").json["totals"]["running"] == 1


def test_a_down_and_a_drained_host_are_at_the_top(world):
    config, ids = world
    conn = connect(config.database_path)
    note_remote(conn, "hpc", "poller", ok=False, now=time.time() - 120, error="Unreachable: ssh exit 255")
    from shared.maintenance import drain
    drain(conn, "hpc", now=time.time() - 60, by="mqic-cli:alice", reason="driver update")
    conn.close()
    text = app_for(config).get("/").text
    attention = text[text.index('id="attention"'):text.index('id="health"')]
    assert "host hpc unreachable (Unreachable: ssh exit 255)" in attention and "since" in attention
    assert "host hpc drained by mqic-cli:alice (driver update)" in attention
    assert attention.index("unreachable") < attention.index("drained")


def test_a_refused_host_key_is_shown_as_such_not_as_an_outage(world):
    config, _ = world
    conn = connect(config.database_path)
    note_remote(conn, "hpc", "poller", ok=False, now=time.time() - 30, problem="host_key",
                error="Host key verification failed.")
    conn.close()
    text = app_for(config).get("/").text
    attention = text[text.index('id="attention"'):text.index('id="health"')]
    assert 'data-kind="host_key"' in attention and "HOST KEY CHANGED on host hpc: possible interception" in attention
    assert "unreachable" not in attention


def test_api_health_answers_what_mqic_health_json_says(world, capsys):
    config, ids = world
    from shared.maintenance import drain
    conn = connect(config.database_path)
    drain(conn, "hpc", now=time.time() - 60, by="mqic-cli:alice", reason="driver update")
    conn.close()
    code, out, _ = cli(capsys, config, "health", "--json")
    assert app_for(config).get("/api/health").json == json.loads(out)


def test_the_snapshot_is_shared_for_a_second(world, monkeypatch):
    config, ids = world
    client = app_for(config)
    calls = []
    from shared import queries
    real = queries.overview
    monkeypatch.setattr(queries, "overview", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(20):
        assert client.get("/part/overview").status_code == 200
    assert len(calls) == 1


def test_a_snapshot_is_computed_again_once_its_second_has_passed():
    from console.web.reader import Cache
    now, computed = [100.0], []
    cache = Cache(1.0, clock=lambda: now[0])
    compute = lambda: computed.append(now[0]) or len(computed)
    assert [cache.get("k", compute) for _ in range(3)] == [1, 1, 1]
    now[0] += 0.99
    assert cache.get("k", compute) == 1
    now[0] += 0.02
    assert cache.get("k", compute) == 2 and len(computed) == 2


def test_concurrent_pollers_share_one_snapshot(world, monkeypatch):
    config, ids = world
    app = create_app(config, guard_for(config.web))
    calls = []
    from shared import queries
    real = queries.overview

    def slow_overview(*a, **k):
        calls.append(1)
        time.sleep(0.2)                                                  # widens the window a race needs
        return real(*a, **k)
    monkeypatch.setattr(queries, "overview", slow_overview)
    start, answers = threading.Barrier(8), []

    def poll():
        client = app.test_client()
        start.wait()
        answers.append(client.get("/part/overview"))
    threads = [threading.Thread(target=poll) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [a.status_code for a in answers] == [200] * 8 and len({a.text for a in answers}) == 1
    assert len(calls) == 1


def test_a_missing_database_is_503_not_a_crash(tmp_path):
    config = make_config(tmp_path)
    answer = app_for(config).get("/")
    assert answer.status_code == 503 and "not found" in answer.text


# -- the program never writes without a guarded operation -----------------------------------------------

def test_reading_every_page_changes_nothing_in_the_database(world, client):
    config, ids = world
    before = (config.database_path.stat().st_mtime_ns, config.database_path.read_bytes())
    for url in ("/", "/cases", "/cases?status=running", f"/cases/{ids['alpha']}", "/plots", "/api/health",
                "/api/cases", f"/api/cases/{ids['alpha']}", "/part/overview"):
        client.get(url)
    assert (config.database_path.stat().st_mtime_ns, config.database_path.read_bytes()) == before


# -- actions ------------------------------------------------------------------------------------------

def test_actions_are_off_by_default_and_answer_403(world, client):
    config, ids = world
    assert "read-only" in client.get("/").text
    answer = client.post("/action/ack", data={"case_id": ids["alpha"]}, headers={"Origin": ORIGIN})
    assert answer.status_code == 403 and "actions are not allowed" in answer.text
    assert client.post("/api/actions/ack", json={"case_id": ids["alpha"]},
                       headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 403
    assert get_case(connect(config.database_path), ids["alpha"]).needs_review


def test_a_network_address_without_a_token_is_read_only_and_says_so(tmp_path):
    config = make_config(tmp_path, web={"listen": "0.0.0.0:8080"})
    seed(config, time.time())
    client = app_for(config)
    assert "reachable from the network and no token is configured" in client.get("/").text
    assert client.post("/action/ack", data={"case_id": 1}, headers={"Origin": ORIGIN}).status_code == 403


def test_actions_need_the_token_csrf_and_our_origin(operator_world):
    config, ids = operator_world
    anonymous = app_for(config)
    assert 'id="login"' in anonymous.get("/").text
    assert anonymous.post("/action/ack", data={"case_id": ids["alpha"]}, headers={"Origin": ORIGIN}).status_code == 403
    assert anonymous.post("/login", data={"token": "wrong"}, headers={"Origin": ORIGIN}).status_code == 403
    client, csrf = signed_in(config)
    form = {"case_id": ids["alpha"], "csrf": csrf}
    assert client.post("/action/ack", data={**form, "csrf": "0" * 40}, headers={"Origin": ORIGIN}).status_code == 403
    assert client.post("/action/ack", data=form, headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post("/action/ack", data=form).status_code == 403                       # neither Origin nor Referer
    evil_host = client.post("/action/ack", data=form, headers={"Origin": "http://evil.example", "Host": "evil.example"})
    assert evil_host.status_code == 403 and "not one of this server&#39;s names" in evil_host.text   # DNS rebinding
    assert client.get("/action/ack").status_code == 405
    assert get_case(connect(config.database_path), ids["alpha"]).needs_review
    done = client.post("/action/ack", data=form, headers={"Origin": ORIGIN}, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert done.status_code == 200 and "review flag cleared" in done.text
    conn = connect(config.database_path)
    assert not get_case(conn, ids["alpha"]).needs_review
    events = conn.execute("SELECT worker, detail FROM case_events WHERE case_id = ? ORDER BY event_id DESC LIMIT 1",
                          (ids["alpha"],)).fetchone()
    assert events["worker"] == "web:10.1.2.3"


def test_a_token_csrf_field_or_cookie_outside_ascii_is_refused_not_a_crash(operator_world):
    config, ids = operator_world
    anonymous = app_for(config)
    assert anonymous.post("/login", data={"token": "\u00e9" * 20}, headers={"Origin": ORIGIN}).status_code == 403
    assert anonymous.post("/api/actions/ack", json={"case_id": ids["alpha"]},
                          headers={"Authorization": "Bearer \u00e9t\u00e9"}).status_code == 403
    for cookie in (f"{int(time.time())}-abc.\u00e9", "\u00b2-abc.def", "9" * 5000 + "-abc.def"):
        page = app_for(config).get("/", headers={"Cookie": f"mqic_auth={cookie}"})     # a script's, past 4 KB
        assert page.status_code == 200 and 'id="login"' in page.text, cookie
    client, csrf = signed_in(config)
    answer = client.post("/action/ack", data={"case_id": ids["alpha"], "csrf": "\u00e9" * 40}, headers={"Origin": ORIGIN})
    assert answer.status_code == 403 and "CSRF" in answer.text
    assert get_case(connect(config.database_path), ids["alpha"]).needs_review


def test_a_malformed_origin_or_host_is_refused_not_a_crash(operator_world):
    config, ids = operator_world
    client, csrf = signed_in(config)
    form = {"case_id": ids["alpha"], "csrf": csrf}
    assert client.post("/action/ack", data=form, headers={"Origin": "http://[bad"}).status_code == 403
    assert client.post("/action/ack", data=form, headers={"Origin": ORIGIN, "Host": "[bad"}).status_code == 403
    assert get_case(connect(config.database_path), ids["alpha"]).needs_review


def test_an_api_action_whose_body_is_not_an_object_or_whose_case_id_is_not_ascii_gets_400(operator_world):
    config, ids = operator_world
    client = app_for(config)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    listed = client.post("/api/actions/ack", json=[ids["alpha"]], headers=bearer)
    assert listed.status_code == 400 and "JSON object" in listed.json["error"]
    for case_id in ("\u00b2", "9" * 5000):
        answer = client.post("/api/actions/ack", json={"case_id": case_id}, headers=bearer)
        assert answer.status_code == 400 and "case_id" in answer.json["error"]


@pytest.mark.parametrize("back", ["//evil.example", "/\\evil.example", "/\t/evil.example", "/\n/evil.example",
                                  "https://evil.example/"])
def test_the_page_to_return_to_is_never_another_site(operator_world, back):
    config, ids = operator_world
    signed_in_at = app_for(config).post("/login", data={"token": TOKEN, "back": back}, headers={"Origin": ORIGIN})
    assert signed_in_at.status_code == 303 and signed_in_at.headers["Location"] == "/"
    client, csrf = signed_in(config)
    done = client.post("/action/ack", data={"case_id": ids["alpha"], "csrf": csrf, "back": back},
                       headers={"Origin": ORIGIN})
    assert done.status_code == 200 and 'href="/" id="back"' in done.text


def test_signing_out_from_another_site_is_refused(operator_world):
    config, ids = operator_world
    client, csrf = signed_in(config)
    assert client.post("/logout", headers={"Origin": "http://evil.example"}).status_code == 403
    assert 'id="login"' not in client.get("/").text                     # still signed in
    assert client.post("/logout", headers={"Origin": ORIGIN}).status_code == 303


def test_priority_cancel_drain_resume_and_a_refusal_through_the_guarded_operations(operator_world):
    config, ids = operator_world
    client, csrf = signed_in(config)
    post = lambda name, **fields: client.post(f"/action/{name}", data={"csrf": csrf, **fields},
                                              headers={"Origin": ORIGIN})
    assert "priority urgent" in post("priority", case_id=ids["delta"], priority="urgent").text
    assert "cancelled" in post("cancel", case_id=ids["foxtrot"]).text
    refused = post("retry", case_id=ids["bravo"])
    assert refused.status_code == 409 and "only failed cases can be retried" in refused.text
    assert post("priority", case_id=ids["delta"], priority="lunch").status_code == 409
    assert "drained" in post("drain", host="hpc", reason="GPU swap").text
    assert "DRAINED since" in client.get("/").text
    assert "resumed" in post("resume", host="hpc").text
    assert post("drain", host="nope").status_code == 409
    conn = connect(config.database_path)
    assert get_case(conn, ids["delta"]).priority == "urgent"
    assert get_case(conn, ids["foxtrot"]).status is CaseStatus.FAILED
    workers = {r[0] for r in conn.execute("SELECT worker FROM case_events WHERE case_id IN (?, ?)",
                                          (ids["delta"], ids["foxtrot"]))}
    assert "web:127.0.0.1" in workers


def test_a_script_acts_with_the_bearer_token(operator_world):
    config, ids = operator_world
    client = app_for(config)
    assert client.post("/api/actions/ack", json={"case_id": ids["alpha"]}).status_code == 403
    assert client.post("/api/actions/ack", json={"case_id": ids["alpha"]},
                       headers={"Authorization": "Bearer wrong"}).status_code == 403
    done = client.post("/api/actions/ack", json={"case_id": ids["alpha"]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert done.status_code == 200 and done.json["ok"] is True


# -- configuration and the token file -------------------------------------------------------------------

def test_web_config_keys_are_validated(tmp_path):
    assert make_config(tmp_path).web == WebConfig()
    web = make_config(tmp_path, web={"listen": "[::1]:9000", "allowed_hosts": ["MQIC.clinic.local"]}).web
    assert (web.host, web.port, web.loopback, web.allowed_hosts) == ("::1", 9000, True, ("mqic.clinic.local",))
    for bad, message in (({"listen": "8080"}, "web.listen"), ({"listen": "a:99999"}, "web.listen"),
                         ({"actions": True}, "web.actions: got true, expected web.token_file"),
                         ({"actions": "yes"}, "web.actions"), ({"token": "abc"}, "web.token: unknown key"),
                         ({"refresh_seconds": 0}, "web.refresh_seconds")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            make_config(tmp_path, web=bad)


def test_the_token_file_must_be_ours_and_mode_0600(tmp_path):
    token_file = tmp_path / "token"
    with pytest.raises(TokenFileError, match="not found"):
        read_token(token_file)
    token_file.write_text(TOKEN)
    token_file.chmod(0o644)
    with pytest.raises(TokenFileError, match="mode 0644"):
        read_token(token_file)
    token_file.chmod(0o600)
    assert read_token(token_file) == TOKEN
    token_file.write_text("short")
    with pytest.raises(TokenFileError, match="shorter"):
        read_token(token_file)
    link = tmp_path / "link"
    link.symlink_to(token_file)
    with pytest.raises(TokenFileError, match="regular file"):
        read_token(link)
    folder, fifo = tmp_path / "folder", tmp_path / "fifo"
    folder.mkdir(mode=0o700)
    os.mkfifo(fifo, 0o600)
    for path in (folder, fifo):                                          # a FIFO does not hang the start
        with pytest.raises(TokenFileError, match="regular file"):
            read_token(path)


def test_the_program_refuses_to_start_with_an_open_token_file(tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o640)
    config = make_config(tmp_path, web={"actions": True, "token_file": str(token_file)})
    from console.web.server import main
    assert main(["--config", str(config.source)]) == 2
    assert "expected mode 0600" in capsys.readouterr().err


def test_plots_page_draws_the_five_charts_as_svg_without_inline_style(world, client):
    text = client.get("/plots").text
    for name in ("per_hour", "per_day", "turnaround", "gpu_wait", "gpu_busy"):
        assert f'id="plot-{name}"' in text
    assert text.count("<svg") == 5 and "style=" not in text and "<script" not in text.replace('<script src=', '')


def test_hourly_plot_labels_are_the_hours_start_in_a_half_hour_time_zone(tmp_path):
    config = make_config(tmp_path, logging={"timezone": "Asia/Kolkata"})   # UTC+05:30
    seed(config, time.time())
    chart = app_for(config).get("/plots").text.split('id="plot-per_hour"')[1].split("</figure>")[0]
    labels = re.findall(r"<title>(\d\d:\d\d): ", chart)
    assert len(labels) == 24 and all(label.endswith(":30") for label in labels), labels


def test_running_cases_get_an_eta_on_the_overview_and_their_page(world, client):
    config, ids = world
    overview = client.get("/api/overview").json
    assert str(ids["alpha"]) in overview["etas"]
    assert overview["etas"][str(ids["alpha"])]["kind"] == "finish"
    assert "ends ~" in client.get(f"/cases/{ids['alpha']}").text


def test_quotes_in_attributes_and_very_long_names_are_escaped(world):
    config, ids = world
    conn = connect(config.database_path)
    long_name = "patient_" + "Ω" * 2000 + '"><b>'
    long_case = register_case(conn, case_name=long_name, source_path="/drop/long", now=time.time(), worker="scanner")
    conn.execute("UPDATE cases SET needs_review = 1, review_reason = ? WHERE case_id = ?",
                 ('" onmouseover="alert(1)', long_case.case_id))
    conn.close()
    client = app_for(config)
    listing = client.get("/cases?review=yes").text
    assert 'title="&#34; onmouseover=&#34;alert(1)"' in listing and '" onmouseover="' not in listing
    page = client.get(f"/cases/{long_case.case_id}").text
    assert "Ω" * 2000 + "&#34;&gt;&lt;b&gt;" in page and "<b>" not in page


def test_case_list_pages_never_sort_the_whole_table(world):
    """EXPLAIN QUERY PLAN of every statement a listing runs: no temporary sort of the matches."""
    config, ids = world
    from shared import queries
    conn = connect(config.database_path, readonly=True)
    statements = []
    conn.set_trace_callback(statements.append)
    for wanted in (queries.CaseFilter(), queries.CaseFilter(status="completed"),
                   queries.CaseFilter(status="failed", review=True, sort="oldest", cursor=2),
                   queries.CaseFilter(text="rav", host="hpc", priority="normal", outcome="success")):
        queries.search_cases(conn, wanted)
    conn.set_trace_callback(None)
    assert len(statements) == 8
    for sql in statements:
        plan = " ".join(r["detail"] for r in conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "TEMP B-TREE" not in plan, (sql, plan)


def test_the_overview_shows_every_gpu_and_puts_a_silent_or_foreign_one_at_the_top(tmp_path):
    """Issue 21 on the web page: utilization, memory, temperature, whose work; a GPU that stopped
    answering or holds someone else's process (with avoid_foreign) is in "Needs attention"."""
    from shared import gpus
    from shared.gpus_parse import GpuApp, GpuQuery, GpuReading, Probe
    config = make_config(tmp_path, gpus={"avoid_foreign": True})
    now = time.time()
    conn = connect(config.database_path)
    readings = (GpuReading(0, "GPU-aaa", 87.0, 30_000.0, 81_920.0, 64.0),
                GpuReading(1, "GPU-bbb", 3.0, 20_000.0, 81_920.0, 41.0))
    foreign = GpuApp("GPU-bbb", 4242, 20_000.0)
    gpus.record(conn, "hpc", Probe(now, GpuQuery(readings), (foreign,)), config.gpus, now=now)
    gpus.record(conn, "hpc", Probe(now, GpuQuery(readings[1:], lost=("GPU 0: GPU is lost",)), (foreign,)),
                config.gpus, now=now)
    conn.close()
    page = app_for(config).get("/").get_data(as_text=True)
    gpu_section = page[page.index('id="gpus"'):page.index('id="recent"')]
    assert 'data-gpu="hpc:1"' in gpu_section and "41 °C" in gpu_section and "19.5 / 80.0 GiB" in gpu_section
    assert "someone else's process (1); no new case" in gpu_section
    assert "NOT ANSWERING" in gpu_section
    attention = page[page.index('id="attention"'):page.index('id="health"')]
    assert "GPU 0 does not answer" in attention and "GPU 1 has someone else&#39;s process" in attention
