"""Config: typed and frozen; unknown keys, wrong types and bad values are exit-2 errors naming the key."""


import pytest

from hostagent.config import Config, config_path, load_config, parse_config
from hostagent.errors import ConfigError, EXIT_USAGE

MINIMAL = {"volume": {"device": "/dev/loop7"}}


def test_defaults_match_the_design():
    c = parse_config(MINIMAL)
    assert c.filesystem.mount_point == "/opt/couchdb"
    assert c.filesystem.options == "defaults,noatime,nodev,nosuid,noexec"
    assert c.layout.directories == ("data", "etc", "etc/local.d")
    assert (c.layout.owner, c.layout.group, c.layout.mode_bits) == (5984, 5984, 0o755)
    assert c.couchdb.url == "http://localhost.localdomain:5984"
    assert c.ecs.attribute_prefix == "hostagent"
    assert not c.volume.uses_aws


def test_config_is_frozen():
    c = parse_config(MINIMAL)
    with pytest.raises(AttributeError):
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
    # Config that would hurt the host (issue 8): refused at load, before any change.
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"mount_point": "/opt/couch\0db"}},
     "filesystem.mount_point '/opt/couch\\x00db' must not contain NUL"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"mount_point": "/opt/couch\ndb"}},
     "must not contain NUL or control characters"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"mount_point": "/opt/couchdb/../.."}},
     "absolute path other than /"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"fstab": "etc/fstab"}},
     "filesystem.fstab 'etc/fstab' must be an absolute path"),
    ({"volume": {"device": "/dev/loop7"}, "host": {"lock_file": "/run/lock/x\0"}}, "host.lock_file"),
    ({"volume": {"device": "/dev/loop7"}, "host": {"state_dir": "var/lib/x"}}, "host.state_dir"),
    ({"volume": {"device": "/dev/loop7"}, "secrets": {"dest": "/etc/x\ty"}}, "secrets.dest"),
    ({"volume": {"device": "/dev/../etc/passwd"}}, "must be a path under /dev/"),
    ({"volume": {"device": "/dev/loop7\n"}}, "volume.device"),
    ({"volume": {"device": "/dev/loop7", "device_name": "xvdf"}}, "volume.device_name"),
    ({"volume": {"device": "/dev/loop7", "device_name": "/dev/../sda"}}, "volume.device_name"),
    ({"volume": {"device": "/dev/loop7", "attach_timeout": 0}}, "volume.attach_timeout"),
    ({"volume": {"tags": {"": "x"}}}, "volume.tags"),
    ({"volume": {"tags": {"Name": ""}}}, "volume.tags"),
    ({"volume": {"device": "/dev/loop7"}, "host": {"state_dir": "/opt/couchdb/state"}},
     "host.state_dir '/opt/couchdb/state' is inside filesystem.mount_point"),
    ({"volume": {"device": "/dev/loop7"}, "host": {"lock_file": "/opt/couchdb/lock"}},
     "host.lock_file '/opt/couchdb/lock' is inside filesystem.mount_point"),
    ({"volume": {"device": "/dev/loop7"},
      "filesystem": {"mount_point": "/srv/data", "fstab": "/srv/data/fstab"}},
     "filesystem.fstab '/srv/data/fstab' is inside"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"owner": 4294967296}}, "layout.owner 4294967296"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"owner": 4294967295}}, "between 0 and 4294967294"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"group": 4294967295}}, "layout.group"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"mode": "4750"}}, "no setuid"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"mode": "07777"}}, "layout.mode"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"mode": "0550"}}, "owner rwx"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"directories": ["data/../../x"]}}, "no '..'"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"directories": ["data", ""]}}, "entry ''"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"directories": ["./"]}}, "inside the mount point"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"directories": ["da\0ta"]}}, "control characters"),
    ({"volume": {"device": "/dev/loop7"}, "layout": {"directories": ["data", "data/"]}}, "'data' twice"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"label": "-Fx"}}, "not starting with '-'"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"label": "couch/db"}}, "filesystem.label"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"label": "couch db"}}, "filesystem.label"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"label": "couch\tdb"}}, "filesystem.label"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"label": ""}}, "1-16 bytes"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"options": "defaults,,noatime"}}, "empty items"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"options": "defaults,"}}, "empty items"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"options": ""}}, "filesystem.options"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"options": "noatime\0"}}, "filesystem.options"),
    ({"volume": {"device": "/dev/loop7"}, "filesystem": {"device_timeout": 0}}, "device_timeout"),
    ({"volume": {"device": "/dev/loop7"}, "secrets": {"source": "s3://bucket"}}, "s3://bucket/key"),
    ({"volume": {"device": "/dev/loop7"}, "secrets": {"source": "s3://bucket/dir/"}}, "s3://bucket/key"),
    ({"volume": {"device": "/dev/loop7"}, "secrets": {"source": "s3:///key"}}, "secrets.source"),
    ({"volume": {"device": "/dev/loop7"}, "ecs": {"attribute_prefix": "host agent"}}, "ecs.attribute_prefix"),
    ({"volume": {"device": "/dev/loop7"}, "ecs": {"attribute_prefix": ""}}, "ecs.attribute_prefix"),
    ({"volume": {"device": "/dev/loop7"}, "ecs": {"introspection_url": "localhost:51678"}},
     "ecs.introspection_url"),
    ({"volume": {"device": "/dev/loop7"}, "snapshot": {"copy_to_region": "Frankfurt"}},
     "snapshot.copy_to_region 'Frankfurt' is not an AWS region"),
    ({"volume": {"device": "/dev/loop7"}, "snapshot": {"freeze_timeout": 0}}, "snapshot.freeze_timeout"),
    ({"volume": {"device": "/dev/loop7"}, "agent": {"interval": 0}}, "agent.interval must be at least 1"),
    ({"volume": {"device": "/dev/loop7"}, "metrics": {"namespace": "AWS/EBS"}}, "metrics.namespace"),
    ({"volume": {"device": "/dev/loop7"}, "metrics": {"namespace": ""}}, "metrics.namespace"),
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


SYSTEM_MOUNT_POINTS = [
    "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/media", "/mnt", "/opt", "/proc",
    "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/usr/local", "/var/lib",
    "/var/log", "/var/cache", "/var/tmp", "/var/spool", "/var/lib/docker", "/var/lib/ecs",
    "/var/lib/hostagent",
    # inside a tree the OS owns
    "/etc/couchdb", "/usr/local/couchdb", "/boot/efi", "/run/couchdb", "/proc/1", "/dev/shm",
    "/lib/modules", "/sys/fs",
    # the same, written differently
    "/etc/", "//etc", "/opt/couchdb/../../usr", "/var/./lib/", "/opt/..",
]


@pytest.mark.parametrize("mount_point", SYSTEM_MOUNT_POINTS)
def test_a_system_directory_is_never_a_mount_point(mount_point):
    with pytest.raises(ConfigError) as exc:
        parse_config({"volume": {"device": "/dev/loop7"},
                      "filesystem": {"mount_point": mount_point}}, source="h.toml")
    assert "filesystem.mount_point" in str(exc.value) and exc.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize("mount_point", ["/opt/couchdb", "/var/lib/couchdb", "/srv/couchdb",
                                         "/mnt/data", "/data", "/home/couchdb/db",
                                         "/tmp/pytest-of-root/pytest-1/test0/opt/couchdb"])
def test_a_mount_point_of_its_own_is_accepted(mount_point):
    c = parse_config({"volume": {"device": "/dev/loop7"}, "filesystem": {"mount_point": mount_point}})
    assert c.filesystem.mount_point == mount_point


def test_a_mount_point_through_a_symlink_into_the_os_is_refused(tmp_path):
    (tmp_path / "srv").symlink_to("/etc")
    with pytest.raises(ConfigError, match="resolves to /etc/couchdb"):
        parse_config({"volume": {"device": "/dev/loop7"},
                      "filesystem": {"mount_point": str(tmp_path / "srv" / "couchdb")}})


def test_paths_are_used_in_the_form_they_were_checked():
    c = parse_config({"volume": {"device": "/dev//loop7"},
                      "filesystem": {"mount_point": "/opt//couchdb/", "fstab": "/etc/./fstab"},
                      "layout": {"directories": ["data/", "etc//local.d"]},
                      "host": {"lock_file": "/run/lock/../lock/hostagent.lock",
                               "state_dir": "/var/lib/hostagent/"},
                      "secrets": {"dest": "/etc/gc//secrets.env"}})
    assert c.volume.device == "/dev/loop7"
    assert (c.filesystem.mount_point, c.filesystem.fstab) == ("/opt/couchdb", "/etc/fstab")
    assert c.layout.directories == ("data", "etc/local.d")
    assert (c.host.lock_file, c.host.state_dir) == ("/run/lock/hostagent.lock", "/var/lib/hostagent")
    assert c.secrets.dest == "/etc/gc/secrets.env"


@pytest.mark.parametrize("section, values", [
    ("layout", {"owner": 0, "group": 4294967294, "mode": "700"}),
    ("layout", {"mode": "0777", "directories": []}),
    ("filesystem", {"label": "couchdb-data_1.2", "options": "noatime"}),
    ("filesystem", {"label": "x" * 16}),
    ("secrets", {"source": "s3://my.bucket-1/path/to/secrets.env"}),
    ("snapshot", {"copy_to_region": "us-gov-west-1"}),
    ("snapshot", {"copy_to_region": "ap-southeast-5"}),
    ("ecs", {"attribute_prefix": "team/hostagent.v2", "introspection_url": ""}),
    ("couchdb", {"url": "https://admin:pw@couch.internal:6984"}),
    ("volume", {"device_name": "/dev/sdf", "tags": {"aws:cloudformation:stack-name": "gc"}}),
    ("metrics", {"namespace": "GrandCentral/hostagent"}),
])
def test_good_values_are_accepted(section, values):
    data = {"volume": {"device": "/dev/loop7"}}
    data.setdefault(section, {}).update(values)
    parse_config(data)


@pytest.mark.parametrize("url", ["admin:s3cret@localhost:5984", "http://admin:s3cret@",
                                 "http://admin:s3cret@host:99999", "http://admin:s3cret@h st"])
def test_a_bad_couchdb_url_is_refused_without_its_credentials(url):
    with pytest.raises(ConfigError) as exc:
        parse_config({"volume": {"device": "/dev/loop7"}, "couchdb": {"url": url}})
    assert "s3cret" not in str(exc.value) and "couchdb.url" in str(exc.value)


def test_parse_s3_url_is_the_one_s3_check():
    from hostagent.config import parse_s3_url

    assert parse_s3_url("s3://b-1/a/b.env") == ("b-1", "a/b.env")
    with pytest.raises(ConfigError, match="couchdb.admin_secret"):
        parse_s3_url("https://b/k", key="couchdb.admin_secret")
