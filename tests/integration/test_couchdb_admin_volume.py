"""couchdb.admin_secret end to end: the secret in moto's S3 (over HTTP), bootstrap writing
etc/local.d/10-hostagent.ini on a real loop device (a PBKDF2 hash, never the password: not in the
file, not anywhere on the disk), and check-couchdb / agent --once logging in to a real
pouchdb-server whose admin was set through its _config API -- also with the very hash bootstrap
wrote: pouchdb-server 4.2.0, like CouchDB, stores a `-pbkdf2-` value PUT to _config/admins/NAME
as it is (pouchdb-auth lib/admins.js: IS_HASH_RE), and checks logins against it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys

import boto3
import pytest

from tests.integration.test_bootstrap import hostagent, make_config, steps_by_name
from tests.support.hosttools import need_root, need_tool, sh
from tests.support.pouchdb import pouchdb_factory  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKET, KEY = "gc-secrets", "hostagent/couchdb-admin"
URL = f"s3://{BUCKET}/{KEY}"
PASSWORD = "9f1c2e7a5b3d4c6e8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d"
INI = "etc/local.d/10-hostagent.ini"


def expected_ini(password: str = PASSWORD, name: str = "admin") -> str:
    """The file as it was written before hostagent wrote hashes (`password` in plaintext), or
    with `password` standing for the hash in its place."""
    return (f"; written by hostagent from {URL}; edit the secret, not this file\n[admins]\n"
            f"{name} = {password}\n[chttpd]\nbind_address = 127.0.0.1\n[couchdb]\n"
            "single_node = true\n")


HASH_RE = re.compile(r"-pbkdf2-([0-9a-f]{40}),([0-9a-f]{32}),([0-9]+)")


def written_hash(path: str, password: str = PASSWORD, name: str = "admin") -> str:
    """The file is exactly ours with a `-pbkdf2-` hash of `password` (checked independently of
    hostagent's verifier) where the password would be; the hash."""
    with open(path, "rb") as f:
        data = f.read()
    assert password.encode() not in data, "the plaintext password is in the file"
    text = data.decode()
    value = text.splitlines()[2].partition(" = ")[2]
    assert text == expected_ini(value, name)
    match = HASH_RE.fullmatch(value)
    assert match, value
    derived, salt, iterations = match.groups()
    assert int(iterations) == 600_000
    assert hashlib.pbkdf2_hmac("sha1", password.encode(), salt.encode(), int(iterations),
                               20).hex() == derived
    return value


def disk_bytes(dev: str) -> bytes:
    """Everything on the loop device as it reached the disk: its backing file, after a sync."""
    os.sync()
    backing = sh("losetup", "-n", "-O", "BACK-FILE", dev).stdout.strip()
    with open(backing, "rb") as f:
        return f.read()


@pytest.fixture
def s3(aws):
    client = boto3.client("s3", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    return client


def put_secret(s3, body: bytes) -> None:
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=body)


@pytest.fixture
def volume(loop_device, host_paths, s3):
    need_root()
    need_tool("mkfs.ext4", "e2fsprogs")
    dev = loop_device("64M")
    config = make_config(host_paths, dev, couchdb={"admin_secret": URL})
    return dev, host_paths, config


def all_output(*runs) -> str:
    return "".join(r.stdout + r.stderr for r in runs)


def steps(result) -> dict:
    return {s["name"]: s for s in json.loads(result.stdout)["steps"]}


def test_bootstrap_writes_the_admin_ini_0600_owned_by_couchdb_then_is_a_noop(volume, s3):
    dev, paths, config = volume
    put_secret(s3, f"admin:{PASSWORD}\n".encode())
    first = hostagent(config, "bootstrap", "--json")
    assert first.returncode == 0, first.stderr
    assert steps_by_name(first)["couchdb-admin"] == "done"
    path = os.path.join(paths["mount_point"], INI)
    value = written_hash(path)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (5984, 5984)
    assert os.listdir(os.path.dirname(path)) == ["10-hostagent.ini"], "no temp file left"
    # Not anywhere on the disk (what an EBS snapshot would hold): the file's own bytes are.
    disk = disk_bytes(dev)
    assert value.encode() in disk and f"from {URL}".encode() in disk, "the scan sees the file"
    assert PASSWORD.encode() not in disk

    second = hostagent(config, "bootstrap", "--json")
    human = hostagent(config, "bootstrap", "-vv")
    assert second.returncode == 0 and human.returncode == 0, second.stderr + human.stderr
    assert set(steps_by_name(second).values()) == {"skipped"}
    assert steps(second)["couchdb-admin"]["reason"] == "up to date"
    again = os.lstat(path)
    assert (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert written_hash(path) == value, "a salted hash: never rewritten just to differ"

    # The reboot path: the file is looked at after the mount, and is left as it is.
    sh("umount", paths["mount_point"])
    third = hostagent(config, "bootstrap", "--json")
    assert third.returncode == 0, third.stderr
    assert steps_by_name(third)["mount"] == "done"
    assert steps_by_name(third)["couchdb-admin"] == "skipped"
    assert os.lstat(path).st_ino == st.st_ino
    assert PASSWORD not in all_output(first, second, human, third)


def test_the_entrypoints_0644_is_left_alone_a_writable_or_foreign_owned_file_fixed_in_place(
        volume, s3):
    dev, paths, config = volume
    put_secret(s3, f"admin:{PASSWORD}".encode())
    assert hostagent(config, "bootstrap").returncode == 0
    path = os.path.join(paths["mount_point"], INI)
    before = os.lstat(path)
    # Stand-in for the official entrypoint at container start: chmod 0644 (as root).
    os.chmod(path, 0o644)
    done = hostagent(config, "bootstrap", "--json")
    assert done.returncode == 0, done.stderr
    assert steps(done)["couchdb-admin"]["status"] == "skipped"
    assert steps(done)["couchdb-admin"]["reason"] == "up to date"
    assert "couchdb-admin" not in done.stderr, "no warning for the entrypoint's 0644"
    st = os.lstat(path)
    assert (st.st_ino, st.st_mtime_ns, stat.S_IMODE(st.st_mode)) == \
        (before.st_ino, before.st_mtime_ns, 0o644)

    # Group/other-writable, and owned by someone else: fixed in place (same inode, same bytes).
    with open(path, "rb") as f:
        content = f.read()
    os.chown(path, 0, 0)
    os.chmod(path, 0o666)
    fixed = hostagent(config, "bootstrap", "--json")
    assert fixed.returncode == 0, fixed.stderr
    step = steps(fixed)["couchdb-admin"]
    assert step["status"] == "done", step
    assert "0666" in step["detail"] and "0:0" in step["detail"] and "in place" in step["detail"]
    st = os.lstat(path)
    assert st.st_ino == before.st_ino
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (5984, 5984, 0o600)
    with open(path, "rb") as f:
        assert f.read() == content
    again = hostagent(config, "bootstrap", "--json")
    assert steps(again)["couchdb-admin"]["status"] == "skipped", "idempotent"
    assert PASSWORD not in all_output(done, fixed, again)


def test_a_file_with_the_plaintext_from_before_is_rewritten_with_a_hash(volume, s3):
    dev, paths, config = volume
    put_secret(s3, f"admin:{PASSWORD}".encode())
    assert hostagent(config, "bootstrap").returncode == 0
    path = os.path.join(paths["mount_point"], INI)
    with open(path, "w") as f:  # what an older hostagent wrote
        f.write(expected_ini(PASSWORD))
    done = hostagent(config, "bootstrap", "--json")
    assert done.returncode == 0, done.stderr
    step = steps(done)["couchdb-admin"]
    assert step["status"] == "done" and "plaintext" in step["detail"], step
    written_hash(path)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert steps(hostagent(config, "bootstrap", "--json"))["couchdb-admin"]["status"] == "skipped"
    assert PASSWORD not in all_output(done)


def pbkdf2_sha256(password: str, salt: str, iterations: int = 1000) -> str:
    key = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations).hex()
    return f"-pbkdf2:sha256-{key},{salt},{iterations}"


def test_couchdb_hashes_accepted_a_changed_secret_rewrites_and_drops_the_stale_hash(volume, s3):
    dev, paths, config = volume
    put_secret(s3, f"admin:{PASSWORD}".encode())
    assert hostagent(config, "bootstrap").returncode == 0
    local_d = os.path.join(paths["mount_point"], "etc", "local.d")
    path = os.path.join(local_d, "10-hostagent.ini")
    # CouchDB started: as in the official image it persisted the hash to docker.ini (the last
    # file of its chain); where our file is last it rewrites our line in place instead.
    salt = "a3c1" * 8
    docker = os.path.join(local_d, "docker.ini")
    with open(docker, "w") as f:
        f.write(f"[chttpd_auth]\nsecret = keep-me\n\n[admins]\nadmin = "
                f"{pbkdf2_sha256(PASSWORD, salt)}\n")
    with open(path, "w") as f:
        f.write(expected_ini(password=pbkdf2_sha256(PASSWORD, salt)))
    os.chown(docker, 5984, 5984)
    hashed = hostagent(config, "bootstrap", "--json")
    assert hashed.returncode == 0, hashed.stderr
    assert steps_by_name(hashed)["couchdb-admin"] == "skipped", "a hash of the same password"

    new_password = "rotated-" + PASSWORD[:20]
    put_secret(s3, f"admin:{new_password}\n".encode())
    rotated = hostagent(config, "bootstrap", "--json")
    assert rotated.returncode == 0, rotated.stderr
    step = steps(rotated)["couchdb-admin"]
    assert step["status"] == "done" and "docker.ini" in step["detail"]
    written_hash(path, new_password)
    with open(docker) as f:  # the old hash would override ours: gone, the rest kept
        assert f.read() == "[chttpd_auth]\nsecret = keep-me\n\n[admins]\n"
    assert os.stat(docker).st_uid == 5984
    assert new_password not in all_output(hashed, rotated)


@pytest.mark.parametrize("kind", ["foreign", "symlink"])
def test_a_file_that_is_not_ours_is_left_alone_with_a_message_naming_it(volume, s3, tmp_path,
                                                                        kind):
    dev, paths, config = volume
    put_secret(s3, f"admin:{PASSWORD}".encode())
    assert hostagent(config, "bootstrap").returncode == 0
    path = os.path.join(paths["mount_point"], INI)
    os.unlink(path)
    outside = tmp_path / "outside.ini"
    outside.write_text("[admins]\nsomeone = theirs\n")
    if kind == "symlink":
        os.symlink(outside, path)
    else:
        with open(path, "w") as f:
            f.write("[admins]\nsomeone = theirs\n")
    done = hostagent(config, "bootstrap", "--json")
    assert done.returncode == 0, done.stderr
    step = steps(done)["couchdb-admin"]
    assert step["status"] == "skipped" and step["reason"].startswith("left alone")
    assert INI in step["reason"]
    assert outside.read_text() == "[admins]\nsomeone = theirs\n"
    if kind == "symlink":
        assert os.path.islink(path)
    else:
        with open(path) as f:
            assert f.read() == "[admins]\nsomeone = theirs\n"


@pytest.mark.parametrize("body", [b"no-colon-here", b"admin:", b"admin:pw\nsecond:line\n"])
def test_a_malformed_secret_is_exit_2_naming_the_url_and_nothing_changes(volume, s3, body):
    dev, paths, config = volume
    put_secret(s3, body)
    fstab = open(paths["fstab"], "rb").read()
    done = hostagent(config, "bootstrap")
    assert done.returncode == 2, done.stdout + done.stderr
    error = done.stderr.strip().splitlines()
    assert error[0].startswith(f"hostagent: error: couchdb.admin_secret {URL} does not hold")
    assert error[-1].startswith("hint: ")
    assert body.split(b":")[-1].decode() not in done.stderr.replace(URL, "") or len(body) < 8
    assert open(paths["fstab"], "rb").read() == fstab
    assert sh("blkid", "-p", dev, check=False).returncode == 2, "never formatted"
    assert not os.path.exists(paths["mount_point"])
    assert not os.path.exists(paths["state_dir"]) or os.listdir(paths["state_dir"]) == []


def test_dry_run_writes_nothing_and_never_prints_the_password(volume, s3):
    dev, paths, config = volume
    put_secret(s3, f"admin:{PASSWORD}".encode())
    runs = [hostagent(config, "bootstrap", "--dry-run", *flags) for flags in ((), ("--json",),
                                                                                ("-vv",))]
    assert all(r.returncode == 0 for r in runs), all_output(*runs)
    assert steps_by_name(runs[1])["couchdb-admin"] == "planned"
    assert not os.path.exists(paths["mount_point"])
    assert hostagent(config, "bootstrap").returncode == 0
    path = os.path.join(paths["mount_point"], INI)
    before = os.lstat(path)
    value = written_hash(path)
    put_secret(s3, b"admin:another-password-entirely")
    dry = hostagent(config, "bootstrap", "--dry-run", "--json")
    assert dry.returncode == 0 and steps_by_name(dry)["couchdb-admin"] == "planned"
    assert os.lstat(path).st_ino == before.st_ino
    assert written_hash(path) == value
    out = all_output(*runs, dry)
    assert PASSWORD not in out and "another-password-entirely" not in out


def test_s3_missing_at_boot_still_mounts_and_fails_only_the_admin_step(volume, s3):
    dev, paths, config = volume
    put_secret(s3, f"admin:{PASSWORD}".encode())
    assert hostagent(config, "bootstrap").returncode == 0
    path = os.path.join(paths["mount_point"], INI)
    value = written_hash(path)
    sh("umount", paths["mount_point"])
    s3.delete_object(Bucket=BUCKET, Key=KEY)
    done = hostagent(config, "bootstrap", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    out = json.loads(done.stdout)
    status = {s["name"]: s["status"] for s in out["steps"]}
    assert status["mount"] == "done" and status["couchdb-admin"] == "failed"
    assert out["reason"] == "admin-secret-unavailable"
    assert URL in out["error"] and "left as it is" in out["error"]
    assert sh("findmnt", "-n", "-o", "SOURCE", paths["mount_point"]).stdout.strip() == dev
    assert written_hash(path) == value
    human = hostagent(config, "bootstrap")
    assert human.returncode == 1
    assert "failed" in human.stdout and "couchdb-admin" in human.stdout
    assert "missing, or not allowed" in human.stderr or "not found" in human.stderr


def test_no_admin_secret_means_no_step_and_no_aws(loop_device, host_paths):
    need_root()
    dev = loop_device("64M")
    config = make_config(host_paths, dev)
    done = hostagent(config, "bootstrap", "--json",
                     env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_REGION": "us-east-1"})
    assert done.returncode == 0, done.stderr
    assert "couchdb-admin" not in steps_by_name(done)
    code = ("import sys; from hostagent.cli import main; main(['--config', sys.argv[1], "
            "'bootstrap']); print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('boto3', 'botocore') or m in ('hostagent.couchdb_admin', 'hostagent.aws.s3', "
            "'hostagent.aws.clients', 'hostagent.adapters.couchdb_ini')))")
    sh("umount", host_paths["mount_point"])
    mods = subprocess.run([sys.executable, "-c", code, config], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert mods.returncode == 0, mods.stderr
    assert mods.stdout.strip().splitlines()[-1] == "[]", mods.stdout


# ---------------------------------------------------------------- check-couchdb and the agent


def couch_config(tmp_path, url: str, **extra) -> str:
    path = tmp_path / "hostagent.toml"
    body = (f'[volume]\ndevice = "/dev/loop99"\n[couchdb]\nurl = "{url}"\ntimeout = 5\n'
            f'admin_secret = "{URL}"\n')
    for section, values in extra.items():
        body += f"[{section}]\n" + "".join(f'{k} = {json.dumps(v)}\n' for k, v in values.items())
    path.write_text(body)
    return str(path)


def run(*argv, timeout=60):
    return subprocess.run([sys.executable, "-m", "hostagent", *argv], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture
def secured(pouchdb_factory, s3):
    server = pouchdb_factory()
    server.set_admin("admin", PASSWORD)
    return server


def test_check_couchdb_logs_in_with_the_secret_and_has_no_admin_party_warning(tmp_path,
                                                                              secured, s3):
    put_secret(s3, f"admin:{PASSWORD}\n".encode())
    cfg = couch_config(tmp_path, secured.url)
    done = run("--config", cfg, "--json", "check-couchdb")
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout)
    checks = {c["name"]: c for c in out["checks"]}
    assert out["ok"] is True and out["state"] == "up"
    assert checks["admin-auth"]["ok"] is True and "server admin" in checks["admin-auth"]["detail"]
    assert checks["admin-party"]["ok"] is True
    human = run("--config", cfg, "check-couchdb")
    assert human.returncode == 0 and "ready, no security warnings" in human.stdout
    assert PASSWORD not in all_output(done, human)
    assert secured.proc.poll() is None


def test_check_couchdb_with_a_wrong_password_is_its_own_clear_failure(tmp_path, secured, s3):
    put_secret(s3, b"admin:not-the-password-couchdb-has")
    cfg = couch_config(tmp_path, secured.url)
    done = run("--config", cfg, "--json", "check-couchdb")
    assert done.returncode == 1
    out = json.loads(done.stdout)
    checks = {c["name"]: c for c in out["checks"]}
    assert out["state"] == "bad-credentials"
    assert checks["admin-auth"]["ok"] is False
    assert "bad credentials" in checks["admin-auth"]["detail"] and URL in checks["admin-auth"]["detail"]
    assert checks["admin-party"]["ok"] is True, "the admin exists: no admin-party warning"
    human = run("--config", cfg, "check-couchdb")
    assert "FAIL    admin-auth" in human.stdout and "admin credentials refused" in human.stdout
    assert "not-the-password-couchdb-has" not in all_output(done, human)
    assert secured.proc.poll() is None


def test_check_couchdb_with_a_malformed_secret_is_exit_2(tmp_path, secured, s3):
    put_secret(s3, b"just-a-password")
    done = run("--config", couch_config(tmp_path, secured.url), "check-couchdb")
    assert done.returncode == 2 and URL in done.stderr and "just-a-password" not in done.stderr


def test_agent_once_logs_in_with_the_secret_and_reports_bad_credentials(tmp_path, secured, s3):
    put_secret(s3, f"admin:{PASSWORD}".encode())
    cfg = couch_config(tmp_path, secured.url, ecs={"introspection_url": ""},
                       host={"state_dir": str(tmp_path / "state"),
                             "lock_file": str(tmp_path / "lock")})
    good = run("--config", cfg, "--json", "agent", "--once")
    out = json.loads(good.stdout)
    assert out["couchdb"]["state"] == "up", out["couchdb"]
    assert not [p for p in out["security"] if p["ok"] is False and p["name"] == "admin-party"]
    put_secret(s3, b"admin:wrong-password-for-the-agent")
    bad = run("--config", cfg, "--json", "agent", "--once")
    out = json.loads(bad.stdout)
    assert out["couchdb"]["state"] == "bad-credentials", out["couchdb"]
    assert URL in out["couchdb"]["reason"] and "'admin'" in out["couchdb"]["reason"]
    assert "wrong-password-for-the-agent" not in all_output(good, bad)
    assert PASSWORD not in all_output(good, bad)


def test_the_hash_bootstrap_wrote_logs_in_to_a_couchdb_compatible_server(volume, s3,
                                                                        pouchdb_factory):
    """The bytes on the volume, PUT as they are to pouchdb-server's _config/admins (CouchDB: the
    same, a `-pbkdf2-` value is stored as is), accept the password from the secret and refuse
    another. pouchdb-server computes PBKDF2 in plain JavaScript: one check of the 600000
    iterations takes it seconds (CouchDB: OpenSSL, ~0.15 s), so the password is checked once."""
    import requests

    dev, paths, config = volume
    put_secret(s3, f"admin:{PASSWORD}".encode())
    assert hostagent(config, "bootstrap").returncode == 0
    value = written_hash(os.path.join(paths["mount_point"], INI))
    server = pouchdb_factory()
    json_only = {"Accept": "application/json"}
    # A cheap second admin (our own hash, few iterations) to authorise the PUT of the real one
    # and to see a wrong password refused: admin party ends with the first admin.
    from hostagent.couchdb_admin import hash_password
    cheap = hash_password("probe-password", iterations=10)
    for name, stored, auth in (("probe", cheap, None), ("admin", value,
                                                       ("probe", "probe-password"))):
        r = requests.put(f"{server.url}/_config/admins/{name}", data=json.dumps(stored),
                         headers=json_only, auth=auth, timeout=30)
        assert r.status_code == 200, r.text
    r = requests.get(f"{server.url}/_config/admins/admin", headers=json_only,
                     auth=("probe", "probe-password"), timeout=30)
    assert r.json() == value, "stored as it is, not hashed again"
    ok = requests.get(f"{server.url}/_session", headers=json_only, auth=("admin", PASSWORD),
                      timeout=120)
    assert ok.status_code == 200, ok.text
    assert ok.json()["userCtx"] == {"name": "admin", "roles": ["_admin"]}
    bad = requests.get(f"{server.url}/_session", headers=json_only,
                       auth=("probe", "not-the-password"), timeout=30)
    assert bad.status_code == 401
    assert server.proc.poll() is None
