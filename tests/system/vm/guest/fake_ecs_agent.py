"""Test-only stand-in for the ECS container agent, inside the VM: the real agent needs Docker and
the ECS service, neither of which exists here. It does the two things hostagent relies on:
registers this instance as a container instance of ECS_CLUSTER (in moto, via AWS_ENDPOINT_URL),
using the IMDSv2 identity document as the real agent does, and serves the introspection API
(GET /v1/metadata) on 127.0.0.1:51678. Like the real agent it keeps its registration across
reboots of the same instance (state under /var/lib/ecs/data)."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

IMDS = "http://169.254.169.254"
STATE = "/var/lib/ecs/data/vmtest-fake-agent.json"
PORT = 51678


def imds_identity() -> dict:
    put = urllib.request.Request(f"{IMDS}/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    token = urllib.request.urlopen(put, timeout=5).read().decode()
    get = urllib.request.Request(f"{IMDS}/latest/dynamic/instance-identity/document",
                                 headers={"X-aws-ec2-metadata-token": token})
    return json.loads(urllib.request.urlopen(get, timeout=5).read())


def cluster_name() -> str:
    for line in open("/etc/ecs/ecs.config"):
        if line.startswith("ECS_CLUSTER="):
            return line.split("=", 1)[1].strip()
    return "default"


def register(cluster: str) -> str:
    import boto3

    doc = imds_identity()
    if os.path.exists(STATE):
        saved = json.load(open(STATE))
        if saved.get("instance_id") == doc["instanceId"] and saved.get("cluster") == cluster:
            return saved["arn"]
    ecs = boto3.client("ecs", region_name=doc["region"])
    arn = ecs.register_container_instance(
        cluster=cluster, instanceIdentityDocument=json.dumps(doc),
        instanceIdentityDocumentSignature="vmtest")["containerInstance"]["containerInstanceArn"]
    os.makedirs(os.path.dirname(STATE), exist_ok=True)
    json.dump({"instance_id": doc["instanceId"], "cluster": cluster, "arn": arn}, open(STATE, "w"))
    return arn


def main() -> int:
    cluster = cluster_name()
    deadline = time.monotonic() + 120
    while True:
        try:
            arn = register(cluster)
            break
        except Exception as exc:  # IMDS or ECS not answering yet: the real agent retries too
            print(f"registration failed, retrying: {type(exc).__name__}: {exc}", flush=True)
            if time.monotonic() > deadline:
                return 1
            time.sleep(3)
    print(f"registered {arn} in cluster {cluster}", flush=True)
    metadata = json.dumps({"Cluster": cluster, "ContainerInstanceArn": arn,
                           "Version": "Amazon ECS Agent - vmtest stand-in"}).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body, status = (metadata, 200) if self.path == "/v1/metadata" else (b"{}", 404)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    HTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
