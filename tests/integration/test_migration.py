"""End to end: the SDEI state rides inside a real QEMU live migration (dbus-vmstate).

Two real ``qemu-system-aarch64`` on loopback: the source runs the bare-metal guest, the destination
waits with ``-incoming defer``. Each side has its own private ``dbus-daemon``, a QEMU
``dbus-vmstate`` object added over QMP (``id-list=sdei``) and, unless a test says otherwise, a
:class:`VmstateService` backed by a real :class:`Dispatcher`. The two sides share no channel but
the migration stream.

No gdbstub is attached (a gdbstub conduit and a migration need their own protocol), so the guest's
SDEI calls go unanswered here; the dispatchers' states are set up directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qmp_sdei.errors import IncompatibleState, MigrationError
from qmp_sdei.qemu import migration
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.qemu.qmp import QmpSession, VmEventKind, attach
from qmp_sdei.sdei import Dispatcher
from qmp_sdei.versions import VersionPins, accept_incoming
from qmp_sdei.vmstate import PrivateBus, VmstateService, decode_payload, encode_payload, open_channel
from support.guests import free_port
from support.qemu import SLOW, requires_qemu
from support.sdei import CRITICAL, PRIVATE, SHARED, F, call, make, register, run_handler

pytestmark = [pytest.mark.qemu, pytest.mark.guest, pytest.mark.asyncio, requires_qemu]

PINS = VersionPins(sdei=(1, 1), sdei_vendor=0, psci=(1, 0))


def busy_dispatcher() -> Dispatcher:
    """Two vCPUs (the guest's MPIDRs) with registrations, a nested dispatch, a binding, pending events."""
    d = make(vcpus=2)
    for v in range(2):
        register(d, v, PRIVATE)
        register(d, v, CRITICAL)
    register(d, 0, SHARED)
    register(d, 0, call(d, 0, F.INTERRUPT_BIND, 20))
    run_handler(d, 0, PRIVATE, seed=0x11 << 40)
    run_handler(d, 0, CRITICAL, seed=0x22 << 40)  # nested in the normal one
    run_handler(d, 1, PRIVATE, seed=0x77 << 40)
    d.trigger(SHARED)
    return d


@dataclass
class Side:
    vm: QemuProcess
    qmp: QmpSession
    bus: PrivateBus | None
    dispatcher: Dispatcher
    saved: list[bytes] = field(default_factory=list)
    loaded: list[bytes] = field(default_factory=list)
    service: VmstateService | None = None
    fail_save: bool = False

    pins: VersionPins | None = None  # what the destination adopted

    def save(self) -> bytes:
        """What the sidecar's Save answers: its pins and the dispatcher snapshot."""
        if self.fail_save:
            raise IncompatibleState("refusing to save, as the test asked")
        blob = encode_payload(PINS, self.dispatcher.snapshot())
        self.saved.append(blob)
        return blob

    def load(self, blob: bytes) -> None:
        """What the sidecar's Load does: check everything, then change anything."""
        self.loaded.append(blob)
        payload = decode_payload(blob)
        pins = accept_incoming(None, payload.pins, qemu_psci=(1, 1))
        self.dispatcher.restore(payload.snapshot)
        self.pins = pins


@contextlib.asynccontextmanager
async def side(workdir: Path, spec: QemuSpec, dispatcher: Dispatcher, *, helper: bool = True) -> AsyncIterator[Side]:
    """A QEMU with our QMP session and the channel as the sidecar opens it (``open_channel``).

    ``helper=False`` leaves out the service only: the bus and QEMU's object (``id-list=sdei``) are
    there, so QEMU looks for a helper and finds none.
    """
    async with contextlib.AsyncExitStack() as stack:
        vm = QemuProcess(spec, workdir / "qemu")
        stack.push_async_callback(vm.stop)
        await vm.start()
        qmp = await attach(vm.sidecar_socket, listen=False, timeout=SLOW, name=workdir.name)
        stack.push_async_callback(qmp.close)
        if helper:
            state = Side(vm, qmp, None, dispatcher)
            channel = await stack.enter_async_context(
                open_channel(qmp, workdir / "bus", save=state.save, load=state.load)
            )
            state.bus, state.service = channel.bus, channel.service
        else:
            bus = await stack.enter_async_context(PrivateBus(workdir / "bus"))
            state = Side(vm, qmp, bus, dispatcher)
            await migration.add_dbus_vmstate(qmp, bus.address, id_list=["sdei"])
        yield state


def source_spec(guest_elf: Path) -> QemuSpec:
    return QemuSpec(smp=2, kernel=guest_elf, paused=False)


def destination_spec(guest_elf: Path) -> QemuSpec:
    return QemuSpec(smp=2, kernel=guest_elf, paused=True, extra_args=("-incoming", "defer"))


async def start_incoming(dst: Side) -> str:
    await migration.prepare_destination(dst.qmp)
    uri = f"tcp:127.0.0.1:{free_port()}"
    await migration.migrate_incoming(dst.qmp, uri)
    return uri


async def test_state_rides_the_migration_stream(tmp_path: Path, guest_elf: Path) -> None:
    source_dispatcher = busy_dispatcher()
    async with (
        side(tmp_path / "src", source_spec(guest_elf), source_dispatcher) as src,
        side(tmp_path / "dst", destination_spec(guest_elf), make(vcpus=2)) as dst,
    ):
        await src.vm.wait_for_console("STEP boot", SLOW)
        assert dst.dispatcher != src.dispatcher
        with dst.qmp.subscribe({VmEventKind.MIGRATION}) as incoming:
            uri = await start_incoming(dst)
            await migration.prepare_source(src.qmp)
            pauses: list[str] = []

            async def at_pre_switchover() -> None:
                pauses.append(await src.qmp.refresh_runstate())
                assert src.saved == []  # Save comes after the pause, in the device phase

            info = await migration.run_source_migration(src.qmp, uri, timeout=SLOW, at_pre_switchover=at_pre_switchover)
            await migration.wait_for_migration(incoming, {"completed"}, SLOW)

        assert pauses == ["finish-migrate"]
        assert info.status == "completed"
        assert info.downtime_ms is not None
        assert info.total_time_ms is not None and info.total_time_ms > 0  # times settled (completed_info)
        assert len(src.saved) == 1
        assert dst.loaded == src.saved  # the very bytes, through QEMU's stream only
        assert dst.dispatcher == source_dispatcher
        assert dst.pins == PINS
        assert dst.service is not None and dst.service.stats.loads == 1
        assert await src.qmp.refresh_runstate() == "postmigrate"
        await dst.qmp.execute("cont")
        assert await dst.qmp.refresh_runstate() == "running"


async def test_a_destination_that_refuses_the_state_fails_the_migration(tmp_path: Path, guest_elf: Path) -> None:
    incompatible = make(vcpus=2, version=(1, 0))  # pinned to another SDEI version: must refuse
    before = incompatible.snapshot()
    async with (
        side(tmp_path / "src", source_spec(guest_elf), busy_dispatcher()) as src,
        side(tmp_path / "dst", destination_spec(guest_elf), incompatible) as dst,
    ):
        await src.vm.wait_for_console("STEP boot", SLOW)
        with src.qmp.subscribe({VmEventKind.RESUME}) as resumes:
            uri = await start_incoming(dst)
            await migration.prepare_source(src.qmp)
            with pytest.raises(MigrationError, match="failed"):
                await migration.run_source_migration(src.qmp, uri, timeout=SLOW)
            await resumes.wait_for(VmEventKind.RESUME, SLOW)
        assert await src.qmp.refresh_runstate() == "running"
        assert len(src.saved) == 1
        assert dst.loaded == src.saved  # it arrived, and was refused
        assert dst.service is not None and dst.service.stats.refused_loads == 1
        assert dst.service.stats.last_error is not None and "SDEI version" in dst.service.stats.last_error
        assert dst.dispatcher.snapshot() == before  # the refusal changed nothing
        assert dst.pins is None
        assert await dst.vm.wait(SLOW) != 0  # QEMU gives up a destination it could not load


async def test_a_destination_without_a_helper_fails_the_migration(tmp_path: Path, guest_elf: Path) -> None:
    async with (
        side(tmp_path / "src", source_spec(guest_elf), busy_dispatcher()) as src,
        side(tmp_path / "dst", destination_spec(guest_elf), make(vcpus=2), helper=False) as dst,
    ):
        await src.vm.wait_for_console("STEP boot", SLOW)
        with src.qmp.subscribe({VmEventKind.RESUME}) as resumes:
            uri = await start_incoming(dst)
            await migration.prepare_source(src.qmp)
            with pytest.raises(MigrationError, match="failed"):
                await migration.run_source_migration(src.qmp, uri, timeout=SLOW)
            await resumes.wait_for(VmEventKind.RESUME, SLOW)
        assert await src.qmp.refresh_runstate() == "running"
        assert len(src.saved) == 1
        assert await dst.vm.wait(SLOW) != 0
        await dst.vm.stop()  # collects the rest of its stderr
        assert "Required VMState Id are missing: sdei" in dst.vm.stderr


async def test_a_source_without_a_helper_fails_before_sending_device_state(tmp_path: Path, guest_elf: Path) -> None:
    """The source refuses to save (``pre-save failed: dbus-vmstate``) and resumes its guest.

    QEMU 7.2 leaves the destination in ``inmigrate`` (its migration ``active``) after that: whoever
    drives the migration has to stop the destination QEMU itself.
    """
    fresh = make(vcpus=2)
    async with (
        side(tmp_path / "src", source_spec(guest_elf), busy_dispatcher(), helper=False) as src,
        side(tmp_path / "dst", destination_spec(guest_elf), fresh) as dst,
    ):
        await src.vm.wait_for_console("STEP boot", SLOW)
        with src.qmp.subscribe({VmEventKind.RESUME}) as resumes:
            uri = await start_incoming(dst)
            await migration.prepare_source(src.qmp)
            with pytest.raises(MigrationError, match="failed"):
                await migration.run_source_migration(src.qmp, uri, timeout=SLOW)
            await resumes.wait_for(VmEventKind.RESUME, SLOW)
        assert await src.qmp.refresh_runstate() == "running"
        assert dst.loaded == []
        assert dst.dispatcher == make(vcpus=2)


async def test_a_source_whose_save_fails_fails_the_migration(tmp_path: Path, guest_elf: Path) -> None:
    """QEMU 7.2 does not fail the source on a Save error; the destination's load fails instead, and the
    return path brings that failure back to the source, which resumes."""
    async with (
        side(tmp_path / "src", source_spec(guest_elf), busy_dispatcher()) as src,
        side(tmp_path / "dst", destination_spec(guest_elf), make(vcpus=2)) as dst,
    ):
        src.fail_save = True
        await src.vm.wait_for_console("STEP boot", SLOW)
        with src.qmp.subscribe({VmEventKind.RESUME}) as resumes:
            uri = await start_incoming(dst)
            await migration.prepare_source(src.qmp)
            with pytest.raises(MigrationError, match="failed"):
                await migration.run_source_migration(src.qmp, uri, timeout=SLOW)
            await resumes.wait_for(VmEventKind.RESUME, SLOW)
        assert await src.qmp.refresh_runstate() == "running"
        assert src.service is not None and src.service.stats.failed_saves == 1
        assert dst.loaded == []
        assert dst.dispatcher == make(vcpus=2)
        assert await dst.vm.wait(SLOW) != 0


async def test_a_failing_pre_switchover_hook_cancels_the_migration(tmp_path: Path, guest_elf: Path) -> None:
    """The sidecar's safe point says no: the migration is cancelled, nothing was saved, the source runs."""

    async def refuse() -> None:
        raise IncompatibleState("not now")

    async with (
        side(tmp_path / "src", source_spec(guest_elf), busy_dispatcher()) as src,
        side(tmp_path / "dst", destination_spec(guest_elf), make(vcpus=2)) as dst,
    ):
        await src.vm.wait_for_console("STEP boot", SLOW)
        with (
            src.qmp.subscribe({VmEventKind.MIGRATION}) as progress,
            src.qmp.subscribe({VmEventKind.RESUME}) as resumes,
        ):
            uri = await start_incoming(dst)
            await migration.prepare_source(src.qmp)
            with pytest.raises(IncompatibleState, match="not now"):
                await migration.run_source_migration(src.qmp, uri, timeout=SLOW, at_pre_switchover=refuse)
            assert await migration.wait_for_migration(progress, {"cancelled"}, SLOW) == "cancelled"
            await resumes.wait_for(VmEventKind.RESUME, SLOW)
        assert await src.qmp.refresh_runstate() == "running"
        assert src.saved == []
        assert dst.loaded == []
        assert await dst.vm.wait(SLOW) != 0


async def test_without_its_sidecar_a_vm_cannot_migrate(tmp_path: Path, guest_elf: Path) -> None:
    """The channel closes (the sidecar stopped) but QEMU's object stays: migrating now would move the
    guest without its SDEI state, so QEMU's pre-save fails and the source resumes."""
    async with contextlib.AsyncExitStack() as stack:
        src_vm = QemuProcess(source_spec(guest_elf), tmp_path / "src")
        stack.push_async_callback(src_vm.stop)
        await src_vm.start()
        src_qmp = await attach(src_vm.sidecar_socket, listen=False, timeout=SLOW, name="src")
        stack.push_async_callback(src_qmp.close)
        source = busy_dispatcher()
        async with open_channel(src_qmp, tmp_path / "src-bus", save=source.snapshot, load=source.restore):
            pass  # the sidecar attached, then went away
        assert await migration.dbus_vmstate_objects(src_qmp) == [migration.DEFAULT_VMSTATE_OBJECT]
        dst = await stack.enter_async_context(side(tmp_path / "dst", destination_spec(guest_elf), make(vcpus=2)))
        await src_vm.wait_for_console("STEP boot", SLOW)
        with src_qmp.subscribe({VmEventKind.RESUME}) as resumes:
            uri = await start_incoming(dst)
            await migration.prepare_source(src_qmp)
            with pytest.raises(MigrationError, match="failed"):
                await migration.run_source_migration(src_qmp, uri, timeout=SLOW)
            await resumes.wait_for(VmEventKind.RESUME, SLOW)
        assert await src_qmp.refresh_runstate() == "running"
        assert dst.loaded == []


async def test_dbus_vmstate_object_is_replaced_not_duplicated(tmp_path: Path) -> None:
    async with side(tmp_path / "one", QemuSpec(), make(vcpus=1)) as one:
        assert await migration.dbus_vmstate_objects(one.qmp) == [migration.DEFAULT_VMSTATE_OBJECT]
        await migration.add_dbus_vmstate(one.qmp, one.bus.address)  # a sidecar attaching again
        assert await migration.dbus_vmstate_objects(one.qmp) == [migration.DEFAULT_VMSTATE_OBJECT]
        await migration.remove_dbus_vmstate(one.qmp)
        await one.qmp.execute("object-add", {"qom-type": "dbus-vmstate", "id": "theirs", "addr": one.bus.address})
        with pytest.raises(MigrationError, match="allows only one"):
            await migration.add_dbus_vmstate(one.qmp, one.bus.address)
        with pytest.raises(MigrationError, match="id-list"):
            await migration.add_dbus_vmstate(one.qmp, one.bus.address, id_list=[], object_id="theirs")


async def test_an_unreachable_bus_address_is_refused_by_qemu(tmp_path: Path) -> None:
    async with side(tmp_path / "one", QemuSpec(), make(vcpus=1), helper=False) as one:
        await migration.remove_dbus_vmstate(one.qmp)
        with pytest.raises(MigrationError, match="refused the dbus-vmstate object"):
            await migration.add_dbus_vmstate(one.qmp, f"unix:path={tmp_path}/nobody.sock")
        assert await migration.dbus_vmstate_objects(one.qmp) == []
