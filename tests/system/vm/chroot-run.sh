#!/bin/bash
# Run one command inside an image root with /proc, /sys, /dev and the host's name resolution.
# Everything is mounted in a private mount namespace, so the mounts vanish when the command ends,
# even if it is killed: nothing can be left mounted on the host.
# Usage: chroot-run.sh ROOT COMMAND [ARG...]
set -euo pipefail
root=$1
shift
if [ "${VMTEST_PRIVATE_NS:-}" != 1 ]; then
  exec env VMTEST_PRIVATE_NS=1 unshare --mount --propagation private -- "$0" "$root" "$@"
fi
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
# apt inside the root resolves the mirror the way this host does (its /etc/hosts may map it).
for f in hosts resolv.conf; do
  if [ -e "/etc/$f" ]; then
    # a bind mount needs a plain file to cover (a symlink would be followed out of the root)
    if [ -L "$root/etc/$f" ] || [ ! -e "$root/etc/$f" ]; then rm -f "$root/etc/$f"; : >"$root/etc/$f"; fi
    mount --bind "/etc/$f" "$root/etc/$f"
  fi
done
# env -i: the host's PIP_* and PYTHON* variables must not leak into the image.
exec chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
