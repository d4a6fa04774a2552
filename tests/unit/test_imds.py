"""IMDSv2 client against the IMDSv2 test server (tests/support/imds.py, a hand-written stand-in:
no real IMDS exists off EC2) and, for timeouts, a socket that accepts connections and never answers.
"""

from __future__ import annotations

import socket
import time

import pytest

from hostagent.aws.imds import IMDS, TTL_HEADER, metadata_endpoint
from hostagent.aws.volume import Identity
from hostagent.errors import OperationError

FAST = dict(timeout=(0.5, 0.5), backoff=0.01)


def puts(srv) -> int:
    return sum(1 for method, path, _ in srv.requests if method == "PUT")


def test_identity_from_the_document(imds):
    srv = imds(instance_id="i-0abc", region="eu-west-1", availability_zone="eu-west-1c")
    client = IMDS(**FAST)
    assert client.identity() == Identity("i-0abc", "eu-west-1", "eu-west-1c")
    assert client.instance_id() == "i-0abc"
    assert client.availability_zone() == "eu-west-1c"
    assert client.region() == "eu-west-1"
    assert client.identity_document()["accountId"] == "123456789012"
    assert srv.untokened_gets == []


def test_endpoint_comes_from_the_environment(imds, monkeypatch):
    srv = imds()
    assert IMDS().endpoint == srv.url == metadata_endpoint()
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", srv.url + "/")
    assert metadata_endpoint() == srv.url
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT")
    assert metadata_endpoint() == "http://169.254.169.254"
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")
    assert metadata_endpoint() == "http://[fd00:ec2::254]"


def test_token_is_put_once_and_reused(imds):
    srv = imds()
    client = IMDS(**FAST)
    for _ in range(3):
        client.instance_id()
    client.identity()
    assert puts(srv) == 1
    gets = [r for r in srv.requests if r[0] == "GET"]
    assert len(gets) == 4 and all(valid for _, _, valid in gets)
    assert srv.untokened_gets == []


def test_token_request_asks_for_a_ttl(imds):
    srv = imds()
    seen = {}
    import requests

    class Recording(requests.Session):
        def request(self, method, url, **kw):
            seen.setdefault(method, kw["headers"])
            assert kw["timeout"] == FAST["timeout"]  # explicit timeouts on every call
            return super().request(method, url, **kw)

    IMDS(session=Recording(), **FAST).instance_id()
    assert seen["PUT"] == {TTL_HEADER: "21600"}
    assert "X-aws-ec2-metadata-token" in seen["GET"]
    assert puts(srv) == 1


def test_refreshes_the_token_after_a_401(imds):
    srv = imds()
    client = IMDS(**FAST)
    client.instance_id()
    srv.expire_tokens()  # IMDS forgot our token: the next GET gets 401
    assert client.instance_id() == srv.instance_id
    assert puts(srv) == 2
    assert [valid for m, _, valid in srv.requests if m == "GET"] == [True, False, True]
    assert srv.untokened_gets == []


def test_refreshes_the_token_before_it_expires(imds):
    srv = imds()
    now = [1000.0]
    client = IMDS(clock=lambda: now[0], token_ttl=120, **FAST)
    client.instance_id()
    now[0] += 30
    client.instance_id()
    assert puts(srv) == 1
    now[0] += 40  # 70 s of 120: inside the refresh margin, so a new token before the GET
    client.instance_id()
    assert puts(srv) == 2
    assert all(valid for m, _, valid in srv.requests if m == "GET")


def test_retries_after_a_500(imds):
    srv = imds()
    srv.fail_next = [500, 503]
    client = IMDS(attempts=3, **FAST)
    assert client.instance_id() == srv.instance_id
    assert [m for m, _, _ in srv.requests] == ["PUT", "PUT", "PUT", "GET"]


def test_gives_up_after_bounded_retries_with_the_hop_limit_hint(imds):
    srv = imds()
    srv.fail_next = [500] * 10
    client = IMDS(attempts=3, **FAST)
    with pytest.raises(OperationError) as err:
        client.instance_id()
    assert len(srv.requests) == 3
    assert "failed after 3 attempts: HTTP 500" in str(err.value)
    assert "HttpPutResponseHopLimit=2" in err.value.hint and "HttpTokens" in err.value.hint
    assert srv.untokened_gets == []  # no IMDSv1 fallback when the token cannot be had


def test_refused_token_is_an_error_not_an_imdsv1_fallback(imds):
    srv = imds()
    srv.fail_next = [403]
    with pytest.raises(OperationError, match=r"refused an IMDSv2 token \(HTTP 403\)"):
        IMDS(**FAST).instance_id()
    assert [m for m, _, _ in srv.requests] == ["PUT"]


def test_missing_path_is_a_404_error(imds):
    imds()
    with pytest.raises(OperationError, match="instance metadata has no /latest/meta-data/nope"):
        IMDS(**FAST).get("/latest/meta-data/nope")


def test_timeout_to_a_silent_server_is_bounded():
    """A socket that accepts connections (the kernel does, via the backlog) but never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        host, port = silent.getsockname()
        client = IMDS(f"http://{host}:{port}", timeout=(0.3, 0.3), attempts=2, backoff=0.05)
        start = time.monotonic()
        with pytest.raises(OperationError) as err:
            client.instance_id()
        elapsed = time.monotonic() - start
    assert elapsed < 2.0, elapsed  # 2 attempts x 0.3 s read timeout + 0.05 s backoff
    assert "no answer within" in str(err.value) and "after 2 attempts" in str(err.value)
    assert "HttpPutResponseHopLimit=2" in err.value.hint


def test_dropped_token_answer_times_out_like_hop_limit_1(imds):
    srv = imds()
    srv.put_delay = 1.0
    start = time.monotonic()
    with pytest.raises(OperationError, match="PUT /latest/api/token failed after 2 attempts"):
        IMDS(timeout=(0.3, 0.2), attempts=2, backoff=0.01).instance_id()
    assert time.monotonic() - start < 1.5
    assert srv.untokened_gets == [] and not [r for r in srv.requests if r[0] == "GET"]


def test_nothing_listening_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(OperationError, match="cannot connect"):
            IMDS(f"http://127.0.0.1:{port}", attempts=2, **FAST).instance_id()


def test_disabled_by_environment(imds, monkeypatch):
    srv = imds()
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(OperationError, match="disabled by AWS_EC2_METADATA_DISABLED"):
        IMDS(**FAST).instance_id()
    assert srv.requests == []


def test_proxy_settings_are_ignored(imds, monkeypatch):
    """IMDS refuses token PUTs that carry X-Forwarded-For: a proxy must never sit in between."""
    srv = imds()
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing there
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert IMDS(**FAST).instance_id() == srv.instance_id


def test_identity_document_missing_keys(imds, monkeypatch):
    srv = imds()
    monkeypatch.setattr(srv, "answer", lambda path: '{"instanceId": "i-1"}')
    with pytest.raises(OperationError, match="lacks region, availabilityZone"):
        IMDS(**FAST).identity()
