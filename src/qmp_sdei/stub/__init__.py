"""The EL2 stub shipped with qmp-sdei: where it is, how QEMU loads it, and its header layout.

``el2stub.elf`` (built from ``el2stub.S`` by ``make -C src/qmp_sdei/stub``, checked in and
verified by a test) runs first at EL2 under ``-M virt,virtualization=on`` and enters the guest
kernel at EL1, so that every guest ``hvc``/``smc`` passes one fixed trap site. This module only
describes it (pure data and argv building); the conduit that uses it is
:mod:`qmp_sdei.conduit.el2`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from qmp_sdei.errors import ConduitError, ConfigError

STUB_ELF = Path(__file__).with_name("el2stub.elf")
STUB_BIN = Path(__file__).with_name("el2stub.bin")  # the same code, raw: loaded anywhere (PIC)
SDEI_ACPI_APP = Path(__file__).with_name("sdeitab.efi")  # UEFI app: installs the ACPI SDEI table
STUB_BASE = 0x4010_0000  # link address (link.ld); EL2 runs with the MMU off, so also its PA
RAM_BASE = 0x4000_0000  # virt's RAM
FIRMWARE_SLOT = 0x20_0000  # firmware boot: the stub lives in the top 2 MiB, cut from the DT's memory
FIRMWARE_ENTRY_OFFSET = 4  # _start + 4: enters the firmware in flash at EL1
FIRMWARE_DTB_OFFSET = 0x10_0000  # firmware boot: the firmware's DTB, in the slot (el2stub.S FW_DTB_OFFSET)
FIRMWARE_DTB_MAX = 0x10_0000  # a larger DTB is not copied (el2stub.S FW_DTB_MAX)
STUB_RESERVED = 0x2_0000  # the stub's code, data, per-CPU areas and stacks: the guest must not use it
KERNEL_ADDR = 0x4020_0000  # where the stub enters the kernel Image (header boot_kernel)
DTB_ADDR = 0x4800_0000  # what the stub passes in x0 (header boot_dtb)
MAGIC = b"QSDEIEL2"
HEADER_VERSION = 1
HEADER_SIZE = 0x90  # what this sidecar reads: the base header (0x70 bytes) and the mailbox extension
_BASE_HEADER_SIZE = 0x70
_HEADER = struct.Struct("<8sIIQQQQIIQQQQQQ")
# The mailbox extension, after the base header: a tag (a stub without it has code there), then
# fast_spin_us, counter_hz, mailbox_wait, mailbox_wait_end. Older sidecars read only the base
# header and never give a lease: the stub then never posts, and serves them as before.
MAILBOX_TAG = b"QSDEIMB1"
_MAILBOX_EXTENSION = struct.Struct("<8sIIQQ")
HEADER_COUNTER_HZ = 0x7C  # CNTFRQ_EL0 as the stub found it at boot (leases are CNTVCT values)

# Per-CPU area fields (el2stub.S A_*).
A_RESUME_FLAGS = 0x00
A_RESUME_ELR2 = 0x08
A_RESUME_ELR1 = 0x18
A_TRAP_ELR2 = 0x30
A_TRAP_SPSR2 = 0x38
A_TRAP_ESR2 = 0x40
A_TRAP_COUNT = 0x48
A_KICK = 0x50  # set by the sidecar: an idle vCPU leaves the idle loop (KICK_STOP or KICK_ENTER)
KICK_STOP = 1  # ... and stops at the wake site, where the sidecar can enter a handler
KICK_ENTER = 2  # ... straight to stub_resume, where the sidecar left a handler entry (newer stubs)
A_NO_HALT = 0x68  # set by the sidecar while a migration runs: an idle vCPU polls without halting
A_CTX_VALID = 0x80  # nonzero: the stub answers SDEI_EVENT_CONTEXT(0..17) from A_CTX_X itself
A_CTX_X = 0x88  # the running handler's interrupted x0..x17 (followed by A_CTX_ANSWERED)
A_CTX_ANSWERED = 0x118  # how many EVENT_CONTEXT calls the stub answered without a stop
CTX_REGS = 18
A_UNPEND = 0x120  # GICR_ICPENDR0 of the vCPU's redistributor: the stub clears the wake-up interrupt there
# The mailbox (a stub whose header has the mailbox extension; el2stub.S explains the protocol).
A_FAST_UNTIL = 0x128  # the sidecar's lease: the CNTVCT value until which calls are posted
A_TRAP_TIME = 0x130  # CNTVCT at the vCPU's last trapped call
A_POST = 0x138  # the trap count (A_TRAP_COUNT) of the call posted in A_MAIL_X
A_DONE = 0x140  # written by the sidecar: the trap count of the call it answered
A_VERDICT = 0x148  # written by the sidecar with A_DONE: one of the VERDICT_* below
A_MAIL_X = 0x150  # the call's x0..x17, overwritten by the answer's when VERDICT_ANSWERED
VERDICT_ANSWERED = 0  # the stub loads x0..x17 from the mailbox and returns to the guest
VERDICT_PASS = 1  # ... and forwards the call to QEMU's firmware
VERDICT_STOP = 2  # the stub stops at the doorbell: the call is served in that stop
A_DOORBELL = 0x300  # the stub stores to it right before the trap site: the sidecar's watchpoint
DOORBELL_STORE = 0xF81003FF  # stur xzr, [sp, #-256]: the instruction before the trap site that does
RESUME_EL2 = 1  # stub_resume loads ELR_EL2/SPSR_EL2 from the area
RESUME_EL1 = 2  # ... and ELR_EL1/SPSR_EL1


@dataclass(frozen=True)
class StubLayout:
    """The stub as found in guest memory (addresses are guest physical = EL2 virtual)."""

    base: int
    percpu_size: int
    trap_site: int
    resume: int
    unexpected: int
    percpu: int
    max_cpus: int
    idle_poll_us: int
    kernel: int
    dtb: int
    wake_site: int
    idle: range  # the idle loop's addresses: a vCPU stopped there sits in a trapped WFI
    #: a vCPU in this range waits for the sidecar's answer in its mailbox (empty: no mailbox)
    mailbox_wait: range = range(0)
    fast_spin_us: int = 0  # the longest a posted call waits for an answer before it stops

    @classmethod
    def parse(cls, base: int, header: bytes) -> StubLayout:
        """:raise ConduitError: not our stub (no magic) or a header version we do not speak."""
        if len(header) < _BASE_HEADER_SIZE or header[8:16] != MAGIC:
            raise ConduitError(f"no qmp-sdei EL2 stub at {base:#x} (magic {header[8:16]!r})")
        (
            _,
            version,
            percpu_size,
            trap,
            resume,
            unexpected,
            percpu,
            max_cpus,
            poll_us,
            kernel,
            dtb,
            wake,
            idle,
            idle_end,
            _firmware,
        ) = _HEADER.unpack(header[8:_BASE_HEADER_SIZE])
        if version != HEADER_VERSION:
            raise ConduitError(f"EL2 stub header version {version}, this sidecar speaks {HEADER_VERSION}")
        spin_us, wait, wait_end = 0, 0, 0
        extension = header[_BASE_HEADER_SIZE:HEADER_SIZE]
        if len(extension) == _MAILBOX_EXTENSION.size and extension[:8] == MAILBOX_TAG:
            _, spin_us, _hz, wait, wait_end = _MAILBOX_EXTENSION.unpack(extension)
        return cls(
            base=base,
            percpu_size=percpu_size,
            trap_site=base + trap,
            resume=base + resume,
            unexpected=base + unexpected,
            percpu=base + percpu,
            max_cpus=max_cpus,
            idle_poll_us=poll_us,
            kernel=kernel,
            dtb=dtb,
            wake_site=base + wake,
            idle=range(base + idle, base + idle_end),
            mailbox_wait=range(base + wait, base + wait_end),
            fast_spin_us=spin_us,
        )

    @property
    def has_mailbox(self) -> bool:
        """Whether the stub can post calls to a mailbox (its header has the mailbox extension)."""
        return len(self.mailbox_wait) > 0

    @property
    def areas_end(self) -> int:
        """The first address past the last per-CPU area."""
        return self.percpu + self.max_cpus * self.percpu_size

    def area_below(self, sp: int) -> int:
        """The per-CPU area of a vCPU running stub code with stack pointer ``sp`` (areas are
        size-aligned and the stub never nests a full area deep)."""
        return (sp - 1) & ~(self.percpu_size - 1)

    def area_of(self, mpidr: int) -> int:
        """A vCPU's per-CPU area, by the stub's own rule (Aff1 * 16 + Aff0, modulo max_cpus)."""
        index = ((mpidr & 0xFF) + (((mpidr >> 8) & 0xFF) << 4)) % self.max_cpus
        return self.percpu + index * self.percpu_size


INITRD_ADDR = 0x4900_0000  # above the DTB's 1 MiB slot; the range goes into /chosen


def qemu_args(kernel: Path, dtb: Path, *, initrd: Path | None = None) -> list[str]:
    """QEMU arguments that boot ``kernel`` (an arm64 Image) through the stub with ``dtb``.

    The machine must have ``virtualization=on``. QEMU starts the stub (an ELF given to
    ``-kernel``) at EL2; the Image, DTB and initrd are placed raw where the stub and the DTB say.
    QEMU's ``-append`` and ``-initrd`` do not apply to a non-Linux ``-kernel``, so the command
    line and the initrd range must be in the DTB's ``/chosen`` (:func:`initrd_range`).
    """
    args = [
        "-kernel", str(STUB_ELF),
        "-device", f"loader,file={kernel},addr={KERNEL_ADDR:#x},force-raw=on",
        "-device", f"loader,file={dtb},addr={DTB_ADDR:#x},force-raw=on",
    ]  # fmt: skip
    if initrd is not None:
        args += ["-device", f"loader,file={initrd},addr={INITRD_ADDR:#x},force-raw=on"]
    return args


def initrd_range(initrd: Path) -> tuple[int, int]:
    """Where :func:`qemu_args` places ``initrd``: (start, end) for ``/chosen``."""
    return INITRD_ADDR, INITRD_ADDR + initrd.stat().st_size


def firmware_stub_base(memory_mb: int) -> int:
    """Where :func:`firmware_qemu_args` loads the stub: the top :data:`FIRMWARE_SLOT` of RAM."""
    return RAM_BASE + memory_mb * 1024 * 1024 - FIRMWARE_SLOT


def firmware_memory(memory_mb: int) -> tuple[int, int]:
    """The DT ``/memory`` range the firmware and the OS may use: all RAM below the stub's slot.

    edk2 (ArmVirtQemu) takes the RAM size from the DT but keeps the base at 0x40000000, so the
    stub is hidden by shortening the node rather than by a reservation the firmware would ignore.
    """
    return RAM_BASE, memory_mb * 1024 * 1024 - FIRMWARE_SLOT


def firmware_qemu_args(firmware: Path, dtb: Path, memory_mb: int) -> list[str]:
    """QEMU arguments for a firmware (UEFI) boot through the stub; the machine needs
    ``virtualization=on``. The raw stub goes to the top of RAM and vCPU 0 starts at its firmware
    entry, which enters ``firmware`` at EL1.

    ``dtb`` (its ``/memory`` ending below the stub's slot: :func:`firmware_memory`) is loaded twice:
    by ``-dtb`` at the base of RAM, where the firmware reads it, and into the slot. QEMU rewrites the
    ``/memory`` of the first copy to cover all of RAM, the stub included (and edk2 2025.02 puts its
    page tables at the very top), so the stub copies the second one over it before entering the
    firmware.

    :raise ConfigError: ``dtb`` is larger than the room for it in the slot.
    """
    size = dtb.stat().st_size
    if size > FIRMWARE_DTB_MAX:
        raise ConfigError(f"{dtb}: a {size}-byte DTB does not fit the EL2 stub's {FIRMWARE_DTB_MAX}-byte room for it")
    base = firmware_stub_base(memory_mb)
    return [
        "-bios", str(firmware),
        "-dtb", str(dtb),
        "-device", f"loader,file={STUB_BIN},addr={base:#x},force-raw=on",
        "-device", f"loader,file={dtb},addr={base + FIRMWARE_DTB_OFFSET:#x},force-raw=on",
        "-device", f"loader,addr={base + FIRMWARE_ENTRY_OFFSET:#x},cpu-num=0",
    ]  # fmt: skip


def probe_addresses(memory_mb: int = 0, *, max_memory_mb: int = 16 * 1024, step_mb: int = 256) -> list[int]:
    """Where a stub can be: the direct-boot link address, then the firmware slot at the top of
    RAM: of ``memory_mb`` when the VM's RAM size is known, else of every RAM size that is a
    multiple of ``step_mb`` (the sidecar reads a header at each: one batch, but 65 reads)."""
    if memory_mb > FIRMWARE_SLOT >> 20:
        return [STUB_BASE, firmware_stub_base(memory_mb)]
    return [STUB_BASE] + [firmware_stub_base(mb) for mb in range(step_mb, max_memory_mb + 1, step_mb)]
