"""The persistence volume's fstab line: parse, plan and render as pure text; write atomically."""

from __future__ import annotations

import os
import posixpath
import re
import stat
from typing import NamedTuple

from hostagent.errors import OperationError, UsageError
from hostagent.fileio import atomic_write

FSTAB_TAG_OPTION = "comment=hostagent"
BACKUP_SUFFIX = ".hostagent.bak"
NEW_FILE_MODE = 0o644
DEVICE_TIMEOUT_OPTION = "x-systemd.device-timeout"

# libmount splits fields on spaces and tabs only, and accepts strtol-style numbers for freq/passno.
_FIELD_SEPARATOR = re.compile(r"[ \t]+")
_NUMBER = re.compile(r"[+-]?[0-9]+")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_UUID = re.compile(r"[0-9A-Fa-f][0-9A-Fa-f-]*")
# What libmount's mangle() escapes; anything else is written as is.
_ESCAPES = {" ": "\\040", "\t": "\\011", "\n": "\\012", "\\": "\\134"}


class FstabEntry(NamedTuple):
    spec: str
    file: str
    vfstype: str
    mntops: tuple[str, ...]
    freq: int = 0
    passno: int = 0

    @property
    def is_ours(self) -> bool:
        return FSTAB_TAG_OPTION in self.mntops

    @property
    def uuid(self) -> str | None:
        if not self.spec.startswith("UUID="):
            return None
        # libmount accepts UUID="..." too (blkid tag syntax).
        return self.spec[len("UUID="):].strip('"') or None

    @property
    def mount_point(self) -> str:
        return normalize_mount_point(self.file)


class FstabLine(NamedTuple):
    raw: str  # exactly as in the file, line ending included (none on an unterminated last line)
    entry: FstabEntry | None  # None: comment, blank or a line mount(8) would reject


def normalize_mount_point(path: str) -> str:
    """'/opt//couchdb/' and '/opt/couchdb' are the same mount point; 'none'/'swap' stay as is."""
    if not path.startswith("/"):
        return path
    # posixpath.normpath keeps a leading '//' (POSIX allows it a meaning); Linux does not.
    return posixpath.normpath(re.sub("/+", "/", path))


def _decode(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _encode(field: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in field)


def _split_options(field: str) -> tuple[str, ...]:
    # A comma inside double quotes belongs to the option (SELinux context="a,b"), as in libmount.
    opts, current, quoted = [], [], False
    for c in field:
        if c == '"':
            quoted = not quoted
        if c == "," and not quoted:
            opts.append("".join(current))
            current = []
        else:
            current.append(c)
    opts.append("".join(current))
    return tuple(o for o in opts if o)


def _split_lines(text: str) -> list[str]:
    # Only '\n' ends a line for libmount; str.splitlines() would also split on \r, \v, \x1c…
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _parse_entry(raw: str) -> FstabEntry | None:
    content = raw[:-1] if raw.endswith("\n") else raw
    if content.endswith("\r"):
        content = content[:-1]
    content = content.strip(" \t")
    if not content or content.startswith("#"):
        return None
    fields = _FIELD_SEPARATOR.split(content)
    # Mirror libmount (util-linux tab_parse.c): spec, file and type are required, options, freq
    # and passno optional, anything after passno ignored, a non-number freq/passno rejects the line.
    if len(fields) < 3:
        return None
    numbers = fields[4:6]
    if not all(_NUMBER.fullmatch(n) for n in numbers):
        return None
    freq, passno = (int(n) for n in numbers + ["0"] * (2 - len(numbers)))
    mntops = _split_options(_decode(fields[3])) if len(fields) > 3 else ()
    return FstabEntry(spec=_decode(fields[0]), file=_decode(fields[1]),
                      vfstype=_decode(fields[2]), mntops=mntops, freq=freq, passno=passno)


def parse_fstab(text: str) -> list[FstabLine]:
    """Every line of the file, in order; "".join(l.raw for l in lines) == text."""
    return [FstabLine(raw=raw, entry=_parse_entry(raw)) for raw in _split_lines(text)]


def render_entry(entry: FstabEntry) -> str:
    """One tab-separated line without its newline; parse_fstab reads it back as the same entry."""
    if not (entry.spec and entry.file and entry.vfstype):
        raise UsageError(f"fstab entry needs a device, a mount point and a type: {entry!r}")
    spec = _encode(entry.spec)
    if spec.startswith("#"):
        spec = "\\043" + spec[1:]  # a leading '#' would turn the whole line into a comment
    options = _encode(",".join(entry.mntops)) if entry.mntops else "defaults"
    return "\t".join([spec, _encode(entry.file), _encode(entry.vfstype), options,
                      str(entry.freq), str(entry.passno)])


def desired_entry(uuid: str, mount_point: str, fstype: str, options: str,
                  device_timeout: int) -> FstabEntry:
    """Our line: by UUID, the configured options plus nofail, a device timeout and our tag.
    mount_point and device_timeout come validated from config (absolute; timeout ≥ 1 s, as
    systemd reads 0 as "wait forever"); the UUID comes from a disk and is checked here."""
    if not _UUID.fullmatch(uuid or ""):
        raise UsageError(f"{uuid!r} is not a filesystem UUID", where=mount_point)
    timeout = f"{DEVICE_TIMEOUT_OPTION}={device_timeout}s"
    opts: list[str] = []
    for opt in options.split(","):
        if opt.startswith(DEVICE_TIMEOUT_OPTION + "="):
            opt = timeout  # the config key decides; keep the operator's position in the list
        if opt and opt not in opts:
            opts.append(opt)
    for required in ("nofail", timeout, FSTAB_TAG_OPTION):
        if required not in opts:
            opts.append(required)
    return FstabEntry(spec=f"UUID={uuid}", file=normalize_mount_point(mount_point),
                      vfstype=fstype, mntops=tuple(opts), freq=0, passno=2)


def _lines_for(lines: list[FstabLine], mount_point: str) -> list[int]:
    target = normalize_mount_point(mount_point)
    return [i for i, line in enumerate(lines)
            if line.entry is not None and line.entry.mount_point == target]


def plan_fstab(text: str, entry: FstabEntry) -> str:
    """The new fstab text: our line in place of the first line for the mount point (or appended),
    other lines for that mount point dropped, every other byte kept."""
    lines = parse_fstab(text)
    hits = _lines_for(lines, entry.file)
    if len(hits) == 1 and lines[hits[0]].entry == entry:
        return text  # already right, maybe spaced differently: leave the operator's bytes alone
    ours = render_entry(entry) + "\n"
    if not hits:
        return (text if text == "" or text.endswith("\n") else text + "\n") + ours
    out = []
    for i, line in enumerate(lines):
        if i == hits[0]:
            out.append(ours)
        elif i not in hits:
            out.append(line.raw)
    return "".join(out)


def describe_fstab_plan(text: str, entry: FstabEntry) -> str:
    """One line for a plan step's reason: what plan_fstab changes and why."""
    lines = parse_fstab(text)
    hits = _lines_for(lines, entry.file)
    if plan_fstab(text, entry) == text:
        return f"line {hits[0] + 1} already mounts {entry.spec} on {entry.file}"
    if not hits:
        return f"no line for {entry.file}: append one for {entry.spec}"
    first = lines[hits[0]]
    what = "our older line" if first.entry.is_ours else f"'{first.raw.strip()}'"
    reason = f"replace line {hits[0] + 1} ({what}) with {entry.spec}"
    if len(hits) > 1:
        reason += "; drop other lines for the same mount point: " + ", ".join(
            str(i + 1) for i in hits[1:])
    return reason


def find_entry(text: str, mount_point: str) -> FstabEntry | None:
    """The line mount(8) and systemd use for the mount point: the first one (libmount searches
    fstab forwards; systemd-fstab-generator refuses the later duplicates)."""
    lines = parse_fstab(text)
    hits = _lines_for(lines, mount_point)
    return lines[hits[0]].entry if hits else None


def backup_path(path: str) -> str:
    return os.path.realpath(path) + BACKUP_SUFFIX


def read_fstab(path: str) -> str:
    """The file's text ('' when missing); undecodable bytes survive a read-plan-write round trip."""
    data = _read_bytes(path)
    return "" if data is None else data.decode("utf-8", "surrogateescape")


def ensure_fstab_entry(path: str, entry: FstabEntry) -> bool:
    """Read, plan, write; True when the file changed."""
    return write_fstab(path, plan_fstab(read_fstab(path), entry))


def write_fstab(path: str, new_text: str) -> bool:
    """Replace the file atomically with new_text, keeping its mode and owner, after saving the old
    bytes to <fstab>.hostagent.bak. Nothing is written when the bytes are already the same."""
    # Follow a symlinked /etc/fstab: renaming over the link would replace it with a plain file.
    target = os.path.realpath(path)
    data = new_text.encode("utf-8", "surrogateescape")
    old = _read_bytes(target)
    if old == data:
        return False
    if old is None:
        mode, uid, gid = NEW_FILE_MODE, os.geteuid(), os.getegid()
        # An empty backup: for mount(8) and systemd a missing fstab and an empty one are the same,
        # and restore_fstab must still be able to undo this write.
        old = b""
    else:
        st = _stat(target)
        mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    # Backup first: whenever the new file is in place, the backup already holds the old bytes.
    atomic_write(backup_path(target), old, mode, uid, gid)
    atomic_write(target, data, mode, uid, gid)
    return True


def restore_fstab(path: str) -> bool:
    """Put <fstab>.hostagent.bak back (after a mount that failed right after write_fstab).
    True when the file changed; False when there is no backup or it already matches."""
    target = os.path.realpath(path)
    backup = backup_path(target)
    data = _read_bytes(backup)
    if data is None:
        return False
    if _read_bytes(target) == data:
        return False
    st = _stat(backup)
    atomic_write(target, data, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return True


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise UsageError("fstab path is a directory, not a file", where=path) from None
    except OSError as exc:
        raise OperationError(f"cannot read fstab: {exc.strerror}", where=path) from None


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        raise OperationError(f"cannot stat fstab: {exc.strerror}", where=path) from None
