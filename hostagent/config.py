"""Load /etc/hostagent/hostagent.toml into typed, frozen objects; unknown keys and bad types are errors."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
import collections.abc
import typing
from typing import Any, Mapping

from hostagent.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/hostagent/hostagent.toml"
CONFIG_ENV = "HOSTAGENT_CONFIG"

VOLUME_ID_RE = re.compile(r"^vol-[0-9a-f]{8}([0-9a-f]{9})?$")
S3_URL_RE = re.compile(r"^s3://[^/]+/.+")
FS_TYPES = ("ext4",)
# Mount options that would defeat the purpose of a persistent data volume, or that we manage.
FORBIDDEN_OPTIONS = ("ro",)


@dataclass(frozen=True)
class VolumeConfig:
    id: str = ""
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    device: str = ""
    attach: bool = True
    device_name: str = "/dev/xvdf"
    attach_timeout: int = 300  # seconds to wait for the attachment and the block device

    @property
    def uses_aws(self) -> bool:
        """Only `device` set (no id, no tags): the storage flow makes no AWS call at all."""
        return bool(self.id or self.tags)


@dataclass(frozen=True)
class FilesystemConfig:
    type: str = "ext4"
    label: str = "couchdb"
    mount_point: str = "/opt/couchdb"
    options: str = "defaults,noatime,nodev,nosuid,noexec"
    fstab: str = "/etc/fstab"
    min_free_percent: int = 10
    device_timeout: int = 30  # x-systemd.device-timeout in seconds: never block boot forever


@dataclass(frozen=True)
class LayoutConfig:
    directories: tuple[str, ...] = ("data", "etc", "etc/local.d")
    owner: int = 5984
    group: int = 5984
    mode: str = "0750"

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


@dataclass(frozen=True)
class CouchDBConfig:
    url: str = "http://localhost.localdomain:5984"
    timeout: int = 300


@dataclass(frozen=True)
class SnapshotConfig:
    keep_last: int = 7
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    freeze: bool = True
    freeze_timeout: int = 60  # the watchdog thaws after this many seconds, whatever happens
    copy_to_region: str = ""


@dataclass(frozen=True)
class SecretsConfig:
    source: str = ""
    dest: str = "/etc/grand-central/secrets.env"


@dataclass(frozen=True)
class ECSConfig:
    introspection_url: str = "http://localhost:51678/v1/metadata"
    attribute_prefix: str = "hostagent"


@dataclass(frozen=True)
class AgentConfig:
    interval: int = 30


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False
    namespace: str = "hostagent"


@dataclass(frozen=True)
class HostConfig:
    lock_file: str = "/run/lock/hostagent.lock"
    state_dir: str = "/var/lib/hostagent"


@dataclass(frozen=True)
class Config:
    volume: VolumeConfig = field(default_factory=VolumeConfig)
    filesystem: FilesystemConfig = field(default_factory=FilesystemConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    couchdb: CouchDBConfig = field(default_factory=CouchDBConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    ecs: ECSConfig = field(default_factory=ECSConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    host: HostConfig = field(default_factory=HostConfig)
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
    "host": HostConfig,
}


def config_path(explicit: str | None = None) -> str:
    """--config wins, then $HOSTAGENT_CONFIG, then the default path."""
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a TOML config file; every problem is a ConfigError naming file and key."""
    path = str(path)
    try:
        raw = Path(path).read_bytes()
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
    config = Config(**sections, source=source)
    _check_semantics(config)
    return config


def _type_name(tp: Any) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string"}.get(tp, str(tp))


def _parse_section(name: str, cls: type, values: Mapping[str, Any], source: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
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


def _check_semantics(config: Config) -> None:
    src = config.source
    vol, fs, layout = config.volume, config.filesystem, config.layout
    if vol.id and not VOLUME_ID_RE.match(vol.id):
        raise ConfigError(f"volume.id {vol.id!r} is not an EBS volume id (vol-…)", where=src)
    if not (vol.id or vol.tags or vol.device):
        raise ConfigError("no volume configured: set volume.id, volume.tags or volume.device",
                          where=src)
    if vol.device and not vol.device.startswith("/dev/"):
        raise ConfigError(f"volume.device {vol.device!r} must be a path under /dev/", where=src)
    if not vol.device_name.startswith("/dev/"):
        raise ConfigError(f"volume.device_name {vol.device_name!r} must look like /dev/xvdf",
                          where=src)
    if fs.type not in FS_TYPES:
        raise ConfigError(f"filesystem.type {fs.type!r} is not supported (only ext4)", where=src)
    if not fs.label or len(fs.label.encode()) > 16:
        raise ConfigError(f"filesystem.label {fs.label!r} must be 1-16 bytes (ext4 limit)",
                          where=src)
    if not os.path.isabs(fs.mount_point) or os.path.normpath(fs.mount_point) == "/":
        raise ConfigError(f"filesystem.mount_point {fs.mount_point!r} must be an absolute path "
                          "other than /", where=src)
    if not os.path.isabs(fs.fstab):
        raise ConfigError(f"filesystem.fstab {fs.fstab!r} must be an absolute path", where=src)
    opts = [o for o in fs.options.split(",") if o]
    if not opts or any(c.isspace() for c in fs.options):
        raise ConfigError(f"filesystem.options {fs.options!r} must be a comma-separated list "
                          "without spaces", where=src)
    for bad in FORBIDDEN_OPTIONS:
        if bad in opts:
            raise ConfigError(f"filesystem.options must not contain {bad!r}", where=src)
    if fs.device_timeout < 1:
        raise ConfigError("filesystem.device_timeout must be at least 1 second (systemd reads 0 "
                          "as wait forever)", where=src)
    if not 0 <= fs.min_free_percent < 100:
        raise ConfigError("filesystem.min_free_percent must be between 0 and 99", where=src)
    for d in layout.directories:
        norm = os.path.normpath(d)
        if os.path.isabs(d) or norm.startswith("..") or norm == ".":
            raise ConfigError(f"layout.directories entry {d!r} must be a relative path inside "
                              "the mount point", where=src)
    if not re.fullmatch(r"0?[0-7]{3,4}", layout.mode):
        raise ConfigError(f"layout.mode {layout.mode!r} must be an octal mode like \"0750\"",
                          where=src)
    if config.couchdb.url and not config.couchdb.url.startswith(("http://", "https://")):
        # Never echo the value: it may carry user:password@.
        raise ConfigError("couchdb.url must start with http:// or https://", where=src)
    if config.secrets.source and not S3_URL_RE.match(config.secrets.source):
        raise ConfigError(f"secrets.source {config.secrets.source!r} must look like "
                          "s3://bucket/key", where=src)
    if config.agent.interval < 1:
        raise ConfigError("agent.interval must be at least 1 second", where=src)
    if config.snapshot.keep_last < 1:
        raise ConfigError("snapshot.keep_last must be at least 1 (the newest is always kept)",
                          where=src)
