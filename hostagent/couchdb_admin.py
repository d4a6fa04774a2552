"""CouchDB's admin from [couchdb] admin_secret: parse the NAME:PASSWORD object, render our
etc/local.d/10-hostagent.ini, and decide whether the file on the volume is ours and up to date.

Pure functions over plain data (bytes in, decisions out); the volume is read and written by
adapters.couchdb_ini, the object fetched by aws.s3. The password is never put into a message,
a log line, a Step or a repr -- nor into the file: the file holds CouchDB's password hash.

Why a hash, made here (apache/couchdb src/config: config.erl, config_writer.erl;
src/couch: couch_passwords.erl, couch_auth_cache.erl, couch_httpd_auth.erl): CouchDB reads
default.ini, default.d/*.ini, local.ini, local.d/*.ini in that order, a later file overriding an
earlier one key by key. At start it hashes every *plaintext* admin password and persists the
hash to the *last* ini file of that chain -- in the official Docker image local.d/docker.ini,
which the entrypoint touches on every start -- so a plaintext written by us would stay in our
file for good, and in every EBS snapshot of the volume. A value that is already a hash is left
as it is. So we write the hash: `-pbkdf2-DERIVED,SALT,ITERATIONS`, PBKDF2-HMAC-SHA1 with a
20-byte key, the salt 16 random bytes as 32 hex characters used as text (as CouchDB's
couch_uuids:random() salts are). That is the one PBKDF2 form every CouchDB 3 reads:
couch_auth_cache:get_admin/1 of 3.0-3.3 knows only `-hashed-` and `-pbkdf2-`; 3.4+ also knows
`-pbkdf2:PRF-` and reads `-pbkdf2-` as PRF sha. HASH_ITERATIONS below says why 600000.

The file stays recognised as ours by its marker comment (first line), and "up to date" means
its [admins] NAME value verifies against the secret's password (PBKDF2 again, any form CouchDB
writes): the hash is salted, so its text differs on every render and is never compared. The
plaintext that hostagent wrote before it wrote hashes is not up to date: it is replaced once.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
from typing import NamedTuple

from hostagent.errors import Reason, UsageError

INI_DIR = "etc/local.d"
INI_NAME = "10-hostagent.ini"
INI_MODE = 0o600
# Mode bits that make our file wrong: group/other write, set-id and sticky. 0644 is fine: the
# official entrypoint sets it on every file under /opt/couchdb/etc at each container start (as
# root), the file holds a hash, and on the host it sits under the volume's private top
# directory (root:root 0700).
BAD_MODE_BITS = 0o7022
# PBKDF2 iterations of the hash we write. CouchDB 3.4.2+ hashes admins with 600000 itself
# (chttpd_auth iterations, "default pbkdf2 rounds to 600,000 (OWASP)", apache/couchdb#5247;
# earlier 3.4 code: 50000; before 3.4 far less). Every 3.x accepts it: chttpd_auth min_iterations
# defaults to 1, max_iterations to 1000000000. Cost, measured (hashlib, OpenSSL 3): ~150 ms
# for one hash or one check on a 2-vCPU host -- bootstrap pays it when it writes and when it
# checks the file. CouchDB 3.0-3.3 pay it on every Basic-auth request (no credentials cache;
# 3.4+ cache after the first), the agent sends one per interval.
HASH_ITERATIONS = 600_000
HASH_SALT_BYTES = 16
# First line of every file we write: how a file is recognised as ours (it travels with the
# volume, which a state record on the root disk of one instance would not).
MARKER = "; written by hostagent from "
MARKER_TAIL = "; edit the secret, not this file"
MAX_SECRET_BYTES = 4096  # one line NAME:PASSWORD, not a file of secrets
MAX_OTHER_INI_BYTES = 1 << 20
# PBKDF2 costs grow with CouchDB's settings (3.4+: sha256, many iterations); past this a stored
# hash is not verified here (read as "not the same password": the file is written again).
MAX_ITERATIONS = 5_000_000
# -pbkdf2:<prf>-: the PRFs couch_passwords:get_unhashed_admins/0 knows; "sha" is SHA-1.
PRFS = {"sha": "sha1", "sha224": "sha224", "sha256": "sha256", "sha384": "sha384",
        "sha512": "sha512"}
HASH_PREFIXES = ("-hashed-", "-pbkdf2-", "-pbkdf2:")
BAD_NAME_CHARS = re.compile(r"[\s=;\[\]:]")
REASON_BAD_SECRET = Reason.BAD_ADMIN_SECRET


class AdminSecret(NamedTuple):
    url: str
    name: str
    password: str

    def __repr__(self) -> str:  # never the password, whatever prints it
        return f"AdminSecret({self.url!r}, name={self.name!r}, password=<hidden>)"


class IniEntry(NamedTuple):
    section: str
    key: str
    value: str
    line: int  # 0-based line number in the file


class FileMeta(NamedTuple):
    """What fstat says of our file (never followed): checked and fixed in place."""

    ino: int
    mode: int  # S_IMODE
    uid: int
    gid: int


class AdminIniDecision(NamedTuple):
    state: str  # missing | current | changed | foreign | not-a-file
    write: bool  # (re)write our file
    reason: str  # for the plan's WHY column; never the password
    drop: tuple = ()  # ((file name, (line numbers…)), …) stale admin lines in later files
    warnings: tuple = ()  # lines for the operator (a later file overrides ours by hand)
    fix: tuple = ()  # (("chown", uid, gid),) and/or (("chmod", mode),): our file, in place


def _secret_error(url: str, problem: str) -> UsageError:
    return UsageError(
        f"couchdb.admin_secret {url} does not hold one line NAME:PASSWORD: {problem}; nothing "
        "was changed", where=url, reason=REASON_BAD_SECRET,
        hint=f"printf 'admin:%s' \"$(openssl rand -hex 24)\" | aws s3 cp - {url}")


def parse_admin_secret(data: bytes, url: str) -> AdminSecret:
    """PURE: the object's bytes -> AdminSecret, or a UsageError (exit 2) that names the URL and
    the problem, never the content."""
    if len(data) > MAX_SECRET_BYTES:
        raise _secret_error(url, f"it is {len(data)} bytes (at most {MAX_SECRET_BYTES})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _secret_error(url, "it is not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise _secret_error(url, "it is empty")
    if "\n" in text or "\r" in text:
        raise _secret_error(url, "it has more than one line")
    name, sep, password = text.partition(":")
    if not sep:
        raise _secret_error(url, "there is no ':' between name and password")
    if not name:
        raise _secret_error(url, "the name is empty")
    if _has_control(name) or BAD_NAME_CHARS.search(name):
        raise _secret_error(url, "the name has spaces, control characters or one of = ; [ ] "
                                 "(CouchDB's ini could not hold it)")
    if not password:
        raise _secret_error(url, "the password is empty")
    if _has_control(password):
        raise _secret_error(url, "the password has control characters")
    # CouchDB's ini parser trims values and cuts them at " ;" or "\t;" (an inline comment), and
    # reads a value that starts like a hash as a hash: any of these would lock us out.
    if password != password.strip():
        raise _secret_error(url, "the password starts or ends with white space (CouchDB's ini "
                                 "would trim it)")
    if " ;" in password or "\t;" in password:
        raise _secret_error(url, "the password contains ' ;' (an ini comment for CouchDB)")
    if password.startswith(HASH_PREFIXES):
        raise _secret_error(url, "the password starts like a CouchDB hash (-hashed-, -pbkdf2)")
    return AdminSecret(url, name, password)


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def marker_line(url: str) -> str:
    return f"{MARKER}{url}{MARKER_TAIL}"


def hash_password(password: str, salt: str | None = None,
                  iterations: int = HASH_ITERATIONS) -> str:
    """CouchDB's `-pbkdf2-DERIVED,SALT,ITERATIONS`: PBKDF2-HMAC-SHA1, a 20-byte key in hex, the
    salt 16 random bytes (os.urandom) as hex, used as its text -- what couch_passwords:pbkdf2/3
    computes when it checks the password."""
    if salt is None:
        salt = os.urandom(HASH_SALT_BYTES).hex()
    key = hashlib.pbkdf2_hmac("sha1", password.encode(), salt.encode(), iterations, dklen=20)
    return f"-pbkdf2-{key.hex()},{salt},{iterations}"


def _ini_text(url: str, name: str, value: str) -> str:
    return (f"{marker_line(url)}\n"
            "[admins]\n"
            f"{name} = {value}\n"
            "[chttpd]\n"
            "bind_address = 127.0.0.1\n"
            "[couchdb]\n"
            "single_node = true\n")


def render_admin_ini(secret: AdminSecret, salt: str | None = None,
                     iterations: int = HASH_ITERATIONS) -> str:
    """The whole file, the password as a salted hash (a new random salt unless one is given:
    pure only then)."""
    return _ini_text(secret.url, secret.name, hash_password(secret.password, salt, iterations))


def parse_ini(text: str) -> list[IniEntry]:
    """PURE: section/key/value entries as CouchDB's config:parse_ini/1 reads them (comments at
    line start or after ' ;'/'\\t;' dropped, values trimmed, 'k = v' split at the first ' = ')."""
    entries = []
    section = ""
    for number, raw in enumerate(re.split(r"\r\n|\n|\r|\x1a", text)):
        line = raw.strip()
        if line.startswith(";"):
            continue
        line = re.split(r" ;|\t;", line)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            inner, sep, rest = line[1:].partition("]")
            if sep and inner and not rest:
                section = inner
            continue
        if not section:
            continue
        key, sep, value = line.partition(" = ")
        if not sep:
            key, sep, value = line.partition("=")
            if not sep or not key:
                continue
        entries.append(IniEntry(section, key.strip(), value.strip(), number))
    return entries


def is_hash(value: str) -> bool:
    return value.startswith(HASH_PREFIXES)


def verify_password(stored: str, password: str) -> bool:
    """PURE: does CouchDB's stored admin value stand for this password? The plaintext itself,
    `-pbkdf2-HEX,SALT,ITERATIONS` (PBKDF2-HMAC-SHA1, 20 bytes), `-pbkdf2:PRF-HEX,SALT,ITERATIONS`
    (CouchDB 3.4+: sha, sha224, sha256, sha384, sha512; the key as long as the digest), or the
    legacy `-hashed-HEX,SALT` (SHA-1 of password + salt). The salt is used as the text it is."""
    if not is_hash(stored):
        return hmac.compare_digest(stored.encode(), password.encode())
    return _verify_hash(stored, password)


# One bootstrap checks the same stored hash in its plan and again right before it acts (each
# check a full PBKDF2): remember the answer for the life of the (short) process.
@functools.lru_cache(maxsize=16)
def _verify_hash(stored: str, password: str) -> bool:
    if stored.startswith("-hashed-"):
        parts = stored[len("-hashed-"):].split(",")
        if len(parts) != 2:
            return False
        digest = hashlib.sha1(password.encode() + parts[1].encode()).hexdigest()
        return hmac.compare_digest(digest, parts[0].lower())
    if stored.startswith("-pbkdf2-"):
        prf, rest = "sha", stored[len("-pbkdf2-"):]
    else:
        prf, sep, rest = stored[len("-pbkdf2:"):].partition("-")
        if not sep:
            return False
    algorithm = PRFS.get(prf)
    parts = rest.split(",")
    if algorithm is None or len(parts) != 3 or not parts[2].isdigit():
        return False
    derived, salt, iterations = parts[0].lower(), parts[1], int(parts[2])
    if not 0 < iterations <= MAX_ITERATIONS or not re.fullmatch(r"[0-9a-f]+", derived):
        return False
    size = hashlib.new(algorithm).digest_size
    key = hashlib.pbkdf2_hmac(algorithm, password.encode(), salt.encode(), iterations,
                              dklen=size)
    return hmac.compare_digest(key.hex(), derived)


def is_ours(text: str) -> bool:
    return text.startswith(MARKER)


def _admins(entries, names=None) -> list[IniEntry]:
    return [e for e in entries if e.section == "admins" and (names is None or e.key in names)]


def is_current(text: str, secret: AdminSecret) -> bool:
    """PURE: our file says what we would write now, its admin a *hash* that verifies against the
    password (ours, salted: never compared as text; or CouchDB's, any form). The plaintext
    (what hostagent wrote before it wrote hashes) is not current: it must leave the volume."""
    return _not_current(text, secret) is None


def _not_current(text: str, secret: AdminSecret) -> str | None:
    """Why our file is not what we would write now (never the password), or None."""
    if text.split("\n", 1)[0].rstrip("\r") != marker_line(secret.url):
        return f"the secret ({secret.url}) changed"
    have = parse_ini(text)
    want = parse_ini(_ini_text(secret.url, secret.name, "-pbkdf2-"))
    if len(have) != len(want):
        return f"the secret ({secret.url}) changed"
    for got, expected in zip(have, want):
        if (got.section, got.key) != (expected.section, expected.key):
            return f"the secret ({secret.url}) changed"
        if (got.section, got.key) == ("admins", secret.name):
            if not verify_password(got.value, secret.password):
                return f"the secret ({secret.url}) changed"
            if not is_hash(got.value):
                return "it holds the password in plaintext: a hash replaces it"
        elif got.value != expected.value:
            return f"the secret ({secret.url}) changed"
    return None


def mode_problem(meta: FileMeta, owner: tuple) -> tuple[tuple, str]:
    """PURE: (the in-place fixes, why) for our file's owner and mode; ((), "") when fine.
    Fine: owner:group as configured, no group/other write, no set-id or sticky bit (so 0600 as
    written and 0644 as the official entrypoint leaves it are both fine)."""
    fix, why = [], []
    if (meta.uid, meta.gid) != tuple(owner):
        fix.append(("chown", owner[0], owner[1]))
        why.append(f"owner {meta.uid}:{meta.gid}, not {owner[0]}:{owner[1]}: chown")
    if meta.mode & BAD_MODE_BITS:
        fix.append(("chmod", INI_MODE))
        why.append(f"mode {meta.mode:04o} (group/other-writable or set-id): chmod {INI_MODE:04o}")
    return tuple(fix), "; ".join(why)


def decide_admin_ini(kind: str, existing: bytes | None, secret: AdminSecret,
                     later: tuple = (), *, meta: FileMeta | None = None,
                     owner: tuple | None = None) -> AdminIniDecision:
    """PURE: what to do about etc/local.d/10-hostagent.ini.

    kind: "file" | "missing" | "symlink" | "other" (what is at that name, never followed).
    later: ((name, bytes), …) of the local.d/*.ini files CouchDB reads after ours: an
    [admins] entry there for our name overrides ours. A hash there of the current password is
    kept (CouchDB's own, e.g. persisted to docker.ini); a hash of another password (of a
    password we wrote before) would keep the old password alive after a change of the secret:
    it is dropped. A plaintext there was written by a person: left alone, and said.
    meta/owner: our file's fstat and (layout.owner, layout.group): an up-to-date file with
    another owner, or group/other-writable, is fixed in place (`fix`); 0644 is fine.
    """
    path = f"{INI_DIR}/{INI_NAME}"
    text = None
    if existing is not None:
        text = existing.decode("utf-8", "replace")
    old_names: set[str] = set()
    if kind == "missing":
        state, write, reason = "missing", True, "missing"
    elif kind != "file":
        return AdminIniDecision("not-a-file", False,
                                f"left alone: {path} is a {kind}, not a file (never followed); "
                                "move it aside to let hostagent write CouchDB's admin")
    elif not is_ours(text):
        return AdminIniDecision("foreign", False,
                                f"left alone: {path} was not written by hostagent (its first "
                                f"line is not '{MARKER.strip()} …'); CouchDB uses what it says. "
                                "Move it aside to let hostagent manage it")
    elif (why := _not_current(text, secret)) is None:
        state, write, reason = "current", False, "up to date"
    else:
        old_names = {e.key for e in _admins(parse_ini(text))}
        state, write, reason = "changed", True, why
    fix: tuple = ()
    if state == "current" and meta is not None and owner is not None:
        fix, why = mode_problem(meta, owner)
        if fix:
            reason = f"{reason}; {why}"
    drop, warnings = [], []
    for name, data in later:
        stale, by_hand = [], []
        for entry in _admins(parse_ini(data.decode("utf-8", "replace")),
                             {secret.name} | old_names):
            if entry.key == secret.name and verify_password(entry.value, secret.password):
                continue  # CouchDB's hash of the current password: the normal case
            (stale if is_hash(entry.value) else by_hand).append(entry)
        if stale:
            drop.append((name, tuple(e.line for e in stale)))
        for entry in by_hand:
            warnings.append(f"{INI_DIR}/{name} sets [admins] {entry.key} by hand after "
                            f"{INI_NAME}: it overrides the admin from {secret.url}")
    if drop:
        names = ", ".join(f"{INI_DIR}/{n}" for n, _ in drop)
        what = "stale hash(es) of an earlier admin password in " + names
        reason = f"{reason}; drop {what} (CouchDB reads them after {INI_NAME})" \
            if write or fix else f"drop {what} (CouchDB reads them after {INI_NAME})"
    if warnings:
        reason += "; warning: " + "; ".join(warnings)
    return AdminIniDecision(state, write, reason, tuple(drop), tuple(warnings), fix)


def without_lines(data: bytes, lines) -> bytes:
    """PURE: the file with these (0-based) lines removed, every other byte kept."""
    drop = set(lines)
    parts = re.split(rb"(\r\n|\n|\r|\x1a)", data)  # the line breaks parse_ini splits at
    kept = []
    for number in range(0, len(parts), 2):
        if number // 2 not in drop:
            kept.append(parts[number] + (parts[number + 1] if number + 1 < len(parts) else b""))
    return b"".join(kept)


FETCH_MAX_BYTES = 64 * 1024  # read a too-large object whole, so it is refused as malformed


def fetch_admin_secret(s3, url: str) -> AdminSecret:
    """GetObject with the instance role, then parse_admin_secret. S3 errors (missing, or not
    allowed; unreachable) are OperationError (exit 1); a malformed object is UsageError (exit 2)."""
    from hostagent.aws.s3 import get_object_bytes
    from hostagent.config import parse_s3_url

    bucket, key = parse_s3_url(url, key="couchdb.admin_secret")
    data = get_object_bytes(s3, bucket, key, max_bytes=FETCH_MAX_BYTES,
                            what="CouchDB admin secret", setting="[couchdb] admin_secret",
                            statement="statement FetchCouchDBAdminSecret in ")
    try:
        return parse_admin_secret(data, url)
    finally:
        del data


def try_fetch_admin_secret(aws, url: str):
    """(AdminSecret, None), or (None, the OperationError) when S3 says missing or not allowed,
    or cannot be reached; a malformed object raises (UsageError, exit 2)."""
    from hostagent.aws.errors import map_aws_error
    from hostagent.errors import OperationError

    try:
        return fetch_admin_secret(aws.s3, url), None
    except UsageError:
        raise
    except OperationError as exc:
        return None, exc
    except Exception as exc:  # botocore outside a call: no region, a bad endpoint setting
        mapped = map_aws_error(exc, "s3:GetObject", where=url)
        if mapped is None:
            raise
        return None, mapped


REFETCH_MAX = 300.0  # a refused password is fetched again after 1, 2, 4… intervals, up to this


class AdminCredentials:
    """The agent's copy of the admin secret, held in memory: fetched once through the AWS
    worker (boto3 stays out of the agent), then again only when CouchDB refuses it (the secret
    was rotated), with backoff: never every interval, never logged."""

    name = "couchdb_admin"

    def __init__(self, config, *, interval: float, clock):
        from hostagent.backoff import Backoff

        self.url = config.couchdb.admin_secret
        self.enabled = bool(self.url)
        self.secret: AdminSecret | None = None
        self.wanted = self.enabled
        self.fetch = Backoff(interval, REFETCH_MAX, clock)  # S3 failures
        self.refetch = Backoff(interval, REFETCH_MAX, clock)  # CouchDB refusing what we hold
        self.fetches = 0

    @property
    def error(self) -> str | None:
        return self.fetch.error

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.secret.name, self.secret.password) if self.secret else None

    def request(self, view) -> dict | None:
        if not (self.wanted and self.fetch.is_due() and self.refetch.is_due()):
            return None
        return {"url": self.url}

    def apply(self, part: dict, answer: dict) -> None:
        from hostagent.log import get_logger

        log = get_logger("hostagent.agent")
        self.fetches += 1
        if not answer.get("ok"):
            error = answer.get("error") or "unknown error"
            if self.fetch.failed(error):
                log.info("couchdb admin secret: fetch failed (will retry): %s", error)
            return
        secret = AdminSecret(self.url, str(answer.get("name")), str(answer.get("password")))
        if secret != self.secret:
            log.info("couchdb admin secret: %s from %s", secret.name, self.url)
        self.secret, self.wanted = secret, False
        self.fetch.succeeded()

    def refused(self) -> None:
        """CouchDB refused the credentials held: fetch the secret again, backing off."""
        if not self.wanted:
            self.wanted = True
            self.refetch.failed("refused")

    def accepted(self) -> None:
        if self.refetch.failures:
            self.refetch.succeeded()
