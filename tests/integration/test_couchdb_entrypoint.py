"""The layout against what the official CouchDB image does to it at every container start.

apache/couchdb-docker's docker-entrypoint.sh, run as root (the image's default), does on every
start:
    find /opt/couchdb \\! \\( -user couchdb -group couchdb \\) -exec chown -f couchdb:couchdb '{}' +
    find /opt/couchdb/data -type d ! -perm 0755 -exec chmod -f 0755 '{}' +
    find /opt/couchdb/data -type f ! -perm 0644 -exec chmod -f 0644 '{}' +
    find /opt/couchdb/etc -type d ! -perm 0755 -exec chmod -f 0755 '{}' +
    find /opt/couchdb/etc -type f ! -perm 0644 -exec chmod -f 0644 '{}' +
and the task bind-mounts the volume's data/ and etc/local.d/ there (`hostagent ecs-task-volumes`;
an older task definition mounted all of etc/). There is no Docker here: `entrypoint_stand_in`
is a hand-written stand-in that runs those same find commands on the host-side directories
(data/ and all of etc/, a superset of what today's task definition exposes). A host must stay
`ready` after CouchDB has started once, and bootstrap must not fight the image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.test_agent import ecs_attributes, register_instance
from tests.integration.test_bootstrap import hostagent, make_config, steps_by_name
from tests.support.hosttools import need_root, need_tool, sh
from tests.support.pouchdb import pouchdb  # noqa: F401 (fixture)

pytestmark = pytest.mark.root

COUCHDB_UID = 5984  # the couchdb user of the official image


def entrypoint_stand_in(mount_point: str, tops=("data", "etc")) -> None:
    """What the official image's entrypoint does to the bind-mounted directories (see the module
    docstring), with the container's paths replaced by the host's. Not Docker: a stand-in."""
    paths = [os.path.join(mount_point, top) for top in tops]
    owner = f"{COUCHDB_UID}:{COUCHDB_UID}"
    sh("find", *paths, "!", "(", "-user", COUCHDB_UID, "-group", COUCHDB_UID, ")",
       "-exec", "chown", "-f", owner, "{}", "+")
    for path in paths:
        for kind, mode in (("d", "0755"), ("f", "0644")):
            sh("find", path, "-type", kind, "!", "-perm", mode, "-exec", "chmod", "-f", mode,
               "{}", "+")


def mode_of(path: str) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def agent_once(config: str) -> tuple[int, dict, subprocess.CompletedProcess]:
    done = subprocess.run([sys.executable, "-m", "hostagent", "--config", config, "--json",
                           "agent", "--once"], text=True, capture_output=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__)))))
    return done.returncode, json.loads(done.stdout), done


@pytest.fixture
def volume(loop_device, host_paths):
    need_root()
    need_tool("mkfs.ext4", "e2fsprogs")
    need_tool("chattr", "e2fsprogs")
    need_tool("find", "findutils")
    return loop_device("64M"), host_paths


def test_host_stays_ready_and_bootstrap_idle_after_couchdb_started(volume, aws, introspection,
                                                                   pouchdb):
    dev, paths = volume
    mp = paths["mount_point"]
    config = make_config(paths, dev, couchdb={"url": pouchdb.url},
                         ecs={"introspection_url": introspection.url})
    arn = register_instance()
    introspection.register(arn)

    first = hostagent(config, "bootstrap", "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    assert steps_by_name(first)["layout"] == "done"
    # The volume's own top directory is private: nothing but root gets past it, whatever the
    # modes below it (the container never sees it: only data/ and etc/local.d are mounted).
    st = os.stat(mp)
    assert st.st_ino == 2 and os.major(st.st_dev) == os.major(os.stat(dev).st_rdev), \
        "the mount point while mounted is ext4's root directory"
    assert mode_of(mp) == (0, 0, 0o700)

    # What CouchDB leaves behind: database files, the entrypoint's docker.ini, a 0600 file.
    os.makedirs(os.path.join(mp, "data", ".shards"))
    for rel in ("data/_dbs.couch", "etc/local.d/docker.ini", "etc/local.d/secret.ini"):
        with open(os.path.join(mp, rel), "w") as f:
            f.write("x")
    os.chmod(os.path.join(mp, "etc/local.d/secret.ini"), 0o600)

    entrypoint_stand_in(mp)
    for d in ("data", "data/.shards", "etc", "etc/local.d"):
        assert mode_of(os.path.join(mp, d)) == (COUCHDB_UID, COUCHDB_UID, 0o755), d
    assert mode_of(os.path.join(mp, "etc/local.d/secret.ini"))[2] == 0o644

    verify = hostagent(config, "verify-mount", "--json")
    checks = {c["name"]: c for c in json.loads(verify.stdout)["checks"]}
    assert verify.returncode == 0, verify.stdout
    assert checks["layout /"]["ok"] and checks["layout data"]["ok"], checks

    code, out, done = agent_once(config)
    assert code == 0, done.stdout + done.stderr
    assert out["persistence"] == "ready" and out["reason"] == "none", out
    attrs = ecs_attributes(arn)
    assert attrs["hostagent.persistence"] == "ready" and attrs["hostagent.reason"] == "none"

    # The next boot's bootstrap finds nothing to do: no chmod back that the next start undoes.
    second = hostagent(config, "bootstrap", "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    assert set(steps_by_name(second).values()) == {"skipped"}, second.stdout
    for d in ("data", "etc", "etc/local.d"):
        assert mode_of(os.path.join(mp, d)) == (COUCHDB_UID, COUCHDB_UID, 0o755), d
    assert mode_of(mp) == (0, 0, 0o700)


def test_private_root_lands_on_the_volume_not_the_bare_mount_point(volume):
    dev, paths = volume
    mp = paths["mount_point"]
    os.makedirs(mp)
    os.chmod(mp, 0o755)
    bare = os.stat(mp)
    config = make_config(paths, dev)
    assert hostagent(config, "bootstrap").returncode == 0
    assert mode_of(mp) == (0, 0, 0o700)
    sh("umount", mp)
    # The root-disk guard's directory underneath keeps its mode (and its immutable flag).
    after = os.stat(mp)
    assert (after.st_ino, after.st_dev, after.st_mode & 0o7777) == \
        (bare.st_ino, bare.st_dev, 0o755)
    assert "i" in sh("lsattr", "-d", mp).stdout.split()[0]

    # Someone opened the volume's root up again: verify-mount says so, bootstrap fixes it once.
    sh("mount", "--fstab", paths["fstab"], mp)
    os.chmod(mp, 0o755)
    verify = hostagent(config, "verify-mount", "--json")
    checks = {c["name"]: c for c in json.loads(verify.stdout)["checks"]}
    assert verify.returncode == 1 and not checks["layout /"]["ok"]
    assert "mode 0755, want 0700" in checks["layout /"]["detail"]
    fixed = hostagent(config, "bootstrap", "--json")
    assert fixed.returncode == 0 and steps_by_name(fixed)["layout"] == "done", fixed.stdout
    assert "chmod / 0700" in fixed.stdout
    assert set(steps_by_name(hostagent(config, "bootstrap", "--json")).values()) == {"skipped"}


def test_an_explicit_stricter_mode_is_kept_exactly(volume):
    """layout.mode = "0750" is for an image that does not chmod its directories: with the
    official one, the next container start makes them 0755 and the host degraded (documented)."""
    dev, paths = volume
    mp = paths["mount_point"]
    config = make_config(paths, dev, layout={"mode": "0750"})
    assert hostagent(config, "bootstrap").returncode == 0
    for d in ("data", "etc", "etc/local.d"):
        assert mode_of(os.path.join(mp, d)) == (COUCHDB_UID, COUCHDB_UID, 0o750), d
    assert hostagent(config, "verify-mount").returncode == 0
    entrypoint_stand_in(mp)
    verify = hostagent(config, "verify-mount", "--json")
    checks = {c["name"]: c for c in json.loads(verify.stdout)["checks"]}
    assert verify.returncode == 1
    assert checks["layout data"]["detail"] == "mode 0755, want 0750"


def test_the_private_root_is_never_set_on_a_directory_that_is_not_the_volumes_top(volume):
    """apply_layout given a directory inside the volume (what a bind mount of a subdirectory, or
    a mount point reached through a symlink into the volume, would show) refuses to chmod it."""
    from hostagent.adapters.blockdev import number_text
    from hostagent.adapters.layout import apply_layout
    from hostagent.errors import RefusedError

    dev, paths = volume
    mp = paths["mount_point"]
    sh("mkfs.ext4", "-q", "-m", "0", dev)
    os.makedirs(mp)
    sh("mount", dev, mp)
    sub = os.path.join(mp, "sub")
    os.mkdir(sub, 0o755)
    with pytest.raises(RefusedError, match="not the top directory"):
        apply_layout(sub, ("data",), 5984, 5984, 0o755,
                     expected_device=number_text(os.stat(dev).st_rdev))
    assert mode_of(sub) == (0, 0, 0o755) and not os.path.exists(os.path.join(sub, "data"))
