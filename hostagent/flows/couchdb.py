"""wait-couchdb (block until /_up says ok, or fail with the last reason) and check-couchdb (readiness + security)."""

from __future__ import annotations

import sys

from hostagent.errors import EXIT_FAILED, EXIT_OK, CheckFailed, ConfigError, UsageError
from hostagent.report import Report, render_table


def _timeout(args, default: float) -> float:
    value = getattr(args, "timeout", None)
    if value is None:
        return float(default)
    if value < 0 or value != value:  # NaN
        raise UsageError(f"--timeout must be zero or more seconds, not {value}")
    return float(value)


def _url(config) -> str:
    if not config.couchdb.url:
        raise ConfigError("couchdb.url is not set", where=config.source,
                          hint='set [couchdb] url = "http://localhost.localdomain:5984"')
    return config.couchdb.url


def _say(readiness) -> None:
    # Progress goes to stderr, one line per change of state, so --json stdout stays one object.
    print(f"hostagent: couchdb: {readiness.reason}", file=sys.stderr, flush=True)


def run_wait(ctx, args) -> Report:
    from hostagent.adapters import couchdb

    config = ctx.config
    url = _url(config)
    shown = couchdb.redact_url(url)
    timeout = _timeout(args, config.couchdb.timeout)
    problem = couchdb.resolve_problem(url)
    host, _ = couchdb.url_host_port(url)
    if problem and host == couchdb.LOCALDOMAIN:
        # /etc/hosts does not change by waiting: say so now rather than after the timeout.
        raise CheckFailed(problem[0], where=shown, hint=problem[1])
    result = couchdb.wait_until_ready(url, timeout, on_change=None if ctx.json else _say)
    r = result.readiness
    payload = {"url": shown, "ready": r.ready, "state": r.state,
               "reason": r.reason, "via": r.via, "elapsed": round(result.elapsed, 3),
               "attempts": result.attempts}
    if not r.ready:
        hint = None
        if r.state == "unresolved" and problem:
            hint = problem[1]
        elif r.state == "unauthorized":
            hint = ("set [couchdb] url with credentials, or require_valid_user_except_for_up = "
                    "true in CouchDB's [chttpd]")
        raise CheckFailed(f"CouchDB not ready after {timeout:g}s: {r.reason}", where=shown,
                          hint=hint)
    text = f"CouchDB ready at {shown} after {result.elapsed:.2f}s ({r.reason})"
    return Report(ok=True, key="couchdb", items=payload, text=text, exit_code=EXIT_OK)


def run_check(ctx, args) -> Report:
    """One look (or wait up to --timeout) at readiness, then the security posture as warnings."""
    from hostagent.adapters import couchdb

    config = ctx.config
    url = _url(config)
    shown = couchdb.redact_url(url)
    timeout = _timeout(args, 0)
    source = config.couchdb.admin_secret
    secret, secret_error = admin_secret(config) if source else (None, None)
    auth = (secret.name, secret.password) if secret else None
    problem = couchdb.resolve_problem(url)
    if problem:
        readiness = couchdb.Readiness(False, "unresolved", problem[0])
    elif timeout > 0:
        readiness = couchdb.wait_until_ready(url, timeout, auth=auth,
                                             auth_source=source).readiness
    else:
        readiness = couchdb.probe_readiness(url, auth=auth, auth_source=source)
    checks = [couchdb.PostureCheck("ready", readiness.ready, readiness.reason)]
    if source:
        # A wrong password is its own failure (FAIL, state bad-credentials), not a warning.
        if secret_error is not None:
            checks.append(couchdb.PostureCheck("admin-auth", False, "cannot fetch the admin "
                                               f"secret: {secret_error}"))
        elif readiness.answered or readiness.state == couchdb.BAD_CREDENTIALS:
            checks.append(couchdb.probe_admin_auth(url, auth, source=source))
        else:
            checks.append(couchdb.PostureCheck("admin-auth", None,
                                               "not checked: CouchDB is not answering"))
    if readiness.answered:
        checks.append(couchdb.probe_admin_party(url))
    else:
        checks.append(couchdb.PostureCheck("admin-party", None,
                                           "not checked: CouchDB is not answering"))
    checks.append(couchdb.exposure_check(url))
    label = {True: "ok", False: "WARN", None: "-"}
    rows = [("ok" if c.ok else "FAIL" if c.ok is False else "-", c.name, c.detail)
            if c.name in ("ready", "admin-auth")
            else (label[c.ok], c.name, c.detail) for c in checks]
    auth_failed = any(c.name == "admin-auth" and c.ok is False for c in checks)
    text = render_table(rows, ("RESULT", "CHECK", "DETAIL"))
    if problem and problem[1]:
        text += f"\nhint: {problem[1]}"
    warnings = [c for c in checks if c.ok is False and c.name not in ("ready", "admin-auth")]
    ok = readiness.ready and not warnings and not auth_failed
    text += f"\n{shown}: " + ("ready, no security warnings" if ok else
                              f"{'ready' if readiness.ready else 'NOT ready'}, "
                              + ("admin credentials refused, " if auth_failed else "")
                              + f"{len(warnings)} security warning(s)")
    if secret_error is not None and secret_error.hint:
        text += f"\nhint: {secret_error.hint}"
    items = [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]
    state = "up" if readiness.ready else readiness.state
    if auth_failed and secret_error is None:
        state = couchdb.BAD_CREDENTIALS
    return Report(ok=ok, key="checks", items=items, text=text,
                  exit_code=EXIT_OK if ok else EXIT_FAILED,
                  extra={"url": shown, "state": state})


def admin_secret(config):
    from hostagent.aws.clients import AWS
    from hostagent.couchdb_admin import try_fetch_admin_secret

    return try_fetch_admin_secret(AWS(), config.couchdb.admin_secret)
