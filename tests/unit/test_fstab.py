"""fstab as pure text: golden inputs and outputs, byte-for-byte preservation, idempotence."""

import random

import pytest

from hostagent.adapters.fstab import (
    FSTAB_TAG_OPTION,
    FstabEntry,
    describe_fstab_plan,
    desired_entry,
    find_entry,
    parse_fstab,
    plan_fstab,
    render_entry,
)
from hostagent.errors import UsageError

UUID = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
OLD_UUID = "0d0e0a0d-beef-4000-8000-000000000001"
OPTIONS = "defaults,noatime,nodev,nosuid,noexec"
OURS = ("UUID=3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f\t/opt/couchdb\text4\t"
        "defaults,noatime,nodev,nosuid,noexec,nofail,x-systemd.device-timeout=30s,"
        "comment=hostagent\t0\t2\n")


def ours(uuid=UUID, mount_point="/opt/couchdb", options=OPTIONS, timeout=30):
    return desired_entry(uuid, mount_point, "ext4", options, timeout)


def test_render_is_one_tab_separated_line_by_uuid():
    assert render_entry(ours()) + "\n" == OURS


def test_empty_file_gets_just_our_line():
    assert plan_fstab("", ours()) == OURS


def test_file_without_trailing_newline_gets_one_before_our_line():
    text = "proc /proc proc defaults 0 0"
    assert plan_fstab(text, ours()) == "proc /proc proc defaults 0 0\n" + OURS


def test_comments_blank_lines_tabs_and_odd_spacing_are_kept_byte_for_byte():
    text = ("# /etc/fstab: static file system information.\n"
            "#\n"
            "\n"
            "   # an indented comment\n"
            "UUID=aaaa-bbbb  /   ext4    errors=remount-ro   0       1\n"
            "\t\n"
            "/dev/sr0\t\t/media/cdrom0\tudf,iso9660 user,noauto\t0\t0\n"
            "tmpfs /tmp tmpfs   mode=1777,size=1g   0 0   \n"
            "  /swapfile none swap sw 0 0\n")
    assert plan_fstab(text, ours()) == text + OURS


def test_crlf_lines_are_kept_and_still_understood():
    text = "/dev/vda1 / ext4 defaults 0 1\r\n/dev/xvdf /opt/couchdb ext4 defaults 0 2\r\n"
    assert plan_fstab(text, ours()) == "/dev/vda1 / ext4 defaults 0 1\r\n" + OURS


def test_four_five_and_six_field_lines_parse_and_are_kept():
    text = ("/dev/a /a ext4 ro\n"
            "/dev/b /b ext4 rw 1\n"
            "/dev/c /c ext4 rw 1 2\n")
    entries = [line.entry for line in parse_fstab(text)]
    assert entries == [
        FstabEntry("/dev/a", "/a", "ext4", ("ro",), 0, 0),
        FstabEntry("/dev/b", "/b", "ext4", ("rw",), 1, 0),
        FstabEntry("/dev/c", "/c", "ext4", ("rw",), 1, 2),
    ]
    assert plan_fstab(text, ours()) == text + OURS


def test_malformed_lines_are_kept_verbatim_and_ignored():
    # libmount rejects these (findmnt: "parse error at line N -- ignored"), so they mount nothing
    # and are not ours to rewrite, even when they name our mount point.
    text = ("/dev/xvdg /opt/couchdb\n"
            "/dev/xvdh /opt/couchdb ext4 defaults 0 2x\n"
            "/dev/xvdi /opt/couchdb ext4 defaults # no trailing comments in fstab\n")
    assert [line.entry for line in parse_fstab(text)] == [None, None, None]
    assert find_entry(text, "/opt/couchdb") is None
    assert plan_fstab(text, ours()) == text + OURS


def test_three_field_line_is_an_entry_because_libmount_mounts_it():
    # util-linux accepts "spec file type" (options default); findmnt --tab-file lists it. Leaving
    # it in place would let mount(8) use this hand-made line before ours.
    text = "/dev/xvdf /opt/couchdb ext4\n"
    assert parse_fstab(text)[0].entry == FstabEntry("/dev/xvdf", "/opt/couchdb", "ext4", ())
    assert plan_fstab(text, ours()) == OURS


def test_extra_fields_after_passno_are_ignored_like_libmount_does():
    entry = parse_fstab("/dev/a /a ext4 rw 0 2 trailing words\n")[0].entry
    assert entry == FstabEntry("/dev/a", "/a", "ext4", ("rw",), 0, 2)


def test_parse_keeps_line_endings_and_joins_back_to_the_same_text():
    text = "a b c d\n\n# x\r\nlast line"
    lines = parse_fstab(text)
    assert [line.raw for line in lines] == ["a b c d\n", "\n", "# x\r\n", "last line"]
    assert "".join(line.raw for line in lines) == text


def test_escaped_space_in_mount_point_round_trips():
    text = "LABEL=media /mnt/my\\040disk ext4 defaults 0 2\n"
    entry = parse_fstab(text)[0].entry
    assert entry.file == "/mnt/my disk"
    assert find_entry(text, "/mnt/my disk/") == entry

    spaced = ours(mount_point="/srv/couch db")
    line = render_entry(spaced)
    assert line.split("\t")[1] == "/srv/couch\\040db"
    assert parse_fstab(line + "\n")[0].entry == spaced


def test_tab_backslash_and_newline_are_escaped_and_decoded():
    entry = FstabEntry("/dev/disk/by-label/a\\b", "/srv/t\tn\nx", "ext4", ("defaults",))
    line = render_entry(entry)
    assert line == "/dev/disk/by-label/a\\134b\t/srv/t\\011n\\012x\text4\tdefaults\t0\t0"
    assert "\n" not in line
    assert parse_fstab(line)[0].entry == entry


def test_seed_device_name_line_is_replaced_in_place():
    text = ("# seed image fstab\n"
            "UUID=aaaa-bbbb / ext4 defaults 0 1\n"
            "/dev/xvdf /opt/couchdb ext4 defaults 0 2\n"
            "tmpfs /tmp tmpfs defaults 0 0\n")
    expected = ("# seed image fstab\n"
                "UUID=aaaa-bbbb / ext4 defaults 0 1\n"
                + OURS +
                "tmpfs /tmp tmpfs defaults 0 0\n")
    assert plan_fstab(text, ours()) == expected
    assert describe_fstab_plan(text, ours()) == (
        f"replace line 3 ('/dev/xvdf /opt/couchdb ext4 defaults 0 2') with UUID={UUID}")


def test_our_older_tagged_line_is_replaced_with_the_new_uuid():
    old = render_entry(ours(uuid=OLD_UUID, timeout=10)) + "\n"
    text = "# keep me\n" + old + "# and me\n"
    assert plan_fstab(text, ours()) == "# keep me\n" + OURS + "# and me\n"
    assert describe_fstab_plan(text, ours()).startswith("replace line 2 (our older line)")


def test_unterminated_last_line_for_the_mount_point_is_replaced_with_a_terminated_one():
    text = "proc /proc proc defaults 0 0\n/dev/xvdf /opt/couchdb ext4 defaults 0 2"
    assert plan_fstab(text, ours()) == "proc /proc proc defaults 0 0\n" + OURS


def test_several_lines_for_the_mount_point_leave_only_ours_in_place_of_the_first():
    text = ("/dev/vda1 / ext4 defaults 0 1\n"
            "/dev/xvdf /opt/couchdb ext4 defaults 0 2\n"
            "# a comment between\n"
            f"UUID={OLD_UUID}\t/opt/couchdb/\txfs\tdefaults\t0\t0\n"
            "/dev/xvdg /opt//couchdb ext4 rw\n"
            "/dev/xvdh /opt/couchdb2 ext4 rw 0 2\n")
    expected = ("/dev/vda1 / ext4 defaults 0 1\n"
                + OURS +
                "# a comment between\n"
                "/dev/xvdh /opt/couchdb2 ext4 rw 0 2\n")
    assert plan_fstab(text, ours()) == expected
    assert describe_fstab_plan(text, ours()).endswith(
        "drop other lines for the same mount point: 4, 5")


def test_commented_out_line_for_the_mount_point_is_left_alone():
    text = "# /dev/xvdf /opt/couchdb ext4 defaults 0 2\n"
    assert plan_fstab(text, ours()) == text + OURS


def test_second_plan_is_byte_identical():
    text = "# x\n/dev/xvdf /opt/couchdb ext4 defaults 0 2\n\ttmpfs /tmp tmpfs rw"
    once = plan_fstab(text, ours())
    assert plan_fstab(once, ours()) == once
    assert describe_fstab_plan(once, ours()) == (
        f"line 2 already mounts UUID={UUID} on /opt/couchdb")


def test_same_entry_spelled_with_spaces_is_not_rewritten():
    text = ("UUID=3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f  /opt/couchdb  ext4  "
            "defaults,noatime,nodev,nosuid,noexec,nofail,x-systemd.device-timeout=30s,"
            "comment=hostagent  0  2")
    assert plan_fstab(text, ours()) == text


def test_changed_timeout_or_options_rewrite_our_line():
    once = plan_fstab("", ours())
    assert plan_fstab(once, ours(timeout=90)) == OURS.replace("timeout=30s", "timeout=90s")
    assert plan_fstab(once, ours(options="defaults")) == (
        f"UUID={UUID}\t/opt/couchdb\text4\tdefaults,nofail,x-systemd.device-timeout=30s,"
        "comment=hostagent\t0\t2\n")


def test_options_are_deduplicated_and_always_carry_nofail_timeout_and_tag():
    entry = ours(options="defaults,noatime,defaults,,nofail,noatime")
    assert entry.mntops == ("defaults", "noatime", "nofail", "x-systemd.device-timeout=30s",
                            FSTAB_TAG_OPTION)
    assert (entry.freq, entry.passno) == (0, 2)
    assert entry.is_ours and entry.uuid == UUID


def test_configured_device_timeout_option_is_replaced_in_place_by_the_config_key():
    entry = ours(options="x-systemd.device-timeout=5,noatime,x-systemd.device-timeout=7s",
                 timeout=45)
    assert entry.mntops == ("x-systemd.device-timeout=45s", "noatime", "nofail",
                            FSTAB_TAG_OPTION)


def test_tag_already_in_config_options_is_not_doubled():
    entry = ours(options="comment=hostagent,nofail,defaults")
    assert entry.mntops == ("comment=hostagent", "nofail", "defaults",
                            "x-systemd.device-timeout=30s")


def test_mount_point_is_normalised():
    assert ours(mount_point="/opt//couchdb/").file == "/opt/couchdb"


@pytest.mark.parametrize("kwargs, message", [
    ({"uuid": ""}, "is not a filesystem UUID"),
    ({"uuid": "/dev/xvdf"}, "is not a filesystem UUID"),
    ({"uuid": "abc def"}, "is not a filesystem UUID"),
])  # mount point and timeout are config's to validate (tests/unit/test_config.py)
def test_desired_entry_refuses_bad_input(kwargs, message):
    with pytest.raises(UsageError, match=message):
        ours(**kwargs)


def test_entry_helpers():
    assert parse_fstab('UUID="abcd" /x ext4 rw\n')[0].entry.uuid == "abcd"
    assert parse_fstab("/dev/xvdf /x ext4 rw\n")[0].entry.uuid is None
    assert not parse_fstab("/dev/xvdf /x ext4 rw,comment=cloudconfig\n")[0].entry.is_ours


def test_quoted_option_with_comma_stays_one_option():
    entry = parse_fstab('/dev/a /a ext4 context="system_u:object_r:a,s0",nofail 0 2\n')[0].entry
    assert entry.mntops == ('context="system_u:object_r:a,s0"', "nofail")


def test_find_entry_returns_the_first_line_for_the_mount_point():
    text = ("/dev/xvdf /opt/couchdb/ ext4 defaults 0 2\n"
            f"UUID={UUID} /opt/couchdb ext4 nofail 0 2\n")
    assert find_entry(text, "/opt/couchdb").spec == "/dev/xvdf"
    assert find_entry(plan_fstab(text, ours()), "/opt/couchdb/") == ours()
    assert find_entry(text, "/opt") is None


# Lines that a real fstab may hold: some target /opt/couchdb (spelled several ways), some only
# look like they do, the rest are unrelated. Each is used with random spacing and line endings.
TARGETING = [
    "/dev/xvdf {s}/opt/couchdb{s}ext4{s}defaults{s}0{s}2",
    f"UUID={OLD_UUID}{{s}}/opt/couchdb/{{s}}xfs{{s}}rw",
    "LABEL=couchdb{s}/opt//couchdb{s}ext4{s}rw,nofail{s}0",
    "/dev/nvme1n1{s}/opt/couchdb{s}ext4",
    render_entry(ours(uuid=OLD_UUID)),
    render_entry(ours()),
]
UNRELATED = [
    "# /dev/xvdf /opt/couchdb ext4 defaults 0 2",
    "#",
    "",
    "{s}",
    "/dev/xvdg{s}/opt/couchdb",
    "/dev/xvdh /opt/couchdb ext4 defaults 0 x",
    "/dev/vda1{s}/{s}ext4{s}errors=remount-ro{s}0{s}1",
    "/dev/xvdi{s}/opt/couchdb2{s}ext4{s}rw{s}0{s}2",
    "/dev/xvdj{s}/opt/couch\\040db{s}ext4{s}rw{s}0{s}2",
    "tmpfs{s}/tmp{s}tmpfs{s}mode=1777{s}0{s}0{s}extra",
    "caf\u00e9 /m\u00fcnchen ext4 rw",
]


def random_fstab(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(0, 8)):
        template = rng.choice(TARGETING if rng.random() < 0.3 else UNRELATED)
        line = template.replace("{s}", rng.choice([" ", "\t", "  ", " \t "]))
        lines.append(line + rng.choice(["\n", "\n", "\r\n"]))
    text = "".join(lines)
    if text and rng.random() < 0.3:
        text = text.rstrip("\r\n")
    return text


def is_target(line) -> bool:
    return line.entry is not None and line.entry.mount_point == "/opt/couchdb"


@pytest.mark.parametrize("seed", range(300))
def test_property_plan_is_idempotent_and_keeps_every_other_line(seed):
    rng = random.Random(seed)
    text = random_fstab(rng)
    entry = ours(uuid=rng.choice([UUID, OLD_UUID]), timeout=rng.choice([5, 30]))

    assert "".join(line.raw for line in parse_fstab(text)) == text
    once = plan_fstab(text, entry)
    assert plan_fstab(once, entry) == once

    after = parse_fstab(once)
    assert [line.entry for line in after if is_target(line)] == [entry]
    assert find_entry(once, "/opt/couchdb") == entry
    kept_before = "".join(line.raw for line in parse_fstab(text) if not is_target(line))
    kept_after = "".join(line.raw for line in after if not is_target(line))
    # Only an unterminated last line may gain the newline that separates it from ours.
    assert kept_after in (kept_before, kept_before + "\n")
    before_targets = [line for line in parse_fstab(text) if is_target(line)]
    if before_targets:
        # In place of the first: everything before it is unchanged.
        first = [line.raw for line in parse_fstab(text)].index(before_targets[0].raw)
        assert once.startswith("".join(line.raw for line in parse_fstab(text)[:first]))
