"""Helpers to drive a Dispatcher the way a guest would, for the unit tests."""

from __future__ import annotations

from qmp_sdei.abi.sdei import Function
from qmp_sdei.abi.smccc import to_s64
from qmp_sdei.sdei import Dispatcher, EventSpec, VcpuRegs

F = Function
ENTRY = 0x4008_1000  # an arbitrary handler address
ARG = 0xABCD

PRIVATE, CRITICAL, SHARED, SHARED_CRITICAL = 1000, 1001, 2000, 2001


def make(profile: str = "tf-a", vcpus: int = 2, version: tuple[int, int] = (1, 1), **kw: object) -> Dispatcher:
    events = [
        EventSpec(PRIVATE, name="private"),
        EventSpec(CRITICAL, critical=True),
        EventSpec(SHARED, shared=True),
        EventSpec(SHARED_CRITICAL, shared=True, critical=True),
    ]
    return Dispatcher(
        events=events,
        mpidrs=[mpidr_of(i) for i in range(vcpus)],
        version=version,
        profile=profile,
        bind_slots=kw.pop("bind_slots", (3, 3)),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def mpidr_of(index: int) -> int:
    """QEMU virt's layout: 8 cores per cluster in Aff0, clusters in Aff1."""
    return ((index // 8) << 8) | (index % 8)


def call(d: Dispatcher, vcpu: int, fid: int, *args: int, regs: VcpuRegs | None = None) -> int:
    """Make an SDEI call from ``vcpu`` and return x0 as a signed value."""
    regs = regs if regs is not None else VcpuRegs(pc=0x4008_0808)
    regs.x[0] = fid
    for i, value in enumerate(args, start=1):
        regs.x[i] = value
    d.hypercall(vcpu, regs)
    return to_s64(regs.x[0])


def interrupted_regs(seed: int = 0) -> VcpuRegs:
    """A recognisable interrupted context: x[i] = seed + i, EL1h with DAIF clear."""
    return VcpuRegs(x=[seed + i for i in range(31)], pc=0x4008_2000 + seed, pstate=0x6000_0005)


def register(d: Dispatcher, vcpu: int, event: int, *, enable: bool = True, unmask: bool = True) -> None:
    assert call(d, vcpu, F.EVENT_REGISTER, event, ENTRY, ARG, 0, 0) == 0
    if enable:
        assert call(d, vcpu, F.EVENT_ENABLE, event) == 0
    if unmask:
        assert call(d, vcpu, F.PE_UNMASK) == 0


def run_handler(d: Dispatcher, vcpu: int, event: int, seed: int = 0) -> VcpuRegs:
    """Trigger ``event`` and enter its handler on ``vcpu``; returns the handler's registers."""
    d.trigger(event, None if d.spec(event).shared else vcpu)
    regs = interrupted_regs(seed)
    assert d.deliver(vcpu, regs), f"event {event} was not deliverable on vCPU {vcpu}"
    assert regs.x[0] == event
    return regs
