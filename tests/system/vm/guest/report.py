"""Test-only, runs inside the VM (vmtest-report.service, after bootstrap, the agent and ECS):
gather what tests/system/test_vm.py checks and write it as one JSON document to the second
serial port (/dev/ttyS1, a file on the host). The unit then powers the VM off.

Kernel command line: vmtest.scenario=NAME, vmtest.marker=write|check|none, vmtest.token=TEXT,
vmtest.snapshot=1, vmtest.runbook=remount (the operator's maintenance step for a host set up by
hand: umount the volume, run `hostagent bootstrap`), vmtest.expect=VALUE (wait for the ECS
attribute to reach VALUE, not just to appear), vmtest.wait_for=VALUE (before looking at
anything, wait for the attribute to reach VALUE, noting each value it took on the way: a host
whose volume the agent claims after boot), vmtest.bench=NAME and vmtest.rounds=N (a benchmark
boot: run only benchmarks/bench_NAME.py from the drive labelled vmbench, report its output),
vmtest.live_grow=1 (the agent grows a loop device's mounted ext4 live: see live_grow()).
Runs with /opt/hostagent/bin/python, for boto3 (to read the ECS attributes back from moto).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

REPORT_PORT = "/dev/ttyS1"
MOUNT_POINT = "/opt/couchdb"
MARKER = f"{MOUNT_POINT}/data/vmtest-marker"
ROOT_VIEW = "/run/vmtest-rootview"  # / bind-mounted: shows what lies under the mount point
INTROSPECTION = "http://127.0.0.1:51678/v1/metadata"
ATTRIBUTE = "hostagent.persistence"
REASON = "hostagent.reason"
ATTRIBUTE_WAIT = 180  # seconds for the agent's first report to reach ECS
CLAIM_WAIT = 300  # seconds for vmtest.wait_for (the volume is released by the test meanwhile)
UNITS = ("hostagent-bootstrap.service", "hostagent-secrets.service", "hostagent.service",
         "ecs.service", "opt-couchdb.mount",
         "cloud-final.service", "hostagent-snapshot.timer", "hostagent-snapshot.service",
         "network-online.target")
PROPS = ("ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts", "LoadState",
         "UnitFileState", "SourcePath", "InactiveExitTimestampMonotonic",
         "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic",
         "ExecMainExitTimestampMonotonic", "StatusText", "NextElapseUSecRealtime")


def sh(*argv: str, timeout: float = 120) -> dict:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return {"rc": p.returncode, "out": p.stdout[-60000:], "err": p.stderr[-8000:]}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"rc": None, "out": "", "err": f"{type(exc).__name__}: {exc}"}


def cmdline() -> dict[str, str]:
    """vmtest.KEY=VALUE words of the kernel command line (set per boot by the test)."""
    out = {}
    for word in open("/proc/cmdline").read().split():
        if word.startswith("vmtest.") and "=" in word:
            key, value = word[len("vmtest."):].split("=", 1)
            out[key] = value
    return out


def uptime() -> float:
    return float(open("/proc/uptime").read().split()[0])


def unit_state(unit: str) -> dict:
    out = sh("systemctl", "show", unit, "--property=" + ",".join(PROPS))["out"]
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def json_of(result: dict):
    try:
        return json.loads(result["out"])
    except ValueError:
        return None


def file_info(path: str) -> dict | None:
    """Owner, mode and (test-only secrets, up to 4 KiB) text of a file, or None if missing."""
    try:
        st = os.lstat(path)
        with open(path, errors="replace") as f:
            text = f.read(4096)
    except OSError:
        return None
    return {"uid": st.st_uid, "gid": st.st_gid, "mode": oct(st.st_mode & 0o7777), "text": text}


def ext4_sizes() -> dict:
    """The data disk's size, its ext4's (superblock: block count x block size) and statvfs's."""
    sizes: dict = {"device_bytes": int(open("/sys/block/nvme0n1/size").read()) * 512}
    header = sh("dumpe2fs", "-h", "/dev/nvme0n1")["out"]
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    try:
        sizes["fs_bytes"] = int(fields["Block count"]) * int(fields["Block size"])
    except (KeyError, ValueError):
        sizes["dumpe2fs"] = header[-2000:]
    st = os.statvfs(MOUNT_POINT)
    sizes["statvfs_bytes"] = st.f_blocks * st.f_frsize
    return sizes


def stat_of(path: str) -> dict | None:
    try:
        st = os.stat(path)
    except OSError as exc:
        return {"error": exc.strerror}
    return {"uid": st.st_uid, "gid": st.st_gid, "mode": oct(st.st_mode & 0o7777)}


def bare_mount_point() -> dict:
    """What lies on the root disk under /opt/couchdb, seen through a bind mount of /."""
    os.makedirs(ROOT_VIEW, exist_ok=True)
    mounted = sh("mount", "--bind", "/", ROOT_VIEW)
    if mounted["rc"] != 0:
        return {"error": mounted["err"]}
    try:
        bare = ROOT_VIEW + MOUNT_POINT
        return {"exists": os.path.isdir(bare),
                "entries": sorted(os.listdir(bare)) if os.path.isdir(bare) else None,
                "lsattr": sh("lsattr", "-d", bare)["out"].split()[:1]}
    finally:
        sh("umount", ROOT_VIEW)


def docker_would_create() -> dict:
    """With nothing mounted, do what Docker does for a missing bind-mount source."""
    target = f"{MOUNT_POINT}/data"
    try:
        os.makedirs(target)
    except OSError as exc:
        return {"created": False, "errno": exc.errno, "error": exc.strerror}
    os.rmdir(target)  # never leave it: the test fails on this report alone
    return {"created": True}


def marker(action: str, token: str) -> dict:
    if action == "write":
        with open(MARKER, "w") as fh:
            fh.write(token)
            fh.flush()
            os.fsync(fh.fileno())
        os.chown(MARKER, 5984, 5984)
        return {"written": token}
    if action == "check":
        try:
            return {"read": open(MARKER).read()}
        except OSError as exc:
            return {"error": exc.strerror}
    return {}


def ecs_attributes(deadline: float, expect: str | None, history: list | None = None,
                   pause: float = 3) -> dict:
    """The container instance the (stand-in) ECS agent registered, and its attributes in ECS,
    waiting until hostagent has put hostagent.persistence there (with the value `expect`).
    history, if given, gets [uptime, persistence, reason] each time that pair changes."""
    import boto3

    arn = cluster = ecs = None
    seen: list = []
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(INTROSPECTION, timeout=3) as resp:
                doc = json.load(resp)
            arn, cluster = doc.get("ContainerInstanceArn"), doc.get("Cluster")
        except OSError:
            arn = None
        if arn:
            ecs = ecs or boto3.client("ecs", region_name=arn.split(":")[3])
            # moto ignores attributeName alone: list all and filter here.
            seen = [a for a in ecs.list_attributes(cluster=cluster,
                                                   targetType="container-instance")["attributes"]
                    if a.get("targetId") in (arn, arn.split("/")[-1])]
            values = {a["name"]: a.get("value") for a in seen}
            now = [values.get(ATTRIBUTE), values.get(REASON)]
            if history is not None and now[0] and (not history or history[-1][1:] != now):
                history.append([uptime(), *now])
            if any(a["name"] == ATTRIBUTE and (expect is None or a.get("value") == expect)
                   for a in seen):
                break
        time.sleep(pause)
    return {"arn": arn, "cluster": cluster,
            "attributes": {a["name"]: a.get("value") for a in seen},
            "waited_until_uptime": uptime()}


def main() -> None:
    started = uptime()
    args = cmdline()
    report: dict = {"scenario": args.get("scenario"), "cmdline": args, "report_started": started}
    if args.get("bench"):
        report["bench"] = bench(args["bench"], args.get("rounds", "3"))
        report["report_finished"] = uptime()
        write(report)
        return
    if args.get("wait_for"):
        history: list = []
        report["claim"] = ecs_attributes(time.monotonic() + CLAIM_WAIT, args["wait_for"],
                                         history, pause=1)
        report["claim"]["history"] = history
    if args.get("runbook") == "remount":
        report["runbook"] = {
            "fstab_before": open("/etc/fstab").read(),
            "umount": sh("umount", MOUNT_POINT),
            "bootstrap": sh("/usr/local/bin/hostagent", "bootstrap", "--json", timeout=300),
        }
    report["instance_id"] = open("/var/lib/cloud/data/instance-id").read().strip() \
        if os.path.exists("/var/lib/cloud/data/instance-id") else None
    report["units"] = {u: unit_state(u) for u in UNITS}
    report["failed_units"] = sh("systemctl", "--failed", "--plain", "--no-legend")["out"]
    report["is_system_running"] = sh("systemctl", "is-system-running")["out"].strip()
    report["timer_enabled"] = sh("systemctl", "is-enabled", "hostagent-snapshot.timer")["out"].strip()
    report["findmnt"] = json_of(sh("findmnt", "-J", "-o", "SOURCE,TARGET,FSTYPE,OPTIONS",
                                   "--mountpoint", MOUNT_POINT))
    report["fstab"] = open("/etc/fstab").read()
    report["lsblk"] = json_of(sh("lsblk", "-J", "-o", "NAME,SERIAL,UUID,FSTYPE,LABEL,MOUNTPOINT"))
    nvme = "/dev/nvme0n1"
    report["nvme"] = {
        "present": os.path.exists(nvme),
        "serial": open("/sys/block/nvme0n1/device/serial").read().strip()
        if os.path.exists("/sys/block/nvme0n1/device/serial") else None,
        "blkid": sh("blkid", "-p", "-o", "export", nvme)["out"] if os.path.exists(nvme) else "",
    }
    mounted = bool(report["findmnt"])
    report["layout"] = {d: stat_of(f"{MOUNT_POINT}/{d}") for d in ("", "data", "etc", "etc/local.d")} \
        if mounted else None
    report["bare_mount_point"] = bare_mount_point()
    if not mounted:
        report["docker_would_create"] = docker_would_create()
    report["marker"] = marker(args.get("marker", "none"), args.get("token", "")) if mounted else {}
    report["ext4"] = ext4_sizes() if mounted else {}
    report["secrets_env"] = file_info("/etc/grand-central/secrets.env")
    report["admin_ini"] = file_info(f"{MOUNT_POINT}/etc/local.d/10-hostagent.ini") if mounted else None
    if args.get("live_grow") == "1":
        report["live_grow"] = live_grow()
    report["verify_mount"] = sh("/usr/local/bin/hostagent", "verify-mount", "--json")
    report["bootstrap_again"] = sh("/usr/local/bin/hostagent", "bootstrap", "--dry-run", "--json")
    report["journal"] = {
        u: sh("journalctl", "-b", "-u", u, "-o", "cat", "--no-pager")["out"][-20000:]
        for u in ("hostagent-bootstrap.service", "hostagent.service", "ecs.service")}
    # The same with seconds since boot, for timelines: the agent's and the kernel's (hot-plug).
    report["journal_monotonic"] = {
        "hostagent.service": sh("journalctl", "-b", "-u", "hostagent.service", "-o",
                                "short-monotonic", "--no-pager")["out"][-20000:],
        "kernel": "\n".join(line for line in sh("journalctl", "-b", "-k", "-o", "short-monotonic",
                                                 "--no-pager")["out"].splitlines()
                            if "nvme" in line)[-8000:]}
    report["files"] = {p: open(p).read() if os.path.exists(p) else None
                       for p in ("/etc/hostagent/hostagent.toml", "/etc/ecs/ecs.config",
                                 "/etc/default/hostagent", "/etc/fstab.hostagent.bak")}
    report["ecs"] = ecs_attributes(time.monotonic() + ATTRIBUTE_WAIT, args.get("expect"))
    if args.get("snapshot") == "1":
        report["snapshot_run"] = sh("systemctl", "start", "hostagent-snapshot.service", timeout=300)
        report["snapshot_unit"] = unit_state("hostagent-snapshot.service")
        report["snapshot_journal"] = sh("journalctl", "-b", "-u", "hostagent-snapshot.service",
                                        "-o", "cat", "--no-pager")["out"][-20000:]
    report["agent_after"] = unit_state("hostagent.service")
    analyze = sh("systemd-analyze", "time")
    report["systemd_analyze_time"] = (analyze["out"] + analyze["err"]).strip()
    report["report_finished"] = uptime()
    write(report)


LIVE = "/var/tmp/vmtest-live-grow"
LIVE_CONFIG = f"""# vmtest.live_grow: a second hostagent on a loop device of its own (no AWS, no ECS)
[volume]
device = "{{device}}"
[filesystem]
mount_point = "{LIVE}/mnt"
fstab = "{LIVE}/fstab"
[agent]
interval = 2
[ecs]
introspection_url = "http://127.0.0.1:9/v1/metadata"
attribute_prefix = "vmtestlive"
[host]
lock_file = "{LIVE}/lock"
state_dir = "{LIVE}/state"
"""


def live_grow() -> dict:
    """vmtest.live_grow=1: the agent's own filesystem grow on this real kernel (QEMU 7.2's NVMe
    device cannot be resized live, a loop device can): `hostagent bootstrap` formats and mounts a
    256 MiB loop device under its own config, lock and state; `hostagent agent` runs on it; the
    backing file grows to 512 MiB and `losetup -c` (what the NVMe driver does after a resize
    event); the agent must grow the mounted ext4 by itself, the data intact."""
    import shutil
    import signal

    shutil.rmtree(LIVE, ignore_errors=True)
    os.makedirs(f"{LIVE}/mnt")
    open(f"{LIVE}/fstab", "w").close()
    backing = f"{LIVE}/volume.img"
    with open(backing, "wb") as f:
        f.truncate(256 << 20)
    device = sh("losetup", "--show", "-f", backing)["out"].strip()
    out: dict = {"device": device}
    config = f"{LIVE}/hostagent.toml"
    with open(config, "w") as f:
        f.write(LIVE_CONFIG.format(device=device))
    hostagent = "/usr/local/bin/hostagent"
    out["bootstrap"] = sh(hostagent, "--config", config, "bootstrap", "--json", timeout=180)
    mnt = f"{LIVE}/mnt"

    def fs_bytes() -> int:
        st = os.statvfs(mnt)
        return st.f_blocks * st.f_frsize

    agent = None
    try:
        if out["bootstrap"]["rc"] != 0:
            return out
        token = os.urandom(8).hex()
        with open(f"{mnt}/data/live-marker", "w") as f:
            f.write(token)
        out["fs_before"] = fs_bytes()
        log = open(f"{LIVE}/agent.log", "w")
        agent = subprocess.Popen([hostagent, "--config", config, "agent"], stdout=log,
                                 stderr=subprocess.STDOUT, text=True)
        time.sleep(8)  # the agent's first rounds: a device that matches its ext4, nothing to do
        out["fs_untouched"] = fs_bytes()
        with open(backing, "r+b") as f:
            f.truncate(512 << 20)
        out["losetup_c"] = sh("losetup", "-c", device)
        grown_at = time.monotonic()
        while time.monotonic() - grown_at < 120 and fs_bytes() < 400 << 20:
            time.sleep(0.5)
        out["seconds_to_grown"] = round(time.monotonic() - grown_at, 1)
        out["fs_after"] = fs_bytes()
        out["device_bytes"] = int(open(f"/sys/block/{os.path.basename(device)}/size").read()) * 512
        out["marker_intact"] = open(f"{mnt}/data/live-marker").read() == token
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
            out["agent_rc"] = agent.returncode
            out["agent_log"] = open(f"{LIVE}/agent.log").read()[-12000:]
        sh("umount", mnt)
        out["fsck"] = sh("e2fsck", "-f", "-n", device)
        sh("losetup", "-d", device)
    return out


def bench(name: str, rounds: str) -> dict:
    """vmtest.bench=NAME (benchmarks/bench_grow_vm.py): run benchmarks/bench_NAME.py from the
    read-only drive labelled vmbench against the baked /opt/hostagent, nothing else."""
    where = "/run/vmtest-bench"
    os.makedirs(where, exist_ok=True)
    mounted = sh("mount", "-o", "ro", "/dev/disk/by-label/vmbench", where)
    if mounted["rc"] != 0:
        return {"rc": None, "out": "", "err": f"mount vmbench: {mounted['err']}"}
    return sh("/opt/hostagent/bin/python", f"{where}/bench_{name}.py", "--venv", "/opt/hostagent",
              "--rounds", rounds, timeout=1500)


def write(report: dict) -> None:
    data = json.dumps(report, sort_keys=True)
    with open(REPORT_PORT, "w") as port:
        port.write("\nVMTEST-REPORT-BEGIN\n" + data + "\nVMTEST-REPORT-END\n")
        port.flush()


if __name__ == "__main__":
    try:
        main()
    except BaseException as exc:  # the host must learn why, not only time out
        import traceback

        write({"crashed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        raise
