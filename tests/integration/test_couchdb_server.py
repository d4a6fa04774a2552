"""wait-couchdb and check-couchdb against real servers: pouchdb-server (CouchDB-compatible, no /_up)
and, for CouchDB 3's /_up states that nothing here can produce, the small CouchUpServer fake."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from hostagent.adapters import couchdb
from tests.support.couch_up_server import CouchUpServer
from tests.support.pouchdb import free_port, pouchdb, pouchdb_factory  # noqa: F401 (fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_config(tmp_path, url: str, timeout: int = 5) -> str:
    path = tmp_path / "hostagent.toml"
    path.write_text(f'[volume]\ndevice = "/dev/loop99"\n[couchdb]\nurl = "{url}"\n'
                    f"timeout = {timeout}\n")
    return str(path)


def hostagent(*argv, timeout=60):
    return subprocess.run([sys.executable, "-m", "hostagent", *argv], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def test_wait_couchdb_up_falls_back_to_the_welcome(tmp_path, pouchdb):
    cfg = write_config(tmp_path, pouchdb.url)
    done = hostagent("--config", cfg, "wait-couchdb", "--timeout", "10")
    assert done.returncode == 0, done.stderr
    assert "CouchDB ready at" in done.stdout and "PouchDB Server 4.2.0 welcome (no /_up)" in done.stdout
    done = hostagent("--config", cfg, "--json", "wait-couchdb")
    out = json.loads(done.stdout)
    assert out["ok"] is True and out["couchdb"]["via"] == "/" and out["couchdb"]["state"] == "up"


def test_wait_couchdb_down_exits_1_with_url_and_reason(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, f"http://admin:hunter2@127.0.0.1:{port}")
    start = time.monotonic()
    done = hostagent("--config", cfg, "wait-couchdb", "--timeout", "1.5")
    took = time.monotonic() - start
    assert done.returncode == 1
    err = done.stderr.strip().splitlines()[-1]
    assert err == (f"hostagent: error: CouchDB not ready after 1.5s: connection refused "
                   f"(http://127.0.0.1:{port})")
    assert "hunter2" not in done.stderr + done.stdout and "admin@" not in done.stderr
    assert took < 1.5 + 2.0  # hard deadline (plus interpreter start-up)


def test_late_start_is_noticed_within_about_250ms(pouchdb_factory):
    """Start waiting, start pouchdb-server 1 s later; compare with a 5 ms poller watching it."""
    server = pouchdb_factory(start=False)
    first_answer: list[float] = []
    stop = threading.Event()

    def watcher():  # a tight reference loop: when did the server first answer at all?
        s = requests.Session()
        while not stop.is_set():
            try:
                if s.get(server.url + "/", timeout=0.5).status_code == 200:
                    first_answer.append(time.monotonic())
                    return
            except requests.RequestException:
                pass
            time.sleep(0.005)

    result: list = []
    waiter = threading.Thread(target=lambda: result.append(
        (couchdb.wait_until_ready(server.url, 30), time.monotonic())))
    t0 = time.monotonic()
    waiter.start()
    threading.Thread(target=watcher, daemon=True).start()
    time.sleep(1.0)
    server.start(wait=False)
    waiter.join(40)
    stop.set()
    (wait_result, detected_at), = result
    assert wait_result.ready and wait_result.readiness.via == "/"
    assert first_answer, "the reference poller never saw the server"
    lag = detected_at - first_answer[0]
    print(f"\nserver answered {first_answer[0] - t0:.3f}s after the wait began; "
          f"wait-couchdb noticed {lag * 1000:.0f} ms later ({wait_result.attempts} probes)")
    assert detected_at - t0 > 1.0
    assert lag < 0.4  # 250 ms cap + one probe, with slack for a loaded CI machine


@pytest.fixture
def up_server():
    servers = []

    def make(states):
        srv = CouchUpServer(states).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


def test_up_states_are_not_ready_and_said_so(tmp_path, up_server):
    srv = up_server(["maintenance_mode", "maintenance_mode", "nolb", "seeding", "ok"])
    cfg = write_config(tmp_path, srv.url)
    done = hostagent("--config", cfg, "wait-couchdb", "--timeout", "20")
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("hostagent: couchdb:")]
    assert said == ["hostagent: couchdb: CouchDB says maintenance_mode (GET /_up: 404)",
                    "hostagent: couchdb: CouchDB says nolb (GET /_up: 404)",
                    "hostagent: couchdb: CouchDB says seeding (GET /_up: 404)",
                    "hostagent: couchdb: GET /_up: 200 status ok"]
    assert srv.up_requests() == 5
    assert all(h.get("Accept") == "application/json" for _, h in srv.requests)


def test_maintenance_until_the_deadline_fails_with_the_state(tmp_path, up_server):
    srv = up_server(["maintenance_mode"])
    cfg = write_config(tmp_path, srv.url)
    done = hostagent("--config", cfg, "wait-couchdb", "--timeout", "1")
    assert done.returncode == 1
    assert "CouchDB not ready after 1s: CouchDB says maintenance_mode (GET /_up: 404)" in done.stderr
    # Once the server answers, backoff grows toward 1 s: a handful of probes, not hundreds.
    assert srv.up_requests() <= 8


def test_check_couchdb_flags_admin_party_on_a_fresh_server(tmp_path, pouchdb):
    cfg = write_config(tmp_path, pouchdb.url)
    done = hostagent("--config", cfg, "--json", "check-couchdb")
    assert done.returncode == 1
    out = json.loads(done.stdout)
    checks = {c["name"]: c for c in out["checks"]}
    assert checks["ready"]["ok"] is True
    assert checks["admin-party"]["ok"] is False and "_admin" in checks["admin-party"]["detail"]
    assert checks["exposed-port"]["ok"] is True  # bound to 127.0.0.1
    human = hostagent("--config", cfg, "check-couchdb")
    assert "WARN    admin-party" in human.stdout


def test_check_couchdb_secured_after_an_admin_is_set(tmp_path, pouchdb_factory):
    # Its own server: after an admin exists, unauthenticated writes can crash pouchdb-server.
    server = pouchdb_factory()
    server.set_admin("operator", "s3cret-pw")
    # Credentials in the URL must neither be printed nor used by the anonymous probes: if they
    # were sent, /_session would show _admin and this would wrongly say "admin party".
    url = server.url.replace("http://", "http://operator:s3cret-pw@")
    cfg = write_config(tmp_path, url)
    done = hostagent("--config", cfg, "--json", "check-couchdb")
    out = json.loads(done.stdout)
    checks = {c["name"]: c for c in out["checks"]}
    assert checks["admin-party"]["ok"] is True, checks
    assert "401" in checks["admin-party"]["detail"]
    assert done.returncode == 0 and out["ok"] is True
    assert "s3cret-pw" not in done.stdout + done.stderr
    assert server.proc.poll() is None  # our probes did not crash it


def test_check_couchdb_warns_when_listening_beyond_loopback(tmp_path, pouchdb_factory):
    server = pouchdb_factory(host="0.0.0.0")
    cfg = write_config(tmp_path, server.url)
    done = hostagent("--config", cfg, "--json", "check-couchdb")
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["exposed-port"]["ok"] is False
    assert f"0.0.0.0:{server.port}" in checks["exposed-port"]["detail"]
    assert "node" in checks["exposed-port"]["detail"]  # names the process, as docker-proxy would be
    assert done.returncode == 1


def test_unresolvable_localdomain_is_said_plainly(tmp_path):
    try:
        socket.getaddrinfo("localhost.localdomain", 5984)
        pytest.skip("localhost.localdomain resolves on this host")
    except socket.gaierror:
        pass
    cfg = write_config(tmp_path, "http://localhost.localdomain:5984")
    start = time.monotonic()
    done = hostagent("--config", cfg, "wait-couchdb", "--timeout", "30")
    assert done.returncode == 1
    assert time.monotonic() - start < 10  # said at once, not after the 30 s timeout
    assert "localhost.localdomain does not resolve on this host" in done.stderr
    assert "hint: add `127.0.0.1 localhost localhost.localdomain` to /etc/hosts" in done.stderr
