"""The freeze on a real loop-mounted ext4: frozen exactly during CreateSnapshot, always thawed —
after a normal call, an API hang (watchdog timeout), SIGKILL and SIGTERM of hostagent — and
nothing but the call inside the window (no process started, no credentials fetched).

"Frozen" is observed the way CouchDB would feel it: a write from another thread blocks.
AWS is the moto server; for the CLI kill tests a small proxy in front of it holds CreateSnapshot
(the only hand-written part: moto cannot be told to hang a call).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hostagent.aws.clients import AWS
from hostagent.cli import main
from hostagent.flows.snapshot import run_snapshot
from tests.support.cloud import args, context, make_cloud
from tests.support.hosttools import need_root, need_tool, sh

pytestmark = pytest.mark.root

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878  # what `fsfreeze -f/-u` do; the tests need no fsfreeze


def fs_ioctl(mount_point: str, request: int) -> None:
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


def try_thaw(mount_point: str) -> None:
    try:
        fs_ioctl(mount_point, FITHAW)
    except OSError as exc:
        assert exc.errno == errno.EINVAL  # not frozen


def start_write(mount_point: str) -> threading.Event:
    """Create a file from another thread; the event is set once the write went through."""
    done = threading.Event()
    path = os.path.join(mount_point, f"probe-{uuid.uuid4().hex[:8]}")

    def write():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"x")
        os.close(fd)
        done.set()

    threading.Thread(target=write, daemon=True).start()
    return done


def is_frozen(mount_point: str, wait: float = 0.5) -> bool:
    return not start_write(mount_point).wait(wait)


def wait_thawed(mount_point: str, within: float) -> float:
    """Seconds until a write goes through; fails the test if it takes longer than `within`."""
    start = time.monotonic()
    assert start_write(mount_point).wait(within), f"{mount_point} still frozen after {within}s"
    return time.monotonic() - start


def watchdogs_for(mount_point: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"hostagent.freeze" in argv and mount_point.encode() in argv:
            pids.append(int(pid))
    return pids


@pytest.fixture
def ext4(loop_device, host_paths):
    need_root()
    need_tool("mkfs.ext4", "e2fsprogs")
    dev = loop_device("64M")
    mp = host_paths["mount_point"]
    os.makedirs(mp, exist_ok=True)
    sh("mkfs.ext4", "-q", dev)
    sh("mount", dev, mp)
    yield mp
    # Whatever happened, never leave a frozen filesystem behind (umount would hang).
    try_thaw(mp)


@pytest.fixture
def cloud(aws, imds, tmp_path):
    return make_cloud(imds, tmp_path)


def frozen_config(cloud, mp, **snapshot):
    return cloud.config(filesystem={"mount_point": mp},
                        snapshot={"freeze": True, "freeze_timeout": 20, **snapshot})


def test_filesystem_is_frozen_during_create_snapshot_and_thawed_after(cloud, ext4):
    aws = AWS()
    seen = {}

    def during_create(request, **kw):
        seen["write_blocked"] = is_frozen(ext4)
        try:
            fs_ioctl(ext4, FIFREEZE)
            seen["refreeze"] = 0
        except OSError as exc:
            seen["refreeze"] = exc.errno
        seen["watchdogs"] = watchdogs_for(ext4)

    aws.ec2.meta.events.register("before-send.ec2.CreateSnapshot", during_create)
    assert not is_frozen(ext4)
    report = run_snapshot(context(frozen_config(cloud, ext4)), args(no_prune=True), aws=aws)
    assert report.ok
    assert seen["write_blocked"] is True
    assert seen["refreeze"] == errno.EBUSY, "frozen by hostagent, so a second freeze is refused"
    assert len(seen["watchdogs"]) == 1, "exactly one watchdog is armed while frozen"
    wait_thawed(ext4, within=2)
    assert watchdogs_for(ext4) == [], "the watchdog exits once told we thawed"
    tags = cloud.snapshot_tags(report.extra["snapshot_id"])
    assert tags["hostagent:consistency"] == "frozen"
    assert "frozen" in report.items[0]["detail"]


def test_api_hang_is_cut_short_by_the_watchdog(cloud, ext4):
    timeout = 2
    aws = AWS()
    seen = {}

    def hang(request, **kw):
        start = time.monotonic()
        seen["frozen_at_start"] = is_frozen(ext4, wait=0.3)
        seen["thawed_after"] = wait_thawed(ext4, within=timeout + 3) + 0.3
        time.sleep(max(0.0, timeout + 2 - (time.monotonic() - start)))  # hang past the timeout

    aws.ec2.meta.events.register("before-send.ec2.CreateSnapshot", hang)
    report = run_snapshot(context(frozen_config(cloud, ext4, freeze_timeout=timeout)),
                          args(no_prune=True), aws=aws)
    assert seen["frozen_at_start"] is True
    # The watchdog is armed just before the freeze and the hook starts just after it.
    assert 1.0 <= seen["thawed_after"] <= timeout + 1.5, seen
    assert report.ok
    # Part of the call ran unfrozen: the snapshot must not claim to be consistent.
    assert cloud.snapshot_tags(report.extra["snapshot_id"])["hostagent:consistency"] == "crash"
    assert "watchdog" in report.items[0]["detail"]


def test_sigkill_while_frozen_thaws_at_once(ext4):
    """hostagent's freeze functions in a process that is then killed with SIGKILL."""
    code = ("import sys, time\n"
            "from hostagent.freeze import frozen\n"
            "with frozen(sys.argv[1], timeout=60):\n"
            "    print('frozen', flush=True)\n"
            "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, ext4], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert proc.stdout.readline().strip() == "frozen"
        assert is_frozen(ext4)
        assert len(watchdogs_for(ext4)) == 1
        proc.kill()
        proc.wait(5)
        # The watchdog sees its pipe close and thaws at once — far sooner than its 60 s.
        assert wait_thawed(ext4, within=5) < 5
        deadline = time.monotonic() + 5
        while watchdogs_for(ext4) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watchdogs_for(ext4) == []
    finally:
        proc.kill()
        proc.wait()


class HoldCreateSnapshot:
    """An HTTP proxy to moto that holds CreateSnapshot requests until released."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.holding = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if b"Action=CreateSnapshot" in body:
                    proxy.holding.set()
                    proxy.release.wait(60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                req = urllib.request.Request(proxy.upstream + self.path, data=body,
                                             headers=headers, method="POST")
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        status, data, ctype = resp.status, resp.read(), resp.headers.get(
                            "Content-Type", "text/xml")
                except urllib.error.HTTPError as err:
                    status, data, ctype = err.code, err.read(), "text/xml"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client was killed meanwhile

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_hostagent_snapshot_while_frozen_thaws(cloud, ext4, aws, sig):
    """`python -m hostagent snapshot` as cron runs it, killed while CreateSnapshot is held."""
    proxy = HoldCreateSnapshot(aws)
    config = frozen_config(cloud, ext4, freeze_timeout=60)
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "PYTHONPATH": REPO,
           "HOSTAGENT_CONFIG": config}
    proc = subprocess.Popen([sys.executable, "-m", "hostagent", "snapshot", "--no-prune"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)
    try:
        assert proxy.holding.wait(30), proc.stderr.read() if proc.poll() is not None else ""
        assert is_frozen(ext4)
        proc.send_signal(sig)
        rc = proc.wait(10)
        elapsed = wait_thawed(ext4, within=5)
        assert elapsed < 5  # not the 60 s of freeze_timeout
        if sig == signal.SIGTERM:
            assert rc == 128 + signal.SIGTERM  # thawed in `finally`, then exited like a kill
            assert "Traceback" not in proc.stderr.read()
        deadline = time.monotonic() + 5
        while watchdogs_for(ext4) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watchdogs_for(ext4) == []
    finally:
        proc.kill()
        proc.wait()
        proxy.close()


def test_freeze_true_on_a_filesystem_that_cannot_freeze_is_exit_1_and_no_snapshot(
        cloud, host_paths, capsys):
    need_root()
    mp = host_paths["mount_point"]
    os.makedirs(mp, exist_ok=True)
    sh("mount", "-t", "tmpfs", "tmpfs", mp)
    assert main(["--config", frozen_config(cloud, mp), "snapshot"]) == 1
    err = capsys.readouterr().err
    assert "does not support freezing" in err and "freeze = false" in err
    assert cloud.snapshots() == []
    assert watchdogs_for(mp) == []


def test_freeze_true_with_nothing_mounted_refuses_to_freeze_the_parent_fs(cloud, host_paths,
                                                                        capsys):
    mp = host_paths["mount_point"]
    os.makedirs(mp, exist_ok=True)
    assert main(["--config", frozen_config(cloud, mp), "snapshot"]) == 1
    assert "nothing is mounted at" in capsys.readouterr().err
    assert cloud.snapshots() == []


def test_freeze_true_when_the_volume_is_attached_elsewhere_is_exit_1(cloud, ext4, capsys):
    ec2 = cloud.ec2
    ec2.detach_volume(VolumeId=cloud.volume_id, InstanceId=cloud.instance_id)
    other = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                              Placement={"AvailabilityZone": "us-east-1a"})["Instances"][0]
    ec2.attach_volume(VolumeId=cloud.volume_id, InstanceId=other["InstanceId"], Device="/dev/xvdf")
    assert main(["--config", frozen_config(cloud, ext4), "snapshot"]) == 1
    err = capsys.readouterr().err
    assert "not attached to this instance" in err and other["InstanceId"] in err
    assert cloud.snapshots() == []
    assert not is_frozen(ext4)


def test_watchdog_on_its_own_thaws_after_its_timeout(ext4):
    """The watchdog process alone (no hostagent): armed, never told, thaws after 1 s."""
    env = {**os.environ, "PYTHONPATH": REPO}
    fs_ioctl(ext4, FIFREEZE)
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "hostagent.freeze", "watchdog", ext4, "1"],
                            stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=REPO)
    os.close(r)
    try:
        assert proc.stdout.readline() == b"armed\n"
        assert is_frozen(ext4, wait=0.3)
        assert proc.wait(10) == 5  # EXIT_TIMED_OUT
        assert b"thawed" in proc.stderr.read()
        wait_thawed(ext4, within=2)
    finally:
        os.close(w)
        proc.kill()
        proc.wait()


def test_watchdog_thaws_at_once_on_sigterm(ext4):
    """systemd stopping the unit sends SIGTERM to the whole cgroup, the watchdog included."""
    env = {**os.environ, "PYTHONPATH": REPO}
    fs_ioctl(ext4, FIFREEZE)
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "hostagent.freeze", "watchdog", ext4, "60"],
                            stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=REPO)
    os.close(r)
    try:
        assert proc.stdout.readline() == b"armed\n"
        assert is_frozen(ext4, wait=0.3)
        proc.terminate()
        assert proc.wait(10) == 6  # EXIT_TERMINATED, after thawing
        assert wait_thawed(ext4, within=2) < 2
    finally:
        os.close(w)
        proc.kill()
        proc.wait()


def test_no_fsfreeze_program_is_needed(cloud, ext4, monkeypatch):
    """The freeze is an ioctl: with no fsfreeze anywhere hostagent still takes a frozen snapshot."""
    import hostagent.runner as runner

    real_which = runner.which
    monkeypatch.setattr(runner, "which",
                        lambda name: None if name == "fsfreeze" else real_which(name))
    report = run_snapshot(context(frozen_config(cloud, ext4)), args(no_prune=True), aws=AWS())
    assert report.ok
    assert cloud.snapshot_tags(report.extra["snapshot_id"])["hostagent:consistency"] == "frozen"


def test_fifreeze_unsupported_is_an_error_not_a_silent_unfrozen_snapshot(cloud, ext4, monkeypatch,
                                                                        capsys):
    """A kernel or filesystem that does not know FIFREEZE (ENOTTY): exit 1, no snapshot."""
    import hostagent.freeze as freeze_module

    real_ioctl = freeze_module._ioctl

    def no_fifreeze(fd, request):
        if request == freeze_module.FIFREEZE:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        real_ioctl(fd, request)

    monkeypatch.setattr(freeze_module, "_ioctl", no_fifreeze)
    assert main(["--config", frozen_config(cloud, ext4), "snapshot"]) == 1
    err = capsys.readouterr().err
    assert "does not support freezing" in err and "freeze = false" in err
    assert cloud.snapshots() == []
    assert not is_frozen(ext4)
    assert watchdogs_for(ext4) == []


class FreezeWindow:
    """Records, in this process, when FIFREEZE and FITHAW ran and what started in between."""

    def __init__(self, monkeypatch):
        import hostagent.freeze as freeze_module

        self.frozen_at = self.thawed_at = None
        self.spawned_while_frozen: list[str] = []
        real_ioctl = freeze_module._ioctl

        def ioctl(fd, request):
            if request == freeze_module.FITHAW and self.frozen_at and not self.thawed_at:
                self.thawed_at = time.monotonic()
            real_ioctl(fd, request)
            if request == freeze_module.FIFREEZE:
                self.frozen_at = time.monotonic()

        monkeypatch.setattr(freeze_module, "_ioctl", ioctl)
        for module, name in ((os, "posix_spawn"), (os, "posix_spawnp"), (os, "fork"),
                             (subprocess, "Popen")):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, self._watch(name, real))

    def is_frozen(self) -> bool:
        return self.frozen_at is not None and self.thawed_at is None

    def _watch(self, name, real):
        window = self

        if isinstance(real, type):  # subprocess.Popen: keep it a class for isinstance users
            class Watched(real):
                def __init__(self, *a, **kw):
                    if window.is_frozen():
                        window.spawned_while_frozen.append(f"{name} {a[:1]}")
                    super().__init__(*a, **kw)
            return Watched

        def watched(*a, **kw):
            if window.is_frozen():
                window.spawned_while_frozen.append(f"{name} {a[:1]}")
            return real(*a, **kw)
        return watched

    def covers(self, t: float) -> bool:
        return self.frozen_at <= t <= self.thawed_at


CREDENTIAL_PROCESS = r"""
import json, sys, time
from datetime import datetime, timedelta, timezone
with open(sys.argv[1], "a") as log:
    log.write(f"{time.monotonic()}\n")
expires = datetime.now(timezone.utc) + timedelta(minutes=12)
print(json.dumps({"Version": 1, "AccessKeyId": "ASIAHOSTAGENTTEST001",
                  "SecretAccessKey": "test-secret", "SessionToken": "test-token",
                  "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}))
"""


def test_only_the_call_runs_frozen_no_process_and_no_credential_fetch(cloud, ext4, tmp_path,
                                                                     monkeypatch):
    """Credentials that botocore refreshes on every signing (they expire in 12 minutes, inside its
    15-minute advisory window; a credential_process, so each refresh is also a process): the one
    for CreateSnapshot happens before FIFREEZE, and nothing is started while frozen (no fsfreeze,
    no sync, no watchdog, no credential fetch)."""
    script, fetch_log, aws_config = (tmp_path / n for n in ("creds.py", "fetches", "aws-config"))
    script.write_text(CREDENTIAL_PROCESS)
    fetch_log.write_text("")
    aws_config.write_text(f"[default]\ncredential_process = {sys.executable} {script} "
                          f"{fetch_log}\n")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws_config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))

    def fetches() -> list[float]:
        return [float(line) for line in fetch_log.read_text().split()]

    window = FreezeWindow(monkeypatch)
    seen = {}

    def during_create(request, **kw):
        seen.setdefault("frozen_during_call", window.is_frozen())  # returns None: sends

    client = AWS()
    client.ec2.meta.events.register("before-send.ec2.CreateSnapshot", during_create)
    report = run_snapshot(context(frozen_config(cloud, ext4)), args(no_prune=True), aws=client)
    assert report.ok, report.text
    assert seen["frozen_during_call"] is True
    assert window.frozen_at and window.thawed_at
    assert len(fetches()) >= 2, "botocore refreshed these credentials at each signing"
    assert not [t for t in fetches() if window.covers(t)], (
        "credentials were fetched while the filesystem was frozen")
    assert window.spawned_while_frozen == []
    # After the window the client refreshes as botocore always does: it was not left pinned.
    count = len(fetches())
    client.ec2.describe_volumes(VolumeIds=[cloud.volume_id])
    assert len(fetches()) == count + 1


def test_no_extra_call_before_the_freeze_unless_the_connection_sat_idle(cloud, ext4, monkeypatch):
    """The volume lookup's keep-alive connection carries CreateSnapshot; only after a sync long
    enough for the endpoint to drop it (forced here) does one DescribeVolumes re-open it first."""
    import hostagent.aws.ready as ready

    def calls_before_create(idle_safe: float) -> list[str]:
        monkeypatch.setattr(ready, "IDLE_SAFE_SECONDS", idle_safe)
        aws, actions = AWS(), []
        aws.ec2.meta.events.register(
            "before-send.ec2.*", lambda event_name, **kw: actions.append(event_name.split(".")[-1]))
        report = run_snapshot(context(frozen_config(cloud, ext4)), args(no_prune=True), aws=aws)
        assert report.ok, report.text
        return actions[:actions.index("CreateSnapshot")]

    usual = calls_before_create(ready.IDLE_SAFE_SECONDS)
    after_a_long_sync = calls_before_create(0.0)
    assert after_a_long_sync == usual + ["DescribeVolumes"]


def test_serial_less_disk_recorded_as_another_volume_is_refused(cloud, ext4, capsys):
    """A Xen disk (or a loop device) has no NVMe serial: bootstrap's record of which volume it
    mounted there is the evidence, and a disk recorded as another volume is never frozen."""
    from hostagent.adapters.mounts import mount_at, read_mountinfo
    from hostagent.state import VOLUME_RECORD, write_record

    config = frozen_config(cloud, ext4)
    state_dir = os.path.join(cloud.tmp, "state")
    mounted = mount_at(ext4, read_mountinfo())
    write_record(state_dir, VOLUME_RECORD, {"volume_id": "vol-0fffffffffffffff0",
                                            "major_minor": mounted.major_minor})
    assert main(["--config", config, "snapshot"]) == 3
    err = capsys.readouterr().err
    assert "vol-0fffffffffffffff0" in err and cloud.volume_id in err
    assert cloud.snapshots() == []
    assert not is_frozen(ext4)
