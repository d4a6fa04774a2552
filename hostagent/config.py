"""Load /etc/hostagent/hostagent.toml into typed, frozen objects; every key and value is checked here, at load."""

from __future__ import annotations

import collections.abc
import os
import posixpath
import re
import tomllib
import typing
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

from hostagent.aws.ecs_attributes import check_prefix
from hostagent.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/hostagent/hostagent.toml"
CONFIG_ENV = "HOSTAGENT_CONFIG"

VOLUME_ID_RE = re.compile(r"^vol-[0-9a-f]{8}([0-9a-f]{9})?$")
# Bucket names as S3 has allowed them, legacy us-east-1 ones included (capitals, underscores).
S3_URL_RE = re.compile(r"s3://(?P<bucket>[A-Za-z0-9][A-Za-z0-9._-]{1,254})/(?P<key>.+)")
DEVICE_NAME_RE = re.compile(r"/dev/[a-z][a-z0-9]{1,15}")  # what AttachVolume takes: /dev/xvdf, /dev/sdf
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")  # eu-west-1, us-gov-west-1, ap-southeast-5
# What CopySnapshot's KmsKeyId takes: a key id (or mrk- multi-Region key id), alias/NAME, or the
# ARN of a key or an alias.
KMS_KEY_ID = r"(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})"
KMS_ALIAS = r"alias/[A-Za-z0-9/_-]{1,250}"
KMS_KEY_RE = re.compile(
    rf"{KMS_KEY_ID}|{KMS_ALIAS}"
    rf"|arn:aws[a-z-]*:kms:(?P<region>[a-z0-9-]+):[0-9]{{12}}:(?:key/{KMS_KEY_ID}|{KMS_ALIAS})")
LABEL_RE = re.compile(r"[A-Za-z0-9_.+@:][A-Za-z0-9_.+@:-]*")
CLOUDWATCH_NAMESPACE_RE = re.compile(r"[A-Za-z0-9._/#:-]{1,255}")
# http(s)://[userinfo@]host[:port][/path?query#fragment]; host a name or a [v6 literal].
HTTP_URL_RE = re.compile(r"https?://(?:[^@/?#]*@)?(?:\[[0-9A-Fa-f:.]+\]|[^:/?#\[\]@]+)"
                         r"(?::(?P<port>[0-9]{1,5}))?(?:[/?#].*)?")
MAX_ID = 4294967294  # uid/gid: 4294967295 is (uid_t)-1, which chown reads as "leave unchanged"
FS_TYPES = ("ext4",)
# Never a mount point, nor a parent of one: mounting there would hide what the OS needs, and the
# root-disk guard would make it immutable.
SYSTEM_DIRECTORIES = (
    "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media",
    "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var",
    "/usr/local", "/var/lib", "/var/log", "/var/cache", "/var/tmp", "/var/spool",
    "/var/lib/docker", "/var/lib/ecs", "/var/lib/hostagent",
)
# Trees the OS owns from top to bottom: nothing under them is a place for a data volume.
OS_TREES = ("/proc", "/sys", "/dev", "/run", "/boot", "/etc", "/usr", "/bin", "/sbin", "/lib",
            "/lib32", "/lib64", "/libx32")
# Mount options that would defeat the purpose of a persistent data volume, or that we manage.
FORBIDDEN_OPTIONS = ("ro",)


class VolumeConfig(NamedTuple):
    id: str = ""
    tags: Mapping[str, str] = MappingProxyType({})
    device: str = ""
    attach: bool = True
    device_name: str = "/dev/xvdf"
    attach_timeout: int = 300  # seconds to wait for the attachment and the block device

    @property
    def uses_aws(self) -> bool:
        """Only `device` set (no id, no tags): the storage flow makes no AWS call at all."""
        return bool(self.id or self.tags)


class FilesystemConfig(NamedTuple):
    type: str = "ext4"
    label: str = "couchdb"
    mount_point: str = "/opt/couchdb"
    options: str = "defaults,noatime,nodev,nosuid,noexec"
    fstab: str = "/etc/fstab"
    min_free_percent: int = 10
    device_timeout: int = 30  # x-systemd.device-timeout in seconds: never block boot forever


class LayoutConfig(NamedTuple):
    directories: tuple[str, ...] = ("data", "etc", "etc/local.d")
    owner: int = 5984
    group: int = 5984
    # What the official image's entrypoint chmods data/ and etc/ to at every container start:
    # anything else is undone by CouchDB's next start. Privacy is the volume's top directory's
    # job (layout.MOUNT_ROOT_MODE), which no container sees.
    mode: str = "0755"

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


class CouchDBConfig(NamedTuple):
    url: str = "http://localhost.localdomain:5984"
    timeout: int = 300
    admin_secret: str = ""  # s3://bucket/key holding NAME:PASSWORD -> etc/local.d/10-hostagent.ini


class SnapshotConfig(NamedTuple):
    keep_last: int = 7
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    freeze: bool = True
    freeze_timeout: int = 60  # the watchdog thaws after this many seconds, whatever happens
    copy_to_region: str = ""
    copy_kms_key: str = ""  # KMS key in copy_to_region for the copies; required if encrypted


class SecretsConfig(NamedTuple):
    source: str = ""
    dest: str = "/etc/grand-central/secrets.env"


class ECSConfig(NamedTuple):
    introspection_url: str = "http://localhost:51678/v1/metadata"
    attribute_prefix: str = "hostagent"


class AgentConfig(NamedTuple):
    interval: int = 30


class MetricsConfig(NamedTuple):
    enabled: bool = False
    namespace: str = "hostagent"


class CapacityConfig(NamedTuple):
    auto_grow: bool = False  # the agent grows the volume itself (ModifyVolume + resize2fs)
    grow_when_free_below: int = 15  # percent free
    grow_by_percent: int = 50  # of the current size, at least +1 GiB
    max_size_gib: int = 1024  # auto-grow never goes past this
    snapshot_before_grow: bool = True


class HostConfig(NamedTuple):
    lock_file: str = "/run/lock/hostagent.lock"
    state_dir: str = "/var/lib/hostagent"


class Config(NamedTuple):
    volume: VolumeConfig = VolumeConfig()
    filesystem: FilesystemConfig = FilesystemConfig()
    layout: LayoutConfig = LayoutConfig()
    couchdb: CouchDBConfig = CouchDBConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    secrets: SecretsConfig = SecretsConfig()
    ecs: ECSConfig = ECSConfig()
    agent: AgentConfig = AgentConfig()
    metrics: MetricsConfig = MetricsConfig()
    capacity: CapacityConfig = CapacityConfig()
    host: HostConfig = HostConfig()
    source: str = "<defaults>"


SECTION_CLASSES = {
    "volume": VolumeConfig,
    "filesystem": FilesystemConfig,
    "layout": LayoutConfig,
    "couchdb": CouchDBConfig,
    "snapshot": SnapshotConfig,
    "secrets": SecretsConfig,
    "ecs": ECSConfig,
    "agent": AgentConfig,
    "metrics": MetricsConfig,
    "capacity": CapacityConfig,
    "host": HostConfig,
}

# What each key means, for docs/configuration.md (python -m hostagent.config_reference renders it
# with the types and defaults above; tests/unit/test_config_reference.py wants one entry per key).
# Plain literals only: this module is on the boot path, and a dict of constants costs nothing.
KEY_DOCS = {
    "volume.id": 'the EBS volume id ("vol-..."); or find the volume by `tags`, or both',
    "volume.tags": "find the volume by these tags, values matched exactly (EC2 would read * and "
                   "? as wildcards); exactly one volume in this AZ must match. The shipped "
                   'user-data sets { Name = "grand-central-persistence" }',
    "volume.device": 'an explicit block device, e.g. "/dev/loop3" or a /dev/disk/by-id/ link; a '
                     "whole disk. Skips detection; with no id and no tags set, no AWS call at all",
    "volume.attach": "attach the volume when it is 'available' in this AZ; false: exit 1 instead",
    "volume.device_name": "the name requested in AttachVolume, like /dev/xvdf (a hint, never "
                          "identity: the disk is matched by its NVMe serial)",
    "volume.attach_timeout": "seconds to wait for the attachment and the block device (at least 1)",
    "filesystem.type": "the filesystem: only ext4 (an existing ext4 is reused, whatever its label)",
    "filesystem.label": "the label mkfs.ext4 gives a blank volume: 1-16 bytes of letters, digits "
                        "and . _ + @ : -, not starting with -",
    "filesystem.mount_point": "where the volume is mounted: an absolute path of its own, never a "
                              "system directory, a parent of one or inside one",
    "filesystem.options": "mount options for the fstab line, comma-separated, no spaces, never "
                          "ro; hostagent always adds nofail and x-systemd.device-timeout",
    "filesystem.fstab": "the fstab file hostagent keeps its one line in (tests point it elsewhere)",
    "filesystem.min_free_percent": "verify-mount's free-space check fails (and the host is "
                                   "degraded) below this percent free; 0-99",
    "filesystem.device_timeout": "x-systemd.device-timeout in seconds: how long boot waits for "
                                 "the disk (at least 1: systemd reads 0 as wait forever)",
    "layout.directories": "directories made on the volume, relative to the mount point (no .., "
                          "never a symlink followed)",
    "layout.owner": "their owner uid: 5984 is CouchDB's in the official image (0-4294967294)",
    "layout.group": "their group gid (0-4294967294)",
    "layout.mode": 'their mode, octal like "0755": permission bits only, the owner must have '
                   "rwx; checked exactly. 0755 is what the official couchdb image's entrypoint "
                   "sets on data/ and etc/ (files 0644) at every container start; the volume's "
                   "top directory (root:root 0700, never seen by a container) keeps them "
                   "private. Set a stricter mode only for an image that does not reset it: "
                   "with the official one the host turns degraded after each CouchDB start",
    "couchdb.url": "CouchDB as seen from the host, for wait-couchdb, check-couchdb and the agent; "
                   "never echoed (it may hold a password); empty: no CouchDB checks",
    "couchdb.timeout": "seconds wait-couchdb waits by default (--timeout overrides)",
    "couchdb.admin_secret": "s3://bucket/key of an object holding NAME:PASSWORD; bootstrap writes "
                            "etc/local.d/10-hostagent.ini with CouchDB's admin, bind_address "
                            "127.0.0.1 and single_node; check-couchdb and the agent authenticate "
                            "with it",
    "snapshot.keep_last": "retention keeps the newest this many snapshots (at least 1)",
    "snapshot.keep_daily": "and the newest of each of this many UTC days (0: none)",
    "snapshot.keep_weekly": "and of each of this many ISO weeks (0: none)",
    "snapshot.keep_monthly": "and of each of this many months (0: none)",
    "snapshot.freeze": "freeze the filesystem around CreateSnapshot; false: crash-consistent "
                       "snapshots (valid for CouchDB's append-only files), said in their tags",
    "snapshot.freeze_timeout": "seconds after which the independent watchdog thaws, whatever "
                               "happens (at least 1)",
    "snapshot.copy_to_region": 'copy completed snapshots to this region too, e.g. "eu-west-1", '
                               "with the same retention there; empty: no copies",
    "snapshot.copy_kms_key": "KMS key (ARN, key id, alias/NAME) in copy_to_region that encrypts "
                             "the copies; required when the volume is encrypted (\"alias/aws/ebs\""
                             " accepts that region's default key)",
    "secrets.source": '"s3://bucket/key" that fetch-secrets downloads with the instance role; '
                      "empty: none",
    "secrets.dest": "where fetch-secrets writes it: atomically, mode 0600, content never shown",
    "ecs.introspection_url": "the ECS agent's introspection endpoint, for this host's container "
                             "instance; empty: no ECS attributes",
    "ecs.attribute_prefix": "prefix of the ECS attributes: hostagent.persistence = ready | "
                            "missing | degraded, hostagent.reason, ...",
    "agent.interval": "seconds between the agent's checks; attributes are put only on change "
                      "(at least 1)",
    "metrics.enabled": "the agent puts CloudWatch metrics every 5 min: DiskUsedPercent, "
                       "SnapshotAgeHours, CouchDBUp",
    "metrics.namespace": "their CloudWatch namespace (not AWS/...)",
    "capacity.auto_grow": "the agent grows the volume itself as it fills up (a `hostagent grow` "
                          "child: snapshot, ModifyVolume, resize2fs online); needs an EBS volume "
                          "(volume.id or volume.tags)",
    "capacity.grow_when_free_below": "auto-grow below this percent free, 1-99 (with auto_grow, "
                                     "at least filesystem.min_free_percent)",
    "capacity.grow_by_percent": "grow by this percent of the current size, at least +1 GiB; at "
                                "most one modification per 6 h (1-1000)",
    "capacity.max_size_gib": "auto-grow never goes past this; at the cap verify-mount fails "
                             "`capacity` (1 up to the largest EBS volume)",
    "capacity.snapshot_before_grow": "auto-grow snapshots the volume first (tagged "
                                     "hostagent:before-grow)",
    "host.lock_file": "the flock that serialises every command that changes things; never "
                      "truncated, refused if it is not hostagent's",
    "host.state_dir": "hostagent's records: what bootstrap mounted last, a format in progress, "
                      "the auto-grow cool-down",
}


def config_path(explicit: str | None = None) -> str:
    """--config wins, then $HOSTAGENT_CONFIG, then the default path."""
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a TOML config file; every problem is a ConfigError naming file and key."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError("config file not found", where=path,
                          hint="pass --config PATH or set HOSTAGENT_CONFIG") from None
    except IsADirectoryError:
        raise ConfigError("config path is a directory, not a file", where=path) from None
    except PermissionError:
        raise ConfigError("config file is not readable (permission denied)", where=path) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("config file is not UTF-8 text", where=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", where=path) from None
    return parse_config(data, source=path)


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate plain TOML data into a frozen Config."""
    sections = {}
    for name, value in data.items():
        if name not in SECTION_CLASSES:
            raise ConfigError(f"unknown section [{name}]", where=source,
                              hint=f"known sections: {', '.join(SECTION_CLASSES)}")
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table", where=source)
        sections[name] = _parse_section(name, SECTION_CLASSES[name], value, source)
    return _check_semantics(Config(**sections, source=source))


def _type_name(tp: Any) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string"}.get(tp, str(tp))


def _parse_section(name: str, cls: type, values: Mapping[str, Any], source: str):
    fields = cls._fields
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        where = f"{source}: {name}.{key}"
        if key not in fields:
            raise ConfigError(f"unknown key {name}.{key}", where=source,
                              hint=f"known keys in [{name}]: {', '.join(fields)}")
        kwargs[key] = _coerce(hints[key], value, where, f"{name}.{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, not {value!r}", where=where)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, not {value!r}", where=where)
        if value < 0:
            raise ConfigError(f"{key} must not be negative, got {value}", where=where)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, not {value!r}", where=where)
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings", where=where)
        return tuple(value)
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{key} must be a table of string values", where=where)
        return MappingProxyType(dict(value))
    raise ConfigError(f"{key}: unsupported type", where=where)  # pragma: no cover


def _normalize_path(path: str) -> str:
    """'..' resolved textually, '//' and a trailing '/' dropped: the form that is checked is the
    form that is used, so '/opt/couchdb/../../etc' is judged (and would be used) as '/etc'."""
    return posixpath.normpath(re.sub("/+", "/", path))


def _has_control_chars(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def is_system_directory(path: str) -> bool:
    """A directory the OS owns: one of them, a parent of one, or inside a tree the OS owns."""
    path = _normalize_path(path)
    if path == "/":
        return True
    if any(d == path or d.startswith(path + "/") for d in SYSTEM_DIRECTORIES):
        return True
    return any(path.startswith(tree + "/") for tree in OS_TREES)


def _is_inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def parse_s3_url(url: str, *, key: str = "secrets.source", where: str | None = None) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key); the one check of an S3 URL's shape."""
    match = S3_URL_RE.fullmatch(url or "")
    if not match or _has_control_chars(url) or match["key"].endswith("/"):
        raise ConfigError(f"{key} {url!r} must name an object: s3://bucket/key", where=where)
    return match["bucket"], match["key"]


def _check_path(key: str, value: str, src: str) -> str:
    if "\0" in value or _has_control_chars(value):
        raise ConfigError(f"{key} {value!r} must not contain NUL or control characters",
                          where=src)
    if not value.startswith("/"):
        raise ConfigError(f"{key} {value!r} must be an absolute path", where=src)
    path = _normalize_path(value)
    if path == "/":
        raise ConfigError(f"{key} {value!r} must be an absolute path other than /", where=src)
    return path


def _check_mount_point(value: str, src: str) -> str:
    mp = _check_path("filesystem.mount_point", value, src)
    # The resolved form too: with /srv -> /etc, '/srv/x' would hide /etc/x.
    resolved = os.path.realpath(mp)
    for candidate in dict.fromkeys((mp, resolved)):
        if is_system_directory(candidate):
            shown = value if candidate == mp else f"{value} (resolves to {candidate})"
            raise ConfigError(
                f"filesystem.mount_point {shown!r} is a system directory, a parent of one or "
                "inside one; mounting the volume there would hide it", where=src,
                hint='use a directory of its own, e.g. "/opt/couchdb" or "/var/lib/couchdb"')
    return mp


def _check_url(key: str, url: str, src: str, *, secret: bool) -> None:
    # A URL may carry user:password@: never echo it when it can.
    shown = "" if secret else f" {url!r}"
    # A regex, not urllib.parse (~3 ms of imports on every command that loads the config).
    match = None if _has_control_chars(url) or " " in url else HTTP_URL_RE.fullmatch(url)
    port = match.group("port") if match else None
    bad = match is None or (port is not None and not 0 < int(port) < 65536)
    if bad:
        raise ConfigError(f"{key}{shown} must be an http:// or https:// URL with a host",
                          where=src)


def _check_semantics(config: Config) -> Config:
    """Every value, at load, before anything changes: the flows and adapters rely on it."""
    src = config.source
    vol, fs, layout, host = config.volume, config.filesystem, config.layout, config.host
    if vol.id and not VOLUME_ID_RE.match(vol.id):
        raise ConfigError(f"volume.id {vol.id!r} is not an EBS volume id (vol-…)", where=src)
    if not (vol.id or vol.tags or vol.device):
        raise ConfigError("no volume configured: set volume.id, volume.tags or volume.device",
                          where=src)
    for name, value in vol.tags.items():
        if not 0 < len(name) <= 128 or not 0 < len(value) <= 256 \
                or _has_control_chars(name + value):
            raise ConfigError(f"volume.tags {name!r} = {value!r}: keys must be 1-128 and values "
                              "1-256 characters, without control characters", where=src)
    device = vol.device
    if device:
        if not device.startswith("/") or not _normalize_path(device).startswith("/dev/"):
            raise ConfigError(f"volume.device {vol.device!r} must be a path under /dev/",
                              where=src)
        device = _check_path("volume.device", device, src)
    if not DEVICE_NAME_RE.fullmatch(vol.device_name):
        raise ConfigError(f"volume.device_name {vol.device_name!r} must look like /dev/xvdf",
                          where=src)
    if fs.type not in FS_TYPES:
        raise ConfigError(f"filesystem.type {fs.type!r} is not supported (only ext4)", where=src)
    if not fs.label or len(fs.label.encode()) > 16:
        raise ConfigError(f"filesystem.label {fs.label!r} must be 1-16 bytes (ext4 limit)",
                          where=src)
    if not LABEL_RE.fullmatch(fs.label):
        # mkfs.ext4 -L "-F…" would read the label as more options, -F (force) among them.
        raise ConfigError(f"filesystem.label {fs.label!r} must be letters, digits and . _ + @ : -, "
                          "not starting with '-'", where=src)
    mount_point = _check_mount_point(fs.mount_point, src)
    fstab = _check_path("filesystem.fstab", fs.fstab, src)
    opts = fs.options.split(",")
    if not fs.options or any(c.isspace() for c in fs.options) or _has_control_chars(fs.options) \
            or not all(opts):
        raise ConfigError(f"filesystem.options {fs.options!r} must be a comma-separated list "
                          "without spaces or empty items", where=src)
    for bad in FORBIDDEN_OPTIONS:
        if bad in opts:
            raise ConfigError(f"filesystem.options must not contain {bad!r}", where=src)
    if fs.device_timeout < 1:
        raise ConfigError("filesystem.device_timeout must be at least 1 second (systemd reads 0 "
                          "as wait forever)", where=src)
    if not 0 <= fs.min_free_percent < 100:
        raise ConfigError("filesystem.min_free_percent must be between 0 and 99", where=src)
    if vol.attach_timeout < 1:
        raise ConfigError("volume.attach_timeout must be at least 1 second", where=src)

    directories = []
    for d in layout.directories:
        parts = d.split("/")
        if not d or _has_control_chars(d) or d.startswith("/") or ".." in parts \
                or _normalize_path("/" + d) == "/":
            raise ConfigError(f"layout.directories entry {d!r} must be a relative path inside "
                              "the mount point (no '..', no control characters)", where=src)
        norm = _normalize_path("/" + d)[1:]
        if norm in directories:
            raise ConfigError(f"layout.directories lists {norm!r} twice", where=src)
        directories.append(norm)
    for key, ident in (("layout.owner", layout.owner), ("layout.group", layout.group)):
        if ident > MAX_ID:
            # (uid_t)-1 is chown's "leave unchanged"; anything larger does not fit a uid_t.
            raise ConfigError(f"{key} {ident} must be between 0 and {MAX_ID}", where=src)
    if not re.fullmatch(r"0?[0-7]{3}", layout.mode):
        raise ConfigError(f"layout.mode {layout.mode!r} must be an octal mode like \"0755\" "
                          "(permission bits only: no setuid, setgid or sticky bit)", where=src)
    if layout.mode_bits & 0o700 != 0o700:
        raise ConfigError(f"layout.mode {layout.mode!r} must give the owner rwx (07xx): CouchDB "
                          "runs as the owner and writes into these directories", where=src)

    if config.couchdb.url:
        _check_url("couchdb.url", config.couchdb.url, src, secret=True)
    if config.ecs.introspection_url:
        _check_url("ecs.introspection_url", config.ecs.introspection_url, src, secret=False)
    check_prefix(config.ecs.attribute_prefix, where=src)
    if config.secrets.source:
        parse_s3_url(config.secrets.source, where=src)
    if config.couchdb.admin_secret:
        parse_s3_url(config.couchdb.admin_secret, key="couchdb.admin_secret", where=src)
        if "etc/local.d" not in directories:
            raise ConfigError("couchdb.admin_secret needs \"etc/local.d\" in layout.directories "
                              "(its ini file goes there)", where=src)
    secrets_dest = _check_path("secrets.dest", config.secrets.dest, src)
    snap = config.snapshot
    if snap.copy_to_region and not REGION_RE.fullmatch(snap.copy_to_region):
        raise ConfigError(f"snapshot.copy_to_region {snap.copy_to_region!r} is not an AWS "
                          "region (like eu-west-1)", where=src)
    if snap.copy_kms_key:
        key_match = KMS_KEY_RE.fullmatch(snap.copy_kms_key)
        if not key_match:
            raise ConfigError(f"snapshot.copy_kms_key {snap.copy_kms_key!r} is not a KMS key: give "
                              "its ARN, its key id, alias/NAME or an alias ARN", where=src)
        if not snap.copy_to_region:
            raise ConfigError("snapshot.copy_kms_key is set but snapshot.copy_to_region is not: "
                              "the key only encrypts cross-region copies", where=src)
        if key_match["region"] and key_match["region"] != snap.copy_to_region:
            raise ConfigError(f"snapshot.copy_kms_key is in {key_match['region']}, but copies go "
                              f"to {snap.copy_to_region}: KMS keys are regional", where=src,
                              hint=f"use a key in {snap.copy_to_region} (a multi-Region key has "
                                   "an ARN per Region)")
    if snap.keep_last < 1:
        raise ConfigError("snapshot.keep_last must be at least 1 (the newest is always kept)",
                          where=src)
    if snap.freeze_timeout < 1:
        raise ConfigError("snapshot.freeze_timeout must be at least 1 second", where=src)
    if config.agent.interval < 1:
        raise ConfigError("agent.interval must be at least 1 second", where=src)
    if not CLOUDWATCH_NAMESPACE_RE.fullmatch(config.metrics.namespace) \
            or config.metrics.namespace.startswith("AWS/"):
        raise ConfigError(f"metrics.namespace {config.metrics.namespace!r} must be 1-255 of "
                          "letters, digits and . - _ / # :, not starting with AWS/", where=src)

    _check_capacity(config)

    lock_file = _check_path("host.lock_file", host.lock_file, src)
    state_dir = _check_path("host.state_dir", host.state_dir, src)
    for key, path in (("host.lock_file", lock_file), ("host.state_dir", state_dir),
                      ("filesystem.fstab", fstab)):
        if _is_inside(path, mount_point):
            raise ConfigError(f"{key} {path!r} is inside filesystem.mount_point {mount_point!r}: "
                              "the mounted volume would hide it", where=src)

    return config._replace(
        volume=vol._replace(device=device),
        filesystem=fs._replace(mount_point=mount_point, fstab=fstab),
        layout=layout._replace(directories=tuple(directories)),
        secrets=config.secrets._replace(dest=secrets_dest),
        host=host._replace(lock_file=lock_file, state_dir=state_dir),
    )


def _check_capacity(config: Config) -> None:
    from hostagent.capacity import MAX_VOLUME_GIB

    cap, src = config.capacity, config.source
    if not 1 <= cap.grow_when_free_below <= 99:
        raise ConfigError("capacity.grow_when_free_below must be between 1 and 99 (percent free)",
                          where=src)
    if not 1 <= cap.grow_by_percent <= 1000:
        raise ConfigError("capacity.grow_by_percent must be between 1 and 1000", where=src)
    if not 1 <= cap.max_size_gib <= MAX_VOLUME_GIB:
        raise ConfigError(f"capacity.max_size_gib must be between 1 and {MAX_VOLUME_GIB} "
                          "(the largest EBS volume)", where=src)
    if not cap.auto_grow:
        return
    if not config.volume.uses_aws:
        raise ConfigError("capacity.auto_grow needs an EBS volume (it calls ModifyVolume): set "
                          "volume.id or volume.tags", where=src)
    if cap.grow_when_free_below < config.filesystem.min_free_percent:
        raise ConfigError(
            f"capacity.grow_when_free_below ({cap.grow_when_free_below}%) is below "
            f"filesystem.min_free_percent ({config.filesystem.min_free_percent}%): the host would "
            "report degraded before auto-grow acts", where=src,
            hint="make grow_when_free_below at least min_free_percent")
