"""What is on a block device: blkid/wipefs output, its first and last bytes — and the blank decision."""

from __future__ import annotations


def parse_blkid_export(text: str) -> dict[str, str]:
    """`blkid -o export` / `blkid -p -o export` lines KEY=value → dict (values may contain '=')."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            info[key.strip()] = value
    return info
