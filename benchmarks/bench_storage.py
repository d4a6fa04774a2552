#!/usr/bin/env python3
"""Storage benchmarks (issue 8): hostagent installed like the baked image, against baselines from the same run.

    sudo .venv/bin/python benchmarks/bench_storage.py [--rounds N] [--source DIR]

hostagent runs from a venv holding only it and its runtime dependencies, installed
non-editable (as bake.sh does), so `python -c pass` is the baked interpreter's start-up and
not the development venv's (~2x slower: setuptools' .pth hook and the editable finder). The venv
is built once per content of setup.cfg + pyproject.toml + hostagent/ and kept in
.cache/bench-venv/. Cases, each the median of --rounds:
  reboot path   bootstrap of a formatted, unmounted ext4 whose fstab line is there  ≤ 5 × pass
  blank 16 GiB  bootstrap of a blank sparse loop device   ≤ bare mkfs.ext4 && mount + 5 × pass
  verify-mount  on the mounted volume                                                ≤ 6 × pass
  --help                                                                              ≤ 4 × pass
Then where the reboot path's time goes: imports (-X importtime) and every command it runs, with
its wall time (from the runner's debug log, `-vv`), and the commands of the blank bootstrap.
Every bootstrap uses a temp dir for its fstab, mount point, lock file and state dir.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MKFS = ["mkfs.ext4", "-q", "-L", "couchdb", "-m", "0", "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
PASSES = 5  # the budget: this many `python -c pass` on top of the baseline
GOAL_VERIFY, GOAL_HELP = 6.0, 4.0
BUILD_FILES = ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE")
RAN = re.compile(r"ran (.+) in ([\d.]+) ms")


def sh(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kw)


def source_files(source: str) -> list[str]:
    files = [f for f in BUILD_FILES if os.path.isfile(os.path.join(source, f))]
    for root, dirs, names in os.walk(os.path.join(source, "hostagent")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        files += sorted(os.path.relpath(os.path.join(root, n), source) for n in names
                        if not n.endswith((".pyc", ".pyo")))
    return files


def bench_venv(source: str) -> str:
    """A venv with hostagent (non-editable) and only its runtime deps, cached by source content."""
    base = getattr(sys, "_base_executable", sys.executable)
    digest = hashlib.sha256(f"{os.path.realpath(base)}\0{sys.version}\0".encode())
    files = source_files(source)
    for rel in files:
        with open(os.path.join(source, rel), "rb") as f:
            digest.update(rel.encode() + b"\0" + f.read() + b"\0")
    cache = os.path.join(REPO, ".cache", "bench-venv")
    venv = os.path.join(cache, digest.hexdigest()[:16])
    done_marker = os.path.join(venv, ".complete")
    if os.path.exists(done_marker):
        return venv
    os.makedirs(cache, exist_ok=True)
    for stale in os.listdir(cache):  # one venv at a time: each is ~100 MB of boto3
        shutil.rmtree(os.path.join(cache, stale), ignore_errors=True)
    print(f"building the bench venv (non-editable hostagent + runtime deps) in {venv} …", flush=True)
    with tempfile.TemporaryDirectory(prefix="hostagent-bench-src.") as src:
        for rel in files:  # pip builds in the tree: build it in a copy, not in the checkout
            os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
            shutil.copy2(os.path.join(source, rel), os.path.join(src, rel))
        # Built in place (scripts name their interpreter by absolute path); complete once marked.
        subprocess.run([base, "-m", "venv", "--without-pip", venv], check=True)
        # The running interpreter's pip with the machine's own pip configuration (index, mirrors).
        pip = subprocess.run([sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"),
                              "install", "--quiet", "--disable-pip-version-check", src],
                             capture_output=True, text=True)
        if pip.returncode != 0:
            sys.exit(f"bench_storage: pip install into the bench venv failed:\n{pip.stdout}{pip.stderr}")
    open(done_marker, "w").close()
    return venv


def clean_env(**extra) -> dict[str, str]:
    # No PYTHONPATH/PYTHON* leaking from a dev shell: the baked unit runs with none of them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return {**env, **extra}


def timed(argv, env, cwd) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench_storage: {' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return elapsed


class Volume:
    """A fresh blank 16 GiB sparse loop device with its own temp fstab, mount point, lock and state."""

    def __init__(self, parent: str, size: str = "16G"):
        self.work = tempfile.mkdtemp(prefix="round.", dir=parent)
        self.backing = os.path.join(self.work, "volume.img")
        self.mp = os.path.join(self.work, "opt", "couchdb")
        self.fstab = os.path.join(self.work, "fstab")
        sh("truncate", "-s", size, self.backing)
        self.dev = sh("losetup", "--show", "-f", self.backing).stdout.strip()
        open(self.fstab, "w").close()
        self.config = os.path.join(self.work, "hostagent.toml")
        with open(self.config, "w") as f:
            f.write(f'[volume]\ndevice = "{self.dev}"\n[filesystem]\nmount_point = "{self.mp}"\n'
                    f'fstab = "{self.fstab}"\n[host]\nlock_file = "{self.work}/lock"\n'
                    f'state_dir = "{self.work}/state"\n')

    def unmount(self):
        while subprocess.run(["umount", self.mp], capture_output=True).returncode == 0:
            pass  # a stacked guard mount, if any

    def release(self):
        self.unmount()
        if os.path.isdir(self.mp):
            subprocess.run(["chattr", "-i", self.mp], capture_output=True)
        subprocess.run(["losetup", "-d", self.dev], capture_output=True)
        shutil.rmtree(self.work, ignore_errors=True)


def commands_of(hostagent: str, env, cwd) -> list[tuple[str, float]]:
    """Each command one bootstrap ran and its wall time, from the runner's debug log (-vv)."""
    done = subprocess.run([hostagent, "bootstrap", "-vv"], capture_output=True, text=True, env=env, cwd=cwd)
    if done.returncode != 0:
        sys.exit(f"bench_storage: bootstrap -vv exited {done.returncode}:\n{done.stderr}")
    return [(m.group(1).replace(cwd, "$ROUND"), float(m.group(2)))
            for m in map(RAN.search, done.stderr.splitlines()) if m]


def median_commands(runs: list[list[tuple[str, float]]]) -> list[tuple[str, float]]:
    same = [r for r in runs if [a for a, _ in r] == [a for a, _ in runs[-1]]]
    return [(argv, statistics.median(r[i][1] for r in same) / 1000) for i, (argv, _) in enumerate(runs[-1])]


def import_profile(python: str, hostagent: str, env, cwd, count: int = 8):
    """The modules one bootstrap imports beyond `python -c pass`: (their names, top rows by cumulative time).

    Each row is (cumulative s, self s, module, imported via) from -X importtime; only hostagent's
    modules, what they import directly, and what is imported at top level.
    """
    startup = {line.rsplit("|", 1)[1].strip() for line in subprocess.run(
        [python, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, env=env,
        cwd=cwd).stderr.splitlines() if "|" in line}
    stderr = subprocess.run([python, "-X", "importtime", hostagent, "bootstrap"], capture_output=True,
                            text=True, env=env, cwd=cwd).stderr
    entries = []  # (depth, cumulative, self, name) in print order: children before their parent
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        head, cumulative, name = line.split("|")
        depth = (len(name) - len(name.lstrip())) // 2
        entries.append((depth, float(cumulative) / 1e6, float(head[len("import time:"):]) / 1e6, name.strip()))
    top_level = [name for depth, _, _, name in entries
                 if depth == 0 and name not in startup and name != "__main__"]
    rows = []
    for i, (depth, cumulative, own, name) in enumerate(entries):
        if name in startup:
            continue
        chain, want = [], depth  # the importers: the next entries with a smaller depth
        for later in entries[i + 1:]:
            if later[0] < want:
                chain.append(later[3])
                want = later[0]
                if len(chain) == 2 or want == 0:
                    break
        if depth == 0 or name.startswith("hostagent") or chain[0].startswith("hostagent"):
            rows.append((cumulative, own, name, " <- ".join(chain)))
    rows.sort(reverse=True)
    return top_level, rows[:count]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, choices=range(1, 101), metavar="N")
    parser.add_argument("--source", default=REPO, help="checkout to install and measure (default: this one)")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_storage: run as root (loop devices, mount)", file=sys.stderr)
        return 2
    venv = bench_venv(os.path.abspath(opts.source))
    python, hostagent = os.path.join(venv, "bin", "python"), os.path.join(venv, "bin", "hostagent")
    times: dict[str, list[float]] = {k: [] for k in ("pass", "mkfs+mount", "mount", "blank", "reboot",
                                                    "verify", "help", "imports")}
    with tempfile.TemporaryDirectory(prefix="hostagent-bench.") as work:
        commands_blank, commands_reboot, imports = [], [], None
        for round_ in range(opts.rounds):
            bare = Volume(work)
            try:
                os.makedirs(bare.mp)
                start = time.perf_counter()
                sh(*MKFS, bare.dev)
                sh("mount", bare.dev, bare.mp)
                times["mkfs+mount"].append(time.perf_counter() - start)
                bare.unmount()
                start = time.perf_counter()
                sh("mount", bare.dev, bare.mp)
                times["mount"].append(time.perf_counter() - start)
            finally:
                bare.release()
            vol = Volume(work)
            try:
                env = clean_env(HOSTAGENT_CONFIG=vol.config)
                times["pass"].append(timed([python, "-c", "pass"], env, vol.work))
                times["blank"].append(timed([hostagent, "bootstrap"], env, vol.work))
                times["verify"].append(timed([hostagent, "verify-mount"], env, vol.work))
                times["help"].append(timed([hostagent, "--help"], env, vol.work))
                times["pass"].append(timed([python, "-c", "pass"], env, vol.work))
                for _ in range(3):  # reboot: the ext4 and its fstab line are there, not mounted
                    vol.unmount()
                    times["reboot"].append(timed([hostagent, "bootstrap"], env, vol.work))
                    times["pass"].append(timed([python, "-c", "pass"], env, vol.work))
                vol.unmount()
                commands_reboot.append(commands_of(hostagent, env, vol.work))
                if round_ == 0:
                    vol.unmount()
                    imports = import_profile(python, hostagent, env, vol.work)
                # The same imports without importtime's overhead, nor bootstrap's work.
                times["imports"].append(timed([python, "-c", f"import {', '.join(imports[0])}"], env, vol.work))
            finally:
                vol.release()
            if round_ < 3:
                vol = Volume(work)
                try:
                    commands_blank.append(commands_of(hostagent, clean_env(HOSTAGENT_CONFIG=vol.config), vol.work))
                finally:
                    vol.release()
    med = {k: statistics.median(v) for k, v in times.items()}
    p = med["pass"]
    cases = [
        ("reboot path", med["reboot"], p, PASSES * p, f"≤ {PASSES} × pass"),
        ("blank 16 GiB", med["blank"], med["mkfs+mount"], med["mkfs+mount"] + PASSES * p,
         f"≤ mkfs+mount + {PASSES} × pass"),
        ("verify-mount", med["verify"], p, GOAL_VERIFY * p, f"≤ {GOAL_VERIFY:g} × pass"),
        ("--help", med["help"], p, GOAL_HELP * p, f"≤ {GOAL_HELP:g} × pass"),
    ]
    print(f"hostagent from {venv} ({opts.rounds} rounds, medians; $ROUND = a round's temp dir)")
    print(f"`python -c pass` {ms(p)}   bare mkfs.ext4+mount {ms(med['mkfs+mount'])}   bare mount {ms(med['mount'])}")
    print(f"{'case':14} {'hostagent':>10} {'baseline':>10} {'× pass':>7} {'budget':>10}  goal")
    failed = False
    for name, ours, base, budget, goal in cases:
        met = ours <= budget
        failed |= not met
        print(f"{name:14} {ms(ours)} {ms(base)} {ours / p:6.1f}x {ms(budget)}  {goal}: "
              f"{'met' if met else 'NOT met'}")
    commands = {"reboot path": median_commands(commands_reboot), "blank 16 GiB": median_commands(commands_blank)}
    imported = med["imports"] - p
    ran = sum(t for _, t in commands["reboot path"])
    print(f"\nreboot path, where the time goes: {ms(med['reboot']).strip()} = interpreter {ms(p).strip()}"
          f" + imports {ms(imported).strip()} + {plural(len(commands['reboot path']), 'command')} {ms(ran).strip()}"
          f" + the rest {ms(med['reboot'] - p - imported - ran).strip()}")
    names, rows = imports
    print(f"  imports ({len(names)} at top level; -X importtime, which inflates them):")
    for cumulative, own, name, via in rows:
        print(f"    {ms(cumulative)} (self {own * 1000:4.1f})  {name}" + (f"  <- {via}" if via else ""))
    for title, ran in commands.items():
        print(f"  {title}: {plural(len(ran), 'command')}, {ms(sum(t for _, t in ran)).strip()}"
              + ("" if ran else " (none logged: does the runner log `ran … in … ms`?)"))
        for argv, elapsed in ran:
            print(f"    {ms(elapsed)}  {argv if len(argv) <= 84 else argv[:81] + '...'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
