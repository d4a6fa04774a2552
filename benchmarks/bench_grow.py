#!/usr/bin/env python3
"""Online growth (issue 10): a mounted 16 GiB ext4 grown to 32 GiB by hostagent vs bare resize2fs, same run.

    sudo .venv/bin/python benchmarks/bench_grow.py [--rounds 5] [--source DIR]

One sparse loop device, reset before every measurement: backing file emptied and set to 16 GiB,
`mkfs.ext4` as bootstrap makes it (`-m 0`, lazy init), mounted, then its backing file grown to
32 GiB and `losetup -c` (what EBS and the NVMe driver do after ModifyVolume). Then, in turn
(the order rotates every round):
  bare       resize2fs /dev/loopN
  bootstrap  `hostagent bootstrap` (volume.device config): it observes, plans grow-fs (the device
             is more than 1% larger than its ext4) and runs resize2fs; process start included
  agent      the agent's path in one process: observe the mount (sysfs size, superblock, statvfs),
             decide, take the host lock, resize2fs (flows.grow.grow_filesystem); timed in process
hostagent runs from bench_storage's venv, built like the baked one (non-editable, only runtime
dependencies), or from --venv (the baked /opt/hostagent itself, on an image). Reported: medians, each against bare resize2fs (ratio and difference), and
`python -c pass` for scale. Needs root and CAP_SYS_RESOURCE (the kernel refuses an online
resize without it: exit 2 here, saying so).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from bench_storage import REPO, MKFS, bench_venv, clean_env, ms, sh, timed

GIB = 1 << 30
FROM_GIB, TO_GIB = 16, 32
CAP_SYS_RESOURCE = 24
AGENT_PATH = r"""
import sys, time
from hostagent.config import load_config
from hostagent.adapters.resize import observe_mounted
from hostagent.flows.grow import grow_filesystem
config = load_config(sys.argv[1])
start = time.perf_counter()
fs = observe_mounted(config.filesystem.mount_point)
assert fs.needs_grow, fs
detail = grow_filesystem(config, fs.major_minor)
print(time.perf_counter() - start, detail)
"""


def has_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        caps = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(caps.split()[1], 16) >> CAP_SYS_RESOURCE & 1)


class Volume:
    """The one loop device every measurement uses, with its temp fstab, mount point, lock, state."""

    def __init__(self, work: str):
        self.work = work
        self.backing = os.path.join(work, "volume.img")
        self.mp = os.path.join(work, "opt", "couchdb")
        os.makedirs(self.mp)
        self.fstab = os.path.join(work, "fstab")
        open(self.fstab, "w").close()
        sh("truncate", "-s", f"{FROM_GIB}G", self.backing)
        self.dev = sh("losetup", "--show", "-f", self.backing).stdout.strip()
        self.config = os.path.join(work, "hostagent.toml")
        with open(self.config, "w") as f:
            f.write(f'[volume]\ndevice = "{self.dev}"\n[filesystem]\nmount_point = "{self.mp}"\n'
                    f'fstab = "{self.fstab}"\n[host]\nlock_file = "{work}/lock"\n'
                    f'state_dir = "{work}/state"\n')

    def reset_grown(self) -> None:
        """A fresh 16 GiB ext4, mounted as bootstrap mounts it, whose device then grew to 32."""
        subprocess.run(["umount", self.mp], capture_output=True)
        os.truncate(self.backing, 0)  # drop every block, then sparse again
        os.truncate(self.backing, FROM_GIB * GIB)
        sh("losetup", "-c", self.dev)
        sh(*MKFS, self.dev)
        sh("mount", self.dev, self.mp)
        os.truncate(self.backing, TO_GIB * GIB)
        sh("losetup", "-c", self.dev)

    def fs_gib(self) -> float:
        st = os.statvfs(self.mp)
        return st.f_blocks * st.f_frsize / GIB

    def release(self) -> None:
        subprocess.run(["umount", self.mp], capture_output=True)
        subprocess.run(["losetup", "-d", self.dev], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, choices=range(1, 51), metavar="N")
    parser.add_argument("--source", default=REPO, help="checkout to install and measure")
    parser.add_argument("--venv", help="measure the hostagent installed in this venv instead "
                                       "(e.g. the baked /opt/hostagent on an image)")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_grow: run as root (loop devices, mount)", file=sys.stderr)
        return 2
    if not has_sys_resource():
        print("bench_grow: cannot measure here: online resize needs CAP_SYS_RESOURCE, which this "
              "process lacks (the kernel refuses EXT4_IOC_RESIZE_FS)", file=sys.stderr)
        return 2
    venv = opts.venv or bench_venv(os.path.abspath(opts.source))
    python, hostagent = os.path.join(venv, "bin", "python"), os.path.join(venv, "bin", "hostagent")
    times: dict[str, list[float]] = {"bare": [], "bootstrap": [], "agent": [], "pass": []}
    work = tempfile.mkdtemp(prefix="hostagent-bench-grow.")
    vol = Volume(work)
    try:
        env = clean_env(HOSTAGENT_CONFIG=vol.config)
        vol.reset_grown()
        sh(hostagent, "bootstrap", env=env, cwd=work)  # fstab line, layout, state record
        cases = ["bare", "bootstrap", "agent"]
        for round_ in range(opts.rounds):
            for case in cases[round_ % 3:] + cases[:round_ % 3]:
                vol.reset_grown()
                before = vol.fs_gib()
                if case == "bare":
                    times[case].append(timed(["resize2fs", vol.dev], env, work))
                elif case == "bootstrap":
                    times[case].append(timed([hostagent, "bootstrap"], env, work))
                else:
                    done = sh(python, "-c", AGENT_PATH, vol.config, env=env, cwd=work)
                    times[case].append(float(done.stdout.split()[0]))
                grown = vol.fs_gib()  # statvfs: without the journal and metadata
                if grown < before * TO_GIB / FROM_GIB * 0.99:
                    sys.exit(f"bench_grow: {case} left the ext4 at {grown:.1f} GiB "
                             f"(from {before:.1f})")
            times["pass"].append(timed([python, "-c", "pass"], env, work))
    finally:
        vol.release()
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    bare = med["bare"]
    print(f"online growth {FROM_GIB} -> {TO_GIB} GiB of a mounted ext4 on a sparse loop device "
          f"({opts.rounds} rounds, medians); hostagent from {venv}")
    print(f"`python -c pass` {ms(med['pass'])}")
    print(f"{'case':10} {'time':>10} {'vs bare':>8} {'+ over bare':>12}")
    for case in ("bare", "bootstrap", "agent"):
        print(f"{case:10} {ms(med[case])} {med[case] / bare:7.2f}x {ms(med[case] - bare)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
