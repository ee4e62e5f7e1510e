"""Benchmark: what the gdbstub conduit costs a guest. Prints one JSON document.

Bare metal (``tests/guests/loop``, 1 vCPU, built with aarch64-linux-gnu-gcc):

* **trapped calls per second**: the guest makes 10 rounds of 200 back-to-back ``SDEI_VERSION``
  calls through its one breakpointed ``hvc``. Each call is one gdbstub round trip: stop packet ->
  ``g`` -> answer -> ``G`` + ``vCont;c`` pipelined. Per call we also report the sidecar's share
  (stop packet received -> resume written, ``ConduitStats.trap_handling_ns``) and the rest
  (QEMU + guest: the resume is parsed, QEMU restarts the vCPU, *retranslates the guest code because
  every breakpoint stop does tb_flush()*, runs to the next ``hvc`` and sends the stop packet). The
  guest's own CNTVCT view is reported too; its clock stops while QEMU is stopped.
* **event delivery latency**: the host raises private event 1000 (plain handler) or 1001 (the
  handler first makes one trapped ``SDEI_EVENT_CONTEXT`` call) while the guest spins:
  ``request -> entered`` is until the handler's registers are written and the VM resumed (one 0x03
  interrupt round trip, a ``g``, the state save, a ``G`` + ``c``); ``request -> handler running`` is
  until the 1001 handler's first trapped call reaches the sidecar (one more trap); ``request ->
  resumed`` is until the handler's ``SDEI_EVENT_COMPLETE`` is answered with the interrupted
  context (its ``G`` + ``c`` go out right after).

  The conduit runs behind the SDEI owner (:class:`qmp_sdei.owner.SdeiOwner`), i.e. every state change is
  written to a state file before the guest goes on, as in ``qmp-sdei run``; ``--no-persist`` shows
  the cost without it.

Linux (the cached Debian arm64 kernel, ``--linux-boots N``, 0 to skip): wall time from the VM's
start to the ``sdei:`` console line with the sidecar (``boot-test``: the kernel then detects
SDEI 1.1) and without it (plain QEMU on the same SDEI DTB: the kernel's SDEI_VERSION reaches
QEMU's PSCI code and fails with -95), plus the kernel's printk timestamps for the line.

Linux event delivery (``--linux-events N``, 0 to skip; the guest of
``tests/integration/test_linux_events.py``: the same kernel with an initramfs whose ``/init`` loads
``sdei_test.ko``, which registers private event 1000 through Linux's own SDEI driver): the full
sidecar in-process (state file written per stop), N events raised one after the other while the
guest idles in poll mode (``nohlt``), on smp 1 and smp 2 (alternating vCPUs). Per event:
``request -> entered`` (the dispatcher entered the handler; the registers go out with the resume
right after), the conduit's own ``delivery_ns`` (until that resume was written), ``request ->
resumed`` (the handler's COMPLETE / COMPLETE_AND_RESUME answered: the interrupted context is
ready) and ``request -> console line`` (the callback's printk reached the host; Linux defers NMI
printk to irq_work, so this is after the resume). Linux's SDEI entry makes 4 trapped
``SDEI_EVENT_CONTEXT`` calls before the callback and then completes, so a Linux event costs one
interrupt stop plus 5 breakpoint traps, each of which makes QEMU flush its translation cache.

Through the EL2 stub (``-M virt,virtualization=on``; ``docs/el2-stub.md``):

* ``baremetal_el2`` (``--no-el2`` skips it): the same loop guest, linked where the stub enters a
  kernel and loaded raw, served by ``El2Conduit``: every ``hvc`` traps to the stub's one site. Its
  RAM is shared, so calls are answered through the stub's mailbox without a VM stop (the first of
  a burst stops the VM); ``baremetal_el2_stops`` is the same VM and code with the mailbox off.
  ``trapped_call_el2_vs_symbols`` puts the three median round trips and sidecar shares side by
  side (same run, same persistence). The stub answers the 1001 handler's ``EVENT_CONTEXT``
  itself, so ``request_to_handler_running`` has no samples there.
* ``linux_el2_boot`` (``--el2-boots N``, ``--uefi-boots N``): the Debian kernel booted through the
  stub directly and through UEFI (edk2 from a disk image, ~7 s a boot), to the ``sdei:`` line with
  the sidecar (``boot-test``) and without it (the stub forwards every call to QEMU's PSCI), one
  after the other in the same run; ``ratio`` = median with / median without.
* ``linux_events_el2`` (``--el2-events N``): as ``linux_events`` but through the stub (KASLR on,
  WFI idle, events back to back).
* ``idle_delivery`` (``--idle-events N``, ``--idle-gap S``): ``bench/idle_delivery.py``'s
  measurement on smp 1 and 2: events raised into a guest idling in WFI (in the stub's idle loop).
* ``doorbell_ab`` (``--doorbell-ab N [--ab-reps R]``): the stub's doorbell watchpoints on and off in
  the same run, same code: N events into the Linux guest per boot, R boots per side, alternating;
  with QEMU's CPU time per event.

Before/after in one run (``--compare REF [--reps N]``): the chosen sections run N times, alternating
between the tree of git revision REF (extracted with ``git archive``: its own bench, sources and stub)
and this working tree (``--compare A..B..C``: each revision next to the one before, one change's
before/after per step); the JSON then holds, for every median in the results, each tree's values per
run and their median, and any section that failed. A busy host drifts; rotating the order spreads
the drift over all trees.

    python bench/conduit.py [--linux-boots N] [--linux-events N] [--no-persist] [--no-el2]
        [--el2-boots N] [--uefi-boots N] [--el2-events N] [--idle-events N] [--idle-gap S]
        [--compare REF|A..B[..C...] [--reps N]]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qmp_sdei import stub
from qmp_sdei.abi.sdei import Function
from qmp_sdei.abi.smccc import function_id
from qmp_sdei.conduit.el2 import El2Conduit, probe_stub
from qmp_sdei.conduit.gdbstub import ConduitStats, GdbstubConduit
from qmp_sdei.conduit.service import map_stub_areas
from qmp_sdei.errors import QemuError
from qmp_sdei.owner import RaiseResult, SdeiOwner
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.sdei import Completion, Dispatcher, EventSpec, VcpuRegs
from qmp_sdei.statefile import StateStore, StoredState, VmIdentity
from qmp_sdei.versions import VersionPins

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))  # the guests and their builders live with the tests
from support.guests import build_guest_dir, build_loop_guest_el2, connect_gdbstub, elf_symbols, free_port  # noqa: E402

GUEST_DIR = REPO / "tests" / "guests" / "loop"
ROUNDS, CALLS, EVENTS = 10, 200, 100  # as compiled into tests/guests/loop/loop.c
TIMEOUT = 120.0


def build_loop_guest(outdir: Path) -> Path:
    """Compile tests/guests/loop with the test guests' flags (cached by source hash)."""
    return build_guest_dir(GUEST_DIR, outdir, sources=("start.S", "loop.c"))


def hvc_site(elf: Path) -> int:
    return elf_symbols(elf)["smccc_hvc_insn"]


def summary_us(samples_ns: list[int]) -> dict[str, float | int]:
    """Median, p90 and max in microseconds."""
    if not samples_ns:
        return {"n": 0}
    ordered = sorted(samples_ns)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {
        "n": len(ordered),
        "median_us": round(statistics.median(ordered) / 1e3, 1),
        "p90_us": round(p90 / 1e3, 1),
        "max_us": round(ordered[-1] / 1e3, 1),
    }


def summary_s(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median_s": round(statistics.median(ordered), 3),
        "p90_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
        "all_s": [round(s, 3) for s in samples],
    }


class TimingDispatcher:
    """Wraps the dispatcher the conduit drives and timestamps every call it sees."""

    def __init__(self, inner: SdeiOwner) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int]] = []  # (function id, perf_counter_ns on arrival)
        self.completed = asyncio.Event()

    def hypercall(self, vcpu: int, regs: VcpuRegs) -> Completion:
        arrived = time.perf_counter_ns()
        fid = function_id(regs.x[0])
        outcome = self.inner.hypercall(vcpu, regs)
        self.calls.append((fid, arrived))
        if fid == Function.EVENT_COMPLETE:
            self.calls.append((-1, time.perf_counter_ns()))  # the interrupted context is ready
            self.completed.set()
        return outcome

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # the rest of the owner's conduit side, unchanged


def console_tail(vm: QemuProcess, lines: int = 5) -> str:
    return "\n".join(vm.console.splitlines()[-lines:])


def baremetal_spec(elf: Path, port: int, el2_image: Path | None) -> QemuSpec:
    if el2_image is None:
        return QemuSpec(smp=1, kernel=elf, gdb=f"tcp:127.0.0.1:{port}", paused=True)
    return QemuSpec(
        smp=1, machine_options={"virtualization": "on"}, gdb=f"tcp:127.0.0.1:{port}", paused=True, shared_ram=True,
        extra_args=["-kernel", str(stub.STUB_ELF),
                    "-device", f"loader,file={el2_image},addr={stub.KERNEL_ADDR:#x},force-raw=on"],
    )  # fmt: skip


async def baremetal_conduit(
    vm: QemuProcess, port: int, timing: TimingDispatcher, elf: Path, *, el2: bool, mailbox: bool
) -> GdbstubConduit:
    rsp = await connect_gdbstub(port, TIMEOUT)
    if not el2:
        return GdbstubConduit(rsp, timing, [hvc_site(elf)], timeout=TIMEOUT)
    layout = await probe_stub(rsp)
    if layout is None:
        raise RuntimeError("the EL2 stub was not found in guest memory")
    ram = None
    if mailbox and layout.has_mailbox and vm.process is not None:
        ram = map_stub_areas(vm.process.pid, vm.spec.memory_mb, layout)
    return El2Conduit(rsp, timing, layout, timeout=TIMEOUT, ram=ram)


async def bench_baremetal(
    elf: Path, workdir: Path, *, persist: bool, el2_image: Path | None = None, mailbox: bool = True
) -> dict[str, Any]:
    """The loop guest on the symbol conduit (``elf``), or through the EL2 stub (``el2_image``:
    the raw guest the stub enters at EL1; every ``hvc`` traps to the stub's one site), answering
    through the stub's mailbox in shared guest RAM (``mailbox``) or at VM stops only."""
    port = free_port()
    spec = baremetal_spec(elf, port, el2_image)
    inner = Dispatcher(events=[EventSpec(1000), EventSpec(1001)], mpidrs=[0], version=(1, 1), profile="tf-a")
    store = StateStore(workdir / "state")
    identity, pins = VmIdentity(None, "bench"), VersionPins((1, 1), 0, (1, 1))
    store.directory.mkdir(parents=True, exist_ok=True)
    saves = 0

    def save(snapshot: bytes) -> None:
        nonlocal saves
        store.record(StoredState(identity, pins, snapshot))  # as qmp-sdei run persists
        saves += 1

    owner = SdeiOwner(inner, pins=pins, persist=save if persist else None)
    timing = TimingDispatcher(owner)
    async with QemuProcess(spec, workdir / "vm") as vm:
        conduit = await baremetal_conduit(vm, port, timing, elf, el2=el2_image is not None, mailbox=mailbox)
        await conduit.start()
        run = asyncio.create_task(conduit.run(), name="conduit.run")
        try:
            await vm.wait_for_console(r"WAIT events\r?\n", TIMEOUT)
            loop_handling = list(conduit.stats.trap_handling_ns)
            mailbox_handling, mailbox_handover = (
                list(getattr(conduit.stats, name, ())) for name in ("mailbox_ns", "mailbox_handover_ns")
            )
            version_times = [t for fid, t in timing.calls if fid == Function.VERSION]
            assert len(version_times) == ROUNDS * CALLS, len(version_times)

            deliver_ns: list[int] = []
            running_ns: list[int] = []
            resumed_ns: list[int] = []
            for i in range(EVENTS):
                event = 1001 if i % 2 else 1000
                timing.completed.clear()
                mark = len(timing.calls)
                t0 = time.perf_counter_ns()
                result = await owner.raise_event(event, 0, wait=TIMEOUT)
                entered = time.perf_counter_ns()
                if result.result is not RaiseResult.DELIVERED:
                    raise RuntimeError(f"event {event} (#{i}) was not deliverable: {result}\n{console_tail(vm)}")
                await asyncio.wait_for(timing.completed.wait(), TIMEOUT)
                deliver_ns.append(entered - t0)
                after = timing.calls[mark:]
                resumed_ns.append(next(t for fid, t in after if fid == -1) - t0)
                # Through the EL2 stub the handler's EVENT_CONTEXT is answered in the stub: no trap.
                running_ns.extend(t - t0 for fid, t in after[:1] if event == 1001 and fid == Function.EVENT_CONTEXT)
            await vm.wait_for_console(rf"EVENTS {EVENTS}\r?\n", TIMEOUT)
            assert await vm.wait(TIMEOUT) == 0
            await asyncio.wait_for(run, TIMEOUT)
        finally:
            if not run.done():
                await conduit.close()
            else:
                await conduit.rsp.close()
        console = vm.console

    return baremetal_summary(
        conduit=("el2" if mailbox else "el2-stops") if el2_image is not None else "symbols",
        persist=persist,
        mailbox_handling=mailbox_handling,
        mailbox_handover=mailbox_handover,
        saves=saves,
        version_times=version_times,
        loop_handling=loop_handling,
        console=console,
        deliver_ns=deliver_ns,
        running_ns=running_ns,
        resumed_ns=resumed_ns,
        stats=conduit.stats,
    )


def baremetal_summary(
    *,
    conduit: str,
    persist: bool,
    saves: int,
    version_times: list[int],
    loop_handling: list[int],
    mailbox_handling: list[int],
    mailbox_handover: list[int],
    console: str,
    deliver_ns: list[int],
    running_ns: list[int],
    resumed_ns: list[int],
    stats: ConduitStats,
) -> dict[str, Any]:
    rounds = [version_times[r * CALLS : (r + 1) * CALLS] for r in range(ROUNDS)]
    rates = [(CALLS - 1) / ((ts[-1] - ts[0]) / 1e9) for ts in rounds]
    intervals = [b - a for ts in rounds for a, b in itertools.pairwise(ts)]
    guest = [
        (int(m["ticks"]) / int(m["freq"])) / int(m["calls"])
        for m in re.finditer(r"ROUND \d+ calls=(?P<calls>\d+) ticks=(?P<ticks>\d+) freq=(?P<freq>\d+)", console)
    ]
    # The sidecar's share of a call: the stop reply read by the event loop -> resume sent, or, for
    # calls answered through the stub's mailbox, the loop taking the post -> the answer written
    # (whichever served most). The mailbox's hand-over from the watcher thread to the loop is
    # reported beside it, as the loop's wake-up for a stop reply is not in the stops' share.
    through_mailbox = len(mailbox_handling) > len(loop_handling)
    handling = summary_us(mailbox_handling if through_mailbox else loop_handling)
    round_trip = summary_us(intervals)
    mailbox = {
        key: getattr(stats, key)
        for key in ("mailbox_calls", "mailbox_timeouts", "mailbox_late", "stops")
        if hasattr(stats, key)
    }
    return {
        "conduit": conduit,
        "persist_state": persist,
        "state_saves": saves,
        "trapped_calls": {
            "calls_per_second": {
                "median": round(statistics.median(rates)),
                "min": round(min(rates)),
                "max": round(max(rates)),
                "per_round": [round(r) for r in rates],
            },
            "round_trip": round_trip,
            "sidecar_share": handling,
            "sidecar_share_is": "mailbox" if through_mailbox else "stops",
            "mailbox_handover": summary_us(mailbox_handover),
            "calls_at_stops_share": summary_us(loop_handling),
            "served": mailbox,
            "qemu_and_guest_share_median_us": round(round_trip["median_us"] - handling["median_us"], 1),
            "guest_visible_per_call_us_median": round(statistics.median(guest) * 1e6, 1) if guest else None,
        },
        "event_delivery": {
            "request_to_entered": summary_us(deliver_ns),
            "request_to_handler_running": summary_us(running_ns),
            "request_to_resumed": summary_us(resumed_ns),
            "conduit_interrupts": stats.interrupts,
            "deliveries": stats.deliveries,
        },
    }


TS_LINE = r"^\[\s*(?P<ts>\d+\.\d+)\] {what}"


async def boot_without_sidecar(kernel: Path, workdir: Path) -> dict[str, float]:
    """The same kernel, DTB and command line as boot-test, but nothing traps its hvc."""
    from qmp_sdei.boottest import APPEND, CPU, MEMORY_MB  # noqa: PLC0415
    from qmp_sdei.qemu.dtb import build_sdei_dtb, psci_compatible_for  # noqa: PLC0415

    spec = QemuSpec(smp=1, memory_mb=MEMORY_MB, cpu=CPU, kernel=kernel, append=APPEND, paused=True)
    spec.dtb = await build_sdei_dtb(spec, workdir / "sdei.dtb", psci_compatible=psci_compatible_for("1.1"))
    async with QemuProcess(spec, workdir / "vm") as vm:
        client = await vm.connect_harness(TIMEOUT, "bench")
        try:
            await client.execute("cont")
            started = time.perf_counter()
            match = await vm.wait_for_console(
                re.compile(TS_LINE.format(what=r"sdei: Failed to get SDEI version: -95"), re.M), TIMEOUT
            )
            wall = time.perf_counter() - started
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()
    return {"wall_s": wall, "kernel_s": float(match["ts"])}


async def bench_linux(boots: int, workdir: Path) -> dict[str, Any]:
    from qmp_sdei.boottest import run_boot_test  # noqa: PLC0415
    from qmp_sdei.linux_kernel import fetch_debian_kernel  # noqa: PLC0415

    try:
        kernel = await asyncio.to_thread(fetch_debian_kernel)
    except Exception as err:  # no apt, no network: say so in the JSON instead of failing the bench
        return {"skipped": f"no Debian kernel: {err}"}
    with_wall, with_kernel, traps, handling = [], [], [], []
    without_wall, without_kernel = [], []
    for n in range(boots):
        report = await run_boot_test(
            kernel, expect_sdei="1.1", expect_psci="1.1", smp=1, timeout=TIMEOUT, workdir=workdir / f"with{n}"
        )
        if not report.passed:
            raise RuntimeError(report.text())
        line = report.lines["sdei"]
        assert line.after_vm_start_s is not None and line.kernel_timestamp_s is not None
        with_wall.append(line.after_vm_start_s)
        with_kernel.append(line.kernel_timestamp_s)
        traps.append(report.conduit["traps"])
        handling.append(report.conduit["trap_handling_median_us"])
        plain = await boot_without_sidecar(kernel, workdir / f"without{n}")
        without_wall.append(plain["wall_s"])
        without_kernel.append(plain["kernel_s"])
    return {
        "kernel": str(kernel),
        "to_sdei_line_with_sidecar": {
            "wall_from_vm_start": summary_s(with_wall),
            "kernel_timestamp": summary_s(with_kernel),
            "traps_per_boot": traps,
            "trap_handling_median_us_per_boot": handling,
        },
        "to_sdei_line_without_sidecar": {
            "wall_from_cont": summary_s(without_wall),
            "kernel_timestamp": summary_s(without_kernel),
        },
    }


ANY_SDEI_LINE = re.compile(r"sdei: (?:SDEIv\d+\.\d+ .*detected in firmware\.|Failed to get SDEI version: -?\d+)")


async def el2_boot_without_sidecar(kernel: Path, workdir: Path, firmware: str) -> float:
    """Seconds from ``cont`` to the ``sdei:`` line through the EL2 stub with nobody at its trap
    site: the stub forwards every call to QEMU's PSCI, so the kernel's SDEI probe fails (-95)."""
    from qmp_sdei.boottest import APPEND, CPU, qemu_spec  # noqa: PLC0415

    workdir.mkdir(parents=True, exist_ok=True)
    spec = await qemu_spec(
        workdir, kernel, initrd=None, cmdline=APPEND, smp=1, cpu=CPU, conduit="el2", psci_version=(1, 1),
        firmware=firmware,
    )  # fmt: skip
    async with QemuProcess(spec, workdir / "vm") as vm:
        client = await vm.connect_harness(TIMEOUT, "bench")
        try:
            await client.execute("cont")
            started = time.perf_counter()
            await vm.wait_for_console(ANY_SDEI_LINE, TIMEOUT)
            return time.perf_counter() - started
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()


async def bench_linux_el2(boots: dict[str, int], workdir: Path) -> dict[str, Any]:
    """Boot to the ``sdei:`` line through the EL2 stub, with and without the sidecar, alternating
    in one run, for each firmware (``direct``: the stub enters the kernel; ``uefi``: edk2 from a
    disk image). ``ratio`` is the median with over the median without."""
    from qmp_sdei.boottest import run_boot_test  # noqa: PLC0415
    from qmp_sdei.linux_kernel import fetch_debian_kernel  # noqa: PLC0415

    try:
        kernel = await asyncio.to_thread(fetch_debian_kernel)
    except Exception as err:
        return {"skipped": f"no Debian kernel: {err}"}
    result: dict[str, Any] = {"kernel": str(kernel)}
    for firmware, count in boots.items():
        if count <= 0:
            continue
        with_s: list[float] = []
        without_s: list[float] = []
        traps: list[int] = []
        handling: list[float] = []
        for n in range(count):
            report = await run_boot_test(
                kernel, expect_sdei="1.1", expect_psci="1.1", smp=1, timeout=TIMEOUT, firmware=firmware,
                conduit="el2", workdir=workdir / f"{firmware}-with{n}",
            )  # fmt: skip
            if not report.passed:
                raise RuntimeError(report.text())
            line = report.lines["sdei"]
            assert line.after_vm_start_s is not None
            with_s.append(line.after_vm_start_s)
            traps.append(report.conduit["traps"])
            handling.append(report.conduit["trap_handling_median_us"])
            without_s.append(await el2_boot_without_sidecar(kernel, workdir / f"{firmware}-without{n}", firmware))
        result[firmware] = {
            "with_sidecar": summary_s(with_s),
            "without_sidecar": summary_s(without_s),
            "ratio": round(statistics.median(with_s) / statistics.median(without_s), 3),
            "traps_per_boot": traps,
            "trap_handling_median_us_per_boot": handling,
        }
    return result


async def linux_event_guest() -> Any:
    """The Linux event test guest (built, or from the cache), or ``{"skipped": why}`` when this
    machine cannot have it (no network for the kernel package, no cross compiler)."""
    from support.linux_guest import (  # noqa: PLC0415 (test support, only for the Linux sections)
        LinuxGuestUnavailable,
        prepare_linux_event_guest,
    )

    try:
        return await asyncio.to_thread(prepare_linux_event_guest)
    except LinuxGuestUnavailable as err:
        return {"skipped": str(err)}


async def bench_linux_events(count: int, workdir: Path, conduit: str = "symbols") -> dict[str, Any]:
    from support.linux_guest import booted_linux  # noqa: PLC0415 (test support, only for this section)

    guest = await linux_event_guest()
    if isinstance(guest, dict):
        return guest
    result: dict[str, Any] = {
        "kernel": f"{guest.kernel.package} {guest.kernel.version}", "event": guest.event, "conduit": conduit,
    }  # fmt: skip
    for smp in (1, 2):
        async with booted_linux(guest, workdir / f"smp{smp}", smp=smp, timeout=TIMEOUT, conduit=conduit) as linux:
            handling_mark = len(linux.sidecar.conduit.stats.trap_handling_ns)
            deliveries = [await linux.raise_event(n % smp, TIMEOUT) for n in range(count)]
            await linux.wait_heartbeat_after(linux.heartbeat(), TIMEOUT)
            stats = linux.sidecar.conduit.stats
            handling = list(stats.trap_handling_ns)[handling_mark:]
            trouble = linux.trouble()
            boot_to_ready = linux.boot_to_ready_s
            probe = linux.probe
        if trouble:
            raise RuntimeError("the kernel complained:\n" + "\n".join(trouble))
        wrong_cpu = [d.n for d in deliveries if d.cpu != d.vcpu]
        if wrong_cpu:
            raise RuntimeError(f"events delivered on the wrong CPU: {wrong_cpu}")
        # Trap round trips inside the handler: entered -> each call -> the completion.
        in_handler: list[int] = []
        for d in deliveries:
            assert d.entered_ns is not None
            marks = [d.entered_ns, *d.handler_call_ns]
            in_handler.extend(b - a for a, b in itertools.pairwise(marks))
        completions: dict[str, int] = {}
        for d in deliveries:
            completions[d.handler_calls[-1]] = completions.get(d.handler_calls[-1], 0) + 1
        calls = {",".join(d.handler_calls) for d in deliveries}
        result[f"smp{smp}"] = {
            "events": count,
            "boot_to_ready_s": round(boot_to_ready, 3),
            "request_to_entered": summary_us([d.entered_ns for d in deliveries if d.entered_ns is not None]),
            "conduit_delivery_ns": summary_us([d.conduit_delivery_ns for d in deliveries if d.conduit_delivery_ns]),
            "request_to_resumed": summary_us([d.resumed_ns for d in deliveries]),
            "request_to_console_line": summary_us([d.line_ns for d in deliveries]),
            "handler_trap_round_trip": summary_us(in_handler),
            "handler_trap_sidecar_share": summary_us(handling),
            "handler_calls": sorted(calls),
            "completions": completions,
            "deferred_deliveries": stats.deferred_deliveries,
            "probe_entries": len(probe.entered),
        }
    return result


def qemu_cpu_seconds(pid: int) -> float:
    """User + system CPU time QEMU has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_doorbell_ab(count: int, reps: int, workdir: Path) -> dict[str, Any]:
    """The EL2 stub's doorbell watchpoints on and off, same code, same run (``--doorbell-ab N``).

    ``reps`` times, alternating which goes first: boot the Linux event guest through the stub
    (smp 1) and raise ``count`` events, once as the conduit does (calls stop at the doorbell
    watchpoint) and once with the watchpoints left out (calls stop at the trap site's breakpoint,
    and QEMU flushes its translation cache at each). Reports the medians over all events and QEMU's
    CPU time per event (user + system: less sensitive to a busy host than latencies).
    """
    from support.linux_guest import booted_linux  # noqa: PLC0415 (test support, only for this section)

    guest = await linux_event_guest()
    if isinstance(guest, dict):
        return guest
    original_start = El2Conduit.start

    async def start_without_doorbell(self: El2Conduit) -> None:
        await original_start(self)
        self._doorbell = self._wake_doorbell = False

    samples: dict[str, dict[str, list[float]]] = {
        side: {"entered": [], "resumed": [], "handler_trap": [], "qemu_cpu_ms_per_event": [], "doorbell_stops": []}
        for side in ("doorbell", "breakpoint")
    }
    failures: dict[str, list[str]] = {"doorbell": [], "breakpoint": []}
    try:
        for rep in range(reps):
            sides = ("doorbell", "breakpoint") if rep % 2 == 0 else ("breakpoint", "doorbell")
            for side in sides:
                El2Conduit.start = original_start if side == "doorbell" else start_without_doorbell  # type: ignore[method-assign]
                work = workdir / f"{side}{rep}"
                try:
                    async with booted_linux(guest, work, smp=1, timeout=TIMEOUT, conduit="el2") as linux:
                        assert linux.vm.process is not None
                        cpu0 = qemu_cpu_seconds(linux.vm.process.pid)
                        stops0 = linux.sidecar.conduit.stats.doorbell_stops  # type: ignore[attr-defined]
                        deliveries = [await linux.raise_event(0, TIMEOUT) for _ in range(count)]
                        cpu1 = qemu_cpu_seconds(linux.vm.process.pid)
                        stops1 = linux.sidecar.conduit.stats.doorbell_stops  # type: ignore[attr-defined]
                except AssertionError as err:  # an event not delivered: counted, and the next boot
                    failures[side].append(str(err)[:300])
                    continue
                got = samples[side]
                got["entered"] += [d.entered_ns for d in deliveries if d.entered_ns is not None]
                got["resumed"] += [d.resumed_ns for d in deliveries]
                for d in deliveries:
                    assert d.entered_ns is not None
                    marks = [d.entered_ns, *d.handler_call_ns]
                    got["handler_trap"] += [b - a for a, b in itertools.pairwise(marks)]
                got["qemu_cpu_ms_per_event"].append((cpu1 - cpu0) * 1e3 / count)
                got["doorbell_stops"].append(stops1 - stops0)
    finally:
        El2Conduit.start = original_start  # type: ignore[method-assign]
    return {
        side: {
            "request_to_entered": summary_us([int(v) for v in got["entered"]]),
            "request_to_resumed": summary_us([int(v) for v in got["resumed"]]),
            "handler_trap_round_trip": summary_us([int(v) for v in got["handler_trap"]]),
            "qemu_cpu_ms_per_event": {
                "median": round(statistics.median(got["qemu_cpu_ms_per_event"]), 3),
                "per_boot": [round(v, 3) for v in got["qemu_cpu_ms_per_event"]],
            },
            "doorbell_stops_per_boot": got["doorbell_stops"],
            "failed_boots": failures[side],
        }
        for side, got in samples.items()
    }


def compare_trapped_calls(
    symbols: list[dict[str, Any]], el2: list[dict[str, Any]], el2_stops: list[dict[str, Any]]
) -> dict[str, Any]:
    """Median trapped SDEI_VERSION round trip and sidecar share, per conduit, same run and same
    persistence setting (the first run of each: with the state file unless --no-persist).
    ``el2``: through the stub's mailbox; ``el2_stops``: the same stub with every call at a stop."""

    def medians(run: dict[str, Any]) -> dict[str, float]:
        calls = run["trapped_calls"]
        return {
            "round_trip_median_us": calls["round_trip"]["median_us"],
            "sidecar_share_median_us": calls["sidecar_share"]["median_us"],
            "qemu_and_guest_share_median_us": calls["qemu_and_guest_share_median_us"],
        }

    return {
        "persist_state": symbols[0]["persist_state"],
        "symbols": medians(symbols[0]),
        "el2": medians(el2[0]),
        "el2_stops": medians(el2_stops[0]),
    }


MEDIAN_KEYS = ("median_us", "median_ms", "median_s", "median", "ratio", "qemu_and_guest_share_median_us")


def medians_of(doc: Any, path: str = "") -> dict[str, float]:
    """Every median-like number in a bench result, by its path (``baremetal_el2.0.trapped_calls...``)."""
    found: dict[str, float] = {}
    if isinstance(doc, dict):
        for key, value in doc.items():
            where = f"{path}.{key}" if path else str(key)
            if key in MEDIAN_KEYS and isinstance(value, int | float):
                found[where] = float(value)
            else:
                found.update(medians_of(value, where))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found.update(medians_of(value, f"{path}.{index}"))
    return found


def failures_of(doc: Any, path: str = "") -> dict[str, str]:
    """Sections that reported ``failed`` instead of numbers (the bench goes on past them)."""
    if isinstance(doc, dict):
        if isinstance(doc.get("failed"), str):
            return {path: doc["failed"][-500:]}
        return {k: v for key, value in doc.items() for k, v in failures_of(value, f"{path}.{key}".strip(".")).items()}
    return {}


def compare(ref: str, reps: int, argv: list[str]) -> dict[str, Any]:
    """Run this bench with ``argv`` ``reps`` times for each tree and pair up their medians.

    ``ref`` is one git revision (compared with this working tree) or a chain ``A..B[..C...]`` of
    revisions (each next to the one before: one change's before/after per step). Every repetition
    runs every tree once, in a rotated order, so a host that gets busier hurts no side more.
    """
    with tempfile.TemporaryDirectory(prefix="qmp-sdei-bench-ref-") as scratch:
        revisions = ref.split("..")
        trees: list[tuple[str, Path]] = []
        for n, revision in enumerate(revisions):
            tree = Path(scratch) / f"tree{n}"
            tree.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
            trees.append((revision, tree))
        if len(revisions) == 1:
            trees.append(("working tree", REPO))
        results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in trees}
        failed: dict[str, list[dict[str, str]]] = {label: [] for label, _ in trees}
        for rep in range(reps):
            shift = rep % len(trees)
            for label, tree in trees[shift:] + trees[:shift]:
                env = dict(os.environ, PYTHONPATH=str(tree / "src"))
                run = subprocess.run(
                    [sys.executable, str(tree / "bench" / "conduit.py"), *argv],
                    env=env, capture_output=True, text=True, check=False,
                )  # fmt: skip
                if run.returncode != 0:
                    failed[label].append({"run": str(rep), "stderr": run.stderr[-1500:]})
                    continue
                doc = json.loads(run.stdout)
                results[label].append(medians_of(doc))
                if failures_of(doc):
                    failed[label].append({"run": str(rep), **failures_of(doc)})
    keys = sorted({key for runs in results.values() for run in runs for key in run})
    table: dict[str, Any] = {}
    for key in keys:
        row: dict[str, Any] = {}
        for label, runs in results.items():
            values = [run[key] for run in runs if key in run]
            row[label] = round(statistics.median(values), 3) if values else None
            row[f"{label} runs"] = values
        table[key] = row
    return {"compare": [label for label, _ in trees], "reps": reps, "args": argv, "medians": table, "failed": failed}


def qemu_version() -> str:
    out = subprocess.run(["qemu-system-aarch64", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


async def main(args: argparse.Namespace, qemu: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qmp-sdei-bench-") as scratch:
        work = Path(scratch)
        elf = build_loop_guest(work / "guest")
        result: dict[str, Any] = {
            "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "qemu": qemu,
        }
        runs = [False] if args.no_persist else [True, False]
        result["baremetal"] = [await bench_baremetal(elf, work / f"bm-{persist}", persist=persist) for persist in runs]
        if args.linux_boots > 0:
            result["linux"] = await bench_linux(args.linux_boots, work / "linux")
        if args.linux_events > 0:
            result["linux_events"] = await bench_linux_events(args.linux_events, work / "linux-events")
        if args.el2:
            el2_image = build_loop_guest_el2(work / "guest-el2")
            try:
                result["baremetal_el2"] = [
                    await bench_baremetal(elf, work / f"bm-el2-{persist}", persist=persist, el2_image=el2_image)
                    for persist in runs
                ]
                result["baremetal_el2_stops"] = [
                    await bench_baremetal(
                        elf, work / "bm-el2-stops", persist=runs[0], el2_image=el2_image, mailbox=False
                    )
                ]
                result["trapped_call_el2_vs_symbols"] = compare_trapped_calls(
                    result["baremetal"], result["baremetal_el2"], result["baremetal_el2_stops"]
                )
            except RuntimeError as err:  # say so in the JSON and go on with the other sections
                result["baremetal_el2"] = {"failed": str(err)}
        if args.el2_boots > 0 or args.uefi_boots > 0:
            result["linux_el2_boot"] = await bench_linux_el2(
                {"direct": args.el2_boots, "uefi": args.uefi_boots}, work / "linux-el2"
            )
        if args.el2_events > 0:
            result["linux_events_el2"] = await bench_linux_events(args.el2_events, work / "linux-events-el2", "el2")
        if args.doorbell_ab > 0:
            result["doorbell_ab"] = await bench_doorbell_ab(args.doorbell_ab, args.ab_reps, work / "doorbell-ab")
        if args.idle_events > 0:
            from idle_delivery import measure  # noqa: PLC0415 (bench/idle_delivery.py)

            result["idle_delivery"] = [
                await measure(events=args.idle_events, gap=args.idle_gap, smp=smp, cpu="cortex-a57") for smp in (1, 2)
            ]
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--linux-boots", type=int, default=5, help="boots with and without the sidecar (0: skip)")
    parser.add_argument("--linux-events", type=int, default=50, help="events raised into Linux per smp (0: skip)")
    parser.add_argument("--no-persist", action="store_true", help="bare metal only without state-file writes")
    parser.add_argument("--no-el2", dest="el2", action="store_false", help="no bare-metal run through the EL2 stub")
    parser.add_argument("--el2-boots", type=int, default=3, help="direct boots through the EL2 stub, with and without")
    parser.add_argument("--uefi-boots", type=int, default=1, help="UEFI boots through the EL2 stub (~7 s each), ditto")
    parser.add_argument("--el2-events", type=int, default=30, help="events into Linux through the EL2 stub per smp")
    parser.add_argument("--idle-events", type=int, default=10, help="events into an idle (WFI) guest per smp (0: skip)")
    parser.add_argument("--idle-gap", type=float, default=0.5, help="seconds of idle before each idle-guest event")
    parser.add_argument("--doorbell-ab", type=int, default=0, help="events per boot: doorbell on/off, same run")
    parser.add_argument("--ab-reps", type=int, default=3, help="with --doorbell-ab: boots per side")
    parser.add_argument("--compare", metavar="REF", help="REF vs this tree, or a chain A..B..C of revisions")
    parser.add_argument("--reps", type=int, default=3, help="with --compare: runs per side")
    args = parser.parse_args()
    if args.compare:
        argv: list[str] = []  # the same sections for both sides: everything but --compare/--reps
        given = iter(sys.argv[1:])
        for arg in given:
            if arg in ("--compare", "--reps"):
                next(given, None)
            elif not arg.startswith(("--compare=", "--reps=")):
                argv.append(arg)
        print(json.dumps(compare(args.compare, args.reps, argv), indent=2))
        sys.exit(0)
    try:
        print(json.dumps(asyncio.run(main(args, qemu_version())), indent=2))
    except QemuError as err:
        sys.exit(f"bench: {err}")
