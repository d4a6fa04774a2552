"""ecs-task-volumes: the task-definition volumes + mountPoints that put CouchDB's files on the volume."""

from __future__ import annotations

import json
import posixpath

from hostagent.errors import ConfigError
from hostagent.report import Report

COUCHDB_HOME = "/opt/couchdb"  # inside the official couchdb image
# (volume name, directory under the mount point, path in the container). Only local.d, never
# all of etc/: a bind mount over /opt/couchdb/etc would hide the image's default.ini, default.d
# and vm.args, and CouchDB would start without its defaults (or not at all).
MAPPINGS = (
    ("couchdb-data", "data", f"{COUCHDB_HOME}/data"),
    ("couchdb-local-d", "etc/local.d", f"{COUCHDB_HOME}/etc/local.d"),
)


def task_volumes(mount_point: str, directories) -> dict:
    """The fragment as plain data: volumes (task level) and mountPoints (container level)."""
    have = {posixpath.normpath(d) for d in directories}
    volumes, mount_points = [], []
    for name, relative, container_path in MAPPINGS:
        if relative not in have:
            raise ConfigError(f"layout.directories has no {relative!r}, which CouchDB's "
                              f"{container_path} needs",
                              hint=f"add \"{relative}\" to [layout] directories and run "
                                   "`hostagent bootstrap`")
        volumes.append({"name": name,
                        "host": {"sourcePath": posixpath.join(posixpath.normpath(mount_point),
                                                              relative)}})
        # local.d stays writable: the image's entrypoint writes docker.ini there.
        mount_points.append({"sourceVolume": name, "containerPath": container_path,
                             "readOnly": False})
    return {"volumes": volumes, "mountPoints": mount_points}


def run(ctx, args) -> Report:
    config = ctx.config
    fragment = task_volumes(config.filesystem.mount_point, config.layout.directories)
    return Report(ok=True, key="volumes", items=fragment["volumes"],
                  text=json.dumps(fragment, indent=2), raw_json=fragment)
