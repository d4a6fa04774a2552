"""sd_notify protocol over real AF_UNIX datagram sockets: path and abstract addresses, watchdog env."""

from __future__ import annotations

import os
import socket

import pytest

from hostagent import sdnotify


def bound_socket(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_path_socket_gets_one_datagram_per_message(tmp_path):
    path = str(tmp_path / "notify.sock")
    with bound_socket(path) as server:
        n = sdnotify.Notifier.from_env({"NOTIFY_SOCKET": path})
        assert n.enabled
        assert n.ready("persistence=ready couchdb=up")
        assert server.recv(4096) == b"READY=1\nSTATUS=persistence=ready couchdb=up"
        assert n.watchdog()
        assert server.recv(4096) == b"WATCHDOG=1"
        assert n.stopping()
        assert server.recv(4096) == b"STOPPING=1"
        n.close()


def test_abstract_socket_with_at_sign():
    name = f"hostagent-test-{os.getpid()}"
    with bound_socket(b"\0" + name.encode()) as server:
        n = sdnotify.Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.address == b"\0" + name.encode()
        assert n.status("waiting for ECS")
        assert server.recv(4096) == b"STATUS=waiting for ECS"


def test_no_socket_is_a_silent_no_op():
    n = sdnotify.Notifier.from_env({})
    assert not n.enabled and n.ready() is False and n.watchdog() is False


def test_vanished_socket_does_not_raise(tmp_path, caplog):
    n = sdnotify.Notifier(str(tmp_path / "gone.sock"))
    assert n.watchdog() is False
    assert n.watchdog() is False
    assert sum("NOTIFY_SOCKET" in r.message for r in caplog.records) == 1  # said once


def test_status_is_one_line_and_bounded():
    line = sdnotify.status_line("a\nb\tc " + "x" * 500)
    assert "\n" not in line and line.startswith("STATUS=a b c ")
    assert len(line) <= len("STATUS=") + sdnotify.MAX_STATUS_CHARS


@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "10000000"}, 5.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "4242"}, 5.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(env, expected):
    assert sdnotify.watchdog_interval(env, pid=4242) == expected


def test_socket_address_forms():
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.socket_address("@x") == b"\0x"
    assert sdnotify.socket_address("vsock:2:1234") is None
    assert sdnotify.socket_address("") is None
