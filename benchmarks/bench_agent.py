#!/usr/bin/env python3
"""Agent benchmarks: the agent's footprint over a minute, and how fast wait-couchdb sees a server come up.

    sudo .venv/bin/python benchmarks/bench_agent.py [--seconds 60] [--interval 30] [--lag-rounds 5]

1. Footprint: `hostagent agent` on a mounted loop device (ext4, laid out), with pouchdb-server as
   CouchDB, moto as ECS and the introspection stand-in registered, under a NOTIFY_SOCKET with a
   watchdog. After READY=1 (and the first ECS report) it samples RSS every second and the CPU time
   over the window. Goals: RSS ≤ 45 MB, CPU ≤ 0.5 % of one core. The AWS child process (boto3) is
   reported apart: it runs only when an attribute changes.
2. Readiness lag: pouchdb-server is started while two waiters run side by side — hostagent's
   wait_until_ready and a bare `requests.get` loop every 5 ms (the baseline). Reported: how much
   later hostagent notices than the baseline (goal ≤ ~250 ms), and the ratio of their times from
   the server's spawn (same run, so pouchdb's start-up cancels out).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")

RSS_GOAL_MB = 45.0
CPU_GOAL_PERCENT = 0.5
LAG_GOAL_MS = 250.0


def sh(*argv):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MountedVolume:
    """A laid-out ext4 loop device mounted via a temp fstab line, as bootstrap leaves it."""

    def __init__(self, work: str):
        from hostagent.adapters.fstab import desired_entry, ensure_fstab_entry

        self.work = work
        self.backing = os.path.join(work, "volume.img")
        self.mp = os.path.join(work, "opt", "couchdb")
        self.fstab = os.path.join(work, "fstab")
        sh("truncate", "-s", "256M", self.backing)
        self.dev = sh("losetup", "--show", "-f", self.backing).stdout.strip()
        sh("mkfs.ext4", "-q", "-L", "couchdb", "-m", "0", self.dev)
        uuid = sh("blkid", "-p", "-s", "UUID", "-o", "value", self.dev).stdout.strip()
        os.makedirs(self.mp)
        open(self.fstab, "w").close()
        ensure_fstab_entry(self.fstab, desired_entry(uuid, self.mp, "ext4", "defaults,noatime", 30))
        sh("mount", "--fstab", self.fstab, self.mp)
        for d in ("data", "etc", "etc/local.d"):
            path = os.path.join(self.mp, d)
            os.makedirs(path)
            os.chown(path, 5984, 5984)
            os.chmod(path, 0o750)

    def release(self):
        subprocess.run(["umount", self.mp], capture_output=True)
        subprocess.run(["losetup", "-d", self.dev], capture_output=True)


def start_moto():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    return server


def register_instance() -> str:
    import boto3

    ec2, ecs = boto3.client("ec2"), boto3.client("ecs")
    ecs.create_cluster(clusterName="bench")
    iid = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    doc = json.dumps({"instanceId": iid, "region": "us-east-1", "availabilityZone": "us-east-1a"})
    return ecs.register_container_instance(cluster="bench", instanceIdentityDocument=doc)[
        "containerInstance"]["containerInstanceArn"]


def bench_footprint(seconds: float, interval: int) -> dict:
    import psutil

    from tests.support.ecs_introspection import IntrospectionServer
    from tests.support.pouchdb import PouchDBServer

    work = tempfile.mkdtemp(prefix="bench-agent-")
    volume = MountedVolume(work)
    couch = PouchDBServer().start()
    moto = start_moto()
    intro = IntrospectionServer(cluster="bench", arn=register_instance()).start()
    notify_path = os.path.join(work, "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(0.5)
    messages: list[tuple[float, str]] = []
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            try:
                messages.append((time.monotonic(), notify.recv(65536).decode()))
            except socket.timeout:
                pass
            except OSError:  # closed at the end of the run
                return

    threading.Thread(target=listen, daemon=True).start()
    cfg = os.path.join(work, "hostagent.toml")
    with open(cfg, "w") as f:
        f.write(f'[volume]\ndevice = "{volume.dev}"\n[filesystem]\nmount_point = "{volume.mp}"\n'
                f'fstab = "{volume.fstab}"\n[couchdb]\nurl = "{couch.url}"\n'
                f'[ecs]\nintrospection_url = "{intro.url}"\n[agent]\ninterval = {interval}\n'
                f'[host]\nlock_file = "{work}/lock"\nstate_dir = "{work}/state"\n')
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="30000000")
    proc = subprocess.Popen([sys.executable, "-m", "hostagent", "--config", cfg, "agent"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log_lines: list[str] = []
    threading.Thread(target=lambda: [log_lines.append(l.rstrip()) for l in proc.stdout],
                     daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not any("ECS: hostagent.persistence=ready" in l for l in log_lines):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("agent did not report ready:\n" + "\n".join(log_lines))
            time.sleep(0.1)
        time.sleep(2)  # let the AWS child exit and the first rounds settle
        p = psutil.Process(proc.pid)
        t0, c0 = time.monotonic(), p.cpu_times()
        rss = []
        while time.monotonic() - t0 < seconds:
            rss.append(p.memory_info().rss / 2**20)
            time.sleep(1.0)
        t1, c1 = time.monotonic(), p.cpu_times()
        cpu = (c1.user + c1.system) - (c0.user + c0.system)
        children = (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        stop_ms = (time.monotonic() - start) * 1000
        pings = sum(1 for _, m in messages if m == "WATCHDOG=1")
        return {"seconds": round(t1 - t0, 1), "interval": interval,
                "rss_max_mb": round(max(rss), 1), "rss_median_mb": round(statistics.median(rss), 1),
                "cpu_percent": round(100 * cpu / (t1 - t0), 3),
                "child_cpu_s_in_window": round(children, 3),
                "watchdog_pings": pings, "sigterm_exit": code, "sigterm_ms": round(stop_ms)}
    finally:
        if proc.poll() is None:
            proc.kill()
        stop.set()
        time.sleep(0.6)  # the listener notices within its 0.5 s timeout
        notify.close()
        intro.stop()
        moto.stop()
        couch.stop()
        volume.release()


def bench_lag(rounds: int) -> dict:
    import requests

    from hostagent.adapters.couchdb import wait_until_ready
    from tests.support.pouchdb import PouchDBServer

    lags, ratios = [], []
    for _ in range(rounds):
        server = PouchDBServer()
        results: dict[str, float] = {}
        done = threading.Event()

        def baseline():
            s = requests.Session()
            s.trust_env = False
            while not done.is_set():
                try:
                    if s.get(server.url + "/", timeout=1).status_code == 200:
                        results["baseline"] = time.monotonic()
                        return
                except requests.RequestException:
                    pass
                time.sleep(0.005)

        def ours():
            r = wait_until_ready(server.url, 60)
            if r.ready:
                results["hostagent"] = time.monotonic()

        threads = [threading.Thread(target=baseline), threading.Thread(target=ours)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # both are already waiting when the server is spawned
        spawned = time.monotonic()
        server.start(wait=False)
        for t in threads:
            t.join(60)
        done.set()
        server.stop()
        lags.append((results["hostagent"] - results["baseline"]) * 1000)
        ratios.append((results["hostagent"] - spawned) / (results["baseline"] - spawned))
    return {"rounds": rounds, "lag_ms_median": round(statistics.median(lags)),
            "lag_ms_max": round(max(lags)), "ratio_median": round(statistics.median(ratios), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--interval", type=int, default=30)
    parser.add_argument("--lag-rounds", type=int, default=5)
    parser.add_argument("--skip-footprint", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0 and not args.skip_footprint:
        print("bench_agent: run as root (loop device, mount)", file=sys.stderr)
        return 2
    results = {}
    if not args.skip_footprint:
        fp = bench_footprint(args.seconds, args.interval)
        results["footprint"] = fp
        print(f"agent footprint over {fp['seconds']}s (interval {fp['interval']}s): "
              f"RSS max {fp['rss_max_mb']} MB (goal ≤ {RSS_GOAL_MB}), "
              f"CPU {fp['cpu_percent']}% of a core (goal ≤ {CPU_GOAL_PERCENT}), "
              f"{fp['watchdog_pings']} watchdog pings, SIGTERM -> exit {fp['sigterm_exit']} "
              f"in {fp['sigterm_ms']} ms")
    lag = bench_lag(args.lag_rounds)
    results["readiness_lag"] = lag
    print(f"readiness detection: hostagent {lag['lag_ms_median']} ms after a 5 ms requests.get "
          f"loop (median of {lag['rounds']}, max {lag['lag_ms_max']} ms; goal ≤ {LAG_GOAL_MS:.0f}); "
          f"time-from-spawn ratio {lag['ratio_median']}×")
    print(json.dumps(results))
    ok = lag["lag_ms_median"] <= LAG_GOAL_MS
    if "footprint" in results:
        ok = ok and results["footprint"]["rss_max_mb"] <= RSS_GOAL_MB and \
            results["footprint"]["cpu_percent"] <= CPU_GOAL_PERCENT
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
