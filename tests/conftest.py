"""Shared fixtures: real loop devices, a temp fstab and mount point, moto and IMDSv2 servers."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.support.hosttools import need_root, need_tool, sh, unmount_everything_under

# moto must not load its ~1,300 built-in snapshots/AMIs (makes OwnerIds=['self'] listings lie).
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def loop_device(tmp_path):
    """Factory: make_loop(size="64M") -> '/dev/loopN' backed by a sparse file; always detached."""
    need_root()
    need_tool("losetup", "util-linux")
    made: list[tuple[str, str]] = []

    def make(size: str = "64M", name: str | None = None) -> str:
        backing = tmp_path / (name or f"disk{len(made)}.img")
        sh("truncate", "-s", size, backing)
        dev = sh("losetup", "--show", "-f", backing).stdout.strip()
        made.append((dev, str(backing)))
        return dev

    yield make
    for dev, _ in reversed(made):
        out = sh("findmnt", "-rn", "-S", dev, "-o", "TARGET", check=False).stdout.split()
        for target in sorted(out, key=len, reverse=True):
            sh("umount", "-l", target, check=False)
        # Partitions made on a loop can outlive `losetup -d` on this kernel: drop them first.
        sh("partx", "-d", dev, check=False)
        sh("losetup", "-d", dev, check=False)


@pytest.fixture
def host_paths(tmp_path):
    """A temp mount point, fstab, lock file and state dir; unmounted and un-chattr'd afterwards."""
    mp = tmp_path / "opt" / "couchdb"
    fstab = tmp_path / "etc" / "fstab"
    fstab.parent.mkdir(parents=True)
    fstab.write_text("# test fstab\nUUID=0000-1111 /boot/efi vfat defaults 0 2\n")
    paths = {"mount_point": str(mp), "fstab": str(fstab), "lock_file": str(tmp_path / "lock"),
             "state_dir": str(tmp_path / "state"), "root": str(tmp_path)}
    yield paths
    unmount_everything_under(str(tmp_path))
    # The root-disk guard makes the bare mount point immutable; tmp_path cleanup needs it undone.
    if mp.exists():
        subprocess.run(["chattr", "-i", str(mp)], capture_output=True)


def write_config(tmp_path, body: str) -> str:
    path = tmp_path / "hostagent.toml"
    path.write_text(body)
    return str(path)


@pytest.fixture(scope="session")
def moto_server():
    """A real moto server on loopback, spoken to over HTTP by boto3 (not in-process mocks)."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    yield url
    server.stop()


@pytest.fixture
def aws(moto_server, monkeypatch):
    """Point boto3 at the moto server with dummy credentials; reset moto's state per test."""
    import requests

    requests.post(f"{moto_server}/moto-api/reset", timeout=10)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_server


@pytest.fixture
def fidelity(aws, monkeypatch):
    """The EC2 fidelity proxy (tests/support/ec2_fidelity.py) in front of the session moto server,
    fresh per test on its own port: boto3 and `python -m hostagent` reach it via AWS_ENDPOINT_URL,
    and meet EC2's refusals, delays and eventual consistency that moto alone does not play."""
    from tests.support.ec2_fidelity import EC2Fidelity

    proxy = EC2Fidelity(aws).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.stop()


@pytest.fixture
def introspection():
    """A stand-in for the ECS agent's introspection API (cluster "gc"), on loopback."""
    from tests.support.ecs_introspection import IntrospectionServer

    srv = IntrospectionServer(cluster="gc").start()
    yield srv
    srv.stop()


@pytest.fixture
def imds(monkeypatch):
    """Factory for an IMDSv2 test server; sets AWS_EC2_METADATA_SERVICE_ENDPOINT to it."""
    from tests.support.imds import IMDSServer

    servers = []

    def make(**kw) -> IMDSServer:
        srv = IMDSServer(**kw).start()
        servers.append(srv)
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", srv.url)
        return srv

    yield make
    for srv in servers:
        srv.stop()
