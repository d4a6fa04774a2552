"""Issue 8, proven on real loop devices: no code path formats a disk it has not proven blank or
its own, bad input is exit 2 with nothing changed, and host errors are one line, never a traceback.

Every test drives the CLI as a subprocess (`python -m hostagent`) and asserts only what an
operator can observe: exit codes, the one-line `hostagent: error:` on stderr, device bytes
(sha256), fstab bytes, mounts (findmnt). Nothing here imports hostagent's internals, so the tests
hold across a rewrite of them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid as uuidlib

import pytest

from tests.integration.test_bootstrap import REPO, fs_uuid, hostagent, make_config, steps_by_name
from tests.support.hosttools import (need, need_root, need_tool, sh, sha256_of_device,
                                     unmount_everything_under)

pytestmark = pytest.mark.root

MIB = 1 << 20
INTENT = "format-intent.json"  # what bootstrap writes in host.state_dir right before mkfs
BARE_MARK = "hostagent-bare"  # the guard's view of the directory underneath a mounted volume
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
HOSTILE_UID = 4294967296  # 2**32: no such uid, and too large for chown(2)


# --- helpers: processes --------------------------------------------------------------------------

def hostagent_env(config: str) -> dict:
    env = {**os.environ, "HOSTAGENT_CONFIG": config}
    env.setdefault("PYTHONPATH", REPO)  # the same code hostagent() runs
    return env


def start_bootstrap(config: str, *args: str) -> subprocess.Popen:
    """A bootstrap in its own process group, so a kill takes its children (mkfs, mount…) too."""
    return subprocess.Popen([sys.executable, "-m", "hostagent", "bootstrap", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=hostagent_env(config), cwd=REPO, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the bootstrap and everything it started, as a power cut would (children in
    another session included): stop the group first so nothing new is forked meanwhile."""
    import psutil

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGSTOP)
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for kid in kids:
        with contextlib.suppress(psutil.NoSuchProcess):
            kid.kill()
    proc.wait(timeout=60)
    psutil.wait_procs(kids, timeout=60)


def kill_once_format_intent_exists(proc: subprocess.Popen, intent: str) -> None:
    """Poll (1 ms) for the format record; SIGKILL the bootstrap as soon as it exists."""
    deadline = time.monotonic() + 60
    try:
        while not os.path.exists(intent) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        kill_tree(proc)
    assert os.path.exists(intent), (
        f"precondition: bootstrap (exit {proc.returncode}) never left {intent} to kill it on")


# --- helpers: what an operator can observe -------------------------------------------------------

def assert_one_line_error(result) -> None:
    """No traceback; exactly one `hostagent: error:` line; nothing but it, a hint and logs."""
    err = result.stderr
    assert "Traceback" not in err, f"traceback (exit {result.returncode}):\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("hostagent: error: ")]
    assert len(errors) == 1, f"want one `hostagent: error:` line, got:\n{err}"
    assert all(line.startswith(("hostagent: ", "hint: ")) for line in lines), err


def looks(dev: str, paths: dict) -> tuple[str, bytes]:
    return sha256_of_device(dev), open(paths["fstab"], "rb").read()


def assert_untouched(dev: str, paths: dict, before: tuple[str, bytes], result=None) -> None:
    how = f" (exit {result.returncode}: {result.stderr.strip()[:300]})" if result else ""
    assert sha256_of_device(dev) == before[0], f"{dev} was written{how}"
    assert open(paths["fstab"], "rb").read() == before[1], f"{paths['fstab']} was changed{how}"


def is_mount_point(path: str) -> bool:
    return sh("findmnt", "-n", path, check=False).returncode == 0


def mount_targets() -> set[str]:
    return set(sh("findmnt", "-rn", "-o", "TARGET", check=False).stdout.split())


def bare_views() -> set[str]:
    return {t for t in mount_targets() if BARE_MARK in t}


def names(path: str) -> str:
    """A regex matching a device named by its path or its kernel name (loop3, not loop31)."""
    return rf"(?<![A-Za-z0-9]){re.escape(os.path.basename(path))}(?![0-9])"


def blkid_uuid(dev: str) -> str:
    return sh("blkid", "-p", "-o", "value", "-s", "UUID", dev, check=False).stdout.strip()


def superblock(dev: str) -> dict[str, str]:
    out = sh("dumpe2fs", "-h", dev).stdout
    fields = (line.partition(":") for line in out.splitlines())
    return {key.strip(): value.strip() for key, _, value in fields if value}


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def pwrite_device(dev: str, offset: int, data: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def device_size(dev: str) -> int:
    return int(sh("blockdev", "--getsize64", dev).stdout)


def random_image(path, size: int) -> None:
    """A disk image full of random bytes (someone's data, as far as anyone can tell)."""
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MIB))
            f.write(chunk)
            left -= len(chunk)


@contextlib.contextmanager
def own_loop(backing):
    """A loop device whose name this test re-points; detached at the end only while it still
    shows one of this test's files (never a loop another process got meanwhile)."""
    dev = sh("losetup", "--show", "-f", backing).stdout.strip()
    try:
        yield dev
    finally:
        shown = sh("losetup", "-nO", "BACK-FILE", dev, check=False).stdout.strip()
        if shown.startswith(os.path.dirname(str(backing)) + "/"):
            targets = sh("findmnt", "-rn", "-S", dev, "-o", "TARGET", check=False).stdout.split()
            for target in targets:
                sh("umount", "-l", target, check=False)
            sh("losetup", "-d", dev, check=False)


def repoint_loop(dev: str, backing, *, detach: bool = True) -> None:
    """The same loop name, another disk: what a serial-less disk swapped under a name looks like."""
    if detach:
        sh("losetup", "-d", dev)
    for _ in range(200):
        if sh("losetup", dev, backing, check=False).returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"could not attach {backing} as {dev} again")


@contextlib.contextmanager
def mounted(dev: str, where, *options: str):
    os.makedirs(where, exist_ok=True)
    sh("mount", *options, dev, where)
    try:
        yield str(where)
    finally:
        sh("umount", where, check=False)


@contextlib.contextmanager
def fresh_host(base, name: str, size: str = "320M"):
    """A blank loop device, temp fstab, mount point, lock and state dir; all undone afterwards."""
    root = os.path.join(str(base), name)
    os.makedirs(os.path.join(root, "etc"))
    backing = os.path.join(root, "disk.img")
    sh("truncate", "-s", size, backing)
    dev = sh("losetup", "--show", "-f", backing).stdout.strip()
    paths = {"mount_point": os.path.join(root, "opt", "couchdb"),
             "fstab": os.path.join(root, "etc", "fstab"), "lock_file": os.path.join(root, "lock"),
             "state_dir": os.path.join(root, "state"), "root": root}
    with open(paths["fstab"], "w") as f:
        f.write("# test fstab\nUUID=0000-1111 /boot/efi vfat defaults 0 2\n")
    try:
        yield dev, paths, make_config(paths, dev)
    finally:
        unmount_everything_under(root)
        if os.path.isdir(paths["mount_point"]):
            subprocess.run(["chattr", "-i", paths["mount_point"]], capture_output=True)
        sh("losetup", "-d", dev, check=False)
        with contextlib.suppress(OSError):
            os.unlink(backing)


@pytest.fixture
def tools():
    need_root()
    for tool, package in (("mkfs.ext4", "e2fsprogs"), ("chattr", "e2fsprogs"),
                          ("blkid", "util-linux"), ("findmnt", "util-linux")):
        need_tool(tool, package)


# --- 1. a leftover format record formats another disk --------------------------------------------

def swap_in_random_disk_at_another_path(dev: str, backing, tmp_path) -> None:
    """The loop name then shows a disk full of random bytes from another file (same size: a
    serial-less disk has nothing else to tell them apart by)."""
    other = tmp_path / "someone-elses.img"
    random_image(other, os.path.getsize(backing))
    repoint_loop(dev, other)


def swap_in_random_disk_at_the_same_path(dev: str, backing, tmp_path) -> None:
    """The reviewer's reproduction: the backing file is deleted and a new one full of random
    bytes is written at the same path — ext4 hands out the freed inode number again — and
    attached under the same loop name. Path, inode and size all match the record; only our
    pre-mkfs mark (and the inode generation) tell it is not our half-made filesystem."""
    size = os.path.getsize(backing)
    sh("losetup", "-d", dev)
    os.unlink(backing)
    random_image(backing, size)
    repoint_loop(dev, backing, detach=False)


@pytest.mark.parametrize("swap", [swap_in_random_disk_at_another_path,
                                  swap_in_random_disk_at_the_same_path],
                         ids=["another-file", "same-path-new-file"])
def test_format_record_left_by_a_kill_never_formats_another_disk_under_that_name(
        tools, host_paths, tmp_path, swap):
    """SIGKILL in the format step leaves the record; then another disk shows up under the name."""
    backing = tmp_path / "blank.img"
    sh("truncate", "-s", str(256 * MIB), backing)
    with own_loop(backing) as dev:
        config = make_config(host_paths, dev)
        intent = os.path.join(host_paths["state_dir"], INTENT)
        kill_once_format_intent_exists(start_bootstrap(config), intent)
        swap(dev, backing, tmp_path)
        before = looks(dev, host_paths)
        result = hostagent(config, "bootstrap")
        try:
            assert result.returncode == 3, \
                f"exit {result.returncode}: {result.stdout}{result.stderr}"
            assert_one_line_error(result)
            assert_untouched(dev, host_paths, before, result)
            assert not is_mount_point(host_paths["mount_point"])
        finally:
            unmount_everything_under(host_paths["root"])


def test_rejected_label_leaves_no_format_record_to_arm_a_later_run(tools, host_paths, tmp_path):
    """`label = "-Fx"` is exit 2 with nothing written, not even the record; the fixed config
    then meets a disk full of random bytes under the same name: refused, untouched."""
    size = 128 * MIB
    blank = tmp_path / "blank.img"
    sh("truncate", "-s", str(size), blank)
    other = tmp_path / "someone-elses.img"
    random_image(other, size)
    with own_loop(blank) as dev:
        before = looks(dev, host_paths)
        config = make_config(host_paths, dev, filesystem={"label": "-Fx"})
        bad = hostagent(config, "bootstrap")
        assert bad.returncode == 2, f"exit {bad.returncode}: {bad.stderr}"
        assert_one_line_error(bad)
        assert not os.path.exists(os.path.join(host_paths["state_dir"], INTENT)), \
            f"exit 2 left {INTENT} behind"
        assert_untouched(dev, host_paths, before, bad)

        config = make_config(host_paths, dev)
        repoint_loop(dev, other)
        before = looks(dev, host_paths)
        result = hostagent(config, "bootstrap")
        try:
            assert result.returncode == 3, \
                f"exit {result.returncode}: {result.stdout}{result.stderr}"
            assert_untouched(dev, host_paths, before, result)
        finally:
            unmount_everything_under(host_paths["root"])


# --- 2. a disk in use is formatted ---------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 16 * MIB], ids=["ext4-at-0", "ext4-at-16MiB"])
def test_disk_backing_a_mounted_loop_is_refused_naming_the_loop(
        offset, tools, loop_device, host_paths, tmp_path):
    """Loop B is backed by device A and holds a mounted ext4. At offset 16 MiB, A's edges read
    as zeros (today's blank proof says blank); at 0, A shows that same ext4 (a second,
    independent mount of it would corrupt it). Either way A is in use: exit 3 naming B."""
    need_tool("e2fsck", "e2fsprogs")
    dev = loop_device("320M")
    window = ["-o", str(offset), "--sizelimit", str(288 * MIB)] if offset else []
    upper = sh("losetup", "--show", "-f", *window, dev).stdout.strip()
    upper_mnt = tmp_path / "upper"
    try:
        # Full init and a read-only mount afterwards: nothing on B writes to A by itself, so A's
        # bytes are stable and any change is hostagent's.
        sh("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", upper)
        with mounted(upper, upper_mnt):
            write_file(os.path.join(upper_mnt, "precious.couch"), b"in use\n" * 1000)
        sh("mount", "-o", "ro", upper, upper_mnt)
        config = make_config(host_paths, dev)
        before = looks(dev, host_paths)
        result = hostagent(config, "bootstrap")
        assert result.returncode == 3, f"exit {result.returncode}: {result.stdout}{result.stderr}"
        assert_one_line_error(result)
        assert re.search(names(upper), result.stderr), f"{upper} not named: {result.stderr}"
        assert_untouched(dev, host_paths, before, result)
        assert not is_mount_point(host_paths["mount_point"])
        sh("umount", upper_mnt)
        fsck = sh("e2fsck", "-fn", upper, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        with mounted(upper, upper_mnt, "-o", "ro"):
            with open(os.path.join(upper_mnt, "precious.couch"), "rb") as f:
                assert f.read() == b"in use\n" * 1000
    finally:
        unmount_everything_under(host_paths["root"])
        sh("umount", "-l", upper_mnt, check=False)
        sh("losetup", "-d", upper, check=False)


def test_disk_held_by_device_mapper_is_refused_naming_the_holder(tools, loop_device, host_paths):
    need_tool("dmsetup", "dmsetup")
    version = sh("dmsetup", "version", check=False)
    if version.returncode != 0:
        # A kernel feature, not a package CI could install: skip (the holder rule itself is in
        # the unit table of tests/unit/test_blank.py).
        pytest.skip("this kernel has no device-mapper (`dmsetup version` fails)")
    dev = loop_device("64M")
    name = f"hostagent-test-{uuidlib.uuid4().hex[:8]}"
    sectors = sh("blockdev", "--getsz", dev).stdout.strip()
    sh("dmsetup", "create", name, "--table", f"0 {sectors} linear {dev} 0")
    try:
        holders = os.listdir(f"/sys/class/block/{os.path.basename(dev)}/holders")
        assert holders, "precondition: the dm device shows as a holder in sysfs"
        config = make_config(host_paths, dev)
        before = looks(dev, host_paths)
        result = hostagent(config, "bootstrap")
        assert result.returncode == 3, f"exit {result.returncode}: {result.stdout}{result.stderr}"
        assert_one_line_error(result)
        assert any(re.search(names(h), result.stderr) for h in holders) or name in result.stderr, \
            result.stderr
        assert_untouched(dev, host_paths, before, result)
    finally:
        for _ in range(50):
            if sh("dmsetup", "remove", name, check=False).returncode == 0:
                break
            time.sleep(0.1)


# --- 3. the blank proof reads too little ---------------------------------------------------------

def test_zeroed_partition_table_over_a_partition_full_of_data_is_refused(
        tools, loop_device, host_paths, tmp_path):
    """GPT with an ext4 partition at 1 MiB holding data; the first and last MiB of the disk are
    zeroed (MBR, GPT and its backup gone) and the kernel forgets the partition."""
    need_tool("sfdisk", "fdisk")
    need_tool("partx", "util-linux")
    dev = loop_device("320M")
    sh("sfdisk", "-q", dev, input=f"label: gpt\nstart=2048, type={LINUX_FS_GUID}\n")
    part = dev + "p1"
    if not os.path.exists(part):
        sh("partx", "-a", dev, check=False)
    assert os.path.exists(part), f"precondition: {part} appears"
    sh("mkfs.ext4", "-q", part)
    with mounted(part, tmp_path / "p"):
        write_file(str(tmp_path / "p" / "shards.couch"), os.urandom(8 * MIB))
    sh("partx", "-d", dev)
    size = device_size(dev)
    sh("dd", "if=/dev/zero", f"of={dev}", "bs=1M", "count=1", "conv=notrunc,fsync", "status=none")
    sh("dd", "if=/dev/zero", f"of={dev}", "bs=1M", "count=1", f"seek={size // MIB - 1}",
       "conv=notrunc,fsync", "status=none")
    sh("blockdev", "--flushbufs", dev)
    assert not os.path.exists(part), "precondition: no partition known"
    assert sh("blkid", "-p", dev, check=False).returncode == 2, "precondition: blkid sees nothing"
    config = make_config(host_paths, dev)
    before = looks(dev, host_paths)
    result = hostagent(config, "bootstrap")
    assert result.returncode == 3, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    assert_one_line_error(result)
    assert_untouched(dev, host_paths, before, result)
    assert not is_mount_point(host_paths["mount_point"])


def test_filesystem_whose_first_mebibytes_were_zeroed_is_refused(
        tools, loop_device, host_paths, tmp_path):
    """An ext4 over the whole disk, full of data, with its first 2 MiB and last MiB zeroed:
    no signature left at the offsets blkid and wipefs probe."""
    dev = loop_device("320M")
    sh("mkfs.ext4", "-q", dev)
    with mounted(dev, tmp_path / "m") as m:
        write_file(os.path.join(m, "shards.couch"), os.urandom(16 * MIB))
    size = device_size(dev)
    pwrite_device(dev, 0, bytes(2 * MIB))
    pwrite_device(dev, size - MIB, bytes(MIB))
    assert sh("blkid", "-p", dev, check=False).returncode == 2, "precondition: blkid sees nothing"
    assert sh("wipefs", "--no-act", dev).stdout.strip() == "", "precondition: wipefs sees nothing"
    config = make_config(host_paths, dev)
    before = looks(dev, host_paths)
    result = hostagent(config, "bootstrap")
    assert result.returncode == 3, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    assert_one_line_error(result)
    assert_untouched(dev, host_paths, before, result)


def test_data_far_from_both_edges_is_refused(tools, loop_device, host_paths):
    """1 GiB, all zeros except 1 MiB of random bytes at 192 MiB (3 × 64 MiB): a stride sample
    of 64 KiB every 64 MiB reads part of it."""
    dev = loop_device("1G")
    pwrite_device(dev, 192 * MIB, b"\xa5" + os.urandom(MIB - 1))
    config = make_config(host_paths, dev)
    before = looks(dev, host_paths)
    result = hostagent(config, "bootstrap")
    assert result.returncode == 3, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    assert_one_line_error(result)
    assert_untouched(dev, host_paths, before, result)


# --- 4. a filesystem it made is remade -----------------------------------------------------------

KILL_STEP = 0.020
KILL_POINTS_MAX = 60
AFTER_MKFS_STEP = 0.002
AFTER_MKFS_POINTS = 10
MKFS_NAMES = ("mkfs.ext4", "mke2fs", "mkfs")


def kill_at(delay: float):
    def kill(proc: subprocess.Popen) -> bool:
        time.sleep(delay)
        kill_tree(proc)
        return True
    return kill


def kill_after_mkfs_exits(delay: float):
    """Kill `delay` s after the bootstrap's mkfs child has exited: a complete mkfs, then the
    moment its record is being cleared. False when no mkfs was seen (a normal kill then)."""
    import psutil

    def kill(proc: subprocess.Popen) -> bool:
        parent = psutil.Process(proc.pid)
        mkfs = None
        deadline = time.monotonic() + 60
        while mkfs is None and proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                mkfs = next((kid for kid in parent.children(recursive=True)
                             if kid.name() in MKFS_NAMES), None)
            time.sleep(0.0002)
        if mkfs is not None:
            with contextlib.suppress(psutil.Error):
                while mkfs.status() != psutil.STATUS_ZOMBIE:
                    time.sleep(0.0002)
            time.sleep(delay)
        kill_tree(proc)
        return mkfs is not None
    return kill


def kill_then_rerun(base, name: str, kill, label: str) -> tuple[int, str, bool]:
    """One kill point on a fresh blank disk, then the rerun must converge and keep any ext4 that
    existed right after the kill. Returns (exit of the killed run, UUID after the kill, hit)."""
    with fresh_host(base, name) as (dev, paths, config):
        proc = start_bootstrap(config)
        hit = kill(proc)
        made = blkid_uuid(dev)
        where = f"kill {label} (exit {proc.returncode}, ext4 {made or 'none'})"
        rerun = hostagent(config, "bootstrap", "--json")
        assert rerun.returncode == 0, f"{where}: rerun exit {rerun.returncode}: {rerun.stderr}"
        if made:
            assert fs_uuid(dev) == made, f"{where}: the rerun remade it as {fs_uuid(dev)}"
        verify = hostagent(config, "verify-mount")
        assert verify.returncode == 0, f"{where}: verify-mount: {verify.stdout}{verify.stderr}"
        again = hostagent(config, "bootstrap", "--json")
        assert again.returncode == 0 and set(steps_by_name(again).values()) == {"skipped"}, \
            f"{where}: second rerun {again.stdout}{again.stderr}"
        return proc.returncode, made, hit


@pytest.mark.slow
def test_kill_sweep_then_rerun_never_changes_a_filesystem_once_made(tools, tmp_path):
    """SIGKILL a bootstrap on a fresh blank disk at 0, 20, 40… ms after its start until one
    finishes first; then at 0, 2, 4… ms after its mkfs exited (process start-up jitters by more
    than the few ms between mkfs and clearing its record). Each rerun converges, and an ext4
    that existed right after the kill keeps its UUID."""
    with fresh_host(tmp_path, "reference") as (_, _, config):
        started = time.monotonic()
        reference = hostagent(config, "bootstrap")
        duration = time.monotonic() - started
        assert reference.returncode == 0, reference.stderr
    points: list[tuple[str, int, str]] = []
    for i in range(KILL_POINTS_MAX):
        label = f"at {i * KILL_STEP * 1000:.0f} ms"
        code, made, _ = kill_then_rerun(tmp_path, f"kill{i}", kill_at(i * KILL_STEP), label)
        points.append((label, code, made))
        if code == 0:
            break
    assert points[-1][1] == 0, f"no run finished within {KILL_POINTS_MAX} kill points"
    swept = len(points)
    hits = 0
    for k in range(AFTER_MKFS_POINTS):
        label = f"{k * AFTER_MKFS_STEP * 1000:.0f} ms after mkfs"
        code, made, hit = kill_then_rerun(tmp_path, f"mkfs{k}", kill_after_mkfs_exits(
            k * AFTER_MKFS_STEP), label)
        hits += hit
        points.append((label, code, made))
    assert hits, "precondition: some kill point saw the bootstrap's mkfs"
    print(f"\nkill sweep: bootstrap takes {duration * 1000:.0f} ms; {len(points)} kill points "
          f"({swept} every {KILL_STEP * 1000:.0f} ms, {len(points) - swept} every "
          f"{AFTER_MKFS_STEP * 1000:.0f} ms after mkfs, {hits} saw it): "
          f"{[(label, code, made[:8] or '-') for label, code, made in points]}")


def test_finished_mkfs_with_the_recorded_uuid_is_reused_not_remade(tools, loop_device, host_paths):
    """Killed after its mkfs completed but before the record was removed: the ext4 carrying the
    UUID bootstrap chose is ours and finished. Reused, same UUID."""
    dev = loop_device("256M")
    config = make_config(host_paths, dev)
    intent = os.path.join(host_paths["state_dir"], INTENT)
    kill_once_format_intent_exists(start_bootstrap(config), intent)
    with open(intent) as f:
        planned = json.load(f).get("uuid")
    assert planned, f"precondition: {INTENT} records the UUID it will pass to mkfs"
    # Finish what the killed bootstrap had started, as its own mkfs would have.
    sh("mkfs.ext4", "-q", "-F", "-U", planned, "-L", "couchdb", "-m", "0",
       "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", dev)
    assert fs_uuid(dev) == planned and os.path.exists(intent)
    result = hostagent(config, "bootstrap", "--json")
    assert result.returncode == 0, result.stderr
    assert fs_uuid(dev) == planned, "a finished ext4 with our UUID was remade"
    assert hostagent(config, "verify-mount").returncode == 0


# --- 5. config that hurts the host ---------------------------------------------------------------

@pytest.mark.parametrize("args", [["--dry-run"], []], ids=["dry-run", "apply"])
def test_lock_file_naming_an_existing_file_is_refused_and_never_truncated(
        args, tools, loop_device, host_paths, tmp_path):
    dev = loop_device("64M")
    victim = tmp_path / "resolv.conf"
    text = b""
    for source in ("/etc/os-release", "/etc/services"):
        with contextlib.suppress(OSError):
            text += open(source, "rb").read()
    victim.write_bytes(text or b"nameserver 10.0.0.2\nsearch ec2.internal\n")
    content = victim.read_bytes()
    config = make_config({**host_paths, "lock_file": str(victim)}, dev)
    before = looks(dev, host_paths)
    result = hostagent(config, "bootstrap", *args)
    assert victim.read_bytes() == content, \
        f"host.lock_file {victim} was rewritten (exit {result.returncode})"
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr}"
    assert_one_line_error(result)
    assert_untouched(dev, host_paths, before, result)


def attributes(path: str) -> str:
    done = sh("lsattr", "-d", path, check=False)
    return done.stdout + done.stderr


@pytest.mark.parametrize("mount_point", ["/etc", "/usr", "/var", "/boot", "/var/lib", "/usr/lib",
                                         "/etc/"])
def test_system_directory_as_mount_point_is_a_config_error(
        mount_point, tools, loop_device, host_paths):
    """Only --dry-run and verify-mount are run: a real bootstrap would hide the directory."""
    dev = loop_device("64M")
    config = make_config(host_paths, dev, filesystem={"mount_point": mount_point})
    attrs = attributes(mount_point)
    target = os.path.normpath(mount_point)
    mounts = {t for t in mount_targets() if t == target}  # other tests may mount elsewhere
    before = looks(dev, host_paths)
    for args in (["bootstrap", "--dry-run"], ["verify-mount"]):
        result = hostagent(config, *args)
        assert result.returncode == 2, f"{' '.join(args)}: exit {result.returncode}: " \
                                       f"{result.stdout[-300:]}{result.stderr}"
        assert_one_line_error(result)
        assert "mount_point" in result.stderr, result.stderr
    assert attributes(mount_point) == attrs
    assert {t for t in mount_targets() if t == target} == mounts
    assert_untouched(dev, host_paths, before)


@pytest.mark.parametrize("key", ["owner", "group"])
def test_out_of_range_owner_is_a_config_error_before_any_change(
        key, tools, loop_device, host_paths):
    dev = loop_device("64M")
    config = make_config(host_paths, dev, layout={key: HOSTILE_UID})
    before = looks(dev, host_paths)
    result = hostagent(config, "bootstrap")
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-500:]}"
    assert_one_line_error(result)
    assert f"layout.{key}" in result.stderr, result.stderr
    assert_untouched(dev, host_paths, before, result)
    assert not is_mount_point(host_paths["mount_point"])


def test_nul_byte_in_mount_point_is_a_config_error_before_any_change(
        tools, loop_device, host_paths):
    dev = loop_device("64M")
    mount_point = host_paths["mount_point"] + "\0x"  # TOML "\u0000"
    config = make_config(host_paths, dev, filesystem={"mount_point": mount_point})
    before = looks(dev, host_paths)
    result = hostagent(config, "bootstrap")
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-500:]}"
    assert_one_line_error(result)
    assert_untouched(dev, host_paths, before, result)
    assert not os.path.exists(host_paths["mount_point"])


# --- 6. tracebacks -------------------------------------------------------------------------------

def test_read_only_parent_of_a_missing_mount_point_is_one_line_before_any_change(
        tools, loop_device, host_paths, tmp_path):
    dev = loop_device("64M")
    ro = tmp_path / "ro"
    ro.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", ro)
    try:
        paths = {**host_paths, "mount_point": str(ro / "couchdb")}
        config = make_config(paths, dev)
        before = looks(dev, paths)
        result = hostagent(config, "bootstrap")
        assert result.returncode != 0
        assert_one_line_error(result)
        assert_untouched(dev, paths, before, result)
    finally:
        unmount_everything_under(str(ro))


def test_fstab_on_a_full_filesystem_is_one_line_exit_1_and_fstab_unchanged(
        tools, loop_device, host_paths, tmp_path):
    dev = loop_device("64M")
    full = tmp_path / "full"
    full.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", full)
    try:
        fstab = full / "fstab"
        fstab.write_bytes(open(host_paths["fstab"], "rb").read())
        with contextlib.suppress(OSError), open(full / "filler", "wb") as f:
            while True:
                f.write(b"\xff" * 4096)
                f.flush()
        with pytest.raises(OSError):
            write_file(str(full / "probe"), b"x" * 8192)  # precondition: really full
        with contextlib.suppress(OSError):
            os.unlink(full / "probe")
        paths = {**host_paths, "fstab": str(fstab)}
        config = make_config(paths, dev)
        content = fstab.read_bytes()
        result = hostagent(config, "bootstrap")
        assert result.returncode == 1, f"exit {result.returncode}: {result.stderr[-500:]}"
        assert_one_line_error(result)
        assert fstab.read_bytes() == content
        assert not is_mount_point(host_paths["mount_point"])
    finally:
        unmount_everything_under(host_paths["root"])


def test_read_only_blank_device_is_one_line(tools, host_paths, tmp_path):
    backing = tmp_path / "ro.img"
    sh("truncate", "-s", "64M", backing)
    dev = sh("losetup", "-r", "--show", "-f", backing).stdout.strip()
    try:
        config = make_config(host_paths, dev)
        before = looks(dev, host_paths)
        result = hostagent(config, "bootstrap")
        assert result.returncode in (1, 3), f"exit {result.returncode}: {result.stderr[-500:]}"
        assert_one_line_error(result)
        assert_untouched(dev, host_paths, before, result)
    finally:
        unmount_everything_under(host_paths["root"])
        sh("losetup", "-d", dev, check=False)


# --- 7. layout follows symlinks off the volume ---------------------------------------------------

@pytest.mark.parametrize("directories", [None, ["data", "etc/local.d"]],
                         ids=["default-layout", "leaf-only-layout"])
def test_layout_never_follows_a_symlink_off_the_volume(
        directories, tools, loop_device, host_paths, tmp_path):
    """A reused ext4 whose `etc` is a symlink to a directory off the volume (a root-disk dir)."""
    dev = loop_device("64M")
    sh("mkfs.ext4", "-q", dev)
    outside = tmp_path / "root-disk-etc"
    outside.mkdir(mode=0o755)
    st = os.stat(outside)
    with mounted(dev, tmp_path / "m") as m:
        os.symlink(str(outside), os.path.join(m, "etc"))
    layout = {"layout": {"directories": directories}} if directories else {}
    config = make_config(host_paths, dev, **layout)
    result = hostagent(config, "bootstrap")
    after = os.stat(outside)
    assert os.listdir(outside) == [], f"created {os.listdir(outside)} off the volume " \
                                      f"(exit {result.returncode})"
    assert (after.st_uid, after.st_gid, after.st_mode) == (st.st_uid, st.st_gid, st.st_mode)
    assert result.returncode == 3, f"exit {result.returncode}: {result.stderr}"
    assert_one_line_error(result)


# --- 8. leftover bind mount ----------------------------------------------------------------------

GUARD_KILL_STEP = 0.005
GUARD_KILL_POINTS_MAX = 150


@pytest.mark.slow
def test_kill_while_guarding_under_a_mounted_volume_leaves_no_bind_mount_after_a_rerun(
        tools, loop_device, host_paths):
    """The volume is mounted before bootstrap (systemd from fstab); bootstrap reaches the bare
    directory underneath through a view of the parent filesystem. SIGKILL it every 5 ms until a
    run finishes first (a second pass 2.5 ms later if no kill caught a view): after each rerun
    no view is left mounted."""
    dev = loop_device("64M")
    mp = host_paths["mount_point"]
    sh("mkfs.ext4", "-q", dev)
    os.makedirs(mp)
    sh("mount", dev, mp)
    config = make_config(host_paths, dev)
    views_before = bare_views()
    dirs_before = set(glob.glob(f"/run/*{BARE_MARK}*"))

    def unguard() -> None:
        """Back to a hand-made host: the bare directory not yet immutable, the volume mounted."""
        sh("umount", mp)
        sh("chattr", "-i", mp)
        sh("mount", dev, mp)

    def sweep(offset: float) -> tuple[int, int]:
        caught = points = 0
        for i in range(GUARD_KILL_POINTS_MAX):
            at = offset + i * GUARD_KILL_STEP
            unguard()
            proc = start_bootstrap(config)
            time.sleep(at)
            kill_tree(proc)
            points += 1
            caught += bool(bare_views() - views_before)
            rerun = hostagent(config, "bootstrap")
            where = f"kill at {at * 1000:.1f} ms (exit {proc.returncode})"
            assert rerun.returncode == 0, f"{where}: rerun exit {rerun.returncode}: {rerun.stderr}"
            left = bare_views() - views_before
            assert not left, f"{where}: the rerun left {sorted(left)} mounted"
            assert sh("findmnt", "-n", "-o", "SOURCE", mp).stdout.strip() == dev
            if proc.returncode == 0:
                break
        return points, caught

    try:
        started = time.monotonic()
        first = hostagent(config, "bootstrap")
        duration = time.monotonic() - started
        assert first.returncode == 0, first.stderr
        assert bare_views() == views_before
        points, caught = sweep(0.0)
        if not caught:
            more = sweep(GUARD_KILL_STEP / 2)
            points, caught = points + more[0], caught + more[1]
        print(f"\nguard sweep: bootstrap (volume premounted) takes {duration * 1000:.0f} ms; "
              f"{points} kill points every {GUARD_KILL_STEP * 1000:.0f} ms; "
              f"{caught} left a view mounted until the rerun")
    finally:
        for view in sorted(bare_views() - views_before, key=len, reverse=True):
            sh("umount", "-l", view, check=False)
        for leftover in set(glob.glob(f"/run/*{BARE_MARK}*")) - dirs_before:
            with contextlib.suppress(OSError):
                os.rmdir(leftover)


# --- 9. a damaged ext4 is mounted as healthy -----------------------------------------------------

def damage(dev: str, *requests: str) -> None:
    for request in requests:
        sh("debugfs", "-w", "-R", request, dev)


RECORDED_ERRORS = ("ssv state 2", "ssv error_count 3")  # what the kernel leaves after an ext4 error


def test_ext4_with_recorded_errors_is_preened_before_its_first_mount(
        tools, loop_device, host_paths, tmp_path):
    need_tool("debugfs", "e2fsprogs")
    need_tool("dumpe2fs", "e2fsprogs")
    dev = loop_device("64M")
    sh("mkfs.ext4", "-q", dev)
    with mounted(dev, tmp_path / "m") as m:
        write_file(os.path.join(m, "precious.couch"), b"data")
    uuid = fs_uuid(dev)
    damage(dev, *RECORDED_ERRORS)
    sb = superblock(dev)
    assert sb["Filesystem state"] == "not clean with errors" and sb["FS Error count"] == "3"
    config = make_config(host_paths, dev)
    result = hostagent(config, "bootstrap")
    assert result.returncode == 0, result.stderr
    assert fs_uuid(dev) == uuid
    assert open(os.path.join(host_paths["mount_point"], "precious.couch"), "rb").read() == b"data"
    sh("umount", host_paths["mount_point"])
    sb = superblock(dev)
    assert sb["Filesystem state"] == "clean", f"mounted without e2fsck -p: {sb['Filesystem state']}"
    assert sb.get("FS Error count", "0") == "0", f"errors still recorded: {sb['FS Error count']}"


def test_ext4_that_preen_cannot_fix_is_refused_with_an_e2fsck_hint(tools, loop_device, host_paths):
    need_tool("debugfs", "e2fsprogs")
    dev = loop_device("64M")
    sh("mkfs.ext4", "-q", dev)
    damage(dev, "clri <2>", "ssv state 2")  # no root directory: e2fsck -p gives up (exit 4)
    config = make_config(host_paths, dev)
    fstab = open(host_paths["fstab"], "rb").read()
    result = hostagent(config, "bootstrap")
    assert result.returncode == 3, f"exit {result.returncode}: {result.stderr}"
    assert_one_line_error(result)
    assert "e2fsck" in result.stderr, result.stderr
    assert not is_mount_point(host_paths["mount_point"])
    assert open(host_paths["fstab"], "rb").read() == fstab


@pytest.mark.parametrize("requests", [("ssv error_count 3",), RECORDED_ERRORS],
                         ids=["error-count", "error-state-and-count"])
def test_verify_mount_fails_when_the_mounted_ext4_records_errors(
        requests, tools, loop_device, host_paths):
    need_tool("debugfs", "e2fsprogs")
    need_tool("dumpe2fs", "e2fsprogs")
    dev = loop_device("64M")
    mp = host_paths["mount_point"]
    config = make_config(host_paths, dev)
    assert hostagent(config, "bootstrap").returncode == 0
    sh("umount", mp)
    sh("mount", dev, mp)
    control = hostagent(config, "verify-mount")
    assert control.returncode == 0, f"precondition: a healthy hand mount passes: {control.stdout}"
    sh("umount", mp)
    damage(dev, *requests)
    sh("mount", dev, mp)
    assert superblock(dev).get("FS Error count") == "3", "precondition: the kernel kept the count"
    result = hostagent(config, "verify-mount", "--json")
    assert result.returncode == 1, f"exit {result.returncode}: {result.stdout}"
    assert any(not c["ok"] for c in json.loads(result.stdout)["checks"])
