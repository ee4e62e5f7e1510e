"""Live migration with the whole sidecar on both sides: SDEI state rides inside QEMU's stream.

Two real QEMUs on loopback, each with its own sidecar (and so its own private dbus-daemon and
VMState1 service); the bare-metal guest runs on the source with events registered and unmasked,
is migrated while it waits for a host event, and finishes its whole step table on the destination
with the event raised through the destination sidecar's control socket. When the migration fails
(the destination refuses the state, has no sidecar, or is SIGKILLed while RAM moves or at the
pre-switchover pause) the source guest finishes its step table there, with its SDEI state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from integration.test_baremetal_guest import HOST_EVENTS, check_all_steps
from qmp_sdei.config import parse
from qmp_sdei.control.local import LocalControlClient, socket_path
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.statefile import StateStore
from support.guests import config_doc, elf_symbols, free_port
from support.sidecar import RunningSidecar, to_toml, until

pytestmark = [pytest.mark.qemu, pytest.mark.guest, pytest.mark.asyncio]

TIMEOUT = 60.0
NAME = "sidecar-conduit-test"  # the name config_doc and the step table expect


@contextlib.asynccontextmanager
async def vm(workdir: Path, elf: Path, *extra: str) -> AsyncIterator[QemuProcess]:
    process = QemuProcess(QemuSpec(smp=2, kernel=elf, paused=True, name=NAME, extra_args=extra), workdir)
    try:
        await asyncio.wait_for(process.start(), TIMEOUT)
        yield process
    finally:
        await process.stop()


async def request(state_dir: Path, doc: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
    async with LocalControlClient(socket_path(state_dir), timeout=timeout) as client:
        return await client.request(doc, timeout=timeout)


async def sidecar_ready(running: RunningSidecar) -> None:
    sidecar = await running.ready()
    assert sidecar.migration is not None
    await until(sidecar.migration.ready.wait(), running.task, TIMEOUT, "migration support")


#: a sidecar config for one side: (its QEMU, its state dir) -> the config document
ConfigFor = Callable[[QemuProcess, Path], dict[str, Any]]


@dataclass
class MigrationPair:
    """A source and a ``-incoming`` destination QEMU on loopback, each with its sidecar (the
    destination's may be left out), both ready for a migration."""

    src: QemuProcess
    dst: QemuProcess
    uri: str
    src_state: Path
    dst_state: Path
    source_doc: dict[str, Any]
    source: RunningSidecar
    destination: RunningSidecar | None
    harness: Any = None  # a qemu.qmp client on the source's other monitor, if asked for

    async def guest_waits_for_its_first_event(self) -> str:
        """Wait until the source guest registered, unmasked and waits for its first host event
        (the moment to migrate it); that event's tag."""
        first, (event, _) = next(iter(HOST_EVENTS.items()))
        await self.src.wait_for_console(rf"WAIT {first} {event}\r?\n", TIMEOUT)
        return first

    async def guest_finishes_on_the_destination(self, first: str, elf: Path) -> None:
        """Raise every host event from ``first`` on through the destination's sidecar: the guest
        finishes its step table there, and the source ran no step after ``first``."""
        for tag, (event, vcpu) in HOST_EVENTS.items():
            if tag != first:
                await self.dst.wait_for_console(rf"WAIT {tag} {event}\r?\n", TIMEOUT)
            reply = await request(self.dst_state, {"v": 1, "command": "raise", "event": event, "vcpu": vcpu})
            assert reply["ok"], reply
            assert reply["result"]["result"] == "delivered" or reply["result"].get("code") == "busy", reply
        await self.dst.wait_for_console(r"DONE\r?\n", TIMEOUT)
        check_all_steps(self.src.console + self.dst.console, elf_symbols(elf))
        assert "WAIT" not in self.src.console.split(f"WAIT {first}")[1], "the source ran on after the migration"


@contextlib.asynccontextmanager
async def migration_pair(
    tmp_path: Path,
    elf: Path,
    *,
    source_config: ConfigFor | None = None,
    destination_config: ConfigFor | None = None,
    destination_sidecar: bool = True,
    harness: str | None = None,
    show_stderr: bool = False,
) -> AsyncIterator[MigrationPair]:
    """Two QEMUs and their sidecars (``config_doc`` unless given; the destination's config
    defaults to the source's recipe), all stopped afterwards; ``show_stderr`` prints both QEMUs'
    stderr tails at the end, for a failure's report.

    ``harness``: also connect a client of that name to the source's other monitor, before the
    sidecars start: once the conduit runs the guest, QEMU sends STOP/RESUME events all the time,
    and one that slips in ahead of the capabilities reply fails qemu.qmp's negotiation.
    """
    port = free_port()
    source_config = source_config or (lambda qemu, state: config_doc(qemu, state, elf, start_vm=True))
    destination_config = destination_config or source_config
    async with (
        vm(tmp_path / "src", elf) as src,
        vm(tmp_path / "dst", elf, "-incoming", f"tcp:127.0.0.1:{port}") as dst,
    ):
        src_state, dst_state = tmp_path / "src-state", tmp_path / "dst-state"
        client = await src.connect_harness(TIMEOUT, harness) if harness is not None else None
        source_doc = source_config(src, src_state)
        source = RunningSidecar(parse(source_doc))
        destination = RunningSidecar(parse(destination_config(dst, dst_state))) if destination_sidecar else None
        sidecars = [running for running in (source, destination) if running is not None]
        try:
            for running in sidecars:
                await sidecar_ready(running)
            uri = f"tcp:127.0.0.1:{port}"
            yield MigrationPair(src, dst, uri, src_state, dst_state, source_doc, source, destination, client)
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.disconnect()
            if show_stderr:
                print("---- source stderr\n" + src.stderr[-2000:] + "\n---- destination stderr\n" + dst.stderr[-2000:])
            for running in sidecars:
                if not running.task.done():
                    with contextlib.suppress(Exception):
                        await running.stop()


async def test_guest_migrates_with_its_sdei_state_and_finishes_on_the_destination(
    tmp_path: Path, guest_elf: Path
) -> None:
    async with migration_pair(tmp_path, guest_elf, show_stderr=True) as pair:
        src_state, dst_state = pair.src_state, pair.dst_state
        assert pair.destination is not None and pair.destination.sidecar.migration is not None
        assert pair.destination.sidecar.migration.incoming

        # The guest registers, unmasks and waits for its first host event: migrate it now.
        first = await pair.guest_waits_for_its_first_event()
        code, report = await migrate_cli(tmp_path, pair)
        assert code == 0, report
        assert report["outcome"] == "completed", report
        assert [p["phase"] for p in report["phases"]][-1] == "completed"
        assert report["downtime_ms"] is not None
        assert report["connection"] == "tcp-nodelay"  # the stream ran on a socket the sidecar connected

        # The destination took the source's versions and registrations with the state.
        status = (await request(dst_state, {"v": 1, "command": "status"}))["result"]
        assert status["pins"] == {"sdei": "1.1", "sdei_vendor": 0, "psci": "1.0"}
        assert status["migration"]["state_received"] is True
        assert status["registered"]["private"]["0"] == [0, 1000, 1001], status["registered"]
        assert not status["vcpu_state"][0]["masked"]

        await pair.guest_finishes_on_the_destination(first, guest_elf)
        source_status = (await request(src_state, {"v": 1, "command": "status"}))["result"]
        assert source_status["migration"]["migrations_out"] == 1
        assert source_status["vm"]["runstate"] in ("postmigrate", "finish-migrate", "debug", "paused"), source_status[
            "vm"
        ]
        # status.json, what `qmp-sdei status` reads, follows: written shortly after the migration's
        # events rather than inside its downtime.
        await asyncio.wait_for(pair.source.sidecar.status_settled(), TIMEOUT)
        assert StateStore(src_state).read_status()["migration"]["migrations_out"] == 1


async def migrate_cli(tmp_path: Path, pair: MigrationPair, *options: str) -> tuple[int, dict[str, Any]]:
    """``qmp-sdei migrate --config SOURCE.toml --uri ... --json [options]``: its exit code and report."""
    config_file = tmp_path / "src.toml"
    config_file.write_text(to_toml(pair.source_doc))
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "qmp_sdei", "migrate", "--config", str(config_file), "--uri", pair.uri, "--json",
         *options],
        capture_output=True, text=True, timeout=TIMEOUT * 2,
    )  # fmt: skip
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {"stderr": result.stderr}


async def source_keeps_serving(src: QemuProcess, src_state: Path, guest_elf: Path) -> None:
    """The migration failed: the source guest runs on, with its SDEI state, to the end of its steps."""
    for tag, (event, vcpu) in HOST_EVENTS.items():
        await src.wait_for_console(rf"WAIT {tag} {event}\r?\n", TIMEOUT)
        reply = await request(src_state, {"v": 1, "command": "raise", "event": event, "vcpu": vcpu})
        assert reply["result"]["result"] == "delivered" or reply["result"].get("code") == "busy", reply
    await src.wait_for_console(r"DONE\r?\n", TIMEOUT)
    check_all_steps(src.console, elf_symbols(guest_elf))


async def test_a_destination_that_refuses_the_state_fails_the_migration_and_the_source_runs_on(
    tmp_path: Path, guest_elf: Path
) -> None:
    """The destination's catalogue differs (one more event): its Load refuses, QEMU fails the stream."""

    def other_catalogue(qemu: QemuProcess, state: Path) -> dict[str, Any]:
        doc = config_doc(qemu, state, guest_elf, start_vm=True)
        doc["sdei"]["events"].append({"number": 3000})
        return doc

    async with migration_pair(tmp_path, guest_elf, destination_config=other_catalogue) as pair:
        await pair.guest_waits_for_its_first_event()
        code, report = await migrate_cli(tmp_path, pair)
        assert code == 1 and report["outcome"] == "failed", report
        assert await pair.dst.wait(TIMEOUT) != 0  # QEMU exits when it cannot load the stream
        status = (await request(pair.src_state, {"v": 1, "command": "status"}))["result"]
        assert status["migration"]["last_outcome"] == "failed"
        await source_keeps_serving(pair.src, pair.src_state, guest_elf)


async def test_a_destination_without_a_sidecar_fails_the_migration_cleanly(tmp_path: Path, guest_elf: Path) -> None:
    async with migration_pair(tmp_path, guest_elf, destination_sidecar=False) as pair:
        await pair.guest_waits_for_its_first_event()
        code, report = await migrate_cli(tmp_path, pair)
        assert code == 1 and report["outcome"] == "failed", report
        assert await pair.dst.wait(TIMEOUT) != 0
        await source_keeps_serving(pair.src, pair.src_state, guest_elf)


async def kill_destination_and_check_the_source(tmp_path: Path, guest_elf: Path, *, when: str) -> None:
    """Migrate with ``qmp-sdei migrate`` and SIGKILL the destination QEMU at ``when`` (``active``:
    while RAM moves, slowed down to take seconds; ``pre-switchover``: inside the source sidecar's
    pause, before it decides). The source guest then finishes its step table with its SDEI state."""
    async with migration_pair(tmp_path, guest_elf, harness="kill-destination-harness") as pair:
        src, dst, harness = pair.src, pair.dst, pair.harness
        await pair.guest_waits_for_its_first_event()
        killed = asyncio.get_running_loop().create_future()

        async def kill() -> None:
            dst.kill()
            await dst.wait(TIMEOUT)
            if not killed.done():
                killed.set_result(None)

        if when == "active":
            await harness.execute("migrate-set-parameters", {"max-bandwidth": 100_000})

            async def on_event(status: str) -> None:
                if status == "active" and not killed.done():
                    await kill()

            watcher = asyncio.create_task(follow_migration(harness, on_event))
        else:
            assert pair.source.sidecar.migration is not None
            pair.source.sidecar.migration.before_switchover = kill
            watcher = None
        code, report = await migrate_cli(tmp_path, pair)
        assert killed.done(), report
        assert code == 1 and report["outcome"] == "failed", report
        if watcher is not None:
            watcher.cancel()
        await source_keeps_serving(src, pair.src_state, guest_elf)
        assert dst.process is not None and dst.process.returncode == -9
        assert "abort" not in src.stderr.lower() and "fatal" not in src.stderr.lower(), src.stderr


async def follow_migration(harness: Any, on_status: Callable[[str], Awaitable[None]]) -> None:
    """Call ``on_status`` with every MIGRATION status QEMU reports on the harness monitor."""
    with harness.listener("MIGRATION") as listener:
        async for event in listener:
            await on_status(str(event["data"]["status"]))


async def test_destination_killed_while_ram_moves_the_source_finishes_its_steps(
    tmp_path: Path, guest_elf: Path
) -> None:
    await kill_destination_and_check_the_source(tmp_path, guest_elf, when="active")


async def test_destination_killed_at_pre_switchover_the_source_finishes_its_steps(
    tmp_path: Path, guest_elf: Path
) -> None:
    await kill_destination_and_check_the_source(tmp_path, guest_elf, when="pre-switchover")
