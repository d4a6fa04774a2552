#!/usr/bin/env bash
# Install hostagent into a root filesystem: this host (--root /, the default) or an image being
# built (a Packer chroot, a debootstrap directory). One command, safe to run again (upgrade).
#
#   packaging/bake.sh [--root DIR] [--snapshot-schedule timer|cron] [--python PATH]
#                     [--build-python PYTHON]
#
# What it installs into DIR:
#   /opt/hostagent                    venv made by DIR's own python3, with hostagent and its deps
#   /usr/local/bin/hostagent          -> /opt/hostagent/bin/hostagent
#   /usr/local/lib/systemd/system/    hostagent-bootstrap.service, hostagent-secrets.service,
#                                     hostagent.service, hostagent-snapshot.service + .timer,
#                                     ecs.service.d/10-hostagent.conf
#   /etc/cron.d/hostagent             daily snapshot when the timer is disabled (cron hosts)
#   /etc/hostagent/hostagent.toml.example
#   /opt/hostagent/README.md, /opt/hostagent/docs/*.md
# and enables the units offline (systemctl --root=DIR enable): nothing is started, so baking on a
# Packer build instance never attaches or formats anything. The real config,
# /etc/hostagent/hostagent.toml, comes from the instance's user-data at first boot.
#
# Python: the venv is made by --python, a path inside DIR (default /usr/bin/python3; hostagent
# needs 3.11 or newer, e.g. /usr/bin/python3.11 on Amazon Linux 2023). A wheel of this checkout
# plus its dependencies are built with --build-python's pip, which uses the machine's own pip
# configuration (index, mirrors, constraints); the venv inside DIR then installs them offline
# (--no-index). The build python must have the same major.minor version as the venv's, so the
# wheels fit. Defaults: on --root / the new venv's own pip; for an image root, python3 on PATH.
set -euo pipefail

ROOT=/
SCHEDULE=timer
BUILD_PYTHON=
ROOT_PYTHON=/usr/bin/python3
usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit "${1:-2}"
}
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --root=*) ROOT=${1#*=}; shift ;;
    --snapshot-schedule) SCHEDULE=${2:?}; shift 2 ;;
    --snapshot-schedule=*) SCHEDULE=${1#*=}; shift ;;
    --python) ROOT_PYTHON=${2:?}; shift 2 ;;
    --python=*) ROOT_PYTHON=${1#*=}; shift ;;
    --build-python) BUILD_PYTHON=${2:?}; shift 2 ;;
    --build-python=*) BUILD_PYTHON=${1#*=}; shift ;;
    -h|--help) usage 0 ;;
    *) echo "bake: error: unknown argument $1" >&2; usage ;;
  esac
done

die() { echo "bake: error: $*" >&2; exit "${EXIT:-1}"; }
say() { echo "bake: $*"; }

[ "$(id -u)" = 0 ] || EXIT=2 die "run as root (it writes under $ROOT and runs chroot)"
case "$SCHEDULE" in timer|cron) ;; *) EXIT=2 die "--snapshot-schedule must be timer or cron" ;; esac
[ -d "$ROOT" ] || EXIT=2 die "root directory $ROOT does not exist"
ROOT=$(cd "$ROOT" && pwd -P)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
PREFIX=/opt/hostagent
UNIT_DIR=/usr/local/lib/systemd/system
R=${ROOT%/}   # "" for /, so "$R/etc" is always right

# Run a command with DIR as its root. For an image root, in a private mount namespace with the
# pseudo filesystems a venv and pip need; the mounts vanish with the namespace, even on a crash.
in_root() {
  if [ "$ROOT" = / ]; then
    "$@"
  else
    unshare --mount --propagation private -- /bin/sh -c '
      root=$1; shift
      mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev" || exit 1
      exec chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 "$@"' in_root "$ROOT" "$@"
  fi
}

[ -x "$R$ROOT_PYTHON" ] || EXIT=2 die "$ROOT has no $ROOT_PYTHON (install python3 and python3-venv in the image first, or pass --python)"
ROOT_PY_VERSION=$(in_root "$ROOT_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
in_root "$ROOT_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || EXIT=2 die "$ROOT_PYTHON in $ROOT is python $ROOT_PY_VERSION; hostagent needs 3.11 or newer (pass --python)"
in_root "$ROOT_PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
  || EXIT=2 die "$ROOT_PYTHON in $ROOT cannot make a venv (install python3-venv in the image first)"

# The venv first: on / its own pip (from ensurepip) builds the wheels, so the machine needs no
# python3-pip. Recreated when missing, broken or made by another Python version (an OS upgrade).
say "venv $PREFIX with $ROOT's $ROOT_PYTHON ($ROOT_PY_VERSION)"
VENV_PY_VERSION=$(in_root "$PREFIX/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
if [ "$VENV_PY_VERSION" != "$ROOT_PY_VERSION" ]; then
  rm -rf "$R$PREFIX"
  in_root "$ROOT_PYTHON" -m venv "$PREFIX"
fi

if [ -z "$BUILD_PYTHON" ]; then
  if [ "$ROOT" = / ]; then BUILD_PYTHON=$PREFIX/bin/python; else BUILD_PYTHON=$(command -v python3 || true); fi
fi
[ -n "$BUILD_PYTHON" ] && "$BUILD_PYTHON" -m pip --version >/dev/null 2>&1 \
  || EXIT=2 die "no build python with pip (${BUILD_PYTHON:-none}); pass --build-python PATH"
BUILD_PY_VERSION=$("$BUILD_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$BUILD_PY_VERSION" = "$ROOT_PY_VERSION" ] \
  || EXIT=2 die "build python $BUILD_PYTHON is $BUILD_PY_VERSION but $ROOT has python $ROOT_PY_VERSION; pass --build-python with a $ROOT_PY_VERSION interpreter"

WORK=$(mktemp -d "$R/tmp/hostagent-bake.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say "building wheels of $REPO and its dependencies with $BUILD_PYTHON (python $BUILD_PY_VERSION)"
# A copy without caches and VM images: pip builds from a temp copy of the tree anyway.
mkdir "$WORK/src"
tar -C "$REPO" --exclude=./.git --exclude=./.cache --exclude=./.venv --exclude='*.img' \
  --exclude='*.qcow2' --exclude=__pycache__ --exclude='*.egg-info' --exclude=./build \
  --exclude=./node_modules -cf - . | tar -C "$WORK/src" -xf -
"$BUILD_PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$WORK/wheels" "$WORK/src"

IN_WORK=${WORK#"$R"}
# --force-reinstall: a re-bake of the same version number still installs this checkout's code.
in_root "$PREFIX/bin/python" -m pip install --quiet --no-index --find-links "$IN_WORK/wheels" \
  --force-reinstall --disable-pip-version-check hostagent
in_root "$PREFIX/bin/hostagent" --version

say "command, units, cron file, config template"
install -d -m 0755 "$R/usr/local/bin" "$R$UNIT_DIR/ecs.service.d" "$R/etc/cron.d" "$R/etc/hostagent"
ln -sfn "$PREFIX/bin/hostagent" "$R/usr/local/bin/hostagent"
for unit in hostagent-bootstrap.service hostagent-secrets.service hostagent.service \
            hostagent-snapshot.service hostagent-snapshot.timer; do
  install -m 0644 "$REPO/systemd/$unit" "$R$UNIT_DIR/$unit"
done
install -m 0644 "$REPO/systemd/ecs.service.d/10-hostagent.conf" "$R$UNIT_DIR/ecs.service.d/10-hostagent.conf"
install -m 0644 "$REPO/cron/hostagent" "$R/etc/cron.d/hostagent"
install -m 0644 "$REPO/packaging/hostagent.toml.example" "$R/etc/hostagent/hostagent.toml.example"
[ ! -f "$REPO/README.md" ] || install -m 0644 "$REPO/README.md" "$R$PREFIX/README.md"
# The README links into docs/: the same tree, next to it, so its relative links work on the host.
# Replaced whole, so a page removed from the checkout does not linger from an older bake.
if [ -d "$REPO/docs" ]; then
  rm -rf "$R$PREFIX/docs"
  install -d -m 0755 "$R$PREFIX/docs"
  install -m 0644 "$REPO"/docs/*.md "$R$PREFIX/docs/"
fi

say "enabling units (offline; nothing is started)"
systemctl --root="$ROOT" enable hostagent-bootstrap.service hostagent-secrets.service \
  hostagent.service >/dev/null
if [ "$SCHEDULE" = timer ]; then
  systemctl --root="$ROOT" enable hostagent-snapshot.timer >/dev/null
else
  systemctl --root="$ROOT" disable hostagent-snapshot.timer >/dev/null 2>&1 || true
fi
if [ "$ROOT" = / ] && [ -d /run/systemd/system ]; then
  # A live host (an upgrade): load the new unit files and restart the agent if it runs, so it
  # uses the new code. Bootstrap is not re-run here; it runs at boot or by hand.
  systemctl daemon-reload
  systemctl try-restart hostagent.service
fi
say "done: hostagent $(in_root "$PREFIX/bin/hostagent" --version | awk '{print $2}') in $ROOT$PREFIX; snapshots by $SCHEDULE"
