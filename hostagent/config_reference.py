"""Render docs/configuration.md from hostagent/config.py: `python -m hostagent.config_reference`."""

from __future__ import annotations

import json
import re
import sys
import typing
from collections.abc import Mapping
from typing import Any

from hostagent.config import DEFAULT_CONFIG_PATH, KEY_DOCS, SECTION_CLASSES

GENERATOR = "python -m hostagent.config_reference > docs/configuration.md"
BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")

# Prose that belongs to the reference rather than to any one key. The keys' types, defaults and
# meanings all come from config.py.
SECTION_DOCS = {
    "volume": "Which EBS volume holds CouchDB's data, and how it is attached. At least one of "
              "`id`, `tags` or `device` must be set.",
    "filesystem": "The filesystem on the volume, its mount point and its `/etc/fstab` line.",
    "layout": "The directories bootstrap makes on the volume, for CouchDB's task to mount. The "
              "volume's top directory itself is always made root:root 0700 (not configurable): "
              "see [storage.md](storage.md#mount-layout-and-the-root-disk-guard).",
    "couchdb": "CouchDB on this host, as `wait-couchdb`, `check-couchdb` and the agent see it.",
    "snapshot": "`hostagent snapshot` and its retention (`keep_*`, all in UTC, like restic/borg "
                "`forget`).",
    "secrets": ("`hostagent fetch-secrets`; hostagent-secrets.service runs it at every boot, "
                "before ECS, when `source` is set."),
    "ecs": "How the agent finds this host's ECS container instance, and the attributes it puts "
           "there.",
    "agent": "`hostagent agent`, the long-running reconciler (`hostagent.service`).",
    "metrics": "CloudWatch metrics from the agent.",
    "capacity": "Growing the volume as it fills up.",
    "host": "Files hostagent keeps on the root disk.",
}

INTRO = f"""\
hostagent reads one TOML file: `--config PATH`, else `$HOSTAGENT_CONFIG`, else
`{DEFAULT_CONFIG_PATH}` (on an instance, written by the user-data,
`cloud-init/user-data.yaml`). Every key is optional and has the default below.
[`packaging/hostagent.toml.example`](../packaging/hostagent.toml.example) is the same list as an
annotated file (installed as `/etc/hostagent/hostagent.toml.example`).

Unknown keys and wrong types are errors (exit 2) naming the key; nothing falls back silently to
a default."""

VALIDATION = """\
## Config validation

Every value is checked when the file is loaded, before anything changes,
and a bad one is exit 2 naming the key (`couchdb.url` is never echoed: it may hold a password).
Integers are never negative. Paths are absolute, without NUL or control characters, and used as
normalised (`..` resolved textually). `mount_point` is never `/`, a system directory or a parent
of one (`/etc`, `/usr`, `/var`, `/var/lib`, `/opt`, `/srv`, `/mnt`, `/home`, `/tmp`,
`/var/lib/docker`, …), nor inside `/etc`, `/usr`, `/boot`, `/run`, `/proc`, `/sys`, `/dev`,
`/bin`, `/sbin`, `/lib*`; `/opt/couchdb` or `/var/lib/couchdb` are fine. `lock_file`,
`state_dir` and `fstab` may not lie under it. `owner`/`group` are 0–4294967294, `mode` is
permission bits only with owner `rwx`, `label` is 1–16 of letters, digits and `. _ + @ : -` not
starting with `-`. An existing `lock_file` that is not an empty file or a pid line (a symlink,
`/etc/passwd`) is refused untouched. The limits of each key are in its meaning below.

## Without AWS, and the environment

When only `volume.device` is set (no id, no tags), the storage flow makes no AWS call at all.
That is how a non-EC2 host, the demo and the storage tests run. hostagent honours the standard
environment rather than inventing its own: `AWS_ENDPOINT_URL`, `AWS_REGION`,
`AWS_EC2_METADATA_SERVICE_ENDPOINT`, the default credential chain (the instance role via
IMDSv2, never access keys in config), and `NOTIFY_SOCKET`/`WATCHDOG_USEC` from systemd."""


def type_name(tp: Any) -> str:
    """The TOML type a key takes, in words."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        return "list of strings"
    if origin in (Mapping, dict):
        return "table of strings"
    return {str: "string", int: "integer", bool: "boolean"}[tp]


def toml_value(value: Any) -> str:
    """A default as it is written in TOML (the few shapes config.py uses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string for these values
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = (f"{k if BARE_KEY_RE.fullmatch(k) else json.dumps(k)} = {toml_value(v)}"
                 for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def config_keys() -> list[str]:
    """Every key config.py knows, as section.key, in file order."""
    return [f"{name}.{key}" for name, cls in SECTION_CLASSES.items() for key in cls._fields]


def missing_meanings() -> list[str]:
    return [key for key in config_keys() if not KEY_DOCS.get(key, "").strip()]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """docs/configuration.md, from config.py's classes (types, defaults) and KEY_DOCS."""
    missing = missing_meanings()
    if missing:
        raise ValueError(f"no meaning in hostagent.config.KEY_DOCS for: {', '.join(missing)}")
    out = ["# Configuration reference", "",
           f"<!-- Generated from hostagent/config.py by `{GENERATOR}`; do not edit by hand. -->",
           "", INTRO, "", VALIDATION, ""]
    for name, cls in SECTION_CLASSES.items():
        hints = typing.get_type_hints(cls)
        defaults = cls()
        out += [f"## [{name}]", ""]
        if SECTION_DOCS.get(name):
            out += [SECTION_DOCS[name], ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key in cls._fields:
            default = _cell(toml_value(getattr(defaults, key)))
            out.append(f"| `{key}` | {type_name(hints[key])} | `{default}` "
                       f"| {_cell(KEY_DOCS[f'{name}.{key}'])} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    if argv if argv is not None else sys.argv[1:]:
        print(f"usage: {GENERATOR}", file=sys.stderr)
        return 2
    try:
        text = render()
    except ValueError as exc:
        print(f"hostagent.config_reference: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
