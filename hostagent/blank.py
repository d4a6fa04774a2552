"""The blank decision, pure: evidence gathered from a disk in, format / reuse / refuse out.

Nothing here touches the host; hostagent.adapters.disk gathers the Evidence, and
hostagent.adapters.mkfs is the only code that formats.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from hostagent.errors import RefusedError

FORMATTED_TAG = "hostagent:formatted"  # set on the volume right after our mkfs
MIB = 1 << 20
BLKID_NOTHING_FOUND = 2  # blkid -p: "no signature found"; every other non-zero exit is a failure
BLKID_AMBIVALENT = 8
# Entries of Evidence.mounted_at that are not mount points.
SWAP_MARK = "[swap]"
IN_USE_MARK = "[busy]"  # the kernel refused an exclusive open, yet no mount of ours shows it


class Evidence(NamedTuple):
    """Plain data gathered from the host: everything decide() needs, nothing it must look up."""

    device: str
    size_bytes: int
    read_error: str | None
    head_nonzero_offset: int | None  # first non-zero byte in the head region (absolute offset)
    tail_nonzero_offset: int | None  # first non-zero byte in the tail region (absolute offset)
    blkid_exit: int | None  # None: blkid did not finish (timeout, missing program)
    blkid: dict[str, str]
    blkid_error: str | None
    wipefs_signatures: tuple[str, ...]  # "xfs at 0x0"
    wipefs_error: str | None
    partitions: tuple[str, ...]
    holders: tuple[str, ...]
    mounted_at: tuple[str, ...]
    is_root_disk: bool
    serial_volume_id: str | None
    expected_volume_id: str | None
    formatted_tag: str | None  # value of the volume's hostagent:formatted tag; None = not tagged
    # ext2/3/4 only: has the filesystem ever been mounted (superblock mount count/time)?
    fs_ever_mounted: bool | None = None
    # first non-zero byte found by the stride sample across the whole device
    sample_nonzero_offset: int | None = None
    # other users of the disk: "backs /dev/loop5", "is mounted at /x in the mount namespace of
    # pid 812" — each one forbids formatting and reusing
    users: tuple[str, ...] = ()
    snapshot_id: str | None = None  # EC2 says the volume was made from this snapshot
    read_summary: str = ""  # what the content check read, for the operator


class Decision(NamedTuple):
    action: str  # "format" | "reuse" | "refuse"
    reason: str
    fs_uuid: str | None = None
    fs_label: str | None = None
    hint: str | None = None  # what the operator can do about a refusal


def parse_blkid_export(text: str) -> dict[str, str]:
    """`blkid -o export` / `blkid -p -o export` lines KEY=value → dict (values may contain '=').

    blkid backslash-escapes space, quotes, `$`, backquote, `<`, `>` and the backslash itself in
    export values ("VERSION=LVM2\\ 001"); those escapes are undone. Bytes ≥ 0x80 and control
    characters stay in blkid's own M-x / ^X notation: that encoding is ambiguous to reverse, and
    only labels can contain them.
    """
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip()
        if sep and key:
            info[key] = _unescape_blkid(value)
    return info


def _unescape_blkid(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def parse_wipefs_json(text: str) -> tuple[str, ...]:
    """`wipefs --no-act --json --output TYPE,OFFSET` → ("xfs at 0x0", …), in wipefs's order."""
    if not text.strip():
        return ()  # some util-linux versions print nothing at all when nothing is found
    data = json.loads(text)
    found = []
    for sig in data.get("signatures", []):
        found.append(f"{sig.get('type') or '?'} at {sig.get('offset') or '?'}")
    return tuple(found)


def _signature_type(signature: str) -> str:
    return signature.split(" at ", 1)[0]


def _volume_key(volume_id: str) -> str:
    # The Nitro NVMe serial is the volume id without its hyphen: vol-0abc… ↔ vol0abc…
    return volume_id.strip().lower().replace("-", "")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiox" or word.startswith("LVM") else "a"


def _ids(info: dict[str, str], *keys: str) -> str:
    parts = [f"{key.replace('PT', '')} {info[key]}" for key in keys if info.get(key)]
    return f" ({', '.join(parts)})" if parts else ""


def describe_blkid(info: dict[str, str]) -> list[str]:
    """What blkid's TYPE/USAGE/PTTYPE say is on the device, as operator phrases."""
    found = []
    fs_type, usage = info.get("TYPE"), info.get("USAGE")
    if fs_type:
        ids = _ids(info, "UUID", "LABEL")
        if fs_type == "swap":
            found.append(f"holds swap space{ids}")
        elif usage == "filesystem":
            found.append(f"holds {_article(fs_type)} {fs_type} filesystem{ids}")
        elif usage == "crypto":
            found.append(f"holds {_article(fs_type)} {fs_type} encrypted container{ids}")
        elif usage == "raid":
            found.append(f"holds {_article(fs_type)} {fs_type} signature "
                         f"(LVM/RAID member){ids}")
        else:
            found.append(f"holds {_article(fs_type)} {fs_type} signature"
                         f"{f' (usage {usage})' if usage else ''}{ids}")
    if info.get("PTTYPE"):
        found.append(f"holds {_article(info['PTTYPE'])} {info['PTTYPE']} partition table"
                     f"{_ids(info, 'PTUUID')}")
    if not found:
        rest = {k: v for k, v in info.items() if k != "DEVNAME"}
        if rest:
            found.append("holds something blkid reports as "
                         + ", ".join(f"{k}={v}" for k, v in sorted(rest.items())))
    return found


def _is_reusable_ext4_info(blkid_exit, blkid, blkid_error, wipefs_signatures, wipefs_error) -> bool:
    """blkid and wipefs both agree the device holds one ext4 filesystem and nothing else."""
    return (
        blkid_exit == 0
        and blkid_error is None
        and blkid.get("TYPE") == "ext4"
        and not blkid.get("PTTYPE")
        and wipefs_error is None
        and all(_signature_type(s) == "ext4" for s in wipefs_signatures)
    )


def _is_reusable_ext4(ev: Evidence) -> bool:
    return _is_reusable_ext4_info(ev.blkid_exit, ev.blkid, ev.blkid_error, ev.wipefs_signatures,
                                  ev.wipefs_error)


HINT_ROOT = ("this is the disk the system runs from; point [volume] id/tags or device at the "
             "data volume (see `hostagent devices`)")
HINT_WRONG_VOLUME = ("the device is not the volume hostagent was told to use; check [volume] "
                     "id/tags and what is attached (`hostagent devices`)")
HINT_FORMATTED = ("hostagent formatted this volume before, yet the device reads as blank: check "
                  "that the right volume is attached (`hostagent devices`); only if its data is "
                  f"really gone and you want a new filesystem, remove the volume's {FORMATTED_TAG} "
                  "tag and run bootstrap again")
HINT_READ = "check that the volume is attached and healthy (`dmesg`, `lsblk`), then run bootstrap again"
HINT_IN_USE = ("the device is partitioned, mounted or in use by LVM/RAID/device-mapper; hostagent "
               "only formats a whole, unused volume: unmount/release it or point [volume] at "
               "another volume")
# wipefs -a alone is not enough: it clears only the magic bytes, and what remains of an xfs or
# vfat header is still non-zero data (measured), which hostagent refuses again.
ERASE_HOWTO = ("only if you are sure it holds nothing you need, erase it yourself (hostagent never "
               "does): `wipefs -a {device} && blkdiscard -z {device}` (zeroes the whole device; "
               "slow on a large volume, where a new empty volume is quicker), then run bootstrap "
               "again")
HINT_SIGNATURE = ("if this is the right volume with data on another filesystem, migrate the data "
                  "to ext4 by hand; " + ERASE_HOWTO)
HINT_UNKNOWN_DATA = ("the device holds data hostagent cannot identify (look: "
                     "`hexdump -C -s {offset} -n 512 {device}`); " + ERASE_HOWTO)
HINT_SNAPSHOT = ("a volume restored from a snapshot is never blank to hostagent (its blocks load "
                 "lazily and unread ones read as zeros); if it should be empty, create a new volume "
                 "without a snapshot")
HINT_PROBE = ("run `blkid -p {device}` and `wipefs --no-act {device}` to see what is there; "
              "hostagent formats only what both prove empty")


def decide(evidence: Evidence) -> Decision:
    """Format only on positive evidence of blankness, reuse any ext4, refuse everything else. PURE."""
    ev = evidence
    dev = ev.device
    # (finding, hint): the first finding's hint is the one the operator sees.
    blockers: list[tuple[str, str]] = []  # forbid reusing as well as formatting
    doubts: list[tuple[str, str]] = []  # forbid formatting only

    if ev.is_root_disk:
        blockers.append(("is the root disk (it holds /)", HINT_ROOT))
    expected = ev.expected_volume_id
    if expected and ev.serial_volume_id and _volume_key(ev.serial_volume_id) != _volume_key(expected):
        blockers.append((f"is volume {ev.serial_volume_id} by its NVMe serial, not {expected}",
                         HINT_WRONG_VOLUME))
    if ev.read_error:
        blockers.append((f"cannot be read ({ev.read_error})", HINT_READ))
    if ev.holders:
        blockers.append((f"is held by {', '.join(ev.holders)} (LVM/RAID/device-mapper)",
                         HINT_IN_USE))
    if ev.partitions:
        blockers.append((f"has partitions {', '.join(ev.partitions)}", HINT_IN_USE))
    for use in ev.users:
        blockers.append((use, HINT_IN_USE))

    if _is_reusable_ext4(ev) and not blockers:
        fs_uuid = ev.blkid.get("UUID") or None
        fs_label = ev.blkid.get("LABEL") or None
        where = f"; it {_describe_use(ev.mounted_at)}" if ev.mounted_at else ""
        return Decision("reuse", f"{dev} holds an ext4 filesystem{_ids(ev.blkid, 'UUID', 'LABEL')}"
                        f"{where}; reusing it, never reformatting", fs_uuid, fs_label)

    if ev.formatted_tag is not None:
        value = f"={ev.formatted_tag}" if ev.formatted_tag else ""
        doubts.append((f"belongs to a volume tagged {FORMATTED_TAG}{value} "
                       "(hostagent formatted it before)", HINT_FORMATTED))
    if expected and not ev.serial_volume_id:
        doubts.append((f"has no NVMe serial naming a volume, so it cannot be proven to be {expected}",
                       HINT_WRONG_VOLUME))
    if ev.mounted_at:
        doubts.append((_describe_use(ev.mounted_at), HINT_IN_USE))
    if ev.size_bytes <= 0:
        doubts.append((f"reports a size of {ev.size_bytes} bytes", HINT_READ))
    if ev.snapshot_id:
        doubts.append((f"was made from snapshot {ev.snapshot_id} (EC2 says so): it holds that "
                       "snapshot's data even where it reads as zeros", HINT_SNAPSHOT))

    signature_hint = HINT_SIGNATURE.format(device=dev)
    found_signature = False
    if ev.blkid_exit == 0 or (ev.blkid_exit == BLKID_NOTHING_FOUND and _has_values(ev.blkid)):
        for phrase in describe_blkid(ev.blkid):
            doubts.append((phrase, signature_hint))
            found_signature = True
    if ev.blkid_exit is None:
        doubts.append((f"could not be probed by blkid ({ev.blkid_error or 'no answer'})",
                       HINT_PROBE.format(device=dev)))
    elif ev.blkid_exit == BLKID_AMBIVALENT:
        doubts.append(("holds ambivalent signatures (blkid -p exit 8"
                       f"{': ' + ev.blkid_error if ev.blkid_error else ''})",
                       HINT_PROBE.format(device=dev)))
        found_signature = True
    elif ev.blkid_exit not in (0, BLKID_NOTHING_FOUND):
        doubts.append((f"could not be probed by blkid (exit {ev.blkid_exit}"
                       f"{': ' + ev.blkid_error if ev.blkid_error else ''})",
                       HINT_PROBE.format(device=dev)))
    elif ev.blkid_error:
        doubts.append((f"could not be probed by blkid ({ev.blkid_error})", HINT_PROBE.format(device=dev)))
    if ev.wipefs_signatures:
        doubts.append((f"wipefs sees {', '.join(ev.wipefs_signatures)}", signature_hint))
        found_signature = True
    if ev.wipefs_error:
        doubts.append((f"could not be listed by wipefs ({ev.wipefs_error})", HINT_PROBE.format(device=dev)))
    if not found_signature:
        # Only worth saying when no signature explains the bytes: this is data nobody can name.
        for offset in (ev.head_nonzero_offset, ev.tail_nonzero_offset, ev.sample_nonzero_offset):
            if offset is not None:
                doubts.append((f"has non-zero bytes at offset {offset} and no known signature",
                               HINT_UNKNOWN_DATA.format(device=dev, offset=offset)))
                break

    findings = blockers + doubts
    if findings or not is_proven_blank(ev):
        # The findings explain; is_proven_blank decides, so a gap in the wording can only refuse.
        what = "; ".join(f for f, _ in findings) or "could not be proven blank"
        hint = findings[0][1] if findings else HINT_PROBE.format(device=dev)
        return Decision("refuse", f"{dev} {what}; refusing to format it", hint=hint)
    identity = f" (volume {expected} by its NVMe serial)" if expected else ""
    read = f" ({ev.read_summary})" if ev.read_summary else ""
    return Decision("format", f"{dev}{identity} is blank: blkid and wipefs find no signature, "
                    f"every byte read is zero{read}, no partitions, holders, users or mounts; "
                    "formatting it as ext4")


def is_proven_blank(ev: Evidence) -> bool:
    """Every piece of positive evidence the blank rule asks for, each one present. PURE."""
    return (
        ev.read_error is None
        and ev.size_bytes > 0
        and ev.head_nonzero_offset is None
        and ev.tail_nonzero_offset is None
        and ev.sample_nonzero_offset is None
        and not ev.users
        and not ev.snapshot_id
        and ev.blkid_exit == BLKID_NOTHING_FOUND
        and ev.blkid_error is None
        and not _has_values(ev.blkid)
        and ev.wipefs_error is None
        and not ev.wipefs_signatures
        and not ev.partitions
        and not ev.holders
        and not ev.mounted_at
        and not ev.is_root_disk
        and ev.formatted_tag is None
        and (not ev.expected_volume_id
             or (ev.serial_volume_id is not None
                 and _volume_key(ev.serial_volume_id) == _volume_key(ev.expected_volume_id)))
    )


def _describe_use(mounted_at: tuple[str, ...]) -> str:
    phrases = []
    points = [m for m in mounted_at if m not in (SWAP_MARK, IN_USE_MARK)]
    if points:
        phrases.append(f"is mounted at {', '.join(points)}")
    if SWAP_MARK in mounted_at:
        phrases.append("is active swap")
    if IN_USE_MARK in mounted_at:
        phrases.append("is in use (the kernel refuses an exclusive open: mounted in another "
                       "namespace or held by a driver)")
    return "; ".join(phrases)


def _has_values(info: dict[str, str]) -> bool:
    return any(k != "DEVNAME" for k in info)


def refusal_error(decision: Decision, device: str, volume_id: str | None = None) -> RefusedError:
    """The RefusedError (exit 3) the operator sees for a refuse decision, with what they can do."""
    hint = decision.hint or HINT_PROBE.format(device=device)
    return RefusedError(decision.reason, where=f"volume {volume_id}" if volume_id else None, hint=hint)


def is_own_interrupted_format(ev: Evidence, intent_uuid: str, mark_uuid: str | None) -> str | None:
    """PURE: does the device hold nothing but what our own mkfs (run with -U intent_uuid) left
    when it was killed? The caller has proven, by durable identity and size, that the record
    names this very disk. Returns "complete" (an ext4 with exactly that UUID: mkfs writes the
    primary superblock last, so it finished), "partial" (no signature, and the mark bootstrap
    writes right before mkfs names that UUID: killed before the superblock), or None (anything
    else — without our mark, non-zero bytes could be anybody's data)."""
    if ev.read_error or ev.partitions or ev.holders or ev.mounted_at or ev.is_root_disk or ev.users:
        return None
    if (ev.blkid_exit == BLKID_NOTHING_FOUND and not _has_values(ev.blkid)
            and not ev.wipefs_signatures and not ev.wipefs_error
            and mark_uuid is not None and mark_uuid.lower() == intent_uuid.lower()):
        return "partial"
    if (ev.blkid_exit == 0 and ev.blkid.get("TYPE") == "ext4"
            and not ev.blkid.get("PTTYPE")
            and ev.blkid.get("UUID", "").lower() == intent_uuid.lower()
            and all(_signature_type(sig) == "ext4" for sig in ev.wipefs_signatures)):
        return "complete"
    return None
