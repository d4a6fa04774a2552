"""CouchDB over HTTP: is it ready (/_up, or the welcome on servers without it), and is it exposed."""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from hostagent.log import get_logger

log = get_logger(__name__)

# Backoff between probes: start fast, double. While nothing listens a probe is one refused SYN on
# loopback, so we keep probing every 250 ms and notice a server that comes up within ~250 ms;
# once the server answers (maintenance, seeding) or hangs, back off to 1 s to leave it alone.
FIRST_DELAY = 0.05
CAP_WHILE_REFUSED = 0.25
CAP_WHILE_ANSWERING = 1.0
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0
MIN_REQUEST_TIMEOUT = 0.05
# /_up answers 404 with one of these while the node must not take traffic (CouchDB 3).
NOT_READY_STATES = ("maintenance_mode", "nolb", "seeding")
# Admin-only endpoints, newest CouchDB first: 2.x/3.x per-node config, then 1.x (and PouchDB).
ADMIN_ONLY_PATHS = ("/_node/_local/_config", "/_config")
# Our credentials were sent and refused (401/403): not the same as "unauthorized", where a probe
# without credentials was asked for some.
BAD_CREDENTIALS = "bad-credentials"
LOCALDOMAIN = "localhost.localdomain"
HOSTS_HINT = "add `127.0.0.1 localhost localhost.localdomain` to /etc/hosts"


@dataclass(frozen=True)
class Readiness:
    ready: bool
    state: str  # up | down | maintenance_mode | nolb | seeding | unauthorized | bad-credentials | error | unresolved
    reason: str  # one line for the operator; never carries credentials
    via: str = "/_up"

    @property
    def answered(self) -> bool:
        """The server spoke HTTP (as opposed to refused, timed out, unresolvable)."""
        return self.state not in ("down", "unresolved")


@dataclass(frozen=True)
class WaitResult:
    readiness: Readiness
    attempts: int
    elapsed: float

    @property
    def ready(self) -> bool:
        return self.readiness.ready


@dataclass(frozen=True)
class PostureCheck:
    name: str
    ok: bool | None  # None: could not tell (CouchDB not answering)
    detail: str


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    pid: int | None
    process: str | None

    def describe(self) -> str:
        who = f" ({self.process} pid {self.pid})" if self.process else (
            f" (pid {self.pid})" if self.pid else "")
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}{who}"


def redact_url(url: str) -> str:
    """The URL without user:password@, for every message and log line."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def base_url(url: str) -> str:
    return redact_url(url).rstrip("/")


def url_credentials(url: str) -> tuple[str, str] | None:
    parts = urlsplit(url)
    if parts.username is None:
        return None
    from urllib.parse import unquote

    return unquote(parts.username), unquote(parts.password or "")


def url_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def resolve_problem(url: str, resolver=socket.getaddrinfo) -> tuple[str, str | None] | None:
    """(message, hint) when the URL's host name does not resolve here, else None.

    Debian and Amazon Linux 2023 do not put localhost.localdomain in /etc/hosts, so the
    default couchdb.url fails there before any packet is sent; say that plainly.
    """
    host, port = url_host_port(url)
    if not host:
        return f"couchdb.url {redact_url(url)} has no host", None
    try:
        resolver(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        detail = getattr(exc, "strerror", None) or str(exc)
        if host == LOCALDOMAIN:
            return (f"{LOCALDOMAIN} does not resolve on this host ({detail})", HOSTS_HINT)
        return f"{host} does not resolve ({detail})", None
    return None


def _json_or_none(response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def interpret_up(status_code: int, body: Any) -> Readiness | None:
    """Readiness from a GET /_up answer; None means 'no /_up here' (fall back to the welcome)."""
    status = body.get("status") if isinstance(body, dict) else None
    if status_code == 200 and status == "ok":
        return Readiness(True, "up", "GET /_up: 200 status ok")
    if status_code == 404 and isinstance(status, str) and status:
        return Readiness(False, status if status in NOT_READY_STATES else "error",
                         f"CouchDB says {status} (GET /_up: 404)")
    if status_code == 404 and isinstance(body, dict) and body.get("error") == "not_found":
        return None
    if status_code in (401, 403):
        # require_valid_user without require_valid_user_except_for_up: /_up wants credentials.
        return Readiness(False, "unauthorized", f"GET /_up needs credentials (HTTP {status_code})")
    if status_code == 200:
        return Readiness(False, "error", f"GET /_up: 200 but status {status!r}")
    return Readiness(False, "error", f"GET /_up: HTTP {status_code}")


def interpret_welcome(status_code: int, body: Any) -> Readiness:
    """Readiness from GET / on servers without /_up (CouchDB 1.x, PouchDB Server)."""
    if status_code == 200 and isinstance(body, dict) and ("couchdb" in body or "express-pouchdb" in body):
        product = "CouchDB" if "couchdb" in body else "PouchDB Server"
        if body.get("version"):
            product += f" {body['version']}"
        return Readiness(True, "up", f"GET /: {product} welcome (no /_up)", via="/")
    if status_code in (401, 403):
        return Readiness(False, "unauthorized", f"GET / needs credentials (HTTP {status_code})", via="/")
    return Readiness(False, "error", f"GET /: HTTP {status_code}, not a CouchDB welcome", via="/")


def describe_request_error(exc: BaseException, timeout: float) -> Readiness:
    """A requests exception → the one reason an operator needs: refused, timed out, unresolvable."""
    import requests

    seen = set()
    stack = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, socket.gaierror):
            return Readiness(False, "unresolved", f"cannot resolve host ({cur.strerror or cur})")
        if isinstance(cur, ConnectionRefusedError) or getattr(cur, "errno", None) == errno.ECONNREFUSED:
            return Readiness(False, "down", "connection refused")
        stack.extend([getattr(cur, "reason", None), cur.__cause__, cur.__context__])
        stack.extend(a for a in getattr(cur, "args", ()) if isinstance(a, BaseException))
    if isinstance(exc, requests.exceptions.Timeout):
        return Readiness(False, "down", f"timed out after {timeout:.1f}s")
    text = str(exc)
    if "refused" in text.lower():
        return Readiness(False, "down", "connection refused")
    if "resolution" in text.lower() or "Name or service not known" in text:
        return Readiness(False, "unresolved", "cannot resolve host")
    return Readiness(False, "down", f"{type(exc).__name__}")


def new_session():
    import requests

    session = requests.Session()
    # A host-local service: no proxy from the environment, and no ~/.netrc credentials sneaking
    # into the unauthenticated security probes.
    session.trust_env = False
    session.headers["Accept"] = "application/json"  # PouchDB answers HTML otherwise
    return session


def probe_readiness(url: str, *, session=None, timeout: float = READ_TIMEOUT,
                    auth: tuple[str, str] | None = None, auth_source: str = "") -> Readiness:
    """One look: GET /_up, falling back to GET / when the server has no /_up.

    auth: (name, password) to send (couchdb.admin_secret), else the URL's own credentials, if
    any. When credentials were sent and refused, the state is bad-credentials, whose reason
    names the user and auth_source (where the password came from), never the password."""
    import requests

    session = session or new_session()
    base = base_url(url)
    auth = auth or url_credentials(url)
    limits = (min(CONNECT_TIMEOUT, timeout), timeout)
    try:
        response = session.get(f"{base}/_up", timeout=limits, auth=auth, allow_redirects=False)
        verdict = interpret_up(response.status_code, _json_or_none(response))
        if verdict is None:
            response = session.get(f"{base}/", timeout=limits, auth=auth, allow_redirects=False)
            verdict = interpret_welcome(response.status_code, _json_or_none(response))
    except requests.exceptions.RequestException as exc:
        return describe_request_error(exc, timeout)
    if auth is not None and verdict.state == "unauthorized":
        source = f" from {auth_source}" if auth_source else ""
        return Readiness(False, BAD_CREDENTIALS,
                         f"CouchDB refused the password of {auth[0]!r}{source} (GET "
                         f"{verdict.via}: HTTP {response.status_code})", verdict.via)
    return verdict


def backoff_delays(first: float = FIRST_DELAY) -> Iterator[float]:
    """50 ms, 100 ms, 200 ms, … uncapped; the caller applies the cap that fits the last answer."""
    delay = first
    while True:
        yield delay
        delay *= 2


def wait_until_ready(
    url: str,
    timeout: float,
    *,
    session=None,
    clock: Callable[[], float] = time.monotonic,
    stop: threading.Event | None = None,
    on_change: Callable[[Readiness], None] | None = None,
    probe: Callable[..., Readiness] = probe_readiness,
    auth: tuple[str, str] | None = None,
    auth_source: str = "",
) -> WaitResult:
    """Probe until ready or the hard deadline; each state change is reported once via on_change."""
    session = session or new_session()
    stop = stop or threading.Event()
    start = clock()
    deadline = start + max(timeout, 0.0)
    delays = backoff_delays()
    attempts = 0
    last: Readiness | None = None
    while True:
        remaining = deadline - clock()
        per_request = max(min(READ_TIMEOUT, remaining), MIN_REQUEST_TIMEOUT)
        creds = {"auth": auth, "auth_source": auth_source} if auth else {}
        result = probe(url, session=session, timeout=per_request, **creds)
        attempts += 1
        if on_change and (last is None or (result.state, result.reason) != (last.state, last.reason)):
            on_change(result)
        last = result
        if result.ready:
            return WaitResult(result, attempts, clock() - start)
        remaining = deadline - clock()
        if remaining <= 0 or stop.is_set():
            return WaitResult(result, attempts, clock() - start)
        cap = CAP_WHILE_ANSWERING if result.answered or "timed out" in result.reason else CAP_WHILE_REFUSED
        if stop.wait(min(next(delays), cap, remaining)):
            return WaitResult(result, attempts, clock() - start)


def probe_admin_party(url: str, *, session=None, timeout: float = READ_TIMEOUT) -> PostureCheck:
    """Does CouchDB grant admin rights to anonymous requests? Never sends credentials."""
    import requests

    session = session or new_session()
    base = base_url(url)
    limits = (min(CONNECT_TIMEOUT, timeout), timeout)
    try:
        # /_session names the roles an anonymous request gets, on every CouchDB and PouchDB.
        response = session.get(f"{base}/_session", timeout=limits, auth=None, allow_redirects=False)
        body = _json_or_none(response)
        roles = ((body or {}).get("userCtx") or {}).get("roles") if isinstance(body, dict) else None
        if response.status_code == 200 and isinstance(roles, list) and "_admin" in roles:
            return PostureCheck("admin-party", False,
                                "admin party: requests without credentials are server admin "
                                "(GET /_session gives role _admin); create an admin user")
        for path in ADMIN_ONLY_PATHS:
            response = session.get(f"{base}{path}", timeout=limits, auth=None, allow_redirects=False)
            if response.status_code == 200:
                return PostureCheck("admin-party", False,
                                    f"admin party: admin-only GET {path} answered 200 without "
                                    "credentials; create an admin user")
            if response.status_code in (401, 403):
                return PostureCheck("admin-party", True,
                                    f"admin-only GET {path} refused without credentials "
                                    f"(HTTP {response.status_code})")
        return PostureCheck("admin-party", None,
                            "could not tell: no admin-only endpoint answered 200 or 401")
    except requests.exceptions.RequestException as exc:
        reason = describe_request_error(exc, timeout).reason
        return PostureCheck("admin-party", None, f"not checked: {reason}")


def probe_admin_auth(url: str, auth: tuple[str, str], *, source: str, session=None,
                     timeout: float = READ_TIMEOUT) -> PostureCheck:
    """Do these credentials make us server admin? GET /_session with them: CouchDB and PouchDB
    answer 401 to a wrong password on any path, and name the user and its roles otherwise."""
    import requests

    session = session or new_session()
    limits = (min(CONNECT_TIMEOUT, timeout), timeout)
    name = auth[0]
    try:
        response = session.get(f"{base_url(url)}/_session", timeout=limits, auth=auth,
                               allow_redirects=False)
    except requests.exceptions.RequestException as exc:
        return PostureCheck("admin-auth", None, f"not checked: "
                                                f"{describe_request_error(exc, timeout).reason}")
    if response.status_code in (401, 403):
        return PostureCheck("admin-auth", False,
                            f"bad credentials: CouchDB refused the password of {name!r} from "
                            f"{source} (GET /_session: HTTP {response.status_code})")
    body = _json_or_none(response)
    ctx = (body or {}).get("userCtx") if isinstance(body, dict) else None
    ctx = ctx if isinstance(ctx, dict) else {}
    roles = ctx.get("roles") if isinstance(ctx.get("roles"), list) else []
    if response.status_code != 200:
        return PostureCheck("admin-auth", None, f"not checked: GET /_session: HTTP "
                                                f"{response.status_code}")
    if ctx.get("name") != name:
        return PostureCheck("admin-auth", False, f"bad credentials: CouchDB did not log in "
                                                 f"{name!r} from {source} (GET /_session)")
    if "_admin" not in roles:
        return PostureCheck("admin-auth", False, f"{name!r} from {source} logs in but is not a "
                                                 "server admin (no _admin role)")
    return PostureCheck("admin-auth", True, f"{name!r} from {source} is server admin")


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def exposed_listeners(port: int, connections=None) -> list[Listener]:
    """TCP listeners on `port` bound to anything but loopback (0.0.0.0, ::, a NIC address).

    This is how a published container port looks on the host: docker-proxy listening on
    0.0.0.0:5984, reachable from the VPC unless a security group stops it.
    """
    import psutil

    if connections is None:
        connections = psutil.net_connections(kind="tcp")
    found = []
    for conn in connections:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port:
            continue
        if is_loopback(conn.laddr.ip):
            continue
        found.append(Listener(conn.laddr.ip, conn.laddr.port, conn.pid, _process_name(conn.pid)))
    return sorted(set(found), key=lambda l: (l.address, l.pid or 0))


def _process_name(pid: int | None) -> str | None:
    if not pid:
        return None
    import psutil

    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return None


def exposure_check(url: str, connections=None) -> PostureCheck:
    _, port = url_host_port(url)
    try:
        listeners = exposed_listeners(port, connections)
    except Exception as exc:  # psutil: AccessDenied in a locked-down sandbox, odd /proc
        return PostureCheck("exposed-port", None, f"could not list listening sockets: {exc}")
    if not listeners:
        return PostureCheck("exposed-port", True, f"port {port} is not listening on a non-loopback "
                                                  "address")
    where = ", ".join(l.describe() for l in listeners)
    return PostureCheck("exposed-port", False,
                        f"port {port} listens on {where}: reachable from the network unless a "
                        "security group blocks it")
