"""ECS side, pure parts: attribute names/values within ECS limits, the persistence decision,
introspection parsing, event lines, and the ecs-task-volumes fragment through the CLI."""

from __future__ import annotations

import json
from collections import namedtuple
from datetime import datetime, timezone

import pytest

from hostagent.adapters.couchdb import PostureCheck, Readiness
from hostagent.adapters.ecs_agent import parse_introspection
from hostagent.aws import ecs_attributes as ea
from hostagent.cli import main
from hostagent.errors import ConfigError
from hostagent.flows import agent

Check = namedtuple("Check", "name ok detail")
ARN = "arn:aws:ecs:eu-west-1:123456789012:container-instance/gc/0123456789abcdef0123456789abcdef"


def all_ok():
    return [Check("mounted", True, "/dev/nvme1n1 on /opt/couchdb"), Check("device", True, "ok"),
            Check("fstype", True, "ext4"), Check("writable", True, "rw"),
            Check("fstab", True, "UUID=… nofail"), Check("layout data", True, "5984:5984 0755"),
            Check("free-space", True, "80% free")]


def test_ready_only_when_every_mount_check_passed():
    assert agent.decide_persistence(all_ok()) == "ready"


@pytest.mark.parametrize("failing, expected", [
    ("mounted", "missing"), ("device", "missing"),
    ("free-space", "degraded"), ("writable", "degraded"), ("layout data", "degraded"),
    ("fstab", "degraded"),
])
def test_persistence_states(failing, expected):
    checks = [c._replace(ok=False) if c.name == failing else c for c in all_ok()]
    assert agent.decide_persistence(checks) == expected


def test_never_ready_without_positive_evidence():
    assert agent.decide_persistence([]) == "degraded"
    assert agent.decide_persistence([Check("checks", False, "crashed")]) == "degraded"
    assert agent.decide_persistence([Check("free-space", True, "x")]) == "degraded"
    unmounted = [Check("mounted", False, "nothing is mounted"), Check("guard", True, "immutable")]
    assert agent.decide_persistence(unmounted) == "missing"


def test_desired_attributes_and_report_on_change_only():
    want = ea.desired_attributes("hostagent", persistence="ready", volume_id="vol-0abc",
                                 couchdb="up")
    assert want == {"hostagent.persistence": "ready", "hostagent.volume-id": "vol-0abc",
                    "hostagent.couchdb": "up"}
    assert ea.changed_attributes(want, want) == {}
    now = dict(want, **{"hostagent.persistence": "missing"})
    assert ea.changed_attributes(now, want) == {"hostagent.persistence": "missing"}
    # An unknown volume id is left out, not invented.
    assert "hostagent.volume-id" not in ea.desired_attributes("hostagent", persistence="missing")


def test_bad_persistence_value_is_a_bug_not_an_attribute():
    with pytest.raises(ValueError):
        ea.desired_attributes("hostagent", persistence="maybe")


@pytest.mark.parametrize("raw, clean", [
    ("up", "up"),
    ("maintenance_mode", "maintenance_mode"),
    ("a" * 200, "a" * 128),
    ("x" * 127 + " y", "x" * 127),  # trimmed to 128, then the trailing space goes
    ("  padded  ", "padded"),
    ("weird=chars;here!", "weird_chars_here_"),
    ("naïve", "na_ve"),
    ("   ", None),
    (None, None),
])
def test_values_are_cleaned_to_ecs_limits(raw, clean):
    assert ea.clean_value(raw) == clean
    if clean is not None:
        assert len(clean) <= 128 and clean == clean.strip(" ")


@pytest.mark.parametrize("prefix", ["", "host agent", "a" * 117, "hostagent=x", "ünicode"])
def test_bad_prefix_is_a_config_error_not_silently_changed(prefix):
    with pytest.raises(ConfigError):
        ea.check_prefix(prefix)


def test_good_prefixes():
    for prefix in ("hostagent", "gc.hostagent", "team/hostagent", "a" * 116):
        assert ea.check_prefix(prefix) == prefix
        assert len(ea.attribute_name(prefix, ea.PERSISTENCE)) <= 128


def test_batches_of_ten():
    sizes = [len(b) for b in ea.batches(range(23))]
    assert sizes == [10, 10, 3]


class RecordingECS:
    def __init__(self):
        self.calls = []

    def put_attributes(self, **kw):
        self.calls.append(kw)
        return {"attributes": kw["attributes"]}


def test_put_attributes_sends_at_most_ten_per_call_with_the_full_arn():
    ecs = RecordingECS()
    attrs = {f"hostagent.k{i:02d}": f"v{i}" for i in range(23)}
    assert ea.put_attributes(ecs, "gc", ARN, attrs) == 23
    assert [len(c["attributes"]) for c in ecs.calls] == [10, 10, 3]
    assert all(a["targetId"] == ARN and "targetType" not in a
               for c in ecs.calls for a in c["attributes"])


def test_put_attributes_refuses_values_over_the_limits():
    with pytest.raises(ValueError):
        ea.put_attributes(RecordingECS(), "gc", ARN, {"hostagent.x": "y" * 129})


def test_introspection_null_arn_means_wait_not_fail():
    state = parse_introspection({"Cluster": "gc", "ContainerInstanceArn": None,
                                 "Version": "Amazon ECS Agent - v1.89.0"})
    assert state.instance is None and "not registered" in state.reason
    assert parse_introspection({"Cluster": "gc"}).instance is None
    state = parse_introspection({"Cluster": "gc", "ContainerInstanceArn": ARN})
    assert state.instance.cluster == "gc" and state.instance.arn == ARN
    assert state.instance.region == "eu-west-1"
    assert parse_introspection([]).instance is None
    # Some agent versions omit Cluster; the new-style ARN names it.
    assert parse_introspection({"ContainerInstanceArn": ARN}).instance.cluster == "gc"


def round_result(persistence="ready", couch=Readiness(True, "up", "GET /_up: 200 status ok"),
                 checks=None, posture=()):
    return agent.RoundResult(datetime(2024, 5, 1, tzinfo=timezone.utc),
                             checks if checks is not None else all_ok(), persistence, "vol-0abc",
                             12.5, couch, list(posture))


def test_events_on_change_only():
    first = round_result()
    lines = agent.round_events(None, first)
    assert lines[0].startswith("persistence ready") and lines[1].startswith("couchdb up")
    assert agent.round_events(first, round_result()) == []
    lost = round_result("missing", checks=[Check("mounted", False, "nothing is mounted at /x")])
    lines = agent.round_events(first, lost)
    assert lines == ["persistence ready -> missing (mounted: nothing is mounted at /x)"]


def test_security_warnings_logged_once_and_when_resolved():
    party = PostureCheck("admin-party", False, "admin party: …")
    secured = PostureCheck("admin-party", True, "refused (HTTP 401)")
    a = round_result(posture=[party])
    assert "warning: admin-party: admin party: …" in agent.round_events(None, a)
    assert agent.round_events(a, round_result(posture=[party])) == []
    assert agent.round_events(a, round_result(posture=[secured])) == \
        ["admin-party resolved: refused (HTTP 401)"]


def test_status_line():
    text = agent.status_text(round_result(posture=[PostureCheck("exposed-port", False, "x")]),
                             "reported", 3.25)
    assert text == ("persistence=ready couchdb=up disk=12% snapshot=3.2h warn=exposed-port "
                    "ecs=reported")


def write(tmp_path, body):
    path = tmp_path / "hostagent.toml"
    path.write_text(body)
    return str(path)


def test_ecs_task_volumes_prints_exactly_the_fragment(tmp_path, capsys):
    cfg = write(tmp_path, '[volume]\ndevice = "/dev/loop9"\n[filesystem]\nmount_point = "/srv/couch/"\n')
    for argv in (["--config", cfg, "ecs-task-volumes"], ["--config", cfg, "--json", "ecs-task-volumes"]):
        assert main(argv) == 0
        out = json.loads(capsys.readouterr().out)
        assert out == {
            "volumes": [
                {"name": "couchdb-data", "host": {"sourcePath": "/srv/couch/data"}},
                {"name": "couchdb-local-d", "host": {"sourcePath": "/srv/couch/etc/local.d"}},
            ],
            "mountPoints": [
                {"sourceVolume": "couchdb-data", "containerPath": "/opt/couchdb/data",
                 "readOnly": False},
                {"sourceVolume": "couchdb-local-d", "containerPath": "/opt/couchdb/etc/local.d",
                 "readOnly": False},
            ],
        }
        # Never all of /opt/couchdb/etc: that would hide the image's default.ini.
        assert "/opt/couchdb/etc" not in [m["containerPath"] for m in out["mountPoints"]]


def test_ecs_task_volumes_needs_the_layout_dirs(tmp_path, capsys):
    cfg = write(tmp_path, '[volume]\ndevice = "/dev/loop9"\n[layout]\ndirectories = ["data"]\n')
    assert main(["--config", cfg, "ecs-task-volumes"]) == 2
    assert "etc/local.d" in capsys.readouterr().err


def make_agent(calls, answers):
    """An Agent whose AWS child is replaced by a recorder: the state machine is what is tested."""
    from hostagent.adapters.ecs_agent import ContainerInstance
    from hostagent.config import parse_config
    from hostagent.sdnotify import Notifier

    clock = FakeClock()

    def aws_call(request):
        calls.append(request)
        return answers.pop(0)

    cfg = parse_config({"volume": {"device": "/dev/loop9"}, "agent": {"interval": 30}})
    a = agent.Agent(cfg, notifier=Notifier(None), clock=clock, aws_call=aws_call)
    a.ecs.instance = ContainerInstance("gc", ARN)
    return a, clock


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_agent_syncs_first_then_puts_only_changes():
    calls = []
    answers = [{"ecs": {"ok": True, "put": {"hostagent.couchdb": "up", "hostagent.reason": "none"},
                        "current": {"hostagent.persistence": "ready"}}},
               {"ecs": {"ok": True, "put": {"hostagent.persistence": "missing",
                                            "hostagent.reason": "not-mounted"}, "current": None}}]
    a, clock = make_agent(calls, answers)
    a.last = round_result()
    a.last.volume_id = None
    first = a.aws_request()
    assert first["ecs"]["sync"] is True
    assert first["ecs"]["attributes"] == {"hostagent.persistence": "ready",
                                          "hostagent.couchdb": "up", "hostagent.reason": "none"}
    a.apply_aws_answer(first, a.aws.run_now(first))
    assert a.ecs.reported == {"hostagent.persistence": "ready", "hostagent.couchdb": "up",
                              "hostagent.reason": "none"}
    assert a.aws_request() == {}  # nothing changed: nothing sent
    assert a.ecs.text(a.desired_attributes()) == "reported"
    a.last = round_result("missing", checks=[Check("mounted", False, "gone")])
    a.last.volume_id = None
    second = a.aws_request()
    # The reason is put as a value ("none" before), never deleted: no ecs:DeleteAttributes.
    assert second["ecs"] == {"cluster": "gc", "arn": ARN, "prefix": "hostagent",
                             "attributes": {"hostagent.persistence": "missing",
                                            "hostagent.reason": "not-mounted"}, "sync": False}
    a.apply_aws_answer(second, a.aws.run_now(second))
    assert a.ecs.reported["hostagent.persistence"] == "missing" and a.aws_request() == {}


def test_agent_backs_off_after_a_failed_put_and_logs_it_once(caplog):
    answers = [{"ecs": {"ok": False, "error": "not allowed to call ecs:PutAttributes"}}] * 3
    a, clock = make_agent([], list(answers))
    a.last = round_result()
    a.last.volume_id = None
    with caplog.at_level("INFO", logger="hostagent.agent"):
        req = a.aws_request()
        a.apply_aws_answer(req, a.aws.run_now(req))  # failure 1: retry after one interval
        assert a.aws_request() == {}
        clock.t += 30
        req = a.aws_request()
        a.apply_aws_answer(req, a.aws.run_now(req))  # failure 2: retry after two intervals
        clock.t += 59
        assert a.aws_request() == {}
        clock.t += 1
        assert "ecs" in a.aws_request()
    assert sum("reporting failed" in r.message for r in caplog.records) == 1  # said once
    assert a.ecs.backoff.failures == 2 and a.ecs.text(a.desired_attributes()) == "error"


def test_every_aws_reconciler_backs_off_the_same_way_and_is_capped():
    a, _ = make_agent([], [])
    for reconciler in (a.ecs, a.snapshots, a.metrics):
        waits = []
        for _ in range(6):
            reconciler.backoff.failed("x")
            waits.append(reconciler.backoff.remaining())
        assert waits == [30, 60, 120, 240, 300, 300], reconciler.name


def test_no_ecs_request_before_a_round_or_without_an_instance():
    a, _ = make_agent([], [])
    assert a.ecs.request(a.view()) is None  # no round yet: nothing is known, nothing is said
    a.last = round_result()
    a.ecs.instance = None
    assert a.ecs.request(a.view()) is None


def test_reason_attribute_values():
    missing = round_result("missing", checks=[Check("mounted", False, "nothing is mounted"),
                                              Check("guard", True, "immutable")])
    assert agent.decide_reason(round_result()) == "none"
    assert agent.decide_reason(missing) == "not-mounted"  # no claim attempt yet
    assert agent.decide_reason(missing, "attached-elsewhere") == "attached-elsewhere"
    wrong = round_result("missing", checks=[Check("mounted", True, "/dev/loop1 on /x"),
                                            Check("device", False, "not the volume")])
    # A wrong device mounted there is not claimed over: the reason names the failed check.
    assert agent.decide_reason(wrong, "attached-elsewhere") == "device"
    low = [c._replace(ok=False) if c.name in ("free-space", "layout data") else c for c in all_ok()]
    assert agent.decide_reason(round_result("degraded", checks=low)) == "layout-data free-space"
    want = ea.desired_attributes("hostagent", persistence="missing", reason="attached-elsewhere")
    assert want == {"hostagent.persistence": "missing", "hostagent.reason": "attached-elsewhere"}


def test_status_line_says_why_while_not_ready():
    missing = round_result("missing", checks=[Check("mounted", False, "nothing is mounted")],
                           couch=Readiness(False, "off", "couchdb.url is not set"))
    missing.disk_used_percent = None
    assert agent.status_text(missing, "reported", None, reason="attached-elsewhere",
                             claim="retrying") == \
        "persistence=missing reason=attached-elsewhere couchdb=off claim=retrying ecs=reported"
