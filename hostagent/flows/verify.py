"""verify-mount: every check an operator needs to trust the persistence mount, without AWS calls."""

from __future__ import annotations

from dataclasses import asdict

from hostagent.checks import run_checks
from hostagent.errors import EXIT_FAILED, EXIT_OK
from hostagent.report import Report, render_table


def run(ctx, args) -> Report:
    checks = run_checks(ctx.config)
    ok = all(c.ok for c in checks)
    rows = [("ok" if c.ok else "FAIL", c.name, c.detail) for c in checks]
    text = render_table(rows, ("RESULT", "CHECK", "DETAIL"))
    text += "\n" + ("all checks passed" if ok else
                    f"{sum(not c.ok for c in checks)} check(s) failed")
    return Report(ok=ok, key="checks", items=[asdict(c) for c in checks], text=text,
                  exit_code=EXIT_OK if ok else EXIT_FAILED)
