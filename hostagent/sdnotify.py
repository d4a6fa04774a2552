"""The systemd notify protocol (sd_notify(3)) spoken directly: one datagram per message to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket

from hostagent.log import get_logger

log = get_logger(__name__)

# systemd caps a notify datagram well above this; STATUS= lines longer than a terminal are noise.
MAX_STATUS_CHARS = 200


def socket_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET → an AF_UNIX address: '@name' is Linux's abstract namespace (leading NUL)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # systemd ≥ 254 can hand out vsock:CID:PORT for VMs; a host agent never runs that way.
    return None


def watchdog_interval(environ=None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is asked.

    WATCHDOG_PID names the process systemd expects pings from; a child that inherited the
    environment must not ping on its parent's behalf (sd_watchdog_enabled(3) does the same check).
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    want_pid = env.get("WATCHDOG_PID")
    if want_pid:
        try:
            if int(want_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000 / 2


class Notifier:
    """Sends state strings to the service manager; silently does nothing outside systemd."""

    def __init__(self, address: str | bytes | None):
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ=None) -> "Notifier":
        env = os.environ if environ is None else environ
        return cls(socket_address(env.get("NOTIFY_SOCKET", "")))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send 'READY=1', 'STATUS=…' … in one datagram; True when the manager got it."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8", errors="replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
            return True
        except OSError as exc:
            # A vanished manager socket must not kill the agent: say it once, keep working.
            if not self._warned:
                log.warning("cannot notify systemd via NOTIFY_SOCKET: %s", exc.strerror or exc)
                self._warned = True
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([status_line(status)] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(status_line(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(text: str) -> str:
    # One line only: a newline would start a new assignment in the datagram.
    flat = " ".join(text.split())
    if len(flat) > MAX_STATUS_CHARS:
        flat = flat[:MAX_STATUS_CHARS - 1] + "…"
    return f"STATUS={flat}"
