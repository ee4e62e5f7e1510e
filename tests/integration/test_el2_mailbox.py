"""The EL2 stub's mailbox with a real QEMU: every call is served exactly once, whoever serves it.

The loop guest (``tests/guests/loop``) makes 2000 back-to-back SDEI_VERSION calls through the stub.
With guest RAM shared, the sidecar answers them through the mailbox; here it is made to miss some
on purpose: it answers some only after the stub has stopped waiting (the answer is then applied at
the stop the stub makes), and never sees others (the stop serves them). The dispatcher must see
each call once: a call served twice, or lost, shows in the count or hangs the guest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import pytest

from qmp_sdei.abi.sdei import Function
from qmp_sdei.conduit.el2 import El2Conduit, El2Stats, attach_conduit
from qmp_sdei.conduit.mailbox import RamWindow
from qmp_sdei.conduit.service import map_stub_areas
from qmp_sdei.config import parse
from qmp_sdei.daemon import ExitCode
from qmp_sdei.owner import SdeiOwner
from qmp_sdei.sdei import Dispatcher, EventSpec
from qmp_sdei.stub import StubLayout
from qmp_sdei.versions import VersionPins
from support.guests import (
    build_loop_guest_el2,
    conduit_on_gdbstub,
    connect_gdbstub,
    el2_conduit,
    el2_spec,
    start_qemu_with_gdbstub,
)
from support.qemu import running_qemu
from support.sidecar import RunningSidecar, config_for

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

TIMEOUT = 60.0
CALLS = 10 * 200  # as compiled into tests/guests/loop/loop.c, before it waits for events
MISSED_EVERY = 7  # posts the sidecar never looks at: their stops serve them
LATE_EVERY = 5  # posts answered only after the stub gave up waiting (1 ms of guest time)


class CountingOwner(SdeiOwner):
    def __init__(self) -> None:
        super().__init__(
            Dispatcher(events=[EventSpec(1000), EventSpec(1001)], mpidrs=[0], version=(1, 1), profile="tf-a"),
            pins=VersionPins((1, 1), 0, (1, 1)),
        )
        self.versions = 0
        self.on_sdei_call = self._count

    def _count(self, fid: int, _x0: int, _outcome: object) -> None:
        if fid == Function.VERSION:
            self.versions += 1


class UnreliableMailbox(El2Conduit):
    """Misses every MISSED_EVERY-th post and answers every LATE_EVERY-th one too late."""

    def _serve_post(self, vcpu: int, count: int, seen_ns: int) -> None:
        if count % MISSED_EVERY == 0:
            assert self._watcher is not None
            self._watcher.loop_done()
            return
        if count % LATE_EVERY == 0:
            time.sleep(0.005)  # blocks the loop: the stub's wait (1 ms) runs out and it stops
        super()._serve_post(vcpu, count, seen_ns)


async def _serve_the_calls(
    tmp_path: Path, owner: CountingOwner, conduit_class: type[El2Conduit], ram_file: Path | None = None
) -> El2Stats:
    image = build_loop_guest_el2(tmp_path / "guest")
    build = el2_conduit(owner, TIMEOUT, conduit_class=conduit_class)
    spec = el2_spec(image, ram_file=ram_file)
    async with conduit_on_gdbstub(spec, tmp_path, owner, [], TIMEOUT, build=build) as (vm, conduit, _):
        await vm.wait_for_console(r"WAIT events\r?\n", TIMEOUT)
        stats = conduit.stats
        assert isinstance(stats, El2Stats)
        return stats


async def test_every_call_is_answered_once_through_the_mailbox(tmp_path: Path) -> None:
    owner = CountingOwner()
    stats = await _serve_the_calls(tmp_path, owner, El2Conduit)
    assert owner.versions == CALLS
    assert stats.mailbox_calls > CALLS // 2, stats  # a busy host may send some to a stop
    assert stats.mailbox_calls + stats.stops >= CALLS


async def test_a_ram_file_named_by_path_serves_the_mailbox(tmp_path: Path) -> None:
    """``[conduit] guest_ram``: QEMU keeps guest RAM in a file both can open (memory-backend-file,
    share=on), and the sidecar maps that file, never looking into QEMU's /proc."""
    owner = CountingOwner()
    ram_file = tmp_path / "shm" / "vm.ram"
    ram_file.parent.mkdir()
    stats = await _serve_the_calls(tmp_path, owner, El2Conduit, ram_file)
    assert owner.versions == CALLS
    assert stats.mailbox_calls > CALLS // 2, stats
    assert ram_file.stat().st_size == 256 << 20  # QEMU made it, and left it for its owner to remove


async def test_the_sidecar_prepares_the_ram_file_before_qemu_and_serves_the_mailbox_through_it(
    tmp_path: Path,
) -> None:
    """The deployment recipe end to end: the sidecar starts first (listening for QEMU's QMP) and
    creates ``[conduit] guest_ram`` group-writable; QEMU, started after it, keeps guest RAM there."""
    image = build_loop_guest_el2(tmp_path / "guest")
    ram = tmp_path / "run" / "vm.ram"
    ram.parent.mkdir()
    socket = tmp_path / "listen.sock"
    config = config_for(
        tmp_path, socket, qmp={"mode": "listen"}, conduit={"enabled": True, "start_vm": True, "guest_ram": str(ram)}
    )
    sidecars = RunningSidecar(parse(config))
    try:
        await asyncio.sleep(0)  # run() makes the file before its first await: before any QEMU could start
        assert ram.stat().st_size == 0 and ram.stat().st_mode & 0o777 == 0o660
        spec = dataclasses.replace(
            el2_spec(image, ram_file=ram), sidecar_listens=True,
            extra_args=(*el2_spec(image).extra_args, "-chardev", f"socket,id=s2,path={socket},reconnect=1",
                        "-mon", "chardev=s2,mode=control"),
        )  # fmt: skip
        async with running_qemu(tmp_path, spec) as vm:
            conduit = await sidecars.conduit_attached()
            await vm.wait_for_console(r"WAIT events\r?\n", TIMEOUT)
            assert isinstance(conduit.stats, El2Stats)
            assert conduit.stats.mailbox_calls > CALLS // 2, conduit.stats
            assert ram.stat().st_size == 256 << 20 and ram.stat().st_mode & 0o777 == 0o660  # QEMU kept it so
            assert await sidecars.stop() == ExitCode.OK
    finally:
        if not sidecars.task.done():
            await sidecars.stop()


async def test_calls_the_mailbox_misses_or_answers_late_are_served_once_by_their_stops(tmp_path: Path) -> None:
    owner = CountingOwner()
    stats = await _serve_the_calls(tmp_path, owner, UnreliableMailbox)
    assert owner.versions == CALLS  # none served twice, none lost
    assert stats.mailbox_timeouts >= CALLS // MISSED_EVERY // 2, stats
    assert stats.mailbox_late >= 1, stats
    assert stats.mailbox_calls >= 1, stats


async def test_a_vm_with_private_ram_is_served_through_stops_and_the_log_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    owner = CountingOwner()
    image = build_loop_guest_el2(tmp_path / "guest")
    vm, port = await start_qemu_with_gdbstub(el2_spec(image, shared_ram=False), tmp_path)
    try:
        assert vm.process is not None
        pid = vm.process.pid

        def map_stub(layout: StubLayout) -> RamWindow:
            return map_stub_areas(pid, 256, layout)

        await (await connect_gdbstub(port, TIMEOUT)).close()  # QEMU listens on its gdb port late
        with caplog.at_level(logging.INFO, logger="qmp_sdei.conduit.el2"):
            conduit = await attach_conduit("127.0.0.1", port, owner, _no_sites, timeout=TIMEOUT, map_ram=map_stub)
        try:
            assert isinstance(conduit, El2Conduit)
            run = asyncio.create_task(conduit.run())
            await vm.wait_for_console(r"WAIT events\r?\n", TIMEOUT)
            assert owner.versions == CALLS
            assert isinstance(conduit.stats, El2Stats) and conduit.stats.mailbox_calls == 0
            assert any("mailbox is off" in r.getMessage() for r in caplog.records), caplog.text
        finally:
            await conduit.close()
            await asyncio.gather(run, return_exceptions=True)
    finally:
        await vm.stop()


async def _no_sites() -> list[int]:
    raise AssertionError("the EL2 stub needs no trap sites")
