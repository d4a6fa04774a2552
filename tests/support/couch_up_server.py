"""A tiny HTTP server that answers CouchDB 3's /_up states: a hand-written fake, on purpose.

Apache CouchDB is not installable here and pouchdb-server has no /_up at all, so no real server
on this machine can answer 404 {"status": "maintenance_mode"|"nolb"|"seeding"} or 200
{"status": "ok"}. The bodies and codes are CouchDB 3's (chttpd_misc:handle_up_req). Tests script
the sequence of states; everything else answers 404 not_found like CouchDB.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler

from tests.support.loopback import LoopbackServer


class CouchUpServer(LoopbackServer):
    def __init__(self, states=("ok",), host="127.0.0.1", port=0):
        self.states = list(states)  # consumed one per /_up request; the last one repeats
        self.lock = threading.Lock()
        self.requests: list[tuple[str, dict]] = []  # (path, headers)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _json(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.requests.append((self.path, dict(self.headers)))
                if self.path == "/_up":
                    with server.lock:
                        state = server.states.pop(0) if len(server.states) > 1 else server.states[0]
                    if state == "ok":
                        return self._json(200, {"status": "ok", "seeds": {}})
                    return self._json(404, {"status": state})
                if self.path == "/":
                    return self._json(200, {"couchdb": "Welcome", "version": "3.3.3"})
                return self._json(404, {"error": "not_found", "reason": "missing"})

        self.serve(Handler, host, port)

    @property
    def url(self) -> str:
        return self.base_url

    def up_requests(self) -> int:
        return sum(1 for path, _ in self.requests if path == "/_up")

