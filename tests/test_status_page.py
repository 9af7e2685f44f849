"""The status page (config/status.ini, docs/status-page.md) after real traffic: mail
through harakapy to MTA-STS destinations (one whose MX shows a certificate for another
name) and one without a policy, the page served by the server itself, read as JSON and
in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium);
who may read it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil

import aiohttp
import pytest

from harakapy.config import Config, ConfigError
from harakapy.passwords import hash_password
from harakapy.status.settings import StatusSettings
from tests.dnssec_world import missing_binary
from tests.harness import advancing, eventually, write_config_dir
from tests.processes import free_port, harakapy
from tests.sts_world import BODY, MX2_IP, MX_IP, REAL_IP, Answer, policy

TOKEN = "a+token/of=more-than-16-characters"  # + / =: as base64 makes them
RECEIVED = {
    "organization-name": "Big Mail", "contact-info": "tls-reports@big.example",
    "report-id": "2027-01-14T00:00:00Z_harakapy.test",
    "date-range": {"start-datetime": "2027-01-14T00:00:00Z",
                   "end-datetime": "2027-01-14T23:59:59Z"},
    "policies": [{
        "policy": {"policy-type": "sts", "policy-domain": "harakapy.test",
                   "policy-string": ["version: STSv1", "mode: enforce",
                                     "mx: mx.harakapy.test", "max_age: 86400"],
                   "mx-host": ["mx.harakapy.test"]},
        "summary": {"total-successful-session-count": 120,
                    "total-failure-session-count": 3},
        "failure-details": [{"result-type": "certificate-expired",
                             "sending-mta-ip": "192.0.2.7",
                             "receiving-mx-hostname": "mx.harakapy.test",
                             "failed-session-count": 3}]}]}


def status_ini(port: int, extra: str = "", listen_host: str = "127.0.0.1") -> str:
    return f"[main]\nenabled = yes\nlisten = {listen_host}:{port}\n{extra}"


async def traffic_world(sts_world, status: str):
    """a.test: MTA-STS enforce, its MX good. b.test: MTA-STS enforce, its MX's
    certificate names another host (every session fails; the mail waits). plain.test: no
    policy (a session at may)."""
    world = await sts_world(files={"status.ini": status})
    world.domain("a.test")
    world.domain("b.test", mx=((10, "mx.b.test", MX2_IP),))
    world.answers["b.test"] = Answer(body=policy("enforce", "mx.b.test"))
    world.records["plain"] = ["plain.test. MX 10 mx.plain.test.",
                              f"mx.plain.test. A {REAL_IP}"]
    world.publish_zone()
    good = await world.mx(MX_IP, "mx.a.test")
    await world.mx(MX2_IP, "mx.elsewhere.example")
    plain = await world.mx(REAL_IP, "mx.plain.test")
    for n in range(3):
        await world.env.send(f"bob{n}@a.test")
    await world.env.send("carol@b.test")
    await world.env.send("dave@plain.test")
    await eventually(lambda: len(good.messages) == 3 and len(plain.messages) == 1)
    await eventually(world.env.deferral_recorded)
    return world, await written(world)


async def written(world) -> list:
    """Every TLS result so far, once the server has written them all for the page (every
    five seconds of its clock)."""
    recorded = world.env.captured("tls_result")
    path = world.env.hp.root / "state" / "status" / "outcomes.sqlite"

    def count() -> int:
        import sqlite3

        if not path.exists():
            return 0
        with sqlite3.connect(path) as db:
            return db.execute("SELECT COALESCE(SUM(count), 0) FROM outcomes").fetchone()[0]

    await advancing(world.env.clock, 5, lambda: count() >= len(recorded))
    return recorded


async def get(url: str, **options) -> tuple[int, str, dict]:
    async with aiohttp.ClientSession() as session, session.get(
            url, allow_redirects=False, **options) as response:
        return response.status, await response.text(), dict(response.headers)


async def test_the_json_counts_every_session_by_destination_and_shows_no_content(sts_world):
    port = free_port()
    _world, recorded = await traffic_world(sts_world, status_ini(port))
    status, text, headers = await get(f"http://127.0.0.1:{port}/status.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert headers["Cache-Control"] == "no-store"
    data = json.loads(text)
    assert data["errors"] == []
    by_domain = {d["domain"]: d for d in data["destinations"]}
    for domain in ("a.test", "b.test", "plain.test"):
        sessions = [r for r in recorded if r.domain == domain]
        day = by_domain[domain]["day"]
        assert day["succeeded"] == sum(r.success for r in sessions)
        assert day["failed"] == sum(not r.success for r in sessions)
        assert day == by_domain[domain]["week"]
    assert by_domain["a.test"]["day"]["source"] == "mta-sts enforce"
    assert by_domain["a.test"]["day"]["level"] == "verify"
    assert by_domain["plain.test"]["day"]["source"] == "none"
    assert by_domain["b.test"]["day"]["failures"] == {
        "certificate-host-mismatch": by_domain["b.test"]["day"]["failed"]}
    failure = by_domain["b.test"]["last_failure"]
    assert failure["result"] == "certificate-host-mismatch" and failure["mx"] == "mx.b.test"
    assert set(by_domain["a.test"]["day"]["tls_versions"]) == {"TLSv1.3"}
    # The queue: b.test's message waits, with its reason.
    queue = data["queue"]
    assert queue["messages"] == 1 and queue["recipients"] == {"deferred": 1}
    (waiting,) = queue["by_destination"]
    assert waiting["domain"] == "b.test" and "certificate" in waiting["last_reason"]
    assert queue["oldest"]["domains"] == ["b.test"]
    sts = {p["domain"]: p for p in data["mta_sts"]}
    assert sts["a.test"]["mode"] == "enforce" and sts["a.test"]["valid"]
    assert sts["a.test"]["mx"] == ["mx.a.test"]
    assert sum(h["success"] for h in data["timeline"]) == sum(r.success for r in recorded)
    # Metadata only: nothing of any message.
    for secret in (b"merger", b"secret", b"alice@sender.test"):
        assert secret.decode() not in text
    assert b"merger" in BODY


async def test_a_guarded_listener_refuses_what_carries_no_token_or_password(sts_world,
                                                                           tmp_path):
    port = free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    hashed = hash_password("open sesame")
    extra = (f"[auth]\ntoken_file = {tmp_path / 'token'}\nuser = ops\n"
             f"password_hash = {hashed}\n")
    # On every address: a request that is not from loopback needs the same as one that is.
    await sts_world(files={"status.ini": status_ini(port, extra, "0.0.0.0")})
    base = f"http://127.0.0.1:{port}"
    for path in ("/", "/status.json", "/status.js"):
        status, text, headers = await get(base + path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Basic")
        assert "destinations" not in text
    assert (await get(base + "/status.json",
                      headers={"Authorization": "Bearer wrong-token-wrong-token"}))[0] == 401
    assert (await get(base + "/status.json",
                      headers={"Authorization": f"Bearer {TOKEN}"}))[0] == 200
    status, _, headers = await get(base + "/nothing",
                                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 404 and headers["X-Frame-Options"] == "DENY"
    basic = base64.b64encode(b"ops:open sesame").decode()
    assert (await get(base + "/status.json",
                      headers={"Authorization": f"Basic {basic}"}))[0] == 200
    wrong = base64.b64encode(b"ops:guess").decode()
    assert (await get(base + "/status.json",
                      headers={"Authorization": f"Basic {wrong}"}))[0] == 401
    async with aiohttp.ClientSession() as session, session.post(
            base + "/status.json", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 405
    address = _non_loopback_address()
    if address is not None:
        status, _, _ = await get(f"http://{address}:{port}/status.json")
        assert status == 401


def _non_loopback_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_a_listener_off_loopback_without_auth_is_refused_naming_the_line(tmp_path):
    root = write_config_dir(tmp_path / "hp", {"status.ini": status_ini(9126, "",
                                                                       "192.0.2.10")})
    with pytest.raises(ConfigError) as raised:
        StatusSettings.from_config(Config.load(root))
    assert f"{root / 'config' / 'status.ini'}:3" in str(raised.value)
    assert "not a loopback address" in str(raised.value)


# -- in a real browser ---------------------------------------------------------------------


@pytest.fixture
def browser():
    """Headless Chromium from Debian, driven by Selenium through Debian's chromedriver
    (no driver download: the paths are given)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        missing_binary("chromium or chromedriver not found: apt-get install chromium "
                       "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,1800",
                     "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def page_rows(driver) -> dict[str, list[str]]:
    from selenium.webdriver.common.by import By

    return {row.get_attribute("data-domain"): [c.text for c in
                                               row.find_elements(By.TAG_NAME, "td")]
            for row in driver.find_elements(By.CSS_SELECTOR, "#destinations tbody tr")}


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] in ("SEVERE", "ERROR")]


async def test_the_page_in_a_real_browser_shows_the_destinations_chart_and_filter(
        sts_world, browser, tmp_path):
    from selenium.webdriver.common.by import By

    port = free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    world, recorded = await traffic_world(sts_world, status_ini(
        port, f"[auth]\ntoken_file = {tmp_path / 'token'}\n"))
    # Mail through the rest of the day, for the chart.
    for hour in range(1, 10):
        world.env.clock.advance(3600)
        for n in range(hour % 4 + 1):
            await world.env.send(f"erin{hour}.{n}@a.test")
        await world.env.send(f"frank{hour}@plain.test")
        await eventually(lambda: not world.env.spooled())  # delivered (b.test's bounced)
    deferrals = world.env.deferrals()
    await world.env.send("grace@b.test")  # b.test's first message is past its lifetime
    await eventually(lambda: world.env.deferrals() > deferrals)
    recorded = await written(world)
    base = f"http://127.0.0.1:{port}/"
    # A TLS report another sender made about our MX, imported as an operator would.
    report = tmp_path / "big-mail.json"
    report.write_text(json.dumps(RECEIVED))
    imported = await asyncio.to_thread(harakapy, "tlsrpt", "import", "-c",
                                       str(world.env.hp.root), str(report))
    assert imported.returncode == 0, imported.stderr

    def run(call, *args):
        return asyncio.to_thread(call, *args)

    # Without the token nothing but the refusal; with it (once, in the URL) a cookie.
    await run(browser.get, base)
    assert "authentication required" in browser.page_source
    refused = console_errors(browser)  # reading the log empties it
    assert refused and all("401" in line for line in refused), refused
    await run(browser.get, f"{base}?token={TOKEN}")
    try:
        await eventually(lambda: browser.execute_script(
            "return document.body.dataset.loaded") == "yes", timeout=20)
    except TimeoutError:
        raise AssertionError(f"{browser.current_url}: {console_errors(browser)} "
                             f"{browser.page_source[:3000]}") from None
    assert TOKEN not in browser.current_url
    rows = page_rows(browser)
    assert set(rows) == {"a.test", "b.test", "plain.test"}
    for domain, cells in rows.items():
        sessions = [r for r in recorded if r.domain == domain]
        assert cells[3] == str(sum(r.success for r in sessions)), (domain, cells)
        assert cells[4] == str(sum(not r.success for r in sessions)), (domain, cells)
    assert rows["a.test"][1].startswith("mta-sts enforce")
    assert rows["plain.test"][1].startswith("none")
    assert "certificate-host-mismatch" in rows["b.test"][5]
    assert "mx.b.test" in rows["b.test"][7]
    bars = browser.find_elements(By.CSS_SELECTOR, "#chart svg rect.bar")
    assert {bar.get_attribute("class") for bar in bars} == {"bar ok", "bar bad"}
    assert all(float(bar.get_attribute("height")) > 0 for bar in bars)
    queue = browser.find_elements(By.CSS_SELECTOR, "#queue tbody tr")
    assert [row.find_element(By.TAG_NAME, "td").text for row in queue] == ["b.test"]
    sts = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#mta-sts tbody tr")]
    assert any(text.startswith("a.test enforce") for text in sts), sts
    (received,) = browser.find_elements(By.CSS_SELECTOR, "#reports tbody tr")
    assert received.text.split()[:5] == ["Big", "Mail", "mx.harakapy.test", "1", "120"]
    assert "certificate-expired 3" in received.text
    if os.environ.get("HARAKAPY_SCREENSHOT"):
        await run(browser.save_screenshot, os.environ["HARAKAPY_SCREENSHOT"])

    # Sorting: by domain, then the other way.
    header = browser.find_element(By.CSS_SELECTOR, '#destinations th[data-key="domain"]')
    await run(header.click)
    assert list(page_rows(browser)) == ["a.test", "b.test", "plain.test"]
    await run(header.click)
    assert list(page_rows(browser)) == ["plain.test", "b.test", "a.test"]
    # The filter.
    await run(browser.find_element(By.ID, "filter").send_keys, "b.te")
    assert list(page_rows(browser)) == ["b.test"]
    # The week: the same sessions.
    await run(browser.find_element(By.ID, "window-week").click)
    assert list(page_rows(browser)) == ["b.test"]
    assert console_errors(browser) == []
    # No message content reached the page.
    assert "merger" not in browser.page_source and "alice@" not in browser.page_source
