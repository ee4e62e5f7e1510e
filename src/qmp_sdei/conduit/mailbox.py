"""The EL2 stub's mailbox: trapped calls answered through shared guest RAM, without a VM stop.

Why: every call served through the gdbstub stops the whole VM, reads and writes registers over the
socket and resumes it, a round trip of three or four process wake-ups that no tuning takes much
below 300 us on a 2-core host. When QEMU's guest RAM is a shared memory backend, the sidecar can map
it and the stub can hand it a call in memory instead: the stub posts the call's registers in its
vCPU's per-CPU area and spins on the answer, while the VM (and every other vCPU) runs on.

The protocol (``el2stub.S`` has the stub's side): a vCPU posts only while the sidecar's *lease*
runs, a CNTVCT value in its area that the sidecar moves forward each time it serves one of that
vCPU's calls. So the sidecar only has to watch while calls come; the first call after a quiet spell
stops the VM as before and starts a new lease. A posted call that gets no answer within the stub's
spin limit stops at the doorbell as before; the conduit sees the post there and serves it exactly
once, from the stop or from the answer the mailbox got meanwhile. Both run in the event loop, so
deciding who serves a call needs no atomic operation on shared memory.

This module reads and writes the mailbox fields through a mapped window of guest RAM and watches
the posts from a thread. It never dispatches a call and never talks to the gdbstub: each new post
goes to the event loop, where the conduit serves it through the SDEI owner like any stop.

Memory ordering: the stub publishes the count after the arguments (``stlr``) and reads the answer
after the count (``ldar``); here the answer's registers are written before its count. On x86-64
hosts (TCG's usual home) stores are not reordered with stores nor loads with loads, which is all
the protocol needs; other host architectures do not get the mailbox (:func:`host_supported`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import platform
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol

from qmp_sdei.errors import ConduitError
from qmp_sdei.stub import (
    A_CTX_VALID,
    A_DONE,
    A_FAST_UNTIL,
    A_MAIL_X,
    A_POST,
    A_TRAP_COUNT,
    A_TRAP_ELR2,
    A_TRAP_SPSR2,
    A_TRAP_TIME,
    A_VERDICT,
    CTX_REGS,
    HEADER_COUNTER_HZ,
    StubLayout,
)

log = logging.getLogger(__name__)

LEASE = 0.05  # seconds a vCPU may post after its last call served (guest counter time)
WATCH_MARGIN = 0.01  # the watcher stays hot this much longer than a lease it granted
POLL_INTERVAL = 20e-6  # seconds between looks at the posts right after a call
POLL_FAST_FOR = 2e-3  # ... for this long; then the interval grows with the quiet time
POLL_SLOWEST = 500e-6  # ... up to this: well inside the stub's 1 ms wait, a few % of a core
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_MAIL = struct.Struct(f"<{CTX_REGS}Q")
PR_SET_TIMERSLACK = 29


def host_supported() -> bool:
    """The mailbox relies on x86-64's store and load ordering (see the module docstring)."""
    return platform.machine().lower() in ("x86_64", "amd64")


class RamWindow(Protocol):
    """A mapped window of guest physical memory (:class:`qmp_sdei.qemu.guestram.GuestRamWindow`)."""

    base: int
    size: int
    buffer: memoryview

    def close(self) -> None: ...


class Mailboxes:
    """The mailbox fields of the stub's per-CPU areas, read and written through a RAM window.

    Plain loads and stores: callers keep the order the protocol needs (answer before count).
    """

    def __init__(self, window: RamWindow, layout: StubLayout, *, lease: float = LEASE) -> None:
        if not layout.has_mailbox:
            raise ConduitError("this EL2 stub has no mailbox (its header has no mailbox extension)")
        if not (window.base <= layout.base and layout.areas_end <= window.base + window.size):
            raise ConduitError(
                f"the guest RAM window [{window.base:#x}, {window.base + window.size:#x}) does not cover the "
                f"EL2 stub [{layout.base:#x}, {layout.areas_end:#x})"
            )
        self.window = window
        self.layout = layout
        self._mem = window.buffer
        self._lease_seconds = lease
        self.lease_ticks = 0  # known once the stub has run and recorded its counter frequency

    def _at(self, area: int, field: int) -> int:
        return area + field - self.window.base

    def read(self, area: int, field: int) -> int:
        value: int = _U64.unpack_from(self._mem, self._at(area, field))[0]
        return value

    def write(self, area: int, field: int, value: int) -> None:
        _U64.pack_into(self._mem, self._at(area, field), value & 0xFFFF_FFFF_FFFF_FFFF)

    def post(self, area: int) -> int:
        """The trap count of the call last posted in this area."""
        return self.read(area, A_POST)

    def posted_now(self, area: int) -> int | None:
        """The trap count of the vCPU's current call if it was posted (the vCPU is stopped in the
        stub for that call), else None."""
        count = self.read(area, A_TRAP_COUNT)
        # 0: the area has not posted since the stub (re)started (a reset reloads it zeroed)
        return count if count and self.read(area, A_POST) == count else None

    def trap_time(self, area: int) -> int:
        """CNTVCT at the vCPU's last trapped call. With the trap count it names one call for good:
        a reset reloads the stub and its counts start again, the guest's counter does not."""
        return self.read(area, A_TRAP_TIME)

    def arguments(self, area: int) -> list[int]:
        return list(_MAIL.unpack_from(self._mem, self._at(area, A_MAIL_X)))

    def trap_return(self, area: int) -> tuple[int, int]:
        """Where the vCPU's trapped call returns to: (ELR_EL2, SPSR_EL2) as the stub recorded them."""
        return self.read(area, A_TRAP_ELR2), self.read(area, A_TRAP_SPSR2)

    def write_bytes(self, addr: int, data: bytes) -> None:
        """Write ``data`` at guest physical ``addr`` (inside the window)."""
        at = addr - self.window.base
        self._mem[at : at + len(data)] = data

    def answer(self, area: int, count: int, verdict: int, registers: list[int] | None) -> None:
        """Give the stub its answer: the registers (if any), the verdict, and then the count it
        waits for."""
        if registers is not None:  # unsigned 64-bit values (struct refuses anything else)
            _MAIL.pack_into(self._mem, self._at(area, A_MAIL_X), *registers)
        self.write(area, A_VERDICT, verdict)
        self.write(area, A_DONE, count)

    def lease(self, area: int) -> bool:
        """Let this vCPU post its calls for LEASE from its last trapped call. False if the stub
        has not recorded its counter frequency yet (it writes it at boot)."""
        if not self.lease_ticks:
            hz = _U32.unpack_from(self._mem, self.layout.base + HEADER_COUNTER_HZ - self.window.base)[0]
            if not hz:
                return False
            self.lease_ticks = int(self._lease_seconds * hz)
        self.write(area, A_FAST_UNTIL, self.read(area, A_TRAP_TIME) + self.lease_ticks)
        return True

    def revoke(self, area: int) -> None:
        self.write(area, A_FAST_UNTIL, 0)

    def clear_context(self, area: int) -> None:
        """The stub stops answering EVENT_CONTEXT itself (see the conduit's ``_context_clear``)."""
        self.write(area, A_CTX_VALID, 0)


#: (vCPU, trap count, perf_counter_ns when seen); it must call the watcher's loop_done() when it
#: has finished with the post
PostHandler = Callable[[int, int, int], None]


class MailboxWatcher:
    """Watch the posts of the vCPUs' mailboxes from a thread, and hand each new one to the loop.

    Hot while a lease it granted may run, idle (blocked, no CPU) otherwise. Hot, it looks every
    POLL_INTERVAL for POLL_FAST_FOR after a call, then less often the longer the guest is quiet,
    down to every POLL_SLOWEST: polling every 20 us costs about half a host core, which a guest
    that calls now and then would otherwise cost all the time. The handler runs in the event
    loop, never in the thread.
    """

    def __init__(
        self,
        mailboxes: Mailboxes,
        on_post: PostHandler,
        loop: asyncio.AbstractEventLoop,
        *,
        interval: float = POLL_INTERVAL,
        hot_for: float = LEASE + WATCH_MARGIN,
        fast_for: float = POLL_FAST_FOR,
        slowest: float = POLL_SLOWEST,
    ) -> None:
        self._mailboxes = mailboxes
        self._on_post = on_post
        self._loop = loop
        self._interval = interval
        self._hot_for = hot_for
        self._fast_for = fast_for
        self._slowest = max(slowest, interval)
        self._last_call = 0.0  # monotonic time of the last post seen or lease granted
        # vCPU -> (area, the post already there when it was watched): replaced, never mutated, so
        # the thread always reads a whole mapping
        self._areas: dict[int, tuple[int, int]] = {}
        self._hot_until = 0.0
        self._polling = False  # the thread is in its hot loop (no need to wake it)
        self._wake = threading.Event()
        # Clear while the loop serves a post handed to it, or a stop: the thread then waits instead
        # of polling. Both share the host's cores with QEMU, and the loop could not take another
        # post before it is done anyway.
        self._loop_free = threading.Event()
        self._loop_free.set()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qmp-sdei-mailbox", daemon=True)
        self._thread.start()

    def watch(self, vcpu: int, area: int) -> None:
        """Watch this vCPU's area from now on; what is posted there already is not new."""
        if self._areas.get(vcpu, (None, 0))[0] != area:
            self._areas = {**self._areas, vcpu: (area, self._mailboxes.post(area))}

    def keep_hot(self) -> None:
        """A lease was granted: poll until it has surely run out."""
        now = time.monotonic()
        self._last_call = now
        self._hot_until = now + self._hot_for
        if not self._polling:
            self._wake.set()

    def _poll_interval(self) -> float:
        """POLL_INTERVAL right after a call, growing with the quiet time after POLL_FAST_FOR."""
        quiet = time.monotonic() - self._last_call
        if quiet <= self._fast_for:
            return self._interval
        return min(self._slowest, self._interval * quiet / self._fast_for)

    def loop_busy(self) -> None:
        """The loop serves a stop: no polling until :meth:`loop_done`."""
        self._loop_free.clear()

    def loop_done(self) -> None:
        """The loop is free again (it has served the post it was handed, or the stop)."""
        self._loop_free.set()

    def cool(self) -> None:
        """Stop polling now (the leases are revoked)."""
        self._hot_until = 0.0

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._loop_free.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        _fine_timer_slack()
        seen: dict[int, int] = {}
        next_first = 0
        post_at = A_POST - self._mailboxes.window.base
        mem = self._mailboxes.window.buffer
        unpack = _U64.unpack_from
        try:
            while not self._closed:
                if time.monotonic() >= self._hot_until:
                    # Say we are idle first, then look again: keep_hot() writes the deadline first,
                    # then looks at _polling, so one of the two sees the other (the GIL orders them).
                    self._polling = False
                    if time.monotonic() >= self._hot_until:
                        self._wake.wait()
                    self._wake.clear()
                    self._polling = True
                    continue
                self._loop_free.wait()
                watched = list(self._areas.items())
                start = next_first % len(watched) if watched else 0
                for n, (vcpu, (area, initial)) in enumerate(watched[start:] + watched[:start]):
                    count = unpack(mem, area + post_at)[0]
                    if count != seen.get(vcpu, initial):
                        seen[vcpu] = count
                        self._loop_free.clear()  # the handler sets it again (loop_done)
                        self._loop.call_soon_threadsafe(self._on_post, vcpu, count, time.perf_counter_ns())
                        # One post at a time; the next look starts after this vCPU, so a vCPU
                        # that calls back to back does not keep the others waiting.
                        next_first = start + n + 1
                        self._last_call = time.monotonic()
                        break
                time.sleep(self._poll_interval())
        except RuntimeError:  # the loop was closed under us: nothing left to hand posts to
            log.debug("mailbox watcher: event loop closed")
        except (ValueError, TypeError):  # the window was unmapped under us (closed)
            if not self._closed:
                raise


def _fine_timer_slack() -> None:
    """Sleep as long as asked: Linux lets a thread's sleeps run up to 50 us late by default,
    longer than the whole wait this watcher exists to shorten. Best effort."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
