"""The ECS container agent's introspection API (/v1/metadata): which cluster and container instance we are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

INTROSPECTION_TIMEOUT = (1.0, 3.0)


@dataclass(frozen=True)
class ContainerInstance:
    cluster: str
    arn: str

    @property
    def region(self) -> str | None:
        """arn:aws:ecs:REGION:ACCOUNT:container-instance/… — no IMDS call needed for the region."""
        parts = self.arn.split(":")
        return parts[3] if len(parts) > 5 and parts[0] == "arn" and parts[3] else None


@dataclass(frozen=True)
class AgentState:
    instance: ContainerInstance | None
    reason: str  # why there is no instance yet: agent not running, not registered yet …


def parse_introspection(doc: Any) -> AgentState:
    """The /v1/metadata document → the container instance, or why there is none yet.

    ContainerInstanceArn is null (or absent) until the agent has registered with the cluster:
    that is a normal boot state, not an error.
    """
    if not isinstance(doc, dict):
        return AgentState(None, "introspection answered something that is not a JSON object")
    cluster = doc.get("Cluster")
    arn = doc.get("ContainerInstanceArn")
    if not arn:
        where = f" with cluster {cluster}" if cluster else ""
        return AgentState(None, f"ECS agent has not registered{where} yet")
    if not isinstance(arn, str) or not arn.startswith("arn:"):
        return AgentState(None, f"unexpected ContainerInstanceArn {arn!r}")
    if not cluster:
        # The ARN of a container instance carries the cluster name in its new format.
        pieces = arn.split("/")
        cluster = pieces[1] if len(pieces) == 3 else "default"
    return AgentState(ContainerInstance(str(cluster), arn), "registered")


def read_introspection(url: str, *, session=None, timeout=INTROSPECTION_TIMEOUT) -> AgentState:
    """GET the introspection URL; an agent that is not up yet is a state, never an exception."""
    import requests

    if session is None:
        session = requests.Session()
        session.trust_env = False  # loopback: never through an HTTP proxy from the environment
    try:
        response = session.get(url, timeout=timeout, allow_redirects=False)
    except requests.exceptions.ConnectionError:
        return AgentState(None, f"ECS agent introspection not answering at {url} (agent not running?)")
    except requests.exceptions.Timeout:
        return AgentState(None, f"ECS agent introspection timed out at {url}")
    except requests.exceptions.RequestException as exc:
        return AgentState(None, f"ECS agent introspection failed at {url}: {type(exc).__name__}")
    if response.status_code != 200:
        return AgentState(None, f"ECS agent introspection answered HTTP {response.status_code} at {url}")
    try:
        doc = response.json()
    except ValueError:
        return AgentState(None, f"ECS agent introspection answered non-JSON at {url}")
    return parse_introspection(doc)
