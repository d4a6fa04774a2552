"""Teach the in-process moto server to paginate DescribeSnapshots the way AWS does, at scale.

moto (5.2) ignores MaxResults and returns every snapshot in one page, so code that follows
NextToken is never exercised against it. This replaces only the response method: the snapshots,
filters and tags still come from moto's real backend; pages of MaxResults (AWS bounds: 5-1,000)
are cut from moto's answer with an opaque NextToken. A hand-written piece, because moto has none.

moto also reads a resource's tags by scanning every tag of every resource (a regex per tag), so
listing N tagged snapshots costs O(N²): 2,000 snapshots took 15 s per call, 5,000 would not fit in
a read timeout. Within the block a resource's tags are read from moto's own tag index directly —
the same data, the same result shape.
"""

from __future__ import annotations

import base64
import contextlib

from moto.ec2.models.core import TaggedEC2Resource
from moto.ec2.responses.elastic_block_store import ActionResult, ElasticBlockStore
from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

_original = ElasticBlockStore.describe_snapshots
_original_get_tags = TaggedEC2Resource.get_tags


def _indexed_get_tags(self) -> list[dict[str, str]]:
    if not self.id:
        return []
    tags = self.ec2_backend.tags.get(self.id) or {}
    kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")
    return [{"resource_id": self.id, "key": k, "value": v, "resource_type": kind}
            for k, v in tags.items()]


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"snapshots:{offset}".encode()).decode()


def _offset(token: str) -> int:
    return int(base64.urlsafe_b64decode(token.encode()).decode().split(":", 1)[1])


def _paged_describe_snapshots(self) -> ActionResult:
    max_results = self._get_int_param("MaxResults")
    token = self._get_param("NextToken")
    if max_results is None and token is None:
        return _original(self)
    filters = self._filters_from_querystring()
    snapshot_ids = self._get_param("SnapshotIds", [])
    matches = self.ec2_backend.describe_snapshots(snapshot_ids=snapshot_ids, filters=filters)
    size = max(5, min(int(max_results or 1000), 1000))
    start = _offset(token) if token else 0
    page = matches[start:start + size]
    result = {"Snapshots": page}
    if start + size < len(matches):
        result["NextToken"] = _token(start + size)
    return ActionResult(result)


@contextlib.contextmanager
def paginated_snapshots():
    """Within this block, the in-process moto server pages DescribeSnapshots like AWS."""
    ElasticBlockStore.describe_snapshots = _paged_describe_snapshots
    TaggedEC2Resource.get_tags = _indexed_get_tags
    try:
        yield
    finally:
        ElasticBlockStore.describe_snapshots = _original
        TaggedEC2Resource.get_tags = _original_get_tags
