"""What a flow hands back to the CLI: ok, a JSON payload keyed by what it lists, and human text."""

from __future__ import annotations

from typing import Any, Sequence

from hostagent.errors import EXIT_FAILED, EXIT_OK


class Report:
    """What a flow hands back to the CLI (a plain class: no dataclasses import on the boot path)."""

    __slots__ = ("ok", "key", "items", "text", "exit_code", "extra", "raw_json")

    def __init__(self, ok: bool, key: str, items: Any, text: str = "", exit_code: int | None = None,
                 extra: dict[str, Any] | None = None, raw_json: Any = None):
        self.ok = ok
        self.key = key  # the JSON key named after what the command lists: "checks", "steps"…
        self.items = items
        self.text = text
        self.exit_code = exit_code
        self.extra = extra if extra is not None else {}
        self.raw_json = raw_json  # when set, --json prints exactly this (ecs-task-volumes)

    @property
    def code(self) -> int:
        if self.exit_code is not None:
            return self.exit_code
        return EXIT_OK if self.ok else EXIT_FAILED

    def to_json(self) -> Any:
        if self.raw_json is not None:
            return self.raw_json
        return {"ok": self.ok, self.key: self.items, **self.extra}


def render_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned text table; empty cells print as '-' so columns stay readable."""
    cells = [[str(h) for h in headers]] + [
        ["-" if v is None or v == "" else str(v) for v in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)
