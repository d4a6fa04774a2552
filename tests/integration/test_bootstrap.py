"""bootstrap + verify-mount end to end on real loop devices with real mkfs, blkid, mount, chattr.

Every test runs hostagent as a subprocess (`python -m hostagent`), exactly as cron/systemd do,
against a temp fstab and mount point — never the host's /etc/fstab or /opt/couchdb.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.hosttools import need_root, need_tool, sh, sha256_of_device

pytestmark = pytest.mark.root

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hostagent(config: str, *args: str, env: dict | None = None, timeout: float = 120):
    full_env = {**os.environ, "HOSTAGENT_CONFIG": config, **(env or {})}
    full_env.setdefault("PYTHONPATH", REPO)
    return subprocess.run([sys.executable, "-m", "hostagent", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=REPO)


def make_config(paths, device: str, **sections) -> str:
    fs = {"mount_point": paths["mount_point"], "fstab": paths["fstab"]}
    fs.update(sections.pop("filesystem", {}))
    body = [f'[volume]\ndevice = "{device}"\n', "[filesystem]"]
    body += [f"{k} = {json.dumps(v)}" for k, v in fs.items()]
    body += ["", "[host]", f'lock_file = "{paths["lock_file"]}"', f'state_dir = "{paths["state_dir"]}"']
    for name, values in sections.items():
        body += ["", f"[{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = os.path.join(paths["root"], "hostagent.toml")
    with open(path, "w") as f:
        f.write("\n".join(body) + "\n")
    return path


def steps_by_name(result) -> dict:
    data = json.loads(result.stdout)
    return {s["name"]: s["status"] for s in data["steps"]}


def intent_record(dev: str, uuid: str) -> dict:
    """The format intent bootstrap writes right before mkfs, for this disk (its durable
    identity: the loop's backing file by inode)."""
    from hostagent.adapters.blockdev import durable_identity, list_block_devices, \
        resolve_explicit_device

    info = resolve_explicit_device(dev, list_block_devices())
    return {"identity": durable_identity(info), "volume_id": None, "uuid": uuid,
            "device": dev, "size_bytes": info.size_bytes, "started": "test"}


def fs_uuid(dev: str) -> str:
    return sh("blkid", "-p", "-o", "value", "-s", "UUID", dev).stdout.strip()


@pytest.fixture
def setup(loop_device, host_paths):
    need_root()
    need_tool("mkfs.ext4", "e2fsprogs")
    need_tool("chattr", "e2fsprogs")
    dev = loop_device("320M")  # xfs needs at least 300 MiB
    return dev, host_paths, make_config(host_paths, dev)


def test_blank_volume_is_formatted_mounted_laid_out_and_second_run_is_a_noop(setup):
    dev, paths, config = setup
    mp = paths["mount_point"]
    fstab_before = open(paths["fstab"]).read()

    first = hostagent(config, "bootstrap", "--json")
    assert first.returncode == 0, first.stderr
    status = steps_by_name(first)
    assert status["format"] == "done" and status["fstab"] == "done" and status["mount"] == "done"
    assert status["layout"] == "done" and status["guard"] == "done"

    uuid = fs_uuid(dev)
    assert sh("blkid", "-p", "-o", "value", "-s", "LABEL", dev).stdout.strip() == "couchdb"
    assert "Reserved block count:     0" in sh("tune2fs", "-l", dev).stdout
    fstab = open(paths["fstab"]).read()
    assert fstab.startswith(fstab_before), "other lines must be kept byte for byte"
    ours = fstab[len(fstab_before):]
    assert ours.startswith(f"UUID={uuid}\t{mp}\text4\t") and "nofail" in ours
    assert "x-systemd.device-timeout=30s" in ours
    assert sh("findmnt", "-n", "-o", "SOURCE", mp).stdout.strip() == dev
    st = os.stat(mp)  # the volume's top: private, the directories under it as the image wants
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o700)
    for d in ("data", "etc", "etc/local.d"):
        st = os.stat(os.path.join(mp, d))
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (5984, 5984, 0o755)

    verify = hostagent(config, "verify-mount", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    checks = json.loads(verify.stdout)["checks"]
    assert all(c["ok"] for c in checks) and {"mounted", "device", "fstab", "free-space"} <= {c["name"] for c in checks}

    with open(os.path.join(mp, "data", "marker"), "w") as f:
        f.write("precious")
    fstab_after_first = open(paths["fstab"], "rb").read()
    second = hostagent(config, "bootstrap", "--json")
    assert second.returncode == 0, second.stderr
    assert set(steps_by_name(second).values()) == {"skipped"}
    assert open(paths["fstab"], "rb").read() == fstab_after_first
    assert fs_uuid(dev) == uuid

    # Reboot path: unmounted but formatted → mounted again from fstab, data intact, same UUID.
    sh("umount", mp)
    third = hostagent(config, "bootstrap", "--json")
    assert third.returncode == 0, third.stderr
    status = steps_by_name(third)
    assert status["format"] == "skipped" and status["mount"] == "done" and status["fstab"] == "skipped"
    assert open(os.path.join(mp, "data", "marker")).read() == "precious"
    assert fs_uuid(dev) == uuid


def test_dry_run_changes_nothing(setup):
    dev, paths, config = setup
    before = sha256_of_device(dev)
    fstab = open(paths["fstab"], "rb").read()
    result = hostagent(config, "bootstrap", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    status = steps_by_name(result)
    assert status["format"] == "planned" and status["mount"] == "planned"
    assert sha256_of_device(dev) == before
    assert open(paths["fstab"], "rb").read() == fstab
    assert not os.path.exists(paths["mount_point"])
    human = hostagent(config, "bootstrap", "--dry-run")
    assert "planned" in human.stdout and "mkfs.ext4" in human.stdout


def test_unmounted_mount_point_is_guarded_against_writes(setup):
    dev, paths, config = setup
    assert hostagent(config, "bootstrap").returncode == 0
    sh("umount", paths["mount_point"])
    with pytest.raises(PermissionError):
        os.mkdir(os.path.join(paths["mount_point"], "data"))
    verify = hostagent(config, "verify-mount", "--json")
    assert verify.returncode == 1
    checks = {c["name"]: c for c in json.loads(verify.stdout)["checks"]}
    assert checks["mounted"]["ok"] is False and checks["guard"]["ok"] is True


def test_hand_made_volume_and_fstab_line_by_device_name_are_upgraded(setup):
    """The seed's host: ext4 made by hand (no label), fstab line by device name."""
    dev, paths, config = setup
    sh("mkfs.ext4", "-q", dev)
    uuid = fs_uuid(dev)
    tmp = os.path.join(paths["root"], "m")
    os.mkdir(tmp)
    sh("mount", dev, tmp)
    os.makedirs(os.path.join(tmp, "data"))
    with open(os.path.join(tmp, "data", "_users.couch"), "w") as f:
        f.write("existing data")
    sh("umount", tmp)
    mp = paths["mount_point"]
    with open(paths["fstab"], "a") as f:
        f.write(f"{dev} {mp} ext4 defaults 0 2\n")
    result = hostagent(config, "bootstrap", "--json")
    assert result.returncode == 0, result.stderr
    assert steps_by_name(result)["format"] == "skipped"
    fstab = open(paths["fstab"]).read()
    assert f"{dev} {mp}" not in fstab and f"UUID={uuid}\t{mp}" in fstab
    assert fstab.count(mp) == 1
    assert open(os.path.join(mp, "data", "_users.couch")).read() == "existing data"
    assert fs_uuid(dev) == uuid
    assert os.path.exists(paths["fstab"] + ".hostagent.bak")


def test_volume_mounted_before_bootstrap_gets_the_guard_underneath(setup):
    """systemd mounted the volume from fstab before bootstrap ran (every boot of a hand-made
    host): the bare directory under the mount is still made immutable, without unmounting."""
    dev, paths, config = setup
    mp = paths["mount_point"]
    sh("mkfs.ext4", "-q", dev)
    os.makedirs(mp)
    sh("mount", dev, mp)
    result = hostagent(config, "bootstrap", "--json")
    assert result.returncode == 0, result.stderr
    status = steps_by_name(result)
    assert status["guard"] == "done" and status["mount"] == "skipped"
    assert sh("findmnt", "-n", "-o", "SOURCE", mp).stdout.strip() == dev, "never unmounted"
    sh("umount", mp)
    with pytest.raises(PermissionError):
        os.mkdir(os.path.join(mp, "data"))
    assert sh("findmnt", "-rn", "-o", "TARGET", check=False).stdout.count("hostagent-bare.") == 0
    sh("mount", dev, mp)
    again = hostagent(config, "bootstrap", "--json")
    assert set(steps_by_name(again).values()) == {"skipped"}


def test_foreign_filesystem_is_refused_with_exit_3_and_untouched(setup):
    dev, paths, config = setup
    need_tool("mkfs.xfs", "xfsprogs")
    sh("mkfs.xfs", "-q", "-f", dev)
    before = sha256_of_device(dev)
    fstab = open(paths["fstab"], "rb").read()
    result = hostagent(config, "bootstrap")
    assert result.returncode == 3, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("hostagent: error: ") and "xfs" in first and dev in first
    assert sha256_of_device(dev) == before
    assert open(paths["fstab"], "rb").read() == fstab
    assert sh("findmnt", "-n", paths["mount_point"], check=False).returncode != 0


@pytest.mark.parametrize("kind", ["char", "regular", "missing", "directory"])
def test_bad_device_inputs_are_exit_2(kind, host_paths, tmp_path):
    need_root()
    target = {"char": "/dev/null", "missing": "/dev/hostagent-does-not-exist",
              "directory": "/dev/disk"}.get(kind)
    if kind == "regular":
        target = "/dev/shm/hostagent-regular-file-test"
        open(target, "w").close()
    try:
        config = make_config(host_paths, target)
        fstab = open(host_paths["fstab"], "rb").read()
        result = hostagent(config, "bootstrap")
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) <= 2 and target in result.stderr
        assert open(host_paths["fstab"], "rb").read() == fstab
        assert not os.path.exists(host_paths["mount_point"])
    finally:
        if kind == "regular":
            os.unlink(target)


def test_mount_point_that_is_a_file_is_exit_2(setup):
    dev, paths, config = setup
    os.makedirs(os.path.dirname(paths["mount_point"]), exist_ok=True)
    open(paths["mount_point"], "w").close()
    result = hostagent(config, "bootstrap")
    assert result.returncode == 2, result.stderr
    assert "not a directory" in result.stderr


def test_occupied_mount_point_is_refused_before_anything_changes(setup, loop_device):
    """The refusal comes first: the blank volume is not formatted, the fstab not touched."""
    dev, paths, config = setup
    other = loop_device("64M", name="other.img")
    sh("mkfs.ext4", "-q", other)
    os.makedirs(paths["mount_point"])
    sh("mount", other, paths["mount_point"])
    with open(paths["fstab"], "a") as f:
        f.write(f"{other} {paths['mount_point']} ext4 defaults 0 2\n")
    fstab = open(paths["fstab"], "rb").read()
    before = sha256_of_device(dev)
    result = hostagent(config, "bootstrap")
    assert result.returncode == 3, result.stderr
    assert other in result.stderr
    assert sh("findmnt", "-n", "-o", "SOURCE", paths["mount_point"]).stdout.strip() == other
    assert open(paths["fstab"], "rb").read() == fstab
    assert sha256_of_device(dev) == before


def test_two_disks_with_one_filesystem_uuid_are_refused(setup, loop_device):
    """A copy of the volume (made from a snapshot) attached too: UUID= could mount either."""
    dev, paths, config = setup
    sh("mkfs.ext4", "-q", dev)
    twin = loop_device("320M", name="twin.img")
    sh("dd", f"if={dev}", f"of={twin}", "bs=1M", "count=8", "conv=notrunc")
    assert fs_uuid(twin) == fs_uuid(dev)
    fstab = open(paths["fstab"], "rb").read()
    result = hostagent(config, "bootstrap")
    assert result.returncode == 3, result.stderr
    assert twin in result.stderr and "same filesystem UUID" in result.stderr
    assert open(paths["fstab"], "rb").read() == fstab
    assert not os.path.ismount(paths["mount_point"])


def test_stale_format_intent_never_remakes_a_used_filesystem(setup):
    """A format intent left behind (kill after mkfs, before its removal) next to an ext4 with
    the intended UUID that has since been mounted and written: reused, never remade."""
    dev, paths, config = setup
    assert hostagent(config, "bootstrap").returncode == 0
    uuid = fs_uuid(dev)
    with open(os.path.join(paths["mount_point"], "data", "precious.couch"), "w") as f:
        f.write("data")
    sh("umount", paths["mount_point"])
    from hostagent import state

    state.write_record(paths["state_dir"], state.FORMAT_INTENT, intent_record(dev, uuid))
    result = hostagent(config, "bootstrap", "--json")
    assert result.returncode == 0, result.stderr
    assert steps_by_name(result)["format"] == "skipped"
    assert fs_uuid(dev) == uuid
    assert open(os.path.join(paths["mount_point"], "data", "precious.couch")).read() == "data"
    assert not os.path.exists(os.path.join(paths["state_dir"], state.FORMAT_INTENT))


def test_failed_mount_puts_the_previous_fstab_back(setup, loop_device, host_paths):
    dev, paths, _ = setup
    config = make_config(paths, dev, filesystem={"options": "defaults,hostagent_bogus_option"})
    fstab = open(paths["fstab"], "rb").read()
    result = hostagent(config, "bootstrap")
    assert result.returncode == 1, result.stderr
    assert open(paths["fstab"], "rb").read() == fstab
    assert "mount" in result.stderr


def test_concurrent_runs_are_serialised(setup):
    dev, paths, config = setup
    env = {**os.environ, "HOSTAGENT_CONFIG": config, "PYTHONPATH": REPO}
    procs = [subprocess.Popen([sys.executable, "-m", "hostagent", "bootstrap", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=REPO) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    formats = [json.loads(out)["steps"] for out, _ in results]
    done = [s for steps in formats for s in steps if s["name"] == "format" and s["status"] == "done"]
    assert len(done) == 1, "exactly one run formats; the others see its filesystem"


CRASH_POINTS = ["format", "fstab", "mount-point", "guard", "mount", "layout"]


@pytest.mark.parametrize("step", CRASH_POINTS)
def test_kill_9_after_each_step_then_rerun_converges(setup, step):
    dev, paths, config = setup
    crashed = hostagent(config, "bootstrap", env={"HOSTAGENT_CRASH_AFTER": step})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    rerun = hostagent(config, "bootstrap", "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert hostagent(config, "verify-mount").returncode == 0
    uuid = fs_uuid(dev)
    with open(os.path.join(paths["mount_point"], "data", "marker"), "w") as f:
        f.write("kept")
    again = hostagent(config, "bootstrap", "--json")
    assert set(steps_by_name(again).values()) == {"skipped"}
    assert fs_uuid(dev) == uuid
    assert open(os.path.join(paths["mount_point"], "data", "marker")).read() == "kept"


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.08])
def test_kill_9_in_the_middle_of_mkfs_then_rerun_formats_its_own_device(loop_device, host_paths, delay):
    """A real mkfs.ext4 SIGKILLed part way, after bootstrap recorded its intent: the rerun
    recognises its own half-made filesystem and finishes — whatever state the kill left."""
    need_root()
    dev = loop_device("2G")
    config = make_config(host_paths, dev)
    # Let bootstrap write its format intent, then die before mkfs completes: crash after the
    # intent by killing the mkfs child ourselves is racy, so reproduce the two halves for real.
    from hostagent import state
    import uuid as uuidlib

    planned = str(uuidlib.uuid4())
    state.write_record(host_paths["state_dir"], state.FORMAT_INTENT, intent_record(dev, planned))
    # Bootstrap marks the disk right before mkfs: the positive trace of its own mkfs.
    from hostagent.adapters.mkfs import write_mark

    write_mark(dev, intent_record(dev, planned)["size_bytes"], planned)
    mkfs = subprocess.Popen(["mkfs.ext4", "-q", "-F", "-U", planned, "-L", "couchdb", "-m", "0",
                             "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", dev])
    time.sleep(delay)
    mkfs.kill()
    mkfs.wait()
    rerun = hostagent(config, "bootstrap", "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert hostagent(config, "verify-mount").returncode == 0
    assert not os.path.exists(os.path.join(host_paths["state_dir"], state.FORMAT_INTENT))
    assert fs_uuid(dev) == planned, "the UUID chosen before the crash is the one made"
