"""The conduit follows a VM its owner stops and resumes over QMP, and never resumes it for the owner.

QEMU 8.1 and later report a breakpoint stop to the debugger only after a resume of the debugger's
own, so after the owner's ``cont`` the conduit must take the run back; QEMU 7.2 reports every
stop. The ``takeover`` variant forces the 8.1+ handling (it must work on 7.2 as well); the
``every-stop`` variant is 7.2's and is skipped where the stub does not report every stop.

The owner is the harness monitor. The guest is a loop written into RAM through the stub: it calls
SDEI_VERSION through one ``hvc`` forever, so served calls are counted by the dispatcher.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from qemu.qmp import QMPClient

from qmp_sdei.conduit.gdbstub import GdbstubConduit, stub_reports_only_our_resumes
from qmp_sdei.conduit.rsp import RspClient
from qmp_sdei.owner import SdeiOwner
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.sdei import Completion, Dispatcher, EventSpec, VcpuRegs
from support.guests import connect_gdbstub, start_qemu_with_gdbstub
from support.qemu import SLOW, harness_client

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

RAM = 0x4000_0000
LOOP = [
    0x91000421,  # loop:  add  x1, x1, #1
    0xD2A00082,  #        movz x2, #0x4, lsl #16      (a delay: the VM mostly runs, as a real guest)
    0xF1000442,  # delay: subs x2, x2, #1
    0x54FFFFE1,  #        b.ne delay
    0xD2800400,  #        movz x0, #0x20
    0xF2B88000,  #        movk x0, #0xc400, lsl #16   (x0 = SDEI_VERSION)
    0xD4000002,  #        hvc  #0
    0x17FFFFF9,  #        b    loop
    0x14000000,  # spin:  b    .
]
HVC = RAM + 6 * 4
SPIN = RAM + 8 * 4
EL1H_MASKED = 0x3C5
CALLS_PER_CYCLE = 20


class CountingDispatcher(SdeiOwner):
    """The SDEI owner of a real dispatcher, counting the calls it serves and waking whoever waits."""

    def __init__(self) -> None:
        super().__init__(Dispatcher(events=[EventSpec(1000)], mpidrs=[0x0], version=(1, 1)))
        self.calls = 0
        self._changed = asyncio.Event()

    def hypercall(self, vcpu: int, regs: VcpuRegs) -> Completion:
        self.calls += 1
        self._changed.set()
        return super().hypercall(vcpu, regs)

    async def wait_calls(self, count: int) -> None:
        async def wait() -> None:
            while self.calls < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), SLOW)


@dataclass
class Held:
    vm: QemuProcess
    owner: QMPClient
    conduit: GdbstubConduit
    dispatcher: CountingDispatcher
    run: asyncio.Task[None]

    async def status(self) -> str:
        reply = await self.owner.execute("query-status")
        return str(reply["status"])

    async def owner_stops(self) -> None:
        """QMP ``stop`` until the VM is paused: a ``stop`` that lands while the VM sits at a trap
        (runstate ``debug``) is a no-op in QEMU, and the VM runs on when the conduit resumes it."""
        seen = []
        for _ in range(50):
            await self.owner.execute("stop")
            seen.append(await self.status())
            if seen[-1] == "paused":
                return
        where = [f"{f.f_code.co_name}:{f.f_lineno}" for f in self.run.get_stack(limit=20)]
        pytest.fail(f"the VM never stayed paused after the owner's stop: {seen}, conduit at {where}")


async def load_loop(client: RspClient) -> None:
    code = b"".join(insn.to_bytes(4, "little") for insn in LOOP)
    await client.write_memory(RAM, code)
    regs = await client.read_core()
    regs.pc, regs.cpsr, regs.x[1] = RAM, EL1H_MASKED, 0
    await client.write_core(regs)


@pytest_asyncio.fixture(params=["takeover", "every-stop"])
async def held(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Held]:
    vm, port = await start_qemu_with_gdbstub(QemuSpec(smp=1, paused=True), tmp_path)
    try:
        async with harness_client(vm) as owner:
            version = (await owner.execute("query-version"))["qemu"]
            needs_our_resume = stub_reports_only_our_resumes(version["major"], version["minor"])
            if request.param == "every-stop" and needs_our_resume:
                pytest.skip("this QEMU's gdbstub reports a stop only after the debugger's own resume")

            async def runstate() -> str:
                return str((await owner.execute("query-status"))["status"])

            client = await connect_gdbstub(port, SLOW)
            await load_loop(client)
            dispatcher = CountingDispatcher()
            conduit = GdbstubConduit(
                client,
                dispatcher,
                [HVC],
                timeout=SLOW,
                runstate=runstate,
                stops_need_our_resume=request.param == "takeover",
            )
            await conduit.start()
            run = asyncio.create_task(conduit.run(resume=False), name="conduit.run")
            try:
                await asyncio.wait_for(conduit.serving.wait(), SLOW)
                assert conduit.held
                yield Held(vm, owner, conduit, dispatcher, run)
                assert not run.done(), run
            finally:
                if not run.done():
                    await conduit.close()
                else:
                    await client.close()
    finally:
        await vm.stop()


async def test_owner_cont_and_stop_are_followed(held: Held) -> None:
    """Three rounds of the owner's cont (calls are served) and stop (the VM stays paused)."""
    for cycle in range(3):
        assert await held.status() in ("prelaunch", "paused")
        await held.owner.execute("cont")
        await held.conduit.owner_resumed()
        await held.dispatcher.wait_calls(held.dispatcher.calls + CALLS_PER_CYCLE)
        await held.owner_stops()
        # The stop reached the conduit as a stop it did not cause; a late RESUME changes nothing.
        await held.conduit.owner_resumed()
        calls = held.dispatcher.calls
        assert await held.status() == "paused", cycle
        assert held.conduit.held, cycle
        # A request while the owner holds it is served without resuming the VM.
        await held.conduit.rearm()
        assert await held.status() == "paused", cycle
        assert held.dispatcher.calls == calls, cycle


async def test_owner_cont_when_the_guest_traps_before_the_conduit_hears_of_it(held: Held) -> None:
    """The guest reaches its trap before the RESUME is handled: on 8.1+ that stop is never
    reported, and the conduit finds it through the runstate (``debug``) and continues."""
    await held.owner.execute("cont")
    while (await asyncio.wait_for(held.owner.events.get(), SLOW))["event"] != "STOP":
        pass  # the STOP of the guest's first trap
    await held.conduit.owner_resumed()
    await held.dispatcher.wait_calls(CALLS_PER_CYCLE)


async def test_owner_cont_of_a_spinning_guest_then_stop(held: Held) -> None:
    """No trap is near: the conduit's 0x03 stops the running VM and it resumes it (8.1+). A stop
    and cont of the owner's that the conduit hears of only afterwards leave the VM to its owner."""
    regs = await held.conduit.rsp.read_core()  # the VM is stopped and the loop idle: ours to ask
    regs.pc = SPIN
    await held.conduit.rsp.write_core(regs)
    await held.owner.execute("cont")
    await held.conduit.owner_resumed()
    assert not held.conduit.held
    assert await held.status() == "running"
    await held.owner_stops()
    await held.conduit.owner_resumed()  # the RESUME of that cont, handled late
    assert await held.status() == "paused"
    assert held.dispatcher.calls == 0
    # Point it at the calling loop: the owner's next cont is followed as usual.
    regs = await held.conduit.rsp.read_core()
    regs.pc = RAM
    await held.conduit.rsp.write_core(regs)
    await held.owner.execute("cont")
    await held.conduit.owner_resumed()
    await held.dispatcher.wait_calls(CALLS_PER_CYCLE)
