"""CouchDB adapter: /_up and welcome interpretation, backoff and deadline, redaction, exposure."""

from __future__ import annotations

import socket
from collections import namedtuple

import pytest

from hostagent.adapters import couchdb as c

Addr = namedtuple("Addr", "ip port")
Conn = namedtuple("Conn", "fd family type laddr raddr status pid")


@pytest.mark.parametrize("code, body, ready, state", [
    (200, {"status": "ok", "seeds": {}}, True, "up"),
    (404, {"status": "maintenance_mode"}, False, "maintenance_mode"),
    (404, {"status": "nolb"}, False, "nolb"),
    (404, {"status": "seeding"}, False, "seeding"),
    (404, {"status": "something_new"}, False, "error"),
    (401, {"error": "unauthorized"}, False, "unauthorized"),
    (500, None, False, "error"),
    (200, {"status": "weird"}, False, "error"),
])
def test_interpret_up_states(code, body, ready, state):
    r = c.interpret_up(code, body)
    assert (r.ready, r.state) == (ready, state)
    assert r.answered


def test_not_ready_states_are_said_by_name():
    assert "maintenance_mode" in c.interpret_up(404, {"status": "maintenance_mode"}).reason


def test_no_up_endpoint_falls_back():
    # pouchdb-server and CouchDB 1.x: 404 not_found means "no /_up here", not "not ready".
    assert c.interpret_up(404, {"error": "not_found", "reason": "no_db_file"}) is None
    assert c.interpret_up(404, {"error": "not_found", "reason": "missing"}) is None


@pytest.mark.parametrize("body, ready", [
    ({"couchdb": "Welcome", "version": "1.7.2"}, True),
    ({"express-pouchdb": "Welcome!", "version": "4.2.0"}, True),
    ({"hello": "nginx"}, False),
    (None, False),  # an HTML page
])
def test_interpret_welcome(body, ready):
    r = c.interpret_welcome(200, body)
    assert r.ready is ready
    assert r.via == "/"


def test_redact_url_strips_credentials_everywhere():
    assert c.redact_url("http://admin:s3cr%40t@localhost:5984/") == "http://localhost:5984/"
    assert c.redact_url("http://admin@[::1]:5984") == "http://[::1]:5984"
    assert c.redact_url("http://localhost:5984") == "http://localhost:5984"
    assert c.url_credentials("http://admin:s3cr%40t@h:1") == ("admin", "s3cr@t")
    assert c.base_url("http://u:p@h:5984/") == "http://h:5984"


def test_url_host_port_defaults():
    assert c.url_host_port("http://localhost.localdomain:5984") == ("localhost.localdomain", 5984)
    assert c.url_host_port("http://couch") == ("couch", 80)
    assert c.url_host_port("https://couch") == ("couch", 443)


def test_unresolvable_localdomain_is_said_plainly_with_the_hosts_line():
    def resolver(host, port, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    msg, hint = c.resolve_problem("http://localhost.localdomain:5984", resolver=resolver)
    assert "localhost.localdomain does not resolve on this host" in msg
    assert "/etc/hosts" in hint and "localhost.localdomain" in hint
    msg, hint = c.resolve_problem("http://couch.internal:5984", resolver=resolver)
    assert "couch.internal does not resolve" in msg and hint is None
    assert c.resolve_problem("http://x:5984", resolver=lambda *a, **k: []) is None


def test_backoff_doubles_from_50ms():
    delays = c.backoff_delays()
    assert [round(next(delays), 3) for _ in range(5)] == [0.05, 0.1, 0.2, 0.4, 0.8]


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class ClockEvent:
    """An Event whose wait() advances the fake clock instead of sleeping."""

    def __init__(self, clock, waits):
        self.clock, self.waits = clock, waits

    def is_set(self):
        return False

    def wait(self, seconds):
        self.waits.append(round(seconds, 4))
        self.clock.t += seconds
        return False


def test_wait_caps_at_250ms_while_refused_and_meets_the_hard_deadline():
    clock, waits = FakeClock(), []
    refused = c.Readiness(False, "down", "connection refused")

    def probe(url, session, timeout):
        return refused

    result = c.wait_until_ready("http://x:1", 2.0, session=object(), clock=clock,
                                stop=ClockEvent(clock, waits), probe=probe)
    assert not result.ready and result.readiness.reason == "connection refused"
    assert waits[:4] == [0.05, 0.1, 0.2, 0.25]
    assert max(waits) == 0.25  # a server that comes up is noticed within ~250 ms
    assert clock.t == pytest.approx(2.0)  # stops exactly at the deadline, not a full step later


def test_wait_backs_off_to_1s_when_the_server_answers_not_ready():
    clock, waits = FakeClock(), []

    def probe(url, session, timeout):
        return c.Readiness(False, "maintenance_mode", "CouchDB says maintenance_mode")

    c.wait_until_ready("http://x:1", 5.0, session=object(), clock=clock,
                       stop=ClockEvent(clock, waits), probe=probe)
    assert max(waits) == 1.0
    assert waits[:5] == [0.05, 0.1, 0.2, 0.4, 0.8]


def test_wait_reports_each_change_once_and_returns_when_ready():
    clock, waits, seen = FakeClock(), [], []
    answers = iter([c.Readiness(False, "down", "connection refused")] * 3 +
                   [c.Readiness(False, "seeding", "CouchDB says seeding")] * 2 +
                   [c.Readiness(True, "up", "GET /_up: 200 status ok")])

    result = c.wait_until_ready("http://x:1", 60, session=object(), clock=clock,
                                stop=ClockEvent(clock, waits), on_change=seen.append,
                                probe=lambda url, session, timeout: next(answers))
    assert result.ready and result.attempts == 6
    assert [r.state for r in seen] == ["down", "seeding", "up"]


def test_request_timeout_never_exceeds_what_is_left():
    clock, timeouts = FakeClock(), []

    def probe(url, session, timeout):
        timeouts.append(timeout)
        clock.t += timeout
        return c.Readiness(False, "down", f"timed out after {timeout:.1f}s")

    c.wait_until_ready("http://x:1", 7.0, session=object(), clock=clock,
                       stop=ClockEvent(clock, []), probe=probe)
    assert timeouts[0] == c.READ_TIMEOUT
    assert all(t <= c.READ_TIMEOUT for t in timeouts)
    assert clock.t <= 7.0 + c.MIN_REQUEST_TIMEOUT


def test_zero_timeout_probes_exactly_once():
    calls = []
    result = c.wait_until_ready("http://x:1", 0, session=object(),
                                probe=lambda url, session, timeout: calls.append(1) or
                                c.Readiness(False, "down", "connection refused"))
    assert len(calls) == 1 and not result.ready


def conn(ip, port, status="LISTEN", pid=None):
    return Conn(3, socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM,
                Addr(ip, port), (), status, pid)


@pytest.mark.parametrize("ip, exposed", [
    ("0.0.0.0", True), ("::", True), ("10.0.1.17", True), ("fe80::1%eth0", True),
    ("127.0.0.1", False), ("127.0.0.53", False), ("::1", False), ("::ffff:127.0.0.1", False),
])
def test_exposed_listeners_ignore_loopback_only(ip, exposed):
    found = c.exposed_listeners(5984, [conn(ip, 5984)])
    assert bool(found) is exposed


def test_exposure_ignores_other_ports_and_non_listening_sockets():
    conns = [conn("0.0.0.0", 5985), conn("0.0.0.0", 5984, status="ESTABLISHED")]
    assert c.exposed_listeners(5984, conns) == []
    check = c.exposure_check("http://localhost.localdomain:5984", conns)
    assert check.ok is True


def test_exposure_check_names_the_address():
    check = c.exposure_check("http://u:p@localhost:5984", [conn("0.0.0.0", 5984)])
    assert check.ok is False and "0.0.0.0:5984" in check.detail
    assert "p@" not in check.detail


def test_describe_request_error_refused_and_timeout():
    import requests

    with socket.socket() as s:  # a port that was just free: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(requests.RequestException) as info:
        requests.get(f"http://127.0.0.1:{port}/", timeout=1)
    assert c.describe_request_error(info.value, 1).reason == "connection refused"
    r = c.describe_request_error(requests.exceptions.ReadTimeout("read timed out"), 2.0)
    assert r.reason == "timed out after 2.0s" and r.state == "down"


def test_wait_and_check_need_a_url(tmp_path, capsys):
    from hostagent.cli import main

    cfg = tmp_path / "hostagent.toml"
    cfg.write_text('[volume]\ndevice = "/dev/loop9"\n[couchdb]\nurl = ""\n')
    for command in ("wait-couchdb", "check-couchdb"):
        assert main(["--config", str(cfg), command]) == 2
        assert "couchdb.url is not set" in capsys.readouterr().err


def test_negative_timeout_is_bad_usage(tmp_path, capsys):
    from hostagent.cli import main

    cfg = tmp_path / "hostagent.toml"
    cfg.write_text('[volume]\ndevice = "/dev/loop9"\n')
    assert main(["--config", str(cfg), "wait-couchdb", "--timeout", "-1"]) == 2
    assert "--timeout must be zero or more" in capsys.readouterr().err
