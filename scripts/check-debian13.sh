#!/usr/bin/env bash
# Check this checkout on Debian 13 (trixie: QEMU 10, Python 3.13, dtc 1.7) from a Debian machine, as root:
#   bash scripts/check-debian13.sh [test|demo|all]   (default: all = demo, boot-test matrix, then test)
#   bash scripts/check-debian13.sh pytest ARGS...     (pytest in the root's venv, left by an earlier run)
#
# Makes a trixie root with debootstrap from Debian's packages (once; cached in $QMP_SDEI_TRIXIE_ROOT,
# default /var/cache/qmp-sdei/trixie-root), copies this checkout into it (tracked files plus uncommitted
# changes; its .venv is kept between runs), and runs the quick start there exactly as a new user on
# Debian 13 would: `scripts/quickstart.sh demo` and `scripts/quickstart.sh test`, which install their own
# packages inside the root. `all` also runs boot-test with the other pinned SDEI/PSCI versions. Delete the root directory to start from nothing.
# Several checkouts can share one root: QMP_SDEI_TRIXIE_CHECKOUT=NAME copies this one to /root/NAME
# instead of /root/qmp-sdei; `pytest` there uses /root/qmp-sdei's venv with NAME's src first on the path.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT="${QMP_SDEI_TRIXIE_ROOT:-/var/cache/qmp-sdei/trixie-root}"
CHECKOUT="${QMP_SDEI_TRIXIE_CHECKOUT:-qmp-sdei}"
case "$CHECKOUT" in
    "" | *[!A-Za-z0-9._-]* | . | ..)
        echo "check-debian13: QMP_SDEI_TRIXIE_CHECKOUT must be a plain directory name, not '$CHECKOUT'" >&2
        exit 2
        ;;
esac
WHAT="${1:-all}"
case "$WHAT" in
    test | demo | all) ;;
    pytest) shift ;;
    *)
        echo "usage: bash scripts/check-debian13.sh [test|demo|all] | pytest ARGS..." >&2
        exit 2
        ;;
esac
if [ "$(id -u)" != 0 ]; then
    echo "check-debian13: run as root (debootstrap, mount and chroot need it)" >&2
    exit 2
fi

make_root() {
    if [ -f "$ROOT/.qmp-sdei-root-ready" ]; then
        echo "== reusing the trixie root in $ROOT"
        return
    fi
    if ! command -v debootstrap >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap
    fi
    echo "== debootstrap trixie into $ROOT (a few minutes)"
    rm -rf "$ROOT.partial"
    mkdir -p "$(dirname "$ROOT")"
    debootstrap --variant=minbase trixie "$ROOT.partial"
    # Package installs inside the root must not start services (dbus, mosquitto) on the host.
    printf '#!/bin/sh\nexit 101\n' >"$ROOT.partial/usr/sbin/policy-rc.d"
    chmod +x "$ROOT.partial/usr/sbin/policy-rc.d"
    rm -rf "$ROOT"
    mv "$ROOT.partial" "$ROOT"
    touch "$ROOT/.qmp-sdei-root-ready"
}

MOUNTED=()
PIP_CERT_IN_ROOT=""
unmount_all() {
    local i
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        umount -R "${MOUNTED[$i]}" 2>/dev/null || umount -lR "${MOUNTED[$i]}" || true
    done
}

mount_into_root() {
    trap unmount_all EXIT
    mount -t proc proc "$ROOT/proc" && MOUNTED+=("$ROOT/proc")
    mount -t sysfs sysfs "$ROOT/sys" && MOUNTED+=("$ROOT/sys")
    mount --rbind /dev "$ROOT/dev" && mount --make-rslave "$ROOT/dev" && MOUNTED+=("$ROOT/dev")
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
    # The root trusts what this host trusts (a host behind a TLS-inspecting proxy has its CA here);
    # pip in the root is pointed at this copy below.
    if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
        cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/host-ca-certificates.crt"
        PIP_CERT_IN_ROOT=/etc/host-ca-certificates.crt
    fi
}

copy_checkout() {
    local dest="$ROOT/root/$CHECKOUT"
    mkdir -p "$dest"
    find "$dest" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
    git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$dest"
    echo "== copied $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo '+changes') into $dest"
}

in_root() {
    # A clean environment: nothing from this host's shell (pip mirrors, venvs) leaks into the check.
    env -i HOME=/root LANG=C.UTF-8 TERM=dumb CI="${CI:-}" PIP_CERT="$PIP_CERT_IN_ROOT" \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        chroot "$ROOT" bash -c "cd /root/$CHECKOUT && $1"
}

# The demo already boots SDEI 1.1 / PSCI 1.0 on two vCPUs; these cover the other pinned versions.
BOOT_MATRIX=(
    "--smp 1 --expect-sdei 1.0 --expect-psci 0.2"
    "--smp 2 --expect-sdei 1.0 --expect-psci 1.1"
    "--smp 1 --expect-sdei 1.1 --expect-psci 1.1"
)

make_root
mount_into_root
copy_checkout
in_root 'cat /etc/debian_version'
if [ "$WHAT" = pytest ]; then
    in_root 'test -x /root/qmp-sdei/.venv/bin/pytest' || {
        echo "check-debian13: no venv in the root yet; run 'bash scripts/check-debian13.sh test' once" >&2
        exit 2
    }
    in_root "PYTHONPATH=/root/$CHECKOUT/src /root/qmp-sdei/.venv/bin/pytest $(printf '%q ' "$@")"
    exit
fi
status=0
if [ "$WHAT" = demo ] || [ "$WHAT" = all ]; then
    echo "== quick start: demo"
    in_root 'bash scripts/quickstart.sh demo' || status=1
fi
if [ "$WHAT" = all ]; then
    in_root 'qemu-system-aarch64 --version | head -1; dtc --version; python3 --version'
    kernel=$(in_root '.venv/bin/python -c "from qmp_sdei.linux_kernel import fetch_debian_kernel; print(fetch_debian_kernel())"')
    for args in "${BOOT_MATRIX[@]}"; do
        echo "== boot-test $args"
        in_root ".venv/bin/qmp-sdei boot-test --kernel $kernel $args" || status=1
    done
fi
if [ "$WHAT" = test ] || [ "$WHAT" = all ]; then
    echo "== quick start: test"
    in_root 'bash scripts/quickstart.sh test' || status=1
fi
if [ "$status" = 0 ]; then
    echo "== check-debian13: PASSED"
else
    echo "== check-debian13: FAILED"
fi
exit "$status"
