"""A real CouchDB-compatible server for tests: pouchdb-server 4.2.0 from npm, in memory, on loopback.

Install (CI does this; no native build, ~10 s):
    npm install --prefix .cache/node --omit=optional --no-audit --no-fund pouchdb-server@4.2.0
or point HOSTAGENT_POUCHDB_SERVER at a pouchdb-server executable.

Known differences from CouchDB 3 (see /work/shared/notes): no /_up (404 not_found), a welcome
with "express-pouchdb" instead of "couchdb", admin party by default, and after an admin is set
some unauthenticated writes crash it — so tests that set an admin use a server of their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.hosttools import need

REPO = Path(__file__).resolve().parents[2]
CACHE_BIN = REPO / ".cache" / "node" / "node_modules" / ".bin" / "pouchdb-server"
INSTALL = ("npm install --prefix .cache/node --omit=optional --no-audit --no-fund "
           "pouchdb-server@4.2.0")


def pouchdb_executable() -> str | None:
    explicit = os.environ.get("HOSTAGENT_POUCHDB_SERVER")
    if explicit:
        return explicit
    if CACHE_BIN.exists():
        return str(CACHE_BIN)
    return shutil.which("pouchdb-server")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PouchDBServer:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1"):
        exe = pouchdb_executable()
        need(exe is not None and shutil.which("node") is not None,
             f"needs pouchdb-server (run: {INSTALL})")
        self.exe = exe
        self.host = host
        self.port = port or free_port()
        self.workdir = tempfile.mkdtemp(prefix="pouchdb-")  # it writes config.json and log.txt
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def start(self, wait: bool = True, timeout: float = 30.0) -> "PouchDBServer":
        env = dict(os.environ, NODE_OPTIONS="--unhandled-rejections=warn")
        self.log = open(os.path.join(self.workdir, "stdout.txt"), "wb")
        self.proc = subprocess.Popen(
            [self.exe, "--host", self.host, "--port", str(self.port), "--in-memory", "--no-color"],
            cwd=self.workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pouchdb-server exited {self.proc.returncode}: {self.output()}")
            try:
                if requests.get(self.url + "/", timeout=1,
                                headers={"Accept": "application/json"}).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"pouchdb-server did not answer within {timeout}s: {self.output()}")

    def output(self) -> str:
        try:
            return Path(self.workdir, "stdout.txt").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def set_admin(self, name: str, password: str) -> None:
        import requests

        r = requests.put(f"{self.url}/_config/admins/{name}", data=f'"{password}"',
                         headers={"Accept": "application/json"}, timeout=10)
        r.raise_for_status()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Our own child's session only (start_new_session): node and nothing else.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def pouchdb():
    """One shared in-memory pouchdb-server (admin party: nobody sets an admin on it)."""
    server = PouchDBServer().start()
    yield server
    server.stop()


@pytest.fixture
def pouchdb_factory():
    """Throwaway servers: make(start=False) for late-start tests, one per test that sets an admin."""
    made: list[PouchDBServer] = []

    def make(start: bool = True, **kw) -> PouchDBServer:
        server = PouchDBServer(**kw)
        made.append(server)
        return server.start() if start else server

    yield make
    for server in made:
        server.stop()
