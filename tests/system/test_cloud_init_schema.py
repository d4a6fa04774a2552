"""The shipped user-data passes cloud-init's own schema validation (cloud-init 22.4 from the
Debian package, unpacked, never installed) and carries a valid hostagent config."""

from __future__ import annotations

import yaml

from hostagent.config import parse_config
from tests.system.cloudinit_deb import (
    USER_DATA, cloud_init, placeholders, render_user_data, top_level_schema_keys)

import tomllib


def write_files(doc: dict) -> dict[str, dict]:
    return {entry["path"]: entry for entry in doc["write_files"]}


def test_rendered_user_data_passes_cloud_init_schema(tmp_path):
    path = tmp_path / "user-data"
    path.write_text(render_user_data())
    done = cloud_init("schema", "--config-file", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Valid cloud-config" in done.stdout


def test_unrendered_template_is_valid_too(tmp_path):
    """An operator who validates the template before filling it in gets the same answer."""
    path = tmp_path / "user-data"
    path.write_text(USER_DATA.read_text())
    done = cloud_init("schema", "--config-file", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_schema_check_rejects_a_broken_user_data(tmp_path):
    """Control: the validator as we run it does fail on a mistake of the kind one makes here
    (an unquoted octal mode becomes an integer)."""
    broken = render_user_data().replace('permissions: "0644"', "permissions: 644", 1)
    path = tmp_path / "user-data"
    path.write_text(broken)
    done = cloud_init("schema", "--config-file", str(path))
    assert done.returncode != 0
    assert "permissions" in done.stdout + done.stderr


def test_every_top_level_key_belongs_to_a_cloud_init_module():
    doc = yaml.safe_load(render_user_data())
    unknown = set(doc) - top_level_schema_keys()
    assert not unknown, f"keys no cloud-init module reads (typo?): {sorted(unknown)}"


def test_only_the_cluster_is_templated():
    text = USER_DATA.read_text()
    assert placeholders(text) == {"ECS_CLUSTER"}
    # Any other "$" would be taken for a placeholder by templatefile()/Fn::Sub/envsubst.
    assert text.count("$") == 1
    assert text.startswith("#cloud-config\n")


def test_user_data_writes_a_valid_hostagent_config():
    files = write_files(yaml.safe_load(render_user_data()))
    entry = files["/etc/hostagent/hostagent.toml"]
    assert entry["permissions"] == "0644" and entry["owner"] == "root:root"
    config = parse_config(tomllib.loads(entry["content"]), source="user-data")
    assert dict(config.volume.tags) == {"Name": "grand-central-persistence"}
    assert config.volume.uses_aws and not config.volume.device
    assert config.filesystem.mount_point == "/opt/couchdb"
    assert (config.layout.owner, config.layout.group) == (5984, 5984)
    # The official CouchDB image's entrypoint sets data/ and etc/ to 0755 at every start: any
    # other mode here makes verify-mount fail and the agent report degraded once CouchDB ran
    # (tests/integration/test_couchdb_entrypoint.py).
    assert config.layout.mode_bits == 0o755
    assert config.snapshot.keep_last >= 1 and config.snapshot.freeze is True
    assert config.ecs.attribute_prefix == "hostagent"


def test_user_data_sets_the_ecs_cluster():
    files = write_files(yaml.safe_load(render_user_data({"ECS_CLUSTER": "grand-central-prod"})))
    assert files["/etc/ecs/ecs.config"]["content"].splitlines() == ["ECS_CLUSTER=grand-central-prod"]


def test_nothing_in_user_data_starts_or_waits_for_services():
    """ecs.service is ordered after cloud-final (which runs runcmd): waiting for it there
    deadlocks the boot; the baked units need no help from cloud-init to run."""
    doc = yaml.safe_load(render_user_data())
    for key in ("runcmd", "bootcmd", "power_state"):
        assert key not in doc, f"{key} in user-data"
    assert "systemctl" not in render_user_data().split("write_files:", 1)[1]
