"""The error reasons (errors.Reason) are one list: raise sites and the agent's decisions use the
constants, so a typo cannot make a refusal look like something that converges by itself."""

from __future__ import annotations

import re
from pathlib import Path

from hostagent.errors import NEEDS_A_PERSON, Reason
from hostagent.reconcilers import CONVERGING, OPERATION, REFUSED, ClaimResult, classify_claim

PACKAGE = Path(__file__).resolve().parents[2] / "hostagent"
REASONS = {v for k, v in vars(Reason).items() if k.isupper()}


def test_no_reason_is_spelled_as_a_string_at_a_raise_site():
    # reason="..." as a keyword argument, or error.reason = "...": an error's reason as a string.
    literal = re.compile(r"""(\breason=|\.reason\s*=\s*)["'][a-z]""")
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if literal.search(line) and "Reason." not in line]
    assert found == []


def test_reasons_are_unique_slugs_and_the_person_set_is_drawn_from_them():
    values = [v for k, v in vars(Reason).items() if k.isupper()]
    assert len(values) == len(set(values))
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", v) for v in values), values
    assert NEEDS_A_PERSON <= REASONS
    assert Reason.ATTACHED_ELSEWHERE not in NEEDS_A_PERSON


def test_the_agent_decides_by_the_constants():
    def result(reason, code):
        return ClaimResult(code, reason)

    assert classify_claim(result(Reason.ATTACHED_ELSEWHERE, 3)) == CONVERGING
    for reason in NEEDS_A_PERSON:
        assert classify_claim(result(reason, 1)) == REFUSED, reason
    assert classify_claim(result(Reason.DEVICE_MISSING, 1)) == OPERATION
