"""Waking a vCPU that idles in the EL2 stub at once, through the interrupt controller.

The stub idles a vCPU in a trapped ``wfi`` and looks at its kick flag each time it wakes: at the
latest after its poll period (1 ms), earlier if an interrupt arrives. The sidecar cannot raise an
interrupt over QMP, but a gdbstub memory write in physical mode is a bus write, and it reaches the
GIC's registers too. Making the guest's virtual timer interrupt (PPI 27, which the stub borrows for
its poll and the guest keeps enabled) pending in the vCPU's redistributor wakes the vCPU as soon as
the VM runs again, without waiting for its poll. The conduit also leaves the frame's
``GICR_ICPENDR0`` in the vCPU's per-CPU area (``A_UNPEND``), and the stub clears that pending state
there as it leaves the idle loop, before the guest runs: the guest never sees the interrupt (if its
own timer is due, the timer's level keeps it pending, as it should).

GICv3 and GICv4 only, found where ``-M virt`` puts them. GICv2 keeps its private interrupts in
registers banked by the *accessing* CPU, and QEMU (7.2) looks that CPU up even for a debugger's
access, which has none: a write there would crash QEMU. So nothing is written unless the frames
identify themselves as GICv3/v4 redistributors (``GICR_PIDR2``), whose registers belong to a frame,
not to an accessor. On any other machine there is nothing there (reads as zeros) and idle vCPUs
wake by the stub's poll, as before.

What it must not do: name anything but the one pending bit of a frame it has identified.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from qmp_sdei.conduit.rsp import RspClient

__all__ = [
    "PENDING_CLEAR",
    "PENDING_SET",
    "VIRT_REDIST_BASE",
    "VTIMER_BIT",
    "find_redistributors",
    "redistributor_map",
]

VIRT_REDIST_BASE: Final = 0x080A_0000  # -M virt: the first redistributor region (up to 123 vCPUs on v3)
VIRT_REDIST_SIZE: Final = 0x00F6_0000
GICR_TYPER: Final = 0x0008  # RD frame: Affinity [63:32], Last [4], Processor_Number [23:8]
GICR_PIDR2: Final = 0xFFE8  # RD frame: ArchRev [7:4] = 3 (GICv3) or 4 (GICv4)
SGI_FRAME: Final = 0x1_0000  # the frame after the RD frame holds the SGI/PPI registers
PENDING_SET: Final = SGI_FRAME + 0x0200  # GICR_ISPENDR0: writing 1 makes an SGI/PPI pending
PENDING_CLEAR: Final = SGI_FRAME + 0x0280  # GICR_ICPENDR0: writing 1 clears it (a level stays)
VTIMER_INTID: Final = 27  # the EL1 virtual timer's PPI on -M virt (and the SBSA's choice)
VTIMER_BIT: Final = (1 << VTIMER_INTID).to_bytes(4, "little")
TYPER_LAST: Final = 1 << 4
FRAME_STRIDE: Final[Mapping[int, int]] = {3: 0x2_0000, 4: 0x4_0000}  # RD + SGI (+ VLPI + reserved on v4)


def redistributor_map(pidr2: bytes | None, typers: list[bytes | None], stride: int) -> dict[int, int]:
    """vCPU index -> its redistributor's base, from frame 0's ``GICR_PIDR2`` and the ``GICR_TYPER``
    of consecutive frames ``stride`` apart from :data:`VIRT_REDIST_BASE`. Stops at the frame marked
    last, or at the first that cannot be read. Pure, for the unit tests."""
    if pidr2 is None or FRAME_STRIDE.get(_arch_rev(pidr2)) != stride:
        return {}
    frames: dict[int, int] = {}
    for n, typer in enumerate(typers):
        if typer is None:
            break
        value = int.from_bytes(typer, "little")
        frames[(value >> 8) & 0xFFFF] = VIRT_REDIST_BASE + n * stride  # Processor_Number: QEMU's cpu_index
        if value & TYPER_LAST:
            break
    return frames


def _arch_rev(pidr2: bytes) -> int:
    return (int.from_bytes(pidr2, "little") >> 4) & 0xF


async def find_redistributors(rsp: RspClient, vcpus: int) -> dict[int, int]:
    """The redistributor of each of ``vcpus`` vCPUs (index -> frame base), or ``{}`` when the
    machine has no GICv3/v4 at ``-M virt``'s address. Two round trips; the gdbstub must be in
    physical-memory mode and the VM stopped."""
    (pidr2,) = await rsp.read_memory_regions([(VIRT_REDIST_BASE + GICR_PIDR2, 4)])
    stride = FRAME_STRIDE.get(_arch_rev(pidr2)) if pidr2 is not None else None
    if stride is None or vcpus <= 0:
        return {}
    bases = [VIRT_REDIST_BASE + n * stride for n in range(min(vcpus, VIRT_REDIST_SIZE // stride))]
    typers = await rsp.read_memory_regions([(base + GICR_TYPER, 8) for base in bases])
    return redistributor_map(pidr2, typers, stride)
