"""hostagent agent: local checks every interval, the reconcilers act on them; systemd notify + watchdog."""

from __future__ import annotations

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
from hostagent.reconcilers import (CLAIMED, AgentView, AutoGrow, Background, ClaimResult,
                                   EcsReport, FilesystemGrow, Metrics, SnapshotAge, VolumeClaim,
                                   call_aws_worker, claim_timeout, grow_timeout,
                                   run_bootstrap_child, run_grow_child)
from hostagent.report import Report, render_table

log = get_logger("hostagent.agent")

MOUNTINFO = "/proc/self/mountinfo"
# A change of our own mount (umount, remount ro, another device) triggers a round at once; other
# mount table changes (every container start adds overlay, shm and netns mounts) cost one parse of
# mountinfo and nothing more. Rounds triggered that way are still at least this far apart.
MOUNT_EVENT_MIN_GAP = 0.2
COUCHDB_PROBE_TIMEOUT = 3.0
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
    capacity: Any = None  # adapters.resize.MountedFs of the volume (None while it is missing)


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


def slug(name: str) -> str:
    return "-".join(name.split())


def decide_reason(result: RoundResult, claim_reason: str | None = None) -> str:
    """<prefix>.reason: "none" when ready; while nothing is mounted, why the claim has not
    succeeded (bootstrap's own reason, e.g. attached-elsewhere) or "not-mounted" before any
    attempt; otherwise the names of the failed checks ("device", "free-space", "layout-data")."""
    from hostagent.aws.ecs_attributes import REASON_NONE

    if result.persistence == "ready":
        return REASON_NONE
    failed = [c.name for c in result.checks if not c.ok]
    if "mounted" in failed:
        return claim_reason or "not-mounted"
    return " ".join(slug(name) for name in failed) or "checks"


def status_text(cur: RoundResult, ecs: str, snapshot_age: float | None, *,
                reason: str | None = None, claim: str | None = None,
                grow: str | None = None) -> str:
    parts = [f"persistence={cur.persistence}"]
    if reason and cur.persistence != "ready":
        parts.append(f"reason={slug(reason)}")
    parts.append(f"couchdb={couchdb_attribute(cur.couchdb)}")
    if cur.disk_used_percent is not None:
        parts.append(f"disk={cur.disk_used_percent:.0f}%")
    if snapshot_age is not None:
        parts.append(f"snapshot={snapshot_age:.1f}h")
    warnings = [p.name for p in cur.posture if p.ok is False]
    if warnings:
        parts.append("warn=" + ",".join(warnings))
    if claim:
        parts.append(f"claim={claim}")
    if grow:
        parts.append(f"grow={grow}")
    parts.append(f"ecs={ecs}")
    return " ".join(parts)


# -- the loop ---------------------------------------------------------------------------------


class Agent:
    """Local checks every interval (and at once when our mount changes); after each round, the
    reconcilers act on what it found, each with its own state and Backoff."""

    def __init__(self, config, *, notifier=None, clock: Callable[[], float] = time.monotonic,
                 aws_call: Callable[[dict], dict] = call_aws_worker, checks_fn=None,
                 bootstrap: Callable[[], ClaimResult] | None = None,
                 grow_fs: Callable[[str], str] | None = None,
                 grow_volume: Callable[[int], ClaimResult] | None = None,
                 decide_capacity: Callable[[Any], Any] | None = None):
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
        self.session = None
        self.last: RoundResult | None = None
        self.last_round_at = -1e9
        self.posture_at = -1e9
        self.mount_seen = ("not read yet",)
        self.ready_sent = False
        self._last_status: str | None = None
        # The reconcilers. No bootstrap runner (agent --once, unit tests): nothing is claimed.
        self.volume = None if bootstrap is None else VolumeClaim(
            bootstrap, interval=self.interval, clock=clock, wake=self.wake,
            mount_point=config.filesystem.mount_point)
        # Capacity: none without their runners (agent --once, unit tests); auto-grow only when
        # capacity.auto_grow is on.
        self.fs_grow = None if grow_fs is None else FilesystemGrow(
            grow_fs, interval=self.interval, clock=clock, wake=self.wake)
        if grow_volume is not None and config.capacity.auto_grow:
            if decide_capacity is None:
                from hostagent.checks import decide_capacity as decide
                decide_capacity = lambda fs: decide(config, fs)  # noqa: E731
            self.auto_grow = AutoGrow(decide_capacity, grow_volume, clock=clock, wake=self.wake)
        else:
            self.auto_grow = None
        self.ecs = EcsReport(config, interval=self.interval, clock=clock)
        self.snapshots = SnapshotAge(interval=self.interval, clock=clock)
        self.metrics = Metrics(config, interval=self.interval, clock=clock)
        self.aws_reconcilers = (self.ecs, self.snapshots, self.metrics)
        self.admin = None
        if config.couchdb.admin_secret:
            from hostagent.couchdb_admin import AdminCredentials

            self.admin = AdminCredentials(config, interval=self.interval, clock=clock)
            self.aws_reconcilers += (self.admin,)
        self.aws = Background(aws_call, self.wake)

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
        from hostagent.checks import Check, run_checks

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
            admin = self.admin
            readiness = couchdb.probe_readiness(cfg.couchdb.url, session=self._session(),
                                                timeout=COUCHDB_PROBE_TIMEOUT,
                                                auth=admin.auth if admin else None,
                                                auth_source=cfg.couchdb.admin_secret)
            if admin is not None and admin.auth is not None:
                if readiness.state == couchdb.BAD_CREDENTIALS:
                    admin.refused()  # rotated? fetched again, with backoff
                elif readiness.answered:
                    admin.accepted()
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
            self.ping_watchdog()
        else:
            posture = prev.posture
        capacity = None
        if persistence != "missing" and (self.fs_grow or self.auto_grow):
            from hostagent.adapters.resize import observe_mounted

            capacity = observe_mounted(mp)
        return RoundResult(datetime.now(timezone.utc), checks, persistence, find_volume_id(cfg),
                           used, readiness, posture, capacity)

    def reason(self, result: RoundResult | None = None) -> str | None:
        result = result or self.last
        if result is None:
            return None
        return decide_reason(result, self.volume.reason if self.volume else None)

    def desired_attributes(self, result: RoundResult | None = None) -> dict[str, str] | None:
        from hostagent.aws.ecs_attributes import desired_attributes

        result = result or self.last
        if result is None:
            return None
        couch = couchdb_attribute(result.couchdb)
        return desired_attributes(self.prefix, persistence=result.persistence,
                                  volume_id=result.volume_id,
                                  couchdb=None if couch == COUCHDB_OFF else couch,
                                  reason=self.reason(result))

    def do_round(self) -> RoundResult:
        self.mount_seen = mount_signature(self.config.filesystem.mount_point)
        result = self.check_round()
        for line in round_events(self.last, result):
            log.info("%s", line)
        self.last = result
        self.last_round_at = self.clock()
        if self.volume is not None:
            self.volume.observe(result)
        for reconciler in (self.fs_grow, self.auto_grow):
            if reconciler is not None:
                reconciler.observe(result.capacity)
        if self.ecs.enabled:
            self.ecs.look(self._session())
        self.metrics.observe(result, self.snapshots.age(result.wall))
        self.snapshots.warn_if_stale()
        return result

    # -- AWS request dispatch -----------------------------------------------------------------
    def view(self) -> AgentView:
        return AgentView(self.last, self.desired_attributes())

    def aws_request(self) -> dict:
        view = self.view()
        request = {}
        for reconciler in self.aws_reconcilers:
            part = reconciler.request(view)
            if part is not None:
                request[reconciler.name] = part
        return request

    def apply_aws_answer(self, request: dict, answer: dict) -> None:
        general = answer.get("error")
        for reconciler in self.aws_reconcilers:
            if reconciler.name in request:
                part_answer = answer.get(reconciler.name) or {"ok": False,
                                                              "error": general or "no answer"}
                reconciler.apply(request[reconciler.name], part_answer)

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
        grow = [r.text() for r in (self.fs_grow, self.auto_grow) if r is not None]
        text = status_text(self.last, self.ecs.text(self.desired_attributes()),
                           self.snapshots.age(), reason=self.reason(),
                           claim=self.volume.text() if self.volume else None,
                           grow=",".join(g for g in grow if g) or None)
        if not self.ready_sent:
            self.notifier.ready(text)
            self.ready_sent = True
            # systemd's watchdog runs from the start of the process and only WATCHDOG=1 resets
            # it: the first round may have taken a while, so say so now rather than in 1/2 period.
            self.ping_watchdog(force=True)
        elif text != self._last_status:
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
                volume = self.volume
                # A finished claim is looked at by a round at once: ready without waiting.
                ended = volume.collect() if volume is not None else None
                if ended == CLAIMED or (ended and self.our_mount_changed()):
                    next_round = self.clock()
                # A finished grow is looked at by a round at once (free space, sizes, checks).
                grown = [r.collect() for r in (self.fs_grow, self.auto_grow) if r is not None]
                if any(grown):
                    next_round = self.clock()
                now = self.clock()
                if now >= next_round:
                    self.do_round()
                    next_round = self.clock() + self.interval
                elif self.ecs.wants_look(now) and self.last is not None:
                    self.ecs.look(self._session())
                if self.stop_event.is_set():
                    break
                if volume is not None:
                    volume.start_if_due()
                self.start_grows()
                self.dispatch_aws()
                self.publish_status()
                self.ping_watchdog()
                wake_at = [next_round]
                if self.watchdog_every is not None:
                    wake_at.append(self.last_ping + self.watchdog_every)
                for reconciler in (self.ecs, volume, self.fs_grow, self.auto_grow):
                    at = reconciler.wake_at() if reconciler is not None else None
                    if at is not None:
                        wake_at.append(at)
                # While bootstrap runs it mounts, then lays out: its mount is looked at once it
                # has finished (collect), never half-way through.
                if (self.wait(min(wake_at) - self.clock(), poller) and self.our_mount_changed()
                        and not (volume is not None and volume.running)):
                    next_round = min(next_round, max(self.clock(),
                                                     self.last_round_at + MOUNT_EVENT_MIN_GAP))
        finally:
            if mountinfo_fd is not None:
                os.close(mountinfo_fd)

    def start_grows(self) -> None:
        """One change of the volume at a time: no grow while bootstrap claims it, and the
        filesystem grow waits while a `hostagent grow` child (which grows it itself) runs."""
        claiming = self.volume is not None and self.volume.running
        auto, fs = self.auto_grow, self.fs_grow
        if fs is not None:
            fs.start_if_due(blocked=claiming or (auto is not None and auto.running))
        if auto is not None:
            auto.start_if_due(blocked=claiming or (fs is not None and (fs.running or
                                                                      fs.wanted is not None)))

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
        """One synchronous round with its ECS/snapshot/metrics reporting, for --once. It only
        reports: the volume is never claimed here (that is the long-running agent's job)."""
        import dataclasses

        if self.admin is not None:  # log in from the first round on
            part = self.admin.request(self.view())
            if part is not None:
                self.apply_aws_answer({self.admin.name: part},
                                      self.aws.run_now({self.admin.name: part}))
        result = self.do_round()
        self.snapshots.backoff.next_at = 0.0
        view = self.view()
        first = {r.name: part for r in (self.ecs, self.snapshots) if (part := r.request(view))}
        if first:
            self.apply_aws_answer(first, self.aws.run_now(first))
        if self.metrics.enabled and self.metrics.samples:
            # The snapshot age arrived after the round's sample was taken: fill it in.
            self.metrics.samples[-1] = dataclasses.replace(
                self.metrics.samples[-1], snapshot_age_hours=self.snapshots.age(result.wall))
            self.metrics.backoff.next_at = 0.0
            part = self.metrics.request(self.view())
            self.apply_aws_answer({"metrics": part}, self.aws.run_now({"metrics": part}))
        return result


def _log_to_stdout() -> None:
    # journald takes stdout and stderr alike; the agent's event lines go to stdout as issue 4 asks.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.__stderr__):
            handler.setStream(sys.stdout)


def once_report(agent: Agent, result: RoundResult) -> Report:
    ecs, snapshots, metrics = agent.ecs, agent.snapshots, agent.metrics
    rows = [("ok" if c.ok else "FAIL", c.name, c.detail) for c in result.checks]
    rows.append(("ok" if result.couchdb.ready else "FAIL", "couchdb", result.couchdb.reason))
    for p in result.posture:
        rows.append(({True: "ok", False: "WARN", None: "-"}[p.ok], p.name, p.detail))
    ecs_state = ecs.text(agent.desired_attributes(result))
    ecs_detail = ecs.error or (ecs.instance.arn if ecs.instance else ecs.waiting_reason)
    rows.append(("-", "ecs", f"{ecs_state}: {ecs_detail}" if ecs.enabled else
                 "off (no introspection_url)"))
    age = snapshots.age()
    if snapshots.newest:
        rows.append(("-", "snapshot", f"{snapshots.newest['id']} {age:.1f} h old"))
    reason = agent.reason(result)
    text = render_table(rows, ("RESULT", "CHECK", "DETAIL"))
    text += f"\npersistence={result.persistence}" + \
        ("" if result.persistence == "ready" else f" reason={slug(reason)}")
    ok = result.persistence == "ready"
    items = [asdict(c) if hasattr(c, "__dataclass_fields__") else
             {"name": c.name, "ok": c.ok, "detail": c.detail} for c in result.checks]
    extra = {
        "persistence": result.persistence,
        "reason": reason,
        "volume_id": result.volume_id,
        "disk_used_percent": result.disk_used_percent,
        "couchdb": {"state": couchdb_attribute(result.couchdb), "reason": result.couchdb.reason},
        "security": [asdict(p) for p in result.posture],
        "ecs": {"state": ecs_state, "detail": ecs_detail if ecs.enabled else None,
                "attributes": ecs.reported, "put": ecs.last_put},
        "snapshot": None if not snapshots.newest else {**snapshots.newest, "age_hours": age},
        "snapshot_error": snapshots.error,
        "metrics": None if not metrics.enabled else
        {"sent": metrics.error is None and not metrics.samples, "error": metrics.error},
    }
    return Report(ok=ok, key="checks", items=items, text=text,
                  exit_code=EXIT_OK if ok else EXIT_FAILED, extra=extra)


def run(ctx, args) -> Report:
    config = ctx.config
    if getattr(args, "once", False):
        # --once only reports: claiming the volume (attach, format, mount) is for the service,
        # where one process paces it; a cron'd or hand-run --once must never change the host.
        agent = Agent(config)
        return once_report(agent, agent.run_once())

    config_path = ctx.config_path
    timeout = claim_timeout(config)

    def grow_fs(major_minor: str) -> str:
        from hostagent.flows.grow import grow_filesystem

        return grow_filesystem(config, major_minor)

    def grow_volume(size_gib: int) -> ClaimResult:
        return run_grow_child(config_path, size_gib, timeout=grow_timeout(),
                              snapshot=config.capacity.snapshot_before_grow)

    agent = Agent(config, bootstrap=lambda: run_bootstrap_child(config_path, timeout),
                  grow_fs=grow_fs, grow_volume=grow_volume)
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
    cap = config.capacity
    if cap.auto_grow:
        log.info("auto-grow on: below %d%% free, by %d%% (at least +1 GiB), at most once per "
                 "6 h, up to %d GiB%s", cap.grow_when_free_below, cap.grow_by_percent,
                 cap.max_size_gib, "" if cap.snapshot_before_grow else ", without a snapshot")
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
