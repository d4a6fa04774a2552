"""AWS error mapping with real botocore exceptions and clients (the IAM policy: test_iam_policy.py).

Throttling and access-denied answers are injected with a botocore before-send hook
(tests/support/aws_faults.py); botocore then parses and retries them exactly as it would an answer
from AWS. No request leaves the process: the endpoint is a closed port that nothing reaches.
"""

from __future__ import annotations

import pytest

pytest.importorskip("botocore")

from botocore import exceptions as bx  # noqa: E402

from hostagent.aws.clients import AWS  # noqa: E402
from hostagent.aws.errors import AWSError, aws_call, error_code, map_aws_error  # noqa: E402
from hostagent.aws.volume import find_volume  # noqa: E402
from hostagent.errors import EXIT_FAILED, ConfigError, OperationError  # noqa: E402
from tests.support.aws_faults import ec2_body, ec2_error, inject  # noqa: E402

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


# Eventual consistency: NotFound on an id hostagent has just created.

class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def not_found_then(n, value, code="InvalidSnapshot.NotFound"):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= n:
            raise AWSError("nope", action="ec2:DescribeSnapshots", code=code, where="snap-1")
        return value
    return call, calls


def test_not_found_right_after_create_is_retried_with_backoff():
    from hostagent.aws.errors import when_visible

    clock = FakeClock()
    call, calls = not_found_then(4, "found")
    assert when_visible(call, what="snapshot snap-1", sleep=clock.sleep, clock=clock) == "found"
    assert len(calls) == 5 and clock.sleeps == [1.0, 2.0, 4.0, 8.0]


def test_not_found_for_longer_than_the_window_is_exit_1_saying_so():
    from hostagent.aws.errors import VISIBILITY_WINDOW, when_visible

    clock = FakeClock()
    call, calls = not_found_then(1000, "never")
    with pytest.raises(AWSError) as err:
        when_visible(call, what="snapshot snap-1", sleep=clock.sleep, clock=clock)
    assert err.value.exit_code == EXIT_FAILED
    assert str(err.value).startswith(f"snapshot snap-1 still not found {VISIBILITY_WINDOW:.0f}s "
                                     "after it was created (InvalidSnapshot.NotFound)")
    assert clock.now == VISIBILITY_WINDOW and max(clock.sleeps) == 15.0


def test_other_errors_are_not_waited_for():
    from hostagent.aws.errors import when_visible

    clock = FakeClock()
    call, calls = not_found_then(1, "x", code="UnauthorizedOperation")
    with pytest.raises(AWSError):
        when_visible(call, what="snapshot snap-1", sleep=clock.sleep, clock=clock)
    assert calls == [1] and clock.sleeps == []


@pytest.mark.parametrize("exc_or_status, code, maybe", [
    (bx.ReadTimeoutError(endpoint_url="https://ec2.x/"), None, True),
    (bx.ConnectionClosedError(endpoint_url="https://ec2.x/"), None, True),
    (bx.EndpointConnectionError(endpoint_url="https://ec2.x/"), None, False),
    (bx.ConnectTimeoutError(endpoint_url="https://ec2.x/"), None, False),
    (500, "InternalError", True),
    (503, "Unavailable", True),
    (503, "RequestLimitExceeded", False),
    (400, "InvalidVolume.NotFound", False),
    (200, None, False),
])
def test_which_failures_may_have_made_the_snapshot(exc_or_status, code, maybe):
    from types import SimpleNamespace

    from hostagent.aws.snapshots import _may_have_been_carried_out

    if isinstance(exc_or_status, int):
        parsed = {"Error": {"Code": code}} if code else {}
        response = (SimpleNamespace(status_code=exc_or_status), parsed)
        assert _may_have_been_carried_out(response, None) is maybe
    else:
        assert _may_have_been_carried_out(None, exc_or_status) is maybe


CREATED = ('<CreateSnapshotResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
           '<requestId>r</requestId><snapshotId>snap-0123456789abcdef0</snapshotId>'
           '<volumeId>vol-0123456789abcdef0</volumeId><status>pending</status>'
           '</CreateSnapshotResponse>')
NO_SNAPSHOTS = ('<DescribeSnapshotsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
                '<requestId>r</requestId><snapshotSet/></DescribeSnapshotsResponse>')


def test_throttled_create_snapshot_is_still_retried_by_botocore(offline_aws):
    from hostagent.aws.snapshots import create_snapshot

    ec2 = offline_aws.ec2
    creates = inject(ec2, "ec2.CreateSnapshot",
                     [ec2_error(503, "RequestLimitExceeded", "Request limit exceeded."),
                      ec2_body(200, CREATED)])
    lookups = inject(ec2, "ec2.DescribeSnapshots", [])
    assert create_snapshot(ec2, "vol-0123456789abcdef0", {}, "d") == "snap-0123456789abcdef0"
    assert creates == ["injected", "injected"] and lookups == []


def test_a_5xx_on_create_snapshot_looks_before_trying_again(offline_aws, monkeypatch):
    from hostagent.aws import snapshots

    monkeypatch.setattr(snapshots, "LOOKUP_DELAYS", (0.0,))
    ec2 = offline_aws.ec2
    creates = inject(ec2, "ec2.CreateSnapshot",
                     [ec2_error(500, "InternalError", "We encountered an internal error."),
                      ec2_body(200, CREATED)])
    lookups = inject(ec2, "ec2.DescribeSnapshots", [ec2_body(200, NO_SNAPSHOTS)] * 2)
    assert snapshots.create_snapshot(ec2, "vol-0123456789abcdef0", {}, "d") == \
        "snap-0123456789abcdef0"
    # One try, two looks (nothing there), one more try: botocore did not retry blindly.
    assert creates == ["injected", "injected"] and lookups == ["injected", "injected"]


def test_create_snapshot_gives_up_after_its_attempts_with_the_aws_error(offline_aws, monkeypatch):
    from hostagent.aws import snapshots

    monkeypatch.setattr(snapshots, "LOOKUP_DELAYS", ())
    ec2 = offline_aws.ec2
    creates = inject(ec2, "ec2.CreateSnapshot", [ec2_error(500, "InternalError", "boom")] * 9)
    inject(ec2, "ec2.DescribeSnapshots", [ec2_body(200, NO_SNAPSHOTS)] * 9)
    with pytest.raises(AWSError) as err:
        snapshots.create_snapshot(ec2, "vol-0123456789abcdef0", {}, "d")
    assert creates == ["injected"] * snapshots.CREATE_ATTEMPTS
    assert str(err.value) == ("ec2:CreateSnapshot failed: InternalError: boom "
                              "(vol-0123456789abcdef0)")


def test_ec2_clients_refuse_blind_retries_from_the_start(offline_aws):
    """Registered when the client is built, never first inside the freeze window (registering
    clears botocore's handler cache); a 5xx on CreateSnapshot is then not retried by botocore."""
    from hostagent.aws.snapshots import _MaybeCarriedOut

    ec2 = offline_aws.ec2
    calls = inject(ec2, "ec2.CreateSnapshot", [ec2_error(500, "InternalError", "boom")] * 3)
    with pytest.raises(_MaybeCarriedOut):
        ec2.create_snapshot(VolumeId="vol-0123456789abcdef0")
    assert calls == ["injected"]
