"""Boot the baked image under qemu: NVMe data disk with an EBS-style serial, NoCloud seed, and a
network that reaches only the test's moto and IMDS servers on this host's loopback."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.system.vm.image import Image, run, say
from tests.system.vm.seed import MAC_IMDS, MAC_MAIN, MOTO_GUEST_ADDR, MOTO_GUEST_PORT

RELAY = Path(__file__).resolve().parent / "relay.py"
BEGIN, END = "VMTEST-REPORT-BEGIN", "VMTEST-REPORT-END"


def accelerator() -> tuple[str, str]:
    """KVM where it really works; TCG otherwise. /dev/kvm backed by kvm_pvm (as on these
    machines) hangs a stock kernel in early boot, so it counts as no KVM."""
    forced = os.environ.get("VMTEST_ACCEL")
    if forced in ("kvm", "tcg"):
        return (forced, "host" if forced == "kvm" else "max")
    real_kvm = (os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
                and not os.path.exists("/sys/module/kvm_pvm")
                and (os.path.exists("/sys/module/kvm_intel") or os.path.exists("/sys/module/kvm_amd")))
    return ("kvm", "host") if real_kvm else ("tcg", "max")


def relay_command(port: int) -> str:
    """A guestfwd cmd: qemu splits it like a shell (no shell runs) and treats commas specially."""
    argv = [sys.executable, str(RELAY), "127.0.0.1", str(port)]
    text = " ".join(shlex.quote(a) for a in argv)
    if "," in text:
        raise RuntimeError(f"guestfwd command may not contain commas: {text}")
    return text


@dataclass
class Boot:
    name: str
    seconds: float
    exit_code: int
    report: dict | None
    console: Path
    argv: list = field(default_factory=list)
    plugged_at: float | None = None  # seconds after power-on the disk was hot-plugged


def overlay(base: Path, path: Path) -> Path:
    """A fresh root disk from the baked image: what a new instance from the same AMI gets."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", path])
    return path


def qmp(socket_path: Path, command: str, arguments: dict) -> dict:
    """One QMP command on qemu's control socket (greeting, capabilities, command)."""
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(socket_path))
        stream = sock.makefile("rw")
        stream.readline()  # greeting
        for message in ({"execute": "qmp_capabilities"},
                        {"execute": command, "arguments": arguments}):
            stream.write(json.dumps(message) + "\n")
            stream.flush()
            while True:  # skip asynchronous events until the command's answer
                answer = json.loads(stream.readline())
                if "return" in answer or "error" in answer:
                    break
        return answer


def boot(name: str, *, image: Image, root_disk: Path, seed_iso: Path, data_disk: Path | None,
         volume_serial: str | None, moto_port: int, imds_port: int, workdir: Path,
         cmdline_extra: dict[str, str], timeout: float = 600,
         plug_when: Callable[[], bool] | None = None,
         watch: Callable[[float], None] | None = None,
         extra_drives: tuple[Path, ...] = ()) -> Boot:
    """Boot until the guest powers itself off (vmtest-report.service) or the timeout passes.

    moto_port is the loopback port of the AWS endpoint the guest talks to: moto itself, or the
    EC2 fidelity proxy in front of it (tests/support/ec2_fidelity.py).
    With plug_when, the data disk is not there at power-on: it is hot-plugged (PCI, as EC2
    plugs an NVMe EBS volume) once plug_when() is true, i.e. once AttachVolume has attached
    the volume to this instance in moto. Without it, the disk is there from power-on, as for a
    volume that was already attached when the instance started. watch(seconds since power-on)
    is called about once a second while the VM runs: the test's side of a boot (EC2 events).
    extra_drives: raw images attached read-only as further virtio disks (a benchmark's files)."""
    accel, cpu = accelerator()
    console = workdir / f"{name}.console.log"
    report_log = workdir / f"{name}.report.log"
    for f in (console, report_log):
        f.unlink(missing_ok=True)
    append = " ".join(["root=/dev/vda", "ro", "console=ttyS0", "net.ifnames=0",
                       *(f"vmtest.{k}={v}" for k, v in cmdline_extra.items())])
    argv = [
        "qemu-system-x86_64", "-name", f"vmtest-{name}",
        "-accel", accel, "-cpu", cpu, "-m", "1024", "-smp", "2",
        "-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{console}", "-serial", f"file:{report_log}",
        "-kernel", image.kernel, "-initrd", image.initrd, "-append", append,
        "-drive", f"file={root_disk},if=virtio,format={'qcow2' if root_disk.suffix == '.qcow2' else 'raw'}",
        "-drive", f"file={seed_iso},if=virtio,format=raw,readonly=on",
        # restrict=on: the guest reaches nothing but the forwards below (no host, no outside).
        "-netdev", "user,id=n0,restrict=on,"
                   f"guestfwd=tcp:{MOTO_GUEST_ADDR}:{MOTO_GUEST_PORT}-cmd:{relay_command(moto_port)}",
        "-device", f"virtio-net-pci,netdev=n0,mac={MAC_MAIN},romfile=",
        # IMDS lives at 169.254.169.254, which the default user network refuses to forward;
        # a second user network on 169.254.0.0/16 can (see shared/notes/vm-boot.md).
        "-netdev", "user,id=n1,restrict=on,net=169.254.0.0/16,host=169.254.0.2,"
                   "dhcpstart=169.254.0.100,"
                   f"guestfwd=tcp:169.254.169.254:80-cmd:{relay_command(imds_port)}",
        "-device", f"virtio-net-pci,netdev=n1,mac={MAC_IMDS},romfile=",
    ]
    for drive in extra_drives:
        argv += ["-drive", f"file={drive},if=virtio,format=raw,readonly=on"]
    nvme = {"driver": "nvme", "id": "ebs", "serial": volume_serial, "drive": "data"}
    control = workdir / f"{name}.qmp"
    control.unlink(missing_ok=True)
    if data_disk is not None:
        argv += ["-drive", f"file={data_disk},if=none,id=data,format=raw"]
        if plug_when is None:
            argv += ["-device", f"nvme,id=ebs,serial={volume_serial},drive=data"]
        else:
            argv += ["-qmp", f"unix:{control},server=on,wait=off"]
    argv = [str(a) for a in argv]
    qemu_log = workdir / f"{name}.qemu.log"
    started = time.monotonic()
    plugged_at = None
    with open(qemu_log, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            while proc.poll() is None:
                if time.monotonic() - started > timeout:
                    proc.kill()
                    log.write(f"\n[vm] killed after {timeout:.0f} s\n")
                    break
                if data_disk is not None and plug_when and plugged_at is None and plug_when():
                    answer = qmp(control, "device_add", nvme)
                    plugged_at = time.monotonic() - started
                    log.write(f"[vm] NVMe disk hot-plugged at {plugged_at:.0f} s: {answer}\n")
                    log.flush()
                if watch is not None:
                    watch(time.monotonic() - started)
                time.sleep(1)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    seconds = time.monotonic() - started
    report = parse_report(report_log)
    plug = f", disk hot-plugged {plugged_at:.0f} s after power-on" if plugged_at else ""
    say(f"boot {name}: {seconds:.0f} s to power-off ({accel}{plug}); "
        + (f"guest uptime at report {report.get('report_finished', '?')} s" if report else
           f"NO REPORT (qemu exit {proc.returncode}; console {console})"))
    return Boot(name, seconds, proc.returncode, report, console, argv, plugged_at)


def parse_report(path: Path) -> dict | None:
    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    if BEGIN not in text or END not in text:
        return None
    body = text.rsplit(BEGIN, 1)[1].split(END, 1)[0].strip()
    try:
        return json.loads(body)
    except ValueError:
        return None


def console_tail(boot: Boot, lines: int = 80) -> str:
    try:
        return "\n".join(boot.console.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console log)"
