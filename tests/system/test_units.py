"""Our systemd units pass `systemd-analyze verify`, and the whole boot graph they join (systemd's
own units, cloud-init's real units, Docker and the ECS agent) has no ordering cycle.

verify runs against a scratch root (--root) laid out as packaging/bake.sh lays out an image, so
ExecStart paths exist without touching this host's /opt or /etc. systemd's units come from this
host, cloud-init's from its Debian package (unpacked, not installed). docker.service and
ecs.service are hand-written stand-ins (no package here ships them) that copy the ordering of
the real ones, in two flavours:
- debian: amazon-ecs-init's .deb unit (Requires/After=docker.service), and cloud-init's Debian
  cloud-final.service, which runs after multi-user.target;
- amazon-linux: amazon-ecs-init's Amazon Linux unit (also After=cloud-final.service), and
  cloud-final.service without After=multi-user.target, as cloud-init renders it there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.hosttools import need_tool
from tests.system.cloudinit_deb import cloud_init_tree

REPO = Path(__file__).resolve().parents[2]
UNITS = ("hostagent-bootstrap.service", "hostagent-secrets.service", "hostagent.service",
         "hostagent-snapshot.service", "hostagent-snapshot.timer")
# What packaging/bake.sh enables (the snapshot service is started by its timer).
ENABLED = ("hostagent-bootstrap.service", "hostagent-secrets.service", "hostagent.service",
           "hostagent-snapshot.timer")
DROPIN = "ecs.service.d/10-hostagent.conf"
UNIT_DIR = "usr/local/lib/systemd/system"  # where packaging/bake.sh installs them
# Options that give a service its own mount namespace: a mount made inside is invisible to the host.
MOUNT_NAMESPACE_OPTIONS = (
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
    "BindReadOnlyPaths", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectHostname", "ProtectClock", "ProtectProc", "ProcSubset",
    "MountFlags", "RootDirectory", "RootImage", "PrivateNetwork", "DevicePolicy", "DeviceAllow",
)

DOCKER = """\
[Unit]
Description=stand-in for Docker (ordering as in docker-ce)
After=network-online.target
Wants=network-online.target
[Service]
ExecStart=/usr/bin/dockerd
[Install]
WantedBy=multi-user.target
"""
ECS = {
    "debian": """\
[Unit]
Description=stand-in for the ECS agent (ordering as in amazon-ecs-init's Debian package)
Requires=docker.service
After=docker.service
[Service]
Type=simple
EnvironmentFile=-/etc/ecs/ecs.config
ExecStart=/usr/libexec/amazon-ecs-init start
[Install]
WantedBy=multi-user.target
""",
    "amazon-linux": """\
[Unit]
Description=stand-in for the ECS agent (ordering as in amazon-ecs-init on Amazon Linux)
Wants=docker.service
After=docker.service
After=cloud-final.service
[Service]
Type=simple
EnvironmentFile=-/etc/ecs/ecs.config
ExecStart=/usr/libexec/amazon-ecs-init start
[Install]
WantedBy=multi-user.target
""",
}


def unit_options(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for each assignment; systemd allows repeated keys, so no dict."""
    section, out = "", []
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(text: str, key: str) -> list[str]:
    return [w for _, k, v in unit_options(text) if k == key for w in v.split()]


def make_executable(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)


@pytest.fixture(scope="module", params=sorted(ECS))
def verify_root(request, tmp_path_factory):
    """A root with systemd's units, cloud-init's units and ours, enabled as the bake enables them."""
    flavour = request.param
    need_tool("systemd-analyze", "systemd")
    need_tool("systemctl", "systemd")
    root = tmp_path_factory.mktemp(f"verify-root-{flavour}")
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "bin").symlink_to("usr/bin")
    (root / "sbin").symlink_to("usr/sbin")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    tree = cloud_init_tree()
    for unit in sorted((tree / "lib/systemd/system").glob("cloud-*")):
        shutil.copy(unit, root / "usr/lib/systemd/system" / unit.name)
    if flavour == "amazon-linux":
        final = root / "usr/lib/systemd/system/cloud-final.service"
        final.write_text(final.read_text().replace("After=multi-user.target\n", ""))
    (root / "usr/lib/systemd/system/docker.service").write_text(DOCKER)
    (root / "usr/lib/systemd/system/ecs.service").write_text(ECS[flavour])
    for exe in ("opt/hostagent/bin/hostagent", "usr/bin/dockerd", "usr/libexec/amazon-ecs-init",
                "usr/bin/cloud-init"):
        make_executable(root / exe)
    unit_dir = root / UNIT_DIR
    (unit_dir / "ecs.service.d").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(REPO / "systemd" / unit, unit_dir / unit)
    shutil.copy(REPO / "systemd" / DROPIN, unit_dir / DROPIN)
    enable = [*ENABLED, "docker.service", "ecs.service", "cloud-init-local.service",
              "cloud-init.service", "cloud-config.service", "cloud-final.service"]
    subprocess.run(["systemctl", f"--root={root}", "enable", *enable], check=True,
                   capture_output=True)
    # At boot cloud-init's generator pulls cloud-init.target into multi-user.target like this.
    (root / "etc/systemd/system/multi-user.target.wants/cloud-init.target").symlink_to(
        "/usr/lib/systemd/system/cloud-init.target")
    return root


def verify(root: Path, *units: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", *units],
                          capture_output=True, text=True, timeout=60)


def test_bake_installs_units_where_this_test_puts_them():
    bake = (REPO / "packaging/bake.sh").read_text()
    assert f"UNIT_DIR=/{UNIT_DIR}" in bake
    for unit in UNITS:
        assert unit in bake
    assert DROPIN.split("/")[1] in bake
    # Every unit in systemd/ is one this test verifies (a new unit cannot go unchecked).
    assert sorted(p.name for p in (REPO / "systemd").glob("*.*") if p.is_file()) == sorted(UNITS)
    # bake.sh enables what this test's root enables.
    enables = re.findall(r'systemctl --root="\$ROOT" enable ((?:[^>]|\\\n)+)>', bake)
    enabled = {w for line in enables for w in line.replace("\\\n", " ").split()}
    assert enabled == set(ENABLED)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(verify_root, unit):
    done = verify(verify_root, f"/{UNIT_DIR}/{unit}")
    # verify exits 0 on unknown keys and unparsable values; it only says so: any output is a fail.
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), \
        done.stdout + done.stderr


def test_verify_reports_a_broken_unit(verify_root, tmp_path):
    """Control: the check above does see mistakes (a misspelt key, a bad value, a missing binary)."""
    broken = (REPO / "systemd/hostagent.service").read_text()
    broken = broken.replace("WatchdogSec=", "WatchdogSecs=").replace("Restart=on-failure",
                                                                    "Restart=sometimes")
    broken = broken.replace("/opt/hostagent/bin/hostagent", "/opt/hostagent/bin/missing")
    path = verify_root / "etc/systemd/system/broken-copy.service"
    path.write_text(broken)
    try:
        done = verify(verify_root, "/etc/systemd/system/broken-copy.service")
    finally:
        path.unlink()
    out = done.stdout + done.stderr
    assert "WatchdogSecs" in out and "sometimes" in out and "missing" in out


def test_boot_graph_has_no_ordering_cycle(verify_root):
    """multi-user.target with everything enabled: cloud-final after multi-user, ECS after
    cloud-final and after our bootstrap, bootstrap before Docker. A cycle here is the boot
    deadlock the issue warns about."""
    done = verify(verify_root, "multi-user.target", "ecs.service", "timers.target")
    out = done.stdout + done.stderr
    assert "cycle" not in out.lower(), out
    assert done.returncode == 0, out


def test_cycle_check_catches_bootstrap_after_cloud_final(verify_root):
    """Control: ordering bootstrap after cloud-final (the tempting mistake) is a reported cycle
    on Debian, where cloud-final runs after multi-user.target, which waits for bootstrap.
    (Amazon Linux's cloud-final is not after multi-user.target, so there it is no cycle.)"""
    dropin = verify_root / "etc/systemd/system/hostagent-bootstrap.service.d/bad.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Unit]\nAfter=cloud-final.service\n")
    try:
        done = verify(verify_root, "multi-user.target", "ecs.service")
    finally:
        shutil.rmtree(dropin.parent)
    cycle = "ordering cycle" in (done.stdout + done.stderr)
    assert cycle == verify_root.name.startswith("verify-root-debian")


def test_ecs_waits_for_bootstrap_and_secrets_but_does_not_require_them():
    text = (REPO / "systemd" / DROPIN).read_text()
    ours = ["hostagent-bootstrap.service", "hostagent-secrets.service"]
    assert values(text, "After") == ours
    assert values(text, "Wants") == ours
    for strong in ("Requires", "Requisite", "BindsTo", "PartOf", "Upholds"):
        assert not values(text, strong), f"{strong}= would keep ECS down when one of ours fails"


def test_secrets_unit_fetches_before_ecs_only_when_configured_and_retries():
    text = (REPO / "systemd/hostagent-secrets.service").read_text()
    assert values(text, "Type") == ["oneshot"] and values(text, "RemainAfterExit") == ["yes"]
    assert values(text, "ExecStart") == ["/opt/hostagent/bin/hostagent", "fetch-secrets",
                                         "--if-configured"]
    assert "ecs.service" in values(text, "Before")
    assert {"network-online.target", "cloud-config.service",
            "hostagent-bootstrap.service"} <= set(values(text, "After"))
    assert "cloud-final.service" not in values(text, "After")
    assert values(text, "Wants") == ["network-online.target"]
    for strong in ("Requires", "Requisite", "BindsTo", "PartOf", "Upholds"):
        assert not values(text, strong), strong
    assert values(text, "Restart") == ["on-failure"] and values(text, "RestartSec")
    assert set(values(text, "RestartPreventExitStatus")) == {"2", "3"}
    assert values(text, "StartLimitBurst"), "retries must be bounded"
    timeout = values(text, "TimeoutStartSec")
    assert timeout and timeout[0] not in ("infinity", "0")
    # Least privilege: what writing one file (keeping its owner) needs, nothing to mount with.
    assert set(values(text, "CapabilityBoundingSet")) == {
        "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH"}
    assert values(text, "NoNewPrivileges") == ["yes"]
    assert values(text, "SystemCallFilter") == ["@system-service"]
    # dest is /etc/grand-central/secrets.env by default: /etc must stay writable.
    assert values(text, "ProtectSystem") == ["yes"]



def test_bootstrap_is_ordered_before_docker_and_ecs_and_bounded():
    text = (REPO / "systemd/hostagent-bootstrap.service").read_text()
    assert {"docker.service", "ecs.service"} <= set(values(text, "Before"))
    assert "cloud-config.service" in values(text, "After")
    assert "cloud-final.service" not in values(text, "After")
    assert values(text, "Type") == ["oneshot"] and values(text, "RemainAfterExit") == ["yes"]
    timeout = values(text, "TimeoutStartSec")
    assert timeout and timeout[0] not in ("infinity", "0")
    assert set(values(text, "RestartPreventExitStatus")) == {"2", "3"}
    assert values(text, "StartLimitBurst"), "retries must be bounded"


def test_agent_is_notify_with_watchdog_and_bounded_start():
    text = (REPO / "systemd/hostagent.service").read_text()
    assert values(text, "Type") == ["notify"]
    assert values(text, "WatchdogSec") and values(text, "Restart") == ["on-failure"]
    assert "hostagent-bootstrap.service" in values(text, "After")
    timeout = values(text, "TimeoutStartSec")
    assert timeout and timeout[0] not in ("infinity", "0")


@pytest.mark.parametrize("unit", ["hostagent-bootstrap.service", "hostagent.service"])
def test_mounting_units_stay_in_the_host_mount_namespace(unit):
    text = (REPO / "systemd" / unit).read_text()
    used = {k for _, k, _ in unit_options(text)} & set(MOUNT_NAMESPACE_OPTIONS)
    assert not used, f"{unit}: {sorted(used)} would hide its mounts from the host"
    caps = set(values(text, "CapabilityBoundingSet"))
    assert {"CAP_SYS_ADMIN", "CAP_LINUX_IMMUTABLE", "CAP_CHOWN"} <= caps


def test_timer_is_daily_persistent_and_randomized():
    text = (REPO / "systemd/hostagent-snapshot.timer").read_text()
    assert values(text, "Persistent") == ["yes"] or values(text, "Persistent") == ["true"]
    assert values(text, "RandomizedDelaySec")
    calendar = next(v for _, k, v in unit_options(text) if k == "OnCalendar")
    done = subprocess.run(["systemd-analyze", "calendar", calendar], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert re.search(r"Normalized form: \*-\*-\* 03:00:00 UTC", done.stdout), done.stdout


def test_cron_file_is_valid_and_defers_to_the_timer(tmp_path):
    lines = [ln for ln in (REPO / "cron/hostagent").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    jobs = [ln for ln in lines if not re.match(r"^[A-Z_]+=", ln)]
    assert len(jobs) == 1
    fields = jobs[0].split(None, 6)
    minute, hour, dom, month, dow, user, command = fields
    assert user == "root" and (dom, month, dow) == ("*", "*", "*")
    assert 0 <= int(minute) < 60 and 0 <= int(hour) < 24
    assert "%" not in command, "cron turns % into newlines"
    assert "is-enabled hostagent-snapshot.timer" in command
    syntax = subprocess.run(["sh", "-n", "-c", command], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    # The name must be one cron reads from /etc/cron.d (no dots).
    assert "." not in "hostagent"


def test_cron_command_runs_the_snapshot_only_when_the_timer_is_disabled(tmp_path):
    """Run the cron command with stand-in systemctl/logger and hostagent path (the real ones
    would act on this host): enabled timer -> nothing runs; disabled -> the snapshot runs."""
    command = [ln for ln in (REPO / "cron/hostagent").read_text().splitlines()
               if ln and not ln.startswith("#") and not re.match(r"^[A-Z_]+=", ln)][0]
    command = command.split(None, 6)[6]
    marker = tmp_path / "ran"
    fake_hostagent = tmp_path / "hostagent"
    fake_hostagent.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\n")
    fake_hostagent.chmod(0o755)
    command = command.replace("/opt/hostagent/bin/hostagent", str(fake_hostagent))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "logger").write_text("#!/bin/sh\ncat >/dev/null\n")
    for enabled, expect_run in ((0, False), (1, True)):
        (bindir / "systemctl").write_text(f"#!/bin/sh\nexit {enabled}\n")
        for exe in bindir.iterdir():
            exe.chmod(0o755)
        marker.unlink(missing_ok=True)
        subprocess.run(["sh", "-c", command], env={"PATH": f"{bindir}:/usr/bin:/bin"},
                       check=False, timeout=30)
        assert marker.exists() == expect_run
        if expect_run:
            assert marker.read_text().split() == ["snapshot"]


def test_bake_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(REPO / "packaging/bake.sh")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
