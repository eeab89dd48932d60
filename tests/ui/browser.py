#!/usr/bin/env python3
"""The pages under /ui/ in a real browser: headless Chromium driven over WebDriver.

Starts the `account-projector` binary (every role) on a fresh database and a free port, sends it the
signed fixture sequence, then, as a person would: opens /ui/ and is sent to sign-in, signs in with the
API token, searches the fixtures' user, opens the account, reads the timeline (every fixture event,
the changed fields of the refinements), opens "view as of this event" on an older event and sees the
older status, opens a raw payload and the health page, and signs out (after which no page opens).

On every page it checks, and fails on:
- accessibility with axe-core (injected into the page): no serious or critical violation;
- nothing wider than the window at 390 px (a phone);
- the Content-Security-Policy header's value.
Screenshots of each page, wide and at 390 px, are written to target/ui-screenshots/.

    python3 tests/ui/browser.py --binary target/debug/account-projector --axe target/ui-tools/node_modules/axe-core/axe.min.js

Needs: Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver), selenium,
axe-core from npm, and Postgres at TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres).
"""

import argparse
import hashlib
import hmac
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "argyle"
SHOTS = ROOT / "target" / "ui-screenshots"
SECRET = "test_webhook_secret"
TOKEN = "browser-test-token-0123456789"
# The tests' key-encryption key (crates/test-support): never a production key.
DATA_KEY = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM="
ACCOUNT = "0187c66e-e7e5-811c-b006-2232f00f426a"
USER = "018051aa-f7a9-a0db-2f38-6cfa325e9d69"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
DEADLINE = 30.0
PHONE = 390


class Failure(Exception):
    pass


def check(condition, what):
    if not condition:
        raise Failure(what)


def poll(what, probe, deadline=DEADLINE):
    """Returns probe()'s first truthy answer; fails after `deadline` seconds."""
    end = time.monotonic() + deadline
    while True:
        answer = probe()
        if answer:
            return answer
        if time.monotonic() > end:
            raise Failure(f"timed out waiting for {what}")
        time.sleep(0.1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()
    except OSError:
        return None, {}, b""


def psql(server, sql):
    subprocess.run(["psql", server, "-v", "ON_ERROR_STOP=1", "-qc", sql], check=True)


class Service_:
    """The binary, every role, on a database of its own."""

    def __init__(self, binary):
        server = os.environ.get("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
        self.server = server
        self.database = f"ap_ui_{int(time.time())}_{uuid.uuid4().hex[:8]}"
        psql(server, f'CREATE DATABASE "{self.database}"')
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = tempfile.mkdtemp(prefix="ap-ui-")
        env = dict(os.environ,
                   DATABASE_URL=server.rsplit("/", 1)[0] + "/" + self.database,
                   LISTEN_ADDR=f"127.0.0.1:{self.port}",
                   ARGYLE_WEBHOOK_SECRETS=SECRET,
                   API_TOKENS=TOKEN,
                   DATA_KEYS=DATA_KEY,
                   XDG_CONFIG_HOME=self.config,
                   RUST_LOG="warn")
        self.log = open(SHOTS / "service.log", "wb")
        self.process = subprocess.Popen([binary, "serve"], env=env, stdout=self.log, stderr=self.log)
        poll("the service to be ready", lambda: http("GET", self.base + "/readyz")[0] == 200)

    def deliver(self, body):
        signature = hmac.new(SECRET.encode(), body, hashlib.sha512).hexdigest()
        status, _, answer = http("POST", self.base + "/webhooks/argyle", body,
                                 {"Content-Type": "application/json", "X-Argyle-Signature": signature})
        check(status == 200, f"delivery answered {status}: {answer!r}")
        return json.loads(answer)["position"]

    def view(self, account):
        status, _, body = http("GET", f"{self.base}/v1/accounts/{account}",
                               headers={"Authorization": f"Bearer {TOKEN}"})
        return json.loads(body) if status == 200 else None

    def stop(self):
        self.process.terminate()
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = "killed"
        self.log.close()
        psql(self.server, f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        return code


class Browser:
    def __init__(self, base, axe_source):
        self.base = base
        self.axe = axe_source
        self.pages = 0
        self.violations = 0
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        self.profile = tempfile.mkdtemp(prefix="ap-ui-chromium-")
        for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
                     "--window-size=1280,900"]:
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        self.driver.set_page_load_timeout(DEADLINE)

    def open(self, path):
        self.driver.get(self.base + path)

    def find(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css):
        """The element's text, or "" while the page it was on is being replaced."""
        try:
            return self.find(css).text
        except (NoSuchElementException, StaleElementReferenceException):
            return ""

    def path(self):
        return self.driver.execute_script("return location.pathname + location.search")

    def examine(self, name):
        """Every check of a page: CSP, axe-core, no overflow at 390 px, and screenshots."""
        self.pages += 1
        url = self.driver.current_url
        status, headers, _ = http("GET", url, headers={"Cookie": self.cookie_header()})
        check(headers.get("content-security-policy") == CSP,
              f"{name}: Content-Security-Policy is {headers.get('content-security-policy')!r} ({status})")
        self.accessibility(name)
        self.screenshot(name)
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": PHONE, "height": 844, "deviceScaleFactor": 1, "mobile": True})
        try:
            # Reflow, then measure: the page and every element must fit the 390 px window.
            wide = self.driver.execute_script("""
                const width = document.documentElement.clientWidth;
                const over = [];
                for (const el of document.querySelectorAll('body *')) {
                    const r = el.getBoundingClientRect();
                    if (r.width > 0 && (r.right > width + 0.5 || r.left < -0.5)
                        && !el.closest('.visually-hidden, .skip')) {
                        over.push(el.tagName.toLowerCase() + (el.id ? '#' + el.id : '')
                                  + (el.className ? '.' + el.className : '') + ' ' + Math.round(r.right));
                    }
                }
                return {width, scroll: document.documentElement.scrollWidth, over: over.slice(0, 10)};
            """)
            check(wide["width"] == PHONE, f"{name}: the phone window is {wide['width']} px wide")
            check(wide["scroll"] <= wide["width"] and not wide["over"],
                  f"{name}: wider than {PHONE} px: scrollWidth {wide['scroll']}, {wide['over']}")
            self.accessibility(name + " at 390 px")
            self.screenshot(name + "-phone")
        finally:
            self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    def accessibility(self, name):
        self.driver.execute_script(self.axe)
        result = self.driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            axe.run(document, {resultTypes: ['violations']})
               .then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                        nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))))
               .catch(e => done({error: String(e)}));
        """)
        check(isinstance(result, list), f"{name}: axe-core failed: {result}")
        self.violations += len(result)
        for v in result:
            print(f"  axe ({name}): {v['impact']} {v['id']}: {v['help']} at {v['nodes']}")
        serious = [v for v in result if v["impact"] in ("serious", "critical")]
        check(not serious, f"{name}: serious or critical accessibility violations: {serious}")

    def screenshot(self, name):
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        width = self.driver.execute_script("return document.documentElement.clientWidth")
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 6000), "scale": 1}})
        import base64
        (SHOTS / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))

    def cookie_header(self):
        return "; ".join(f"{c['name']}={c['value']}" for c in self.driver.get_cookies())

    def quit(self):
        self.driver.quit()


def run(service, browser):
    b = browser
    # No session: every page sends to sign-in, which comes back to the page asked for.
    b.open("/ui/health")
    check(b.path().startswith("/ui/sign-in?next=%2Fui%2Fhealth"), f"not sent to sign-in: {b.path()}")
    b.open("/ui/")
    check(b.path().startswith("/ui/sign-in"), f"not sent to sign-in: {b.path()}")
    b.examine("sign-in")
    b.find("#token").send_keys("not-the-token-0123456789")
    b.find("form button[type=submit]").click()
    # The answer is the sign-in page again (same address): wait for its message, not the address.
    poll("a wrong token to be refused", lambda: "That token is not accepted here." in b.text("main .problem"))
    b.find("#token").send_keys(TOKEN)
    b.find("main form button[type=submit]").click()
    poll("the start page", lambda: b.path() == "/ui/")
    session = [c for c in b.driver.get_cookies() if c["name"] == "ap_session"]
    check(len(session) == 1, f"one session cookie: {b.driver.get_cookies()}")
    check(session[0]["httpOnly"] and session[0]["sameSite"] == "Strict" and session[0]["path"] == "/ui",
          f"the session cookie's attributes: {session[0]}")
    check(b.driver.execute_script("return document.cookie") == "", "script sees no cookie")
    b.examine("search")

    # Search the fixtures' user, then open the account.
    b.find("#q").send_keys(USER)
    b.find("#q").submit()
    poll("the user page", lambda: b.path() == f"/ui/users/{USER}")
    cards = b.all(".card")
    check(len(cards) == 1, f"one account for the user, got {len(cards)}")
    check("removed" in cards[0].find_element(By.CSS_SELECTOR, ".badge").text, "a status badge")
    b.examine("user")
    cards[0].find_element(By.CSS_SELECTOR, "a").click()
    poll("the account page", lambda: b.path() == f"/ui/accounts/{ACCOUNT}")

    # The timeline: every fixture event, newest first, with the changed fields of each refinement.
    positions = [int(e.get_attribute("data-position")) for e in b.all(".entry")]
    check(positions == list(range(8, 0, -1)), f"timeline positions {positions}")
    check(b.find("#status").text == "removed", f"status now: {b.find('#status').text}")

    def changed(position):
        rows = b.all(f"#event-{position} table.diff tbody tr")
        return {r.find_element(By.CSS_SELECTOR, "th").text:
                (r.find_element(By.CSS_SELECTOR, ".old").text, r.find_element(By.CSS_SELECTOR, ".new").text)
                for r in rows}

    def outcome(position):
        return b.find(f"#event-{position} .entry-head .badge").text

    check(outcome(1) == "changed" and changed(1).get("connection.status") == ("(none)", "connecting"),
          f"#1 {changed(1)}")
    check(changed(2).get("connection.status") == ("connecting", "connected"), f"#2 {changed(2)}")
    check(changed(6).get("connection.status") == ("connected", "error")
          and changed(6).get("connection.error_code") == ("null", "auth_required"), f"#6 {changed(6)}")
    check(changed(7) == {"status": ("active", "removed")}, f"#7 {changed(7)}")
    check(outcome(8) == "unchanged" and changed(8) == {}, f"#8 {outcome(8)} {changed(8)}")
    b.examine("account")

    # The view as of an older event: the older status.
    b.find("#event-2 .actions a[href*='at_position=2']").click()
    poll("the view as of #2", lambda: b.path() == f"/ui/accounts/{ACCOUNT}?at_position=2")
    check(b.find("#status").text == "active", f"status as of #2: {b.find('#status').text}")
    check(b.find("#connection").text == "connection: connected", b.find("#connection").text)
    check("Showing the view as of event #2" in b.find("#as-of").text, "the as-of banner")
    check("selected" in b.find("#event-2").get_attribute("class"), "the event is marked")
    api = service.view(ACCOUNT)
    check(api["last_position"] == 8, "the API still shows the view now")
    b.examine("account-as-of")

    # The raw payload, exactly as received.
    b.find("#event-1 .actions a[href$='/events/1']").click()
    poll("the payload page", lambda: b.path() == f"/ui/accounts/{ACCOUNT}/events/1")
    sent = (FIXTURES / "01_accounts.added.json").read_text()
    shown = b.find("pre.payload").get_attribute("textContent")
    check(shown == sent, "the payload shown is the body as received")
    b.examine("payload")

    b.find("nav a[href='/ui/health']").click()
    poll("the health page", lambda: b.path() == "/ui/health")
    check(b.find("#head").text == "8", f"log head {b.find('#head').text}")
    poll("the projection to catch up", lambda: (b.open("/ui/health"), b.find("#lag").text)[1].startswith("0 "))
    b.examine("health")

    b.open(f"/ui/accounts/{uuid.uuid4()}")
    check(b.find("h1").text == "Not found", f"an unknown account: {b.find('h1').text}")
    b.examine("not-found")

    # Sign out: the session is gone, and pages send to sign-in again.
    b.open("/ui/")
    b.find(".sign-out button").click()
    poll("the signed-out page", lambda: b.path() == "/ui/sign-in?notice=signed_out")
    check("You are signed out." in b.find("main").text, "the sign-out notice")
    b.open(f"/ui/accounts/{ACCOUNT}")
    check(b.path().startswith("/ui/sign-in"), f"a page after sign-out: {b.path()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default=str(ROOT / "target" / "debug" / "account-projector"))
    parser.add_argument("--axe", default=str(ROOT / "target" / "ui-tools" / "node_modules" / "axe-core" / "axe.min.js"))
    args = parser.parse_args()
    SHOTS.mkdir(parents=True, exist_ok=True)
    axe_source = pathlib.Path(args.axe).read_text()
    service = Service_(args.binary)
    browser = None
    try:
        for name in sorted(p.name for p in FIXTURES.glob("0*.json")):
            service.deliver((FIXTURES / name).read_bytes())
        poll("the fixtures to be folded", lambda: (service.view(ACCOUNT) or {}).get("last_position") == 8)
        browser = Browser(service.base, axe_source)
        run(service, browser)
        print(f"ui: {browser.pages} pages checked in Chromium (axe-core: {browser.violations} minor "
              f"or moderate findings, none serious; none wider than {PHONE} px); screenshots in {SHOTS}")
    except Failure as failure:
        if browser:
            browser.screenshot("failure")
        print(f"ui: FAILED: {failure}", file=sys.stderr)
        return 1
    finally:
        if browser:
            browser.quit()
        code = service.stop()
    if code != 0:
        print(f"ui: FAILED: the service exited with {code} on SIGTERM (log: {SHOTS / 'service.log'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
