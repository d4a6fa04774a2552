#!/usr/bin/env python3
"""bench_grow on a real kernel: boots the VM test's baked image under qemu and runs
benchmarks/bench_grow.py inside it, against the baked /opt/hostagent, same run, same kernel.

    sudo .venv/bin/python benchmarks/bench_grow_vm.py [--rounds 3]

Why: an online resize2fs needs CAP_SYS_RESOURCE, which this sandbox (and CI like it) does not
grant, so bench_grow.py cannot measure here; root in the guest has it. The guest's root disk is
the image's qcow2 overlay, so the sparse 16 -> 32 GiB loop device lives there. Under TCG both
sides (bare resize2fs and hostagent) are slowed alike; read the ratios, not the milliseconds.
The image is the one tests/system/test_vm.py builds (cached under .cache/vm/); the benchmark's
files reach the guest on a small read-only ext4 drive labelled vmbench. No AWS, no network:
the guest's hostagent-bootstrap finds no IMDS and fails, which the benchmark does not need.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH_FILES = ("bench_grow.py", "bench_storage.py")


def bench_drive(work: Path) -> Path:
    """A small ext4 image, labelled vmbench, holding the benchmark's files."""
    tree = work / "bench-tree"
    tree.mkdir()
    for name in BENCH_FILES:
        (tree / name).write_bytes((REPO / "benchmarks" / name).read_bytes())
    image = work / "bench.img"
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "vmbench", "-d", str(tree), str(image)],
                   check=True)
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 21), metavar="N")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_grow_vm: run as root (it builds and boots the VM test's image)",
              file=sys.stderr)
        return 2
    from tests.system.cloudinit_deb import render_user_data
    from tests.system.vm import image as images
    from tests.system.vm.qemu import accelerator, boot, overlay
    from tests.system.vm.seed import make_seed

    image = images.build_image(images.ensure_base_root())
    with tempfile.TemporaryDirectory(prefix="hostagent-bench-grow-vm.") as tmp:
        work = Path(tmp)
        root = overlay(image.root_img, work / "root.qcow2")
        seed = make_seed(work / "seed", instance_id="i-0bench0000000000",
                         shipped_user_data=render_user_data({"ECS_CLUSTER": "bench"}))
        # Ports nothing listens on: the guest reaches no AWS and no IMDS (refused at once).
        result = boot("bench-grow", image=image, root_disk=root, seed_iso=seed, data_disk=None,
                      volume_serial=None, moto_port=9, imds_port=9, workdir=work,
                      cmdline_extra={"bench": "grow", "rounds": str(opts.rounds)},
                      timeout=1800, extra_drives=(bench_drive(work),))
        bench = (result.report or {}).get("bench")
        if not bench:
            from tests.system.vm.qemu import console_tail
            print(f"bench_grow_vm: no result from the guest (qemu exit {result.exit_code})\n"
                  f"{console_tail(result, 40)}", file=sys.stderr)
            return 1
        print(f"in a VM ({accelerator()[0]}): the VM test's baked image, boot to result "
              f"{result.seconds:.0f} s")
        sys.stdout.write(bench.get("out", ""))
        if bench.get("rc") != 0:
            print(f"bench_grow_vm: bench_grow in the guest: exit {bench.get('rc')}: "
                  f"{bench.get('err', '')[-2000:]}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
