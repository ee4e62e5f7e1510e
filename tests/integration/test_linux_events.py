"""SDEI events raised by the host reach Linux's real SDEI handler in a stock Debian arm64 kernel.

The guest (``tests/support/linux_guest.py``): the cached Debian kernel, booted ``nokaslr nohlt``
with the SDEI DTB and an initramfs whose static ``/init`` loads ``sdei_test.ko``. The module
registers and enables private event 1000 through the kernel's own SDEI driver (which makes the
REGISTER/ENABLE/UNMASK calls on every CPU, trapped by the sidecar), and its callback prints one
line per delivery. The whole sidecar runs in-process; events are raised with
``sidecar.conduit.raise_event``, alternating vCPUs on smp 2.

The verdict is the kernel's console: one line per event with the right CPU and the cookie the
module registered, the interrupted context in EL1h, the handler finishing with
COMPLETE/COMPLETE_AND_RESUME, no oops or warning, and /init's heartbeat going on afterwards.
Each boot takes ~2 s to ``sdei_test: ready`` here; an event ~10-30 ms.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from support.linux import LINUX_MARKS
from support.linux_guest import (
    DELIVERY_ANY,
    READY_LINE,
    LinuxEventGuest,
    LinuxGuestUnavailable,
    booted_linux,
    prepare_linux_event_guest,
)

pytestmark = [*LINUX_MARKS, pytest.mark.qemu]

TIMEOUT = 60.0  # per wait: TCG on a busy 2-core host
EVENTS = 20
IDLE_TRIES, IDLE_SETTLE = 10, 0.3  # events into the idle guest until one finds it halted; seconds before each
PSTATE_MODE_MASK, PSTATE_EL1H = 0xF, 0x5


@pytest.fixture(scope="module")
def guest() -> LinuxEventGuest:
    try:
        return prepare_linux_event_guest()
    except LinuxGuestUnavailable as err:
        pytest.skip(str(err))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("boot", "smp"),
    [
        (("symbols", "direct", "cortex-a57"), 1),
        (("symbols", "direct", "cortex-a57"), 2),
        (("el2", "direct", "cortex-a57"), 1),
        (("el2", "direct", "cortex-a57"), 2),
        (("el2", "direct", "max"), 2),
        (("el2", "uefi", "cortex-a57"), 2),
        (("el2", "uefi", "max"), 1),
    ],
    ids=[
        "symbols-smp1", "symbols-smp2", "el2-smp1", "el2-smp2", "el2-max-smp2", "el2-uefi-smp2", "el2-uefi-max-smp1",
    ],
)  # fmt: skip
async def test_raised_events_run_the_linux_handler(
    guest: LinuxEventGuest, tmp_path: Path, boot: tuple[str, str, str], smp: int
) -> None:
    """``el2``: through the EL2 stub, with the kernel's defaults (KASLR on, WFI idle); ``uefi``: the
    stub enters UEFI, which boots the kernel and initramfs from a disk image (no kernel on the
    sidecar's side at all). ``boot`` is (conduit, firmware, CPU model)."""
    conduit, firmware, cpu = boot
    async with booted_linux(
        guest, tmp_path, smp=smp, timeout=TIMEOUT, conduit=conduit, firmware=firmware, cpu=cpu
    ) as linux:
        ready = READY_LINE.search(linux.vm.console)
        assert ready is not None
        assert (int(ready["event"]), int(ready["cpus"])) == (guest.event, smp)
        deliveries = [await linux.raise_event(n % smp, TIMEOUT) for n in range(EVENTS)]
        stats = linux.sidecar.conduit.stats
        if conduit == "el2":
            # Events into an idle guest: back to back, the next one may find the vCPU busy still.
            # Between its heartbeats (one a second) the guest idles in the stub, where the stop
            # that finds it halted enters the handler (and the GICv3 wakes it).
            for _ in range(IDLE_TRIES):
                if stats.idle_entries:  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(IDLE_SETTLE)  # not a wait for a signal: the guest idling is the case
                deliveries.append(await linux.raise_event(len(deliveries) % smp, TIMEOUT))
        # Userspace, timers and the console still work after the last event.
        await linux.wait_heartbeat_after(linux.heartbeat(), TIMEOUT)
        console = linux.vm.console
        trouble = linux.trouble()

    for d in deliveries:
        print(
            f"#{d.n} vCPU {d.vcpu}: entered {d.entered_ns and d.entered_ns / 1e6:.2f} ms, "
            f"resumed {d.resumed_ns / 1e6:.2f} ms, line {d.line_ns / 1e6:.2f} ms, calls {d.handler_calls}"
        )
    assert not trouble, "\n".join(trouble)
    lines = list(DELIVERY_ANY.finditer(console))
    assert [int(m["n"]) for m in lines] == list(range(1, len(deliveries) + 1)), [m.group(0) for m in lines]
    for n, (d, m) in enumerate(zip(deliveries, lines, strict=True)):
        assert d.vcpu == n % smp
        assert int(m["cpu"]) == d.cpu == d.vcpu, m.group(0)
        assert int(m["event"]) == guest.event
        assert m["arg_ok"] == "1", f"the callback got another arg than the module registered: {m.group(0)}"
        # Entered only from the kernel on SP_EL1 (the conduit's EL1h rule), and pt_regs say so.
        assert int(m["pstate"], 16) & PSTATE_MODE_MASK == PSTATE_EL1H, m.group(0)
        if conduit == "symbols":
            assert "+0x" in m["pc"], f"interrupted pc is not a kernel symbol: {m.group(0)}"
        # With KPTI (el2 boots keep KASLR, which forces it) an event may also interrupt the exception
        # trampoline, which is mapped at an alias outside the kernel image and has no symbol.
        assert d.entered_ns is not None and 0 < d.entered_ns <= d.resumed_ns
        # Linux's entry asks for the interrupted x0..x3 with EVENT_CONTEXT, then completes. Through
        # the EL2 stub those EVENT_CONTEXT calls are answered in the stub (counted below), not trapped.
        assert d.handler_calls[-1] in ("EVENT_COMPLETE", "EVENT_COMPLETE_AND_RESUME"), d.handler_calls
        if conduit == "symbols":
            assert "EVENT_CONTEXT" in d.handler_calls
    assert stats.deliveries >= EVENTS
    if conduit == "el2":
        assert "KASLR enabled" in console or "KASLR" not in console, "the el2 boot must keep KASLR on"
        assert "nokaslr" not in console
        assert stats.idle_entries >= 1, stats  # type: ignore[attr-defined]
        assert stats.idle_gic_wakes >= stats.idle_entries, stats  # type: ignore[attr-defined]
        # Its RAM is shared (as qemu-args has it): calls right behind another went through the
        # stub's mailbox, without a stop (the kernel's SDEI probe makes several in a row).
        assert stats.mailbox_calls >= 1, stats  # type: ignore[attr-defined]
