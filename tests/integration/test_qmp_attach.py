"""The QMP attachment against a real QEMU: attaching both ways, lifecycle events, bad peers, memory."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import pytest

from qmp_sdei.errors import QemuError
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.qemu.qmp import (
    QmpCommandError,
    VmEventKind,
    attach,
    gdbstub_address,
    start_gdbstub,
)
from support.qemu import (
    SLOW,
    fake_peer,
    hang_up,
    harness_client,
    qmp_but_not_qemu,
    requires_qemu,
    running_qemu,
    say_nothing,
    send_junk,
    stale_event_first,
)

pytestmark = [pytest.mark.qemu, requires_qemu]

# QemuSpec passes -no-reboot, which turns any reset request (even a host system_reset) into a
# QEMU exit; a later -action overrides it so the reset tests see a RESET, as libvirt VMs do.
REBOOTS = QemuSpec(extra_args=("-action", "reboot=reset"))


@pytest.mark.asyncio
async def test_attach_connect_mode_reads_runstate_and_executes(tmp_path: Path) -> None:
    async with running_qemu(tmp_path) as vm, await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s:
        assert s.connected
        assert s.status == "prelaunch"
        assert not s.running
        assert s.greeting_version[0] >= 7
        reply = await s.execute("query-target")
        assert reply == {"arch": "aarch64"}
        with pytest.raises(QmpCommandError) as info:
            await s.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert "no-such-command" in str(info.value)


@pytest.mark.asyncio
async def test_host_system_reset_gives_reset_event(tmp_path: Path) -> None:
    async with (
        running_qemu(tmp_path, REBOOTS) as vm,
        await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s,
        harness_client(vm) as host,
    ):
        with s.subscribe() as events:
            await host.execute("system_reset")
            event = await events.wait_for(VmEventKind.RESET, SLOW)
        assert event.guest is False
        assert event.reason == "host-qmp-system-reset"
        assert event.timestamp == pytest.approx(time.time(), abs=SLOW)
        assert s.status == "prelaunch"


@pytest.mark.asyncio
async def test_stop_and_cont_give_stop_and_resume(tmp_path: Path) -> None:
    async with (
        running_qemu(tmp_path) as vm,
        await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s,
        harness_client(vm) as host,
    ):
        with s.subscribe({VmEventKind.STOP, VmEventKind.RESUME}) as events:
            await host.execute("cont")
            assert (await events.get(SLOW)).kind is VmEventKind.RESUME
            assert (s.running, s.status) == (True, "running")
            await host.execute("stop")
            assert (await events.get(SLOW)).kind is VmEventKind.STOP
            assert (s.running, s.status) == (False, "paused")
        assert await s.refresh_runstate() == "paused"


@pytest.mark.asyncio
async def test_sigkill_gives_disconnected(tmp_path: Path) -> None:
    async with running_qemu(tmp_path) as vm, await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s:
        with s.subscribe() as events:
            vm.kill(signal.SIGKILL)
            event = await events.wait_for(VmEventKind.DISCONNECTED, SLOW)
            with pytest.raises(StopAsyncIteration):
                await events.get(1.0)
        assert event.reason is not None
        assert "QEMU" in event.reason or "lost" in event.reason
        assert not s.connected
        assert await s.wait_disconnected(SLOW) is event
        with pytest.raises(QemuError, match="query-status"):
            await s.execute("query-status")


@pytest.mark.asyncio
async def test_quit_gives_shutdown_then_disconnected(tmp_path: Path) -> None:
    async with running_qemu(tmp_path) as vm, await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s:
        with s.subscribe() as events:
            async with harness_client(vm) as host:
                await host.execute("quit")
            seen = [event async for event in events]  # the iteration ends after DISCONNECTED
        assert [e.kind for e in seen] == [VmEventKind.SHUTDOWN, VmEventKind.DISCONNECTED]
        assert seen[0].guest is False
        assert seen[0].reason == "host-qmp-quit"
        assert await vm.wait(SLOW) == 0


@pytest.mark.asyncio
async def test_close_by_sidecar_ends_subscriptions(tmp_path: Path) -> None:
    async with running_qemu(tmp_path) as vm:
        s = await attach(vm.sidecar_socket, listen=False, timeout=SLOW)
        with s.subscribe() as events:
            await s.close()
            event = await events.get(SLOW)
        assert event.kind is VmEventKind.DISCONNECTED
        assert event.reason == "closed by the sidecar"
        await s.close()  # idempotent
        late = s.subscribe()
        assert (await late.get(1.0)).kind is VmEventKind.DISCONNECTED
        # QEMU is unaffected and its monitor is free for the next client.
        async with await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as again:
            assert again.connected


@pytest.mark.asyncio
async def test_sidecar_attaching_before_qemu_starts_waits(tmp_path: Path) -> None:
    vm = QemuProcess(QemuSpec(), tmp_path / "vm")
    vm.workdir.mkdir(parents=True)
    attaching = asyncio.create_task(attach(vm.sidecar_socket, listen=False, timeout=SLOW))
    try:
        await asyncio.sleep(0)  # let it make its first (failing) attempt before QEMU exists
        assert not attaching.done()
        await vm.start()
        async with await attaching as s:
            assert s.status == "prelaunch"
    finally:
        attaching.cancel()
        await vm.stop()


@pytest.mark.asyncio
async def test_listen_mode_qemu_connects_out(tmp_path: Path) -> None:
    spec = QemuSpec(sidecar_listens=True, extra_args=REBOOTS.extra_args)
    vm = QemuProcess(spec, tmp_path / "vm")
    vm.workdir.mkdir(parents=True)
    attaching = asyncio.create_task(attach(vm.sidecar_socket, listen=True, timeout=SLOW))
    try:
        await vm.start()  # reconnect=1: QEMU retries each second until our server listens
        async with await attaching as s, harness_client(vm) as host:
            assert s.status == "prelaunch"
            assert not vm.sidecar_socket.exists()  # one peer only: our socket file is gone
            with s.subscribe({VmEventKind.RESET}) as events:
                await host.execute("system_reset")
                assert (await events.get(SLOW)).kind is VmEventKind.RESET
    finally:
        attaching.cancel()
        await vm.stop()


@pytest.mark.asyncio
async def test_listen_mode_without_qemu_times_out(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    with pytest.raises(QemuError, match="did not connect"):
        await attach(path, listen=True, timeout=0.3)
    assert not path.exists()


@pytest.mark.asyncio
async def test_nonexistent_socket_fails_after_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(QemuError, match="no QMP socket") as info:
        await attach(tmp_path / "missing.sock", listen=False, timeout=0.5)
    assert time.monotonic() - start >= 0.5
    assert "\n" not in str(info.value)


@pytest.mark.asyncio
async def test_refused_tcp_port_fails_after_timeout() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(QemuError, match="no QMP socket"):
        await attach(("127.0.0.1", port), listen=False, timeout=0.3)


@pytest.mark.asyncio
async def test_unreachable_directory_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="cannot listen"):
        await attach(tmp_path / "no" / "such" / "dir.sock", listen=True, timeout=SLOW)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (send_junk, "is not a QEMU monitor"),
        (say_nothing, "no QMP greeting"),
        (hang_up, "closed the connection"),
        (qmp_but_not_qemu, "not a QEMU system emulator"),
    ],
)
async def test_non_qemu_peer_is_refused(tmp_path: Path, behaviour: object, message: str) -> None:
    async with fake_peer(tmp_path / "fake.sock", behaviour) as path:  # type: ignore[arg-type]
        start = time.monotonic()
        with pytest.raises(QemuError, match=message) as info:
            await attach(path, listen=False, timeout=1.0)
        assert time.monotonic() - start < 1.0 + 5.0
        assert "\n" not in str(info.value)


@pytest.mark.asyncio
async def test_an_event_ahead_of_the_greeting_is_met_by_connecting_again(tmp_path: Path) -> None:
    """A sidecar restarted at once against QEMU 10.0 got the previous client's event where the
    greeting belongs; attaching again gets a clean handshake."""
    async with (
        fake_peer(tmp_path / "fake.sock", stale_event_first(2)) as path,
        await attach(path, listen=False, timeout=SLOW) as s,
    ):
        assert s.status == "running" and s.greeting_version == (10, 0, 0)


@pytest.mark.asyncio
async def test_a_peer_that_never_greets_first_is_still_refused(tmp_path: Path) -> None:
    async with fake_peer(tmp_path / "fake.sock", stale_event_first(1000)) as path:
        with pytest.raises(QemuError, match="is not a QEMU monitor: did not understand its greeting"):
            await attach(path, listen=False, timeout=SLOW)


@pytest.mark.asyncio
async def test_monitor_already_taken_is_refused(tmp_path: Path) -> None:
    async with running_qemu(tmp_path) as vm, await attach(vm.sidecar_socket, listen=False, timeout=SLOW):
        with pytest.raises(QemuError, match="already serves another client"):
            await attach(vm.sidecar_socket, listen=False, timeout=1.0)


@pytest.mark.asyncio
async def test_event_draining_keeps_memory_bounded(tmp_path: Path) -> None:
    pairs = 2000
    async with (
        running_qemu(tmp_path) as vm,
        await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s,
        harness_client(vm) as host,
    ):
        resets_only = s.subscribe({VmEventKind.RESET})  # must not buffer the STOP/RESUME flood
        laggard = s.subscribe(limit=100)  # never read: cut off instead of growing
        with s.subscribe({VmEventKind.STOP}) as stops:
            for _ in range(pairs):
                await host.execute("cont")
                await host.execute("stop")
            for _ in range(pairs):
                await stops.get(SLOW)
        listener = s._client.events
        assert len(listener._history) <= 1
        assert listener.empty()
        assert resets_only.pending() == 0
        assert laggard.pending() <= 101
        with pytest.raises(QemuError, match="fell behind"):
            await laggard.get(1.0)
        assert s.events_seen >= 2 * pairs
        assert s.status == "paused"
        resets_only.close()
        laggard.close()


@pytest.mark.asyncio
async def test_start_gdbstub_at_runtime(tmp_path: Path) -> None:
    async with running_qemu(tmp_path) as vm, await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s:
        assert await gdbstub_address(s) is None
        host, port = await start_gdbstub(s, "tcp:127.0.0.1:0")
        assert host == "127.0.0.1"
        assert port > 0
        assert await gdbstub_address(s) == (host, port)
        with pytest.raises(QemuError, match=r"already running on 127\.0\.0\.1:"):
            await start_gdbstub(s, "tcp:127.0.0.1:0")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), SLOW)
        writer.write(b"$?#3f")  # the stub answers a stop-reason query: it is really listening
        await writer.drain()
        assert (await asyncio.wait_for(reader.readexactly(1), SLOW)) == b"+"
        writer.close()


@pytest.mark.asyncio
async def test_gdbstub_from_command_line_is_found(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = QemuSpec(gdb=f"tcp:127.0.0.1:{port}")
    async with (
        running_qemu(tmp_path, spec) as vm,
        await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s,
    ):
        assert await gdbstub_address(s) == ("127.0.0.1", port)


@pytest.mark.asyncio
@pytest.mark.parametrize("address", ["127.0.0.1:1234", "tcp:127.0.0.1:1 -S", "unix:/tmp/x", "bogus"])
async def test_start_gdbstub_rejects_bad_address(tmp_path: Path, address: str) -> None:
    async with running_qemu(tmp_path) as vm, await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s:
        with pytest.raises(QemuError, match="tcp:HOST:PORT"):
            await start_gdbstub(s, address)


@pytest.mark.asyncio
async def test_start_gdbstub_reports_qemu_failure(tmp_path: Path) -> None:
    with socket.socket() as busy:  # QEMU cannot bind a port that is in use
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        async with (
            running_qemu(tmp_path) as vm,
            await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s,
        ):
            with pytest.raises(QemuError, match="could not start its gdbstub"):
                await start_gdbstub(s, f"tcp:127.0.0.1:{port}")


@pytest.mark.asyncio
async def test_socket_file_without_listener_is_retried_until_timeout(tmp_path: Path) -> None:
    # QEMU creates its socket file before listen(): connecting then gets ECONNREFUSED.
    path = tmp_path / "early.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound_only:
        bound_only.bind(str(path))
        start = time.monotonic()
        with pytest.raises(QemuError, match="no QMP socket accepting connections"):
            await attach(path, listen=False, timeout=0.5)
        assert time.monotonic() - start >= 0.5


@pytest.mark.asyncio
async def test_migration_events_carry_status(tmp_path: Path) -> None:
    async with (
        running_qemu(tmp_path) as vm,
        await attach(vm.sidecar_socket, listen=False, timeout=SLOW) as s,
        harness_client(vm) as host,
    ):
        with s.subscribe({VmEventKind.MIGRATION}) as events:
            caps = [{"capability": "events", "state": True}]
            await host.execute("migrate-set-capabilities", {"capabilities": caps})
            await host.execute("migrate", {"uri": "exec:cat > /dev/null"})
            statuses = []
            while not statuses or statuses[-1] not in ("completed", "failed"):
                statuses.append((await events.get(SLOW)).status)
        assert statuses[0] == "setup"
        assert statuses[-1] == "completed"
