"""A booted Linux guest migrates with its SDEI state and still takes events on the destination.

The source is the guest of ``test_linux_events.py`` (stock Debian kernel, ``sdei_test.ko``
registered and enabled event 1000 through the kernel's SDEI driver), booted with the sidecar's
symbol conduit. Once its SDEI probe printed ``SDEIv1.x`` and an event has been handled, a third
party migrates it (``migrate`` on QEMU's harness monitor) to a destination QEMU with its own
sidecar. The kernel never probes again: the destination must present the same SDEI version and
the registrations the kernel made at boot, and an event raised there must run the module's
callback, with the count going on from the source's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import signal
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from qmp_sdei.conduit.el2 import El2Conduit
from qmp_sdei.config import parse
from qmp_sdei.daemon import Sidecar
from qmp_sdei.owner import RaiseResult
from qmp_sdei.qemu.launch import QemuProcess
from qmp_sdei.stub import A_NO_HALT
from support.guests import free_port
from support.linux import LINUX_MARKS
from support.linux_guest import (
    DELIVERY_LINE,
    LinuxEventGuest,
    LinuxGuestUnavailable,
    booted_linux,
    prepare_linux_event_guest,
    sidecar_config,
)

pytestmark = [*LINUX_MARKS, pytest.mark.qemu, pytest.mark.asyncio]

TIMEOUT = 60.0
SDEI_PROBE = re.compile(r"sdei: SDEIv(?P<major>\d+)\.(?P<minor>\d+) \(0x(?P<vendor>[0-9a-f]+)\) detected in firmware")


@pytest.fixture(scope="module")
def guest() -> LinuxEventGuest:
    try:
        return prepare_linux_event_guest()
    except LinuxGuestUnavailable as err:
        pytest.skip(str(err))


@dataclasses.dataclass
class Destination:
    """A destination QEMU started with ``-incoming`` and its own sidecar, which the guest reached."""

    vm: QemuProcess
    sidecar: Sidecar
    task: asyncio.Task[object]

    async def close(self) -> None:
        if not self.task.done():
            self.sidecar.request_shutdown("test over")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, TIMEOUT)
        await self.vm.stop()
        assert self.vm.process is not None and self.vm.process.returncode != -signal.SIGABRT, self.vm.stderr
        assert "abort" not in self.vm.stderr.lower(), self.vm.stderr


async def migrate_to_new_destination(
    guest: LinuxEventGuest, source: QemuProcess, harness: QMPClient, workdir: Path, *, conduit: str = "symbols"
) -> Destination:
    """Migrate the guest as a third party would (``migrate`` on the source's harness monitor) to a new
    QEMU with its own sidecar, and return once that sidecar serves it. A switchover the source sidecar
    had to cancel is retried with a new destination (a cancelled destination QEMU exits)."""
    for attempt in range(1, 11):
        port = free_port()
        incoming = [*source.spec.extra_args, "-incoming", f"tcp:127.0.0.1:{port}"]
        dst = QemuProcess(dataclasses.replace(source.spec, extra_args=incoming), workdir / f"try{attempt}" / "vm")
        await asyncio.wait_for(dst.start(), TIMEOUT)
        config = sidecar_config(guest, dst, workdir / f"try{attempt}" / "state", TIMEOUT, conduit=conduit)
        sidecar = Sidecar(parse(config))
        destination = Destination(dst, sidecar, asyncio.create_task(sidecar.run(), name="linux-migration.dst"))
        try:
            await asyncio.wait_for(sidecar.ready.wait(), TIMEOUT)
            assert sidecar.migration is not None
            await asyncio.wait_for(sidecar.migration.ready.wait(), TIMEOUT)
            with harness.listener("MIGRATION") as listener:
                await harness.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})

                async def final() -> str:
                    async for event in listener:
                        if event["data"]["status"] in ("completed", "failed", "cancelled"):
                            return str(event["data"]["status"])
                    raise AssertionError("the harness monitor closed")

                outcome = await asyncio.wait_for(final(), TIMEOUT * 2)
            if outcome == "completed":
                await asyncio.wait_for(sidecar.migration.arrived.wait(), TIMEOUT)
                await asyncio.wait_for(sidecar.conduit_ready.wait(), TIMEOUT)
                await asyncio.wait_for(sidecar.conduit.serving.wait(), TIMEOUT)
                return destination
            assert outcome == "cancelled", outcome
            await dst.wait(TIMEOUT)
        except BaseException:
            await destination.close()
            raise
        await destination.close()
    raise AssertionError("10 switchovers in a row were cancelled")


async def test_linux_guest_migrates_and_takes_events_on_the_destination(guest: LinuxEventGuest, tmp_path: Path) -> None:
    async with booted_linux(guest, tmp_path / "src", smp=1, timeout=TIMEOUT) as linux:
        probe = SDEI_PROBE.search(linux.vm.console)
        assert probe is not None, "the kernel did not probe SDEI"
        seen = (int(probe["major"]), int(probe["minor"]))
        await linux.raise_event(0, TIMEOUT)  # one event on the source: the registration works here

        harness = await linux.vm.connect_harness(TIMEOUT, "linux-migration-harness")
        destination: Destination | None = None
        try:
            destination = await migrate_to_new_destination(guest, linux.vm, harness, tmp_path / "dst")
            dst, owner = destination.vm, destination.sidecar.owner
            assert owner is not None and owner.pins is not None
            assert owner.pins.sdei == seen, f"the kernel saw SDEI {seen}, the destination presents {owner.pins.sdei}"
            events = owner.dispatcher.describe()["vcpus"][0]["events"]
            assert events[str(guest.event)]["status"] == 3, events  # registered and enabled, by the kernel

            # Events on the destination run the module's callback; its count goes on from the source.
            for n in (linux.raised + 1, linux.raised + 2):
                result = await owner.raise_event(guest.event, 0, wait=TIMEOUT)
                assert result.result is RaiseResult.DELIVERED, result
                await dst.wait_for_console(re.compile(DELIVERY_LINE.format(n=n)), TIMEOUT)
            beats = re.findall(r"sdei_test_init: alive (\d+)", linux.vm.console + dst.console)  # /init's count goes on
            last = int(beats[-1]) if beats else -1
            await dst.wait_for_console(re.compile(rf"sdei_test_init: alive {last + 1}\r?\n"), TIMEOUT)
            trouble = [line for line in dst.console.splitlines() if re.search(r"Oops|\bBUG\b|WARNING:|panic", line)]
            assert not trouble, trouble
            assert "sdei: SDEIv" not in dst.console  # no second probe: the kernel kept what it saw
            status = await harness.execute("query-status")
            assert status["status"] == "postmigrate", status
        finally:
            with contextlib.suppress(Exception):
                await harness.disconnect()
            if destination is not None:
                await destination.close()


HOPS = 6


async def test_an_idle_el2_guest_takes_events_after_every_hop_of_a_migration_chain(
    guest: LinuxEventGuest, tmp_path: Path
) -> None:
    """A KASLR kernel idling in the EL2 stub on both vCPUs, migrated again and again, takes an event
    after every hop. Regression: QEMU does not carry a vCPU's pending-interrupt wake-up across a
    migration; a vCPU whose timer had fired at the switchover went back into the stub's ``wfi`` on
    the destination and, with every vCPU there, the guest hung (about one migration in ten)."""
    async with booted_linux(guest, tmp_path / "src", smp=2, timeout=TIMEOUT, conduit="el2") as linux:
        await linux.raise_event(0, TIMEOUT)
        holder, delivered = linux.vm, linux.raised
        previous: Destination | None = None
        try:
            for hop in range(1, HOPS + 1):
                harness = await holder.connect_harness(TIMEOUT, f"linux-migration-hop{hop}")
                try:
                    destination = await migrate_to_new_destination(
                        guest, holder, harness, tmp_path / f"hop{hop}", conduit="el2"
                    )
                finally:
                    with contextlib.suppress(Exception):
                        await harness.disconnect()
                if previous is not None:
                    await previous.close()  # the QEMU the guest left, as its owner would
                previous, holder = destination, destination.vm
                owner = destination.sidecar.owner
                assert owner is not None
                delivered += 1
                result = await owner.raise_event(guest.event, hop % 2, wait=TIMEOUT)
                assert result.result is RaiseResult.DELIVERED, f"hop {hop}: {result}"
                await holder.wait_for_console(re.compile(DELIVERY_LINE.format(n=delivered)), TIMEOUT)
        finally:
            if previous is not None:
                await previous.close()


async def _no_halt_flags(conduit: El2Conduit) -> list[int]:
    """Each vCPU's no-halt flag in the stub's per-CPU area, read at the conduit's next stop."""
    flags: list[int] = []

    async def read() -> None:
        for vcpu in range(len(conduit.threads)):
            area = conduit.layout.area_of(vcpu)  # vCPU index = MPIDR on this 2-vCPU machine
            flags.append(int.from_bytes(await conduit.rsp.read_memory(area + A_NO_HALT, 8), "little"))

    await conduit._at_next_stop(read)
    return flags


async def test_idle_vcpus_poll_without_halting_until_a_failed_migration_ends(
    guest: LinuxEventGuest, tmp_path: Path
) -> None:
    """The source sets the stub's no-halt flags when a migration becomes active (so they are set by
    the switchover) and clears them when it fails: an idle guest must not keep spinning after."""
    async with booted_linux(guest, tmp_path / "src", smp=2, timeout=TIMEOUT, conduit="el2") as linux:
        conduit, agent = linux.sidecar.conduit, linux.sidecar.migration
        assert isinstance(conduit, El2Conduit) and agent is not None
        assert await _no_halt_flags(conduit) == [0, 0]
        at_switchover: list[list[int]] = []

        async def look() -> None:
            at_switchover.append(await _no_halt_flags(conduit))

        agent.before_switchover = look
        # A destination without a sidecar: QEMU fails the migration after the switchover began
        # (its dbus-vmstate helper is missing), and the source runs on.
        port = free_port()
        incoming = [*linux.vm.spec.extra_args, "-incoming", f"tcp:127.0.0.1:{port}"]
        dst = QemuProcess(dataclasses.replace(linux.vm.spec, extra_args=incoming), tmp_path / "dst" / "vm")
        try:
            await asyncio.wait_for(dst.start(), TIMEOUT)
            # QEMU answers on a monitor only once its setup, the incoming listener included, is done.
            dst_harness = await dst.connect_harness(TIMEOUT, "no-sidecar-destination")
            await dst_harness.execute("query-status")
            await dst_harness.disconnect()
            report = await agent.migrate(f"tcp:127.0.0.1:{port}", timeout=TIMEOUT)
        finally:
            await dst.stop()
        assert report.outcome == "failed", report
        assert at_switchover == [[1, 1]]
        assert await _no_halt_flags(conduit) == [0, 0]
        await linux.raise_event(1, TIMEOUT)  # and the guest runs on, served
