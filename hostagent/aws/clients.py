"""boto3 clients: region from the environment or IMDSv2, standard retries, explicit timeouts."""

from __future__ import annotations

import os
from typing import Any

from hostagent.aws.imds import IMDS
from hostagent.aws.volume import Identity

REGION_ENVS = ("AWS_REGION", "AWS_DEFAULT_REGION")
RETRY_MODE = "standard"  # retries throttling and transient errors with backoff and a retry quota
MAX_ATTEMPTS = 5  # first call included
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0


class AWS:
    """Lazily built boto3 clients in this instance's region, with the default credential chain only.

    AWS_ENDPOINT_URL (and AWS_ENDPOINT_URL_<SERVICE>) are honoured by botocore itself; so are
    AWS_RETRY_MODE and AWS_MAX_ATTEMPTS, which override our defaults when set.
    """

    def __init__(self, region: str = "", *, imds: IMDS | None = None,
                 max_attempts: int = MAX_ATTEMPTS, connect_timeout: float = CONNECT_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT):
        self._region = region
        self._imds = imds
        self._identity: Identity | None = None
        self._session = None
        self._clients: dict[tuple[str, str], Any] = {}
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout

    @property
    def imds(self) -> IMDS:
        if self._imds is None:
            self._imds = IMDS()
        return self._imds

    @property
    def identity(self) -> Identity:
        """This instance (id, region, AZ) from IMDSv2, fetched once."""
        if self._identity is None:
            self._identity = self.imds.identity()
        return self._identity

    @property
    def region(self) -> str:
        """The explicit region, else AWS_REGION / AWS_DEFAULT_REGION, else this instance's region.

        Resolved here rather than left to botocore, which reads only AWS_DEFAULT_REGION and has
        no IMDS fallback for the region.
        """
        if not self._region:
            from_env = next((os.environ[k].strip() for k in REGION_ENVS
                             if os.environ.get(k, "").strip()), "")
            self._region = from_env or self.identity.region
        return self._region

    @property
    def ec2(self):
        return self.client("ec2")

    @property
    def ecs(self):
        return self.client("ecs")

    @property
    def s3(self):
        return self.client("s3")

    @property
    def cloudwatch(self):
        return self.client("cloudwatch")

    def client(self, service: str, region: str | None = None):
        """A cached boto3 client for `service` in `region` (default: this instance's region)."""
        region = region or self.region
        key = (service, region)
        if key not in self._clients:
            self._clients[key] = self._make_client(service, region)
        return self._clients[key]

    def client_for_region(self, service: str, region: str):
        """A client in another region, e.g. the copy_to_region destination for snapshots."""
        return self.client(service, region)

    def _make_client(self, service: str, region: str):
        import boto3
        from botocore.config import Config

        if self._session is None:
            # Own session, not boto3's module-level default: clients are built on first use, and a
            # shared default session is not safe to build clients from in several threads.
            self._session = boto3.session.Session()
        retries: dict[str, Any] = {}
        if not os.environ.get("AWS_RETRY_MODE"):
            retries["mode"] = RETRY_MODE
        if not os.environ.get("AWS_MAX_ATTEMPTS"):
            # total_max_attempts counts the first call; Config's max_attempts counts retries only.
            retries["total_max_attempts"] = self.max_attempts
        config = Config(retries=retries, connect_timeout=self.connect_timeout,
                        read_timeout=self.read_timeout)
        client = self._session.client(service, region_name=region, config=config)
        if service == "ec2":
            from hostagent.aws.snapshots import refuse_blind_retries

            refuse_blind_retries(client)
        return client


def make_aws(aws: AWS | None = None) -> AWS:
    """The AWS clients a flow was given (tests pass their own), else the real ones."""
    return aws if aws is not None else AWS()


def require_aws_volume(config) -> None:
    """Snapshot, prune and restore work on an EBS volume: a device-only config has none."""
    if not config.volume.uses_aws:
        from hostagent.errors import ConfigError

        raise ConfigError("snapshots need an EBS volume: set volume.id or volume.tags",
                          where=config.source)
