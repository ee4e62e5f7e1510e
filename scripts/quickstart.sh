#!/usr/bin/env bash
# One entry point for a fresh Debian 12 or 13 machine (run as root):
#   bash scripts/quickstart.sh demo   install everything, then the main job end to end: a stock Debian
#                                     arm64 guest takes SDEI events over MQTT, migrates, takes them again
#   bash scripts/quickstart.sh test   install everything, then run lint, types and the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3 python3-venv python3-pip ca-certificates
    qemu-system-arm                 # qemu-system-aarch64 (TCG)
    gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu   # the bare-metal test guests
    libc6-dev-arm64-cross make      # the Linux test module and its static /init
    device-tree-compiler            # dtc: the DTB with /firmware/sdei
    qemu-efi-aarch64 dosfstools mtools   # UEFI boot tests: firmware, and the FAT disk holding the kernel
    dbus mosquitto                  # migration (dbus-vmstate) and orchestration tests
    systemd procps                  # systemd-analyze verify/security on examples/qmp-sdei@.service (its ExecReload uses /bin/kill)
)

# What a release needs beyond APT_PACKAGES. Debian 12's Python 3.11 finds wheels for everything on
# PyPI; from Debian 13 (Python 3.13) on, vmlinux-to-elf's minilzo has no wheel and pip compiles it
# (gcc, python3-dev), and the 6.12 kernel's module build writes BTF with pahole.
release_packages() {
    local version_id=""
    if [ -r /etc/os-release ]; then
        version_id=$(. /etc/os-release && echo "${VERSION_ID:-}")
    fi
    case "$version_id" in
        12) ;;
        *) echo gcc python3-dev pahole ;;   # 13 and anything newer or unknown
    esac
}

install_system() {
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2207  # one package name per word
    APT_PACKAGES+=($(release_packages))
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
}

install_python() {
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test,linux]'
}

case "${1:-}" in
    demo)
        install_system
        install_python
        # A stock Debian arm64 guest with its own defaults takes SDEI events raised over MQTT,
        # is live-migrated with its SDEI state, and takes them again on the destination.
        exec .venv/bin/python scripts/demo.py
        ;;
    test)
        install_system
        install_python
        .venv/bin/ruff check .
        .venv/bin/ruff format --check .
        .venv/bin/mypy
        exec .venv/bin/pytest -q
        ;;
    *)
        echo "usage: bash scripts/quickstart.sh demo|test" >&2
        exit 2
        ;;
esac
