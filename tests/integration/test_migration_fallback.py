"""Live migration without dbus-vmstate: the SDEI state travels over the control API at the switchover.

``[migration] transport = "control"`` forces the fallback on a QEMU that has dbus-vmstate (7.2 and
10.0 here both do), so the same real QEMUs serve both paths. At the source's pre-switchover pause
its sidecar sends the state to the destination sidecar (its local socket, or its MQTT ``incoming``
topic on a real mosquitto), which validates and adopts it, and only then continues; a refusal, an
unreachable destination sidecar or one that never answers cancels the migration, and the source
guest runs on with its state.

Guests: the bare-metal step-table guest (registrations, masks and host events, finishing its steps on
the destination) and the call-forever guest of ``test_migration_failures`` (registrations, unmask,
a pending event, a handler entered after the migration).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.test_migration_failures import (  # noqa: F401 (forever_elf is a fixture)
    TIMEOUT,
    Vm,
    arrived,
    assert_state_whole,
    config_doc,
    forever_elf,
    guest_ready,
    guest_spec,
    harness_migrate,
    migration_ready,
    vms,
)
from integration.test_sidecar_migration import migrate_cli, migration_pair, request, source_keeps_serving
from qmp_sdei.config import parse
from qmp_sdei.control.local import socket_path
from qmp_sdei.errors import ConfigError, MigrationError
from qmp_sdei.migration import UNSAFE_SWITCHOVER
from qmp_sdei.qemu import migration as qmig
from qmp_sdei.qemu.launch import QemuProcess
from support.guests import config_doc as baremetal_config
from support.guests import free_port
from support.mosquitto import Mosquitto, requires_mosquitto, running_mosquitto
from support.sidecar import RunningSidecar

pytestmark = [pytest.mark.qemu, pytest.mark.guest, pytest.mark.asyncio]

#: About 50 SDEI calls per second: few switchovers land on a breakpoint (those are cancelled and
#: retried by the same code as on the in-band path, covered in test_migration_failures).
PERIOD_US = 20_000


def with_fallback(doc: dict[str, Any], **migration: Any) -> dict[str, Any]:
    doc["migration"] = {"transport": "control", **migration}
    return doc


def start_sidecar(target: Vm, elf: Path, *, mqtt: str | None = None, **migration: Any) -> RunningSidecar:
    doc = with_fallback(config_doc(target.qemu, target.state_dir, elf), **migration)
    if mqtt is not None:
        doc["mqtt"] = {"url": mqtt}
    target.sidecar = RunningSidecar(parse(doc))
    return target.sidecar


async def start_source(tmp_path: Path, elf: Path, started: list[Vm], **migration: Any) -> Vm:
    """A source guest with its state in place (1000 and 1001 registered, unmasked, 1001 pending)."""
    src = Vm(tmp_path / "src", guest_spec(elf, period_us=PERIOD_US))
    started.append(src)
    await src.start()
    mqtt = migration.pop("mqtt", None)
    migration.setdefault("peer", "unix:/nonexistent/control.sock")  # each attempt names its own
    await migration_ready(start_sidecar(src, elf, mqtt=mqtt, **migration))
    await guest_ready(src)
    return src


def source_migration(target: Vm) -> Any:
    assert target.sidecar is not None and target.sidecar.sidecar.migration is not None
    return target.sidecar.sidecar.migration


async def migrate_to_fresh_destinations(
    src: Vm, tmp_path: Path, elf: Path, started: list[Vm], prepare: Callable[[Vm], Awaitable[str | None]]
) -> tuple[Vm, str]:
    """Third-party migrations to fresh destinations until one is not cancelled as unsafe (the
    source found the VM at one of its breakpoints: the same on both paths, covered by
    test_migration_failures; such an attempt is made again with a new destination).

    ``prepare(dst)`` sets the destination up (its sidecar, if any) and names the peer for the
    source (``None``: the source's ``migration.peer``). Returns the destination and the outcome.
    """
    migration = source_migration(src)
    for attempt in range(10):
        port = free_port()
        spec = guest_spec(elf, "-incoming", f"tcp:127.0.0.1:{port}", period_us=PERIOD_US)
        dst = Vm(tmp_path / f"dst{attempt}", spec)
        started.append(dst)
        await dst.start()
        peer = await prepare(dst)
        migration.use_peer(peer)
        migration.last_outcome = None
        outcome = await harness_migrate(src, f"tcp:127.0.0.1:{port}")
        await migration.wait_for_outcome({"cancelled", "failed", "completed"}, TIMEOUT)
        if outcome == "cancelled" and UNSAFE_SWITCHOVER in (migration.status()["last_cancel_reason"] or ""):
            await dst.qemu.wait(TIMEOUT)
            await dst.stop()
            continue
        return dst, outcome
    raise AssertionError("10 switchovers in a row found the VM at a breakpoint")


# -- it works ------------------------------------------------------------------------------------------


async def test_the_bare_metal_guest_migrates_over_the_local_socket_and_finishes_there(
    tmp_path: Path, guest_elf: Path
) -> None:
    """``qmp-sdei migrate --peer unix:...``: the destination takes the state over its control socket."""

    def fallback(qemu: QemuProcess, state: Path) -> dict[str, Any]:
        return with_fallback(baremetal_config(qemu, state, guest_elf, start_vm=True))

    async with migration_pair(
        tmp_path, guest_elf, source_config=fallback, harness="fallback-harness", show_stderr=True
    ) as pair:
        src_state, dst_state = pair.src_state, pair.dst_state
        assert pair.destination is not None and pair.destination.sidecar.migration is not None
        assert pair.destination.sidecar.migration.incoming
        # The fallback adds no dbus-vmstate object to QEMU.
        assert await qmig.dbus_vmstate_objects(_Harness(pair.harness)) == []

        first = await pair.guest_waits_for_its_first_event()
        before = (await request(src_state, {"v": 1, "command": "status"}))["result"]
        code, report = await migrate_cli(tmp_path, pair, "--peer", f"unix:{socket_path(dst_state)}")
        assert code == 0, report
        assert report["outcome"] == "completed", report
        await pair.destination.conduit_attached()  # it arms once the guest has arrived

        status = (await request(dst_state, {"v": 1, "command": "status"}))["result"]
        assert status["migration"]["transport"] == "control"
        assert status["migration"]["state_received"] is True
        assert status["pins"] == {"sdei": "1.1", "sdei_vendor": 0, "psci": "1.0"}
        # What the source kept is what it sent (the guest may have moved on since, there).
        kept = (await request(src_state, {"v": 1, "command": "status"}))["result"]
        assert status["registered"] == kept["registered"] == before["registered"]
        assert [v["masked"] for v in status["vcpu_state"]] == [v["masked"] for v in kept["vcpu_state"]]
        assert status["sdei"]["pending"] == kept["sdei"]["pending"]
        src_status = (await request(src_state, {"v": 1, "command": "status"}))["result"]["migration"]
        assert src_status["states_sent"] == 1 and src_status["migrations_out"] == 1, src_status
        assert src_status["last_state_ms"] is not None

        await pair.guest_finishes_on_the_destination(first, guest_elf)


class _Harness:
    """Just enough of a QmpSession over the harness monitor for the qemu.migration helpers."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.client.execute(command, arguments)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path / "broker") as running:
        yield running


@requires_mosquitto
async def test_a_third_party_migration_carries_the_state_over_mqtt(
    tmp_path: Path,
    forever_elf: Path,  # noqa: F811
    broker: Mosquitto,
) -> None:
    """Both sidecars on one broker; the migration is started on QEMU's other monitor (as libvirt
    would); the destination takes the state on its ``incoming`` topic."""
    async with vms() as started:
        src = await start_source(tmp_path, forever_elf, started, peer="mqtt", mqtt=broker.url)

        async def destination_on_the_broker(dst: Vm) -> str | None:
            sidecar = await migration_ready(start_sidecar(dst, forever_elf, mqtt=broker.url))
            await wait_for(lambda: sidecar.incoming_listener is not None, "the incoming listener")
            await asyncio.wait_for(sidecar.incoming_listener.ready.wait(), TIMEOUT)
            return None  # the source's migration.peer: "mqtt"

        dst, outcome = await migrate_to_fresh_destinations(
            src, tmp_path, forever_elf, started, destination_on_the_broker
        )
        assert outcome == "completed", source_migration(src).status()
        await arrived(dst)
        listener = dst.sidecar.sidecar.incoming_listener  # type: ignore[union-attr]
        assert listener.requests == 1
        dst_migration = source_migration(dst)
        assert dst_migration.loaded is not None and dst_migration.loaded.source_running
        assert source_migration(src).counters.states_sent == 1
        await assert_state_whole(dst)


async def wait_for(predicate: Any, what: str) -> None:
    async def poll() -> None:
        while not predicate():  # noqa: ASYNC110 (the sidecar builds it in its own task; no event for it)
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"no {what} within {TIMEOUT}s") from None


# -- it fails, and the source runs on --------------------------------------------------------------
#
# The bare-metal guest, migrated while it spins waiting for a host event: it makes no SDEI call
# then, so the switchover is always safe and each case reaches the hand-over (a switchover at one
# of the conduit's breakpoints is cancelled before it, on both paths; on QEMU 10 such a cancel can
# abort the source QEMU, see docs/migration.md).


async def cancel_at_the_hand_over(
    tmp_path: Path,
    elf: Path,
    *,
    peer: Callable[[Path], str],
    destination: Callable[[QemuProcess, Path], dict[str, Any]] | None = None,
    **migration: Any,
) -> tuple[dict[str, Any], Any]:
    """Migrate with ``peer(destination state dir)``; the switchover must be cancelled, the
    destination QEMU exit, and the source guest keep its state and finish its steps. Returns the
    migration report and the source's migration agent."""

    def source(qemu: QemuProcess, state: Path) -> dict[str, Any]:
        return with_fallback(baremetal_config(qemu, state, elf, start_vm=True), **migration)

    async with migration_pair(
        tmp_path, elf, source_config=source, destination_config=destination, destination_sidecar=destination is not None
    ) as pair:
        src, src_state = pair.src, pair.src_state
        await pair.guest_waits_for_its_first_event()
        before = (await request(src_state, {"v": 1, "command": "status"}))["result"]
        agent = pair.source.sidecar.migration
        assert agent is not None
        report = (await agent.migrate(pair.uri, peer=peer(pair.dst_state))).to_dict()
        assert report["outcome"] == "cancelled", report
        assert await pair.dst.wait(TIMEOUT) != 0  # QEMU's destination exits on a cancelled stream
        after = (await request(src_state, {"v": 1, "command": "status"}))["result"]
        assert after["migration"]["last_outcome"] == "cancelled"
        assert after["registered"] == before["registered"]
        assert [v["masked"] for v in after["vcpu_state"]] == [v["masked"] for v in before["vcpu_state"]]
        await source_keeps_serving(src, src_state, elf)
        assert "abort" not in src.stderr.lower(), src.stderr
        return report, agent


async def test_a_destination_that_refuses_the_state_makes_the_source_cancel(tmp_path: Path, guest_elf: Path) -> None:
    """The destination's catalogue has one more event: it refuses as Load would; nothing migrates."""

    def other_catalogue(dst: QemuProcess, state: Path) -> dict[str, Any]:
        doc = with_fallback(baremetal_config(dst, state, guest_elf, start_vm=True))
        doc["sdei"]["events"].append({"number": 3000})
        return doc

    report, agent = await cancel_at_the_hand_over(
        tmp_path, guest_elf, peer=lambda state: f"unix:{socket_path(state)}", destination=other_catalogue
    )
    assert "refused the SDEI state" in report["error"], report
    assert "catalogue" in report["error"] or "event" in report["error"], report
    assert agent.counters.states_refused == 1 and agent.counters.states_sent == 0


async def test_an_unreachable_destination_sidecar_makes_the_source_cancel(tmp_path: Path, guest_elf: Path) -> None:
    """No sidecar listens at the peer: the switchover is cancelled at once, not after a timeout."""
    report, agent = await cancel_at_the_hand_over(
        tmp_path, guest_elf, peer=lambda state: f"unix:{socket_path(state)}", peer_timeout=30.0
    )
    assert "unreachable" in report["error"], report
    assert agent.counters.state_sends_failed == 1
    assert report["downtime_ms"] is None or report["downtime_ms"] < 10_000, report


async def test_a_destination_sidecar_that_never_answers_makes_the_source_cancel(
    tmp_path: Path, guest_elf: Path
) -> None:
    """Something listens at the peer and reads the state but never acknowledges it: after
    ``peer_timeout`` the source cancels."""
    silent = tmp_path / "silent.sock"
    received = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(65536):
            received.set()

    server = await asyncio.start_unix_server(swallow, path=str(silent))
    try:
        report, agent = await cancel_at_the_hand_over(
            tmp_path, guest_elf, peer=lambda state: f"unix:{silent}", peer_timeout=1.0
        )
        assert received.is_set()
        assert "within 1s" in report["error"], report
        assert agent.counters.state_sends_failed == 1
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_destination_that_gets_no_state_keeps_the_guest_stopped(
    tmp_path: Path,
    forever_elf: Path,  # noqa: F811
) -> None:
    """A source without a sidecar migrates the VM; the destination sidecar (control transport, so
    QEMU itself cannot refuse the stream) never got the SDEI state: the guest does not run there."""
    async with vms() as started:
        src = Vm(tmp_path / "src", guest_spec(forever_elf, period_us=PERIOD_US))
        started.append(src)
        await src.start()
        assert src.harness is not None
        await src.harness.execute("cont")  # it runs, its SDEI calls unanswered
        capabilities = [{"capability": c, "state": True} for c in ("events", "return-path")]
        await src.harness.execute("migrate-set-capabilities", {"capabilities": capabilities})
        port = free_port()
        dst = Vm(tmp_path / "dst", guest_spec(forever_elf, "-incoming", f"tcp:127.0.0.1:{port}", period_us=PERIOD_US))
        started.append(dst)
        await dst.start()
        await migration_ready(start_sidecar(dst, forever_elf))
        assert await harness_migrate(src, f"tcp:127.0.0.1:{port}") == "completed"
        assert await source_migration(dst).wait_for_outcome({"no-state", "completed", "failed"}, TIMEOUT) == "no-state"
        assert not source_migration(dst).arrived.is_set()
        assert dst.harness is not None
        status = await dst.harness.execute("query-status")
        assert status["status"] != "running", status
        console = dst.qemu.console
        assert "TICK" not in console, "the guest ran on the destination without its SDEI state"


async def test_auto_picks_dbus_vmstate_and_control_removes_a_stale_object(
    tmp_path: Path,
    forever_elf: Path,  # noqa: F811
) -> None:
    """``auto`` on a QEMU with the type uses the in-band path; a later sidecar forced to ``control``
    removes the dbus-vmstate object the first one left (it would fail every migration)."""
    async with vms() as started:
        target = Vm(tmp_path / "vm", guest_spec(forever_elf, period_us=PERIOD_US))
        started.append(target)
        await target.start()
        doc = config_doc(target.qemu, target.state_dir, forever_elf)
        target.sidecar = RunningSidecar(parse(doc))
        sidecar = await migration_ready(target.sidecar)
        assert sidecar.migration is not None and sidecar.migration.transport == "dbus-vmstate"
        harness = _Harness(target.harness)
        assert await qmig.dbus_vmstate_objects(harness) == [qmig.DEFAULT_VMSTATE_OBJECT]
        await target.sidecar.stop()
        assert await qmig.dbus_vmstate_objects(harness) == [qmig.DEFAULT_VMSTATE_OBJECT]

        sidecar = await migration_ready(start_sidecar(target, forever_elf))
        assert sidecar.migration is not None and sidecar.migration.transport == "control"
        assert await qmig.dbus_vmstate_objects(harness) == []
        assert sidecar.status()["migration"]["transport"] == "control"
        # With no peer known, a migration is refused before it starts, and so is a bad peer.
        with pytest.raises(MigrationError, match="name the destination sidecar with a peer"):
            await sidecar.migration.migrate("tcp:127.0.0.1:9")
        with pytest.raises(ConfigError, match="peer: 'here' is not unix:/ABSOLUTE/PATH"):
            await sidecar.migration.migrate("tcp:127.0.0.1:9", peer="here")
        assert (await target.harness.execute("query-migrate")).get("status", "none") == "none"


@pytest.mark.parametrize("nodelay", [True, False], ids=["our-connection", "qemu-connection"])
async def test_a_destination_nobody_listens_at_fails_the_migration_and_the_guest_runs_on(
    tmp_path: Path,
    forever_elf: Path,  # noqa: F811
    nodelay: bool,
) -> None:
    """With ``tcp_nodelay`` the sidecar connects to the destination itself: nobody listening there
    fails the migration before QEMU starts one, and says why. Without, QEMU's own connection fails
    it. Either way the guest runs on with its state."""
    async with vms() as started:
        target = Vm(tmp_path / "vm", guest_spec(forever_elf))
        started.append(target)
        await target.start()
        doc = config_doc(target.qemu, target.state_dir, forever_elf)
        doc["migration"] = {"tcp_nodelay": nodelay}
        target.sidecar = RunningSidecar(parse(doc))
        sidecar = await migration_ready(target.sidecar)
        await guest_ready(target)
        assert sidecar.migration is not None
        report = await sidecar.migration.migrate(f"tcp:127.0.0.1:{free_port()}", timeout=TIMEOUT)
        assert report.outcome == "failed", report
        assert target.harness is not None
        status = (await target.harness.execute("query-migrate")).get("status", "none")
        if nodelay:
            assert report.error is not None and "cannot connect to the migration destination" in report.error
            assert report.connection is None
            assert status == "none"
        else:
            assert report.connection == "qemu"
            assert status == "failed"
        await assert_state_whole(target)
