"""Deferred delivery: an event raised while the vCPU is in EL1t or EL0 is entered at its next exception entry.

QEMU's cpsr write cannot switch SP banks, so :class:`GdbstubConduit` enters handlers only on a vCPU
in EL1h; for a vCPU in EL1t or EL0 it counts a deferral and arms breakpoints on that vCPU's VBAR_EL1
vectors, so the handler is entered at the first instruction of the next exception vector (EL1h by
construction). ``tests/guests/deferral`` exercises that with a real QEMU (2 vCPUs, TCG), a real
:class:`Dispatcher` and no mocks:

* vCPU 0 registers event 1000, unmasks, and parks in EL1t (case a) and then in EL0 (case b),
  spinning without taking any exception, and says ``WAIT el1t``/``WAIT el0``;
* the test raises 1000 on vCPU 0, which must be deferred (nothing can enter it yet);
* the test then raises 1000 on vCPU 1 (EL1h, entered at once); that handler releases vCPU 0, which
  issues ``svc #0``; the vector breakpoint catches the entry and the handler runs on vCPU 0 in EL1h
  with DAIF masked, reads SDEI_EVENT_CONTEXT and completes; the vector then handles the svc as if
  nothing had happened and vCPU 0 goes back to EL1t/EL0 and on to its main flow (``DONE``);
* finally 200 more exceptions with no event pending must not stop the VM at all (the vector
  breakpoints are gone): the stop count between two marker PSCI calls is exactly one.

Releasing vCPU 0 through vCPU 1 (rather than letting it take exceptions now and then) makes the
deferral deterministic: a stop can never find vCPU 0 inside an EL1h exception handler.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from qmp_sdei.conduit.gdbstub import GdbstubConduit
from qmp_sdei.owner import RaiseOutcome, RaiseResult, SdeiOwner
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.sdei import Dispatcher, EventSpec
from support.guests import conduit_on_gdbstub, elf_symbols

pytestmark = [pytest.mark.qemu, pytest.mark.guest, pytest.mark.asyncio]

TIMEOUT = 60.0  # per wait: TCG on a busy 2-core host, other QEMUs running beside us
EVENT = 1000
PSCI_VERSION = 0x8400_0000
MARKER_ANSWER = 0x0001_0000  # the test's filter answers PSCI_VERSION itself (no pass-through step)
QUIET_SVCS = 200  # guest.c: QUIET_SVCS in EL1t + QUIET_SVCS in EL0

LINE_RE = r"{kind}{where}((?: \w+=0x[0-9a-f]+)*)\r?\n"


@dataclass
class Booted:
    vm: QemuProcess
    conduit: GdbstubConduit
    dispatcher: Dispatcher
    owner: SdeiOwner
    run: asyncio.Task[None]
    symbols: dict[str, int]
    #: conduit.stats.stops as seen by each PSCI_VERSION call (the guest's markers)
    marker_stops: list[int] = field(default_factory=list)


@pytest_asyncio.fixture
async def booted(tmp_path: Path, deferral_elf: Path) -> AsyncIterator[Booted]:
    symbols = elf_symbols(deferral_elf)
    dispatcher = Dispatcher(events=[EventSpec(EVENT)], mpidrs=[0x0, 0x1], version=(1, 1), profile="tf-a")
    marker_stops: list[int] = []
    serving: list[GdbstubConduit] = []  # the conduit, once started (the owner is made before it)

    class MarkingOwner(SdeiOwner):
        def psci_call(self, vcpu: int, fid: int, x1: int, x2: int, x3: int) -> int | None:
            # Called while the conduit handles the trap's stop, so the count is exact.
            if fid == PSCI_VERSION:
                marker_stops.append(serving[0].stats.stops)
                return MARKER_ANSWER
            return None  # CPU_ON, SYSTEM_OFF: QEMU's own PSCI

    owner = MarkingOwner(dispatcher)
    spec = QemuSpec(smp=2, kernel=deferral_elf)
    async with conduit_on_gdbstub(spec, tmp_path, owner, [symbols["sdei_hvc_insn"]], TIMEOUT) as (vm, conduit, run):
        serving.append(conduit)
        yield Booted(vm, conduit, dispatcher, owner, run, symbols, marker_stops)


async def wait_line(vm: QemuProcess, kind: str, where: str) -> dict[str, int]:
    match = await vm.wait_for_console(LINE_RE.format(kind=kind, where=f" {where}" if where else ""), TIMEOUT)
    return {k: int(v, 16) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+)", match.group(1))}


def assert_deliverable(result: RaiseOutcome, what: str) -> None:
    assert result.result is RaiseResult.PENDING and result.code == "deliverable", (what, result)


async def deferred_case(booted: Booted, where: str) -> tuple[float, dict[str, int]]:
    """Raise the event on vCPU 0 while it waits in ``where``, check it is deferred, release it.

    Returns seconds from the release (the event on vCPU 1) to vCPU 0's handler line, and the ``DONE`` line.
    """
    vm, conduit, stats = booted.vm, booted.conduit, booted.conduit.stats
    await vm.wait_for_console(rf"WAIT {where} {EVENT}\r?\n", TIMEOUT)
    deferred, deliveries = stats.deferred_deliveries, stats.deliveries
    handlers_before = vm.console.count("HANDLER ")

    # Deliverable, but vCPU 0 is outside EL1h: once the stop the raise asked for is served, the
    # conduit has decided to defer it.
    assert_deliverable(await booted.owner.raise_event(EVENT, 0, wait=0), f"{where}: vCPU 0")
    await conduit.wait_served()
    assert stats.deferred_deliveries == deferred + 1, f"{where}: the event was not deferred"
    assert stats.deliveries == deliveries, f"{where}: entered a handler on a vCPU outside EL1h"
    assert booted.dispatcher.deliverable() == [0], f"{where}: the event should still wait for vCPU 0"

    # Release vCPU 0 from vCPU 1 (EL1h: entered at once). Its previous handler may still be between
    # releasing vCPU 0 and its COMPLETE; then this one is pending and entered right after that.
    released = time.perf_counter()
    result = await booted.owner.raise_event(EVENT, 1)
    assert result.result is RaiseResult.DELIVERED or (result.result is RaiseResult.PENDING and result.code == "busy"), (
        where,
        result,
    )
    nth_handler = rf"(?s)(?:HANDLER [^\n]*\n.*?){{{handlers_before + 1}}}"
    await vm.wait_for_console(nth_handler, TIMEOUT)
    latency = time.perf_counter() - released
    done = await wait_line(vm, "DONE", where)
    assert vm.console.count("HANDLER ") == handlers_before + 1, vm.console
    assert stats.deferred_deliveries == deferred + 1  # one deferral, one delivery
    assert stats.deliveries >= deliveries + 2  # vCPU 1's release and vCPU 0's deferred handler
    return latency, done


def check_done(done: dict[str, int], *, vectors: int, offset: int, mode: int, handled: int, console: str) -> None:
    want = {
        "handled": handled,
        "ev": EVENT,
        "arg": 0xA0,
        "daif": 0x3C0,  # DAIF = 0b1111 in the handler
        "spsel": 1,  # SP_ELx: the handler runs in EL1h
        "el": 1,
        "pc": vectors + offset,  # interrupted at the first instruction of the svc's vector...
        "pc_is_vector": 1,
        "ctx2": 0x5EED_0002,  # ...with the registers the svc was issued with
        "svcs": 1,  # the vector then handled that svc once, as if nothing had happened
        "svc_elr_ok": 1,
        "svc_spsr_mode": mode,  # and erets back to EL1t (0x4) / EL0t (0x0)
        "marks": 1,  # callee-saved registers intact across the detour
        "el_now": 1,
        "spsel_now": 1,
    }
    diffs = {k: (hex(done.get(k, -1)), hex(v)) for k, v in want.items() if done.get(k) != v}
    assert not diffs, f"(got, want): {diffs}\n\n{console}"
    # The interrupted context is the vector entry: EL1h with DAIF masked by the exception.
    assert done["pstate"] & 0x3CF == 0x3C5, hex(done["pstate"])


async def test_event_raised_in_el1t_and_el0_is_entered_at_the_next_exception(booted: Booted) -> None:
    vm, conduit = booted.vm, booted.conduit
    boot = await wait_line(vm, "STEP", "boot")
    assert boot["el"] == 1 and boot["spsel"] == 1
    assert boot["hvc"] == booted.symbols["sdei_hvc_insn"] and boot["vbar"] == booted.symbols["vectors"]
    setup = await wait_line(vm, "STEP", "setup")
    assert setup == {"version": 0x0001_0001_0000_0000, "register": 0, "enable": 0, "unmask": 0, "cpu_on": 0}
    await vm.wait_for_console(r"STEP cpu1-up\r?\n", TIMEOUT)
    entered = await wait_line(vm, "STEP", "el1t-entered")
    assert entered == {"spsel": 0, "daif": 0}  # really EL1t, interrupts unmasked

    latency_el1t, done = await deferred_case(booted, "el1t")
    check_done(done, vectors=booted.symbols["vectors"], offset=0x000, mode=0x4, handled=1, console=vm.console)

    latency_el0, done = await deferred_case(booted, "el0")
    check_done(done, vectors=booted.symbols["vectors"], offset=0x400, mode=0x0, handled=2, console=vm.console)

    # Nothing pending: 200 exceptions through the same vectors must not stop the VM once.
    quiet = await wait_line(vm, "QUIET", "")
    assert quiet == {"svcs": QUIET_SVCS, "psci_a": MARKER_ANSWER, "psci_b": MARKER_ANSWER, "handled": 2}, quiet
    assert len(booted.marker_stops) == 2
    assert booted.marker_stops[1] - booted.marker_stops[0] == 1, (
        f"{booted.marker_stops[1] - booted.marker_stops[0] - 1} extra stop(s): vector breakpoints left armed"
    )

    # SYSTEM_OFF is passed through: QEMU exits, the conduit's loop ends.
    assert await vm.wait(TIMEOUT) == 0
    await asyncio.wait_for(booted.run, TIMEOUT)
    assert "FATAL" not in vm.console, vm.console
    stats = conduit.stats
    assert stats.deferred_deliveries == 2
    assert stats.deliveries == 4  # 2 releases on vCPU 1, 2 deferred handlers on vCPU 0
    ms = f"el1t {latency_el1t * 1e3:.1f} ms, el0 {latency_el0 * 1e3:.1f} ms"
    print(f"deferred delivery, release on vCPU 1 -> vCPU 0 handler line: {ms}")
