#!/usr/bin/env python3
"""Storage benchmarks: hostagent against the bare commands it wraps, measured in the same run.

    sudo .venv/bin/python benchmarks/bench_storage.py [--rounds N]

Prints, for each case, the median wall time of hostagent and of its baseline and their ratio:
  1. bootstrap of a blank 16 GiB sparse loop device  vs  `mkfs.ext4 … && mount`   (goal ≤ 1.3×)
  2. reboot path (formatted, not mounted)            vs  `mount`                  (goal ≤ 1.5×)
  3. `hostagent verify-mount`                        vs  `python3 -c pass`        (goal ≤ 6×)
  4. `hostagent --help`                              vs  `python3 -c pass`        (goal ≤ 4×)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MKFS = ["mkfs.ext4", "-q", "-L", "couchdb", "-m", "0", "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
GOALS = {"bootstrap (blank 16 GiB)": 1.3, "bootstrap (reboot path)": 1.5,
         "verify-mount": 6.0, "--help": 4.0}


def sh(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kw)


def timed(argv, env=None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env, cwd=REPO)
    return time.perf_counter() - start


class Volume:
    """A fresh blank sparse loop device per use, so every format starts from the same state."""

    def __init__(self, work: str, size: str = "16G"):
        self.work, self.size = work, size
        self.backing = os.path.join(work, "volume.img")
        self.mp = os.path.join(work, "opt", "couchdb")
        self.fstab = os.path.join(work, "fstab")
        self.dev = None

    def fresh(self) -> str:
        self.release()
        if os.path.exists(self.backing):
            os.unlink(self.backing)
        sh("truncate", "-s", self.size, self.backing)
        self.dev = sh("losetup", "--show", "-f", self.backing).stdout.strip()
        open(self.fstab, "w").close()
        return self.dev

    def unmount(self):
        subprocess.run(["umount", self.mp], capture_output=True)

    def release(self):
        self.unmount()
        if os.path.isdir(self.mp):
            subprocess.run(["chattr", "-i", self.mp], capture_output=True)
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True)
            self.dev = None

    def config(self) -> str:
        path = os.path.join(self.work, "hostagent.toml")
        with open(path, "w") as f:
            f.write(f'[volume]\ndevice = "{self.dev}"\n[filesystem]\nmount_point = "{self.mp}"\n'
                    f'fstab = "{self.fstab}"\n[host]\nlock_file = "{self.work}/lock"\n'
                    f'state_dir = "{self.work}/state"\n')
        return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_storage: run as root (loop devices, mount)", file=sys.stderr)
        return 2
    py = sys.executable
    # An installed hostagent has its bytecode compiled (pip does it); so must the checkout, or
    # every run would pay for compiling the modules again (PYTHONDONTWRITEBYTECODE is common).
    subprocess.run([py, "-m", "compileall", "-q", os.path.join(REPO, "hostagent")], check=True)
    env = {**os.environ, "PYTHONPATH": REPO}
    hostagent = [py, "-m", "hostagent"]
    results: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in GOALS}
    with tempfile.TemporaryDirectory(prefix="hostagent-bench.") as work:
        vol = Volume(work)
        try:
            for _ in range(opts.rounds):
                # 1. blank volume: bare mkfs+mount, then hostagent bootstrap, each on a fresh device
                dev = vol.fresh()
                os.makedirs(vol.mp, exist_ok=True)
                start = time.perf_counter()
                sh(*MKFS, dev)
                sh("mount", dev, vol.mp)
                results["bootstrap (blank 16 GiB)"][1].append(time.perf_counter() - start)
                vol.release()
                os.rmdir(vol.mp)
                dev = vol.fresh()
                env["HOSTAGENT_CONFIG"] = vol.config()
                results["bootstrap (blank 16 GiB)"][0].append(timed(hostagent + ["bootstrap"], env))
                # 2. reboot path: formatted, fstab written, not mounted
                vol.unmount()
                start = time.perf_counter()
                sh("mount", dev, vol.mp)
                results["bootstrap (reboot path)"][1].append(time.perf_counter() - start)
                vol.unmount()
                results["bootstrap (reboot path)"][0].append(timed(hostagent + ["bootstrap"], env))
                # 3./4. read-only commands against the mounted volume
                base = timed([py, "-c", "pass"], env)
                results["verify-mount"][0].append(timed(hostagent + ["verify-mount"], env))
                results["verify-mount"][1].append(base)
                results["--help"][0].append(timed(hostagent + ["--help"], env))
                results["--help"][1].append(timed([py, "-c", "pass"], env))
        finally:
            vol.release()
    print(f"{'case':28} {'hostagent':>10} {'baseline':>10} {'ratio':>7} {'goal':>6}")
    failed = False
    for case, (ours, base) in results.items():
        a, b = statistics.median(ours), statistics.median(base)
        ratio = a / b
        mark = "ok" if ratio <= GOALS[case] else "OVER"
        failed |= ratio > GOALS[case]
        print(f"{case:28} {a * 1000:8.1f}ms {b * 1000:8.1f}ms {ratio:6.2f}x {GOALS[case]:5.1f}x {mark}")
    print(f"({opts.rounds} rounds, medians; baselines: mkfs.ext4+mount, mount, `{os.path.basename(py)} -c pass`)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
