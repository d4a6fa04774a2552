"""The agent's volume claim: bootstrap's outcome (exit code + reason) -> when it tries again.

The bootstrap here is a stand-in: a Python function returning a ClaimResult, where the real
agent runs `python -m hostagent --config … bootstrap --json` in a child process. That child (its
JSON, its exit codes, its refusals against moto, the IMDSv2 test server and a loop device) is
covered by tests/integration/test_agent_claim.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import namedtuple
from datetime import datetime, timezone

import pytest

from hostagent.adapters.couchdb import Readiness
from hostagent.flows import agent
from hostagent.reconcilers import (CLAIMED, CONVERGING, OPERATION, REFUSED, ClaimResult,
                                   VolumeClaim, claim_retry, parse_bootstrap_output)

Check = namedtuple("Check", "name ok detail")
INTERVAL = 2.0


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def result(exit_code, reason, error="x"):
    return ClaimResult(exit_code, reason, error)


@pytest.mark.parametrize("exit_code, reason, kind, wait", [
    (0, "none", CLAIMED, INTERVAL),
    (3, "attached-elsewhere", CONVERGING, INTERVAL),  # the old host lets go: every interval
    (1, "device-missing", OPERATION, None),  # None: doubling from one interval up to 300 s
    (1, "volume-not-found", OPERATION, None),
    (1, "operation-failed", OPERATION, None),  # an AWS error, the lock held too long
    (None, "bootstrap-timeout", OPERATION, None),
    (-9, "bootstrap-failed", OPERATION, None),  # killed
    (1, "other-zone", REFUSED, 300.0),  # exit 1, but only a person can move it
    (3, "not-blank", REFUSED, 300.0),
    (3, "multi-attach", REFUSED, 300.0),
    (3, "wrong-device", REFUSED, 300.0),
    (3, "mounted-elsewhere", REFUSED, 300.0),
    (3, "fs-damaged", REFUSED, 300.0),
    (3, "refused", REFUSED, 300.0),  # exit 3 with a reason nobody taught the agent
    (2, "bad-config", REFUSED, 300.0),
    (70, "internal-error", REFUSED, 300.0),
])
def test_decision_table(exit_code, reason, kind, wait):
    assert claim_retry(result(exit_code, reason), INTERVAL) == (kind, wait)


def unmounted():
    return agent.RoundResult(datetime(2024, 5, 1, tzinfo=timezone.utc),
                             [Check("mounted", False, "nothing is mounted at /opt/couchdb"),
                              Check("guard", True, "immutable")], "missing", None, None,
                             Readiness(False, "off", "couchdb.url is not set"), [])


def mounted():
    return dataclasses.replace(unmounted(), persistence="ready",
                               checks=[Check("mounted", True, "/dev/loop1 on /opt/couchdb")])


class FakeBootstrap:
    """Stand-in for the bootstrap child: returns scripted outcomes, each taking `takes` seconds
    of the fake clock, and records when each attempt started."""

    def __init__(self, clock, outcomes, takes=0.5):
        self.clock, self.outcomes, self.takes = clock, list(outcomes), takes
        self.started: list[float] = []

    def __call__(self):
        self.started.append(self.clock.t)
        self.clock.t += self.takes
        return self.outcomes.pop(0)


def drive(claim: VolumeClaim, clock: Clock, until: float, step: float = 0.1):
    """The agent loop's part for the claim, with the fake clock: start when due, collect; after
    a claim the agent's next round finds the volume mounted."""
    ended = []
    while clock.t < until:
        if claim.start_if_due():
            deadline = time.monotonic() + 5
            while claim.job.running and time.monotonic() < deadline:
                time.sleep(0.001)
        kind = claim.collect()
        if kind:
            ended.append(kind)
        if kind == CLAIMED:
            claim.observe(mounted())
        clock.t = round(clock.t + step, 6)
    return ended


def test_held_elsewhere_is_retried_every_interval_counted_from_each_attempt_start(caplog):
    clock = Clock()
    boot = FakeBootstrap(clock, [result(3, "attached-elsewhere")] * 5 + [ClaimResult(0, "none")],
                         takes=0.5)
    claim = VolumeClaim(boot, interval=INTERVAL, clock=clock, wake=lambda: None)
    with caplog.at_level("INFO", logger="hostagent.agent"):
        claim.observe(unmounted())
        ended = drive(claim, clock, until=clock.t + 11)
    gaps = [round(b - a, 3) for a, b in zip(boot.started, boot.started[1:])]
    assert gaps == [INTERVAL] * 5  # never stretched by the 0.5 s each attempt takes
    assert ended == [CONVERGING] * 5 + [CLAIMED]
    assert claim.reason is None and not claim.wanted and claim.text() is None
    lines = [r.message for r in caplog.records if r.message.startswith("volume:")]
    # One line when the claim starts, one for the refusal (not five), one for the success.
    assert len(lines) == 3, lines
    assert "attached-elsewhere" in lines[1] and "every 2s until it is free" in lines[1]
    assert "claimed" in lines[2]


def test_operation_errors_back_off_and_a_new_cause_starts_again():
    clock = Clock()
    outcomes = ([result(3, "attached-elsewhere")] * 2 + [result(1, "device-missing")] * 4
                + [ClaimResult(0, "none")])
    boot = FakeBootstrap(clock, outcomes, takes=0.0)
    claim = VolumeClaim(boot, interval=INTERVAL, clock=clock, wake=lambda: None)
    claim.observe(unmounted())
    drive(claim, clock, until=clock.t + 40)
    gaps = [round(b - a, 3) for a, b in zip(boot.started, boot.started[1:])]
    # held: 2 s; then device-missing doubles from one interval (not from where held left off)
    assert gaps == [2, 2, 2, 4, 8, 16]


def test_refusal_that_needs_a_person_is_looked_at_only_every_five_minutes():
    clock = Clock()
    boot = FakeBootstrap(clock, [result(3, "not-blank", "…holds data; refusing to format")] * 3,
                         takes=1.0)
    claim = VolumeClaim(boot, interval=INTERVAL, clock=clock, wake=lambda: None)
    claim.observe(unmounted())
    drive(claim, clock, until=clock.t + 299, step=0.5)
    assert len(boot.started) == 1 and claim.reason == "not-blank" and claim.text() == "refused"
    drive(claim, clock, until=clock.t + 2, step=0.5)
    assert len(boot.started) == 2
    assert boot.started[1] - boot.started[0] == pytest.approx(300.0, abs=0.5)


def test_nothing_is_claimed_while_mounted_and_a_new_loss_starts_fresh():
    clock = Clock()
    boot = FakeBootstrap(clock, [result(3, "not-blank")] * 2, takes=0.0)
    claim = VolumeClaim(boot, interval=INTERVAL, clock=clock, wake=lambda: None)
    claim.observe(mounted())
    drive(claim, clock, until=clock.t + 10)
    assert boot.started == [] and claim.text() is None and claim.wake_at() is None
    claim.observe(unmounted())
    drive(claim, clock, until=clock.t + 1)
    assert len(boot.started) == 1 and claim.reason == "not-blank"
    claim.observe(mounted())  # a person fixed and mounted it
    assert claim.reason is None
    claim.observe(unmounted())  # lost again later: tried at once, not 5 min after the refusal
    drive(claim, clock, until=clock.t + 1)
    assert len(boot.started) == 2


def test_agent_reports_the_claims_reason_to_ecs():
    from hostagent.config import parse_config
    from hostagent.sdnotify import Notifier

    clock = Clock()
    boot = FakeBootstrap(clock, [result(3, "attached-elsewhere", "volume vol-1 is attached to "
                                                                 "another instance")])
    cfg = parse_config({"volume": {"device": "/dev/loop9"}, "couchdb": {"url": ""},
                        "ecs": {"introspection_url": ""}, "agent": {"interval": 2}})
    a = agent.Agent(cfg, notifier=Notifier(None), clock=clock, bootstrap=boot,
                    checks_fn=lambda _cfg: unmounted().checks)
    a.do_round()
    assert a.desired_attributes()["hostagent.reason"] == "not-mounted"
    drive(a.volume, clock, until=clock.t + 0.5)
    assert a.desired_attributes() == {"hostagent.persistence": "missing",
                                      "hostagent.reason": "attached-elsewhere"}
    text = agent.status_text(a.last, "off", None, reason=a.reason(), claim=a.volume.text())
    assert "persistence=missing reason=attached-elsewhere" in text and "claim=retrying" in text


def test_parse_what_bootstrap_json_prints():
    fail = json.dumps({"ok": False, "error": "volume vol-1 is attached to another instance: i-2 "
                       "(attached); refusing to take it (i-1)", "exit_code": 3,
                       "reason": "attached-elsewhere"})
    got = parse_bootstrap_output(3, fail + "\n", "hostagent: error: …\nhint: detach it there\n")
    assert got == ClaimResult(3, "attached-elsewhere", "volume vol-1 is attached to another "
                              "instance: i-2 (attached); refusing to take it (i-1)",
                              "detach it there")
    ok = json.dumps({"ok": True, "steps": [{"name": "attach", "status": "done"},
                                           {"name": "format", "status": "done"},
                                           {"name": "fstab", "status": "skipped"}]}, indent=2)
    assert parse_bootstrap_output(0, ok + "\n", "") == ClaimResult(0, "none", changed=2)
    # No reason in the JSON (an AWS error, a usage error): the exit code says what kind it is.
    assert parse_bootstrap_output(1, '{"ok": false, "error": "ec2 throttled", "exit_code": 1}',
                                  "").reason == "operation-failed"
    assert parse_bootstrap_output(2, "", "hostagent: error: unknown key x\n") == \
        ClaimResult(2, "bad-config", "hostagent: error: unknown key x")
    assert parse_bootstrap_output(None, "", "").reason == "bootstrap-timeout"
