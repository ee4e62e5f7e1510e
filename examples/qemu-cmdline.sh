#!/bin/sh
# Start an aarch64 VM the way qmp-sdei serves it: a device tree that announces SDEI, and a QMP
# monitor of the sidecar's own beside whatever else manages the VM.
#
#   examples/qemu-cmdline.sh VM KERNEL [more QEMU arguments...]
#   e.g. examples/qemu-cmdline.sh vm1 /var/lib/qmp-sdei/vm1/vmlinuz -initrd initrd.img
#
# then, in another shell, the sidecar for it (examples/vm1.toml, or systemctl start qmp-sdei@vm1):
#   qmp-sdei run --config /etc/qmp-sdei/vm1.toml
#
# Environment: QEMU (binary), QMP_SDEI_RUN_DIR (where the monitor socket goes, /run/qmp-sdei),
# QMP_SDEI_STATE_DIR (where the device tree is written, /var/lib/qmp-sdei/VM), APPEND (kernel
# command line), SMP, MEM.

set -eu

usage="usage: $0 VM KERNEL [QEMU ARGS...]"
vm="${1:?$usage}"
kernel="${2:?$usage}"
shift 2

qemu="${QEMU:-qemu-system-aarch64}"
run_dir="${QMP_SDEI_RUN_DIR:-/run/qmp-sdei}"
state_dir="${QMP_SDEI_STATE_DIR:-/var/lib/qmp-sdei/$vm}"
# nokaslr: the conduit finds Linux's SDEI/PSCI call sites through kallsyms.
# nohlt: a vCPU halted in WFI cannot be woken through the gdbstub, so delivery would wait.
append="${APPEND:-console=ttyAMA0 nokaslr nohlt}"
smp="${SMP:-2}"
mem="${MEM:-1G}"

# The machine, exactly as QEMU will run it: the device tree describes CPUs, memory and devices,
# so it must be dumped from the same -machine/-cpu/-smp/-m and devices. -nodefaults: no default
# NIC or consoles; add yours (-netdev/-device, disks) as extra arguments.
machine="virt,gic-version=3"
set -- -nodefaults -machine "$machine" -cpu max -smp "$smp" -m "$mem" "$@"

mkdir -p "$run_dir" "$state_dir"
dtb="$state_dir/$vm.dtb"

# 1. Linux probes SDEI only if the device tree has /firmware/sdei; QEMU's virt board never adds
#    it. Let QEMU write its own tree for this machine (it exits at once), add the node, recompile
#    (dtc merges the second "/ { };" block into the tree).
"$qemu" "$@" -machine "dumpdtb=$dtb.qemu" -display none >/dev/null
dtc -q -I dtb -O dts -o "$dtb.dts" "$dtb.qemu"
cat >>"$dtb.dts" <<'DTS'

/* added for qmp-sdei: the guest calls SDEI with hvc, where the sidecar traps it */
/ {
	firmware {
		sdei {
			compatible = "arm,sdei-1.0";
			method = "hvc";
		};
	};
};
DTS
dtc -q -I dts -O dtb -o "$dtb" "$dtb.dts"
rm -f "$dtb.qemu" "$dtb.dts"

# 2. The VM. -chardev/-mon give the sidecar its own QMP monitor (events reach every monitor, so
#    it coexists with libvirt's or an operator's). server=on,wait=off: QEMU listens and boots
#    without waiting; the sidecar connects when it starts ([qmp] mode = "connect").
#    -name sets the VM's name the sidecar reports and uses for its MQTT topics.
exec "$qemu" "$@" \
    -name "$vm" \
    -dtb "$dtb" \
    -kernel "$kernel" \
    -append "$append" \
    -chardev "socket,id=qmp-sdei,path=$run_dir/$vm.sock,server=on,wait=off" \
    -mon chardev=qmp-sdei,mode=control \
    -display none \
    -serial stdio
