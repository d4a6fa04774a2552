"""The whole host, booted: a Debian 12 image baked with packaging/bake.sh boots under qemu with a
blank NVMe disk whose serial is an EBS volume id, cloud-init reads the shipped user-data from a
NoCloud seed, IMDSv2 (tests/support/imds.py) answers at 169.254.169.254, and EC2/ECS are a moto
server on this host. Six boots, in order:

  first-launch  new instance A, blank volume 'available' in EC2: bootstrap attaches it, and the
                test hot-plugs the NVMe disk into the running VM at that moment, as EC2 does;
                formatted, fstab by UUID with nofail,
                mounted, laid out for uid 5984, verify-mount ok, ECS hostagent.persistence=ready;
                a marker is written into data/, and one snapshot is taken by the baked unit;
                its config names an app secrets object and a CouchDB admin secret in (moto's)
                S3: hostagent-secrets.service writes the app's secrets.env before ECS starts, and
                bootstrap writes CouchDB's admin ini on the volume (a hash, never the password)
  reboot        A again, same root and data disks: mounted from fstab, bootstrap a no-op; then
                a second hostagent on a loop device of the guest's own shows the agent growing
                a mounted ext4 live when its device grows (what QEMU's NVMe device cannot do)
  replacement   A terminated; meanwhile someone grows the volume in the console (ModifyVolume
                1 -> 2 GiB, the disk file grows). New instance B from the same image (fresh root
                disk), same data disk (hot-plugged on attach): found, attached to B, mounted,
                marker intact, never reformatted, and its ext4 grown online to the new size by
                bootstrap's grow-fs step (resize2fs on a real kernel, which has the
                CAP_SYS_RESOURCE the CI sandbox lacks); e2fsck on this host finds it clean
  disk-missing  B reboots without the disk, which another instance now holds: B boots anyway,
                bootstrap refuses, ECS still starts, the agent reports missing, and nothing can
                be written under the bare /opt/couchdb on the root disk
  held-at-boot  C (which took the volume) is replaced: terminated, but its attachment lingers,
                as on EC2 (played by the EC2 fidelity proxy, tests/support/ec2_fidelity.py, in
                front of moto for this boot's guest). New instance E (fresh root disk,
                agent.interval 10 s) boots: bootstrap refuses (exit 3, attached-elsewhere), the
                agent reports missing/attached-elsewhere; then the old attachment goes
                `detaching` and away, and the agent claims the volume by itself: attached to E
                (hot-plugged), mounted, marker intact, ready/none, no person, no restart
  handmade-upgrade  the seed's hand-made host: an ext4 volume made by hand, mounted by an
                fstab line naming the device, hostagent installed later: the line becomes a
                UUID line, the data stays, the layout is fixed; then the maintenance (docs/operations.md)
                step (umount, `hostagent bootstrap`) finds the root-disk guard already in place

The guest reports through a test-only unit that writes JSON to its second serial port and
powers off. Hand-written stand-ins (no real one can run here): the IMDS server and the ECS agent
(tests/system/vm/guest/fake_ecs_agent.py, which registers in moto and serves introspection).
Everything else in the guest is real: systemd, udev, cloud-init, the kernel's NVMe driver,
mkfs/mount, and hostagent as the bake installed it.

Run alone: python3 -m pytest tests/system/test_vm.py   (about 11 minutes under TCG; the
Debian root is cached under .cache/vm/ by its package list, the baked image by its inputs).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.hosttools import need, need_root, need_tool
from tests.system.cloudinit_deb import render_user_data

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.root]

REGION, AZ = "us-east-1", "us-east-1a"
CLUSTER = "grand-central-vmtest"
VOLUME_TAG = {"Key": "Name", "Value": "grand-central-persistence"}
MOUNT_POINT = "/opt/couchdb"
ATTRIBUTE = "hostagent.persistence"
REASON = "hostagent.reason"
GIB = 1024 ** 3
GROWN_GIB = 2  # the volume's size after the console resize before the replacement boot
SECRETS_BUCKET = "grand-central-secrets"  # the shipped IAM policy's objects (iam/hostagent-policy.json)
SECRETS_TOML = (f'[secrets]\nsource = "s3://{SECRETS_BUCKET}/hostagent/secrets.env"\n'
                f'[couchdb]\nadmin_secret = "s3://{SECRETS_BUCKET}/hostagent/couchdb-admin"\n')
STAGE_BUDGET = 15 * 60  # seconds for the whole VM stage, as the issue asks
# held-at-boot: the old host lets go RELEASE_AFTER s after the new host's agent has said
# missing/attached-elsewhere; its attachment then shows `detaching` for DETACHING s (EC2 takes
# seconds to a minute). If the agent never says so, the old host lets go at RELEASE_FALLBACK s
# after power-on anyway, so a broken agent fails the asserts instead of the stage's time.
CLAIM_INTERVAL = 10  # agent.interval in that boot's config (appended to the shipped one)
RELEASE_AFTER = 10
DETACHING = 10
RELEASE_FALLBACK = 240
# The goal (issue 9): from the old attachment clearing to ready <= 2 agent intervals + the attach
# (here the whole claiming bootstrap, AttachVolume to mounted, hot-plug included). On top, ECS
# learns it through the agent's AWS worker (a boto3 child process, seconds under TCG), and this
# side looks once a second.
CLAIM_SLACK = 20


@dataclass
class Scenario:
    name: str
    instance_id: str
    volume_id: str
    boot: object
    volume_after: dict = field(default_factory=dict)
    host_blkid: dict = field(default_factory=dict)
    snapshots: list = field(default_factory=list)
    ec2_calls: list = field(default_factory=list)  # (action, InstanceId, HTTP status), via the proxy
    host_events: dict = field(default_factory=dict)  # the test's side of the boot, s after power-on
    host_fsck: tuple = ()  # (exit code, output) of e2fsck -fn on the data disk after power-off

    @property
    def report(self) -> dict:
        return self.boot.report or {}


@dataclass
class Stage:
    scenarios: dict
    volume_id: str
    token: str
    seconds: float
    image: object
    workdir: Path
    handmade_uuid: str | None = None
    admin_password: str = ""
    app_secrets: str = ""

HANDMADE_FSTAB_LINE = "/dev/nvme0n1\t/opt/couchdb\text4\tdefaults\t0\t2\n"


def handmade_data_disk(workdir: Path) -> tuple[Path, str]:
    """A volume formatted by hand (no label) holding CouchDB data, data/ at mode 0755."""
    import os

    tree = workdir / "handmade-tree"
    (tree / "data").mkdir(parents=True)
    token = secrets.token_hex(8)
    (tree / "data" / "vmtest-marker").write_text(token)
    (tree / "data" / "_dbs.couch").write_bytes(os.urandom(256 * 1024))
    for path in (tree / "data", tree / "data" / "vmtest-marker", tree / "data" / "_dbs.couch"):
        os.chown(path, 5984, 5984)
    (tree / "data").chmod(0o755)
    disk = workdir / "handmade-data.img"
    subprocess.run(["truncate", "-s", "1G", str(disk)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(disk)], check=True)
    return disk, token


def handmade_root(root_img: Path, workdir: Path) -> Path:
    """The baked root with the hand-made fstab line and an empty /opt/couchdb, edited offline."""
    root = workdir / "root-d.img"
    subprocess.run(["cp", "--sparse=always", str(root_img), str(root)], check=True)
    fstab = subprocess.run(["debugfs", "-R", "cat /etc/fstab", str(root)], check=True,
                           capture_output=True, text=True).stdout
    new_fstab = workdir / "handmade-fstab"
    new_fstab.write_text(fstab + HANDMADE_FSTAB_LINE)
    commands = workdir / "handmade-debugfs"
    commands.write_text(f"rm /etc/fstab\nwrite {new_fstab} /etc/fstab\nmkdir /opt/couchdb\n")
    subprocess.run(["debugfs", "-w", "-f", str(commands), str(root)], check=True,
                   capture_output=True)
    return root


def blkid_of(path: Path) -> dict:
    out = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True,
                         text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def fstab_lines_for(fstab: str, mount_point: str) -> list[list[str]]:
    return [line.split() for line in fstab.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
            and len(line.split()) >= 2 and line.split()[1] == mount_point]


def journal_steps(journal: str) -> dict[str, str]:
    """STEP -> STATUS from bootstrap's step table in the journal (last run of the boot)."""
    steps: dict[str, str] = {}
    for line in journal.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("done", "skipped", "planned", "failed"):
            steps[words[1]] = words[0]
    return steps


def unit(report: dict, name: str) -> dict:
    return report.get("units", {}).get(name, {})


def usec(state: dict, prop: str) -> int:
    return int(state.get(prop) or 0)


class OldHostLetsGo:
    """The EC2 side of held-at-boot, called by qemu.boot about once a second: follows the new
    instance's hostagent.* attributes in moto's ECS and, RELEASE_AFTER s after its agent has
    said missing/attached-elsewhere, lets the old instance's lingering attachment (a hold in the
    fidelity proxy) go `detaching`, gone DETACHING s later. Times are s after power-on."""

    def __init__(self, fidelity, ecs, volume_id: str, instance_id: str, old_instance: str):
        self.fidelity, self.ecs = fidelity, ecs
        self.volume_id, self.instance_id, self.old_instance = volume_id, instance_id, old_instance
        self.seen: list = []  # [s, persistence, reason] each time the pair changes
        self.refused_at = self.released_at = self.ready_at = None
        self.errors = 0
        self._owners: dict = {}  # container instance (targetId) -> its EC2 instance id

    def attributes(self) -> dict:
        found = {}
        for a in self.ecs.list_attributes(cluster=CLUSTER,
                                          targetType="container-instance")["attributes"]:
            target = a.get("targetId")
            if target not in self._owners:
                described = self.ecs.describe_container_instances(
                    cluster=CLUSTER, containerInstances=[target])["containerInstances"]
                self._owners[target] = described[0].get("ec2InstanceId") if described else None
            if self._owners[target] == self.instance_id:
                found[a["name"]] = a.get("value")
        return found

    def __call__(self, elapsed: float) -> None:
        try:
            attrs = self.attributes()
        except Exception:  # moto busy for a moment: look again next second
            self.errors += 1
            attrs = None
        if attrs is not None:
            now = [attrs.get(ATTRIBUTE), attrs.get(REASON)]
            if now[0] and (not self.seen or self.seen[-1][1:] != now):
                self.seen.append([round(elapsed, 1), *now])
            if now == ["missing", "attached-elsewhere"] and self.refused_at is None:
                self.refused_at = elapsed
            if now == ["ready", "none"] and self.ready_at is None:
                self.ready_at = elapsed
        if self.released_at is None and (
                (self.refused_at is not None and elapsed >= self.refused_at + RELEASE_AFTER)
                or elapsed >= RELEASE_FALLBACK):
            self.fidelity.release_after(self.volume_id, 0, detaching=DETACHING)
            self.released_at = elapsed

    def events(self) -> dict:
        released = self.released_at
        return {"seen": self.seen, "refused_at": self.refused_at, "released_at": released,
                "cleared_at": None if released is None else released + DETACHING,
                "ready_at": self.ready_at, "old_instance": self.old_instance,
                "poll_errors": self.errors}


@pytest.fixture(scope="module")
def vm(moto_server, request):
    need_root()
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils"),
                          ("debootstrap", "debootstrap"), ("cloud-localds", "cloud-image-utils"),
                          ("mkfs.ext4", "e2fsprogs"), ("debugfs", "e2fsprogs"),
                          ("unshare", "util-linux"),
                          ("systemctl", "systemd")):
        need_tool(tool, package)
    need(Path("/usr/share/keyrings/debian-archive-keyring.gpg").exists(),
         "needs debian-archive-keyring (debootstrap checks the mirror's signature)")
    import boto3
    import requests

    from tests.support.ec2_fidelity import EC2Fidelity
    from tests.support.imds import IMDSServer
    from tests.system.vm import image as images
    from tests.system.vm.qemu import boot, overlay
    from tests.system.vm.seed import make_seed

    capture = request.config.pluginmanager.getplugin("capturemanager")

    def show(line: str) -> None:  # stage and boot times belong in the CI log, captured or not
        with capture.global_and_fixture_disabled():
            print(line, flush=True)

    images.set_writer(show)
    stage_started = time.monotonic()
    base = images.ensure_base_root()
    image = images.build_image(base)
    # Kept after the run (and replaced by the next): console logs and reports for a post-mortem.
    workdir = images.cache_dir() / "last-run"
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    images.say(f"VM work dir (disks, console logs, reports): {workdir}")

    requests.post(f"{moto_server}/moto-api/reset", timeout=10)
    creds = dict(endpoint_url=moto_server, region_name=REGION, aws_access_key_id="testing",
                 aws_secret_access_key="testing")
    ec2, ecs = boto3.client("ec2", **creds), boto3.client("ecs", **creds)
    ecs.create_cluster(clusterName=CLUSTER)
    volume_id = ec2.create_volume(Size=1, AvailabilityZone=AZ, VolumeType="gp3", TagSpecifications=[
        {"ResourceType": "volume", "Tags": [VOLUME_TAG]}])["VolumeId"]
    # On Nitro the NVMe serial is the volume id without its hyphen (run_boot sets it): the
    # disk becomes the volume.
    data_disk = workdir / "data.img"
    subprocess.run(["truncate", "-s", "1G", str(data_disk)], check=True)
    # The app's secrets and CouchDB's admin, as an operator uploads them (first-launch's config).
    admin_password, app_secrets = secrets.token_hex(12), f"API_TOKEN={secrets.token_hex(8)}\n"
    s3 = boto3.client("s3", **creds)
    s3.create_bucket(Bucket=SECRETS_BUCKET)
    s3.put_object(Bucket=SECRETS_BUCKET, Key="hostagent/couchdb-admin",
                  Body=f"admin:{admin_password}\n".encode())
    s3.put_object(Bucket=SECRETS_BUCKET, Key="hostagent/secrets.env", Body=app_secrets.encode())

    def new_instance() -> str:
        return ec2.run_instances(ImageId="ami-0123456789abcdef0", MinCount=1, MaxCount=1,
                                 InstanceType="t3.medium", Placement={"AvailabilityZone": AZ},
                                 )["Instances"][0]["InstanceId"]

    def clear_attributes() -> None:
        """So each boot's report must come from that boot's agent, not an earlier one."""
        attrs = ecs.list_attributes(cluster=CLUSTER, targetType="container-instance")["attributes"]
        mine = [a for a in attrs if a["name"].startswith("hostagent.")]
        if mine:
            ecs.delete_attributes(cluster=CLUSTER, attributes=mine)

    def volume(vid: str) -> dict:
        return ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]

    imds = IMDSServer(instance_id="i-00000000000000000", availability_zone=AZ, region=REGION).start()
    # EC2 as it is, where moto is kinder (lingering attachments, `detaching`, VolumeInUse): the
    # guests of the boots that need it reach moto through this proxy (10.0.2.100 -> its port).
    fidelity = EC2Fidelity(moto_server).start()
    shipped = render_user_data({"ECS_CLUSTER": CLUSTER})
    token = secrets.token_hex(8)
    scenarios: dict[str, Scenario] = {}
    handmade_uuid = [None]

    def attached_here(vid: str, instance_id: str):
        """EC2 plugs the NVMe device in once AttachVolume has attached the volume."""
        def check() -> bool:
            return any(a["InstanceId"] == instance_id and a["State"] == "attached"
                       for a in volume(vid).get("Attachments", []))
        return check

    def run_boot(name, instance_id, root_disk, seed, *, disk=data_disk, vid=volume_id,
                 with_disk=True, hotplug=False, via_fidelity=False, watch=None, **cmdline):
        imds.instance_id = instance_id
        clear_attributes()
        endpoint = fidelity.url if via_fidelity else moto_server
        calls_before = len(fidelity.calls)
        result = boot(name, image=image, root_disk=root_disk, seed_iso=seed,
                      data_disk=disk if with_disk else None, volume_serial=vid.replace("-", ""),
                      moto_port=int(endpoint.rsplit(":", 1)[1]), imds_port=imds.httpd.server_port,
                      workdir=workdir, cmdline_extra={"scenario": name, **cmdline},
                      plug_when=attached_here(vid, instance_id) if hotplug else None,
                      watch=watch)
        snaps = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
            {"Name": "volume-id", "Values": [vid]}])["Snapshots"]
        calls = [(c.action, c.params.get("InstanceId"), c.status)
                 for c in fidelity.calls[calls_before:]]
        fsck = subprocess.run(["e2fsck", "-f", "-n", str(disk)], capture_output=True, text=True)
        scenarios[name] = Scenario(name, instance_id, vid, result, volume(vid), blkid_of(disk),
                                   snaps, calls, watch.events() if watch else {},
                                   (fsck.returncode, fsck.stdout + fsck.stderr))
        images.say(f"  {name}: {guest_timeline(result.report)}")
        if watch:
            images.say(f"  {name}: {claim_timeline(scenarios[name])}")

    try:
        a = new_instance()
        root_a = overlay(image.root_img, workdir / "root-a.qcow2")
        seed_a = make_seed(workdir / "seed-a", instance_id=a, shipped_user_data=shipped,
                           hostagent_toml_extra=SECRETS_TOML)
        # The volume is 'available' at launch: its disk appears only when bootstrap attaches it.
        run_boot("first-launch", a, root_a, seed_a, hotplug=True, marker="write", token=token,
                 snapshot="1")
        run_boot("reboot", a, root_a, seed_a, marker="check", token=token, live_grow="1")

        # The old instance is terminated (EC2 detaches its data volume); a new one takes over.
        ec2.terminate_instances(InstanceIds=[a])
        # While no instance has it, the volume is grown in the console (issue 10). QEMU 7.2's
        # NVMe device cannot be resized live (block_resize: "permissions 'resize' are ...
        # unshared by block device"), so the disk file grows between boots: the next host finds
        # a device larger than its ext4, as one does whose kernel missed the resize event.
        ec2.modify_volume(VolumeId=volume_id, Size=GROWN_GIB)
        os.truncate(data_disk, GROWN_GIB * GIB)
        b = new_instance()
        root_b = overlay(image.root_img, workdir / "root-b.qcow2")
        seed_b = make_seed(workdir / "seed-b", instance_id=b, shipped_user_data=shipped)
        run_boot("replacement", b, root_b, seed_b, hotplug=True, marker="check", token=token)

        # Someone moved the volume to another instance C while B rebooted: B has no disk.
        ec2.detach_volume(VolumeId=volume_id, InstanceId=b)
        c = new_instance()
        ec2.attach_volume(VolumeId=volume_id, InstanceId=c, Device="/dev/xvdf")
        run_boot("disk-missing", b, root_b, seed_b, with_disk=False, marker="none")

        # C's ASG replaces it: C is terminated (moto detaches its volumes at once), but as on EC2
        # its attachment lingers, `attached` until the old host lets go, then `detaching`.
        # The new instance E boots meanwhile, its EC2 calls through the fidelity proxy.
        ec2.terminate_instances(InstanceIds=[c])
        fidelity.hold(volume_id, c)
        e = new_instance()
        root_e = overlay(image.root_img, workdir / "root-e.qcow2")
        seed_e = make_seed(workdir / "seed-e", instance_id=e, shipped_user_data=shipped,
                           hostagent_toml_extra=f"[agent]\ninterval = {CLAIM_INTERVAL}\n")
        run_boot("held-at-boot", e, root_e, seed_e, hotplug=True, via_fidelity=True,
                 watch=OldHostLetsGo(fidelity, ecs, volume_id, e, c), marker="check",
                 token=token, wait_for="ready")

        # The seed's host, set up by hand: its own volume (tagged as docs/operations.md's upgrade
        # runbook says), ext4 made by hand, fstab naming the device; hostagent baked in later.
        requests.post(f"{moto_server}/moto-api/reset", timeout=10)
        ecs.create_cluster(clusterName=CLUSTER)
        old_volume = ec2.create_volume(Size=1, AvailabilityZone=AZ, VolumeType="gp3")["VolumeId"]
        ec2.create_tags(Resources=[old_volume], Tags=[VOLUME_TAG])
        d = new_instance()
        ec2.attach_volume(VolumeId=old_volume, InstanceId=d, Device="/dev/xvdf")
        old_disk, old_token = handmade_data_disk(workdir)
        handmade_uuid[0] = blkid_of(old_disk)["UUID"]
        root_d = handmade_root(image.root_img, workdir)
        seed_d = make_seed(workdir / "seed-d", instance_id=d, shipped_user_data=shipped)
        run_boot("handmade-upgrade", d, root_d, seed_d, disk=old_disk, vid=old_volume,
                 marker="check", token=old_token, runbook="remount", expect="ready")
    finally:
        imds.stop()
        fidelity.stop()
    seconds = time.monotonic() - stage_started
    times = ", ".join(f"{n} {s.boot.seconds:.0f} s" for n, s in scenarios.items())
    images.say(f"VM stage: {seconds:.0f} s in all; boots: {times}")
    return Stage(scenarios, volume_id, token, seconds, image, workdir, handmade_uuid[0],
                 admin_password, app_secrets)


def guest_timeline(report: dict | None) -> str:
    """Seconds since the guest kernel started, from systemd's own unit timestamps."""
    if not report or "units" not in report:
        return "no timeline (no report)"
    units = report["units"]

    def at(name, prop):
        value = usec(units.get(name, {}), prop)
        return f"{value / 1e6:.0f}" if value else "-"
    boot_unit = units.get("hostagent-bootstrap.service", {})
    took = (usec(boot_unit, "ExecMainExitTimestampMonotonic")
            - usec(boot_unit, "ExecMainStartTimestampMonotonic")) / 1e6
    return (f"network-online {at('network-online.target', 'ActiveEnterTimestampMonotonic')} s, "
            f"bootstrap {at('hostagent-bootstrap.service', 'ExecMainStartTimestampMonotonic')} s "
            f"(took {took:.1f} s, {boot_unit.get('Result', '?')}), "
            f"ECS agent {at('ecs.service', 'InactiveExitTimestampMonotonic')} s, "
            f"hostagent ready {at('hostagent.service', 'ActiveEnterTimestampMonotonic')} s, "
            f"attribute seen by {report.get('ecs', {}).get('waited_until_uptime', '-')} s, "
            f"powered off after {report.get('report_finished', '-')} s")


CLAIMED_IN = re.compile(r"volume: claimed by `hostagent bootstrap` in ([0-9.]+)s")
MONOTONIC_LINE = re.compile(r"^\[\s*([0-9.]+)\]\s")


def guest_seconds(journal: str, text: str) -> float | None:
    """Seconds since boot of the first journal line (journalctl -o short-monotonic) with text."""
    for line in journal.splitlines():
        m = MONOTONIC_LINE.match(line)
        if m and text in line:
            return float(m[1])
    return None


def claim_seconds(report: dict) -> float | None:
    """How long the agent's claiming `hostagent bootstrap` took, as the agent logged it."""
    m = CLAIMED_IN.search(report.get("journal", {}).get("hostagent.service", ""))
    return float(m[1]) if m else None


def claim_timeline(s: Scenario) -> str:
    """held-at-boot: the test's side (s after power-on, this host's clock), then the guest's
    (s since its kernel started, from systemd and journald)."""
    ev, r = s.host_events, s.report or {}

    def at(value):
        return "-" if value is None else f"{value:.0f} s"
    def since(start):
        return at(ev["ready_at"] - start) if ev.get("ready_at") and start is not None else "-"
    claim = claim_seconds(r)
    agent = r.get("journal_monotonic", {}).get("hostagent.service", "")
    boot_unit = unit(r, "hostagent-bootstrap.service")
    refused = usec(boot_unit, "ExecMainExitTimestampMonotonic") / 1e6
    goal = 2 * CLAIM_INTERVAL + (claim or 0) + CLAIM_SLACK
    nvme = guest_seconds(r.get("journal_monotonic", {}).get("kernel", ""), "nvme")
    offset = f"{s.boot.plugged_at - nvme:.1f}" if nvme and s.boot.plugged_at else "?"
    return (f"host: ECS said missing/attached-elsewhere at {at(ev.get('refused_at'))}, old host "
            f"let go at {at(ev.get('released_at'))}, attachment gone at {at(ev.get('cleared_at'))}, "
            f"disk hot-plugged at {at(s.boot.plugged_at)}, ECS said ready/none at "
            f"{at(ev.get('ready_at'))}: let go -> ready {since(ev.get('released_at'))}, gone -> "
            f"ready {since(ev.get('cleared_at'))} (goal <= 2 x {CLAIM_INTERVAL} s + claim "
            f"{claim if claim is not None else '?'} s + {CLAIM_SLACK} s slack = {goal:.0f} s); "
            f"attributes seen {[tuple(x) for x in ev.get('seen', [])]}; guest (its clock about "
            f"{offset} s behind): bootstrap refused (exit {boot_unit.get('ExecMainStatus', '?')}) "
            f"at {refused:.0f} s, agent first refused at "
            f"{at(guest_seconds(agent, 'volume: bootstrap exit 3 (attached-elsewhere)'))}, "
            f"NVMe appeared at {at(nvme)}, claimed at "
            f"{at(guest_seconds(agent, 'volume: claimed by'))}, persistence ready at "
            f"{at(guest_seconds(agent, 'persistence missing -> ready'))}")


def scenario(vm: Stage, name: str) -> Scenario:
    s = vm.scenarios.get(name)
    assert s is not None, f"{name} did not boot"
    assert s.boot.report, (f"{name}: no report from the guest (qemu exit {s.boot.exit_code}); "
                           f"console tail:\n{_tail(s)}")
    assert "crashed" not in s.report, s.report
    return s


def _tail(s: Scenario) -> str:
    from tests.system.vm.qemu import console_tail

    return console_tail(s.boot)


def attached_to(s: Scenario) -> list[str]:
    return [a["InstanceId"] for a in s.volume_after.get("Attachments", [])
            if a.get("State") == "attached"]


def bootstrap_journal(s: Scenario) -> str:
    return s.report["journal"]["hostagent-bootstrap.service"]


def assert_mounted_volume(vm: Stage, s: Scenario, *, by_agent: bool = False) -> str:
    """The shared checks of every boot that has the disk; returns the filesystem UUID.
    by_agent: the boot-time bootstrap refused (held elsewhere), and the agent claimed it later."""
    r = s.report
    assert r["instance_id"] == s.instance_id
    assert r["nvme"]["serial"] == s.volume_id.replace("-", "")
    boot_unit = unit(r, "hostagent-bootstrap.service")
    if not by_agent:
        assert (boot_unit["ActiveState"], boot_unit["Result"]) == ("active", "success"), \
            bootstrap_journal(s)
    assert attached_to(s) == [s.instance_id]
    mounts = r["findmnt"]["filesystems"]
    assert len(mounts) == 1 and mounts[0]["target"] == MOUNT_POINT
    assert mounts[0]["source"] == "/dev/nvme0n1" and mounts[0]["fstype"] == "ext4"
    assert "rw" in mounts[0]["options"].split(",")
    fs = dict(line.split("=", 1) for line in r["nvme"]["blkid"].splitlines() if "=" in line)
    assert fs["TYPE"] == "ext4"
    lines = fstab_lines_for(r["fstab"], MOUNT_POINT)
    assert len(lines) == 1, r["fstab"]
    source, _, fstype, options = lines[0][:4]
    assert source == f"UUID={fs['UUID']}" and fstype == "ext4"
    assert "nofail" in options.split(",")
    assert any(o.startswith("x-systemd.device-timeout=") for o in options.split(","))
    # The volume's top directory is private (no container sees it); what the task mounts is
    # 0755, as the official CouchDB image's entrypoint sets it at every start.
    assert r["layout"][""] == {"uid": 0, "gid": 0, "mode": "0o700"}, r["layout"]
    for d in ("data", "etc", "etc/local.d"):
        assert r["layout"][d] == {"uid": 5984, "gid": 5984, "mode": "0o755"}, (d, r["layout"])
    verify = r["verify_mount"]
    assert verify["rc"] == 0, verify
    # Nothing was ever written to the root disk under the mount point, which stays immutable.
    bare = r["bare_mount_point"]
    assert bare["exists"] and bare["entries"] == [], bare
    assert "i" in bare["lsattr"][0], bare
    # ECS started only after bootstrap had finished (the drop-in), and the agent said ready.
    ecs = unit(r, "ecs.service")
    assert usec(ecs, "InactiveExitTimestampMonotonic") >= \
        usec(boot_unit, "ExecMainExitTimestampMonotonic") > 0
    assert r["ecs"]["attributes"].get(ATTRIBUTE) == "ready", (r["ecs"], r["journal"]["hostagent.service"])
    assert unit(r, "hostagent.service")["ActiveState"] == "active"
    failed = [line.split()[0] for line in r["failed_units"].splitlines() if line.strip()]
    assert failed == (["hostagent-bootstrap.service"] if by_agent else []), r["failed_units"]
    assert s.host_blkid.get("UUID") == fs["UUID"]
    return fs["UUID"]


def test_first_launch_formats_mounts_and_reports_ready(vm):
    s = scenario(vm, "first-launch")
    r = s.report
    uuid = assert_mounted_volume(vm, s)
    steps = journal_steps(bootstrap_journal(s))
    assert steps.get("attach") == "done" and steps.get("format") == "done", bootstrap_journal(s)
    assert s.boot.plugged_at is not None, "the disk was never plugged: AttachVolume not called"
    assert r["marker"] == {"written": vm.token}
    assert r["files"]["/etc/ecs/ecs.config"].strip() == f"ECS_CLUSTER={CLUSTER}"
    assert "grand-central-persistence" in r["files"]["/etc/hostagent/hostagent.toml"]
    assert r["timer_enabled"] == "enabled"
    tags = {t["Key"]: t["Value"] for t in s.volume_after.get("Tags", [])}
    assert tags.get("Name") == "grand-central-persistence"
    assert uuid


def test_first_launch_fetches_the_app_secrets_and_writes_couchdbs_admin(vm):
    s = scenario(vm, "first-launch")
    r = s.report
    # The app's secrets file, from S3 with the instance's credentials, before ECS started.
    secrets_unit, ecs = unit(r, "hostagent-secrets.service"), unit(r, "ecs.service")
    assert secrets_unit["Result"] == "success" and secrets_unit["ActiveState"] == "active", \
        secrets_unit
    assert 0 < usec(secrets_unit, "ExecMainExitTimestampMonotonic") <= \
        usec(ecs, "InactiveExitTimestampMonotonic"), (secrets_unit, ecs)
    assert r["secrets_env"] == {"uid": 0, "gid": 0, "mode": "0o600", "text": vm.app_secrets}, \
        r["secrets_env"]
    # CouchDB's admin on the volume: a salted hash, loopback only, single node; never the password.
    steps = journal_steps(bootstrap_journal(s))
    assert steps.get("couchdb-admin") == "done", bootstrap_journal(s)
    ini = r["admin_ini"]
    assert ini is not None and (ini["uid"], ini["gid"], ini["mode"]) == (5984, 5984, "0o600"), ini
    text = ini["text"]
    assert vm.admin_password not in text
    admins = re.search(r"^\[admins\]\s*\nadmin = (-pbkdf2-[0-9a-f]+,[0-9a-f]+,[0-9]+)$", text, re.M)
    assert admins, text
    from hostagent.couchdb_admin import verify_password

    assert verify_password(admins[1], vm.admin_password), text
    assert re.search(r"^\[chttpd\]\s*\nbind_address = 127\.0\.0\.1$", text, re.M), text
    assert re.search(r"^\[couchdb\]\s*\nsingle_node = true$", text, re.M), text
    everything = json.dumps(r)
    assert everything.count(vm.admin_password) == 0, "the admin password reached a log or report"
    # The reboot: the file is up to date, left alone.
    again = scenario(vm, "reboot")
    assert journal_steps(bootstrap_journal(again)).get("couchdb-admin") == "skipped"
    assert again.report["admin_ini"]["text"] == text


def test_first_launch_snapshot_through_the_baked_unit(vm):
    s = scenario(vm, "first-launch")
    r = s.report
    assert r["snapshot_unit"]["Result"] == "success", r["snapshot_journal"]
    assert len(s.snapshots) == 1, r["snapshot_journal"]
    assert s.snapshots[0]["VolumeId"] == vm.volume_id
    # fsfreeze worked from inside the unit's own mount namespace (ProtectSystem= etc.): the
    # frozen superblock is the host's, so the snapshot is consistent, not crash-only.
    from hostagent.aws.snapshots import CONSISTENCY_KEY, FROZEN

    tags = {t["Key"]: t["Value"] for t in s.snapshots[0].get("Tags", [])}
    assert tags.get(CONSISTENCY_KEY) == FROZEN, (tags, r["snapshot_journal"])


def test_reboot_mounts_from_fstab_and_bootstrap_is_a_no_op(vm):
    first, s = scenario(vm, "first-launch"), scenario(vm, "reboot")
    r = s.report
    uuid = assert_mounted_volume(vm, s)
    assert uuid == assert_mounted_volume(vm, first)
    assert r["fstab"] == first.report["fstab"]
    assert r["marker"] == {"read": vm.token}
    steps = journal_steps(bootstrap_journal(s))
    assert steps and all(status == "skipped" for status in steps.values()), bootstrap_journal(s)
    # systemd mounted it from fstab before bootstrap even started.
    mount = unit(r, "opt-couchdb.mount")
    assert mount["SourcePath"] == "/etc/fstab" and mount["ActiveState"] == "active"
    assert 0 < usec(mount, "ActiveEnterTimestampMonotonic") < \
        usec(unit(r, "hostagent-bootstrap.service"), "ExecMainStartTimestampMonotonic")


def test_the_running_agent_grows_a_mounted_ext4_when_its_device_grows(vm):
    """On a real kernel (CAP_SYS_RESOURCE): the baked `hostagent agent` notices the device grew
    (256 -> 512 MiB, `losetup -c`) and runs resize2fs online by itself; the data stays."""
    live = scenario(vm, "reboot").report["live_grow"]
    assert live["bootstrap"]["rc"] == 0, live["bootstrap"]
    log = live.get("agent_log", "")
    assert live["fs_untouched"] == live["fs_before"] < 256 << 20, live
    assert live["device_bytes"] == 512 << 20, live
    assert live["fs_after"] > 1.9 * live["fs_before"], (live, log)
    assert live["marker_intact"] is True
    assert "growing it online" in log and "filesystem: " in log, log
    assert "growing failed" not in log, log
    assert live["agent_rc"] == 0, log
    assert live["fsck"]["rc"] == 0, live["fsck"]
    # Two agent intervals (2 s) plus resize2fs under TCG.
    assert live["seconds_to_grown"] <= 60, live


def test_replacement_instance_finds_attaches_and_keeps_the_data(vm):
    first, s = scenario(vm, "first-launch"), scenario(vm, "replacement")
    r = s.report
    uuid = assert_mounted_volume(vm, s)
    assert uuid == first.host_blkid["UUID"], "the volume was reformatted"
    assert r["marker"] == {"read": vm.token}
    steps = journal_steps(bootstrap_journal(s))
    assert steps.get("attach") == "done" and steps.get("format") != "done", bootstrap_journal(s)
    assert s.boot.plugged_at is not None
    assert s.instance_id != first.instance_id
    assert r["ecs"]["arn"] != first.report["ecs"]["arn"]


def test_replacement_grows_the_ext4_online_to_the_resized_volume(vm):
    """The console resize between the boots: bootstrap's grow-fs step ran resize2fs on the
    mounted ext4 (a real kernel, CAP_SYS_RESOURCE), the data stayed, and it is not done twice."""
    first, s = scenario(vm, "first-launch"), scenario(vm, "replacement")
    r = s.report
    steps = journal_steps(bootstrap_journal(s))
    assert steps.get("grow-fs") == "done", bootstrap_journal(s)
    assert steps.get("mount") == "done" and steps.get("format") != "done", bootstrap_journal(s)
    assert first.report["ext4"]["device_bytes"] == GIB, first.report["ext4"]
    assert first.report["ext4"]["fs_bytes"] <= GIB
    grown = r["ext4"]
    assert grown["device_bytes"] == GROWN_GIB * GIB, grown
    # resize2fs fills the device to its last whole block group's worth of 4 KiB blocks.
    assert GROWN_GIB * GIB * 0.99 <= grown["fs_bytes"] <= GROWN_GIB * GIB, grown
    assert grown["statvfs_bytes"] > 1.8 * first.report["ext4"]["statvfs_bytes"], grown
    assert r["marker"] == {"read": vm.token}
    # Done once: the dry run after boot plans no grow, and verify-mount is happy.
    again = {st["name"]: st["status"] for st in json.loads(r["bootstrap_again"]["out"])["steps"]}
    assert again.get("grow-fs", "skipped") == "skipped", again
    assert r["verify_mount"]["rc"] == 0, r["verify_mount"]
    assert s.volume_after["Size"] == GROWN_GIB
    # Seen from this host right after power-off: e2fsck finds the grown ext4 clean.
    assert s.host_fsck[0] == 0, s.host_fsck[1]


def test_disk_missing_boots_reports_missing_and_protects_the_root_disk(vm):
    s = scenario(vm, "disk-missing")
    r = s.report
    assert r["instance_id"] == s.instance_id
    assert not r["nvme"]["present"] and not r["findmnt"]
    assert s.instance_id not in attached_to(s)
    boot_unit = unit(r, "hostagent-bootstrap.service")
    # A refusal (exit 3) is final: no retry loop holding ECS back (RestartPreventExitStatus).
    assert (boot_unit["Result"], boot_unit["ExecMainStatus"], boot_unit["NRestarts"]) == \
        ("exit-code", "3", "0"), bootstrap_journal(s)
    assert "attached to another instance" in bootstrap_journal(s)
    # nofail: the fstab line for the absent disk did not stop the boot.
    assert unit(r, "opt-couchdb.mount")["ActiveState"] != "active"
    assert r["failed_units"].split()[:1] == ["hostagent-bootstrap.service"], r["failed_units"]
    # ECS still started (Wants=, not Requires=), and the agent told it this host has no volume.
    assert unit(r, "ecs.service")["ActiveState"] == "active"
    assert r["ecs"]["attributes"].get(ATTRIBUTE) == "missing", (r["ecs"], r["journal"]["hostagent.service"])
    assert r["verify_mount"]["rc"] != 0
    # The bare mount point on the root disk is empty and immutable: Docker's mkdir fails.
    bare = r["bare_mount_point"]
    assert bare["entries"] == [] and "i" in bare["lsattr"][0], bare
    assert r["docker_would_create"]["created"] is False, r["docker_would_create"]


def test_held_at_boot_the_agent_claims_the_volume_once_the_old_host_lets_go(vm):
    first, s = scenario(vm, "first-launch"), scenario(vm, "held-at-boot")
    r, ev = s.report, s.host_events
    agent_journal = r["journal"]["hostagent.service"]
    # At power-on the old instance held the volume: bootstrap refused, once, and stayed failed
    # (exit 3 is never restarted by systemd, and no person restarted it).
    boot_unit = unit(r, "hostagent-bootstrap.service")
    assert (boot_unit["Result"], boot_unit["ExecMainStatus"], boot_unit["NRestarts"]) == \
        ("exit-code", "3", "0"), bootstrap_journal(s)
    assert "is attached to another instance" in bootstrap_journal(s), bootstrap_journal(s)
    assert ev["old_instance"] in bootstrap_journal(s), bootstrap_journal(s)
    assert bootstrap_journal(s).count("is attached to another instance") == 1
    # The agent said missing/attached-elsewhere first (in ECS, seen from here and from the
    # guest), and the old host let go only after that; then ready/none, and nothing else.
    seen = [(p, why) for _, p, why in ev["seen"]]
    assert ev["refused_at"] is not None, (ev, agent_journal)
    assert ev["released_at"] >= ev["refused_at"] + RELEASE_AFTER - 1, ev
    assert ("ready", "none") in seen, (ev, agent_journal)
    ready = seen.index(("ready", "none"))
    assert seen.index(("missing", "attached-elsewhere")) < ready
    assert all(p == "missing" for p, _ in seen[:ready]) and seen[ready:] == [("ready", "none")], ev
    # The agent's own account agrees: refused (once logged), then claimed and ready (in either
    # order: the next round may see the mount before the claiming child's result is collected).
    refused = agent_journal.find("volume: bootstrap exit 3 (attached-elsewhere)")
    assert 0 <= refused < agent_journal.find("volume: claimed by"), agent_journal
    assert refused < agent_journal.find("persistence missing -> ready"), agent_journal
    assert agent_journal.count("volume: bootstrap exit 3 (attached-elsewhere)") == 1, agent_journal
    assert [tuple(x[1:]) for x in r["claim"]["history"]][-1:] == [("ready", "none")], r["claim"]
    # EC2 plugged the disk in once the agent's bootstrap had attached it, after the release.
    assert s.boot.plugged_at is not None and s.boot.plugged_at >= ev["cleared_at"] - 1, \
        (s.boot.plugged_at, ev)
    attaches = [(who, status) for action, who, status in s.ec2_calls if action == "AttachVolume"]
    assert attaches.count((s.instance_id, 200)) == 1, s.ec2_calls
    assert all(who == s.instance_id for who, _ in attaches), attaches
    assert not any(action == "DetachVolume" for action, _, _ in s.ec2_calls), s.ec2_calls
    assert agent_journal.count("volume: claimed by") == 1, agent_journal
    # The goal: from the old attachment gone to ready <= 2 intervals + the claim + slack.
    claim = claim_seconds(r)
    assert claim is not None, agent_journal
    took = ev["ready_at"] - ev["cleared_at"]
    assert took <= 2 * CLAIM_INTERVAL + claim + CLAIM_SLACK, claim_timeline(s)
    # Mounted, laid out, verified, the data of the first launch intact, never reformatted.
    uuid = assert_mounted_volume(vm, s, by_agent=True)
    assert uuid == first.host_blkid["UUID"], "the volume was reformatted"
    assert r["marker"] == {"read": vm.token}
    assert r["files"]["/etc/hostagent/hostagent.toml"].rstrip().endswith(
        f"interval = {CLAIM_INTERVAL}")


def test_handmade_host_upgrade_keeps_the_data_and_rewrites_fstab(vm):
    s = scenario(vm, "handmade-upgrade")
    r = s.report
    # At boot: systemd mounted the volume by device name, then bootstrap took it over as it was.
    steps = journal_steps(bootstrap_journal(s))
    assert steps.get("format") == "skipped" and steps.get("fstab") == "done", bootstrap_journal(s)
    assert steps.get("mount") == "skipped", bootstrap_journal(s)
    # The root-disk guard goes in underneath the mounted volume, with no downtime.
    assert steps.get("guard") == "done", bootstrap_journal(s)
    runbook = r["runbook"]
    assert runbook["fstab_before"].count("/opt/couchdb") == 1
    assert "/dev/nvme0n1" not in runbook["fstab_before"], "the device-name line was not replaced"
    assert HANDMADE_FSTAB_LINE in r["files"]["/etc/fstab.hostagent.bak"]
    # Unmounted (as if the disk were gone): the bare directory is already guarded, and a
    # bootstrap mounts the volume by its UUID line.
    assert runbook["umount"]["rc"] == 0, runbook
    assert runbook["bootstrap"]["rc"] == 0, runbook["bootstrap"]
    done = {st["name"]: st["status"] for st in json.loads(runbook["bootstrap"]["out"])["steps"]}
    # The running agent claims an unmounted volume too (a bootstrap child under the same lock):
    # whichever of the two gets the lock first mounts it by its UUID line; the other finds it done.
    assert done.get("guard") == "skipped" and done.get("mount") in ("done", "skipped"), done
    uuid = assert_mounted_volume(vm, s)
    assert uuid == vm.handmade_uuid, "the hand-made filesystem was remade"
    assert r["marker"] == {"read": r["cmdline"]["token"]}


def test_each_boot_time_and_the_stage_budget(vm):
    for name, s in vm.scenarios.items():
        assert s.boot.report, f"{name}: no report"
    assert vm.seconds < STAGE_BUDGET, f"VM stage took {vm.seconds:.0f} s"
