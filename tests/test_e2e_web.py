"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
against the real system: supervisord runs every program, the web one included, on two sandbox hosts.

Set MQIC_SCREENSHOTS=1 to copy the screenshots this test takes into docs/ (README shows them).
"""
from __future__ import annotations

import os
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from sandbox.casegen import make_case
from sandbox.sshd import free_port
from shared.db import connect
from tests.conftest import wait_until
from tests.test_e2e import REPO, Supervisor

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HOSTILE = "<img src=x onerror=alert(1)>"
TOKEN = "e2e-operator-token-0123456789abcdef"
FAST = {"scanner": {"quiescence_period_seconds": 0.5, "rescan_interval_seconds": 1},
        "main_loop": {"interval_seconds": 0.3, "running_case_timeout_hours": 1, "backoff_base_seconds": 1,
                      "lease_seconds": 20},
        "hpc": {"connect_timeout_seconds": 3, "command_timeout_seconds": 15}}
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1100")

pytestmark = [pytest.mark.system,
              pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                 reason="Debian's chromium and chromium-driver are not installed "
                                        "(scripts/setup.sh installs them as root)")]


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(15)  # a click that submits a form returns before the next page is there
    yield driver
    driver.quit()


@pytest.fixture
def web_system(two_hosts, tmp_path):
    """Two pueue hosts (gpu1, gpu2) and supervisord running every program, actions on with a token."""
    token_file = tmp_path / "web-token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    port = free_port()
    h = two_hosts("pueue", groups={"gpu_a": {"gpu": 0}}, second_groups={"gpu_a": {"gpu": 0}}, **FAST,
                  metrics={"port": free_port()},
                  web={"listen": f"127.0.0.1:{port}", "actions": True, "token_file": str(token_file),
                       "refresh_seconds": 1})
    home = tmp_path / "home"
    home.mkdir()
    sup = Supervisor(home, h.config_path)
    sup.start()
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: answers(base + "/api/health"), timeout=30, message="the web program answers")
    yield h, base, connect(h.config.database_path), sup
    sup.shutdown()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True   # 503 while unhealthy is an answer
    except OSError:
        return False


def drop(h, name: str, *, seconds: float = 1.5, mode: str = "ok", batches: int = 3) -> None:
    make_case(h.config.scanner.watch_path, name, seconds=seconds, batches=batches, mode=mode, deliveries=1,
              layers_per_delivery=2, atomic=True)


def case_id(conn, name: str) -> int | None:
    row = conn.execute("SELECT case_id FROM cases WHERE case_name = ?", (name,)).fetchone()
    return None if row is None else row[0]


def status(conn, name: str) -> str | None:
    row = conn.execute("SELECT status FROM cases WHERE case_name = ?", (name,)).fetchone()
    return None if row is None else row[0]


def live_text(driver, selector: str) -> list[str]:
    """The text of every element matching ``selector``, read in one script: app.js swaps the live
    parts under our feet, so a found element may be gone by the time Selenium asks for its text."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText);", selector)


def row_text(driver, name: str) -> str:
    """The text of the recent-cases row of case ``name`` on the open overview ('' when absent)."""
    return next((row for row in live_text(driver, "#recent tbody tr") if name in row), "")


def no_alert(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException
    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def screenshot(driver, tmp_path: Path, name: str) -> None:
    target = tmp_path / name
    driver.save_screenshot(str(target))
    if os.environ.get("MQIC_SCREENSHOTS") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(target, REPO / "docs" / name)


def test_the_dashboard_in_a_real_browser(web_system, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    h, base, conn, sup = web_system
    driver = browser

    # A case dropped while the overview is open appears and reaches completed without a reload.
    driver.get(base + "/")
    driver.execute_script("window.mqicSamePage = 'yes';")
    drop(h, "live_case", seconds=8, batches=8)
    wait_until(lambda: "live_case" in row_text(driver, "live_case"), timeout=30, message="the new case appears")
    seats = lambda: " ".join(live_text(driver, "#seats tbody tr"))
    wait_until(lambda: "ends ~" in seats() and re.search(r"\b[1-9]\d*%", seats()), timeout=30,
               message="its seat shows progress and an ETA")
    screenshot(driver, tmp_path, "web-overview.png")
    wait_until(lambda: "completed" in row_text(driver, "live_case"), timeout=60, message="it shows completed")
    assert driver.execute_script("return window.mqicSamePage;") == "yes"   # the same page, never reloaded

    # A hostile name shows as text and runs nothing.
    drop(h, HOSTILE)
    wait_until(lambda: HOSTILE in row_text(driver, HOSTILE), timeout=30, message="the hostile case shows as text")
    assert no_alert(driver)
    assert driver.execute_script("return document.querySelectorAll('img').length;") == 0
    assert driver.execute_script("return window.mqicSamePage;") == "yes"

    # A failed case's page shows its log tail.
    drop(h, "failing_case", mode="fail")
    wait_until(lambda: status(conn, "failing_case") == "failed", timeout=60, message="the failing case failed")
    failed = case_id(conn, "failing_case")
    driver.get(f"{base}/cases/{failed}")
    log_tail = " ".join(live_text(driver, "#log-tail"))
    assert log_tail.strip(), "the log tail is empty"
    expected = conn.execute("SELECT log_tail FROM cases WHERE case_id = ?", (failed,)).fetchone()[0]
    assert expected.strip().splitlines()[-1].strip() in log_tail
    screenshot(driver, tmp_path, "web-case.png")
    driver.get(f"{base}/cases/{case_id(conn, HOSTILE)}")
    assert live_text(driver, "#case-title .name") == [HOSTILE]
    assert no_alert(driver) and driver.execute_script("return document.querySelectorAll('img').length;") == 0

    # Search and filters.
    wait_until(lambda: status(conn, HOSTILE) == "completed", timeout=60, message="the hostile case completed")
    driver.get(base + "/cases")
    driver.find_element(By.NAME, "q").send_keys("_case")
    Select(driver.find_element(By.NAME, "status")).select_by_visible_text("failed")
    driver.find_element(By.ID, "search").click()
    # the click returns before the results page is there: wait for it, then read the list in one script
    wait_until(lambda: "status=failed" in driver.current_url and driver.execute_script(
        "return document.readyState;") == "complete", timeout=15, message="the search results page")
    assert live_text(driver, "#case-list .case-link") == [f"{failed} failing_case"]
    driver.get(base + "/cases?status=completed")
    names = " ".join(live_text(driver, "#case-list .case-link"))
    assert "live_case" in names and HOSTILE in names and "failing_case" not in names

    # An action without the token is refused; with it, it works and shows in the events.
    driver.get(f"{base}/cases/{failed}")
    assert not live_text(driver, "#case-actions")
    refused = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; const form = new FormData();"
        "form.append('case_id', arguments[0]); form.append('csrf', 'guess');"
        "fetch('/action/retry', {method: 'POST', body: form}).then(r => done(r.status));", failed)
    assert refused == 403
    wait_until(lambda: not conn.execute("SELECT 1 FROM gpu_resources WHERE status = 'zombie' AND assigned_case_id = ?",
                                        (failed,)).fetchone(), timeout=30, message="the reaper freed its seat")
    driver.find_element(By.NAME, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    driver.find_element(By.CSS_SELECTOR, "#case-actions button[value=retry]").click()
    result = driver.find_element(By.ID, "action-result").text
    assert f"case {failed}:" in result and "refused" not in result, result
    driver.find_element(By.ID, "back").click()
    events = lambda: " ".join(live_text(driver, "#events"))
    wait_until(lambda: "web:127.0.0.1" in events(), timeout=15, message="the retry in the case's events")
    assert "retry" in events().lower()

    # A down host and a drained host show at the top of the overview.
    driver.get(base + "/")
    Select(driver.find_element(By.CSS_SELECTOR, "#host-actions select[name=host]")).select_by_visible_text("gpu1")
    driver.find_element(By.CSS_SELECTOR, "#host-actions input[name=reason]").send_keys("GPU driver update")
    driver.find_element(By.CSS_SELECTOR, "#host-actions form[action='/action/drain'] button").click()
    assert "drained" in driver.find_element(By.ID, "action-result").text
    h.host("gpu2").sshd.stop()              # its listener and every session, the ControlMaster's too
    drop(h, "while_gpu2_is_down")           # gpu1 is drained: the claim goes to gpu2 and finds it down
    driver.get(base + "/")
    attention = lambda: " ".join(live_text(driver, "#attention"))
    wait_until(lambda: "host gpu2 unreachable" in attention(), timeout=60, message="gpu2 down at the top")
    wait_until(lambda: "host gpu1 drained by web:127.0.0.1 (GPU driver update)" in attention(), timeout=10,
               message="gpu1 drained at the top")
    page = driver.page_source
    assert page.index('id="attention"') < page.index('id="hosts"')
    screenshot(driver, tmp_path, "web-attention.png")
    h.host("gpu2").sshd.start()

    # The web program restarts on its own; the open page goes on updating.
    assert "mqic:web: stopped" in sup.ctl("restart", "mqic:web")
    wait_until(lambda: answers(base + "/api/health"), timeout=30, message="the web program answers again")
    drop(h, "after_restart")
    wait_until(lambda: "after_restart" in row_text(driver, "after_restart"), timeout=30,
               message="the open page shows a case dropped after the restart")
