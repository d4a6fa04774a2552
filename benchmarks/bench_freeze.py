#!/usr/bin/env python3
"""The freeze window (issue 9, item 8): a writer's worst stall during `hostagent snapshot` vs the bare CreateSnapshot call.

    sudo .venv/bin/python benchmarks/bench_freeze.py [--rounds 7] [--backing tmpfs|disk]
                                                     [--compare REV] [--expedite-rcu]

A real ext4 on a loop device, mounted in a temp dir; a writer process appends 4 KiB and fsyncs
every 2 ms there, as CouchDB commits, and records how long each write+fsync took. Each round,
against the same moto server (its own process on loopback, as the integration tests start it,
with instance metadata and the instance-role credentials from an IMDSv2 stand-in):
  floor      `fsfreeze -f; fsfreeze -u` with nothing in between (and FIFREEZE;FITHAW by ioctl)
  bare call  CreateSnapshot of the volume from an already-warm boto3 client (median of 5)
  hostagent  `python -m hostagent snapshot --no-prune` (freeze = true), its own lock file and
             state dir; the writer's worst stall over the whole command
Goal: median worst stall with hostagent ≤ 1.5 × median bare call + 15 ms.

The writer runs SCHED_FIFO, so its stalls are blocking on the filesystem, not waiting for a CPU.
The loop device's backing file lives on a private tmpfs by default, so the floor is the kernel's
freeze rather than this VM's disk; `--backing disk` puts it in /tmp instead. `--compare REV` also
runs hostagent as of a git revision in the same rounds (before/after under the same load).
`--expedite-rcu` (a diagnostic) sets /sys/kernel/rcu_expedited = 1 for the run and restores it:
FIFREEZE's cost here is mostly waiting for RCU grace periods, and this shows what is left
without them. Exit 1 when the goal is not met.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"

REGION = "us-east-1"
GOAL_FACTOR, GOAL_SLACK_MS = 1.5, 15.0
WRITE_EVERY = 0.002
BARE_CALLS = 5
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878
FROZEN_FOR = re.compile(r"frozen ([\d.]+)s")
RCU_EXPEDITED = "/sys/kernel/rcu_expedited"

# The writer: 4 KiB append + fsync every 2 ms until its stdin closes; then one JSON line with
# every write+fsync longer than 1 ms as [start, seconds] (CLOCK_MONOTONIC, shared by all
# processes) and the median of all of them.
WRITER = r"""
import json, os, select, statistics, sys, time
try:  # real-time, so what it records is blocking on the filesystem, not waiting for a CPU
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
except (AttributeError, OSError):
    pass
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
buf = b"c" * 4096
every = float(sys.argv[2])
slow, all_ = [], []
print("ready", flush=True)
tick = time.monotonic()
while True:
    t0 = time.monotonic()
    os.write(fd, buf)
    os.fsync(fd)
    took = time.monotonic() - t0
    all_.append(took)
    if took > 0.001:
        slow.append([t0, took])
    tick += every
    now = time.monotonic()
    if tick < now:
        tick = now  # behind (we were stalled): no burst to catch up
    if select.select([0], [], [], tick - now)[0] and not os.read(0, 64):
        break
print(json.dumps({"slow": slow, "median": statistics.median(all_), "count": len(all_)}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*argv, check=True):
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


class Writer:
    def __init__(self, path: str):
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, path, str(WRITE_EVERY)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # into its rhythm

    def stop(self) -> dict:
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(30)
        return json.loads(out)


def worst_stall(path: str, action) -> tuple[float, dict, object]:
    """Run action() while the writer writes; its worst write+fsync that overlapped the action."""
    writer = Writer(path)
    try:
        start = time.monotonic()
        result = action()
        end = time.monotonic()
        time.sleep(0.05)  # let a write held by the freeze finish and be recorded
    finally:
        report = writer.stop()
    overlapping = [took for t0, took in report["slow"] if t0 + took >= start and t0 <= end]
    return max(overlapping, default=report["median"]), report, result


@dataclasses.dataclass
class Disk:
    root: str
    mount_point: str
    device: str = ""
    backing_mount: str = ""


def make_disk(disk: Disk, backing: str) -> None:
    """Fills `disk` in as it goes, so remove_disk undoes whatever was made if a step fails."""
    where = disk.root
    if backing == "tmpfs":
        disk.backing_mount = where = os.path.join(disk.root, "backing")
        os.makedirs(where)
        sh("mount", "-t", "tmpfs", "-o", "size=600m", "tmpfs", where)
    image = os.path.join(where, "disk.img")
    sh("truncate", "-s", "512M", image)
    disk.device = sh("losetup", "--show", "-f", image).stdout.strip()
    sh("mkfs.ext4", "-q", "-L", "couchdb", "-m", "0", "-E",
       "lazy_itable_init=0,lazy_journal_init=0,nodiscard", disk.device)
    os.makedirs(disk.mount_point, exist_ok=True)
    sh("mount", "-o", "noatime", disk.device, disk.mount_point)


def remove_disk(disk: Disk) -> None:
    if os.path.ismount(disk.mount_point):
        sh("fsfreeze", "-u", disk.mount_point, check=False)  # never leave it frozen (umount hangs)
        sh("umount", disk.mount_point, check=False)
    if disk.device:
        sh("losetup", "-d", disk.device, check=False)
    if disk.backing_mount:
        sh("umount", disk.backing_mount, check=False)


def start_moto(port: int) -> subprocess.Popen:
    code = ("import sys, logging\n"
            "logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
            "from moto.server import ThreadedMotoServer\n"
            f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start()\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        sys.exit("bench_freeze: the moto server did not start")
    return proc


def floor_commands(mp: str) -> None:
    subprocess.run(["fsfreeze", "-f", mp], check=True)
    subprocess.run(["fsfreeze", "-u", mp], check=True)


def floor_ioctl(mp: str) -> None:
    fd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
        fcntl.ioctl(fd, FITHAW, 0)
    finally:
        os.close(fd)


def bare_calls(ec2, volume_id: str, tags: dict) -> float:
    """Median of BARE_CALLS CreateSnapshot calls from a client that already made one."""
    from hostagent.aws.snapshots import tag_specifications

    times = []
    for _ in range(BARE_CALLS):
        start = time.perf_counter()
        ec2.create_snapshot(VolumeId=volume_id, Description="bench_freeze bare call",
                            TagSpecifications=tag_specifications("snapshot", tags))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_hostagent(cloud, run_dir: str, mp: str, env: dict, source: str) -> str:
    os.makedirs(run_dir)
    config = dataclasses.replace(cloud, tmp=run_dir).config(
        filesystem={"mount_point": mp}, snapshot={"freeze": True, "freeze_timeout": 30})
    done = subprocess.run([sys.executable, "-m", "hostagent", "--config", config, "snapshot",
                           "--no-prune"], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": source}, cwd=source)
    if done.returncode != 0:
        sys.exit(f"bench_freeze: hostagent snapshot exited {done.returncode}:\n"
                 f"{done.stdout}{done.stderr}")
    return done.stdout


def export_revision(rev: str, root: str) -> str:
    """hostagent/ as it was at git revision `rev`, in a directory of its own."""
    dest = os.path.join(root, f"rev-{rev.replace('/', '_')}")
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "hostagent"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


@contextlib.contextmanager
def rcu_expedited(enabled: bool):
    """Diagnostic only: expedited RCU grace periods for the run (restored after). FIFREEZE's
    cost on this kernel is mostly normal grace periods; this shows what is left without them."""
    if not enabled:
        yield
        return
    with open(RCU_EXPEDITED) as f:
        before = f.read().strip()
    with open(RCU_EXPEDITED, "w") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(RCU_EXPEDITED, "w") as f:
            f.write(before)


def median_row(rows):
    return [statistics.median(col) for col in zip(*rows)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backing", choices=("tmpfs", "disk"), default="tmpfs")
    parser.add_argument("--compare", metavar="REV",
                        help="also run hostagent as of this git revision, in the same rounds")
    parser.add_argument("--expedite-rcu", action="store_true",
                        help="diagnostic: run with /sys/kernel/rcu_expedited = 1")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_freeze: needs root (loop device, mount, freeze): "
                 "sudo .venv/bin/python benchmarks/bench_freeze.py")
    for tool in ("losetup", "mkfs.ext4", "mount", "fsfreeze"):
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")):
            sys.exit(f"bench_freeze: needs {tool}")
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"

    root = tempfile.mkdtemp(prefix="bench-freeze-")
    port = free_port()
    moto = start_moto(port)
    imds = None
    disk = Disk(root=root, mount_point=os.path.join(root, "mnt"))
    try:
        from tests.support.cloud import make_cloud
        from tests.support.imds_credentials import RoleIMDSServer, instance_role_env

        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_REGION=REGION,
                          AWS_DEFAULT_REGION=REGION, AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench")
        os.environ.pop("AWS_PROFILE", None)

        def imds_factory(**kw):
            nonlocal imds
            imds = RoleIMDSServer(**kw).start()
            os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = imds.url
            return imds

        cloud = make_cloud(imds_factory, root)
        make_disk(disk, opts.backing)
        probe = os.path.join(disk.mount_point, "writer.couch")
        # hostagent as on an instance: region from the environment, the instance and the role
        # credentials from IMDSv2 (the bare call below uses static keys: it never fetches any).
        env = instance_role_env(os.environ)
        sources = [("hostagent", REPO)]
        if opts.compare:
            sources.append((opts.compare[:10], export_revision(opts.compare, root)))

        from datetime import datetime, timezone

        from hostagent.aws.snapshots import snapshot_tags

        tags = snapshot_tags(cloud.volume_id, cloud.volume_tags, "frozen",
                             datetime.now(timezone.utc))
        cloud.ec2.describe_volumes(VolumeIds=[cloud.volume_id])  # connection warm
        print(f"bench_freeze: ext4 on {disk.device} (backing on {opts.backing}), writer 4 KiB + "
              f"fsync every {WRITE_EVERY * 1000:.0f} ms, moto on 127.0.0.1:{port}, "
              f"{opts.rounds} rounds" + (", rcu_expedited=1" if opts.expedite_rcu else ""))
        names = [name for name, _ in sources]
        print(f"{'round':>5}  {'floor cmd':>10}  {'floor ioctl':>11}  {'bare call':>10}  "
              + "  ".join(f"{name:>10}  {'(frozen)':>9}" for name in names)
              + f"  {'writer p50':>10}")
        rows = []
        with rcu_expedited(opts.expedite_rcu):
            for n in range(1, opts.rounds + 1):
                floor_cmd, _, _ = worst_stall(probe, lambda: floor_commands(disk.mount_point))
                floor_io, _, _ = worst_stall(probe, lambda: floor_ioctl(disk.mount_point))
                bare = bare_calls(cloud.ec2, cloud.volume_id, tags)
                row, cells = [floor_cmd, floor_io, bare], []
                for i, (name, source) in enumerate(sources):
                    stall, writer, out = worst_stall(probe, lambda: run_hostagent(
                        cloud, os.path.join(root, f"run{n}-{i}"), disk.mount_point, env, source))
                    frozen = FROZEN_FOR.search(out)
                    row.append(stall)
                    cells.append(f"{ms(stall):>10}  "
                                 f"{(frozen.group(1) + ' s') if frozen else '?':>9}")
                rows.append(row)
                print(f"{n:>5}  {ms(floor_cmd):>10}  {ms(floor_io):>11}  {ms(bare):>10}  "
                      + "  ".join(cells) + f"  {ms(writer['median']):>10}")
        floor_cmd, floor_io, bare, ours, *others = median_row(rows)
        goal = GOAL_FACTOR * bare + GOAL_SLACK_MS / 1000
        met = ours <= goal
        print(f"median worst stall with hostagent snapshot: {ms(ours)}")
        for (name, _), other in zip(sources[1:], others):
            print(f"  the same as of {name}:                {ms(other)}")
        print(f"median bare CreateSnapshot call:            {ms(bare)}")
        print(f"ratio stall / bare call:                    {ours / bare:.2f}")
        print(f"floor (fsfreeze -f; fsfreeze -u):           {ms(floor_cmd)}"
              f"   (FIFREEZE; FITHAW: {ms(floor_io)})")
        print(f"stall above the ioctl floor:                {ms(ours - floor_io)}"
              f" ({'within' if ours - floor_io <= goal else 'above'} the goal's budget)")
        print(f"goal ≤ {GOAL_FACTOR} × bare call + {GOAL_SLACK_MS:.0f} ms = {ms(goal)}: "
              f"{'met' if met else 'NOT met'}")
        if imds is not None and imds.credential_fetches:
            print(f"(IMDS role-credential fetches: {len(imds.credential_fetches)}, one per "
                  f"hostagent run, when its client is built)")
        return 0 if met else 1
    finally:
        remove_disk(disk)
        if imds is not None:
            imds.stop()
        moto.terminate()
        moto.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
