"""The VMState1 service and the private bus, against a real ``dbus-daemon`` (no QEMU).

A dbus-fast client plays QEMU's part: it lists the queued owners of ``org.qemu.VMState1``, reads
each one's ``Id`` and calls ``Save``/``Load``, as QEMU's dbus-vmstate object does.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from qmp_sdei.errors import IncompatibleState, VmstateError
from qmp_sdei.vmstate import MAX_STATE_BYTES, PrivateBus, VmstateService
from qmp_sdei.vmstate import bus as bus_module
from qmp_sdei.vmstate.bus import escape_address_value
from qmp_sdei.vmstate.service import ERROR_LOAD_REFUSED, ERROR_SAVE_FAILED, INTERFACE, OBJECT_PATH
from support.sdei import PRIVATE, make, register

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="dbus-daemon not installed (Debian package dbus)"),
]

TIMEOUT = 30.0


@pytest_asyncio.fixture
async def bus(tmp_path: Path) -> AsyncIterator[PrivateBus]:
    async with PrivateBus(tmp_path / "bus") as private_bus:
        yield private_bus


@pytest_asyncio.fixture
async def qemu_side(bus: PrivateBus) -> AsyncIterator[MessageBus]:
    """A plain client on the bus, standing in for QEMU."""
    client = await MessageBus(bus_address=bus.address).connect()
    yield client
    client.disconnect()


async def call(
    client: MessageBus,
    destination: str,
    member: str,
    signature: str = "",
    *,
    body: list[Any] | None = None,
    interface: str = INTERFACE,
    path: str = OBJECT_PATH,
) -> Message:
    message = Message(
        destination=destination, path=path, interface=interface, member=member, signature=signature, body=body or []
    )
    reply = await asyncio.wait_for(client.call(message), TIMEOUT)
    assert reply is not None
    return reply


async def queued_owners(client: MessageBus) -> list[str]:
    reply = await call(client, "org.freedesktop.DBus", "ListQueuedOwners", "s", body=[INTERFACE],
                       interface="org.freedesktop.DBus", path="/org/freedesktop/DBus")  # fmt: skip
    if reply.error_name == "org.freedesktop.DBus.Error.NameHasNoOwner":
        return []
    assert reply.message_type is MessageType.METHOD_RETURN, reply.body
    owners: list[str] = reply.body[0]
    return owners


async def state_id(client: MessageBus, owner: str) -> str:
    reply = await call(client, owner, "Get", "ss", body=[INTERFACE, "Id"], interface="org.freedesktop.DBus.Properties")
    value: str = reply.body[0].value
    return value


async def test_save_and_load_carry_a_dispatcher_state(bus: PrivateBus, qemu_side: MessageBus) -> None:
    source = make()
    register(source, 0, PRIVATE)
    target = make()
    async with (
        VmstateService(bus.address, save=source.snapshot, load=lambda blob: None),
        VmstateService(bus.address, save=lambda: b"", load=target.restore, state_id="other"),
    ):
        owners = await queued_owners(qemu_side)
        assert len(owners) == 2  # both queued for the one name, as QEMU expects
        by_id = {await state_id(qemu_side, owner): owner for owner in owners}
        assert set(by_id) == {"sdei", "other"}
        saved = await call(qemu_side, by_id["sdei"], "Save")
        assert saved.message_type is MessageType.METHOD_RETURN
        blob = bytes(saved.body[0])
        assert blob == source.snapshot()
        loaded = await call(qemu_side, by_id["other"], "Load", "ay", body=[blob])
        assert loaded.message_type is MessageType.METHOD_RETURN, loaded.body
    assert target == source


async def test_async_callbacks_are_awaited(bus: PrivateBus, qemu_side: MessageBus) -> None:
    received: list[bytes] = []

    async def save() -> bytes:
        await asyncio.sleep(0)
        return b"state"

    async def load(blob: bytes) -> None:
        await asyncio.sleep(0)
        received.append(blob)

    async with VmstateService(bus.address, save=save, load=load) as service:
        (owner,) = await queued_owners(qemu_side)
        assert bytes((await call(qemu_side, owner, "Save")).body[0]) == b"state"
        await call(qemu_side, owner, "Load", "ay", body=[b"back"])
        assert received == [b"back"]
        assert (service.stats.saves, service.stats.loads, service.stats.last_load_bytes) == (1, 1, 4)


async def test_a_refused_load_is_a_dbus_error_and_changes_nothing(bus: PrivateBus, qemu_side: MessageBus) -> None:
    target = make()
    before = target.snapshot()
    incompatible = make(vcpus=3).snapshot()
    async with VmstateService(bus.address, save=target.snapshot, load=target.restore) as service:
        (owner,) = await queued_owners(qemu_side)
        reply = await call(qemu_side, owner, "Load", "ay", body=[incompatible])
        assert reply.message_type is MessageType.ERROR
        assert reply.error_name == ERROR_LOAD_REFUSED
        assert "for 3 vCPUs, this VM has 2" in reply.body[0]
        garbage = await call(qemu_side, owner, "Load", "ay", body=[b"not a state"])
        assert garbage.error_name == ERROR_LOAD_REFUSED
        assert service.stats.refused_loads == 2
        assert service.stats.loads == 0
        assert service.stats.last_error is not None and "truncated" in service.stats.last_error
    assert target.snapshot() == before


async def test_an_unexpected_load_failure_is_a_dbus_error_too(bus: PrivateBus, qemu_side: MessageBus) -> None:
    def broken(blob: bytes) -> None:
        raise RuntimeError("bug")

    async with VmstateService(bus.address, save=lambda: b"", load=broken):
        (owner,) = await queued_owners(qemu_side)
        reply = await call(qemu_side, owner, "Load", "ay", body=[b"x"])
        assert reply.error_name == ERROR_LOAD_REFUSED
        assert "RuntimeError: bug" in reply.body[0]


@pytest.mark.parametrize(
    ("save", "match"),
    [
        (lambda: b"x" * (MAX_STATE_BYTES + 1), "carries at most"),
        (lambda: "text", "not bytes"),
        (lambda: (_ for _ in ()).throw(IncompatibleState("nothing to save")), "nothing to save"),
    ],
)
async def test_a_failed_save_is_a_dbus_error(bus: PrivateBus, qemu_side: MessageBus, save: Any, match: str) -> None:
    async with VmstateService(bus.address, save=save, load=lambda blob: None) as service:
        (owner,) = await queued_owners(qemu_side)
        reply = await call(qemu_side, owner, "Save")
        assert reply.message_type is MessageType.ERROR
        assert reply.error_name == ERROR_SAVE_FAILED
        assert match in reply.body[0]
        assert service.stats.failed_saves == 1


async def test_a_state_of_exactly_the_limit_is_saved(bus: PrivateBus, qemu_side: MessageBus) -> None:
    async with VmstateService(bus.address, save=lambda: b"\x5a" * MAX_STATE_BYTES, load=lambda blob: None):
        (owner,) = await queued_owners(qemu_side)
        assert len((await call(qemu_side, owner, "Save")).body[0]) == MAX_STATE_BYTES


async def test_leaving_gives_up_the_name(bus: PrivateBus, qemu_side: MessageBus) -> None:
    service = VmstateService(bus.address, save=lambda: b"", load=lambda blob: None)
    await service.start()
    assert len(await queued_owners(qemu_side)) == 1
    await service.close()
    await service.close()  # idempotent
    assert await queued_owners(qemu_side) == []


async def test_an_unreachable_bus_is_a_clear_error(tmp_path: Path) -> None:
    service = VmstateService(f"unix:path={tmp_path}/nobody.sock", save=lambda: b"", load=lambda blob: None)
    with pytest.raises(VmstateError, match="cannot connect to the vmstate bus"):
        await service.start()


async def test_the_service_notices_the_bus_going_away(tmp_path: Path) -> None:
    private_bus = PrivateBus(tmp_path / "bus")
    await private_bus.start()
    try:
        async with VmstateService(private_bus.address, save=lambda: b"", load=lambda blob: None) as service:
            await private_bus.stop()
            await asyncio.wait_for(service.wait_closed(), TIMEOUT)
            assert not service.connected
    finally:
        await private_bus.stop()


async def test_private_bus_cleans_up_and_escapes_its_path(tmp_path: Path) -> None:
    directory = tmp_path / "a+b c"  # '+' and ' ' must be escaped in a D-Bus address
    async with PrivateBus(directory) as private_bus:
        assert escape_address_value(str(directory)) in private_bus.address
        assert private_bus.socket_path.exists()
        assert private_bus.running
        client = await MessageBus(bus_address=private_bus.address).connect()
        client.disconnect()
    assert not private_bus.running
    assert list(directory.iterdir()) == []
    with pytest.raises(VmstateError, match="not running"):
        _ = private_bus.address


async def test_private_bus_refuses_a_socket_path_too_long(tmp_path: Path) -> None:
    with pytest.raises(VmstateError, match="too long"):
        await PrivateBus(tmp_path / ("d" * 120)).start()


async def test_private_bus_reports_a_daemon_that_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus_module, "_config", lambda socket_path, users: "<busconfig><listen>")
    private_bus = PrivateBus(tmp_path / "bus")
    with pytest.raises(VmstateError, match=r"dbus-daemon failed to start: .+"):
        await private_bus.start()
    assert not private_bus.running


async def test_private_bus_refuses_what_is_in_the_way_of_its_socket(tmp_path: Path) -> None:
    (tmp_path / "bus" / "bus.sock").mkdir(parents=True)
    with pytest.raises(VmstateError, match="cannot remove"):
        await PrivateBus(tmp_path / "bus").start()


async def test_a_daemon_left_by_a_killed_sidecar_is_stopped_by_the_next_one(tmp_path: Path) -> None:
    """The daemon runs in its own session, so a SIGKILLed sidecar leaves it behind; its pid file
    lets the next sidecar on the same directory stop it before starting its own."""
    first = PrivateBus(tmp_path / "bus")
    await first.start()
    orphan = first._process
    assert orphan is not None and first.pid_path.read_text().strip() == str(orphan.pid)
    first._process = None  # forget it, as a killed sidecar would
    async with PrivateBus(tmp_path / "bus") as second:
        assert await asyncio.wait_for(orphan.wait(), TIMEOUT) is not None
        assert second.pid_path.read_text().strip() != str(orphan.pid)
    assert not (tmp_path / "bus" / "bus.pid").exists()


async def test_a_pid_file_naming_another_process_is_left_alone(tmp_path: Path) -> None:
    directory = tmp_path / "bus"
    directory.mkdir()
    sleeper = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        (directory / "bus.pid").write_text(f"{sleeper.pid}\n")
        async with PrivateBus(directory):
            assert sleeper.returncode is None
        (directory / "bus.pid").write_text("not a pid\n")
        async with PrivateBus(directory):
            pass
    finally:
        sleeper.kill()
        await sleeper.wait()
