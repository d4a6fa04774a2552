"""An IMDSv2 test server: moto serves no usable instance metadata, so this stands in for EC2's.

It requires a session token on every GET, as AWS does with HttpTokens=required, and never
answers IMDSv1-style requests. It is a hand-written fake because no real IMDS exists off EC2.
"""

from __future__ import annotations

import json
import secrets
import time
from http.server import BaseHTTPRequestHandler

from tests.support.loopback import LoopbackServer

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"


class IMDSServer(LoopbackServer):
    def __init__(self, instance_id="i-0123456789abcdef0", region="us-east-1",
                 availability_zone=None, host="127.0.0.1", port=0):
        self.instance_id = instance_id
        self.region = region
        self.availability_zone = availability_zone or f"{region}a"
        self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, had_valid_token)
        self.fail_next: list[int] = []  # status codes to answer next, for retry tests
        self.untokened_gets: list[str] = []  # paths of GETs sent with no token header (IMDSv1)
        # Seconds to stall before answering a token PUT: what a container sees with hop limit 1,
        # where the answer is dropped on the way back and the PUT just times out.
        self.put_delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes; with Nagle on, a kept-alive connection
            # waits ~40 ms for the delayed ACK on every answer.
            disable_nagle_algorithm = True

            def log_message(self, *a):  # keep test output clean
                pass

            def _send(self, status, body=b"", ctype="text/plain"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                server.requests.append(("PUT", self.path, False))
                if server.put_delay:
                    time.sleep(server.put_delay)
                if server.fail_next:
                    return self._send(server.fail_next.pop(0))
                if self.path != TOKEN_PATH:
                    return self._send(404)
                try:
                    ttl = int(self.headers.get(TTL_HEADER, ""))
                except ValueError:
                    return self._send(400)
                if not 1 <= ttl <= 21600:
                    return self._send(400)
                token = secrets.token_urlsafe(24)
                server.tokens[token] = time.monotonic() + ttl
                self.send_response(200)
                self.send_header(TTL_HEADER, str(ttl))
                self.send_header("Content-Length", str(len(token)))
                self.end_headers()
                self.wfile.write(token.encode())

            def do_GET(self):
                token = self.headers.get(TOKEN_HEADER)
                if token is None:
                    server.untokened_gets.append(self.path)
                valid = token in server.tokens and server.tokens[token] > time.monotonic()
                server.requests.append(("GET", self.path, valid))
                if server.fail_next:
                    return self._send(server.fail_next.pop(0))
                if not valid:
                    return self._send(401)
                body = server.answer(self.path)
                if body is None:
                    return self._send(404)
                ctype = "application/json" if body.startswith("{") else "text/plain"
                self._send(200, body.encode(), ctype)

        self.serve(Handler, host, port)

    def answer(self, path: str) -> str | None:
        doc = {
            "instanceId": self.instance_id,
            "region": self.region,
            "availabilityZone": self.availability_zone,
            "accountId": "123456789012",
            "instanceType": "t3.medium",
        }
        return {
            "/latest/meta-data/instance-id": self.instance_id,
            "/latest/meta-data/placement/availability-zone": self.availability_zone,
            "/latest/meta-data/placement/region": self.region,
            "/latest/dynamic/instance-identity/document": json.dumps(doc),
        }.get(path)

    @property
    def url(self) -> str:
        return self.base_url

    def expire_tokens(self) -> None:
        self.tokens.clear()



if __name__ == "__main__":  # used by the VM test: python -m tests.support.imds PORT INSTANCE AZ
    import sys

    port = int(sys.argv[1])
    srv = IMDSServer(instance_id=sys.argv[2], availability_zone=sys.argv[3],
                     region=sys.argv[3][:-1], port=port)
    srv.httpd.serve_forever()
