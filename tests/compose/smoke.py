#!/usr/bin/env python3
"""Compose smoke test: the stack in docker-compose.yml, run without a container engine.

Reads the resolved compose file (`docker-compose config`), then runs each app service's command with
its environment as local processes of the `account-projector` binary against the local Postgres,
service hostnames mapped to 127.0.0.1 and each replica on a port of its own. It waits for every
service's own healthcheck, sends the signed fixtures to the ingest port, reads the result from the
api port, checks that exactly one projector replica leads, stops the leader and checks that the
standby takes over, checks that the notifier delivers a change to a subscriber (signature checked
here with the standard library's HMAC), then stops everything and checks every process exits 0.
Services behind a
profile run too (as `docker compose --profile enricher up` would): the enricher talks to a fake
Argyle API started here, and a webhook without a resource must reach the api with the fetched one.

    python3 tests/compose/smoke.py [--binary target/debug/account-projector]

Needs: docker-compose (Debian's package validates and resolves without a daemon), PyYAML, curl,
pg_isready, and Postgres at 127.0.0.1:5432 accepting the compose file's user.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "argyle"
SECRET = "test_webhook_secret"  # the fixtures' signing key (tests/fixtures/argyle/SIGNATURES.txt)
TOKEN = "compose-smoke-token"
DEADLINE = 60.0
API_KEY = ("compose-smoke-key", "compose-smoke-key-secret")
REAL_ACCOUNT = ROOT / "tests" / "fixtures" / "real-deliveries" / "api" / "get_account.json"


class FakeArgyle(BaseHTTPRequestHandler):
    """Argyle's GET /v2/accounts?limit=1 and GET /v2/accounts/{id}, behind the API key."""

    def do_GET(self):  # noqa: N802 - the handler's name is http.server's
        expected = "Basic " + base64.b64encode(":".join(API_KEY).encode()).decode()
        if self.headers.get("Authorization") != expected:
            return self.answer(401, {"detail": "Invalid credentials."})
        route = urllib.parse.urlsplit(self.path).path.rstrip("/")
        if route == "/v2/accounts":
            return self.answer(200, {"next": None, "previous": None, "results": []})
        if route.startswith("/v2/accounts/"):
            account = json.loads(REAL_ACCOUNT.read_bytes())
            account["id"] = route.rsplit("/", 1)[1]
            return self.answer(200, account)
        return self.answer(404, {"detail": "Not found."})

    def answer(self, status, body):
        data = json.dumps(body, indent=2).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def start_fake_argyle():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeArgyle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Failed(Exception):
    pass


def resolved_compose(env):
    out = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        env=env, check=True, capture_output=True, text=True,
    ).stdout
    return yaml.safe_load(out)


def start_order(services):
    """Services in an order that respects depends_on."""
    order, seen = [], set()

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        for dep in services[name].get("depends_on", {}) or {}:
            visit(dep)
        order.append(name)

    for name in sorted(services):
        visit(name)
    return order


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(what, check, deadline=DEADLINE):
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        try:
            result = check()
            if result:
                return result
        except Exception as error:  # noqa: BLE001 - retried until the deadline
            last = error
        time.sleep(0.2)
    raise Failed(f"timed out waiting for {what}" + (f" (last error: {last})" if last else ""))


def http(method, url, body=None, headers=None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class Stack:
    def __init__(self, binary, database, logs):
        self.binary = binary
        self.database = database
        self.logs = logs
        self.processes = []  # (name, Popen, log path)

    def local_env(self, service_env, hosts, port):
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        for key, value in (service_env or {}).items():
            value = "" if value is None else str(value)
            url = urllib.parse.urlsplit(value)
            if url.scheme and url.hostname in hosts:
                # Map the service hostname to 127.0.0.1 and use this run's own database.
                netloc = url.netloc.replace(f"@{url.hostname}:", "@127.0.0.1:")
                path = f"/{self.database}" if url.scheme.startswith("postgres") else url.path
                value = urllib.parse.urlunsplit((url.scheme, netloc, path, url.query, url.fragment))
            env[key] = value
        if "LISTEN_ADDR" in env:
            env["LISTEN_ADDR"] = f"127.0.0.1:{port}"
        return env

    def spawn(self, name, command, env):
        log = self.logs / f"{name}.log"
        process = subprocess.Popen(
            [self.binary, *command], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        self.processes.append((name, process, log))
        return process

    def stop(self, process, grace=30):
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=grace)

    def dump_logs(self):
        for name, _, log in self.processes:
            print(f"--- {name} (last 30 lines of {log})", file=sys.stderr)
            print("\n".join(log.read_text(errors="replace").splitlines()[-30:]), file=sys.stderr)

    def kill_all(self):
        for _, process, _ in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


class Subscriber(BaseHTTPRequestHandler):
    """An outbound webhook receiver: keeps each POST whose Standard Webhooks signature verifies."""

    secret = None
    received = []

    def do_POST(self):  # noqa: N802 - the handler's name is http.server's
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        key = base64.b64decode(Subscriber.secret.removeprefix("whsec_"))
        signed = f"{self.headers['webhook-id']}.{self.headers['webhook-timestamp']}.".encode() + body
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        signatures = self.headers.get("webhook-signature", "").split(" ")
        if f"v1,{expected}" in signatures:
            Subscriber.received.append(json.loads(body))
            self.send_response(200)
        else:
            self.send_response(400)
        self.end_headers()

    def log_message(self, *args):
        pass


def sign(body):
    return hmac.new(SECRET.encode(), body, hashlib.sha512).hexdigest()


def published_port(service, container_port, replica):
    """The host port compose publishes for `container_port`, for the first replica only."""
    for port in service.get("ports", []) or []:
        if isinstance(port, dict):
            target, published = int(port["target"]), port.get("published")
        else:
            *host, target = str(port).split(":")
            target, published = int(target.split("/")[0]), (host[-1] if host else None)
        if target == container_port and published and replica == 0:
            return int(published)
    return None


def run(binary):
    argyle = start_fake_argyle()
    env = dict(
        os.environ,
        ARGYLE_WEBHOOK_SECRETS=SECRET,
        API_TOKENS=TOKEN,
        # Any 32 bytes, base64: the stack refuses to start without DATA_KEYS.
        DATA_KEYS="c21va2UtdGVzdC1rZXktZW5jcnlwdGlvbi1rZXkhIT8=",
        ARGYLE_API_URL=f"http://127.0.0.1:{argyle.server_address[1]}/v2",
        ARGYLE_API_KEY_ID=API_KEY[0],
        ARGYLE_API_KEY_SECRET=API_KEY[1],
    )
    compose = resolved_compose(env)
    services = compose["services"]
    hosts = set(services)
    database = f"compose_smoke_{os.getpid()}"
    logs = pathlib.Path(tempfile.mkdtemp(prefix="compose-smoke-"))
    stack = Stack(binary, database, logs)
    endpoints = {}  # service -> [local base URL per replica]
    replicas_of = {}  # service -> [Popen per replica]
    try:
        for name in start_order(services):
            service = services[name]
            if service.get("profiles"):
                print(f"compose-smoke: {name}: started too (profiles {service['profiles']})")
            if "build" not in service:
                # Infrastructure (Postgres): the local server stands in for it, and runs the
                # image's first-start scripts (the roles) for this run's database.
                subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], check=True)
                print(f"compose-smoke: {name}: local Postgres is ready")
                run_init_scripts(name, service, database)
                continue
            command = service.get("command") or []
            if isinstance(command, str):
                command = command.split()
            one_shot = str(service.get("restart", "")) == "no"
            replicas = int((service.get("deploy") or {}).get("replicas", 1))
            for replica in range(replicas):
                listen = (service.get("environment") or {}).get("LISTEN_ADDR", "0.0.0.0:8080")
                container_port = int(str(listen).rsplit(":", 1)[1])
                port = published_port(service, container_port, replica) or free_port()
                local = stack.local_env(service.get("environment"), hosts, port)
                if name == "notifier":
                    stack.notifier_env = local
                label = f"{name}-{replica + 1}" if replicas > 1 else name
                process = stack.spawn(label, command, local)
                if one_shot:
                    code = process.wait(timeout=120)
                    if code != 0:
                        raise Failed(f"{label} exited {code}")
                    print(f"compose-smoke: {label}: completed successfully")
                    continue
                endpoints.setdefault(name, []).append(f"http://127.0.0.1:{port}")
                replicas_of.setdefault(name, []).append(process)
                healthcheck = (service.get("healthcheck") or {}).get("test")
                if not healthcheck or healthcheck[0] != "CMD-SHELL":
                    raise Failed(f"{name} has no CMD-SHELL healthcheck")
                # The resolved file keeps `$$` escaped; compose hands the shell a single `$`.
                probe = healthcheck[1].replace("$$", "$")
                poll(
                    f"{label} to be healthy",
                    lambda: process.poll() is None
                    and subprocess.run(["sh", "-c", probe], env=local,
                                       capture_output=True).returncode == 0,
                )
                print(f"compose-smoke: {label}: healthy on port {port}")

        users = session_users(database)
        if users != ["account_projector_service"]:
            raise Failed(f"the app services connect as {users}, not only as the service role")
        print("compose-smoke: every app service connects as account_projector_service")
        check_stack(endpoints, replicas_of, stack)
        for name, process, _ in stack.processes:
            if process.poll() is None:
                code = stack.stop(process)
                if code != 0:
                    raise Failed(f"{name} exited {code} on SIGTERM")
        print("compose-smoke: every service stopped cleanly")
    except Exception:
        stack.dump_logs()
        raise
    finally:
        stack.kill_all()
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc",
             f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'],
            check=False, capture_output=True,
        )


def volume_mounts(service):
    """(host source, container target) of each bind mount."""
    mounts = []
    for volume in service.get("volumes", []) or []:
        if isinstance(volume, dict):
            if volume.get("type", "bind") == "bind":
                mounts.append((volume["source"], volume["target"]))
        else:
            source, target, *_ = str(volume).split(":")
            if source.startswith(("/", ".")):
                mounts.append((str((ROOT / source).resolve()), target))
    return mounts


def on_host(path, mounts):
    """A container path of a bind mount, as the host path it comes from."""
    for source, target in sorted(mounts, key=lambda m: -len(m[1])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source + path[len(target):]
    return path


def run_init_scripts(name, service, database):
    """What the postgres image runs on its first start: /docker-entrypoint-initdb.d/*.sh."""
    mounts = volume_mounts(service)
    scripts = sorted(t for _, t in mounts if t.startswith("/docker-entrypoint-initdb.d/"))
    if not scripts:
        raise Failed(f"{name} has no first-start script for the roles")
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    for key, value in (service.get("environment") or {}).items():
        env[key] = on_host("" if value is None else str(value), mounts)
    env.update(PGHOST="127.0.0.1", PGPORT="5432", POSTGRES_DB=database)
    for script in scripts:
        done = subprocess.run(["sh", on_host(script, mounts)], env=env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise Failed(f"{name}: {script} exited {done.returncode}: {done.stderr}")
        print(f"compose-smoke: {name}: ran {script}")


def session_users(database):
    """The Postgres users of the app's sessions on `database`."""
    out = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-XAtc",
         "SELECT DISTINCT usename FROM pg_stat_activity "
         f"WHERE datname = '{database}' AND application_name LIKE 'account-projector%'"],
        check=True, capture_output=True, text=True,
    ).stdout
    return sorted(out.split())


def check_stack(endpoints, replicas_of, stack):
    ingest, api = endpoints["ingest"][0], endpoints["api"][0]
    auth = {"Authorization": f"Bearer {TOKEN}"}

    positions = []
    for path in sorted(FIXTURES.glob("*.json")):
        body = path.read_bytes()
        status, answer = http("POST", f"{ingest}/webhooks/argyle", body,
                              {"Content-Type": "application/json", "X-Argyle-Signature": sign(body)})
        if status != 200:
            raise Failed(f"{path.name}: ingest answered {status}: {answer!r}")
        positions.append(json.loads(answer)["position"])
    body = (FIXTURES / "03_accounts.updated.json").read_bytes()
    status, answer = http("POST", f"{ingest}/webhooks/argyle", body,
                          {"Content-Type": "application/json", "X-Argyle-Signature": sign(body)})
    if status != 200 or not json.loads(answer)["duplicate"]:
        raise Failed(f"a redelivery was not recognised: {status} {answer!r}")
    status, _ = http("POST", f"{ingest}/webhooks/argyle", body,
                     {"Content-Type": "application/json", "X-Argyle-Signature": "0" * 128})
    if status != 401:
        raise Failed(f"a wrong signature got {status}, not 401")
    print(f"compose-smoke: ingest accepted {len(positions)} fixtures, a redelivery and refused a bad signature")

    fixture = json.loads((FIXTURES / "06_accounts.updated.json").read_bytes())
    account = fixture["data"]["account"]
    status, _ = http("GET", f"{api}/v1/accounts/{account}")
    if status != 401:
        raise Failed(f"the api answered {status} without a token, not 401")

    # The enricher may fetch this account (one fixture has no resource) and append after the
    # fixtures, so wait until the fixtures are folded, then read the view as of the last of them.
    def projected():
        status, answer = http("GET", f"{api}/v1/accounts/{account}", headers=auth)
        view = json.loads(answer) if status == 200 else {}
        return view if view.get("last_position", 0) >= max(positions) else None

    poll("the api to show every fixture folded", projected)
    status, answer = http("GET", f"{api}/v1/accounts/{account}?at_position={max(positions)}",
                          headers=auth)
    view = json.loads(answer) if status == 200 else {}
    if view.get("last_position") != max(positions):
        raise Failed(f"the view as of position {max(positions)} answered {status}: {answer!r}")
    expect = {
        "status": "removed",
        "version": len(positions),
        "resource_updated_at_of": fixture["data"]["resource"]["updated_at"],
    }
    got_updated = view["resource"]["updated_at"]
    if view["status"] != expect["status"] or view["version"] != expect["version"] \
            or got_updated != expect["resource_updated_at_of"]:
        raise Failed(f"unexpected view {view}, expected {expect}")
    print(f"compose-smoke: api shows account {account} at version {view['version']}, {view['status']}")

    # Exactly one projector replica leads.
    def leaders():
        flags = []
        for base in endpoints["projector"]:
            _, text = http("GET", f"{base}/metrics")
            found = re.search(rb"^projector_leader (\S+)$", text, re.MULTILINE)
            flags.append(float(found.group(1)) if found else None)
        return flags if sorted(flags) == [0.0, 1.0] else None

    if len(endpoints["projector"]) != 2:
        raise Failed(f"expected 2 projector replicas, found {len(endpoints['projector'])}")
    flags = poll("one projector leader and one standby", leaders)
    leader = flags.index(1.0)
    print(f"compose-smoke: projector-{leader + 1} leads, the other stands by")

    # Stop the leader; the standby must take over and fold a new event.
    code = stack.stop(replicas_of["projector"][leader])
    if code != 0:
        raise Failed(f"the leading projector exited {code} on SIGTERM")
    fresh = json.loads((FIXTURES / "01_accounts.added.json").read_bytes())
    fresh["data"]["account"] = fresh["data"]["resource"]["id"] = "0187c66e-e7e5-811c-b006-00000000beef"
    body = json.dumps(fresh, indent=2).encode()
    status, answer = http("POST", f"{ingest}/webhooks/argyle", body,
                          {"Content-Type": "application/json", "X-Argyle-Signature": sign(body)})
    if status != 200:
        raise Failed(f"ingest answered {status} after the leader stopped: {answer!r}")
    poll(
        "the standby to take over and fold a new event",
        lambda: http("GET", f"{api}/v1/accounts/{fresh['data']['account']}", headers=auth)[0] == 200,
    )
    print("compose-smoke: the standby took over and folded a new event")

    # A webhook without a resource: the enricher fetches the account from the fake Argyle API.
    bare = json.loads((FIXTURES / "08_accounts.updated.no_resource.json").read_bytes())
    bare["data"]["account"] = "0187c66e-e7e5-811c-b006-00000000cafe"
    body = json.dumps(bare, indent=2).encode()
    status, answer = http("POST", f"{ingest}/webhooks/argyle", body,
                          {"Content-Type": "application/json", "X-Argyle-Signature": sign(body)})
    if status != 200:
        raise Failed(f"ingest answered {status} to a resource-less webhook: {answer!r}")

    def enriched():
        status, answer = http("GET", f"{api}/v1/accounts/{bare['data']['account']}", headers=auth)
        view = json.loads(answer) if status == 200 else {}
        return view if view.get("last_event") == "argyle.account_fetched" else None

    view = poll("the enricher to fetch the account", enriched)
    if view["resource"]["id"] != bare["data"]["account"] or view["connection_status"] != "connected":
        raise Failed(f"unexpected enriched view {view}")
    print("compose-smoke: the enricher fetched a resource-less webhook's account into the api")

    # Outbound webhooks: a subscriber added with the binary, as the notifier's environment has it.
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Subscriber)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    added = subprocess.run([stack.binary, "subscribers", "add", "--url", url],
                           env=stack.notifier_env, capture_output=True, text=True)
    if added.returncode != 0:
        raise Failed(f"subscribers add failed: {added.stderr}")
    Subscriber.secret = next(line.split(": ", 1)[1] for line in added.stdout.splitlines()
                             if line.startswith("secret: "))
    poll(
        "the notifier to deliver the enriched account, signed",
        lambda: any(v.get("account_id") == bare["data"]["account"] for v in Subscriber.received),
    )
    receiver.shutdown()
    print(f"compose-smoke: the notifier delivered {len(Subscriber.received)} signed change(s) to a subscriber")


def main():
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", default=str(ROOT / "target" / "debug" / "account-projector"),
                        help="the account-projector binary standing in for the image's entrypoint")
    args = parser.parse_args()
    try:
        run(args.binary)
    except Failed as failure:
        print(f"compose-smoke: FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
    print("compose-smoke: ok")


if __name__ == "__main__":
    main()
