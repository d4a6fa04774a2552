"""qemu guestfwd helper: relay one guest TCP connection (our stdin/stdout) to HOST PORT.

qemu's user network starts this program once per guest connection
(`guestfwd=tcp:ADDR:PORT-cmd:python3 relay.py 127.0.0.1 PORT`), which serves repeated
connections and the IMDSv2 PUT-then-GET, unlike a plain `-tcp:` forward (one connection only).
Usage: relay.py HOST PORT
"""

import os
import selectors
import socket
import sys


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    try:
        upstream = socket.create_connection((host, port), timeout=10)
    except OSError:
        return 1
    upstream.settimeout(None)
    guest_in, guest_out = sys.stdin.fileno(), sys.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(guest_in, selectors.EVENT_READ, "guest")
    sel.register(upstream, selectors.EVENT_READ, "upstream")
    while True:
        events = sel.select(timeout=300)
        if not events:  # an idle connection: let qemu close it
            return 0
        for key, _ in events:
            if key.data == "guest":
                data = os.read(guest_in, 65536)
                if not data:  # the guest closed its side; the server may still answer
                    sel.unregister(guest_in)
                    try:
                        upstream.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                upstream.sendall(data)
            else:
                data = upstream.recv(65536)
                if not data:  # the server is done: so is the guest's connection
                    return 0
                view = memoryview(data)
                while view:
                    view = view[os.write(guest_out, view):]

if __name__ == "__main__":
    sys.exit(main())
