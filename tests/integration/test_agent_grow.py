"""The agent's capacity reconcilers, in a real `hostagent agent` process: the filesystem grown when
the device grew (a console resize), and auto-grow running `hostagent grow --size N --json` children
against moto behind the EC2 fidelity proxy (a shrink and a second modification within 6 h refused
as EC2 does), the IMDSv2 test server, a real loop device and ext4, moto's ECS with the ECS
introspection stand-in.

As in test_grow.py, the test plays EC2's other side: when the proxy says the volume grew, the loop
device grows (sparse backing file, `losetup -c`). Online resize needs CAP_SYS_RESOURCE: where the
machine lacks it (this sandbox), the refused resize is what the agent meets, and the tests check
what it does about that; the successful resize is checked where the capability exists.
Every agent has its own [host] lock_file and state_dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from tests.integration.test_agent import REPO, Lines, NotifyListener, ecs_attributes, wait_for
from tests.integration.test_grow import (GIB, NAME, fs_bytes, mount_id, run_hostagent,
                                         write_config, write_data)
from tests.support.ecs_introspection import register_with_ecs
from tests.support.hosttools import (CAP_SYS_RESOURCE, WITHOUT_SYS_RESOURCE,
                                     fill_to_free_percent, grow_loop, has_capability,
                                     need_online_resize, need_root, need_tool)

pytestmark = pytest.mark.root
AZ = "us-east-1a"
CAN_RESIZE = has_capability(CAP_SYS_RESOURCE)


class Agent:
    def __init__(self, config: str, tmp_path, *, drop_resize: bool = False):
        self.listener = NotifyListener(str(tmp_path / f"notify-{os.urandom(3).hex()}.sock"))
        env = dict(os.environ, NOTIFY_SOCKET=self.listener.path, WATCHDOG_USEC="4000000",
                   PYTHONUNBUFFERED="1", PYTHONPATH=REPO)
        env.pop("JOURNAL_STREAM", None)
        prefix = list(WITHOUT_SYS_RESOURCE) if drop_resize else []
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "hostagent", "--config",
                                      config, "agent"], cwd=REPO, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = Lines(self.proc.stdout), Lines(self.proc.stderr)

    def logs(self) -> str:
        return f"--- stdout\n{self.out.text()}\n--- stderr\n{self.err.text()}"

    def status(self) -> str:
        found = [m for _, m in self.listener.messages if "STATUS=" in m]
        return found[-1] if found else ""

    def says(self, needle: str, timeout: float) -> bool:
        return wait_for(lambda: needle in self.out.text(), timeout)

    def stop(self) -> int:
        wait_for(lambda: self.status() and "grow=volume" not in self.status(), 60)
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.listener.close()


@pytest.fixture
def cloud(fidelity, imds, introspection, loop_device, host_paths):
    """This instance registered with ECS, its 1 GiB tagged volume attached in moto, the loop
    device that is its disk, and EC2's side growing that loop device."""
    import boto3

    need_root()
    need_tool("resize2fs", "e2fsprogs")
    need_tool("setpriv", "util-linux")
    ec2, ecs = boto3.client("ec2"), boto3.client("ecs")
    me = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                           Placement={"AvailabilityZone": AZ})["Instances"][0]["InstanceId"]
    imds(instance_id=me, region="us-east-1", availability_zone=AZ)
    arn = register_with_ecs(ecs, me, introspection, az=AZ)
    vid = ec2.create_volume(AvailabilityZone=AZ, Size=1, TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": "Name", "Value": NAME}]}])["VolumeId"]
    ec2.attach_volume(VolumeId=vid, InstanceId=me, Device="/dev/xvdf")
    dev = loop_device("1G")
    fidelity.on_volume_grown(lambda volume_id, size: grow_loop(dev, size * GIB))
    return {"ec2": ec2, "vid": vid, "dev": dev, "arn": arn, "fidelity": fidelity,
            "paths": host_paths, "mp": host_paths["mount_point"], "url": introspection.url}


def auto_grow_config(cloud, **capacity) -> str:
    caps = {"auto_grow": True, "grow_when_free_below": 15, "grow_by_percent": 50,
            "max_size_gib": 4, **capacity}
    return write_config(cloud["paths"], cloud["dev"], filesystem={"min_free_percent": 5},
                        couchdb={"url": ""}, ecs={"introspection_url": cloud["url"]},
                        agent={"interval": 1}, snapshot={"freeze": False}, capacity=caps)


def test_agent_grows_the_filesystem_after_a_console_resize(tmp_path, loop_device, host_paths):
    need_root()
    need_tool("setpriv", "util-linux")
    dev = loop_device("1G")
    config = write_config(host_paths, dev, tags=False, couchdb={"url": ""},
                          ecs={"introspection_url": ""}, agent={"interval": 1})
    assert run_hostagent(config, "bootstrap").returncode == 0
    mp = host_paths["mount_point"]
    path, data = write_data(mp)
    before_mount, before_fs = mount_id(mp), fs_bytes(dev)

    # Without CAP_SYS_RESOURCE (a unit or container lacking it): said once, retried with
    # backoff, the volume stays mounted, ready and untouched.
    agent = Agent(config, tmp_path, drop_resize=True)
    try:
        assert wait_for(lambda: "persistence=ready" in agent.status(), 20), agent.logs()
        grow_loop(dev, 2 * GIB)  # the console resize
        assert agent.says("filesystem: growing failed: the kernel refused to grow the ext4", 20), \
            agent.logs()
        assert "CAP_SYS_RESOURCE" in agent.out.text()
        assert wait_for(lambda: "grow=fs-failed" in agent.status(), 10), agent.status()
        assert "persistence=ready" in agent.status()
        wait_for(lambda: False, 4)  # a few rounds more
        assert agent.out.text().count("filesystem: growing failed") == 1, agent.logs()
        assert agent.out.text().count("growing it online") == 1, agent.logs()
        assert mount_id(mp) == before_mount and fs_bytes(dev) == before_fs
        assert agent.stop() == 0
        assert "Traceback" not in agent.err.text()
    finally:
        agent.close()

    need_online_resize()
    agent = Agent(config, tmp_path)
    try:
        assert agent.says("filesystem: ext4 1 GiB -> 2 GiB, online in", 30), agent.logs()
        assert fs_bytes(dev) > 1.98 * GIB and mount_id(mp) == before_mount
        with open(path, "rb") as f:
            assert f.read() == data
        assert wait_for(lambda: "persistence=ready" in agent.status()
                        and "grow=" not in agent.status(), 10), agent.status()
        assert agent.stop() == 0
    finally:
        agent.close()


def test_auto_grow_grows_the_volume_once_then_waits_out_the_6_h_across_a_restart(tmp_path,
                                                                                 cloud):
    config = auto_grow_config(cloud)
    assert run_hostagent(config, "bootstrap").returncode == 0
    mp, dev, fid = cloud["mp"], cloud["dev"], cloud["fidelity"]
    path, data = write_data(mp)
    fill_to_free_percent(mp, 10)
    agent = Agent(config, tmp_path)
    try:
        assert agent.says("capacity: growing the volume to 2 GiB with `hostagent grow`", 30), \
            agent.logs()
        done = "capacity: grown to 2 GiB" if CAN_RESIZE else "capacity: `hostagent grow --size 2`"
        assert agent.says(done, 60), agent.logs()
        assert fid.count("ModifyVolume") == 1
        assert cloud["ec2"].describe_volumes(VolumeIds=[cloud["vid"]])["Volumes"][0]["Size"] == 2
        record = json.load(open(os.path.join(cloud["paths"]["state_dir"], "capacity.json")))
        assert record["volume_id"] == cloud["vid"] and record["to_gib"] == 2
        snaps = cloud["ec2"].describe_snapshots(OwnerIds=["self"])["Snapshots"]
        assert [t["Value"] for s in snaps for t in s["Tags"]
                if t["Key"] == "hostagent:before-grow"] == ["1 to 2 GiB"]
        if CAN_RESIZE:
            assert fs_bytes(dev) > 1.98 * GIB
            fill_to_free_percent(mp, 10, name="more")  # full again within the 6 h
            assert agent.says("EC2 allows one modification per volume per 6 h: the next from",
                              20), agent.logs()
        else:  # the child's resize was refused; the agent's own attempt is refused too
            assert "(resize-denied)" in agent.out.text(), agent.logs()
            assert agent.says("filesystem: growing failed", 20), agent.logs()
        wait_for(lambda: False, 4)
        assert agent.stop() == 0
        assert "Traceback" not in agent.err.text()
    finally:
        agent.close()
    # A restart does not reset the cool-down: it is kept in the state dir.
    agent = Agent(config, tmp_path)
    try:
        assert wait_for(lambda: "persistence=" in agent.status(), 20), agent.logs()
        wait_for(lambda: False, 5)
        assert fid.count("ModifyVolume") == 1, agent.logs()
        assert "growing the volume" not in agent.out.text(), agent.logs()
        assert agent.stop() == 0
    finally:
        agent.close()
    with open(path, "rb") as f:
        assert f.read() == data


def test_a_recorded_modification_holds_auto_grow_back_for_6_h(tmp_path, cloud):
    """The record a grow leaves (here written as if one ran an hour ago) is what a new agent
    process goes by: nothing is modified before the 6 h are over, and it says until when."""
    config = auto_grow_config(cloud)
    assert run_hostagent(config, "bootstrap").returncode == 0
    an_hour_ago = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    with open(os.path.join(cloud["paths"]["state_dir"], "capacity.json"), "w") as f:
        json.dump({"volume_id": cloud["vid"], "last_modification_at": an_hour_ago.isoformat(),
                   "from_gib": 1, "to_gib": 1}, f)
    fill_to_free_percent(cloud["mp"], 10)
    agent = Agent(config, tmp_path)
    try:
        until = an_hour_ago + timedelta(hours=6)
        assert agent.says(f"the next from {until:%Y-%m-%d %H:%M} UTC", 20), agent.logs()
        wait_for(lambda: False, 3)
        assert cloud["fidelity"].count("ModifyVolume") == 0
        assert "persistence=ready" in agent.status()  # waiting is not a failure
        assert ecs_attributes(cloud["arn"]).get("hostagent.persistence") == "ready"
        assert agent.stop() == 0
    finally:
        agent.close()
    verify = run_hostagent(config, "verify-mount", "--json")
    assert verify.returncode == 0, verify.stdout
    [check] = [c for c in json.loads(verify.stdout)["checks"] if c["name"] == "capacity"]
    assert check["ok"] and "the next from" in check["detail"]


def test_at_the_cap_verify_mount_fails_capacity_and_ecs_says_degraded(tmp_path, cloud):
    config = auto_grow_config(cloud, max_size_gib=1)
    assert run_hostagent(config, "bootstrap").returncode == 0
    fill_to_free_percent(cloud["mp"], 10)
    verify = run_hostagent(config, "verify-mount", "--json")
    assert verify.returncode == 1, verify.stdout
    failed = [c for c in json.loads(verify.stdout)["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["capacity"]
    assert "at capacity.max_size_gib = 1" in failed[0]["detail"]
    agent = Agent(config, tmp_path)
    try:
        arn = cloud["arn"]
        assert wait_for(lambda: ecs_attributes(arn).get("hostagent.persistence") == "degraded",
                        30), agent.logs()
        assert ecs_attributes(arn)["hostagent.reason"] == "capacity"
        assert agent.says("at capacity.max_size_gib = 1", 10), agent.logs()
        assert "grow=at-cap" in agent.status()
        wait_for(lambda: False, 3)
        assert cloud["fidelity"].count("ModifyVolume") == 0
        assert agent.stop() == 0
    finally:
        agent.close()
