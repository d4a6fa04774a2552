"""S3 reads for hostagent: one small object (the secrets file) into memory, with operator errors."""

from __future__ import annotations

from hostagent.aws.errors import POLICY_FILE, AWSError, aws_call
from hostagent.errors import OperationError

NOT_FOUND_CODES = ("NoSuchKey", "NoSuchBucket", "404", "HTTP 404")
# S3 answers 403, not 404, for a key that does not exist when the caller may not s3:ListBucket
# on the bucket (so that a denied caller cannot probe which keys exist). The shipped policy grants
# only s3:GetObject on the one object: a missing object reads as AccessDenied.
DENIED_CODES = ("AccessDenied", "HTTP 403", "403")


def get_object_bytes(s3, bucket: str, key: str, *, max_bytes: int, what: str = "secrets",
                     setting: str = "[secrets] source",
                     statement: str = "statement FetchSecrets in ") -> bytes:
    """The object's content (at most max_bytes, else an error); never logged or echoed.

    what/setting/statement name the object in errors: the secrets file ([secrets] source) or
    CouchDB's admin secret ([couchdb] admin_secret)."""
    where = f"s3://{bucket}/{key}"
    try:
        with aws_call("s3:GetObject", where=where):
            answer = s3.get_object(Bucket=bucket, Key=key)
            size = int(answer.get("ContentLength") or 0)
            if size > max_bytes:
                raise OperationError(f"{where} is {size} bytes; a {what} object must be at most "
                                     f"{max_bytes} bytes")
            body = answer["Body"].read(max_bytes + 1)
    except AWSError as exc:
        if exc.code in NOT_FOUND_CODES:
            kind = "bucket" if exc.code == "NoSuchBucket" else "object"
            raise OperationError(f"{what} {kind} not found: bucket {bucket!r}, key {key!r}",
                                 where=where,
                                 hint=f"check {setting}, and upload the file with "
                                      f"`aws s3 cp FILE {where}`") from None
        if exc.code in DENIED_CODES:
            raise OperationError(
                f"{what} object missing, or not allowed: bucket {bucket!r}, key {key!r} "
                f"(S3 said {exc.code}, which is also its answer for a missing key when "
                "s3:ListBucket is not granted)", where=where,
                hint=f"if it is missing, upload it: `aws s3 cp FILE {where}`; if it is there, "
                     f"grant s3:GetObject on arn:aws:s3:::{bucket}/{key} to the instance role "
                     f"({statement}{POLICY_FILE}; an SSE-KMS object also needs "
                     "kms:Decrypt on its key)") from None
        raise
    if len(body) > max_bytes:
        raise OperationError(f"{where} is larger than {max_bytes} bytes; not a {what} object")
    return body
