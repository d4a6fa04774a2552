"""couchdb_admin: the NAME:PASSWORD object, our ini file, CouchDB's password hashes, the decision."""

from __future__ import annotations

import hashlib
import re

import pytest

from hostagent import couchdb_admin as ca
from hostagent.config import parse_config
from hostagent.errors import ConfigError, EXIT_USAGE, UsageError

URL = "s3://gc-secrets/couchdb-admin"
PW = "0123456789abcdef0123456789abcdef"


def secret(name="admin", password=PW, url=URL):
    return ca.AdminSecret(url, name, password)


@pytest.mark.parametrize("body,name,password", [
    (b"admin:pw", "admin", "pw"),
    (b"admin:pw\n", "admin", "pw"),
    (b"admin:pw\r\n", "admin", "pw"),
    (b"ops:a:b:c", "ops", "a:b:c"),  # the first ':' splits, as HTTP Basic auth does
])
def test_good_secrets(body, name, password):
    got = ca.parse_admin_secret(body, URL)
    assert (got.name, got.password, got.url) == (name, password, URL)
    assert "<hidden>" in repr(got) and repr(password) not in repr(got)


@pytest.mark.parametrize("body,words", [
    (b"", "empty"), (b"\n", "empty"), (b"adminpw", "no ':'"), (b":pw", "name is empty"),
    (b"admin:", "password is empty"), (b"admin:pw\nother:x", "more than one line"),
    (b"ad min:pw", "name has spaces"), (b"a=b:pw", "name has"), (b"admin:p\tw", "control"),
    (b"admin: pw", "white space"), (b"admin:pw ;x", "' ;'"), (b"admin:-pbkdf2-ab,cd,10", "hash"),
    (b"\xff\xfe:pw", "not UTF-8"), (b"a:" + b"x" * 5000, "bytes"),
])
def test_malformed_secrets_are_exit_2_naming_the_url_never_the_content(body, words):
    with pytest.raises(UsageError) as info:
        ca.parse_admin_secret(body, URL)
    err = info.value
    assert err.exit_code == EXIT_USAGE and err.reason == "bad-admin-secret"
    assert URL in str(err) and words in str(err), str(err)
    tail = body.split(b":", 1)[-1].decode("utf-8", "replace")
    if len(tail) > 3:
        assert tail not in str(err) + (err.hint or "")


SALT = "c0ffee00" * 4  # 16 bytes as hex, like os.urandom(16).hex()


def fixed_ini(secret_, value):
    return (f"; written by hostagent from {secret_.url}; edit the secret, not this file\n"
            "[admins]\n"
            f"{secret_.name} = {value}\n"
            "[chttpd]\n"
            "bind_address = 127.0.0.1\n"
            "[couchdb]\n"
            "single_node = true\n")


def test_rendered_file_is_exactly_the_documented_one_with_a_hash_in_place_of_the_password():
    s = secret()
    key = hashlib.pbkdf2_hmac("sha1", PW.encode(), SALT.encode(), 600_000, 20).hex()
    assert ca.render_admin_ini(s, salt=SALT) == fixed_ini(s, f"-pbkdf2-{key},{SALT},600000")


def admin_value(text: str) -> str:
    (entry,) = [e for e in ca.parse_ini(text) if e.section == "admins"]
    return entry.value


def test_the_rendered_ini_never_holds_the_plaintext_and_its_hash_verifies_independently():
    s = secret()
    text = ca.render_admin_ini(s)
    assert PW not in text and PW.encode().hex() not in text
    value = admin_value(text)
    match = re.fullmatch(r"-pbkdf2-([0-9a-f]{40}),([0-9a-f]{32}),([0-9]+)", value)
    assert match, value  # the SHA-1 form every CouchDB 3.x reads (3.0-3.3: only this one)
    derived, salt, iterations = match.groups()
    assert int(iterations) == ca.HASH_ITERATIONS == 600_000
    # Independently of the verifier: PBKDF2-HMAC-SHA1, the salt's hex text as the salt, 20 bytes.
    assert hashlib.pbkdf2_hmac("sha1", PW.encode(), salt.encode(), int(iterations),
                               20).hex() == derived
    assert ca.verify_password(value, PW) and not ca.verify_password(value, PW + "x")
    again = admin_value(ca.render_admin_ini(s))
    assert again != value and again.split(",")[1] != salt, "a new random salt every time"


def test_the_iteration_count_is_within_what_every_couchdb_3_accepts():
    # chttpd_auth min_iterations defaults to 1, max_iterations to 1000000000 (3.0-3.5).
    assert 1 <= ca.HASH_ITERATIONS <= 1_000_000_000
    assert ca.HASH_ITERATIONS <= ca.MAX_ITERATIONS, "our own verifier must accept our hashes"


def test_hash_password_draws_16_random_bytes_of_salt(monkeypatch):
    drawn = []

    def urandom(n):
        drawn.append(n)
        return bytes(range(n))

    monkeypatch.setattr(ca.os, "urandom", urandom)
    value = ca.hash_password(PW, iterations=10)
    assert drawn == [16] and value.split(",")[1] == bytes(range(16)).hex()


def pbkdf2(prf: str, password: str, salt: str, iterations: int) -> str:
    algorithm = ca.PRFS[prf]
    size = hashlib.new(algorithm).digest_size
    return hashlib.pbkdf2_hmac(algorithm, password.encode(), salt.encode(), iterations,
                               size).hex()


# pouchdb-server 4.2.0 answered this for PUT /_config/admins/admin "right-pw" (measured here).
POUCHDB_HASH = ("-pbkdf2-38571d690a45fb5c82487ad719ad03e267a6052d,"
                "1e41201ea14c13d17419311d1bc12d1551f91031231c3161,10")


def test_verify_a_real_pbkdf2_hash_made_by_a_couchdb_compatible_server():
    assert ca.verify_password(POUCHDB_HASH, "right-pw")
    assert not ca.verify_password(POUCHDB_HASH, "wrong-pw")


@pytest.mark.parametrize("prf", ["sha", "sha224", "sha256", "sha384", "sha512"])
def test_verify_couchdb_34_prf_forms(prf):
    salt = "c1e5c2b3f0a34f36a0f6d1d8f8b9e0aa"
    stored = f"-pbkdf2:{prf}-{pbkdf2(prf, PW, salt, 1000)},{salt},1000"
    assert ca.verify_password(stored, PW)
    assert not ca.verify_password(stored, PW + "x")


def test_verify_legacy_sha1_forms_and_plaintext():
    salt = "7f4a3e05e0cbc6f48a0035e3508eef90"
    legacy = "-hashed-" + hashlib.sha1((PW + salt).encode()).hexdigest() + "," + salt
    assert ca.verify_password(legacy, PW) and not ca.verify_password(legacy, "other")
    sha1 = f"-pbkdf2-{pbkdf2('sha', PW, salt, 10)},{salt},10"
    assert ca.verify_password(sha1, PW)
    assert ca.verify_password(PW, PW) and not ca.verify_password(PW + " ", PW)


@pytest.mark.parametrize("stored", [
    "-pbkdf2-zz,salt,10", "-pbkdf2-ab,salt", "-pbkdf2:md5-ab,salt,10", "-pbkdf2:sha256ab,s,1",
    "-pbkdf2-ab,salt,0", f"-pbkdf2-ab,salt,{ca.MAX_ITERATIONS + 1}", "-hashed-ab",
])
def test_malformed_or_too_costly_hashes_never_verify(stored):
    assert not ca.verify_password(stored, PW)


def test_ini_parsing_follows_couchdb():
    text = "; c\n[admins]\nadmin = pw ; note\nx=y\n[s ]\n[chttpd]\n k = v\n;k2 = v\n"
    got = [(e.section, e.key, e.value, e.line) for e in ca.parse_ini(text)]
    assert got == [("admins", "admin", "pw", 2), ("admins", "x", "y", 3),
                   ("chttpd", "k", "v", 6)]


def test_decide_missing_current_hashed_changed():
    s = secret()
    text = ca.render_admin_ini(s, iterations=1000).encode()
    assert ca.decide_admin_ini("missing", None, s).write
    current = ca.decide_admin_ini("file", text, s)
    assert current.state == "current" and not current.write and not current.drop
    assert current.reason == "up to date"
    # Salted: another render of the same password is other text, and still up to date.
    assert ca.decide_admin_ini("file", ca.render_admin_ini(s, iterations=1000).encode(),
                               s).state == "current"
    # A CouchDB hash of the same password (CouchDB 3.4+ makes -pbkdf2:sha256-) counts too.
    salt = "abcd" * 8
    hashed = fixed_ini(s, f"-pbkdf2:sha256-{pbkdf2('sha256', PW, salt, 100)},{salt},100")
    assert ca.decide_admin_ini("file", hashed.encode(), s).state == "current"
    changed = ca.decide_admin_ini("file", text, secret(password="new-password"))
    assert changed.state == "changed" and changed.write and "new-password" not in changed.reason
    moved = ca.decide_admin_ini("file", text, secret(url="s3://other/key"))
    assert moved.write, "another secret URL: the marker comment says where it came from"
    edited = text + b"[log]\nlevel = debug\n"
    assert ca.decide_admin_ini("file", edited, s).write, "ours: hand edits are put back"


def test_our_file_with_the_plaintext_of_the_current_password_is_rewritten_once():
    # What hostagent wrote before it wrote hashes: the plaintext must leave the volume.
    s = secret()
    old = fixed_ini(s, PW).encode()
    d = ca.decide_admin_ini("file", old, s)
    assert d.state == "changed" and d.write and "plaintext" in d.reason and PW not in d.reason
    assert ca.decide_admin_ini("file", ca.render_admin_ini(s, iterations=1000).encode(),
                               s).state == "current"


def meta(mode, uid=5984, gid=5984):
    return ca.FileMeta(ino=12, mode=mode, uid=uid, gid=gid)


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640, 0o400, 0o444])
def test_modes_without_group_or_other_write_are_fine_0644_of_the_entrypoint_too(mode):
    s = secret()
    text = ca.render_admin_ini(s, iterations=1000).encode()
    d = ca.decide_admin_ini("file", text, s, meta=meta(mode), owner=(5984, 5984))
    assert d.state == "current" and not d.write and d.fix == () and d.warnings == ()
    assert d.reason == "up to date"


@pytest.mark.parametrize("mode,uid,gid,fix,words", [
    (0o666, 5984, 5984, (("chmod", 0o600),), "0666"),
    (0o620, 5984, 5984, (("chmod", 0o600),), "0620"),
    (0o4644, 5984, 5984, (("chmod", 0o600),), "4644"),
    (0o644, 0, 0, (("chown", 5984, 5984),), "0:0"),
    (0o600, 5984, 0, (("chown", 5984, 5984),), "5984:0"),
    (0o646, 1000, 5984, (("chown", 5984, 5984), ("chmod", 0o600)), "1000:5984"),
])
def test_group_or_other_writable_or_another_owner_is_fixed_in_place(mode, uid, gid, fix, words):
    s = secret()
    text = ca.render_admin_ini(s, iterations=1000).encode()
    d = ca.decide_admin_ini("file", text, s, meta=meta(mode, uid, gid), owner=(5984, 5984))
    assert d.state == "current" and not d.write and d.fix == fix
    assert words in d.reason and d.reason.startswith("up to date; ")
    # A file that is rewritten anyway gets mode and owner from the write: nothing else to fix.
    w = ca.decide_admin_ini("file", text, secret(password="new-password"),
                            meta=meta(mode, uid, gid), owner=(5984, 5984))
    assert w.write and w.fix == ()


def test_no_meta_or_no_owner_means_no_fix():
    s = secret()
    text = ca.render_admin_ini(s, iterations=1000).encode()
    assert ca.decide_admin_ini("file", text, s, meta=meta(0o666)).fix == ()
    assert ca.decide_admin_ini("file", text, s, owner=(5984, 5984)).fix == ()


def test_later_files_against_our_hashed_file_same_password_kept_old_password_dropped():
    s = secret()
    ours = ca.render_admin_ini(s, iterations=1000).encode()
    salt = "5a17" * 8
    same = f"-pbkdf2:sha256-{pbkdf2('sha256', PW, salt, 600)},{salt},600"
    old_sha1 = ca.hash_password("the-old-password", iterations=1000)
    old_sha256 = f"-pbkdf2:sha256-{pbkdf2('sha256', 'the-old-password', salt, 600)},{salt},600"
    docker = f"[couchdb]\nuuid = u\n[admins]\nadmin = {same}\n".encode()
    d = ca.decide_admin_ini("file", ours, s, (("docker.ini", docker),))
    assert d.state == "current" and d.drop == () and d.warnings == ()
    for old in (old_sha1, old_sha256):
        stale = docker.replace(same.encode(), old.encode())
        d = ca.decide_admin_ini("file", ours, s, (("docker.ini", stale),))
        assert d.state == "current" and d.drop == (("docker.ini", (3,)),), old
        assert "docker.ini" in d.reason and "the-old-password" not in d.reason
    # Rotation: our file still holds the old password's hash; docker.ini CouchDB's hash of it.
    rotated = secret(password="the-new-password")
    ours_old = ca.render_admin_ini(secret(password="the-old-password"), iterations=1000).encode()
    d = ca.decide_admin_ini("file", ours_old, rotated,
                            (("docker.ini", docker.replace(same.encode(), old_sha256.encode())),))
    assert d.write and d.state == "changed" and d.drop == (("docker.ini", (3,)),)
    # ... and a hash of the new password there (set through _config by hand) is kept.
    new_there = ca.hash_password("the-new-password", iterations=1000)
    d = ca.decide_admin_ini("file", ours_old, rotated,
                            (("docker.ini", docker.replace(same.encode(), new_there.encode())),))
    assert d.write and d.drop == ()


@pytest.mark.parametrize("kind,data", [("file", b"[admins]\nadmin = mine\n"),
                                       ("file", b""), ("symlink", None), ("other", None)])
def test_foreign_files_are_left_alone_with_a_message_naming_the_file(kind, data):
    d = ca.decide_admin_ini(kind, data, secret())
    assert not d.write and not d.drop and d.state in ("foreign", "not-a-file")
    assert "etc/local.d/10-hostagent.ini" in d.reason and d.reason.startswith("left alone")


def test_a_later_stale_hash_of_our_name_is_dropped_a_current_one_kept_plaintext_warned():
    s = secret()
    ours = ca.render_admin_ini(s).encode()
    salt = "ef" * 16
    current = f"-pbkdf2:sha256-{pbkdf2('sha256', PW, salt, 50)},{salt},50"
    old = f"-pbkdf2:sha256-{pbkdf2('sha256', 'old-pw', salt, 50)},{salt},50"
    docker = f"[chttpd]\nport = 5984\n\n[admins]\nadmin = {old}\n".encode()
    d = ca.decide_admin_ini("file", ours, s, (("docker.ini", docker),))
    assert d.state == "current" and d.drop == (("docker.ini", (4,)),)
    assert ca.without_lines(docker, (4,)) == b"[chttpd]\nport = 5984\n\n[admins]\n"
    ok = docker.replace(old.encode(), current.encode())
    assert ca.decide_admin_ini("file", ours, s, (("docker.ini", ok),)).drop == ()
    by_hand = b"[admins]\nadmin = typed-by-hand\n"
    d = ca.decide_admin_ini("file", ours, s, (("zz.ini", by_hand),))
    assert d.drop == () and "zz.ini" in d.warnings[0] and "typed-by-hand" not in d.reason
    # A renamed admin: the old name's hash after ours would keep the old login alive.
    renamed = ca.decide_admin_ini("file", ours, secret(name="ops"),
                                  (("docker.ini", docker.replace(old.encode(), current.encode())),))
    assert renamed.write and renamed.drop == (("docker.ini", (4,)),)


def config_with(**couchdb):
    return parse_config({"volume": {"device": "/dev/loop9"}, "couchdb": couchdb})


def test_config_key_defaults_empty_and_is_validated_like_secrets_source():
    assert config_with().couchdb.admin_secret == ""
    assert config_with(admin_secret=URL).couchdb.admin_secret == URL
    for bad in ("gc-secrets/key", "s3://bucket/", "s3://b", "https://bucket/key"):
        with pytest.raises(ConfigError) as info:
            config_with(admin_secret=bad)
        assert "couchdb.admin_secret" in str(info.value) and info.value.exit_code == EXIT_USAGE


def test_admin_secret_needs_local_d_in_the_layout():
    with pytest.raises(ConfigError, match="etc/local.d"):
        parse_config({"volume": {"device": "/dev/loop9"}, "couchdb": {"admin_secret": URL},
                      "layout": {"directories": ["data"]}})


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_agent_cache_fetches_once_and_again_only_after_a_refusal_with_backoff():
    clock = Clock()
    creds = ca.AdminCredentials(config_with(admin_secret=URL), interval=30, clock=clock)
    assert creds.request(None) == {"url": URL} and creds.auth is None
    creds.apply({"url": URL}, {"ok": True, "name": "admin", "password": PW})
    assert creds.auth == ("admin", PW)
    for _ in range(10):  # held in memory: no fetch per interval
        clock.now += 30
        creds.accepted()
        assert creds.request(None) is None
    creds.refused()
    assert creds.request(None) is None, "backs off before fetching again"
    clock.now += 30
    assert creds.request(None) == {"url": URL}
    creds.apply({"url": URL}, {"ok": True, "name": "admin", "password": PW})  # same secret
    creds.refused()
    clock.now += 30
    assert creds.request(None) is None, "a second refusal in a row waits twice as long"
    clock.now += 30
    assert creds.request(None) == {"url": URL}
    creds.apply({"url": URL}, {"ok": False, "error": "s3:GetObject failed: cannot reach AWS"})
    assert creds.auth == ("admin", PW), "a failed fetch keeps the credentials held"
    assert creds.request(None) is None
    assert PW not in repr(creds.secret)
