"""packaging/bake.sh into an image root (a copy of the VM test's cached Debian 12 root): what it
installs, that a second run changes nothing that matters, the cron/timer switch, and that bad
input is one clear line, exit 2 and no change. (The VM test then boots a root baked this way.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.hosttools import need_root, need_tool

REPO = Path(__file__).resolve().parents[2]
BAKE = REPO / "packaging" / "bake.sh"
UNIT_DIR = "usr/local/lib/systemd/system"


def bake(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BAKE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def errors(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("bake: error:")]


def test_bad_schedule_is_refused_before_anything_happens(tmp_path):
    need_root()
    done = bake("--root", tmp_path, "--snapshot-schedule", "hourly")
    assert done.returncode == 2
    assert errors(done) == ["bake: error: --snapshot-schedule must be timer or cron"]
    assert list(tmp_path.iterdir()) == []


def test_root_without_python_is_refused_without_change(tmp_path):
    need_root()
    done = bake("--root", tmp_path)
    assert done.returncode == 2
    assert len(errors(done)) == 1 and "has no /usr/bin/python3" in errors(done)[0]
    assert list(tmp_path.iterdir()) == []


def test_missing_root_is_refused(tmp_path):
    need_root()
    done = bake("--root", tmp_path / "nope")
    assert done.returncode == 2 and "does not exist" in errors(done)[0]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    need_root()
    for tool, package in (("debootstrap", "debootstrap"), ("unshare", "util-linux"),
                          ("systemctl", "systemd")):
        need_tool(tool, package)
    from tests.system.vm.image import ensure_base_root, run

    base = ensure_base_root()
    root = tmp_path_factory.mktemp("bake") / "root"
    run(["cp", "-a", "--reflink=auto", base, root], timeout=600)
    return root


def installed_state(root: Path) -> dict[str, object]:
    """What the bake owns outside the venv: files with their mode and content, and links."""
    state: dict[str, object] = {}
    paths = [root / UNIT_DIR, root / "etc/cron.d/hostagent", root / "etc/hostagent",
             root / "usr/local/bin/hostagent", root / "etc/systemd/system",
             root / "opt/hostagent/README.md", root / "opt/hostagent/docs"]
    for base in paths:
        items = [base] if not base.is_dir() or base.is_symlink() else sorted(base.rglob("*"))
        for path in items:
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = ("link", os.readlink(path))
            elif path.is_file():
                state[rel] = (oct(path.stat().st_mode & 0o7777), path.read_bytes())
    return state


@pytest.mark.slow
def test_bake_installs_enables_and_is_repeatable(image_root):
    done = bake("--root", image_root, "--build-python", sys.executable)
    assert done.returncode == 0, done.stderr[-3000:]
    root = image_root
    assert (root / "opt/hostagent/bin/python").exists()
    assert os.readlink(root / "usr/local/bin/hostagent") == "/opt/hostagent/bin/hostagent"
    for unit in ("hostagent-bootstrap.service", "hostagent-secrets.service", "hostagent.service",
                 "hostagent-snapshot.service", "hostagent-snapshot.timer"):
        assert (root / UNIT_DIR / unit).read_bytes() == (REPO / "systemd" / unit).read_bytes()
    assert (root / UNIT_DIR / "ecs.service.d/10-hostagent.conf").exists()
    assert (root / "etc/cron.d/hostagent").stat().st_mode & 0o777 == 0o644
    assert (root / "etc/hostagent/hostagent.toml.example").exists()
    assert not (root / "etc/hostagent/hostagent.toml").exists(), "the real config is user-data's"
    # The README and the docs/ it links to, side by side as in the checkout, readable by all.
    assert (root / "opt/hostagent/README.md").read_bytes() == (REPO / "README.md").read_bytes()
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert pages and sorted(p.name for p in (root / "opt/hostagent/docs").iterdir()) == pages
    for page in pages:
        installed = root / "opt/hostagent/docs" / page
        assert installed.read_bytes() == (REPO / "docs" / page).read_bytes(), page
        assert installed.stat().st_mode & 0o777 == 0o644, page
    wants = root / "etc/systemd/system"
    assert (wants / "multi-user.target.wants/hostagent-bootstrap.service").is_symlink()
    assert (wants / "multi-user.target.wants/hostagent.service").is_symlink()
    # The app's secrets at every boot (a no-op without [secrets] source), before ECS starts.
    assert (wants / "multi-user.target.wants/hostagent-secrets.service").is_symlink()
    dropin = (root / UNIT_DIR / "ecs.service.d/10-hostagent.conf").read_text()
    assert dropin == (REPO / "systemd/ecs.service.d/10-hostagent.conf").read_text()
    assert "After=hostagent-bootstrap.service hostagent-secrets.service" in dropin
    assert (wants / "timers.target.wants/hostagent-snapshot.timer").is_symlink()
    assert not list((root / "tmp").glob("hostagent-bake.*")), "work dir left in the image"
    # The venv's hostagent runs inside the image (its own python, its own dependencies).
    version = subprocess.run([str(REPO / "tests/system/vm/chroot-run.sh"), str(root),
                              "/usr/local/bin/hostagent", "--version"],
                             capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("hostagent "), version.stderr

    before = installed_state(root)
    again = bake("--root", root, "--build-python", sys.executable)
    assert again.returncode == 0, again.stderr[-3000:]
    assert installed_state(root) == before


@pytest.mark.slow
def test_cron_schedule_disables_the_timer_and_back(image_root):
    timer_link = image_root / "etc/systemd/system/timers.target.wants/hostagent-snapshot.timer"
    done = bake("--root", image_root, "--snapshot-schedule", "cron",
                "--build-python", sys.executable)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not timer_link.exists()
    assert (image_root / "etc/cron.d/hostagent").exists()
    done = bake("--root", image_root, "--build-python", sys.executable)
    assert done.returncode == 0 and timer_link.is_symlink()
