"""Config: typed and frozen; unknown keys, wrong types and bad values are exit-2 errors naming the key."""

import dataclasses

import pytest

from hostagent.config import Config, config_path, load_config, parse_config
from hostagent.errors import ConfigError, EXIT_USAGE

MINIMAL = {"volume": {"device": "/dev/loop7"}}


def test_defaults_match_the_design():
    c = parse_config(MINIMAL)
    assert c.filesystem.mount_point == "/opt/couchdb"
    assert c.filesystem.options == "defaults,noatime,nodev,nosuid,noexec"
    assert c.layout.directories == ("data", "etc", "etc/local.d")
    assert (c.layout.owner, c.layout.group, c.layout.mode_bits) == (5984, 5984, 0o750)
    assert c.couchdb.url == "http://localhost.localdomain:5984"
    assert c.ecs.attribute_prefix == "hostagent"
    assert not c.volume.uses_aws


def test_config_is_frozen():
    c = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.volume.device = "/dev/sda"
    with pytest.raises(TypeError):
        c.volume.tags["Name"] = "x"


def test_tags_make_it_an_aws_volume():
    c = parse_config({"volume": {"tags": {"Name": "grand-central-persistence"}}})
    assert c.volume.uses_aws and dict(c.volume.tags) == {"Name": "grand-central-persistence"}


@pytest.mark.parametrize("data, needle", [
    ({"volume": {"device": "/dev/loop7", "devcie": "x"}}, "unknown key volume.devcie"),
    ({"volume": {"device": "/dev/loop7"}, "snapshots": {}}, "unknown section [snapshots]"),
    ({"volume": {"device": 7}}, "volume.device must be a string"),
    ({"volume": {"device": "/dev/loop7", "attach": "yes"}}, "volume.attach must be true or false"),
    ({"volume": {"device": "/dev/loop7"}, "agent": {"interval": "30"}}, "agent.interval must be an integer"),
    ({"volume": {"device": "/dev/loop7"}, "agent": {"interval": True}}, "agent.interval must be an integer"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"directories": "data"}}, "layout.directories must be a list"),
    ({"volume": {"tags": {"Name": 3}}}, "volume.tags must be a table of string values"),
    ({"volume": {"id": "vol-xyz"}}, "is not an EBS volume id"),
    ({"volume": {}}, "no volume configured"),
    ({"volume": {"device": "loop7"}}, "must be a path under /dev/"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"type": "xfs"}}, "only ext4"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"mount_point": "/"}}, "absolute path other than /"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"mount_point": "opt"}}, "absolute path"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"label": "x" * 17}}, "1-16 bytes"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"options": "defaults, ro"}}, "without spaces"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"options": "ro,noatime"}}, "must not contain 'ro'"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"directories": ["../etc"]}}, "inside the mount point"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"directories": ["/data"]}}, "inside the mount point"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"mode": "750x"}}, "octal mode"),
    ({"volume": {"device": "/dev/loop7"}, "secrets": {"source": "https://x/y"}}, "s3://bucket/key"),
    ({"volume": {"device": "/dev/loop7"}, "snapshot": {"keep_last": 0}}, "keep_last must be at least 1"),
    ({"volume": {"device": "/dev/loop7"}, "snapshot": {"keep_last": -1}}, "must not be negative"),
])
def test_bad_values_are_exit_2_naming_the_key(data, needle):
    with pytest.raises(ConfigError) as exc:
        parse_config(data, source="/etc/hostagent/hostagent.toml")
    assert needle in str(exc.value)
    assert exc.value.exit_code == EXIT_USAGE
    assert "/etc/hostagent/hostagent.toml" in str(exc.value)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[volume\ndevice = 1\n")
    with pytest.raises(ConfigError, match=r"invalid TOML.*\(.*bad.toml\)"):
        load_config(bad)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\n[volume]\ndevice='/dev/loop1'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin)


def test_load_config_reads_a_full_example(tmp_path):
    path = tmp_path / "h.toml"
    path.write_text("""
[volume]
tags = { Name = "grand-central-persistence" }
device_name = "/dev/xvdf"
[filesystem]
mount_point = "/opt/couchdb"
min_free_percent = 15
[snapshot]
keep_last = 7
keep_daily = 7
freeze = true
[agent]
interval = 30
""")
    c = load_config(path)
    assert isinstance(c, Config) and c.source == str(path)
    assert c.filesystem.min_free_percent == 15 and c.snapshot.keep_daily == 7


def test_config_path_precedence(monkeypatch):
    monkeypatch.delenv("HOSTAGENT_CONFIG", raising=False)
    assert config_path(None) == "/etc/hostagent/hostagent.toml"
    monkeypatch.setenv("HOSTAGENT_CONFIG", "/tmp/env.toml")
    assert config_path(None) == "/tmp/env.toml"
    assert config_path("/tmp/flag.toml") == "/tmp/flag.toml"


def test_a_bad_couchdb_url_never_echoes_its_credentials():
    with pytest.raises(ConfigError) as exc:
        parse_config({"volume": {"device": "/dev/loop7"},
                      "couchdb": {"url": "admin:s3cret@localhost:5984"}})
    assert "s3cret" not in str(exc.value) and "couchdb.url" in str(exc.value)
