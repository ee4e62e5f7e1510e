"""The EL2 conduit's delivery retries (pure logic: no QEMU; a recording stand-in for the gdbstub).

A vCPU found inside the stub cannot take an event at that stop; the conduit stops the VM again
STUB_RETRY later. If that timer fires while another stop is being served, the retry must come
after that stop, not be dropped: a dropped retry left the event undelivered for good when the
guest took no exception (found by bench/conduit.py's bare-metal run through the stub, about one
run in five).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from qmp_sdei import stub
from qmp_sdei.conduit.el2 import STUB_RETRY, El2Conduit
from qmp_sdei.conduit.traps import ElfImage
from qmp_sdei.stub import STUB_BASE, STUB_ELF, StubLayout


class RecordingStub:
    """Stands in for RspClient: records interrupts (0x03)."""

    def __init__(self) -> None:
        self.interrupted = asyncio.Event()
        self.interrupts = 0

    def interrupt(self) -> None:
        self.interrupts += 1
        self.interrupted.set()


class WaitingOwner:
    """Stands in for the SDEI owner: vCPU 0 has an event waiting."""

    def __init__(self) -> None:
        self.waiting = {0}

    def bind_delivery(self, request: Callable[[], None]) -> None:
        pass

    def deliverable(self) -> set[int]:
        return self.waiting


def _layout() -> StubLayout:
    image = ElfImage(STUB_ELF.read_bytes(), STUB_ELF.name)
    region = next(r for r in image.regions() if r.contains(STUB_BASE))
    start = STUB_BASE - region.vaddr
    return StubLayout.parse(STUB_BASE, bytes(image.region_bytes(region)[start : start + stub.HEADER_SIZE]))


def _conduit() -> tuple[El2Conduit, RecordingStub, WaitingOwner]:
    rsp, owner = RecordingStub(), WaitingOwner()
    conduit = El2Conduit(rsp, owner, _layout())  # type: ignore[arg-type]
    return conduit, rsp, owner


@pytest.mark.asyncio
async def test_a_retry_that_fires_during_a_stop_comes_after_it() -> None:
    conduit, rsp, _ = _conduit()
    internals: Any = conduit
    internals._in_stop, internals._running = True, False  # another stop is being served
    conduit._retry_delivery(0)
    assert rsp.interrupts == 0  # nothing to interrupt while we hold the VM in a stop
    internals._in_stop, internals._running = False, True  # that stop ended; the VM runs
    await asyncio.wait_for(rsp.interrupted.wait(), 50 * STUB_RETRY)
    assert rsp.interrupts == 1


@pytest.mark.asyncio
async def test_a_retry_interrupts_a_running_vm_at_once_and_stops_when_nothing_waits() -> None:
    conduit, rsp, owner = _conduit()
    internals: Any = conduit
    internals._running = True
    conduit._retry_delivery(0)
    assert rsp.interrupts == 1
    owner.waiting = set()  # delivered meanwhile
    conduit._retry_delivery(0)
    assert rsp.interrupts == 1
