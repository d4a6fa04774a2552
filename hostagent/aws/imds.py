"""IMDSv2 client: instance id, AZ and region from instance metadata, with a session token only."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from hostagent.aws.volume import Identity
from hostagent.errors import OperationError
from hostagent.log import get_logger

log = get_logger(__name__)

DEFAULT_ENDPOINT = "http://169.254.169.254"
IPV6_ENDPOINT = "http://[fd00:ec2::254]"
# The same variables botocore reads, so one setting points every IMDS client at the same place.
ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
ENDPOINT_MODE_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE"
DISABLED_ENV = "AWS_EC2_METADATA_DISABLED"

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL = 21600  # the maximum AWS allows: one token serves a whole agent run for hours
REFRESH_MARGIN = 60  # fetch a new token this many seconds before the old one expires

TIMEOUT = (1.0, 2.0)  # (connect, read) seconds; IMDS is link-local and answers in milliseconds
ATTEMPTS = 3
BACKOFF = 0.2  # seconds before the 2nd attempt, doubled for each later one

PATHS = {
    "instance_id": "/latest/meta-data/instance-id",
    "availability_zone": "/latest/meta-data/placement/availability-zone",
    "region": "/latest/meta-data/placement/region",
    "identity_document": "/latest/dynamic/instance-identity/document",
}

HINT = ("hostagent needs IMDSv2 on this instance: metadata options HttpEndpoint=enabled, "
        "HttpTokens=required, and HttpPutResponseHopLimit=2 when it runs in a container "
        "(with hop limit 1 the token PUT answer never reaches the container and times out): "
        "aws ec2 modify-instance-metadata-options --instance-id <id> --http-endpoint enabled "
        "--http-tokens required --http-put-response-hop-limit 2")


def metadata_endpoint() -> str:
    """The IMDS base URL from the same environment variables botocore honours."""
    explicit = os.environ.get(ENDPOINT_ENV, "").strip()
    if explicit:
        return explicit.rstrip("/")
    if os.environ.get(ENDPOINT_MODE_ENV, "").strip().lower() == "ipv6":
        return IPV6_ENDPOINT
    return DEFAULT_ENDPOINT


class IMDS:
    """Instance metadata over IMDSv2. Every GET carries a session token; there is no IMDSv1 path."""

    def __init__(self, endpoint: str | None = None, *, timeout: tuple[float, float] = TIMEOUT,
                 attempts: int = ATTEMPTS, backoff: float = BACKOFF, token_ttl: int = TOKEN_TTL,
                 session=None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.endpoint = (endpoint or metadata_endpoint()).rstrip("/")
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.token_ttl = token_ttl
        self._session = session
        self._clock = clock
        self._sleep = sleep
        self._token: str | None = None
        self._token_expires = 0.0


    def instance_id(self) -> str:
        return self.get(PATHS["instance_id"]).strip()

    def availability_zone(self) -> str:
        return self.get(PATHS["availability_zone"]).strip()

    def region(self) -> str:
        return self.get(PATHS["region"]).strip()

    def identity_document(self) -> dict[str, Any]:
        text = self.get(PATHS["identity_document"])
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise OperationError("instance identity document is not a JSON object",
                                 where=self._url(PATHS["identity_document"]))
        return doc

    def identity(self) -> Identity:
        """Instance id, region and AZ from one consistent source: the identity document."""
        doc = self.identity_document()
        missing = [k for k in ("instanceId", "region", "availabilityZone") if not doc.get(k)]
        if missing:
            raise OperationError(f"instance identity document lacks {', '.join(missing)}",
                                 where=self._url(PATHS["identity_document"]))
        return Identity(instance_id=str(doc["instanceId"]), region=str(doc["region"]),
                        availability_zone=str(doc["availabilityZone"]))

    def get(self, path: str) -> str:
        """GET a metadata path with the session token; one fresh token is tried after a 401."""
        for attempt in range(2):
            response = self._request("GET", path, {TOKEN_HEADER: self._session_token()})
            if response.status_code == 200:
                return response.text
            if response.status_code == 401 and attempt == 0:
                # The token expired early or IMDS restarted: a new token is cheap, and IMDSv1
                # is never an option.
                log.debug("IMDS answered 401 for %s; fetching a new token", path)
                self._token = None
                continue
            if response.status_code == 404:
                raise OperationError(f"instance metadata has no {path}", where=self._url(path))
            raise OperationError(
                f"instance metadata answered HTTP {response.status_code} for {path}",
                where=self._url(path), hint=HINT)
        raise AssertionError("unreachable")


    def _url(self, path: str) -> str:
        return f"{self.endpoint}{path}"

    def _http(self):
        if self._session is None:
            import requests

            session = requests.Session()
            # Never via a proxy from HTTP_PROXY: IMDS is link-local, and it rejects token PUTs
            # that carry X-Forwarded-For, which proxies add.
            session.trust_env = False
            self._session = session
        return self._session

    def _session_token(self) -> str:
        now = self._clock()
        if self._token and now < self._token_expires - REFRESH_MARGIN:
            return self._token
        response = self._request("PUT", TOKEN_PATH, {TTL_HEADER: str(self.token_ttl)})
        token = response.text.strip() if response.status_code == 200 else ""
        if not token:
            raise OperationError(
                f"instance metadata refused an IMDSv2 token (HTTP {response.status_code})",
                where=self._url(TOKEN_PATH), hint=HINT)
        try:
            ttl = int(response.headers.get(TTL_HEADER, self.token_ttl))
        except ValueError:
            ttl = self.token_ttl
        self._token, self._token_expires = token, now + ttl
        return token

    def _request(self, method: str, path: str, headers: dict[str, str]):
        """One HTTP call with bounded retries on connection errors, timeouts and 5xx answers."""
        if os.environ.get(DISABLED_ENV, "").strip().lower() == "true":
            raise OperationError(f"instance metadata is disabled by {DISABLED_ENV}=true",
                                 where=self._url(path))
        import requests

        url = self._url(path)
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                self._sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._http().request(method, url, headers=headers, timeout=self.timeout,
                                                allow_redirects=False)
            except requests.Timeout:
                problem = f"no answer within {self.timeout[0]:g}+{self.timeout[1]:g} s"
            except requests.ConnectionError as exc:
                problem = f"cannot connect: {_first_line(exc)}"
            else:
                if response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}"
            log.debug("IMDS %s %s attempt %d/%d: %s", method, path, attempt + 1, self.attempts,
                      problem)
        raise OperationError(
            f"instance metadata {method} {path} failed after {self.attempts} attempts: {problem}",
            where=url, hint=HINT)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
