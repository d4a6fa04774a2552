"""hostagent agent: periodic mount/CouchDB/snapshot checks, ECS attributes on change, systemd notify + watchdog."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from hostagent.errors import EXIT_FAILED, EXIT_OK
from hostagent.log import get_logger
from hostagent.report import Report, render_table

log = get_logger("hostagent.agent")

MOUNTINFO = "/proc/self/mountinfo"
# While the ECS agent has not registered yet, look again this often (a GET on loopback), so the
# attribute lands seconds after registration rather than a whole interval later.
INTROSPECTION_RETRY = 5.0
# A change of our own mount (umount, remount ro, another device) triggers a round at once; other
# mount table changes (every container start adds overlay, shm and netns mounts) cost one parse of
# mountinfo and nothing more. Rounds triggered that way are still at least this far apart.
MOUNT_EVENT_MIN_GAP = 0.2
COUCHDB_PROBE_TIMEOUT = 3.0
AWS_CALL_TIMEOUT = 120.0
AWS_RETRY_MAX = 300.0  # failed AWS calls back off from one interval up to this
METRICS_FLUSH_EVERY = 300.0  # seconds; samples are buffered with their own timestamps
METRICS_BUFFER_MAX = 500  # oldest samples dropped beyond this while CloudWatch is unreachable
SNAPSHOT_REFRESH_EVERY = 1800.0  # the newest snapshot changes daily; age is computed locally
SNAPSHOT_STALE_HOURS = 26.0  # a daily cron plus slack; older than this is worth a warning
# The security posture (admin party, port exposure) changes when CouchDB (re)starts, not between
# rounds: look on the first round, whenever CouchDB's state changes, and at least this often —
# each look is 1-3 requests that CouchDB writes to its log.
POSTURE_EVERY = 300.0
STOP_GRACE = 0.7  # seconds to let a round finish after SIGTERM; the 1 s exit budget holds


@dataclass
class RoundResult:
    wall: datetime
    checks: list
    persistence: str
    volume_id: str | None
    disk_used_percent: float | None
    couchdb: Any  # adapters.couchdb.Readiness
    posture: list = field(default_factory=list)


def decide_persistence(checks) -> str:
    """ready = every mount check passed; missing = not mounted or not our device; else degraded.

    'ready' needs positive evidence: a passing 'mounted' check and no failure at all, so an
    empty or broken check run can never place CouchDB here.
    """
    failed = {c.name for c in checks if not c.ok}
    if "mounted" in failed or "device" in failed:
        return "missing"
    if not failed and any(c.name == "mounted" and c.ok for c in checks):
        return "ready"
    return "degraded"


def couchdb_attribute(readiness) -> str:
    return "up" if readiness.ready else readiness.state


COUCHDB_OFF = "off"  # couchdb.url = "": this host runs no CouchDB checks


def disk_used_percent(mount_point: str) -> float | None:
    try:
        st = os.statvfs(mount_point)
    except OSError:
        return None
    if st.f_blocks == 0:
        return None
    return round(100.0 * (st.f_blocks - st.f_bavail) / st.f_blocks, 1)


def mount_signature(mount_point: str):
    """What identifies the mount at mount_point: device, fs type, ro/rw — or None when unmounted."""
    from hostagent.adapters.mounts import mount_at, read_mountinfo

    try:
        entry = mount_at(mount_point, read_mountinfo())
    except OSError:
        return ("unreadable",)
    if entry is None:
        return None
    return (entry.major_minor, entry.fstype, entry.source, entry.read_only)


def find_volume_id(config) -> str | None:
    """volume.id, else what bootstrap recorded; a loop device or bare disk has none."""
    if config.volume.id:
        return config.volume.id
    try:
        from hostagent.state import VOLUME_RECORD, read_record
    except ImportError:  # pragma: no cover - state module is part of the package
        return None
    record = read_record(config.host.state_dir, VOLUME_RECORD) or {}
    value = record.get("volume_id")
    return value if isinstance(value, str) and value.startswith("vol-") else None


def hours_since(iso: str | None, now: datetime) -> float | None:
    if not iso:
        return None
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    return max((now - then).total_seconds() / 3600.0, 0.0)


def round_events(prev: RoundResult | None, cur: RoundResult) -> list[str]:
    """One log line per thing that changed since the last round (all of it on the first)."""
    events = []
    failed_now = {c.name: c for c in cur.checks if not c.ok}
    if prev is None or prev.persistence != cur.persistence:
        why = "; ".join(f"{c.name}: {c.detail}" for c in failed_now.values())
        arrow = f"{prev.persistence} -> " if prev else ""
        events.append(f"persistence {arrow}{cur.persistence}" + (f" ({why})" if why else
                      f" ({len(cur.checks)} checks passed)"))
    elif prev is not None:
        failed_before = {c.name: c for c in prev.checks if not c.ok}
        for name, c in failed_now.items():
            if name not in failed_before or failed_before[name].detail != c.detail:
                events.append(f"check {name} failed: {c.detail}")
        for name in failed_before.keys() - failed_now.keys():
            events.append(f"check {name} ok again")
    if prev is None or (prev.couchdb.state, prev.couchdb.ready) != (cur.couchdb.state, cur.couchdb.ready):
        arrow = f"{couchdb_attribute(prev.couchdb)} -> " if prev else ""
        events.append(f"couchdb {arrow}{couchdb_attribute(cur.couchdb)} ({cur.couchdb.reason})")
    before = {p.name: p for p in prev.posture} if prev else {}
    for p in cur.posture:
        old = before.get(p.name)
        if old is not None and (old.ok, old.detail) == (p.ok, p.detail):
            continue
        if p.ok is False:
            events.append(f"warning: {p.name}: {p.detail}")
        elif old is not None and old.ok is False and p.ok is True:
            events.append(f"{p.name} resolved: {p.detail}")
    return events


def status_text(cur: RoundResult, ecs: str, snapshot_age: float | None) -> str:
    parts = [f"persistence={cur.persistence}", f"couchdb={couchdb_attribute(cur.couchdb)}"]
    if cur.disk_used_percent is not None:
        parts.append(f"disk={cur.disk_used_percent:.0f}%")
    if snapshot_age is not None:
        parts.append(f"snapshot={snapshot_age:.1f}h")
    warnings = [p.name for p in cur.posture if p.ok is False]
    if warnings:
        parts.append("warn=" + ",".join(warnings))
    parts.append(f"ecs={ecs}")
    return " ".join(parts)


def call_aws_worker(request: dict, timeout: float = AWS_CALL_TIMEOUT) -> dict:
    """Run hostagent.aws.worker in a child python; see that module for why it is a child."""
    from hostagent.errors import HostagentError
    from hostagent.runner import run

    try:
        done = run([sys.executable, "-m", "hostagent.aws.worker"], input=json.dumps(request),
                   timeout=timeout)
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else {"error": "AWS worker printed nothing"}
    except HostagentError as exc:
        return {"error": str(exc)}
    except ValueError as exc:
        return {"error": f"AWS worker answered non-JSON: {exc}"}


class AwsCalls:
    """At most one AWS request in flight, in a background thread, so local checks and watchdog
    pings never wait for AWS; the answer is picked up by the loop on its next wake."""

    def __init__(self, call: Callable[[dict], dict], wake: Callable[[], None]):
        self._call = call
        self._wake = wake
        self._lock = threading.Lock()
        self._running = False
        self._done: tuple[dict, dict] | None = None

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running or self._done is not None

    def start(self, request: dict) -> bool:
        with self._lock:
            if self._running or self._done is not None:
                return False
            self._running = True

        def work():
            try:
                answer = self._call(request)
            except Exception as exc:  # a bug in the call path must not kill the agent
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            with self._lock:
                self._done = (request, answer)
                self._running = False
            self._wake()

        threading.Thread(target=work, name="hostagent-aws", daemon=True).start()
        return True

    def take(self) -> tuple[dict, dict] | None:
        with self._lock:
            done, self._done = self._done, None
        return done

    def run_now(self, request: dict) -> dict:
        return self._call(request)


class Agent:
    def __init__(self, config, *, notifier=None, clock: Callable[[], float] = time.monotonic,
                 aws_call: Callable[[dict], dict] = call_aws_worker, checks_fn=None):
        from hostagent.sdnotify import Notifier, watchdog_interval

        self.config = config
        self.prefix = config.ecs.attribute_prefix  # checked at config load
        self.notifier = notifier or Notifier.from_env()
        self.clock = clock
        self.watchdog_every = watchdog_interval()
        self.last_ping = 0.0
        self.interval = float(config.agent.interval)
        self._checks_fn = checks_fn
        self.stop_event = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.aws = AwsCalls(aws_call, self.wake)
        self.session = None
        self.last: RoundResult | None = None
        self.last_round_at = -1e9
        self.posture_at = -1e9
        self.mount_seen = ("not read yet",)
        self.ready_sent = False
        # ECS
        self.ecs_enabled = bool(config.ecs.introspection_url)
        self.instance = None
        self.ecs_reason = "not checked yet"
        self.next_introspection = 0.0
        self.reported: dict[str, str] = {}
        self.synced = False
        self.ecs_retry_at = 0.0
        self.ecs_failures = 0
        self.ecs_error: str | None = None
        self.last_put: dict[str, str] | None = None
        # snapshots
        self.snapshot_newest: dict | None = None
        self.snapshot_next = 0.0
        self.snapshot_failures = 0
        self.snapshot_error: str | None = None
        self.snapshot_stale_warned = False
        # metrics
        self.samples: list = []
        self.metrics_next = (clock() + METRICS_FLUSH_EVERY) if config.metrics.enabled else None
        self.metrics_failures = 0
        self.metrics_error: str | None = None

    # -- plumbing ---------------------------------------------------------------------------
    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a full pipe already means 'wake up'

    def stop(self) -> None:
        self.stop_event.set()
        self.wake()

    def ping_watchdog(self, force: bool = False) -> None:
        if self.watchdog_every is None:
            return
        now = self.clock()
        if force or now - self.last_ping >= self.watchdog_every:
            self.notifier.watchdog()
            self.last_ping = now

    def _session(self):
        if self.session is None:
            from hostagent.adapters.couchdb import new_session

            self.session = new_session()
        return self.session

    # -- one round of local checks ------------------------------------------------------------
    def run_checks(self) -> list:
        if self._checks_fn is not None:
            return self._checks_fn(self.config)
        from hostagent.flows.verify import Check, run_checks

        try:
            return run_checks(self.config)
        except Exception as exc:  # never 'ready' on a check run that did not finish
            log.debug("mount checks raised", exc_info=True)
            return [Check("checks", False, f"mount checks could not run: {exc}")]

    def check_round(self) -> RoundResult:
        from hostagent.adapters import couchdb

        cfg = self.config
        checks = self.run_checks()
        self.ping_watchdog()
        persistence = decide_persistence(checks)
        mp = cfg.filesystem.mount_point
        used = disk_used_percent(mp) if persistence != "missing" else None
        problem = couchdb.resolve_problem(cfg.couchdb.url) if cfg.couchdb.url else None
        if not cfg.couchdb.url:
            readiness = couchdb.Readiness(False, COUCHDB_OFF, "couchdb.url is not set")
        elif problem:
            readiness = couchdb.Readiness(False, "unresolved", problem[0] +
                                          (f"; {problem[1]}" if problem[1] else ""))
        else:
            readiness = couchdb.probe_readiness(cfg.couchdb.url, session=self._session(),
                                                timeout=COUCHDB_PROBE_TIMEOUT)
        self.ping_watchdog()
        prev = self.last
        if (prev is None or prev.couchdb.state != readiness.state
                or self.clock() - self.posture_at >= POSTURE_EVERY):
            posture = []
            if readiness.answered and readiness.state != COUCHDB_OFF:
                posture.append(couchdb.probe_admin_party(cfg.couchdb.url, session=self._session(),
                                                         timeout=COUCHDB_PROBE_TIMEOUT))
            if cfg.couchdb.url:
                posture.append(couchdb.exposure_check(cfg.couchdb.url))
            self.posture_at = self.clock()
        else:
            posture = prev.posture
        return RoundResult(datetime.now(timezone.utc), checks, persistence, find_volume_id(cfg),
                           used, readiness, posture)

    def desired_attributes(self, result: RoundResult) -> dict[str, str]:
        from hostagent.aws.ecs_attributes import desired_attributes

        couch = couchdb_attribute(result.couchdb)
        return desired_attributes(self.prefix, persistence=result.persistence,
                                  volume_id=result.volume_id,
                                  couchdb=None if couch == COUCHDB_OFF else couch)

    def snapshot_age(self, now: datetime | None = None) -> float | None:
        if not self.snapshot_newest:
            return None
        return hours_since(self.snapshot_newest.get("start_time"), now or datetime.now(timezone.utc))

    def do_round(self) -> RoundResult:
        self.mount_seen = mount_signature(self.config.filesystem.mount_point)
        result = self.check_round()
        for line in round_events(self.last, result):
            log.info("%s", line)
        self.last = result
        self.last_round_at = self.clock()
        if self.ecs_enabled:
            self.observe_ecs_agent()
        if self.config.metrics.enabled:
            from hostagent.metrics import Sample

            self.samples.append(Sample(result.wall, result.disk_used_percent, self.snapshot_age(result.wall),
                                       result.couchdb.ready))
            del self.samples[:-METRICS_BUFFER_MAX]
        self.warn_stale_snapshot()
        return result

    def warn_stale_snapshot(self) -> None:
        age = self.snapshot_age()
        stale = age is not None and age > SNAPSHOT_STALE_HOURS
        if stale and not self.snapshot_stale_warned:
            log.info("warning: newest snapshot %s is %.1f h old (more than %.0f h)",
                     self.snapshot_newest.get("id"), age, SNAPSHOT_STALE_HOURS)
        self.snapshot_stale_warned = stale

    # -- ECS ----------------------------------------------------------------------------------
    def observe_ecs_agent(self) -> None:
        from hostagent.adapters.ecs_agent import read_introspection

        self.next_introspection = self.clock() + INTROSPECTION_RETRY
        state = read_introspection(self.config.ecs.introspection_url, session=self._session())
        if state.instance != self.instance:
            if state.instance is not None:
                log.info("ECS: container instance %s in cluster %s", state.instance.arn,
                         state.instance.cluster)
            elif self.instance is not None:
                log.info("ECS: lost the container instance: %s", state.reason)
            # A new registration starts with ECS's own view: read it before putting anything.
            self.reported, self.synced, self.ecs_retry_at, self.ecs_failures = {}, False, 0.0, 0
            self.instance = state.instance
        if state.instance is None and state.reason != self.ecs_reason:
            log.info("ECS: waiting: %s", state.reason)
        self.ecs_reason = state.reason

    def ecs_request(self) -> dict | None:
        from hostagent.aws.ecs_attributes import changed_attributes

        if not self.ecs_enabled or self.instance is None or self.last is None:
            return None
        if self.clock() < self.ecs_retry_at:
            return None
        desired = self.desired_attributes(self.last)
        if self.synced:
            todo = changed_attributes(desired, self.reported)
            if not todo:
                return None
            return {"cluster": self.instance.cluster, "arn": self.instance.arn,
                    "prefix": self.prefix, "attributes": todo, "sync": False}
        return {"cluster": self.instance.cluster, "arn": self.instance.arn, "prefix": self.prefix,
                "attributes": desired, "sync": True}

    def ecs_text(self) -> str:
        if not self.ecs_enabled:
            return "off"
        if self.instance is None:
            return "waiting"
        if self.ecs_error:
            return "error"
        if self.last and self.synced and self.reported == {**self.reported,
                                                             **self.desired_attributes(self.last)}:
            return "reported"
        return "pending"

    def apply_ecs_answer(self, part: dict, answer: dict) -> None:
        if self.instance is None or part["arn"] != self.instance.arn:
            return  # re-registered meanwhile; the next request syncs the new instance
        if answer.get("ok"):
            if part.get("sync"):
                self.reported = dict(answer.get("current") or {})
                self.synced = True
            put = answer.get("put") or {}
            self.reported.update(put)
            self.last_put = put
            for name, value in sorted(put.items()):
                log.info("ECS: %s=%s", name, value)
            if part.get("sync") and not put:
                log.info("ECS: attributes already up to date")
            self.ecs_failures, self.ecs_error = 0, None
        else:
            self._ecs_failed(answer.get("error") or "unknown error")

    def _ecs_failed(self, error: str) -> None:
        self.ecs_failures += 1
        if error != self.ecs_error:
            log.info("ECS: reporting failed (will retry): %s", error)
        self.ecs_error = error
        self.ecs_retry_at = self.clock() + self.backoff(self.ecs_failures)

    def backoff(self, failures: int) -> float:
        return min(self.interval * (2 ** max(failures - 1, 0)), AWS_RETRY_MAX)

    # -- snapshots and metrics ----------------------------------------------------------------
    def snapshots_request(self) -> dict | None:
        if self.last is None or not self.last.volume_id or self.clock() < self.snapshot_next:
            return None
        import importlib.util

        if importlib.util.find_spec("hostagent.aws.snapshots") is None:
            return None
        return {"volume_id": self.last.volume_id}

    def apply_snapshots_answer(self, answer: dict) -> None:
        if answer.get("ok"):
            newest = answer.get("newest")
            old = (self.snapshot_newest or {}).get("id")
            self.snapshot_newest = newest
            if newest and newest.get("id") != old:
                log.info("newest snapshot %s, %.1f h old", newest["id"], self.snapshot_age() or 0.0)
            elif newest is None and old is None and self.snapshot_failures == 0 and \
                    self.snapshot_error is None:
                log.info("no completed hostagent snapshot of %s yet", self.last.volume_id
                         if self.last else "the volume")
            self.snapshot_failures, self.snapshot_error = 0, None
            self.snapshot_next = self.clock() + SNAPSHOT_REFRESH_EVERY
        else:
            self.snapshot_failures += 1
            error = answer.get("error") or "unknown error"
            if error != self.snapshot_error:
                log.info("snapshot listing failed (will retry): %s", error)
            self.snapshot_error = error
            self.snapshot_next = self.clock() + self.backoff(self.snapshot_failures)

    def metrics_request(self) -> dict | None:
        if self.metrics_next is None or not self.samples or self.clock() < self.metrics_next:
            return None
        return {"namespace": self.config.metrics.namespace,
                "volume_id": self.last.volume_id if self.last else None,
                "samples": [s.to_json() for s in self.samples]}

    def apply_metrics_answer(self, part: dict, answer: dict) -> None:
        sent_upto = len(part.get("samples") or [])
        if answer.get("ok"):
            # Samples taken while the call ran stay for the next flush.
            sent_times = {s["at"] for s in part.get("samples") or []}
            self.samples = [s for s in self.samples if s.at.isoformat() not in sent_times]
            if self.metrics_error:
                log.info("metrics: sent again (%d samples)", sent_upto)
            self.metrics_failures, self.metrics_error = 0, None
            self.metrics_next = self.clock() + METRICS_FLUSH_EVERY
        else:
            self.metrics_failures += 1
            error = answer.get("error") or "unknown error"
            if error != self.metrics_error:
                log.info("metrics: PutMetricData failed (samples kept, will retry): %s", error)
            self.metrics_error = error
            self.metrics_next = self.clock() + self.backoff(self.metrics_failures)

    # -- AWS request dispatch -----------------------------------------------------------------
    def aws_request(self) -> dict:
        request = {}
        for name, build in (("ecs", self.ecs_request), ("snapshots", self.snapshots_request),
                            ("metrics", self.metrics_request)):
            part = build()
            if part is not None:
                request[name] = part
        return request

    def apply_aws_answer(self, request: dict, answer: dict) -> None:
        general = answer.get("error")
        for name in request:
            part_answer = answer.get(name) or {"ok": False, "error": general or "no answer"}
            if name == "ecs":
                self.apply_ecs_answer(request["ecs"], part_answer)
            elif name == "snapshots":
                self.apply_snapshots_answer(part_answer)
            elif name == "metrics":
                self.apply_metrics_answer(request["metrics"], part_answer)

    def dispatch_aws(self) -> None:
        done = self.aws.take()
        if done is not None:
            self.apply_aws_answer(*done)
        if not self.aws.busy:
            request = self.aws_request()
            if request:
                self.aws.start(request)

    # -- the loop -----------------------------------------------------------------------------
    def publish_status(self) -> None:
        if self.last is None:
            return
        text = status_text(self.last, self.ecs_text(), self.snapshot_age())
        if not self.ready_sent:
            self.notifier.ready(text)
            self.ready_sent = True
            self.last_ping = self.clock()  # READY counts as the first sign of life
        elif text != getattr(self, "_last_status", None):
            self.notifier.status(text)
        self._last_status = text

    def wait(self, timeout: float, poller) -> bool:
        """Sleep until timeout, a wake, or a mount table change; True on a mount change."""
        events = poller.poll(max(timeout, 0.0) * 1000.0)
        mount_changed = False
        for fd, _ in events:
            if fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            else:
                mount_changed = True
        return mount_changed

    def run_forever(self) -> None:
        poller, mountinfo_fd = self._make_poller()
        next_round = self.clock()
        try:
            while not self.stop_event.is_set():
                now = self.clock()
                if now >= next_round:
                    self.do_round()
                    next_round = self.clock() + self.interval
                elif (self.ecs_enabled and self.instance is None
                      and now >= self.next_introspection and self.last is not None):
                    self.observe_ecs_agent()
                if self.stop_event.is_set():
                    break
                self.dispatch_aws()
                self.publish_status()
                self.ping_watchdog()
                timeout = next_round - self.clock()
                if self.watchdog_every is not None:
                    timeout = min(timeout, self.last_ping + self.watchdog_every - self.clock())
                if self.ecs_enabled and self.instance is None:
                    timeout = min(timeout, self.next_introspection - self.clock())
                if self.wait(timeout, poller) and self.our_mount_changed():
                    next_round = min(next_round, max(self.clock(),
                                                     self.last_round_at + MOUNT_EVENT_MIN_GAP))
        finally:
            if mountinfo_fd is not None:
                os.close(mountinfo_fd)

    def our_mount_changed(self) -> bool:
        return mount_signature(self.config.filesystem.mount_point) != self.mount_seen

    def _make_poller(self):
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        try:
            # The kernel flags /proc/self/mountinfo with POLLPRI on every mount table change, so
            # a lost mount is seen at once instead of at the next interval, for no CPU at all.
            fd = os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
            poller.register(fd, select.POLLPRI | select.POLLERR)
            poller.poll(0)  # consume the 'changed' state present on a fresh fd
        except OSError:
            fd = None
        return poller, fd

    def run_once(self) -> RoundResult:
        """One synchronous round with its ECS/snapshot/metrics reporting, for --once."""
        import dataclasses

        result = self.do_round()
        self.snapshot_next = 0.0
        first = {name: part for name, part in (("ecs", self.ecs_request()),
                                                ("snapshots", self.snapshots_request())) if part}
        if first:
            self.apply_aws_answer(first, self.aws.run_now(first))
        if self.metrics_next is not None and self.samples:
            # The snapshot age arrived after the round's sample was taken: fill it in.
            self.samples[-1] = dataclasses.replace(self.samples[-1],
                                                   snapshot_age_hours=self.snapshot_age(result.wall))
            self.metrics_next = 0.0
            part = self.metrics_request()
            self.apply_aws_answer({"metrics": part}, self.aws.run_now({"metrics": part}))
        return result


def _log_to_stdout() -> None:
    # journald takes stdout and stderr alike; the agent's event lines go to stdout as issue 4 asks.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.__stderr__):
            handler.setStream(sys.stdout)


def once_report(agent: Agent, result: RoundResult) -> Report:
    rows = [("ok" if c.ok else "FAIL", c.name, c.detail) for c in result.checks]
    rows.append(("ok" if result.couchdb.ready else "FAIL", "couchdb", result.couchdb.reason))
    for p in result.posture:
        rows.append(({True: "ok", False: "WARN", None: "-"}[p.ok], p.name, p.detail))
    ecs = agent.ecs_text()
    ecs_detail = agent.ecs_error or (agent.instance.arn if agent.instance else agent.ecs_reason)
    rows.append(("-", "ecs", f"{ecs}: {ecs_detail}" if agent.ecs_enabled else "off (no introspection_url)"))
    age = agent.snapshot_age()
    if agent.snapshot_newest:
        rows.append(("-", "snapshot", f"{agent.snapshot_newest['id']} {age:.1f} h old"))
    text = render_table(rows, ("RESULT", "CHECK", "DETAIL"))
    text += f"\npersistence={result.persistence}"
    ok = result.persistence == "ready"
    items = [asdict(c) if hasattr(c, "__dataclass_fields__") else
             {"name": c.name, "ok": c.ok, "detail": c.detail} for c in result.checks]
    extra = {
        "persistence": result.persistence,
        "volume_id": result.volume_id,
        "disk_used_percent": result.disk_used_percent,
        "couchdb": {"state": couchdb_attribute(result.couchdb), "reason": result.couchdb.reason},
        "security": [asdict(p) for p in result.posture],
        "ecs": {"state": ecs, "detail": ecs_detail if agent.ecs_enabled else None,
                "attributes": agent.reported, "put": agent.last_put},
        "snapshot": None if not agent.snapshot_newest else {**agent.snapshot_newest, "age_hours": age},
        "snapshot_error": agent.snapshot_error,
        "metrics": None if not agent.config.metrics.enabled else
        {"sent": agent.metrics_error is None and not agent.samples, "error": agent.metrics_error},
    }
    return Report(ok=ok, key="checks", items=items, text=text,
                  exit_code=EXIT_OK if ok else EXIT_FAILED, extra=extra)


def run(ctx, args) -> Report:
    config = ctx.config
    agent = Agent(config)
    if getattr(args, "once", False):
        return once_report(agent, agent.run_once())

    _log_to_stdout()
    received: list[str] = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("agent started: interval %ss, mount point %s, couchdb %s, ECS %s%s",
             config.agent.interval, config.filesystem.mount_point,
             _redacted(config.couchdb.url), config.ecs.introspection_url or "off",
             f", watchdog every {agent.watchdog_every:.1f}s" if agent.watchdog_every else "")
    crashed: list[BaseException] = []

    def loop():
        try:
            agent.run_forever()
        except BaseException as exc:  # reported by the main thread, which owns the exit code
            crashed.append(exc)
            log.exception("agent loop crashed")
            agent.stop()

    worker = threading.Thread(target=loop, name="hostagent-agent", daemon=True)
    worker.start()
    # The main thread only waits: signal handlers run here, so SIGTERM is honoured within the
    # grace period even while a round is blocked on a slow command or HTTP call.
    while not agent.stop_event.wait(1.0):
        pass
    agent.notifier.stopping()
    worker.join(STOP_GRACE)
    if crashed:
        return Report(ok=False, key="agent", items=[], text="", exit_code=EXIT_FAILED)
    log.info("agent stopped (%s)", received[0] if received else "stop requested")
    return Report(ok=True, key="agent", items=[], text="", exit_code=EXIT_OK)


def _redacted(url: str) -> str:
    from hostagent.adapters.couchdb import redact_url

    return redact_url(url)
