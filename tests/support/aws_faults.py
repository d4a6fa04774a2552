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
