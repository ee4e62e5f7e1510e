"""The RSP client against a real QEMU gdbstub (7.2 or 10), with no guest image.

The machine boots nothing; the tests write a three-instruction loop into RAM through the stub and
point vCPU 0 at it, so every behaviour the conduit relies on (breakpoints before the ``hvc``,
pipelined ``G`` + ``vCont;c``, per-thread stepping, 0x03, read-only system registers, detach) is
checked without depending on the test guest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from qmp_sdei.conduit.gdbstub import stub_reports_only_our_resumes
from qmp_sdei.conduit.rsp import CoreRegs, RspClient, ThreadId
from qmp_sdei.errors import ConduitError
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from support.guests import connect_gdbstub, start_qemu_with_gdbstub
from support.qemu import harness_client, qemu_release

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

RAM = 0x4000_0000
LOOP = [
    0x91000421,  # add x1, x1, #1
    0xD4000002,  # hvc #0
    0x17FFFFFE,  # b <the add>
]
HVC = RAM + 4
EL1H_MASKED = 0x3C5
TIMEOUT = 30.0


async def start_qemu(tmp_path: Path, *, smp: int = 2, paused: bool = True) -> tuple[QemuProcess, int]:
    return await start_qemu_with_gdbstub(QemuSpec(smp=smp, paused=paused), tmp_path)


@pytest_asyncio.fixture
async def stub(tmp_path: Path) -> AsyncIterator[RspClient]:
    vm, port = await start_qemu(tmp_path)
    client = await connect_gdbstub(port, TIMEOUT)
    try:
        yield client
    finally:
        await client.close()
        await vm.stop()


async def load_loop(client: RspClient) -> CoreRegs:
    """Write the loop into RAM and point vCPU 0 at it (EL1h, interrupts masked)."""
    code = b"".join(insn.to_bytes(4, "little") for insn in LOOP)
    await client.write_memory(RAM, code)
    assert await client.read_memory(RAM, len(code)) == code
    regs = await client.read_core()
    regs.pc, regs.cpsr, regs.x[0], regs.x[1] = RAM, EL1H_MASKED, 0xC400_0020, 0
    await client.write_core(regs)
    return regs


async def test_handshake_threads_and_register_map(stub: RspClient) -> None:
    assert stub.supported.get("multiprocess") == "+"
    assert stub.attach_stops == []  # -S: nothing was running, so QEMU pushed no T02
    assert await stub.threads() == [ThreadId(1, 1), ThreadId(1, 2)]
    regs = await stub.read_register_map()
    assert regs["cpsr"].regnum == 33 and regs["cpsr"].bitsize == 32
    for name in ("ELR_EL1", "SPSR_EL1", "ESR_EL1", "VBAR_EL1"):
        assert regs[name].regnum > 67, name  # after core (0-33) and fpu (34-67)


@pytest.mark.parametrize("expected", [0, 1, 2, 5])
async def test_the_thread_list_is_the_same_whatever_the_vcpu_count_guessed(stub: RspClient, expected: int) -> None:
    """A guess sends that many ``qsThreadInfo`` at once: too few costs round trips, too many gets
    ``l`` replies that are ignored; the list and the replies after it stay aligned."""
    assert await stub.threads(expected) == [ThreadId(1, 1), ThreadId(1, 2)]
    assert await stub.read_memory(RAM, 4) is not None  # the next reply is still this request's


@pytest.mark.parametrize("ahead", [1, 2, 8, 64])
async def test_a_feature_document_reads_the_same_however_many_chunks_go_at_once(stub: RspClient, ahead: int) -> None:
    one_by_one = await stub.read_xfer("features", "target.xml", ahead=1)
    assert b"<target" in one_by_one
    for href in ("aarch64-core.xml", "system-registers.xml"):
        whole = await stub.read_xfer("features", href, ahead=1)
        assert whole.rstrip().endswith(b">"), whole[-80:]
        assert await stub.read_xfer("features", href, ahead=ahead) == whole
    with pytest.raises(ConduitError, match=r"qXfer features/no-such\.xml failed"):
        await stub.read_xfer("features", "no-such.xml", ahead=ahead)
    # Several documents at once (the register map's includes) read as they do one by one.
    docs = ["aarch64-core.xml", "target.xml", "system-registers.xml"]
    assert await stub.read_xfers("features", docs, ahead=ahead) == [
        await stub.read_xfer("features", doc, ahead=1) for doc in docs
    ]


async def test_memory_regions_in_one_write_say_which_could_not_be_read(stub: RspClient) -> None:
    await load_loop(stub)
    code = await stub.read_memory(RAM, 12)
    beyond = 0x7_0000_0000  # far above the VM's RAM: the gdbstub answers with an error
    found = await stub.read_memory_regions([(RAM, 4), (beyond, 16), (RAM + 4, 8)])
    assert found == [code[:4], None, code[4:]]
    assert await stub.read_memory_regions([]) == []


async def test_breakpoint_pipelined_write_and_continue(stub: RspClient) -> None:
    await load_loop(stub)
    await stub.insert_breakpoint(HVC)
    stub.resume()
    seen = []
    for _ in range(5):
        stop = await stub.wait_stop()
        assert (stop.signal, stop.thread) == (5, ThreadId(1, 1))
        regs = await stub.read_core()
        assert regs.pc == HVC  # stopped before the hvc executed
        seen.append(regs.x[1])
        regs.x[0], regs.pc = 0x1234, regs.pc + 4  # answer the call ourselves
        (ok,) = stub.send(stub.core_packet(regs), stub.resume_packet(), expect_reply=[True, False])
        assert await stub.reply(ok, "G") == b"OK"
    assert seen == [1, 2, 3, 4, 5]


async def test_step_one_thread_and_interrupt(stub: RspClient) -> None:
    await load_loop(stub)
    stop = await stub.step(ThreadId(1, 1))
    assert (stop.signal, stop.thread) == (5, ThreadId(1, 1))
    assert (await stub.read_core()).pc == RAM + 4
    # Stepping the hvc itself lets QEMU's PSCI emulation answer it: not PSCI, so -1 (NOT_SUPPORTED).
    await stub.step(ThreadId(1, 1))
    regs = await stub.read_core()
    assert regs.pc == RAM + 8 and regs.x[0] == (1 << 64) - 1
    # No breakpoints: the loop runs until we send 0x03.
    stub.resume()
    stub.interrupt()  # bytes arrive in order: QEMU has resumed the VM when it reads the 0x03
    stop = await stub.wait_stop()
    assert stop.signal == 2


async def test_system_registers_are_read_only(stub: RspClient) -> None:
    regs = await stub.read_register_map()
    elr = regs["ELR_EL1"].regnum
    before = await stub.read_register(elr)
    await stub.write_register(elr, before ^ 0xF0)  # QEMU (7.2 and 10) says OK...
    assert await stub.read_register(elr) == before  # ...and ignores it


async def test_attach_to_running_vm_and_detach(tmp_path: Path) -> None:
    vm, port = await start_qemu(tmp_path, smp=1, paused=False)
    # Attaching pauses the running VM. 7.2 says so with an unsolicited T02; 8.1 and later say
    # nothing (a stop reply only answers a request of ours).
    expected_stops = [] if stub_reports_only_our_resumes(*qemu_release()) else [2]
    try:
        async with harness_client(vm) as harness:
            client = await connect_gdbstub(port, TIMEOUT)
            try:
                assert [s.signal for s in client.attach_stops] == expected_stops
                assert (await harness.execute("query-status"))["status"] == "paused"
                await client.detach()
                assert (await harness.execute("query-status"))["status"] == "running"
            finally:
                await client.close()
        # After detach the stub takes a new client again.
        client = await connect_gdbstub(port, TIMEOUT)
        await client.close()
    finally:
        await vm.stop()
