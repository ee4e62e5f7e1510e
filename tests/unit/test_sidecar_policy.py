"""Sidecar logic that needs no QEMU: shutdown drain of running handlers, PSCI policy, state writes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qmp_sdei.abi import psci
from qmp_sdei.config import parse
from qmp_sdei.daemon import Sidecar
from qmp_sdei.owner import SdeiOwner
from qmp_sdei.qemu.qmp import VmEvent, VmEventKind
from qmp_sdei.sdei import Dispatcher, EventSpec
from qmp_sdei.statefile import VmIdentity
from qmp_sdei.versions import VersionPins
from support.sdei import ENTRY, PRIVATE, F, call, interrupted_regs


def sidecar_without_qemu(tmp_path: Path, psci_version: tuple[int, int] = (1, 0)) -> Sidecar:
    """A Sidecar wired as start() would wire it, minus the QMP attach."""
    sidecar = Sidecar(parse({"qmp": {"socket": "/nonexistent"}, "vm": {"state_dir": str(tmp_path / "state")}}))
    sidecar.store.acquire()
    sidecar.dispatcher = Dispatcher(events=[EventSpec(PRIVATE)], mpidrs=[0, 1])
    sidecar.pins = VersionPins((1, 1), 0, psci_version)
    sidecar.identity = VmIdentity("uuid", "vm")
    sidecar.owner = SdeiOwner(sidecar.dispatcher, pins=sidecar.pins, persist=sidecar._persist)
    return sidecar


def enter_handler(sidecar: Sidecar, vcpu: int = 0) -> None:
    p = sidecar.owner
    assert p is not None
    assert call(p, vcpu, F.EVENT_REGISTER, PRIVATE, ENTRY, 1, 0, 0) == 0  # type: ignore[arg-type]
    assert call(p, vcpu, F.EVENT_ENABLE, PRIVATE) == 0  # type: ignore[arg-type]
    assert call(p, vcpu, F.PE_UNMASK) == 0  # type: ignore[arg-type]
    p.dispatcher.trigger(PRIVATE, vcpu)
    assert p.deliver(vcpu, interrupted_regs())
    p.commit()


@pytest.mark.asyncio
async def test_drain_waits_for_running_handlers_and_enters_no_new_ones(tmp_path: Path) -> None:
    sidecar = sidecar_without_qemu(tmp_path)
    enter_handler(sidecar)
    sidecar.dispatcher.trigger(PRIVATE, 0)  # pending behind the running handler
    drain = asyncio.create_task(sidecar.drain_handlers(timeout=30))
    done, _ = await asyncio.wait({drain}, timeout=0.2)
    assert not done, "drain returned while a handler was running"
    # The guest's COMPLETE arrives through the conduit, which commits at the end of the stop.
    call(sidecar.owner, 0, F.EVENT_COMPLETE, 0)  # type: ignore[arg-type]
    assert sidecar.owner.deliverable() == []  # the pending one is not entered while draining
    assert not sidecar.owner.deliver(0, interrupted_regs())
    sidecar.owner.commit()
    assert await asyncio.wait_for(drain, 30) is True
    sidecar.store.release()


@pytest.mark.asyncio
async def test_drain_gives_up_after_its_timeout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sidecar = sidecar_without_qemu(tmp_path)
    enter_handler(sidecar, vcpu=1)
    assert await sidecar.drain_handlers(timeout=0.05) is False
    assert "handlers still running" in caplog.text
    assert "{1: [1000]}" in caplog.text
    sidecar.store.release()


@pytest.mark.asyncio
async def test_drain_without_handlers_returns_at_once(tmp_path: Path) -> None:
    sidecar = sidecar_without_qemu(tmp_path)
    assert await asyncio.wait_for(sidecar.drain_handlers(timeout=30), 1) is True
    sidecar.store.release()


def test_psci_policy_answers_version_and_filters(tmp_path: Path) -> None:
    sidecar = sidecar_without_qemu(tmp_path, psci_version=(1, 0))
    assert sidecar.owner.psci_call(0, psci.Function.PSCI_VERSION, 0, 0, 0) == 0x10000
    assert sidecar.owner.psci_call(0, psci.Function.SYSTEM_RESET2_64, 0, 0, 0) == psci.NOT_SUPPORTED
    assert sidecar.owner.psci_call(0, psci.Function.CPU_ON_64, 1, 0x4008_0000, 0) is None  # QEMU does it
    sidecar.store.release()


def test_cpu_off_resets_that_vcpus_sdei_state(tmp_path: Path) -> None:
    sidecar = sidecar_without_qemu(tmp_path)
    enter_handler(sidecar, vcpu=1)
    writes = sidecar.owner.counters.state_writes
    assert sidecar.owner.psci_call(1, psci.Function.CPU_OFF, 0, 0, 0) is None  # still passed to QEMU
    assert sidecar.dispatcher is not None
    assert sidecar.dispatcher.vcpus[1].masked
    assert sidecar.dispatcher.vcpus[1].stack == []
    assert call(sidecar.dispatcher, 1, F.EVENT_STATUS, PRIVATE) == 0
    sidecar.owner.commit()  # the conduit commits before QEMU performs the CPU_OFF
    assert sidecar.owner.counters.state_writes == writes + 1  # durable before the vCPU goes down
    sidecar.store.release()


@pytest.mark.asyncio
async def test_guest_reset_is_applied_when_the_conduit_passes_it_through(tmp_path: Path) -> None:
    """The SDEI reset happens at the PSCI call, and QMP's later RESET event does not repeat it."""
    sidecar = sidecar_without_qemu(tmp_path)
    assert sidecar.dispatcher is not None
    enter_handler(sidecar)
    assert sidecar.owner.psci_call(0, psci.Function.SYSTEM_RESET, 0, 0, 0) is None  # QEMU performs it
    assert call(sidecar.dispatcher, 0, F.EVENT_STATUS, PRIVATE) == 0
    assert sidecar.dispatcher.vcpus[0].masked
    # The guest runs again and registers before the sidecar has read QMP's RESET event...
    assert call(sidecar.owner, 0, F.EVENT_REGISTER, PRIVATE, ENTRY, 1, 0, 0) == 0  # type: ignore[arg-type]
    await sidecar._on_vm_event(VmEvent(VmEventKind.RESET, 0.0, guest=True, reason="guest-reset"))
    assert call(sidecar.dispatcher, 0, F.EVENT_STATUS, PRIVATE) == 1  # ...and keeps its registration
    assert sidecar.owner.counters.resets == 1
    # A later host reset still resets.
    await sidecar._on_vm_event(VmEvent(VmEventKind.RESET, 0.0, guest=False, reason="host-qmp-system-reset"))
    assert call(sidecar.dispatcher, 0, F.EVENT_STATUS, PRIVATE) == 0
    sidecar.store.release()
