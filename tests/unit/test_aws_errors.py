"""AWS error mapping with real botocore exceptions and clients, and the IAM policy against the code.

Throttling and access-denied answers are injected with a botocore before-send hook
(tests/support/aws_faults.py); botocore then parses and retries them exactly as it would an answer
from AWS. No request leaves the process: the endpoint is a closed port that nothing reaches.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("botocore")

from botocore import exceptions as bx  # noqa: E402

from hostagent.aws.clients import AWS  # noqa: E402
from hostagent.aws.errors import AWSError, aws_call, error_code, map_aws_error  # noqa: E402
from hostagent.aws.volume import find_volume  # noqa: E402
from hostagent.errors import EXIT_FAILED, ConfigError, OperationError  # noqa: E402
from tests.support.aws_faults import ec2_body, ec2_error, inject  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "iam" / "hostagent-policy.json"
EMPTY_VOLUMES = ('<DescribeVolumesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
                 '<requestId>r-1</requestId><volumeSet/></DescribeVolumesResponse>')


def client_error(code, message="it failed", op="AttachVolume", status=400, retries=0):
    meta = {"HTTPStatusCode": status, "RetryAttempts": retries}
    return bx.ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": meta},
                          op)


def raised(exc, action="ec2:AttachVolume", where=None):
    with pytest.raises(BaseException) as info:
        with aws_call(action, where=where):
            raise exc
    return info.value


@pytest.mark.parametrize("code,action", [
    ("UnauthorizedOperation", "ec2:AttachVolume"),
    ("AccessDenied", "s3:GetObject"),
    ("AccessDeniedException", "ecs:PutAttributes"),
])
def test_access_denied_names_the_missing_action(code, action):
    err = raised(client_error(code, "You are not authorized.\nEncoded message: xyz"), action,
                 where="vol-0abc")
    assert isinstance(err, AWSError) and err.exit_code == EXIT_FAILED
    assert str(err) == f"not allowed to call {action} ({code}) (vol-0abc)"
    assert "iam/hostagent-policy.json" in err.hint and action in err.hint
    assert err.code == code and error_code(err) == code
    assert isinstance(err.__cause__, bx.ClientError)


def test_other_client_errors_keep_code_and_message_on_one_line():
    err = raised(client_error("IncorrectState", "The volume is\n  not 'available'."))
    assert str(err) == "ec2:AttachVolume failed: IncorrectState: The volume is not 'available'."
    assert "\n" not in str(err)


def test_a_throttling_error_that_got_through_says_it_was_retried():
    err = raised(client_error("RequestLimitExceeded", "Request limit exceeded.", retries=4),
                 "ec2:DescribeVolumes")
    assert str(err) == ("ec2:DescribeVolumes failed: RequestLimitExceeded: Request limit "
                        "exceeded. (retried 4 times)")
    assert "throttling" in err.hint


def test_no_credentials_points_at_the_instance_role():
    err = raised(bx.NoCredentialsError(), "ec2:DescribeVolumes")
    assert str(err).startswith("no AWS credentials to call ec2:DescribeVolumes")
    assert "instance profile" in err.hint and "access keys" in err.hint


@pytest.mark.parametrize("exc,text", [
    (bx.EndpointConnectionError(endpoint_url="https://ec2.us-east-1.amazonaws.com/"),
     "ec2:AttachVolume failed: cannot reach AWS: Could not connect"),
    (bx.ConnectTimeoutError(endpoint_url="https://ec2.us-east-1.amazonaws.com/"),
     "ec2:AttachVolume failed: cannot reach AWS: Connect timeout"),
    (bx.ReadTimeoutError(endpoint_url="https://ec2.us-east-1.amazonaws.com/"),
     "ec2:AttachVolume failed: AWS did not answer in time"),
    (bx.NoRegionError(), "no AWS region to call ec2:AttachVolume"),
])
def test_transport_errors(exc, text):
    err = raised(exc)
    assert isinstance(err, AWSError) and str(err).startswith(text), str(err)


def test_non_aws_exceptions_pass_through():
    assert isinstance(raised(ValueError("bug")), ValueError)
    assert isinstance(raised(ConfigError("bad")), ConfigError)
    assert map_aws_error(KeyError("x"), "ec2:X") is None


@pytest.fixture
def offline_aws(monkeypatch):
    """boto3 clients with dummy credentials and an endpoint nothing answers on (port 9)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for var in ("AWS_PROFILE", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(var, raising=False)
    return AWS(region="us-east-1")


def test_clients_use_standard_retries_and_explicit_timeouts(offline_aws, monkeypatch):
    config = offline_aws.ec2.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 5}
    assert (config.connect_timeout, config.read_timeout) == (5.0, 30.0)
    assert offline_aws.ec2 is offline_aws.ec2  # cached
    other = offline_aws.client_for_region("ec2", "eu-west-1")
    assert other.meta.region_name == "eu-west-1" and other is not offline_aws.ec2
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    assert AWS(region="us-east-1").ec2.meta.config.retries == {"mode": "adaptive",
                                                               "total_max_attempts": 7}


def test_region_from_environment_before_imds(monkeypatch):
    class NoIMDS:
        def identity(self):
            raise AssertionError("IMDS must not be asked when AWS_REGION is set")

    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert AWS(imds=NoIMDS()).region == "eu-central-1"
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert AWS(imds=NoIMDS()).region == "ap-south-1"
    assert AWS("us-west-2", imds=NoIMDS()).region == "us-west-2"


def test_region_falls_back_to_imds(imds, monkeypatch):
    imds(region="eu-north-1", availability_zone="eu-north-1b")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    aws = AWS()
    assert aws.region == "eu-north-1"
    assert aws.identity.availability_zone == "eu-north-1b"


def test_throttling_is_retried_by_botocore(offline_aws):
    ec2 = offline_aws.ec2
    calls = inject(ec2, "ec2.DescribeVolumes",
                   [ec2_error(503, "RequestLimitExceeded", "Request limit exceeded."),
                    ec2_error(503, "RequestLimitExceeded", "Request limit exceeded."),
                    ec2_body(200, EMPTY_VOLUMES)])
    with pytest.raises(OperationError, match="no EBS volume with tags Name=x"):
        find_volume(ec2, tags={"Name": "x"})  # the empty answer after two throttles
    assert calls == ["injected"] * 3


def test_throttling_beyond_the_attempts_is_one_line(offline_aws):
    ec2 = AWS(region="us-east-1", max_attempts=2).ec2
    calls = inject(ec2, "ec2.DescribeVolumes",
                   [ec2_error(503, "RequestLimitExceeded", "Request limit exceeded.")] * 5)
    with pytest.raises(AWSError) as err:
        find_volume(ec2, volume_id="vol-0123456789abcdef0")
    assert calls == ["injected"] * 2
    assert str(err.value) == ("ec2:DescribeVolumes failed: RequestLimitExceeded: Request limit "
                              "exceeded. (retried 1 times) (us-east-1)")


def test_access_denied_is_not_retried(offline_aws):
    ec2 = offline_aws.ec2
    calls = inject(ec2, "ec2.DescribeVolumes",
                   [ec2_error(403, "UnauthorizedOperation", "You are not authorized.")] * 5)
    with pytest.raises(AWSError) as err:
        find_volume(ec2, tags={"Name": "x"})
    assert calls == ["injected"]
    assert str(err.value) == ("not allowed to call ec2:DescribeVolumes (UnauthorizedOperation) "
                              "(us-east-1)")


# The IAM policy, checked against the calls the code makes.

SERVICES = ("ec2", "ecs", "s3", "cloudwatch")
# IAM actions for client methods that are not one API operation of the same name.
SPECIAL_ACTIONS = {
    ("s3", "head_object"): "s3:GetObject",
    ("s3", "list_objects"): "s3:ListBucket",
    ("s3", "list_objects_v2"): "s3:ListBucket",
    ("s3", "download_file"): "s3:GetObject",
    ("s3", "download_fileobj"): "s3:GetObject",
    ("s3", "upload_file"): "s3:PutObject",
    ("s3", "upload_fileobj"): "s3:PutObject",
}
IAM_ONLY_ACTIONS = {"s3:ListBucket"}  # real IAM actions with no API operation of that name
# hostagent always tags what it creates, so these calls also need CreateTags on create.
TAGGED_ON_CREATE = {"CreateSnapshot", "CopySnapshot", "CreateVolume"}

CALL_RE = re.compile(r"\b([A-Za-z_]\w*)\s*\.\s*([a-z_][a-z0-9_]*)\s*\(")
NAMED_OP_RE = re.compile(
    r"\b([A-Za-z_]\w*)\s*\.\s*(get_paginator|get_waiter)\s*\(\s*[\"']([a-z0-9_]+)[\"']")


def _operations():
    import botocore.session
    from botocore import xform_name

    session = botocore.session.get_session()
    return {svc: {xform_name(op): op for op in session.get_service_model(svc).operation_names}
            for svc in SERVICES}


def _waiter_operation(service, waiter):
    import botocore.session

    session = botocore.session.get_session()
    client = session.create_client(service, region_name="us-east-1", aws_access_key_id="x",
                                   aws_secret_access_key="x")
    return client.get_waiter(waiter).config.operation


def _service_of(receiver):
    return next((svc for svc in SERVICES if receiver == svc or receiver.endswith("_" + svc)), None)


def required_actions(source_root=ROOT / "hostagent"):
    """{iam action: [where used]} for every AWS call in hostagent's code.

    A call counts when its receiver is named like the service (`ec2.`, `self.aws.ec2.`,
    `dest_ec2.`) or its method name is an operation of exactly one of the services. Name client
    variables that way (e.g. `dest_ec2 = aws.client_for_region("ec2", region)`).
    """
    ops = _operations()
    found: dict[str, list[str]] = {}
    ambiguous = []
    for path in sorted(source_root.rglob("*.py")):
        text = path.read_text()
        where = str(path.relative_to(ROOT))
        calls = [(m.group(1), m.group(2), None) for m in CALL_RE.finditer(text)]
        calls += [(m.group(1), m.group(2), m.group(3)) for m in NAMED_OP_RE.finditer(text)]
        for receiver, method, named in calls:
            if method in ("get_paginator", "get_waiter") and named is None:
                continue
            name = named or method
            service = _service_of(receiver)
            candidates = [service] if service else [s for s in SERVICES if name in ops[s]]
            if not service and len(candidates) > 1:
                ambiguous.append(f"{where}: {receiver}.{name}")
                continue
            if not candidates:
                continue
            svc = candidates[0]
            if method == "get_waiter":
                api = _waiter_operation(svc, name)
            elif (svc, name) in SPECIAL_ACTIONS:
                found.setdefault(SPECIAL_ACTIONS[(svc, name)], []).append(where)
                continue
            elif name in ops[svc]:
                api = ops[svc][name]
            else:
                continue  # not an API call (meta, exceptions, an adapter module named ecs, ...)
            found.setdefault(f"{svc}:{api}", []).append(where)
    assert not ambiguous, f"name the client variable after its service: {ambiguous}"
    return found


def load_policy():
    return json.loads(POLICY.read_text())


def statements():
    st = load_policy()["Statement"]
    return st if isinstance(st, list) else [st]


def as_list(value):
    return value if isinstance(value, list) else [value]


def allows(action):
    return [s for s in statements() if s["Effect"] == "Allow"
            and any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in as_list(s["Action"]))]


def test_policy_is_valid_iam_json():
    policy = load_policy()
    assert policy["Version"] == "2012-10-17"
    sids = [s["Sid"] for s in statements()]
    assert len(sids) == len(set(sids))
    for s in statements():
        assert set(s) <= {"Sid", "Effect", "Action", "Resource", "Condition"}, s
        assert s["Effect"] in ("Allow", "Deny")
        for action in as_list(s["Action"]):
            assert "*" not in action, f"no wildcard actions in a least-privilege policy: {action}"
        for resource in as_list(s["Resource"]):
            assert resource == "*" or resource.startswith(("arn:aws:", "${")), resource


def test_every_policy_action_exists():
    ops = _operations()
    import botocore.session

    session = botocore.session.get_session()
    for s in statements():
        for action in as_list(s["Action"]):
            service, api = action.split(":")
            if action in IAM_ONLY_ACTIONS:
                continue
            names = ops[service].values() if service in ops else \
                session.get_service_model(service).operation_names
            assert api in names, f"{action} is not an operation of {service}"


def test_scanner_sees_the_calls_in_volume_py():
    found = required_actions()
    assert "hostagent/aws/volume.py" in found["ec2:DescribeVolumes"]  # via get_paginator
    assert "hostagent/aws/volume.py" in found["ec2:AttachVolume"]
    assert "hostagent/aws/volume.py" in found["ec2:CreateTags"]


def test_every_aws_call_in_the_code_is_allowed_by_the_policy():
    missing = {action: where for action, where in required_actions().items() if not allows(action)}
    assert not missing, f"add these actions to {POLICY.relative_to(ROOT)}: {missing}"


def test_resources_created_with_tags_may_be_tagged_on_create():
    for action in required_actions():
        service, api = action.split(":")
        if api in TAGGED_ON_CREATE:
            ok = [s for s in allows("ec2:CreateTags")
                  if api in as_list(s.get("Condition", {}).get("StringEquals", {})
                                    .get("ec2:CreateAction", []))]
            assert ok, f"CreateTags with ec2:CreateAction={api} is missing for {action}"


def test_policy_keeps_its_guards():
    for s in allows("ec2:CreateTags"):
        assert s.get("Condition"), "CreateTags must never be unconditioned"
    for s in allows("ec2:DeleteSnapshot"):
        assert s["Condition"] == {"Null": {"aws:ResourceTag/hostagent:managed": "false"}}
    volume_attach = [s for s in allows("ec2:AttachVolume") if "volume/" in str(s["Resource"])]
    assert volume_attach and all("aws:ResourceTag/Name" in str(s["Condition"])
                                 for s in volume_attach)
    instance_attach = [s for s in allows("ec2:AttachVolume") if s not in volume_attach]
    assert [s["Resource"] for s in instance_attach] == ["${ec2:SourceInstanceARN}"]
    for s in allows("cloudwatch:PutMetricData"):
        assert s["Condition"]["StringEquals"]["cloudwatch:namespace"] == "hostagent"
    for s in allows("s3:GetObject"):
        assert all(r.startswith("arn:aws:s3:::") and "/" in r for r in as_list(s["Resource"]))
