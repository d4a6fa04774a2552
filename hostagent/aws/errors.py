"""Turn botocore exceptions into one-line hostagent errors that name the AWS action involved."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from hostagent.errors import HostagentError, OperationError
from hostagent.log import get_logger

log = get_logger(__name__)

POLICY_FILE = "iam/hostagent-policy.json"

ACCESS_DENIED_CODES = frozenset({
    "UnauthorizedOperation",  # EC2
    "AccessDenied",  # S3, STS
    "AccessDeniedException",  # ECS, CloudWatch (JSON protocols)
    "UnauthorizedAccess",
})
# Codes botocore's standard retry mode already retried; seeing one here means it gave up.
THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled", "SlowDown",
    "PriorRequestNotComplete", "EC2ThrottledException",
})
# EC2 is eventually consistent: right after CreateSnapshot, CopySnapshot or CreateVolume, calls on
# the new id may answer NotFound for a while. AWS says to retry with exponential backoff "starting
# with a couple of seconds ... up to a few minutes"; lags of seconds are what is seen in practice.
# The window only costs time when the id really is gone (someone deleted it in between), and every
# caller is already in a long wait (snapshot --wait, restore's wait-available), so it is generous.
NOT_FOUND_CODES = frozenset({"InvalidSnapshot.NotFound", "InvalidVolume.NotFound"})
VISIBILITY_WINDOW = 120.0  # seconds after the create call
VISIBILITY_FIRST_DELAY, VISIBILITY_MAX_DELAY = 1.0, 15.0
NO_CREDENTIALS_HINT = ("hostagent uses the default credential chain: attach an instance "
                       f"profile whose role carries {POLICY_FILE} and make sure IMDSv2 answers "
                       "(hop limit 2 in containers); never put access keys in the config")


class AWSError(OperationError):
    """An AWS call failed; `code` is the AWS error code ('' when no answer came back)."""

    def __init__(self, message: str, *, action: str, code: str = "", where: str | None = None,
                 hint: str | None = None):
        super().__init__(message, where=where, hint=hint)
        self.action = action
        self.code = code


@contextmanager
def aws_call(action: str, *, where: str | None = None) -> Iterator[None]:
    """Run boto3 calls for `action` ("ec2:AttachVolume"); botocore errors leave as AWSError.

    Throttling is not handled here: the clients use botocore's standard retry mode, which retries
    throttling codes with backoff. A throttling error that reaches this point has used them all.
    """
    try:
        yield
    except HostagentError:
        raise
    except Exception as exc:
        mapped = map_aws_error(exc, action, where=where)
        if mapped is None:
            raise
        raise mapped from exc


def map_aws_error(exc: BaseException, action: str, *, where: str | None = None) -> AWSError | None:
    """The operator-facing error for a botocore exception, or None for anything else (a bug)."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {}) or {}
        meta = exc.response.get("ResponseMetadata", {}) or {}
        code = str(error.get("Code") or f"HTTP {meta.get('HTTPStatusCode', '?')}")
        message = _one_line(str(error.get("Message") or ""))
        if code in ACCESS_DENIED_CODES:
            return AWSError(
                f"not allowed to call {action} ({code})", action=action, code=code, where=where,
                hint=f"grant {action} to the instance role: see {POLICY_FILE} "
                     "(an encoded EC2 message decodes with `aws sts decode-authorization-message`)")
        detail = f"{action} failed: {code}" + (f": {message}" if message else "")
        if code in THROTTLING_CODES:
            retries = meta.get("RetryAttempts")
            tried = f" (retried {retries} times)" if retries else ""
            return AWSError(detail + tried, action=action, code=code, where=where,
                            hint="AWS is throttling this account's API calls; run again later")
        return AWSError(detail, action=action, code=code, where=where)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError,
                        bx.CredentialRetrievalError)):
        return AWSError(f"no AWS credentials to call {action}: {_one_line(str(exc))}",
                        action=action, where=where, hint=NO_CREDENTIALS_HINT)
    if isinstance(exc, bx.NoRegionError):
        return AWSError(f"no AWS region to call {action}", action=action, where=where,
                        hint="set AWS_REGION, or run on EC2 where the region comes from IMDSv2")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError,
                        bx.ProxyConnectionError)):
        return AWSError(f"{action} failed: cannot reach AWS: {_one_line(str(exc))}", action=action,
                        where=where, hint="check the route to the AWS endpoint (NAT, VPC endpoint, "
                                          "proxy) and AWS_ENDPOINT_URL if set")
    if isinstance(exc, bx.ReadTimeoutError):
        return AWSError(f"{action} failed: AWS did not answer in time: {_one_line(str(exc))}",
                        action=action, where=where)
    if isinstance(exc, bx.BotoCoreError):
        return AWSError(f"{action} failed: {_one_line(str(exc))}", action=action, where=where)
    return None


T = TypeVar("T")


def when_visible(call: Callable[[], T], *, what: str, window: float | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> T:
    """call() for an id hostagent has just created: NotFound means "not visible yet", not "gone".

    Retries with capped exponential backoff for at most `window` seconds (VISIBILITY_WINDOW);
    after that the NotFound is an AWSError saying so (exit 1, not a usage error: the id came from
    AWS, not from the operator). Any other error leaves at once.
    """
    window = VISIBILITY_WINDOW if window is None else window
    deadline = clock() + window
    delay = VISIBILITY_FIRST_DELAY
    while True:
        try:
            return call()
        except AWSError as exc:
            if exc.code not in NOT_FOUND_CODES:
                raise
            remaining = deadline - clock()
            if remaining <= 0:
                raise AWSError(
                    f"{what} still not found {window:.0f}s after it was created ({exc.code})",
                    action=exc.action, code=exc.code, where=exc.where,
                    hint="EC2 is eventually consistent, but not for this long: check it with "
                         "`aws ec2 describe-snapshots`/`describe-volumes`; someone may have "
                         "deleted it") from exc
            log.info("%s not visible yet (%s); retrying in %.1fs", what,
                                      exc.code, min(delay, remaining))
            sleep(min(delay, remaining))
            delay = min(delay * 2, VISIBILITY_MAX_DELAY)


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError or AWSError, else ''."""
    if isinstance(exc, AWSError):
        return exc.code
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str((response.get("Error") or {}).get("Code") or "")
    return ""


def _one_line(text: str) -> str:
    return " ".join(text.split())
