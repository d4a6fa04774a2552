"""Fault injection for boto3 clients: moto has none, so a botocore before-send hook answers.

The hook returns a real botocore AWSResponse, so botocore's own parsing and retry machinery run
on it exactly as on an answer from AWS; calls the hook lets through go to the real server.
"""

from __future__ import annotations

from botocore.awsrequest import AWSResponse

EC2_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}'
                 '</Code><Message>{message}</Message></Error></Errors>'
                 '<RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>')


class _Raw:
    """The raw-body interface AWSResponse reads (`stream()`), over fixed bytes."""

    def __init__(self, body: bytes):
        self._body = body

    def stream(self, **_):
        yield self._body


def ec2_error(status: int, code: str, message: str = "injected") -> AWSResponse:
    body = EC2_ERROR_XML.format(code=code, message=message).encode()
    return AWSResponse("https://ec2.injected/", status, {"Content-Type": "text/xml"}, _Raw(body))


def ec2_body(status: int, xml: str) -> AWSResponse:
    return AWSResponse("https://ec2.injected/", status, {"Content-Type": "text/xml"},
                       _Raw(xml.encode()))


def inject(client, service_operation: str, responses) -> list[str]:
    """Answer the next len(responses) calls of e.g. "ec2.DescribeVolumes" with these responses.

    Returns a list that gets one entry per call made ("injected" or "sent"), retries included.
    """
    queue = list(responses)
    calls: list[str] = []

    def hook(request, **_):
        if queue:
            calls.append("injected")
            return queue.pop(0)
        calls.append("sent")
        return None

    client.meta.events.register(f"before-send.{service_operation}", hook)
    return calls


S3_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                '<Message>{message}</Message><RequestId>0000000000000000</RequestId></Error>')


def s3_error(status: int, code: str, message: str = "injected") -> AWSResponse:
    body = S3_ERROR_XML.format(code=code, message=message).encode()
    return AWSResponse("https://s3.injected/", status, {"Content-Type": "application/xml"},
                       _Raw(body))


def _body(request) -> str:
    body = request.body or ""
    return body.decode() if isinstance(body, bytes) else str(body)


class NotVisibleYet:
    """EC2's eventual consistency, played with botocore hooks: ids that watched create calls
    return are answered NotFound by the next `times` calls naming them (in the request body).

        hide = NotVisibleYet(times=3)
        hide.watch(aws.ec2, "CreateSnapshot", "SnapshotId")
        hide.answer_not_found(aws.ec2, "DescribeSnapshots", "InvalidSnapshot.NotFound")
    """

    def __init__(self, times: int):
        self.times = times
        self.new_ids: list[str] = []
        self.injected: list[str] = []  # "Operation id" per NotFound answered

    def watch(self, client, operation: str, id_key: str) -> "NotVisibleYet":
        def created(parsed, **_):
            if parsed.get(id_key):
                self.new_ids.append(parsed[id_key])

        client.meta.events.register(f"after-call.ec2.{operation}", created)
        return self

    def answer_not_found(self, client, operation: str, code: str) -> "NotVisibleYet":
        def hook(request, **_):
            body = _body(request)
            named = next((i for i in self.new_ids if i in body), None)
            if named and len(self.injected) < self.times:
                self.injected.append(f"{operation} {named}")
                return ec2_error(400, code, f"The id '{named}' does not exist.")
            return None

        client.meta.events.register(f"before-send.ec2.{operation}", hook)
        return self


def lose_answers(client, service_operation: str, times: int = 1) -> list[str]:
    """The next `times` calls of e.g. "ec2.CreateSnapshot" reach the server and are carried out,
    but their answer is lost: the client sees a read timeout (what botocore then retries).

    Returns a list that gets "lost" per lost answer and "sent" per call let through."""
    import requests
    from botocore.exceptions import ReadTimeoutError

    calls: list[str] = []

    def hook(request, **_):
        if calls.count("lost") >= times:
            calls.append("sent")
            return None
        calls.append("lost")
        requests.request(request.method, request.url, headers=dict(request.headers),
                         data=request.body, timeout=30)
        raise ReadTimeoutError(endpoint_url=request.url)

    client.meta.events.register(f"before-send.{service_operation}", hook)
    return calls
