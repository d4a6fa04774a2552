"""The agent's reconcilers (volume claim, filesystem grow, auto-grow, ECS report, snapshot age,
metrics), each with its own Backoff."""

from __future__ import annotations

import json
import sys
import threading
from datetime import datetime, timezone
from typing import Any, Callable, NamedTuple

from hostagent.backoff import Backoff
from hostagent.errors import NEEDS_A_PERSON, Reason
from hostagent.log import get_logger

log = get_logger("hostagent.agent")

AWS_CALL_TIMEOUT = 120.0
AWS_RETRY_MAX = 300.0  # failed AWS calls back off from one interval up to this
METRICS_FLUSH_EVERY = 300.0  # seconds; samples are buffered with their own timestamps
METRICS_BUFFER_MAX = 500  # oldest samples dropped beyond this while CloudWatch is unreachable
SNAPSHOT_REFRESH_EVERY = 1800.0  # the newest snapshot changes daily; age is computed locally
SNAPSHOT_STALE_HOURS = 26.0  # a daily cron plus slack; older than this is worth a warning
# While the ECS agent has not registered yet, look again this often (a GET on loopback), so the
# attribute lands seconds after registration rather than a whole interval later.
INTROSPECTION_RETRY = 5.0
# Volume claim (bootstrap re-run while nothing is mounted). Operation errors back off from one
# interval up to CLAIM_RETRY_MAX; a refusal that needs a person is looked at again this often —
# rarely enough never to hammer EC2 or the disk, often enough to notice the fix without a restart.
CLAIM_RETRY_MAX = 300.0
REFUSED_RETRY = 300.0
# On top of bootstrap's own bounded waits (the host lock, then the attachment and the block device,
# each up to volume.attach_timeout): EC2 calls, the blank proof, mkfs and e2fsck.
CLAIM_MARGIN = 120.0
# Reason.ATTACHED_ELSEWHERE is the one cause that converges by itself, fast: the other instance
# lets go of the volume (an old attachment `detaching` after a replacement); retried every
# interval, never backed off. errors.NEEDS_A_PERSON: refusals only a person can resolve, whatever
# their exit code (other-zone is exit 1).
# How a claim attempt ended, for the decision table (claim_retry).
CLAIMED = "claimed"
CONVERGING = "converging"  # retry every interval
OPERATION = "operation"  # retry, doubling from one interval up to CLAIM_RETRY_MAX
REFUSED = "refused"  # a person must act; look again every REFUSED_RETRY
# Capacity. A failed online resize (e.g. the kernel refusing it) is tried again from one interval
# up to this; a failed `hostagent grow` child after AUTO_GROW_RETRY, doubling up to the max (its
# next ModifyVolume is paced by the 6 h cool-down anyway, kept in the state dir).
GROW_FS_RETRY_MAX = 1800.0
AUTO_GROW_RETRY = 300.0
AUTO_GROW_RETRY_MAX = 3600.0


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


class Background:
    """At most one job in flight, in a background thread, so local checks and watchdog pings
    never wait for it; the answer is picked up by the loop on its next wake."""

    def __init__(self, call: Callable[[Any], Any], wake: Callable[[], None],
                 name: str = "hostagent-aws"):
        self._call = call
        self._wake = wake
        self._name = name
        self._lock = threading.Lock()
        self._running = False
        self._done: tuple[Any, Any] | None = None

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running or self._done is not None

    @property
    def running(self) -> bool:
        with self._lock:
            return self._running

    def start(self, request) -> bool:
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

        threading.Thread(target=work, name=self._name, daemon=True).start()
        return True

    def take(self) -> tuple[Any, Any] | None:
        with self._lock:
            done, self._done = self._done, None
        return done

    def run_now(self, request):
        return self._call(request)


# -- volume claim: bootstrap again while nothing is mounted -----------------------------------


class ClaimResult(NamedTuple):
    """How one `hostagent bootstrap --json` child ended (plain data: tests build it by hand)."""

    exit_code: int | None  # None: it timed out or could not be started
    reason: str  # bootstrap's machine-readable reason, or one derived from the exit code
    error: str = ""  # bootstrap's one-line error ("" on success)
    hint: str | None = None
    changed: int = 0  # steps done, on success


# When bootstrap names no reason: what the exit code says (DESIGN.md, exit codes).
EXIT_REASONS = {1: "operation-failed", 2: "bad-config", 3: "refused", 70: "internal-error"}


def parse_bootstrap_output(returncode: int | None, stdout: str, stderr: str,
                           command: str = "bootstrap") -> ClaimResult:
    """PURE: a ClaimResult from what `hostagent <command> --json` (bootstrap, grow) printed and
    its exit code."""
    answer: Any = None
    text = stdout.strip()
    for candidate in (text, text.splitlines()[-1] if text else ""):
        try:
            answer = json.loads(candidate)
            break
        except ValueError:
            continue
    answer = answer if isinstance(answer, dict) else {}
    hint = next((line[len("hint: "):] for line in stderr.splitlines() if line.startswith("hint: ")),
                None)
    if returncode is None:
        return ClaimResult(None, f"{command}-timeout", answer.get("error") or
                           f"`hostagent {command}` did not finish in time and was killed", hint)
    if returncode == 0:
        steps = answer.get("steps") if isinstance(answer.get("steps"), list) else []
        done = sum(1 for s in steps if isinstance(s, dict) and s.get("status") == "done")
        return ClaimResult(0, "none", changed=done)
    reason = answer.get("reason")
    if not isinstance(reason, str) or not reason:
        reason = EXIT_REASONS.get(returncode, f"{command}-failed")
    error = answer.get("error")
    if not isinstance(error, str) or not error:
        lines = [line for line in stderr.splitlines() if line.strip()]
        error = lines[-1] if lines else f"`hostagent {command}` exited {returncode}"
    return ClaimResult(returncode, reason, " ".join(error.split()), hint)


def claim_timeout(config) -> float:
    from hostagent.lock import LOCK_WAIT_SECONDS

    return LOCK_WAIT_SECONDS + 2 * config.volume.attach_timeout + CLAIM_MARGIN


def run_bootstrap_child(config_path: str, timeout: float) -> ClaimResult:
    """`python -m hostagent --config PATH bootstrap --json` in a child: the same flow, lock,
    plan and refusals as at boot, and boto3 is imported there, never in the agent."""
    return run_hostagent_child(config_path, ["bootstrap", "--json"], timeout)


def run_hostagent_child(config_path: str, words: list[str], timeout: float) -> ClaimResult:
    """`python -m hostagent --config PATH <words…>` in a child, its outcome as a ClaimResult."""
    from hostagent.errors import CommandError, HostagentError
    from hostagent.runner import run

    command = words[0]
    argv = [sys.executable, "-m", "hostagent", "--config", config_path, *words]
    try:
        done = run(argv, timeout=timeout, ok_codes=range(-64, 256))
    except CommandError as exc:
        if exc.timed_out:
            return parse_bootstrap_output(None, exc.stdout or "", exc.stderr or "", command)
        return ClaimResult(exc.returncode, f"{command}-failed", str(exc))
    except HostagentError as exc:
        return ClaimResult(None, f"{command}-failed", str(exc))
    return parse_bootstrap_output(done.returncode, done.stdout, done.stderr, command)


def classify_claim(result: ClaimResult) -> str:
    """PURE: CLAIMED, CONVERGING (held elsewhere), OPERATION (may converge) or REFUSED."""
    if result.exit_code == 0:
        return CLAIMED
    if result.reason == Reason.ATTACHED_ELSEWHERE:
        return CONVERGING
    if result.reason in NEEDS_A_PERSON:
        return REFUSED
    if result.exit_code is None or result.exit_code == 1 or result.exit_code < 0:
        return OPERATION  # an AWS error, a timeout, the lock held, the device not there yet
    return REFUSED  # exit 2 (config), 3 (any other refusal), 70 (a bug): nothing changes by itself


def claim_retry(result: ClaimResult, interval: float) -> tuple[str, float | None]:
    """PURE, the decision table: (kind, wait before the next attempt); None = doubling backoff
    from one interval. The wait counts from the start of the attempt that just ended."""
    kind = classify_claim(result)
    if kind in (CLAIMED, CONVERGING):
        return kind, interval
    if kind == OPERATION:
        return kind, None
    return kind, REFUSED_RETRY


def is_unmounted(result) -> bool:
    """Nothing is mounted at the mount point: the case the claim handles. A wrong device that is
    mounted there is left alone (bootstrap would refuse it anyway: mount-point-busy)."""
    return any(c.name == "mounted" and not c.ok for c in result.checks)


class VolumeClaim:
    """While nothing is mounted at the mount point, run `hostagent bootstrap` again in the
    background, paced by a Backoff. It never detaches anything (bootstrap never does)."""

    def __init__(self, bootstrap: Callable[[], ClaimResult], *, interval: float,
                 clock: Callable[[], float], wake: Callable[[], None], mount_point: str = ""):
        self.interval = float(interval)
        self.clock = clock
        self.mount_point = mount_point
        self.backoff = Backoff(self.interval, CLAIM_RETRY_MAX, clock)
        self.job = Background(lambda _request: bootstrap(), wake, name="hostagent-claim")
        self.wanted = False  # the last round found nothing mounted
        self.kind: str | None = None  # how the last attempt ended
        self.reason: str | None = None  # its reason, while it has not succeeded
        self.attempts = 0
        self._started_at = 0.0

    @property
    def running(self) -> bool:
        return self.job.running

    def observe(self, result) -> None:
        """After each round (a flows.agent.RoundResult): is there anything to claim?"""
        wanted = is_unmounted(result)
        if wanted and not self.wanted:
            log.info("volume: nothing mounted at %s: claiming it with `hostagent bootstrap` in "
                     "the background", self.mount_point or "the mount point")
        elif self.wanted and not wanted:
            # Mounted by us, by a person or by systemd: a new loss starts with a fresh backoff.
            self.backoff.reset()
            self.kind, self.reason = None, None
        self.wanted = wanted

    def collect(self) -> str | None:
        """Pick up a finished attempt: how it ended (CLAIMED: run a round now), or None."""
        done = self.job.take()
        if done is None:
            return None
        return self.apply(done[1])

    def start_if_due(self) -> bool:
        if not self.wanted or self.job.busy or not self.backoff.is_due():
            return False
        self._started_at = self.clock()
        self.attempts += 1
        return self.job.start(None)

    def wake_at(self) -> float | None:
        if self.wanted and not self.job.busy:
            return self.backoff.next_at
        return None

    def apply(self, result) -> str:
        if not isinstance(result, ClaimResult):  # the Background caught a bug in the call path
            result = ClaimResult(None, "bootstrap-failed", str((result or {}).get("error")))
        kind, delay = claim_retry(result, self.interval)
        if kind == CLAIMED:
            self.backoff.succeeded(next_in=self.interval)
            log.info("volume: claimed by `hostagent bootstrap` in %.1fs (%d step(s) done, "
                     "attempt %d)", self.clock() - self._started_at, result.changed, self.attempts)
            self.kind, self.reason = kind, None
            return kind
        self.backoff.failed(f"{result.reason}: {result.error}", cause=result.reason, delay=delay,
                            since=self._started_at)
        if (kind, result.reason) != (self.kind, self.reason):  # one line per change, not per try
            log.info("volume: %s", self.describe(kind, result))
        self.kind, self.reason = kind, result.reason
        return kind

    def describe(self, kind: str, result: ClaimResult) -> str:
        code = "timed out" if result.exit_code is None else f"exit {result.exit_code}"
        head = f"bootstrap {code} ({result.reason}): {result.error}"
        if kind == CONVERGING:
            return f"{head}; trying again every {self.interval:g}s until it is free"
        if kind == OPERATION:
            return (f"{head}; trying again in {self.backoff.remaining():.0f}s, backing off up to "
                    f"{CLAIM_RETRY_MAX:.0f}s")
        hint = f" (hint: {result.hint})" if result.hint else ""
        return f"{head}; a person must fix this{hint}; looking again every {REFUSED_RETRY:.0f}s"

    def text(self) -> str | None:
        """For STATUS=: None while the volume is mounted."""
        if not self.wanted:
            return None
        if self.job.busy:
            return "running"
        if self.kind == REFUSED:
            return "refused"
        return "retrying" if self.kind else "pending"


# -- capacity: grow the ext4 when its device grew; grow the volume when it fills up -----------


def grow_timeout() -> float:
    """How long one `hostagent grow` child may take: its lock wait and each of its phases."""
    from hostagent.capacity import DEVICE_TIMEOUT, MODIFY_TIMEOUT, RESIZE_TIMEOUT, SNAPSHOT_MARGIN
    from hostagent.lock import LOCK_WAIT_SECONDS

    return LOCK_WAIT_SECONDS + SNAPSHOT_MARGIN + MODIFY_TIMEOUT + DEVICE_TIMEOUT + RESIZE_TIMEOUT


def run_grow_child(config_path: str, size_gib: int, *, snapshot: bool,
                   timeout: float) -> ClaimResult:
    """`hostagent grow --size N --json` in a child, as bootstrap is run: boto3 stays out of the
    agent, and the child takes the host lock like any command."""
    words = ["grow", "--size", str(size_gib), "--json"] + ([] if snapshot else ["--no-snapshot"])
    return run_hostagent_child(config_path, words, timeout)


def _attempt(call: Callable[[Any], Any]) -> Callable[[Any], dict]:
    """A Background call whose HostagentError becomes {"error", "hint"} (one line, no trace)."""
    def attempt(request):
        from hostagent.errors import HostagentError

        try:
            return {"ok": True, "detail": str(call(request) or "")}
        except HostagentError as exc:
            return {"error": str(exc), "hint": exc.hint, "reason": exc.reason}
    return attempt


class FilesystemGrow:
    """When the volume's block device outgrew its mounted ext4 by more than 1% (a resize in the
    console, a grow whose resize2fs did not run), resize2fs it online, in the background, under
    the host lock; failures back off from one interval up to GROW_FS_RETRY_MAX."""

    def __init__(self, grow: Callable[[str], str], *, interval: float,
                 clock: Callable[[], float], wake: Callable[[], None]):
        self.interval = float(interval)
        self.clock = clock
        self.backoff = Backoff(self.interval, GROW_FS_RETRY_MAX, clock)
        self.job = Background(_attempt(grow), wake, name="hostagent-grow-fs")
        self.wanted = None  # the MountedFs to grow, while the last round says it needs it

    @property
    def running(self) -> bool:
        return self.job.running

    def observe(self, fs) -> None:
        """After each round: fs is the mounted volume's adapters.resize.MountedFs (or None)."""
        from hostagent.capacity import gib

        wanted = fs if fs is not None and fs.needs_grow else None
        if wanted is not None and self.wanted is None:
            log.info("filesystem: %s is %s, its ext4 %s: growing it online", fs.device,
                     gib(fs.device_bytes), gib(fs.fs_bytes))
        elif wanted is None and self.wanted is not None:
            self.backoff.reset()
        self.wanted = wanted

    def start_if_due(self, blocked: bool = False) -> bool:
        if self.wanted is None or blocked or self.job.busy or not self.backoff.is_due():
            return False
        return self.job.start(self.wanted.major_minor)

    def wake_at(self) -> float | None:
        return self.backoff.next_at if self.wanted is not None and not self.job.busy else None

    def collect(self) -> str | None:
        """A finished attempt: "grown" (look again at once), "failed", or None."""
        done = self.job.take()
        if done is None:
            return None
        answer = done[1] or {}
        if answer.get("ok"):
            self.backoff.succeeded(next_in=self.interval)
            log.info("filesystem: %s", answer.get("detail") or "grown")
            return "grown"
        error = answer.get("error") or "unknown error"
        if self.backoff.failed(error):
            hint = f" (hint: {answer['hint']})" if answer.get("hint") else ""
            log.info("filesystem: growing failed: %s%s; trying again in %.0fs", error, hint,
                     self.backoff.remaining())
        return "failed"

    def text(self) -> str | None:
        if self.job.busy:
            return "fs"
        return "fs-failed" if self.wanted is not None and self.backoff.error else None


class AutoGrow:
    """capacity.auto_grow: while free space is below grow_when_free_below, `hostagent grow` the
    volume by grow_by_percent in a child (decided by capacity.decide_auto_grow: at most once per
    6 h, counted from the record in the state dir, never past max_size_gib). A failed child is
    tried again after AUTO_GROW_RETRY, doubling up to AUTO_GROW_RETRY_MAX."""

    def __init__(self, decide: Callable[[Any], Any], grow: Callable[[int], ClaimResult], *,
                 clock: Callable[[], float], wake: Callable[[], None]):
        self.decide = decide
        self.clock = clock
        self.backoff = Backoff(AUTO_GROW_RETRY, AUTO_GROW_RETRY_MAX, clock)
        self.job = Background(lambda size: grow(size), wake, name="hostagent-auto-grow")
        self.decision = None  # capacity.AutoGrow of the last round
        self._started_at = 0.0
        self._target: int | None = None

    @property
    def running(self) -> bool:
        return self.job.running

    def observe(self, fs) -> None:
        decision = self.decide(fs) if fs is not None else None
        old = self.decision

        def key(d):  # the free percentage moves every round; log what auto-grow will do
            return None if d is None else (d.action, d.target_gib, d.not_before)

        if decision is not None and key(decision) != key(old) and (
                decision.action in ("wait", "at-cap")
                or (decision.action == "none" and old is not None and old.action != "none")):
            log.info("capacity: %s", decision.reason)
        self.decision = decision

    def start_if_due(self, blocked: bool = False) -> bool:
        d = self.decision
        if d is None or d.action != "grow" or blocked or self.job.busy \
                or not self.backoff.is_due():
            return False
        self._started_at, self._target = self.clock(), d.target_gib
        log.info("capacity: growing the volume to %d GiB with `hostagent grow`", d.target_gib)
        return self.job.start(d.target_gib)

    def wake_at(self) -> float | None:
        d = self.decision
        if d is not None and d.action == "grow" and not self.job.busy:
            return self.backoff.next_at
        return None

    def collect(self) -> str | None:
        done = self.job.take()
        if done is None:
            return None
        result = done[1]
        if not isinstance(result, ClaimResult):
            result = ClaimResult(None, "grow-failed", str((result or {}).get("error")))
        took = self.clock() - self._started_at
        if result.exit_code == 0:
            self.backoff.succeeded()
            log.info("capacity: grown to %s GiB by `hostagent grow` in %.1fs (%d step(s) done)",
                     self._target, took, result.changed)
            return "grown"
        code = "timed out" if result.exit_code is None else f"exit {result.exit_code}"
        self.backoff.failed(f"{result.reason}: {result.error}", cause=result.reason,
                            since=self._started_at)
        hint = f" (hint: {result.hint})" if result.hint else ""
        log.info("capacity: `hostagent grow --size %s` %s (%s): %s%s; trying again in %.0fs "
                 "at the earliest", self._target, code, result.reason, result.error, hint,
                 self.backoff.remaining())
        return "failed"

    def text(self) -> str | None:
        if self.job.busy:
            return "volume"
        d = self.decision
        return "at-cap" if d is not None and d.action == "at-cap" else None


# -- the AWS-side reconcilers: each adds its part to one worker call --------------------------


class AgentView(NamedTuple):
    """What the AWS-side reconcilers build their requests from."""

    last: Any  # flows.agent.RoundResult of the latest round, or None before the first
    desired: dict | None  # the ECS attributes this host should carry now


class EcsReport:
    """Keeps this container instance's attributes equal to what the checks say, on change only."""

    name = "ecs"

    def __init__(self, config, *, interval: float, clock: Callable[[], float]):
        self.enabled = bool(config.ecs.introspection_url)
        self.url = config.ecs.introspection_url
        self.prefix = config.ecs.attribute_prefix  # checked at config load
        self.clock = clock
        self.instance = None
        self.waiting_reason = "not checked yet"
        self.next_look = 0.0
        self.reported: dict[str, str] = {}
        self.synced = False
        self.last_put: dict[str, str] | None = None
        self.backoff = Backoff(interval, AWS_RETRY_MAX, clock)

    @property
    def error(self) -> str | None:
        return self.backoff.error

    def wants_look(self, now: float) -> bool:
        return self.enabled and self.instance is None and now >= self.next_look

    def wake_at(self) -> float | None:
        return self.next_look if self.enabled and self.instance is None else None

    def look(self, session) -> None:
        """Read the ECS agent's introspection API: are we registered, and as what?"""
        from hostagent.adapters.ecs_agent import read_introspection

        self.next_look = self.clock() + INTROSPECTION_RETRY
        state = read_introspection(self.url, session=session)
        if state.instance != self.instance:
            if state.instance is not None:
                log.info("ECS: container instance %s in cluster %s", state.instance.arn,
                         state.instance.cluster)
            elif self.instance is not None:
                log.info("ECS: lost the container instance: %s", state.reason)
            # A new registration starts with ECS's own view: read it before putting anything.
            self.reported, self.synced = {}, False
            self.backoff.reset()
            self.instance = state.instance
        if state.instance is None and state.reason != self.waiting_reason:
            log.info("ECS: waiting: %s", state.reason)
        self.waiting_reason = state.reason

    def request(self, view: AgentView) -> dict | None:
        from hostagent.aws.ecs_attributes import changed_attributes

        if not self.enabled or self.instance is None or view.desired is None:
            return None
        if not self.backoff.is_due():
            return None
        base = {"cluster": self.instance.cluster, "arn": self.instance.arn, "prefix": self.prefix}
        if self.synced:
            todo = changed_attributes(view.desired, self.reported)
            return {**base, "attributes": todo, "sync": False} if todo else None
        return {**base, "attributes": view.desired, "sync": True}

    def apply(self, part: dict, answer: dict) -> None:
        if self.instance is None or part["arn"] != self.instance.arn:
            return  # re-registered meanwhile; the next request syncs the new instance
        if not answer.get("ok"):
            error = answer.get("error") or "unknown error"
            if self.backoff.failed(error):
                log.info("ECS: reporting failed (will retry): %s", error)
            return
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
        self.backoff.succeeded()

    def text(self, desired: dict | None) -> str:
        if not self.enabled:
            return "off"
        if self.instance is None:
            return "waiting"
        if self.error:
            return "error"
        if desired is not None and self.synced and self.reported == {**self.reported, **desired}:
            return "reported"
        return "pending"


class SnapshotAge:
    """The newest completed hostagent snapshot of the volume, listed every 30 min; its age is
    computed locally every round."""

    name = "snapshots"

    def __init__(self, *, interval: float, clock: Callable[[], float]):
        self.newest: dict | None = None
        self.listed = False
        self.stale_warned = False
        self.backoff = Backoff(interval, AWS_RETRY_MAX, clock)
        self._available: bool | None = None

    @property
    def error(self) -> str | None:
        return self.backoff.error

    def _module_available(self) -> bool:
        if self._available is None:
            import importlib.util

            self._available = importlib.util.find_spec("hostagent.aws.snapshots") is not None
        return self._available

    def request(self, view: AgentView) -> dict | None:
        if view.last is None or not view.last.volume_id or not self.backoff.is_due():
            return None
        if not self._module_available():
            return None
        return {"volume_id": view.last.volume_id}

    def apply(self, part: dict, answer: dict) -> None:
        if not answer.get("ok"):
            error = answer.get("error") or "unknown error"
            if self.backoff.failed(error):
                log.info("snapshot listing failed (will retry): %s", error)
            return
        newest = answer.get("newest")
        old = (self.newest or {}).get("id")
        self.newest = newest
        if newest and newest.get("id") != old:
            log.info("newest snapshot %s, %.1f h old", newest["id"], self.age() or 0.0)
        elif newest is None and (old is not None or not self.listed):
            log.info("no completed hostagent snapshot of %s yet", part.get("volume_id"))
        self.listed = True
        self.backoff.succeeded(next_in=SNAPSHOT_REFRESH_EVERY)

    def age(self, now: datetime | None = None) -> float | None:
        if not self.newest:
            return None
        return hours_since(self.newest.get("start_time"), now or datetime.now(timezone.utc))

    def warn_if_stale(self) -> None:
        age = self.age()
        stale = age is not None and age > SNAPSHOT_STALE_HOURS
        if stale and not self.stale_warned:
            log.info("warning: newest snapshot %s is %.1f h old (more than %.0f h)",
                     self.newest.get("id"), age, SNAPSHOT_STALE_HOURS)
        self.stale_warned = stale


class Metrics:
    """Round samples buffered with their own timestamps, sent to CloudWatch every 5 min."""

    name = "metrics"

    def __init__(self, config, *, interval: float, clock: Callable[[], float]):
        self.enabled = bool(config.metrics.enabled)
        self.namespace = config.metrics.namespace
        self.samples: list = []
        self.backoff = Backoff(interval, AWS_RETRY_MAX, clock)
        self.backoff.next_at = clock() + METRICS_FLUSH_EVERY  # the first flush after 5 min

    @property
    def error(self) -> str | None:
        return self.backoff.error

    def observe(self, result, snapshot_age: float | None) -> None:
        if not self.enabled:
            return
        from hostagent.metrics import Sample

        self.samples.append(Sample(result.wall, result.disk_used_percent, snapshot_age,
                                   result.couchdb.ready))
        del self.samples[:-METRICS_BUFFER_MAX]

    def request(self, view: AgentView) -> dict | None:
        if not self.enabled or not self.samples or not self.backoff.is_due():
            return None
        return {"namespace": self.namespace,
                "volume_id": view.last.volume_id if view.last else None,
                "samples": [s.to_json() for s in self.samples]}

    def apply(self, part: dict, answer: dict) -> None:
        sent = part.get("samples") or []
        if not answer.get("ok"):
            error = answer.get("error") or "unknown error"
            if self.backoff.failed(error):
                log.info("metrics: PutMetricData failed (samples kept, will retry): %s", error)
            return
        # Samples taken while the call ran stay for the next flush.
        sent_times = {s["at"] for s in sent}
        self.samples = [s for s in self.samples if s.at.isoformat() not in sent_times]
        if self.backoff.succeeded(next_in=METRICS_FLUSH_EVERY):
            log.info("metrics: sent again (%d samples)", len(sent))
