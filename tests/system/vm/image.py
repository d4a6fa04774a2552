"""Disk images for the VM test: a Debian 12 root cached by its package list, then baked with
packaging/bake.sh (the same command an AMI build runs) plus a thin test-only layer."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
GUEST_DIR = HERE / "guest"
CHROOT_RUN = HERE / "chroot-run.sh"
BAKE = REPO / "packaging" / "bake.sh"

SUITE = "bookworm"
# What a minimal EC2 host needs for hostagent, plus the kernel to boot it. debootstrap's own
# --include cannot resolve virtual packages, so these go in with apt inside the root.
PACKAGES = (
    "systemd-sysv", "udev", "cloud-init", "python3", "python3-venv", "e2fsprogs", "util-linux",
    "iproute2", "ifupdown", "isc-dhcp-client", "nvme-cli", "linux-image-amd64", "ca-certificates",
    "kmod",
)
# Bump when the steps that shape the base root change, so an older cached root is not reused.
BASE_RECIPE = 2
ROOT_IMAGE_SIZE = "3G"


def cache_dir() -> Path:
    """<repo>/.cache/vm (gitignored); HOSTAGENT_VM_CACHE moves it, e.g. to keep it across clones."""
    return Path(os.environ.get("HOSTAGENT_VM_CACHE") or REPO / ".cache" / "vm")


_writer = None


def set_writer(write) -> None:
    """Let the test route progress lines past pytest's output capture (see test_vm.py)."""
    global _writer
    _writer = write


def say(message: str) -> None:
    """Progress lines: stage times and each boot's time."""
    line = f"[vm] {message}"
    if _writer is not None:
        _writer(line)
    else:
        print(line, file=sys.stderr, flush=True)


def run(argv, *, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    """Run a setup command; on failure raise with its output so the test log shows why."""
    argv = [str(a) for a in argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(argv)}\n"
                           f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def in_root(root: Path, *argv, timeout: float = 900) -> subprocess.CompletedProcess:
    return run([CHROOT_RUN, root, *argv], timeout=timeout)


@contextlib.contextmanager
def cache_lock(directory: Path):
    """Two test runs on one machine must not build the same cached root at once."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def apt_mirror() -> str:
    """The Debian mirror this host's apt uses for bookworm main (never a name written here)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", Path(path).read_text()):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.split()
            if ("deb" in fields.get("types", []) and SUITE in fields.get("suites", [])
                    and "main" in fields.get("components", []) and fields.get("uris")):
                return fields["uris"][0]
    lists = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    for path in lists:
        if not os.path.exists(path):
            continue
        for line in Path(path).read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE and "main" in words[3:]:
                return words[1]
    raise RuntimeError(f"no apt source for {SUITE} main on this host (/etc/apt/sources.list*)")


def base_key() -> str:
    recipe = {"suite": SUITE, "variant": "minbase", "packages": sorted(PACKAGES),
              "recipe": BASE_RECIPE}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def ensure_base_root() -> Path:
    """A debootstrapped Debian 12 root with PACKAGES, built once per package list and cached."""
    cache = cache_dir()
    final = cache / f"base-{base_key()}"
    with cache_lock(cache):
        if (final / "complete").exists():
            say(f"base root: cached {final.name}")
            return final / "root"
        partial = cache / f"{final.name}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        root = partial / "root"
        root.mkdir(parents=True)
        mirror = apt_mirror()
        started = time.monotonic()
        run(["debootstrap", "--variant=minbase", SUITE, root, mirror], timeout=1200)
        t_debootstrap = time.monotonic() - started
        # Nothing may start inside the build root (a package's postinst would start daemons).
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        apt = ["apt-get", "-o", "Acquire::Check-Valid-Until=false", "-o", "Acquire::Check-Date=false"]
        in_root(root, *apt, "update", timeout=600)
        in_root(root, *apt, "install", "-y", "-q", "--no-install-recommends", *PACKAGES,
                timeout=1800)
        in_root(root, "apt-get", "clean")
        policy.unlink()
        shape_base_root(root)
        t_total = time.monotonic() - started
        (partial / "complete").write_text(json.dumps({
            "debootstrap_s": round(t_debootstrap, 1), "total_s": round(t_total, 1),
            "packages": sorted(PACKAGES), "mirror_from": "host apt configuration"}, indent=2))
        partial.rename(final)
        say(f"base root: built in {t_total:.0f} s (debootstrap {t_debootstrap:.0f} s)")
        return final / "root"


def shape_base_root(root: Path) -> None:
    """What any cloud image has: no machine identity, a hostname, root by label, no DNS."""
    (root / "etc/hostname").write_text("vmtest\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost localhost.localdomain\n"
                                    "127.0.1.1\tvmtest\n")
    (root / "etc/fstab").write_text("LABEL=rootfs\t/\text4\tdefaults,errors=remount-ro\t0\t1\n")
    # An empty machine-id makes each boot of a fresh copy a first boot, as with a new AMI instance.
    (root / "etc/machine-id").write_text("")
    with contextlib.suppress(FileNotFoundError):
        (root / "var/lib/dbus/machine-id").unlink()
    # The guest has no DNS (its network is restricted to the test's forwards).
    with contextlib.suppress(FileNotFoundError):
        (root / "etc/resolv.conf").unlink()
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


def tree_digest(paths) -> str:
    """Content hash of the files that go into the baked image (re-bake when any changes)."""
    h = hashlib.sha256()
    for base in paths:
        base = Path(base)
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass
class Image:
    root_img: Path      # raw ext4 image of the baked root; boots use qcow2 overlays on it
    kernel: Path
    initrd: Path
    bake_seconds: float
    bake_log: str


def build_image(base_root: Path, *, builder_python: str = sys.executable) -> Image:
    """Copy the cached base root, bake hostagent into it with packaging/bake.sh, add the test
    layer, and make a raw ext4 image of it. Cached by the content of everything baked in."""
    inputs = [REPO / "hostagent", REPO / "packaging", REPO / "systemd", REPO / "cron",
              REPO / "setup.cfg", REPO / "pyproject.toml", GUEST_DIR, CHROOT_RUN, Path(__file__)]
    key = f"{base_root.parent.name}-{tree_digest(inputs)}"
    cache = cache_dir()
    final = cache / f"image-{key}"
    with cache_lock(cache):
        if (final / "complete").exists():
            meta = json.loads((final / "complete").read_text())
            say(f"baked image: cached {final.name} (bake took {meta['bake_s']} s when built)")
            return Image(final / "root.img", final / "vmlinuz", final / "initrd.img",
                         meta["bake_s"], meta.get("bake_log", ""))
        for old in cache.glob("image-*"):  # one baked image at a time: each is ~1 GB
            shutil.rmtree(old, ignore_errors=True)
        partial = cache / f"image-{key}.partial"
        root = partial / "root"
        partial.mkdir(parents=True)
        started = time.monotonic()
        run(["cp", "-a", "--reflink=auto", base_root, root], timeout=600)
        t_copy = time.monotonic() - started

        started = time.monotonic()
        bake = run(["bash", BAKE, "--root", root, "--build-python", builder_python], timeout=900)
        t_bake = time.monotonic() - started
        say(f"bake: packaging/bake.sh --root … took {t_bake:.0f} s")

        add_test_layer(root)
        kernel = sorted(glob.glob(str(root / "boot/vmlinuz-*")))[-1]
        initrd = sorted(glob.glob(str(root / "boot/initrd.img-*")))[-1]
        shutil.copy(kernel, partial / "vmlinuz")
        shutil.copy(initrd, partial / "initrd.img")
        started = time.monotonic()
        img = partial / "root.img"
        run(["truncate", "-s", ROOT_IMAGE_SIZE, img])
        run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", root, img], timeout=600)
        t_mkfs = time.monotonic() - started
        shutil.rmtree(root)
        (partial / "complete").write_text(json.dumps({
            "copy_s": round(t_copy, 1), "bake_s": round(t_bake, 1), "mkfs_s": round(t_mkfs, 1),
            "bake_log": bake.stdout[-8000:] + bake.stderr[-4000:]}, indent=2))
        partial.rename(final)
        say(f"baked image: copy {t_copy:.0f} s, bake {t_bake:.0f} s, mkfs {t_mkfs:.0f} s")
        return Image(final / "root.img", final / "vmlinuz", final / "initrd.img", t_bake,
                     bake.stdout)


def add_test_layer(root: Path) -> None:
    """Test-only pieces on top of the baked image, standing in for what a real EC2 host has:
    a fake ECS agent as ecs.service (the real one needs Docker and the ECS service), the report
    unit that writes results to the second serial port and powers off, and a datasource list
    that makes cloud-init look only at the NoCloud seed."""
    lib = root / "usr/local/lib/vmtest"
    lib.mkdir(parents=True, exist_ok=True)
    for name in ("fake_ecs_agent.py", "report.py"):
        shutil.copy(GUEST_DIR / name, lib / name)
    units = root / "etc/systemd/system"
    for name in ("ecs.service", "vmtest-report.service"):
        shutil.copy(GUEST_DIR / name, units / name)
    (root / "etc/cloud/cloud.cfg.d/90-vmtest.cfg").write_text(
        "# test image only: the seed is a NoCloud ISO; do not probe other datasources\n"
        "datasource_list: [ NoCloud, None ]\n"
        "# minbase has no locales package (a cloud image has): use the built-in C.UTF-8\n"
        "locale: C.UTF-8\n"
        "# no sshd in the test image\n"
        "ssh_genkeytypes: []\n")
    run(["systemctl", f"--root={root}", "enable", "ecs.service", "vmtest-report.service"])
