"""The plumbing shared by the small test servers: a threaded HTTP server on loopback."""

from __future__ import annotations

import sys
import threading
from http.server import ThreadingHTTPServer


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Clients that time out on purpose (the hop-limit tests) close before our answer arrives.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class LoopbackServer:
    """Subclasses build a handler class, then call self.serve(handler, host, port)."""

    def serve(self, handler, host: str, port: int) -> None:
        self.httpd = QuietServer((host, port), handler)
        # A short poll interval makes stop() (shutdown) return in ~50 ms instead of 0.5 s.
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
