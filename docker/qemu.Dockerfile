# A QEMU aarch64 image for docker/compose.yaml: runs examples/qemu-cmdline.sh, which builds the
# device tree with /firmware/sdei and starts the VM with the sidecar's own QMP monitor.
#
#   docker build -f docker/qemu.Dockerfile -t qmp-sdei-qemu .     # from the repository root
#
# TCG only (no /dev/kvm needed): the sidecar's conduit works through QEMU's gdbstub under TCG.
# QEMU runs as uid/gid 10001, the sidecar image's user: the shared volumes (sockets, and the state
# directory with the migration agent's D-Bus socket) then need no further permissions, whichever
# container initialises them first.

FROM debian:12-slim
# Versions come from the base image's Debian release (see docker/Dockerfile).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends qemu-system-arm device-tree-compiler \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 qmp-sdei \
 && useradd --system --uid 10001 --gid qmp-sdei --no-create-home --shell /usr/sbin/nologin qmp-sdei \
 && install -d -o qmp-sdei -g qmp-sdei -m 2770 /run/qmp-sdei \
 && install -d -o qmp-sdei -g qmp-sdei -m 0750 /var/lib/qmp-sdei
COPY --chmod=0755 examples/qemu-cmdline.sh /usr/local/bin/qemu-cmdline
ENV QMP_SDEI_RUN_DIR=/run/qmp-sdei \
    QMP_SDEI_STATE_DIR=/tmp/qemu-dtb
VOLUME ["/run/qmp-sdei", "/var/lib/qmp-sdei"]
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/qemu-cmdline"]
