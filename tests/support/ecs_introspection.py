"""A tiny stand-in for the ECS container agent's introspection API (GET /v1/metadata).

A hand-written fake because the ECS agent cannot run here (it needs Docker and a real ECS
endpoint). It answers what the agent answers: {"Cluster", "ContainerInstanceArn", "Version"},
with ContainerInstanceArn null until the test "registers" it.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

from tests.support.loopback import LoopbackServer


class IntrospectionServer(LoopbackServer):
    def __init__(self, cluster="default", arn=None, host="127.0.0.1", port=0):
        self.cluster = cluster
        self.arn = arn  # None until registered, as the real agent reports
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                server.requests += 1
                if self.path != "/v1/metadata":
                    body, status = b"404 page not found\n", 404
                else:
                    body = json.dumps({"Cluster": server.cluster,
                                       "ContainerInstanceArn": server.arn,
                                       "Version": "Amazon ECS Agent - v1.89.0 (test)"}).encode()
                    status = 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.serve(Handler, host, port)

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/metadata"

    def register(self, arn: str) -> None:
        self.arn = arn



if __name__ == "__main__":  # python -m tests.support.ecs_introspection PORT CLUSTER ARN
    import sys

    srv = IntrospectionServer(cluster=sys.argv[2], arn=sys.argv[3] if len(sys.argv) > 3 else None,
                              port=int(sys.argv[1]))
    srv.httpd.serve_forever()


def register_with_ecs(ecs, instance_id: str, introspection, *, az: str = "us-east-1a") -> str:
    """Register a moto instance with moto's ECS (cluster "gc") and make the introspection
    stand-in name it, as the ECS agent does on a host; returns the container-instance ARN."""
    import json

    ecs.create_cluster(clusterName="gc")
    doc = json.dumps({"instanceId": instance_id, "region": "us-east-1", "availabilityZone": az})
    arn = ecs.register_container_instance(
        cluster="gc", instanceIdentityDocument=doc)["containerInstance"]["containerInstanceArn"]
    introspection.register(arn)
    return arn
