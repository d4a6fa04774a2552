"""An EC2 fidelity layer: a loopback HTTP proxy in front of the moto server that answers as EC2 does
where moto is kinder.

boto3 (and `python -m hostagent`) reach it through AWS_ENDPOINT_URL. Every request goes on to moto;
only EC2 query-protocol calls (the service in the Authorization header's credential scope is `ec2`)
are looked at, and the Authorization header is always forwarded (moto takes the region from it).
ECS, S3, CloudWatch and anything else pass through untouched. Standard library only.

Plays, each switched on from the test through EC2Fidelity's methods:
- AttachVolume of a volume with a live attachment (attaching/attached/busy/detaching) -> 400
  VolumeInUse, unless the volume is MultiAttachEnabled and this instance does not hold it.
- AttachVolume to an instance in another AZ -> 400 InvalidVolume.ZoneMismatch.
- hold(vol, instance): an attachment moto does not have (the old instance of a replacement): shown
  `attached`, then `detaching` for a while after its release, then gone; the volume `in-use` until
  then. DetachVolume/DeleteVolume see it too.
- attaching_for(s) / detaching_for(s): an attachment is `attaching` for s after AttachVolume; after
  DetachVolume it stays listed `detaching` for s (volume `in-use`), then the volume is `available`.
- not_found_for(seconds | calls): ids made from then on by CreateVolume/CreateSnapshot/CopySnapshot
  are invisible for that long: any EC2 call naming one (DescribeVolumes/DescribeSnapshots by id,
  CreateTags, AttachVolume, ...) answers InvalidVolume.NotFound / InvalidSnapshot.NotFound, and
  listings leave it out.
- snapshots_pending_for(s): snapshots made from then on are `pending`, progress 0% rising to 100%
  over s, then `completed` (CreateSnapshot itself answers `pending` with an empty progress).
- Multi-Attach: a second instance's attachment to a MultiAttachEnabled volume is kept here (moto
  keeps one per volume) and listed with moto's; moto already reports multiAttachEnabled.
- throttle(action, n): the next n calls of that action -> 503 RequestLimitExceeded.
- CreateVolume ClientToken: the same token with the same parameters returns the first volume; with
  other parameters -> 400 IdempotentParameterMismatch.
- DetachVolume without InstanceId names the single holder (moto answers HTTP 500).
- DescribeVolumes filters status / attachment.status / attachment.instance-id / attachment.device
  and DescribeSnapshots filters status / progress are applied here, after the rewriting above.
- ModifyVolume (size): a smaller size -> 400 InvalidParameterValue (moto shrinks); a second
  modification of a volume within modification_cooldown (default 6 h, as EC2's API reference
  states it) -> 400 VolumeModificationRateExceeded. modifying_for(m, o): a modification is listed
  `modifying` for m seconds, then `optimizing` for o, then moto's `completed`.
- on_volume_grown(callback): EC2's other side, the disk: callback(volume_id, size_gib) once a
  modification reaches `optimizing` (at once when modifying_for is 0, before ModifyVolume
  answers), where the test grows the volume's block device (a loop device: its backing file,
  then `losetup -c`), as the Nitro card grows the NVMe namespace.
- calls: every EC2 call seen (action, params, HTTP status), for "no AttachVolume was made" checks.

Does not play (moto's behaviour stands):
- CreateSnapshot idempotency: EC2's CreateSnapshot has no ClientToken parameter (botocore refuses
  one), so there is nothing to play; only CreateVolume's token is.
- volumes `creating`, `error` states, `busy` attachments, DescribeInstances' blockDeviceMapping
  (it never shows holds or kept Multi-Attach attachments), attachment-point (device name) clashes,
  the 16-instance Multi-Attach limit and Nitro-only rule, IncorrectState on copying or restoring a
  pending snapshot, and which error EC2 picks first when several apply (here: NotFound, zone,
  in use).
- termination does not start a lingering attachment by itself: the test says so with hold().
- real durations: every delay is the test's choice. Error codes and HTTP statuses are EC2's; the
  message texts follow EC2's wording but were not compared byte for byte with a live account.
"""

from __future__ import annotations

import fnmatch
import http.client
import re
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qsl, urlencode, urlsplit

from tests.support.loopback import LoopbackServer

NS = "http://ec2.amazonaws.com/doc/2016-11-15"  # moto's, exactly (no trailing slash)
API_VERSION = "2016-11-15"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
              "upgrade", "expect", "content-length"}
CREDENTIAL_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/([^/]+)/")
HOLDING = ("attaching", "attached", "busy", "detaching")
NAMING_PARAMS = re.compile(r"(VolumeId|SnapshotId|SourceSnapshotId|ResourceId)(\.\d+)?")
FILTER_PARAM = re.compile(r"Filter\.(\d+)\.(Name|Value\.\d+)")
VOLUME_FILTERS = {"status", "attachment.status", "attachment.instance-id", "attachment.device"}
SNAPSHOT_FILTERS = {"status", "progress"}

ET.register_namespace("", NS)


def q(tag: str) -> str:
    return f"{{{NS}}}{tag}"


def text(node, tag: str) -> str:
    found = node.find(q(tag)) if node is not None else None
    return (found.text or "") if found is not None else ""


def aws_time(epoch: float | None = None) -> str:
    when = datetime.fromtimestamp(epoch or time.time(), timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Attachment:
    """An attachment moto does not know: a hold, a detach in progress, a Multi-Attach extra."""
    volume_id: str
    instance_id: str
    device: str
    attach_time: str
    attaching_until: float = 0.0
    release_at: float | None = None  # monotonic; None = held until released
    detaching_for: float = 0.0

    def state(self, now: float) -> str | None:
        if self.release_at is not None and now >= self.release_at:
            return "detaching" if now < self.release_at + self.detaching_for else None
        return "attaching" if now < self.attaching_until else "attached"


@dataclass
class Call:
    action: str
    params: dict
    status: int = 0


class Reply(Exception):
    """Raised inside a handler to answer with this status and body."""

    def __init__(self, status: int, body: bytes, headers=None):
        self.status, self.body = status, body
        self.headers = headers or [("Content-Type", "text/xml;charset=UTF-8")]


def ec2_error(status: int, code: str, message: str) -> Reply:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID>"
            "</Response>")
    return Reply(status, body.encode())


def xml_reply(root: ET.Element) -> Reply:
    return Reply(200, b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root))


def split_filters(params: list[tuple[str, str]], local: set[str]):
    """(params without the filters named in `local`, renumbered; [(name, values)] taken out)."""
    rest, filters = [], {}
    for key, value in params:
        m = FILTER_PARAM.fullmatch(key)
        if m:
            filters.setdefault(int(m[1]), []).append((m[2], value))
        else:
            rest.append((key, value))
    kept, taken = [], []
    for n in sorted(filters):
        name = next((v for k, v in filters[n] if k == "Name"), "")
        values = [v for k, v in filters[n] if k != "Name"]
        (taken if name in local else kept).append((name, values))
    for i, (name, values) in enumerate(kept, 1):
        rest.append((f"Filter.{i}.Name", name))
        rest += [(f"Filter.{i}.Value.{j}", v) for j, v in enumerate(values, 1)]
    return rest, taken


def matches(filters, values_of) -> bool:
    """EC2 filter semantics: every filter matches some value; `*` and `?` are wildcards."""
    return all(any(fnmatch.fnmatchcase(have, want) for have in values_of(name) for want in wanted)
               for name, wanted in filters)


class EC2Fidelity(LoopbackServer):
    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.calls: list[Call] = []
        self._lock = threading.RLock()  # EC2 calls are handled one at a time: checks stay true
        self._extra: list[Attachment] = []
        self._attaching_until: dict[tuple[str, str], float] = {}  # moto's own attachments
        self._attach_delay = 0.0
        self._detach_delay = 0.0
        self._invisible: dict[str, list] = {}  # id -> [until (monotonic) or None, calls or None]
        self._not_found: tuple[float | None, int | None] | None = None
        self._pending: dict[str, tuple[float, float]] = {}  # snapshot id -> (start, seconds)
        self._pending_for = 0.0
        self._throttles: dict[str, int] = {}
        self._tokens: dict[str, tuple[list, bytes]] = {}  # CreateVolume ClientToken
        self._cooldown = 6 * 3600.0
        self._modifying, self._optimizing = 0.0, 0.0
        self._modified: dict[str, float] = {}  # volume id -> monotonic time of its last ModifyVolume
        self._windows: dict[tuple[str, str], tuple[float, float, float]] = {}
        self._on_grown = None
        self.serve(self._handler_class(), host, port)

    @property
    def url(self) -> str:
        return self.base_url

    # The test's controls.
    def hold(self, volume_id: str, instance_id: str, device: str = "/dev/xvdf", *,
             seconds: float | None = None, detaching: float = 1.0) -> None:
        """Volume held `attached` by instance_id (released after `seconds`, if given), then
        `detaching` for `detaching` seconds, then gone."""
        now = time.monotonic()
        with self._lock:
            self._extra.append(Attachment(
                volume_id, instance_id, device, aws_time(time.time() - 3600),
                release_at=None if seconds is None else now + seconds, detaching_for=detaching))

    def release_after(self, volume_id: str, seconds: float, detaching: float | None = None) -> None:
        """The held attachments of volume_id start detaching `seconds` from now."""
        with self._lock:
            for a in self._extra:
                if a.volume_id == volume_id and a.release_at is None:
                    a.release_at = time.monotonic() + seconds
                    if detaching is not None:
                        a.detaching_for = detaching

    def attaching_for(self, seconds: float) -> None:
        self._attach_delay = seconds

    def detaching_for(self, seconds: float) -> None:
        self._detach_delay = seconds

    def not_found_for(self, seconds: float | None = None, *, calls: int | None = None) -> None:
        """New ids stay invisible for `seconds`, or for the first `calls` calls naming them."""
        self._not_found = None if (seconds, calls) == (None, None) else (seconds, calls)

    def snapshots_pending_for(self, seconds: float) -> None:
        self._pending_for = seconds

    def modification_cooldown(self, seconds: float) -> None:
        self._cooldown = seconds

    def modifying_for(self, modifying: float, optimizing: float = 0.0) -> None:
        self._modifying, self._optimizing = modifying, optimizing

    def on_volume_grown(self, callback) -> None:
        self._on_grown = callback

    def throttle(self, action: str, n: int = 1) -> None:
        with self._lock:
            self._throttles[action] = self._throttles.get(action, 0) + n

    def actions(self) -> list[str]:
        return [c.action for c in self.calls]

    def count(self, action: str, status: int | None = None) -> int:
        return sum(c.action == action and (status is None or c.status == status)
                   for c in self.calls)

    # Plumbing.
    def _handler_class(self):
        fid = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def handle_one(self):
                body = self._read_body()
                headers = [(k, v) for k, v in self.headers.items()]
                try:
                    reply = fid._dispatch(self.command, self.path, headers, body)
                except Reply as r:
                    reply = r
                self.send_response_only(reply.status)
                for k, v in reply.headers:
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                if self.command == "HEAD":
                    length = dict((k.lower(), v) for k, v in reply.headers).get("content-length")
                    self.send_header("Content-Length", length or "0")
                else:
                    self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply.body)

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = handle_one

        return Handler

    def _forward(self, method: str, path: str, headers, body: bytes) -> Reply:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            send = {k: v for k, v in headers if k.lower() not in HOP_BY_HOP}
            send["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=send)
            resp = conn.getresponse()
            data = resp.read()
            return Reply(resp.status, data, resp.getheaders())
        finally:
            conn.close()

    def _moto(self, headers, action: str, params: list[tuple[str, str]]) -> ET.Element | None:
        """The proxy's own call to moto, in the caller's region (its Authorization header)."""
        auth = [(k, v) for k, v in headers if k.lower() in ("authorization", "x-amz-date")]
        body = urlencode([("Action", action), ("Version", API_VERSION), *params]).encode()
        reply = self._forward("POST", "/", auth + [
            ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")], body)
        return ET.fromstring(reply.body) if reply.status == 200 else None

    def _dispatch(self, method, path, headers, body) -> Reply:
        auth = next((v for k, v in headers if k.lower() == "authorization"), "")
        scope = CREDENTIAL_SCOPE.search(auth)
        if method != "POST" or not scope or scope[2] != "ec2":
            return self._forward(method, path, headers, body)
        params = parse_qsl(body.decode(), keep_blank_values=True)
        first = dict(reversed(params))
        action = first.get("Action", "")
        call = Call(action, first)
        with self._lock:
            self.calls.append(call)
            try:
                reply = self._ec2(action, params, first, headers, body, path)
            except Reply as r:
                reply = r
            call.status = reply.status
            return reply

    def _ec2(self, action, params, first, headers, body, path) -> Reply:
        if self._throttles.get(action):
            self._throttles[action] -= 1
            raise ec2_error(503, "RequestLimitExceeded", "Request limit exceeded.")
        self._refuse_invisible(params)
        special = getattr(self, f"_do_{action}", None)
        if special is None:
            return self._forward("POST", path, headers, body)
        return special(params, first, headers, path)

    # Eventual consistency.
    def _is_invisible(self, resource_id: str) -> bool:
        entry = self._invisible.get(resource_id)
        if entry is None:
            return False
        until, calls = entry
        if (until is not None and time.monotonic() >= until) or calls == 0:
            del self._invisible[resource_id]
            return False
        return True

    def _refuse_invisible(self, params) -> None:
        for key, value in params:
            if NAMING_PARAMS.fullmatch(key) and self._is_invisible(value):
                entry = self._invisible[value]
                if entry[1] is not None:
                    entry[1] -= 1
                if value.startswith("snap-"):
                    raise ec2_error(400, "InvalidSnapshot.NotFound",
                                    f"The snapshot '{value}' does not exist.")
                raise ec2_error(400, "InvalidVolume.NotFound",
                                f"The volume '{value}' does not exist.")

    def _made(self, resource_id: str) -> None:
        if self._not_found:
            seconds, calls = self._not_found
            until = None if seconds is None else time.monotonic() + seconds
            self._invisible[resource_id] = [until, calls]

    # Volumes.
    def _attachments(self, item: ET.Element, now: float) -> ET.Element:
        """Rewrite one DescribeVolumes item in place: our states and attachments, its status."""
        vid = text(item, "volumeId")
        aset = item.find(q("attachmentSet"))
        if aset is None:
            aset = ET.SubElement(item, q("attachmentSet"))
        for a in aset:
            if now < self._attaching_until.get((vid, text(a, "instanceId")), 0.0):
                a.find(q("status")).text = "attaching"
        for extra in self._extra:
            state = extra.state(now) if extra.volume_id == vid else None
            if state:
                aset.append(self._attachment_xml("item", extra, state))
        status = item.find(q("status"))
        if status is not None and status.text in ("available", "in-use"):
            held = any(text(a, "status") in HOLDING for a in aset)
            status.text = "in-use" if held else "available"
        return item

    @staticmethod
    def _attachment_xml(tag: str, a: Attachment, state: str) -> ET.Element:
        node = ET.Element(q(tag))
        for key, value in (("volumeId", a.volume_id), ("instanceId", a.instance_id),
                           ("device", a.device), ("status", state),
                           ("attachTime", a.attach_time), ("deleteOnTermination", "false")):
            ET.SubElement(node, q(key)).text = value
        return node

    def _volume(self, headers, volume_id: str) -> tuple[ET.Element | None, bool]:
        """(the volume as this layer shows it, or None; does moto itself hold an attachment?)"""
        root = self._moto(headers, "DescribeVolumes", [("VolumeId.1", volume_id)])
        item = root.find(f"{q('volumeSet')}/{q('item')}") if root is not None else None
        if item is None:
            return None, False
        aset = item.find(q("attachmentSet"))
        moto_attached = aset is not None and len(aset) > 0
        return self._attachments(item, time.monotonic()), moto_attached

    def _holders(self, volume: ET.Element) -> dict[str, ET.Element]:
        return {text(a, "instanceId"): a for a in volume.find(q("attachmentSet"))
                if text(a, "status") in HOLDING}

    def _do_DescribeVolumes(self, params, first, headers, path) -> Reply:
        forward, local = split_filters(params, VOLUME_FILTERS)
        reply = self._forward("POST", path, headers, urlencode(forward).encode())
        if reply.status != 200:
            return reply
        root, now = ET.fromstring(reply.body), time.monotonic()
        vset = root.find(q("volumeSet"))
        for item in list(vset):
            self._attachments(item, now)

            def values(name, item=item):
                if name == "status":
                    return [text(item, "status")]
                field = {"attachment.status": "status", "attachment.instance-id": "instanceId",
                         "attachment.device": "device"}[name]
                return [text(a, field) for a in item.find(q("attachmentSet"))]

            if self._is_invisible(text(item, "volumeId")) or not matches(local, values):
                vset.remove(item)
        return xml_reply(root)

    def _do_AttachVolume(self, params, first, headers, path) -> Reply:
        vid, iid = first.get("VolumeId", ""), first.get("InstanceId", "")
        volume, moto_holds = self._volume(headers, vid)
        reservations = self._moto(headers, "DescribeInstances", [("InstanceId.1", iid)])
        placement = None if reservations is None else reservations.find(
            f".//{q('instancesSet')}/{q('item')}/{q('placement')}")
        if volume is None or placement is None:
            return self._forward("POST", path, headers, urlencode(params).encode())
        if text(placement, "availabilityZone") != text(volume, "availabilityZone"):
            raise ec2_error(400, "InvalidVolume.ZoneMismatch",
                            f"The volume '{vid}' is not in the same availability zone as "
                            f"instance '{iid}'")
        holders = self._holders(volume)
        multi = text(volume, "multiAttachEnabled") == "true"
        if holders and (not multi or iid in holders):
            raise ec2_error(400, "VolumeInUse", f"{vid} is already attached to an instance")
        now = time.monotonic()
        if moto_holds:  # Multi-Attach: moto would overwrite its one attachment, so keep it here
            extra = Attachment(vid, iid, first.get("Device", ""), aws_time(),
                               attaching_until=now + self._attach_delay)
            self._extra.append(extra)
            root = self._attachment_xml("AttachVolumeResponse", extra, "attaching")
            ET.SubElement(root, q("requestId")).text = str(uuid.uuid4())
            return xml_reply(root)
        reply = self._forward("POST", path, headers, urlencode(params).encode())
        if reply.status == 200:
            self._attaching_until[(vid, iid)] = now + self._attach_delay
        return reply

    def _do_DetachVolume(self, params, first, headers, path) -> Reply:
        vid, iid = first.get("VolumeId", ""), first.get("InstanceId", "")
        now = time.monotonic()
        ours = [a for a in self._extra if a.volume_id == vid and a.state(now) in HOLDING
                and a.state(now) != "detaching" and (not iid or a.instance_id == iid)]
        volume, _ = self._volume(headers, vid)
        holders = self._holders(volume) if volume is not None else {}
        if ours and (iid or len(holders) == 1):
            a = ours[0]
            a.release_at, a.detaching_for = now, self._detach_delay
            root = self._attachment_xml("DetachVolumeResponse", a, "detaching")
            ET.SubElement(root, q("requestId")).text = str(uuid.uuid4())
            return xml_reply(root)
        if not iid and len(holders) == 1:  # EC2 detaches the only attachment; moto needs the id
            iid = next(iter(holders))
            params = [*params, ("InstanceId", iid)]
        reply = self._forward("POST", path, headers, urlencode(params).encode())
        if reply.status == 200:
            self._attaching_until.pop((vid, iid), None)
            answer = ET.fromstring(reply.body)
            self._extra.append(Attachment(vid, iid, text(answer, "device"),
                                          text(answer, "attachTime"), release_at=now,
                                          detaching_for=self._detach_delay))
        return reply

    def _do_DeleteVolume(self, params, first, headers, path) -> Reply:
        vid = first.get("VolumeId", "")
        volume, _ = self._volume(headers, vid)
        holders = self._holders(volume) if volume is not None else {}
        if holders:
            raise ec2_error(400, "VolumeInUse",
                            f"Volume {vid} is currently attached to {next(iter(holders))}")
        return self._forward("POST", path, headers, urlencode(params).encode())

    def _do_CreateVolume(self, params, first, headers, path) -> Reply:
        token = first.get("ClientToken")
        asked = sorted(kv for kv in params if kv[0] != "ClientToken")
        if token and token in self._tokens:
            seen, body = self._tokens[token]
            if seen != asked:
                raise ec2_error(400, "IdempotentParameterMismatch",
                                f"Client token {token} was already used with other parameters")
            return Reply(200, body)
        reply = self._forward("POST", path, headers, urlencode(params).encode())
        if reply.status == 200:
            self._made(text(ET.fromstring(reply.body), "volumeId"))
            if token:
                self._tokens[token] = (asked, reply.body)
        return reply

    # Volume modifications.
    def _do_ModifyVolume(self, params, first, headers, path) -> Reply:
        vid = first.get("VolumeId", "")
        volume, _ = self._volume(headers, vid)
        size = first.get("Size")
        if volume is not None and size and int(size) < int(text(volume, "size") or 0):
            raise ec2_error(400, "InvalidParameterValue",
                            "New size cannot be smaller than existing size")
        last = self._modified.get(vid)
        if last is not None and time.monotonic() - last < self._cooldown:
            raise ec2_error(400, "VolumeModificationRateExceeded",
                            "You've reached the maximum modification rate per volume limit. Wait "
                            "at least 6 hours between modifications per EBS volume.")
        reply = self._forward("POST", path, headers, urlencode(params).encode())
        if reply.status != 200:
            return reply
        now = time.monotonic()
        self._modified[vid] = now
        root = ET.fromstring(reply.body)
        mod = root.find(q("volumeModification"))
        start = text(mod, "startTime")
        self._windows[(vid, start)] = (now, self._modifying, self._optimizing)
        if size and self._on_grown is not None:
            if self._modifying <= 0:
                self._on_grown(vid, int(size))
            else:
                timer = threading.Timer(self._modifying, self._on_grown, (vid, int(size)))
                timer.daemon = True
                timer.start()
        if self._modifying > 0:
            mod.find(q("modificationState")).text = "modifying"
            mod.find(q("progress")).text = "0"
            return xml_reply(root)
        return reply

    def _do_DescribeVolumesModifications(self, params, first, headers, path) -> Reply:
        reply = self._forward("POST", path, headers, urlencode(params).encode())
        if reply.status != 200 or not self._windows:
            return reply
        root, now = ET.fromstring(reply.body), time.monotonic()
        for item in root.iter(q("item")):
            window = self._windows.get((text(item, "volumeId"), text(item, "startTime")))
            if window is None:
                continue
            began, modifying, optimizing = window
            if now < began + modifying:
                state, progress = "modifying", int(50 * (now - began) / modifying)
            elif now < began + modifying + optimizing:
                state = "optimizing"
                progress = 50 + int(50 * (now - began - modifying) / optimizing)
            else:
                continue
            item.find(q("modificationState")).text = state
            item.find(q("progress")).text = str(progress)
        return xml_reply(root)

    # Snapshots.
    def _pending_state(self, snapshot_id: str, now: float) -> tuple[str, str] | None:
        start, seconds = self._pending.get(snapshot_id, (0.0, 0.0))
        if now >= start + seconds:
            return None
        return "pending", f"{int(100 * (now - start) / seconds)}%"

    def _snapshot_made(self, reply: Reply, rewrite: bool) -> Reply:
        if reply.status != 200:
            return reply
        root = ET.fromstring(reply.body)
        sid = text(root, "snapshotId")
        self._made(sid)
        if self._pending_for > 0:
            self._pending[sid] = (time.monotonic(), self._pending_for)
            if rewrite:
                root.find(q("status")).text = "pending"
                root.find(q("progress")).text = ""
                return xml_reply(root)
        return reply

    def _do_CreateSnapshot(self, params, first, headers, path) -> Reply:
        return self._snapshot_made(
            self._forward("POST", path, headers, urlencode(params).encode()), rewrite=True)

    def _do_CopySnapshot(self, params, first, headers, path) -> Reply:
        return self._snapshot_made(
            self._forward("POST", path, headers, urlencode(params).encode()), rewrite=False)

    def _do_DescribeSnapshots(self, params, first, headers, path) -> Reply:
        forward, local = split_filters(params, SNAPSHOT_FILTERS)
        reply = self._forward("POST", path, headers, urlencode(forward).encode())
        if reply.status != 200:
            return reply
        root = ET.fromstring(reply.body)
        sset, now = root.find(q("snapshotSet")), time.monotonic()
        for item in list(sset):
            sid = text(item, "snapshotId")
            pending = self._pending_state(sid, now)
            if pending:
                item.find(q("status")).text, item.find(q("progress")).text = pending
            values = lambda name, item=item: [text(item, name)]  # noqa: E731
            if self._is_invisible(sid) or not matches(local, values):
                sset.remove(item)
        return xml_reply(root)
