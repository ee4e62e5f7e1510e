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
from pathlib import Path
from typing import Any

import pytest

from integration.test_baremetal_guest import HOST_EVENTS, check_all_steps
from qmp_sdei.config import parse
from qmp_sdei.control.local import LocalControlClient, socket_path
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
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


async def test_guest_migrates_with_its_sdei_state_and_finishes_on_the_destination(
    tmp_path: Path, guest_elf: Path
) -> None:
    port = free_port()
    tags = list(HOST_EVENTS)
    async with (
        vm(tmp_path / "src", guest_elf) as src,
        vm(tmp_path / "dst", guest_elf, "-incoming", f"tcp:127.0.0.1:{port}") as dst,
    ):
        src_state, dst_state = tmp_path / "src-state", tmp_path / "dst-state"
        source = RunningSidecar(parse(config_doc(src, src_state, guest_elf, start_vm=True)))
        destination = RunningSidecar(parse(config_doc(dst, dst_state, guest_elf, start_vm=True)))
        try:
            await sidecar_ready(source)
            await sidecar_ready(destination)
            assert destination.sidecar.migration is not None and destination.sidecar.migration.incoming

            # The guest registers, unmasks and waits for its first host event: migrate it now.
            first = tags[0]
            event, vcpu = HOST_EVENTS[first]
            await src.wait_for_console(rf"WAIT {first} {event}\r?\n", TIMEOUT)
            config_file = tmp_path / "src.toml"
            config_file.write_text(to_toml(config_doc(src, src_state, guest_elf, start_vm=True)))
            result = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "qmp_sdei", "migrate", "--config", str(config_file),
                 "--uri", f"tcp:127.0.0.1:{port}", "--json"],
                capture_output=True, text=True, timeout=TIMEOUT * 2,
            )  # fmt: skip
            assert result.returncode == 0, (result.stdout, result.stderr)
            report = json.loads(result.stdout)
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

            # Every later host event is raised on the destination; the guest finishes there.
            for tag in tags:
                event, vcpu = HOST_EVENTS[tag]
                if tag != first:
                    await dst.wait_for_console(rf"WAIT {tag} {event}\r?\n", TIMEOUT)
                reply = await request(dst_state, {"v": 1, "command": "raise", "event": event, "vcpu": vcpu})
                assert reply["ok"], reply
                assert reply["result"]["result"] == "delivered" or reply["result"].get("code") == "busy", reply
            await dst.wait_for_console(r"DONE\r?\n", TIMEOUT)
            check_all_steps(src.console + dst.console, elf_symbols(guest_elf))
            assert "WAIT" not in src.console.split(f"WAIT {first}")[1], "the source ran on after the migration"
            source_status = (await request(src_state, {"v": 1, "command": "status"}))["result"]
            assert source_status["migration"]["migrations_out"] == 1
            assert source_status["vm"]["runstate"] in ("postmigrate", "finish-migrate", "debug", "paused"), (
                source_status["vm"]
            )
        finally:
            print("---- source stderr\n" + src.stderr[-2000:] + "\n---- destination stderr\n" + dst.stderr[-2000:])
            for running in (source, destination):
                if not running.task.done():
                    with contextlib.suppress(Exception):
                        await running.stop()


async def migrate_cli(
    tmp_path: Path, src: QemuProcess, src_state: Path, elf: Path, uri: str
) -> tuple[int, dict[str, Any]]:
    config_file = tmp_path / "src.toml"
    config_file.write_text(to_toml(config_doc(src, src_state, elf, start_vm=True)))
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "qmp_sdei", "migrate", "--config", str(config_file), "--uri", uri, "--json"],
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
    port = free_port()
    async with (
        vm(tmp_path / "src", guest_elf) as src,
        vm(tmp_path / "dst", guest_elf, "-incoming", f"tcp:127.0.0.1:{port}") as dst,
    ):
        src_state, dst_state = tmp_path / "src-state", tmp_path / "dst-state"
        other = config_doc(dst, dst_state, guest_elf, start_vm=True)
        other["sdei"]["events"].append({"number": 3000})
        source = RunningSidecar(parse(config_doc(src, src_state, guest_elf, start_vm=True)))
        destination = RunningSidecar(parse(other))
        try:
            await sidecar_ready(source)
            await sidecar_ready(destination)
            first, (event, _) = next(iter(HOST_EVENTS.items()))
            await src.wait_for_console(rf"WAIT {first} {event}\r?\n", TIMEOUT)
            code, report = await migrate_cli(tmp_path, src, src_state, guest_elf, f"tcp:127.0.0.1:{port}")
            assert code == 1 and report["outcome"] == "failed", report
            assert await dst.wait(TIMEOUT) != 0  # QEMU exits when it cannot load the stream
            status = (await request(src_state, {"v": 1, "command": "status"}))["result"]
            assert status["migration"]["last_outcome"] == "failed"
            await source_keeps_serving(src, src_state, guest_elf)
        finally:
            for running in (source, destination):
                if not running.task.done():
                    with contextlib.suppress(Exception):
                        await running.stop()


async def test_a_destination_without_a_sidecar_fails_the_migration_cleanly(tmp_path: Path, guest_elf: Path) -> None:
    port = free_port()
    async with (
        vm(tmp_path / "src", guest_elf) as src,
        vm(tmp_path / "dst", guest_elf, "-incoming", f"tcp:127.0.0.1:{port}") as dst,
    ):
        src_state = tmp_path / "src-state"
        source = RunningSidecar(parse(config_doc(src, src_state, guest_elf, start_vm=True)))
        try:
            await sidecar_ready(source)
            first, (event, _) = next(iter(HOST_EVENTS.items()))
            await src.wait_for_console(rf"WAIT {first} {event}\r?\n", TIMEOUT)
            code, report = await migrate_cli(tmp_path, src, src_state, guest_elf, f"tcp:127.0.0.1:{port}")
            assert code == 1 and report["outcome"] == "failed", report
            assert await dst.wait(TIMEOUT) != 0
            await source_keeps_serving(src, src_state, guest_elf)
        finally:
            if not source.task.done():
                await source.stop()


async def kill_destination_and_check_the_source(tmp_path: Path, guest_elf: Path, *, when: str) -> None:
    """Migrate with ``qmp-sdei migrate`` and SIGKILL the destination QEMU at ``when`` (``active``:
    while RAM moves, slowed down to take seconds; ``pre-switchover``: inside the source sidecar's
    pause, before it decides). The source guest then finishes its step table with its SDEI state."""
    port = free_port()
    async with (
        vm(tmp_path / "src", guest_elf) as src,
        vm(tmp_path / "dst", guest_elf, "-incoming", f"tcp:127.0.0.1:{port}") as dst,
    ):
        src_state, dst_state = tmp_path / "src-state", tmp_path / "dst-state"
        source = RunningSidecar(parse(config_doc(src, src_state, guest_elf, start_vm=True)))
        destination = RunningSidecar(parse(config_doc(dst, dst_state, guest_elf, start_vm=True)))
        harness = await src.connect_harness(TIMEOUT, "kill-destination-harness")
        try:
            await sidecar_ready(source)
            await sidecar_ready(destination)
            first, (event, _) = next(iter(HOST_EVENTS.items()))
            await src.wait_for_console(rf"WAIT {first} {event}\r?\n", TIMEOUT)
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
                assert source.sidecar.migration is not None
                source.sidecar.migration.before_switchover = kill
                watcher = None
            code, report = await migrate_cli(tmp_path, src, src_state, guest_elf, f"tcp:127.0.0.1:{port}")
            assert killed.done(), report
            assert code == 1 and report["outcome"] == "failed", report
            if watcher is not None:
                watcher.cancel()
            await source_keeps_serving(src, src_state, guest_elf)
            assert dst.process is not None and dst.process.returncode == -9
            assert "abort" not in src.stderr.lower() and "fatal" not in src.stderr.lower(), src.stderr
        finally:
            with contextlib.suppress(Exception):
                await harness.disconnect()
            for running in (source, destination):
                if not running.task.done():
                    with contextlib.suppress(Exception):
                        await running.stop()


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
