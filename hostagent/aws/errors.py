"""Turn botocore exceptions into one-line hostagent errors that name the AWS action involved."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from hostagent.errors import HostagentError, OperationError

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
