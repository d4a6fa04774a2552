"""The agent for real: a mounted loop device, a NOTIFY_SOCKET we bind, moto's ECS over HTTP,
pouchdb-server as CouchDB, and the ECS introspection stand-in (tests/support/ecs_introspection.py,
a hand-written fake: the ECS agent cannot run here)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest

from tests.support.hosttools import need_tool, sh
from tests.support.pouchdb import pouchdb  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RSS_LIMIT_MB = 45.0


def prepare_mounted_volume(dev: str, paths: dict) -> None:
    """What bootstrap leaves behind: ext4 by UUID in the temp fstab, mounted, the volume's top
    root:root 0700, layout 5984 0755."""
    from hostagent.adapters.fstab import desired_entry, ensure_fstab_entry

    need_tool("mkfs.ext4", "e2fsprogs")
    sh("mkfs.ext4", "-q", "-L", "couchdb", "-m", "0", dev)
    uuid = sh("blkid", "-p", "-s", "UUID", "-o", "value", dev).stdout.strip()
    mp = paths["mount_point"]
    os.makedirs(mp, exist_ok=True)
    ensure_fstab_entry(paths["fstab"], desired_entry(uuid, mp, "ext4",
                                                     "defaults,noatime,nodev,nosuid,noexec", 30))
    sh("mount", "--fstab", paths["fstab"], mp)
    os.chmod(mp, 0o700)
    for d in ("data", "etc", "etc/local.d"):
        path = os.path.join(mp, d)
        os.makedirs(path, exist_ok=True)
        os.chown(path, 5984, 5984)
        os.chmod(path, 0o755)


def write_config(tmp_path, dev, paths, couch_url, introspection_url, interval=1):
    path = tmp_path / "hostagent.toml"
    path.write_text(f"""
[volume]
device = "{dev}"
[filesystem]
mount_point = "{paths['mount_point']}"
fstab = "{paths['fstab']}"
[couchdb]
url = "{couch_url}"
[ecs]
introspection_url = "{introspection_url}"
[agent]
interval = {interval}
[host]
lock_file = "{paths['lock_file']}"
state_dir = "{paths['state_dir']}"
""")
    return str(path)


def register_instance(cluster="gc") -> str:
    import boto3

    ec2, ecs = boto3.client("ec2"), boto3.client("ecs")
    ecs.create_cluster(clusterName=cluster)
    instance_id = ec2.run_instances(ImageId="ami-12345678", MinCount=1,
                                    MaxCount=1)["Instances"][0]["InstanceId"]
    # moto registers only instances that exist in its EC2, named by the identity document.
    doc = json.dumps({"instanceId": instance_id, "region": "us-east-1",
                      "availabilityZone": "us-east-1a"})
    return ecs.register_container_instance(
        cluster=cluster, instanceIdentityDocument=doc)["containerInstance"]["containerInstanceArn"]


def ecs_attributes(arn: str, cluster="gc") -> dict:
    import boto3

    # ListAttributes filtered by attributeName alone returns [] on moto: filter here.
    attrs = boto3.client("ecs").list_attributes(cluster=cluster,
                                                targetType="container-instance")["attributes"]
    return {a["name"]: a.get("value") for a in attrs
            if a.get("targetId") == arn and a["name"].startswith("hostagent.")}


class NotifyListener:
    """The systemd side of sd_notify: a bound AF_UNIX datagram socket, messages with timestamps."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def first(self, needle: str) -> float | None:
        return next((t for t, m in self.messages if needle in m.split("\n")), None)

    def close(self):
        self._stop.set()
        self.thread.join(1)
        self.sock.close()


class Lines:
    def __init__(self, stream):
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream):
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def wait_for(predicate, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def line_time(lines: "Lines", needle: str) -> float | None:
    """When the first line containing needle was read (monotonic), or None."""
    return next((t for t, line in list(lines.lines) if needle in line), None)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_agent_under_notify_socket_reports_ready_then_missing_and_exits_cleanly(
        tmp_path, loop_device, host_paths, aws, introspection, pouchdb):
    dev = loop_device("64M")
    prepare_mounted_volume(dev, host_paths)
    cfg = write_config(tmp_path, dev, host_paths, pouchdb.url, introspection.url)
    arn = register_instance()
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    env = dict(os.environ, NOTIFY_SOCKET=listener.path, WATCHDOG_USEC="1000000",
               PYTHONUNBUFFERED="1")
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen([sys.executable, "-m", "hostagent", "--config", cfg, "agent"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        assert wait_for(lambda: listener.first("READY=1"), 20), (out.text(), err.text())
        ready_msg = next(m for _, m in listener.messages if "READY=1" in m)
        assert "STATUS=persistence=ready couchdb=up" in ready_msg

        # Not registered yet: the agent waits and says so, and puts nothing anywhere.
        assert wait_for(lambda: "ECS: waiting: ECS agent has not registered" in out.text(), 5)
        assert ecs_attributes(arn) == {}
        introspection.register(arn)
        got = wait_for(lambda: ecs_attributes(arn).get("hostagent.persistence") == "ready", 15)
        assert got, (out.text(), err.text())
        assert ecs_attributes(arn)["hostagent.couchdb"] == "up"
        assert "hostagent.volume-id" not in ecs_attributes(arn)  # a loop device has no volume id
        assert "warning: admin-party" in out.text()  # fresh pouchdb-server: admin party

        time.sleep(2.5)  # a few idle rounds: footprint, watchdog pings, no repeated puts
        rss = rss_mb(proc.pid)
        puts_before = out.text().count("ECS: hostagent.persistence=")

        t_umount = time.monotonic()
        sh("umount", host_paths["mount_point"])
        # Seen at once (mountinfo), put as missing, then claimed back by the agent's own
        # `hostagent bootstrap` child (volume.device only: no AWS call) and ready again.
        put_missing = wait_for(lambda: line_time(out, "ECS: hostagent.persistence=missing"), 10)
        assert put_missing, (out.text(), err.text())
        logged = line_time(out, "persistence ready -> missing")
        assert "ECS: hostagent.reason=not-mounted" in out.text()
        back = wait_for(lambda: line_time(out, "persistence missing -> ready"), 20)
        assert back, (out.text(), err.text())
        assert wait_for(lambda: ecs_attributes(arn).get("hostagent.persistence") == "ready", 10)
        assert ecs_attributes(arn)["hostagent.reason"] == "none"
        assert os.path.ismount(host_paths["mount_point"])
        assert "volume: claimed by `hostagent bootstrap`" in out.text()
        lag = put_missing - t_umount
        print(f"\nagent RSS {rss:.1f} MB; umount seen in the log after {(logged - t_umount):.2f}s, "
              f"ECS attribute 'missing' after {lag:.2f}s, mounted again by the agent after "
              f"{back - t_umount:.2f}s")
        assert lag < 3.0  # interval 1 s: within ~2 intervals plus one AWS child call
        assert puts_before == 1  # ready was put once, not every round
        assert rss <= RSS_LIMIT_MB

        pings = [t for t, m in listener.messages if m == "WATCHDOG=1"]
        assert len(pings) >= 6
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) < 1.0  # WATCHDOG_USEC=1 s: a ping at least every half of it (+slack)

        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(5)
        took = time.monotonic() - t_term
        print(f"SIGTERM -> exit {code} in {took * 1000:.0f} ms")
        assert code == 0
        assert took < 1.0
        assert listener.first("STOPPING=1")
        assert "agent stopped (SIGTERM)" in out.text()
        assert "Traceback" not in err.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        listener.close()


def test_agent_once_reports_and_is_idempotent_across_restarts(
        tmp_path, loop_device, host_paths, aws, introspection, pouchdb):
    dev = loop_device("64M")
    prepare_mounted_volume(dev, host_paths)
    arn = register_instance()
    introspection.register(arn)
    cfg = write_config(tmp_path, dev, host_paths, pouchdb.url, introspection.url)

    def once():
        done = subprocess.run([sys.executable, "-m", "hostagent", "--config", cfg, "--json",
                               "agent", "--once"], cwd=REPO, text=True, capture_output=True,
                              timeout=60)
        return done.returncode, json.loads(done.stdout), done

    code, out, done = once()
    assert code == 0, done.stderr
    assert out["persistence"] == "ready" and out["ok"] is True
    assert out["ecs"]["put"] == {"hostagent.persistence": "ready", "hostagent.couchdb": "up",
                                 "hostagent.reason": "none"}
    assert ecs_attributes(arn)["hostagent.persistence"] == "ready"
    # A restarted agent reads ECS's view first and puts nothing that is already there.
    code, out, _ = once()
    assert code == 0 and out["ecs"]["put"] == {}

    sh("umount", host_paths["mount_point"])
    code, out, _ = once()
    assert code == 1 and out["persistence"] == "missing" and out["reason"] == "not-mounted"
    assert out["ecs"]["put"] == {"hostagent.persistence": "missing",
                                 "hostagent.reason": "not-mounted"}
    # --once only reports: it never claims the volume back (the service does).
    assert not os.path.ismount(host_paths["mount_point"])
    assert ecs_attributes(arn)["hostagent.persistence"] == "missing"


def test_degraded_when_mounted_but_a_check_fails(tmp_path, loop_device, host_paths, aws,
                                                 introspection, pouchdb):
    dev = loop_device("64M")
    prepare_mounted_volume(dev, host_paths)
    os.chmod(os.path.join(host_paths["mount_point"], "data"), 0o777)  # wrong mode
    arn = register_instance()
    introspection.register(arn)
    cfg = write_config(tmp_path, dev, host_paths, pouchdb.url, introspection.url)
    done = subprocess.run([sys.executable, "-m", "hostagent", "--config", cfg, "--json", "agent",
                           "--once"], cwd=REPO, text=True, capture_output=True, timeout=60)
    out = json.loads(done.stdout)
    assert done.returncode == 1 and out["persistence"] == "degraded"
    assert ecs_attributes(arn)["hostagent.persistence"] == "degraded"
    assert ecs_attributes(arn)["hostagent.reason"] == "layout-data"


def test_ecs_attributes_against_moto(aws):
    """put/describe through boto3 over HTTP: report on change, and ECS's own view read back."""
    import boto3

    from hostagent.aws import ecs_attributes as ea

    arn = register_instance()
    ecs = boto3.client("ecs")
    assert ea.current_attributes(ecs, "gc", arn, "hostagent") == {}
    want = ea.desired_attributes("hostagent", persistence="ready", volume_id="vol-0123456789abcdef0",
                                 couchdb="up")
    assert ea.put_attributes(ecs, "gc", arn, want) == 3
    assert ea.current_attributes(ecs, "gc", arn, "hostagent") == want
    many = {f"hostagent.extra{i:02d}": "x" for i in range(12)}
    assert ea.put_attributes(ecs, "gc", arn, many) == 12  # two calls: 10 + 2
    assert len(ea.current_attributes(ecs, "gc", arn, "hostagent")) == 15
    # ECS built-ins and other prefixes are not ours.
    assert not any(k.startswith("ecs.") for k in ea.current_attributes(ecs, "gc", arn, "hostagent"))


def make_snapshot(volume_id: str) -> str:
    import boto3

    from hostagent.aws.snapshots import snapshot_tags, tag_specifications

    tags = snapshot_tags(volume_id, {}, "frozen", datetime.now(timezone.utc))
    return boto3.client("ec2").create_snapshot(
        VolumeId=volume_id, TagSpecifications=tag_specifications("snapshot", tags))["SnapshotId"]


def test_aws_worker_child_process_against_moto(aws, imds):
    """The agent's AWS calls run in a child python (boto3 never enters the agent): ECS sync+put,
    the newest snapshot of this volume, and CloudWatch metrics, each answering on its own."""
    import boto3

    from hostagent.flows.agent import call_aws_worker
    from hostagent.metrics import Sample

    imds(instance_id="i-0123456789abcdef0")
    arn = register_instance()
    ec2 = boto3.client("ec2")
    vol = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    assert call_aws_worker({"snapshots": {"volume_id": vol}})["snapshots"] == \
        {"ok": True, "count": 0, "pending": 0, "newest": None}
    snap = make_snapshot(vol)
    other = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    make_snapshot(other)  # another volume's snapshot is never "ours"
    now = datetime.now(timezone.utc)
    answer = call_aws_worker({
        "ecs": {"cluster": "gc", "arn": arn, "prefix": "hostagent", "sync": True,
                "attributes": {"hostagent.persistence": "ready", "hostagent.couchdb": "down"}},
        "snapshots": {"volume_id": vol},
        "metrics": {"namespace": "hostagent-test", "volume_id": None,
                    "samples": [Sample(now, 42.5, 1.5, True).to_json(),
                                Sample(now, 43.0, None, False).to_json()]},
    })
    assert answer["ecs"] == {"ok": True, "put": {"hostagent.persistence": "ready",
                                                 "hostagent.couchdb": "down"}, "current": {}}
    assert answer["snapshots"]["ok"] and answer["snapshots"]["newest"]["id"] == snap
    assert answer["snapshots"]["count"] == 1
    assert answer["metrics"] == {"ok": True, "sent": 5}  # None values are not sent
    metrics = boto3.client("cloudwatch").list_metrics(Namespace="hostagent-test")["Metrics"]
    assert {m["MetricName"] for m in metrics} == {"DiskUsedPercent", "SnapshotAgeHours", "CouchDBUp"}
    assert all(m["Dimensions"] == [{"Name": "InstanceId", "Value": "i-0123456789abcdef0"}]
               for m in metrics)
    # One failing part does not hide the others.
    answer = call_aws_worker({"ecs": {"cluster": "nope", "arn": arn, "prefix": "hostagent",
                                      "sync": True, "attributes": {"hostagent.persistence": "ready"}},
                              "snapshots": {"volume_id": vol}})
    assert answer["ecs"]["ok"] is False and "ecs:" in answer["ecs"]["error"]
    assert answer["snapshots"]["ok"] is True


def test_agent_once_with_volume_id_reports_snapshot_age_and_metrics(
        tmp_path, loop_device, host_paths, aws, introspection, imds, pouchdb):
    import boto3

    from hostagent.state import VOLUME_RECORD, write_record

    imds()
    dev = loop_device("64M")
    prepare_mounted_volume(dev, host_paths)
    vol = boto3.client("ec2").create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    snap = make_snapshot(vol)
    # What bootstrap records; with volume.device set the mount checks still use the device.
    write_record(host_paths["state_dir"], VOLUME_RECORD, {"volume_id": vol, "device": dev})
    arn = register_instance()
    introspection.register(arn)
    cfg = write_config(tmp_path, dev, host_paths, pouchdb.url, introspection.url)
    with open(cfg, "a") as f:
        f.write('[metrics]\nenabled = true\nnamespace = "hostagent-once"\n')
    done = subprocess.run([sys.executable, "-m", "hostagent", "--config", cfg, "--json", "agent",
                           "--once"], cwd=REPO, text=True, capture_output=True, timeout=60)
    out = json.loads(done.stdout)
    assert done.returncode == 0, done.stderr
    assert out["snapshot"]["id"] == snap and 0 <= out["snapshot"]["age_hours"] < 0.1
    assert ecs_attributes(arn) == {"hostagent.persistence": "ready", "hostagent.volume-id": vol,
                                   "hostagent.couchdb": "up", "hostagent.reason": "none"}
    metrics = boto3.client("cloudwatch").list_metrics(Namespace="hostagent-once")["Metrics"]
    assert {m["MetricName"] for m in metrics} == {"DiskUsedPercent", "CouchDBUp", "SnapshotAgeHours"}
    assert all(m["Dimensions"] == [{"Name": "VolumeId", "Value": vol}] for m in metrics)
