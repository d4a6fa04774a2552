"""The agent claims the volume by itself: a real `hostagent agent` process whose `hostagent
bootstrap --json` children meet a moto server behind the EC2 fidelity proxy (which plays EC2's
`detaching` and VolumeInUse), the IMDSv2 test server, a real loop device (volume.device names it:
a loop device has no NVMe serial) and moto's ECS, with the ECS introspection stand-in.

Each agent has its own [host] lock_file and state_dir (host_paths), so nothing is shared with the
host or another test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.test_agent import (REPO, Lines, NotifyListener, ecs_attributes, line_time,
                                          wait_for)
from tests.support.ecs_introspection import register_with_ecs
from tests.support.hosttools import need_root, need_tool, sh, sha256_of_device

pytestmark = pytest.mark.root
AZ = "us-east-1a"


@pytest.fixture
def host(fidelity, imds, introspection):
    """This instance and another one in moto's EC2, the IMDS answering for this one, and this
    one registered with ECS (the introspection stand-in names it)."""
    import boto3

    ec2, ecs = boto3.client("ec2"), boto3.client("ecs")

    def run():
        return ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                                 Placement={"AvailabilityZone": AZ})["Instances"][0]["InstanceId"]

    me, other = run(), run()
    server = imds(instance_id=me, region="us-east-1", availability_zone=AZ)
    arn = register_with_ecs(ecs, me, introspection, az=AZ)
    vol = ec2.create_volume(AvailabilityZone=AZ, Size=1)["VolumeId"]
    return {"ec2": ec2, "me": me, "other": other, "vol": vol, "arn": arn, "imds": server,
            "introspection": introspection, "fidelity": fidelity}


def claim_config(tmp_path, paths, vol, dev, introspection_url, interval) -> str:
    path = tmp_path / "hostagent.toml"
    path.write_text(f"""[volume]
id = "{vol}"
device = "{dev}"
device_name = "/dev/xvdf"
attach_timeout = 20
[filesystem]
mount_point = "{paths['mount_point']}"
fstab = "{paths['fstab']}"
[couchdb]
url = ""
[ecs]
introspection_url = "{introspection_url}"
[agent]
interval = {interval}
[host]
lock_file = "{paths['lock_file']}"
state_dir = "{paths['state_dir']}"
""")
    return str(path)


class AgentProcess:
    def __init__(self, cfg: str, tmp_path):
        self.listener = NotifyListener(str(tmp_path / "notify.sock"))
        env = dict(os.environ, NOTIFY_SOCKET=self.listener.path, WATCHDOG_USEC="2000000",
                   PYTHONUNBUFFERED="1")
        env.pop("JOURNAL_STREAM", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "hostagent", "--config", cfg, "agent"],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out, self.err = Lines(self.proc.stdout), Lines(self.proc.stderr)

    def logs(self) -> str:
        return f"--- stdout\n{self.out.text()}\n--- stderr\n{self.err.text()}"

    def statuses(self) -> list[str]:
        return [m for _, m in self.listener.messages if "STATUS=" in m]

    def idle(self) -> bool:
        """No bootstrap child in flight (STATUS says claim=running while one is)."""
        status = self.statuses()
        return bool(status) and "claim=running" not in status[-1]

    def stop(self) -> int:
        wait_for(self.idle, 30)  # never SIGTERM mid-bootstrap: the loop device goes next
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.listener.close()


def token_puts(imds_server) -> int:
    """IMDS sessions opened: one per `hostagent bootstrap` child, the only callers of IMDS here
    (the agent's AWS worker takes its region from the ECS ARN and AWS_REGION)."""
    return sum(1 for method, path, _ in list(imds_server.requests) if method == "PUT")


def test_agent_claims_the_volume_once_the_other_instance_lets_go(tmp_path, loop_device,
                                                                 host_paths, host):
    need_root()
    need_tool("mkfs.ext4", "e2fsprogs")
    interval = 2
    ec2, vol, me, other, fid = host["ec2"], host["vol"], host["me"], host["other"], host["fidelity"]
    ec2.attach_volume(VolumeId=vol, InstanceId=other, Device="/dev/xvdf")  # the old host
    fid.detaching_for(1.0)  # as on EC2, a released attachment shows `detaching` for a while
    dev = loop_device("128M")
    cfg = claim_config(tmp_path, host_paths, vol, dev, host["introspection"].url, interval)
    agent = AgentProcess(cfg, tmp_path)
    try:
        # Refused by bootstrap (the volume is attached to the other instance), and said so.
        arn = host["arn"]
        assert wait_for(lambda: ecs_attributes(arn).get("hostagent.reason") == "attached-elsewhere",
                        30), agent.logs()
        assert ecs_attributes(arn)["hostagent.persistence"] == "missing"
        assert any("persistence=missing reason=attached-elsewhere" in m
                   for m in agent.statuses()), agent.statuses()
        before = token_puts(host["imds"])
        time.sleep(3 * interval)  # a few more attempts while it is held
        during = token_puts(host["imds"]) - before
        # Retried (the cadence itself is unit-tested with a fake clock), but at most one attempt
        # per interval: never hammered.
        assert 1 <= during <= 4, during
        refusals = agent.out.text().count("volume: bootstrap exit 3 (attached-elsewhere)")
        assert refusals == 1, agent.logs()  # one line per change, not per attempt

        t_detach = time.monotonic()
        ec2.detach_volume(VolumeId=vol, InstanceId=other)  # moto needs InstanceId
        t_clear = t_detach + 1.0  # the attachment is `detaching` for 1 s, then gone

        assert wait_for(lambda: ecs_attributes(arn).get("hostagent.persistence") == "ready",
                        60), agent.logs()
        t_ecs = time.monotonic()
        assert ecs_attributes(arn)["hostagent.reason"] == "none"
        t_ready = line_time(agent.out, "persistence missing -> ready")
        claimed = next(line for _, line in agent.out.lines if "volume: claimed by" in line)
        attempt = float(re.search(r" in ([0-9.]+)s ", claimed)[1])
        print(f"\ninterval {interval}s; detach -> ready (agent) {t_ready - t_detach:.2f}s, "
              f"cleared -> ready {t_ready - t_clear:.2f}s, the claiming bootstrap took "
              f"{attempt:.2f}s; ECS says ready {t_ecs - t_detach:.2f}s after the detach")
        # The goal: from the old attachment clearing to ready <= 2 intervals + the attach
        # (here: the whole successful bootstrap: boto3 import, AttachVolume, mkfs, mount), + slack.
        assert t_ready - t_clear <= 2 * interval + attempt + 0.5

        # Attached here, formatted (the loop was blank), mounted, laid out: no person involved.
        attachments = ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["Attachments"]
        assert [(a["InstanceId"], a["State"]) for a in attachments] == [(me, "attached")]
        assert sh("findmnt", "-n", "-o", "SOURCE", host_paths["mount_point"]).stdout.strip() == dev
        assert sh("blkid", "-p", "-s", "TYPE", "-o", "value", dev).stdout.strip() == "ext4"
        assert os.path.isdir(os.path.join(host_paths["mount_point"], "data"))
        ours = [c for c in fid.calls
                if c.action == "AttachVolume" and c.params.get("InstanceId") == me]
        assert len(ours) == 1 and ours[0].status == 200  # only once it was free
        assert fid.count("DetachVolume") == 1  # the test's own: hostagent never detaches
        assert wait_for(lambda: "persistence=ready" in agent.statuses()[-1], 5)
        assert agent.out.text().count("volume: claimed by") == 1
        assert agent.stop() == 0
        assert "Traceback" not in agent.err.text()
    finally:
        agent.close()


def test_refusal_that_needs_a_person_is_reported_and_not_hammered(tmp_path, loop_device,
                                                                  host_paths, host):
    need_root()
    interval = 1
    vol, fid = host["vol"], host["fidelity"]
    dev = loop_device("64M")
    with open(dev, "r+b") as f:  # someone's data: never blank, never formatted
        f.write(os.urandom(4 << 20))
        f.flush()
        os.fsync(f.fileno())
    before = sha256_of_device(dev)
    cfg = claim_config(tmp_path, host_paths, vol, dev, host["introspection"].url, interval)
    agent = AgentProcess(cfg, tmp_path)
    try:
        arn = host["arn"]
        assert wait_for(lambda: ecs_attributes(arn).get("hostagent.reason") == "not-blank", 30), \
            agent.logs()
        assert ecs_attributes(arn)["hostagent.persistence"] == "missing"
        t_refused = time.monotonic()
        time.sleep(8 * interval)  # eight rounds: all report, none claims again
        attempts = token_puts(host["imds"])
        print(f"\n{attempts} bootstrap attempt(s) in the {time.monotonic() - t_refused:.1f}s after "
              f"the refusal at interval {interval}s (refusals are looked at every 300 s)")
        assert attempts == 1, agent.logs()
        assert any("reason=not-blank" in m and "claim=refused" in m for m in agent.statuses())
        assert ecs_attributes(arn)["hostagent.reason"] == "not-blank"
        log = agent.out.text()
        assert log.count("volume: bootstrap exit 3 (not-blank)") == 1, log
        assert "a person must fix this" in log
        assert sha256_of_device(dev) == before  # not a byte changed
        assert not os.path.ismount(host_paths["mount_point"])
        assert fid.count("DetachVolume") == 0
        assert agent.stop() == 0
    finally:
        agent.close()
