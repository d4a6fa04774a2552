"""An IMDSv2 stand-in that also serves instance-role credentials, as EC2 does for an instance profile.

botocore's default chain then fetches them exactly as on an instance (token PUT, role name, role
credentials), once, when a client is built. Each credentials fetch is recorded with its
CLOCK_MONOTONIC time, which every process on the host shares, so a benchmark or test can tell
when one happened. (botocore does not refetch IMDS credentials that are about to expire on every
call: it extends them by 12-20 minutes instead, so near-expiry answers make no extra fetches.)
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

from tests.support.imds import IMDSServer

ROLE = "hostagent-test-role"
CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"


class RoleIMDSServer(IMDSServer):
    def __init__(self, *args, expires_in: float = 6 * 3600, **kwargs):
        super().__init__(*args, **kwargs)
        self.expires_in = expires_in
        self.credential_fetches: list[float] = []  # time.monotonic() of each role-credentials GET

    def answer(self, path: str) -> str | None:
        if path == CREDENTIALS_PATH:
            return ROLE
        if path == CREDENTIALS_PATH + ROLE:
            self.credential_fetches.append(time.monotonic())
            now = datetime.now(timezone.utc)
            return json.dumps({
                "Code": "Success", "Type": "AWS-HMAC",
                "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "AccessKeyId": "ASIAHOSTAGENTTEST000", "SecretAccessKey": "test-secret",
                "Token": "test-session-token",
                "Expiration": (now + timedelta(seconds=self.expires_in)).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"),
            })
        return super().answer(path)


# Without these, botocore's default chain stops before IMDS (keys in the environment or files).
ENV_TO_DROP = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
               "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
ENV_TO_SET = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/hostagent-test-credentials",
              "AWS_CONFIG_FILE": "/nonexistent/hostagent-test-config"}


def instance_role_env(environ) -> dict:
    """A copy of `environ` in which botocore's default chain takes the role credentials from IMDS."""
    env = {k: v for k, v in environ.items() if k not in ENV_TO_DROP}
    env.update(ENV_TO_SET)
    return env
