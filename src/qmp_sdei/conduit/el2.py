"""The EL2-stub conduit: serve a guest through the stub's one trap site, with no kernel symbols.

When QEMU runs ``-M virt,virtualization=on`` and boots the guest through the stub shipped in
:mod:`qmp_sdei.stub`, every guest ``hvc``/``smc`` traps to EL2 and passes ``stub_trap_site`` with
the guest's registers untouched. This conduit keeps one breakpoint there (plus one on the stub's
"unexpected exception" loop, which it reports) and, once it knows a vCPU's per-CPU area, a write
watchpoint on that vCPU's doorbell, which the stub stores to right before the trap site: a
watchpoint stop spares QEMU the translation-cache flush every breakpoint stop costs. It reuses
:class:`GdbstubConduit`'s loop, with three differences, each a hook of the base class:

* Answering a call writes x0..x3 and sets the PC to ``stub_resume``, whose ``eret`` returns to the
  guest past its call; passing a call on sets the PC to ``trap_site + 4``, where the stub forwards
  it to QEMU's PSCI. No single-step either way.
* Anything that must change the guest's exception-return state (COMPLETE, COMPLETE_AND_RESUME,
  entering a handler at a trap stop) is written into the vCPU's per-CPU area in guest physical
  memory; ``stub_resume`` loads ELR/SPSR_EL2 (and ELR/SPSR_EL1) from there before its ``eret``.
  The debugger never writes PSTATE to change exception level, which QEMU's stub cannot do.
* A vCPU stopped at a trap site can take an event whatever mode it called from, since the
  ``eret`` sets the mode; a vCPU stopped at EL1 by an interrupt is served as the base class does.

It must not talk to the stub outside the base class's loop, and keeps no SDEI state.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from qmp_sdei.abi import psci, sdei
from qmp_sdei.abi.sdei import Function
from qmp_sdei.abi.smccc import SVE_HINT, function_id, has_sve_hint, to_u64
from qmp_sdei.conduit.gdbstub import LATENCY_SAMPLES, ConduitStats, GdbstubConduit, SdeiPort, ours_when_leaving
from qmp_sdei.conduit.gicwake import PENDING_CLEAR, PENDING_SET, VTIMER_BIT, find_redistributors
from qmp_sdei.conduit.mailbox import Mailboxes, MailboxWatcher, RamWindow, host_supported
from qmp_sdei.conduit.rsp import CoreRegs, RspClient, StopReply, ThreadId
from qmp_sdei.conduit.symbols import NOP, KernelCheckedConduit
from qmp_sdei.conduit.traps import linux_trap_sites, load_kallsyms
from qmp_sdei.errors import ConduitError, SdeiError
from qmp_sdei.sdei import Completion, VcpuRegs
from qmp_sdei.sdei.model import GPR_COUNT
from qmp_sdei.stub import (
    A_CTX_VALID,
    A_DOORBELL,
    A_FAST_UNTIL,
    A_KICK,
    A_NO_HALT,
    A_RESUME_FLAGS,
    A_TRAP_ELR2,
    A_TRAP_ESR2,
    A_UNPEND,
    CTX_REGS,
    DOORBELL_STORE,
    HEADER_SIZE,
    KICK_ENTER,
    KICK_STOP,
    MAGIC,
    RESUME_EL1,
    RESUME_EL2,
    VERDICT_ANSWERED,
    VERDICT_PASS,
    StubLayout,
    probe_addresses,
)

log = logging.getLogger(__name__)

SDEI_PROBE_GRACE = 60.0  # seconds after the guest's first PSCI call by which an SDEI client has probed
STUB_RETRY = 0.002  # seconds; a vCPU stopped inside the stub's resume path leaves it in a few instructions
KICK_GRACE = 0.05  # seconds; a kicked vCPU wakes within the stub's poll period (1 ms guest time)
WFI = 0xD503207F
# A stub that leaves its idle loop for a kick before it looks for the guest's interrupts, and
# takes KICK_ENTER straight to stub_resume, has these in its idle loop, the kick's load first.
LOAD_KICK = 0xF9402A50  # ldr x16, [x18, #A_KICK]
MRS_ISR = 0xD538C110  # mrs x16, isr_el1
CMP_KICK_ENTER = 0xF1000A1F  # cmp x16, #KICK_ENTER
_STUB_SCRATCH = struct.Struct("<4Q")  # x16..x19 as the idle loop keeps them on its stack
_IDLE_HEAD = A_KICK + 8  # a per-CPU area up to its kick: resume request, trap record, kick
NO_HALT_REGISTER = 17  # the idle loop keeps the no-halt flag it read in x17 until its wfi/wfe
PSTATE_EL_MASK = 0xC
PSTATE_EL2 = 0x8
_RESUME_BLOCK = struct.Struct("<QQQQQ")  # flags, ELR_EL2, SPSR_EL2, ELR_EL1, SPSR_EL1
_PAIR = struct.Struct("<QQ")
_CONTEXT_BLOCK = struct.Struct(f"<Q{CTX_REGS}Q")  # A_CTX_VALID, then the interrupted x0..x17
_ZERO = (0).to_bytes(8, "little")
_NO_CONTEXT = _ZERO
_CONTEXT_SWITCHES = (Function.EVENT_COMPLETE, Function.EVENT_COMPLETE_AND_RESUME)
LEASE_UNTIL_COMPLETE = 0xFFFF_FFFF_FFFF_FFFF  # a handler's vCPU posts until its COMPLETE is served


def _resume_request(pc: int, pstate: int, el1: tuple[int, int] | None = None) -> tuple[int, int, int, int, int]:
    """A resume request for ``stub_resume`` (flags, ELR2, SPSR2, ELR1, SPSR1): return to ``pc`` in
    ``pstate``, and with ``el1`` also load ELR/SPSR_EL1 (a COMPLETE_AND_RESUME's)."""
    elr1, spsr1 = el1 if el1 is not None else (0, 0)
    flags = RESUME_EL2 | (RESUME_EL1 if el1 is not None else 0)
    return flags, to_u64(pc), pstate & 0xFFFF_FFFF, to_u64(elr1), spsr1 & 0xFFFF_FFFF


class _MailAnswer(NamedTuple):
    """What the mailbox answered a posted call with, kept until that vCPU's next call."""

    call: tuple[int, int]  # (trap count, trap time): the call, for good (see _mail_answers)
    verdict: int
    registers: list[int]  # x0..x17 as the guest gets them
    resume: tuple[int, int, int, int, int] | None  # the resume request written with it, if any
    entered: bool  # a handler was entered on its return


async def use_physical_memory(rsp: RspClient, physical: bool = True) -> bool:
    """Make ``m``/``M`` address guest physical (or, again, virtual) memory (``qemu.PhyMemMode``).

    The stub's areas are physical addresses, and the vCPU a memory access goes through may be at
    EL1 with its MMU on. The symbol conduit patches kernel code by virtual address: it needs the
    mode off. Returns False if this gdbstub has no such mode (then accesses stay virtual, which
    reach the stub too whenever the vCPU they go through runs stub code: EL2, MMU off).
    """
    reply = await rsp.request(f"Qqemu.PhyMemMode:{int(physical)}")
    return reply == b"OK"


async def probe_stub(rsp: RspClient, memory_mb: int = 0) -> StubLayout | None:
    """The stub's layout if the VM was booted through it, else None. The VM must be stopped.

    Looks at the direct-boot address, then at the firmware-boot slot at the top of RAM: of
    ``memory_mb`` if known, else for RAM sizes in steps of 256 MiB. Leaves the stub in
    physical-memory mode exactly when it returns a layout.
    """
    if not await use_physical_memory(rsp):
        log.warning("the gdbstub has no physical-memory mode; looking for the EL2 stub through vCPU addresses")
    bases = probe_addresses(memory_mb)
    # All candidates in one round trip: this runs between a migration's arrival and the guest
    # running on the destination, where a read per candidate cost several milliseconds.
    headers = await rsp.read_memory_regions([(base, HEADER_SIZE) for base in bases])
    for base, header in zip(bases, headers, strict=True):
        if header is not None and header[8:16] == MAGIC:
            return StubLayout.parse(base, header)
    await use_physical_memory(rsp, physical=False)
    return None


@dataclass
class El2Stats(ConduitStats):
    """The base counters plus the stub's idle path."""

    idle_kicks: int = 0  # deliveries to a vCPU idling in the stub: kick flag written
    idle_wakes: int = 0  # stops at the wake site
    idle_gic_wakes: int = 0  # kicks sent with a wake-up through the vCPU's redistributor
    idle_entries: int = 0  # handlers entered from the stop that found their vCPU halted in the stub
    entries_over_request: int = 0  # entered at stub_resume on top of an earlier stop's pending request
    doorbell_stops: int = 0  # calls stopped by the doorbell watchpoint (no translation-cache flush)
    mailbox_calls: int = 0  # calls answered (or passed on to QEMU) through the mailbox, no VM stop
    mailbox_timeouts: int = 0  # posted calls that stopped before an answer: served in the stop
    mailbox_late: int = 0  # ... answered by the mailbox after the stub gave up: that answer, applied in the stop
    #: the event loop took a post -> its answer written: the sidecar's share of a mailbox call, as
    #: trap_handling_ns is of a stopped one (stop reply read by the loop -> resume written)
    mailbox_ns: deque[int] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    #: the watcher thread saw a post -> the event loop took it (the hand-over between the two)
    mailbox_handover_ns: deque[int] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))


class El2Conduit(GdbstubConduit):
    """Serve one VM through the EL2 stub (see the module docstring)."""

    def __init__(
        self,
        rsp: RspClient,
        dispatcher: SdeiPort,
        layout: StubLayout,
        *,
        timeout: float = 10.0,
        ram: RamWindow | None = None,
    ) -> None:
        """:param ram: guest RAM mapped from QEMU's shared memory backend, covering the stub: its
        calls are then answered through the mailbox while calls come (see :mod:`.mailbox`). The
        conduit closes it."""
        super().__init__(rsp, dispatcher, [layout.trap_site, layout.unexpected, layout.wake_site], timeout=timeout)
        self.layout = layout
        self.stats: El2Stats = El2Stats()
        # vCPU -> the exception return its next stub_resume will make, when we changed it this stop
        self._next_return: dict[int, tuple[int, int]] = {}
        # ... and the ELR/SPSR_EL1 it loads too (a COMPLETE_AND_RESUME's), kept when a handler is
        # entered on top of that return in the same stop
        self._next_el1: dict[int, tuple[int, int]] = {}
        self._kicked: set[int] = set()  # vCPUs told to leave the idle loop for the wake site
        # vCPUs whose area holds no valid handler context (A_CTX_VALID = 0): all of them after
        # start(), which clears every area's flag (a previous sidecar may have left one set).
        self._context_clear: set[int] = set()
        self._areas: dict[int, int] = {}  # vCPU -> its per-CPU area, learnt when it stops in the stub
        # vCPU -> (ELR_EL2, SPSR_EL2) the stub recorded at its trap, read with this stop's registers
        self._recorded: dict[int, tuple[int, int]] = {}
        self._doorbell = False  # the stub stores to a doorbell before its trap site (start() checks)
        self._wake_doorbell = False  # ... and before its wake site
        self._watched: set[int] = set()  # doorbell addresses with a watchpoint
        self._probe_watch: asyncio.TimerHandle | None = None
        self._probe_reported = False
        self._halted_at_switchover: list[int] = []
        self._after_wfi = -1  # the address after the idle loop's wfi: a vCPU halted there shows it
        # With a stub that takes a kick before a pending interrupt and knows KICK_ENTER (start()
        # checks), a vCPU halted in the idle loop gets its handler from the stop that finds it, and
        # kicks wake it through its GIC redistributor (gicwake.py). Public so that a benchmark can
        # compare with the older way (kick, wait for the poll, stop at the wake site).
        self.enter_from_idle = True
        self.wake_through_gic = True
        self._kick_enters = False
        self._redistributors: dict[int, int] | None = None  # vCPU -> frame; None: not looked up yet
        # vCPU -> (its area's first _IDLE_HEAD bytes, the stub's x16..x19 atop its stack), read this
        # stop with its registers because an event waits for it
        self._idle_views: dict[int, tuple[bytes, bytes]] = {}
        self._ram = ram
        self._mail: Mailboxes | None = None
        self._watcher: MailboxWatcher | None = None
        self._mail_paused = False  # a migration runs: no leases, no answers through guest RAM
        # A posted call is named by (trap count, trap time): counts start again when a reset reloads
        # the stub, the guest's counter goes on.
        self._mail_answers: dict[int, _MailAnswer] = {}  # vCPU -> its last call the mailbox answered
        self._mail_taken: dict[int, tuple[int, int]] = {}  # vCPU -> a posted call a stop served
        self._mail_failure: BaseException | None = None
        self._mail_deferred: set[int] = set()  # vCPUs whose post came while a stop was served
        self._serving_post = False  # a handler is being entered on a posted call's return

    def _watch_for_sdei_probe(self) -> None:
        """The guest's firmware interface is up (a PSCI call came): if no SDEI call follows within
        SDEI_PROBE_GRACE, or before the VM goes, say so. A guest that was never told about SDEI (no
        /firmware/sdei in its device tree, no ACPI SDEI table) would otherwise run without it,
        unnoticed."""
        if self._probe_watch is None:
            loop = asyncio.get_running_loop()
            self._probe_watch = loop.call_later(SDEI_PROBE_GRACE, self._check_sdei_probed, "within the grace time")

    async def run(self, *, resume: bool = True) -> None:
        try:
            await super().run(resume=resume)
        finally:
            self._close_mailbox()
            if self._probe_watch is not None:
                self._probe_watch.cancel()
                if self.exit_reason is not None:  # the VM went by itself, not a detach
                    self._check_sdei_probed("before the VM stopped")

    def _check_sdei_probed(self, when: str) -> None:
        if self._probe_reported or self.stats.sdei_calls or self._stop_requested():
            return
        self._probe_reported = True
        calls = self.stats.psci_answered + self.stats.psci_passthrough
        self.report_problem(
            f"the guest made {calls} PSCI call(s) but no SDEI call {when}: it was probably not told about "
            "SDEI (a device tree without /firmware/sdei, or ACPI without the SDEI table: see qmp-sdei "
            "qemu-args and sdeitab.efi)"
        )

    def _retry_delivery(self, vcpu: int) -> None:
        """STUB_RETRY after finding ``vcpu`` inside the stub: stop the VM again if it still waits."""
        if vcpu in self.dispatcher.deliverable():
            self._stop_again(vcpu, self._retry_delivery)

    def _check_kicked(self, vcpu: int) -> None:
        """KICK_GRACE after a kick: if that vCPU still waits, stop the VM so delivery is retried."""
        if vcpu in self._kicked and vcpu in self.dispatcher.deliverable():
            log.debug("vCPU %d did not wake within %.3fs of its kick: stopping the VM again", vcpu, KICK_GRACE)
            self._stop_again(vcpu, self._check_kicked)

    def _stop_again(self, vcpu: int, retry: Callable[[int], None]) -> None:
        """Interrupt the VM for a delivery that waits. When a stop is being served instead, look
        again after it (``retry`` in STUB_RETRY): that stop may be past its delivery pass, and a
        retry dropped here left the event undelivered for good when the guest took no exception
        (the vector breakpoints it then waits at never fire). A VM its owner holds is left alone:
        delivery follows its resume."""
        if self._running:
            self._interrupt()
        elif self._in_stop:
            asyncio.get_running_loop().call_later(STUB_RETRY, retry, vcpu)

    async def start(self) -> None:
        """As the base class, after checking that the stub's trap and wake sites hold the ``nop``
        the breakpoints expect (a stub of another build would trap nowhere, silently)."""
        # A stub built before the doorbell has other code there: its calls stop at the breakpoints.
        trap, wake = self.layout.trap_site, self.layout.wake_site
        # One round trip for the four words (this is downtime on a migration destination).
        regions = [(trap - 4, 4), (wake - 4, 4), (trap, 4), (wake, 4)]
        words: list[int] = []
        for (addr, _), data in zip(regions, await self.rsp.read_memory_regions(regions), strict=True):
            if data is None:
                raise ConduitError(f"cannot read the EL2 stub's code at {addr:#x}")
            words.append(int.from_bytes(data, "little"))
        before_trap, before_wake, at_trap, at_wake = words
        self._doorbell = before_trap == DOORBELL_STORE
        self._wake_doorbell = self._doorbell and before_wake == DOORBELL_STORE
        for name, site, word in (("trap", trap, at_trap), ("wake", wake, at_wake)):
            if word != NOP:
                raise ConduitError(
                    f"the EL2 stub's {name} site {site:#x} holds {word:#010x}, not a nop: the stub in guest "
                    "memory does not match its header (a damaged or foreign stub)"
                )
        # No handler context from before this attach stays valid: the stub would answer a later
        # handler's EVENT_CONTEXT from it. Nor a migration's "no halting" (a destination's guest
        # arrives with it set). The VM is stopped.
        # Nor a lease of a sidecar before us: the stub would post calls nobody watches.
        fields = (A_CTX_VALID, A_NO_HALT, A_FAST_UNTIL) if self.layout.has_mailbox else (A_CTX_VALID, A_NO_HALT)
        await self._write_every_area(fields, _ZERO, "clearing the stub's handler contexts")
        await super().start()
        self._start_mailbox()
        self._context_clear = set(range(len(self.threads)))
        idle = await self.rsp.read_memory(self.layout.idle.start, len(self.layout.idle))
        words = [int.from_bytes(idle[i : i + 4], "little") for i in range(0, len(idle) - 3, 4)]
        if WFI not in words:
            raise ConduitError("the EL2 stub's idle loop holds no wfi: the stub in guest memory is not the one built")
        self._after_wfi = self.layout.idle.start + 4 * words.index(WFI) + 4
        # A stub built before would go back to the guest for our wake-up interrupt and stop at
        # the wake site for any kick: for it, kicks wait for the poll.
        self._kick_enters = (
            CMP_KICK_ENTER in words
            and LOAD_KICK in words
            and MRS_ISR in words
            and words.index(LOAD_KICK) < words.index(MRS_ISR)
        )

    def _start_mailbox(self) -> None:
        """Use the mailbox if the stub has one and guest RAM is mapped; say why not otherwise."""
        if self._ram is None:
            log.info("guest RAM is not shared with the sidecar: every call stops the VM (see qemu-args)")
            return
        if not self.layout.has_mailbox:
            log.info("the EL2 stub in this VM predates the mailbox: every call stops the VM")
        elif not host_supported():
            log.info("no mailbox on this host architecture: every call stops the VM")
        else:
            self._mail = Mailboxes(self._ram, self.layout)
            self._watcher = MailboxWatcher(self._mail, self._serve_post, asyncio.get_running_loop())
            log.info("calls are answered through the stub's mailbox in shared guest RAM while they come")
            return
        self._ram.close()
        self._ram = None

    def _revoke_leases(self) -> None:
        """No vCPU posts from now on (one waiting already stops when its wait runs out)."""
        if self._mail is not None:
            for area in set(self._areas.values()):
                self._mail.revoke(area)
        if self._watcher is not None:
            self._watcher.cool()

    def _close_mailbox(self) -> None:
        """Revoke every lease and stop watching (the stub's posted calls then stop at the doorbell,
        or, with nobody attached, go to QEMU); unmap guest RAM."""
        self._revoke_leases()
        self._mail = None
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._ram is not None:
            self._ram.close()
            self._ram = None

    def _lease(self, vcpu: int, area: int) -> None:
        """Let this vCPU post its next calls (a call of its was just served)."""
        if self._mail is None or self._watcher is None or not self._mail_may_lease():
            return
        if self._mail.read(area, A_FAST_UNTIL) == LEASE_UNTIL_COMPLETE or self._mail.lease(area):
            # (a running handler's lease, until its COMPLETE, is never shortened)
            self._watcher.watch(vcpu, area)
            self._watcher.keep_hot()

    def _mail_may_lease(self) -> bool:
        return not (self._mail_paused or self._stopping or self._gate_closed)

    def _posted_call_in_stop(self, vcpu: int, area: int, core: CoreRegs) -> bool:
        """A vCPU stopped at the doorbell or trap site: if its call was posted and the mailbox
        answered it after the stub stopped waiting, apply that answer (True). Otherwise the stop
        serves the call, and the mailbox must never answer it."""
        if self._mail is None:
            return False
        count = self._mail.posted_now(area)
        if count is None:
            return False
        call = (count, self._mail.trap_time(area))
        answered = self._mail_answers.get(vcpu)
        if answered is None or answered.call != call:
            self._mail_taken[vcpu] = call
            self.stats.mailbox_timeouts += 1
            return False
        self.stats.mailbox_late += 1
        core.x[:CTX_REGS] = answered.registers
        core.pc = self.layout.resume if answered.verdict == VERDICT_ANSWERED else self.layout.trap_site + 4
        self._dirty[vcpu] = core
        if answered.resume is not None:  # already in the area: this stop's deliveries go on top of it
            flags, elr2, spsr2, elr1, spsr1 = answered.resume
            self._next_return[vcpu] = (elr2, spsr2)
            if flags & RESUME_EL1:
                self._next_el1[vcpu] = (elr1, spsr1)
        return True

    def _answer_when_leaving(self, vcpu: int, core: CoreRegs) -> bool:
        """Also a call the mailbox answered after its vCPU stopped waiting: the dispatcher has
        served it, so the guest must get that answer, not QEMU's."""
        if super()._answer_when_leaving(vcpu, core):
            return True
        area = self._areas.get(vcpu)
        answered = self._mail_answers.get(vcpu)
        if self._mail is None or area is None or answered is None:
            return False
        count = self._mail.posted_now(area)
        return count is not None and answered.call == (count, self._mail.trap_time(area))

    def _serve_post(self, vcpu: int, count: int, seen_ns: int) -> None:
        """A vCPU posted a call (the watcher saw it; this runs in the event loop). Answer it, or
        leave it to the stop it makes when its wait runs out: while a migration runs or the conduit
        is leaving. One that comes while a stop is served waits for the stop's end."""
        taken = time.perf_counter_ns()
        try:
            if self._answer_post(vcpu, count, taken):
                self.stats.mailbox_handover_ns.append(taken - seen_ns)
        finally:
            if self._watcher is not None and not self._in_stop:
                self._watcher.loop_done()

    def _answer_post(self, vcpu: int, count: int, taken_ns: int, *, leaving: bool = False) -> bool:
        """Answer a post (see :meth:`_serve_post`); whether it did. ``taken_ns``: when the loop
        took it (perf_counter_ns). ``leaving``: at the last stop before a detach, with the VM
        stopped, answer the calls still ours to answer then (see :meth:`_serve_posts_when_leaving`)."""
        mail = self._mail
        area = self._areas.get(vcpu)
        if (
            mail is None
            or area is None
            or not (leaving or self._mail_may_lease())
            or self._mail_failure is not None
            or mail.posted_now(area) != count
        ):
            # Not the vCPU's current call (any more): answered or served at a stop already, and
            # the vCPU may be posting its next one right now (its trap count and time are written
            # first, its arguments and post count after): nothing of that may be read yet.
            return False
        # By count alone here: the vCPU runs, and once this call is over it may have stored its
        # next call's trap time but not yet its count, so (count, time) could be read torn and
        # pass for a new call. Refusing a count seen before is always safe: if it is a new call
        # after all (a reset restarted the counts), its wait runs out and its stop serves it.
        taken, answered = self._mail_taken.get(vcpu), self._mail_answers.get(vcpu)
        if (taken is not None and taken[0] == count) or (answered is not None and answered.call[0] == count):
            return False
        call = (count, mail.trap_time(area))
        registers = mail.arguments(area)
        if leaving:
            if not ours_when_leaving(registers[0]):
                return False
        elif not self._running or self._in_stop or self._held:
            # A stop is being served (its resume may be out already, and the vCPU posting right
            # behind it), or the VM is not ours to run: offered again when that is over.
            self._mail_deferred.add(vcpu)
            return False
        fid = function_id(registers[0])
        try:
            answer = self._dispatch_posted(vcpu, area, call, fid, registers)
        except Exception as err:  # the run loop raises it at its next stop; the stub stops there
            self._mail_failure = err
            if self._running and not self._interrupt_sent:
                self._interrupt()
            return False
        self._mail_answers[vcpu] = answer
        if answer.resume is not None:  # before the count: stub_resume loads it
            mail.write_bytes(area + A_RESUME_FLAGS, _RESUME_BLOCK.pack(*answer.resume))
        mail.answer(area, count, answer.verdict, answer.registers)
        self.stats.mailbox_calls += 1
        self.stats.mailbox_ns.append(time.perf_counter_ns() - taken_ns)
        if fid in _CONTEXT_SWITCHES:
            if not answer.entered:
                mail.revoke(area)  # the handler's lease ends with it (see _deliver_one)
        elif not answer.entered:  # (entering a handler leased the vCPU until its COMPLETE)
            self._lease(vcpu, area)
        if self.dispatcher.deliverable() and not leaving:
            self.request_delivery()
        return True

    async def _serve_posts_when_leaving(self, stopped: ThreadId | None) -> None:
        """At the last stop before a detach: answer, through the mailbox, the posted calls that
        are still ours to answer then (a handler's COMPLETE above all: left to QEMU it would get
        NOT_SUPPORTED, and Linux's handler exit then spins for good). A vCPU that posted one just
        before the leases were revoked is still waiting in the stub, not at a call site, so the
        stop itself does not see it; it takes the answer when the VM runs on. Only a vCPU still
        inside the wait loop: one past it is on its way to the doorbell and QEMU."""
        mail = self._mail
        if mail is None or self.registers is None:
            return
        now = time.perf_counter_ns()
        looked = False
        self._g_thread = stopped or self.threads[0]  # where QEMU points g after a stop (_handle_stop)
        for vcpu, area in list(self._areas.items()):
            count = mail.posted_now(area)
            if count is None or vcpu >= len(self.threads):
                continue
            await self._select(self.threads[vcpu])
            looked = True
            if await self.rsp.read_register(self._pc_regnum()) in self.layout.mailbox_wait:
                self._answer_post(vcpu, count, now, leaving=True)
        if looked:  # the stop's handling reads the stopped vCPU with g: point QEMU back at it
            await self._select(stopped or self.threads[0])

    def _offer_deferred_posts(self) -> None:
        """Serve the posts that came while a stop was served (see :meth:`_serve_post`)."""
        deferred, self._mail_deferred = self._mail_deferred, set()
        if self._mail is None:
            return
        now = time.perf_counter_ns()
        for vcpu in deferred:
            area = self._areas.get(vcpu)
            count = self._mail.posted_now(area) if area is not None else None
            if count is not None:
                self._answer_post(vcpu, count, now)

    async def _serve_stop(self, stop: StopReply, *, ours: bool) -> None:
        if self._watcher is not None:
            self._watcher.loop_busy()
        if self._stopping:
            await self._serve_posts_when_leaving(stop.thread)  # before the stop's bracket: it has its own
        try:
            await super()._serve_stop(stop, ours=ours)
        finally:
            if self._mail_deferred:
                self._offer_deferred_posts()
            if self._watcher is not None:
                self._watcher.loop_done()

    def _interrupt(self) -> None:
        """As the base class; the watcher also rests until the stop is served: no post can be
        answered before that, and QEMU needs the host's cores to stop the VM."""
        if self._watcher is not None:
            self._watcher.loop_busy()
        super()._interrupt()

    async def owner_resumed(self) -> None:
        await super().owner_resumed()
        if self._watcher is not None and not self._held:
            self._watcher.keep_hot()  # leases are guest time, which stood still while it was held
        if self._mail_deferred:
            self._offer_deferred_posts()

    def _dispatch_posted(
        self, vcpu: int, area: int, call: tuple[int, int], fid: int, registers: list[int]
    ) -> _MailAnswer:
        """Serve a posted call as :meth:`_trap` serves one at a stop; ``registers`` becomes the
        answer's x0..x17. A COMPLETE's return state goes into a resume request, which the stub's
        ``stub_resume`` loads on its way back (as after a stop)."""
        assert self._mail is not None
        self.stats.traps += 1
        if fid != Function.EVENT_CONTEXT and vcpu not in self._context_clear:
            self._mail.clear_context(area)  # as _trap does, before the guest sees the answer
            self._context_clear.add(vcpu)
        resume: tuple[int, int, int, int, int] | None = None
        self.dispatcher.begin_stop()
        try:
            returns_to = self._mail.trap_return(area)
            if sdei.is_sdei_range(fid):
                self.stats.sdei_calls += 1
                # COMPLETE's own return state is the handler's (its call site); COMPLETE_AND_RESUME
                # keeps its PAN bit. Other calls see stub_resume, as at a stop.
                pc, pstate = returns_to if fid in _CONTEXT_SWITCHES else (self.layout.resume, returns_to[1])
                regs = VcpuRegs([*registers, *[0] * (GPR_COUNT - CTX_REGS)], pc, pstate)
                completion = self.dispatcher.hypercall(vcpu, regs)
                registers[:] = [to_u64(v) for v in regs.x[:CTX_REGS]]
                if completion in (Completion.COMPLETE, Completion.COMPLETE_AND_RESUME):
                    el1 = (regs.elr_el1, regs.spsr_el1) if completion is Completion.COMPLETE_AND_RESUME else None
                    resume = _resume_request(regs.pc, regs.pstate, el1)
                    returns_to = resume[1], resume[2]
                verdict = VERDICT_ANSWERED
            else:
                verdict = VERDICT_PASS
                if psci.is_psci_range(fid):
                    self._watch_for_sdei_probe()
                    answer = self.dispatcher.psci_call(vcpu, fid, registers[1], registers[2], registers[3])
                    if answer is not None:
                        self.stats.psci_answered += 1
                        registers[0] = to_u64(answer)
                        verdict = VERDICT_ANSWERED
                    else:
                        self.stats.psci_passthrough += 1
                else:
                    self.stats.other_passthrough += 1
                if verdict == VERDICT_PASS and has_sve_hint(registers[0]):
                    registers[0] &= ~SVE_HINT  # as _strip_sve_hint: QEMU 7.2's PSCI does not know it
            entry = None
            if verdict == VERDICT_ANSWERED and vcpu in self.dispatcher.deliverable():
                el1 = (resume[3], resume[4]) if resume is not None and resume[0] & RESUME_EL1 else None
                entry = self._enter_from_post(vcpu, registers, returns_to, el1)
            self.dispatcher.commit()
        finally:
            self.dispatcher.end_stop()
        return _MailAnswer(call, verdict, registers, entry or resume, entry is not None)

    def _enter_from_post(
        self, vcpu: int, registers: list[int], returns_to: tuple[int, int], el1: tuple[int, int] | None
    ) -> tuple[int, int, int, int, int] | None:
        """Enter the handlers now deliverable on a vCPU whose posted call was just answered (an
        EVENT_SIGNAL to itself, a PE_UNMASK with an event pending, a COMPLETE with another event
        waiting), as a stop at the trap site would: on the call's return (``returns_to``), before
        the guest's next instruction. Returns the resume request that enters it (it replaces the
        call's own, keeping a COMPLETE_AND_RESUME's ``el1`` part); its registers become the answer."""
        regs = VcpuRegs([*registers, *[0] * (GPR_COUNT - CTX_REGS)], *returns_to)
        self._serving_post = True
        try:
            if not self._enter_deliverable(vcpu, regs):
                return None
        finally:
            self._serving_post = False
        registers[:] = [to_u64(v) for v in regs.x[:CTX_REGS]]
        self._kicked.discard(vcpu)
        if self._delivery_requested_ns:
            self.stats.delivery_ns.append(time.perf_counter_ns() - self._delivery_requested_ns)
            self._delivery_requested_ns = 0
        return _resume_request(regs.pc, regs.pstate, el1)

    async def detach(self) -> None:
        """As the base class. The leases go first: a call posted now stops at the doorbell and is
        served by the last stop; one the mailbox answered stays answered (its record is kept)."""
        self._revoke_leases()
        try:
            await super().detach()
        finally:
            self._close_mailbox()

    async def close(self) -> None:
        self._revoke_leases()
        try:
            await super().close()
        finally:
            self._close_mailbox()

    async def _write_every_area(self, fields: tuple[int, ...], value: bytes, what: str) -> None:
        """Write ``value`` at each of ``fields`` in every per-CPU area the stub has, in one pipelined
        batch (the VM must be stopped). Every area, not one per vCPU: the stub picks a vCPU's area
        from its MPIDR, which is not its index beyond the first cluster."""
        areas = [self.layout.percpu + n * self.layout.percpu_size for n in range(self.layout.max_cpus)]
        for fut in self.rsp.send(*(f"M{area + at:x},{len(value):x}:{value.hex()}" for area in areas for at in fields)):
            reply = await self.rsp.reply(fut, what, self.timeout)
            if reply != b"OK":
                raise ConduitError(f"could not finish {what}: gdbstub replied {reply[:60]!r}")

    async def hold_vcpus_awake(self, awake: bool) -> None:
        """While a migration runs, keep idle vCPUs polling in the stub instead of halting in ``wfi``.

        Why: QEMU recomputes a vCPU's virtual timer while it loads the vCPU's registers on the
        destination, before it loads the interrupt controller, whose state from the source then
        hides the timer's interrupt. A vCPU halted in the stub's idle loop whose poll deadline had
        just passed at the switchover would never wake again (measured: about one migration in ten
        of an idle guest hung). A vCPU that runs rewrites its timer, which signals again. Takes
        effect within one poll period, long before a switchover; costs host CPU only while set.
        """
        flag = (1 if awake else 0).to_bytes(8, "little")
        # Nor any call answered through guest RAM meanwhile: QEMU tracks only the guest's own
        # writes to RAM for the migration, not ours. Calls stop the VM until the migration ends.
        self._mail_paused = awake
        if awake:
            self._revoke_leases()

        async def write() -> None:
            await self._write_every_area((A_NO_HALT,), flag, "setting the stub's no-halt flags")

        await self._at_next_stop(write)
        log.info("idle vCPUs %s", "poll without halting until the migration ends" if awake else "halt again")

    async def wait_parked(self, timeout: float) -> None:
        """As the base class; then, with the VM held at QEMU's migration stop, note every vCPU that
        could halt on the destination before it rewrites its timer (see :meth:`switchover_safe`):
        one sitting right after the idle loop's ``wfi``, or one on its way there that read the
        no-halt flag as clear (x17). A register read or two per vCPU, inside the downtime."""
        await super().wait_parked(timeout)
        self._halted_at_switchover = []
        if not (self._held and super().switchover_safe()):
            return
        pc_regnum = self._pc_regnum()
        wfi = self._after_wfi - 4
        for thread in self.threads:
            await self._select(thread)
            pc = await self.rsp.read_register(pc_regnum)
            if pc == self._after_wfi or (
                self.layout.idle.start < pc <= wfi and await self.rsp.read_register(NO_HALT_REGISTER) == 0
            ):
                self._halted_at_switchover.append(thread.vcpu)
        if self._halted_at_switchover:
            log.warning(
                "vCPU(s) %s halted (or about to halt) in the stub's idle loop at the switchover although idle "
                "vCPUs were told to poll: refusing it (QEMU could lose their timer interrupt on the destination)",
                self._halted_at_switchover,
            )

    def switchover_safe(self) -> bool:
        """As the base class, and no vCPU halted in the stub (see :meth:`hold_vcpus_awake`)."""
        return super().switchover_safe() and not self._halted_at_switchover

    def _pc_regnum(self) -> int:
        assert self.registers is not None
        info = self.registers.find("pc")
        if info is None:
            raise ConduitError("the gdbstub's register map has no pc")
        return info.regnum

    async def _arm(self) -> None:
        await super()._arm()
        for doorbell in sorted(self._watched):
            await self.rsp.insert_watchpoint(doorbell)

    async def _disarm_extra(self) -> None:
        for doorbell in sorted(self._watched):
            await self.rsp.remove_watchpoint(doorbell)

    def _at_call_site(self, pc: int) -> bool:
        # QEMU stops an aarch64 vCPU *before* the store a watchpoint catches: at the doorbell
        # store, the instruction before the trap site, with the guest's registers in place. The
        # call is served there like at the trap site; the vCPU goes on at stub_resume (answered)
        # or trap_site + 4 (passed on), so the store never runs. The same store comes before the
        # wake site, where a kicked idle vCPU stops on its way back to the guest.
        return (
            pc in self.trap_sites
            or (self._doorbell and pc == self.layout.trap_site - 4)
            or (self._wake_doorbell and pc == self.layout.wake_site - 4)
        )

    async def _learn_area(self, vcpu: int, core: CoreRegs) -> None:
        """Note the per-CPU area of a vCPU stopped in the stub, and watch its doorbell from now on.

        A breakpoint stop makes QEMU (7.2, 10.0) flush its whole translation cache, and the guest
        then retranslates all the code it runs; a watchpoint stop does not (it drops only the one
        translated block of the store). So every call after a vCPU's first stops at the store to
        its doorbell, right before the trap site, with the guest's registers in place. The trap
        site's breakpoint stays as the backstop: when two vCPUs hit their watchpoints at once
        QEMU reports one, and the other stops after its store, at the trap site.
        """
        area = self._area(core)
        self._areas[vcpu] = area
        doorbell = area + A_DOORBELL
        if self._doorbell and doorbell not in self._watched:
            await self.rsp.insert_watchpoint(doorbell)
            self._watched.add(doorbell)

    async def read_system_register(self, name: str, vcpu: int = 0) -> int:
        """Read one of the guest's system registers (e.g. ``VBAR_EL1``, whose distance from the
        kernel's link-time ``vectors`` is the KASLR offset) at the next stop."""
        assert self.registers is not None
        regnum = self.registers[name].regnum
        value: list[int] = []

        async def read() -> None:
            await self._select(self.threads[vcpu])
            value.append(await self.rsp.read_register(regnum))

        await self._at_next_stop(read)
        if not value:
            raise ConduitError(f"could not read {name} on vCPU {vcpu}")
        return value[0]

    def _area(self, core: CoreRegs) -> int:
        return self.layout.area_below(core.sp)

    async def _read_pair(self, addr: int) -> tuple[int, int]:
        first, second = _PAIR.unpack(await self.rsp.read_memory(addr, _PAIR.size))
        return first, second

    async def _interrupted(self, vcpu: int, core: CoreRegs) -> tuple[int, int]:
        """Where the guest returns to from this stop (PC, PSTATE), as the stub will eret."""
        planned = self._next_return.get(vcpu) or self._recorded.get(vcpu)
        if planned is not None:
            return planned
        return await self._read_pair(self._area(core) + A_TRAP_ELR2)

    async def _pending_request(self, vcpu: int, core: CoreRegs) -> tuple[int, int, int, int, int]:
        """The resume request (flags, ELR2, SPSR2, ELR1, SPSR1) in the area of a vCPU stopped in
        the stub that ``stub_resume`` has not consumed yet (flags 0: none); read with its registers
        when an event waited for it, else one round trip."""
        area = self._area(core)
        view = self._idle_views.get(vcpu)
        block = (
            view[0][A_RESUME_FLAGS : A_RESUME_FLAGS + _RESUME_BLOCK.size]
            if view is not None and self._areas.get(vcpu) == area
            else await self.rsp.read_memory(area + A_RESUME_FLAGS, _RESUME_BLOCK.size)
        )
        flags, elr2, spsr2, elr1, spsr1 = _RESUME_BLOCK.unpack(block)
        return flags, elr2, spsr2, elr1, spsr1

    async def _read_stopped(self, thread: ThreadId) -> CoreRegs:
        vcpu = thread.vcpu
        area = self._areas.get(vcpu)
        if area is not None and vcpu in self.dispatcher.deliverable():
            return await self._read_with_idle_view(thread, area, select=False)
        if area is None or vcpu in self._context_clear:
            return await super()._read_stopped(thread)
        # A handler runs on this vCPU, so its next call is most likely its COMPLETE, which needs
        # the return state the stub recorded at the trap: read it in the same round trip.
        core, (record,) = await self.rsp.read_core_and_memory((area + A_TRAP_ELR2, _PAIR.size))
        if self._area(core) == area:  # stopped in the stub (else the record is an older trap's)
            self._recorded[vcpu] = _PAIR.unpack(record)
        return core

    async def _read_for_delivery(self, thread: ThreadId) -> CoreRegs:
        area = self._areas.get(thread.vcpu)
        if area is None:
            return await super()._read_for_delivery(thread)
        return await self._read_with_idle_view(thread, area, select=self._g_thread != thread)

    async def _read_with_idle_view(self, thread: ThreadId, area: int, *, select: bool) -> CoreRegs:
        """The registers of a vCPU about to take an event, with what :meth:`_enter_from_idle`
        needs should it be halted in the idle loop (its area's head and the stub's saved
        registers at the top of its stack), in the same round trip."""
        top = area + self.layout.percpu_size
        core, (head, stack) = await self.rsp.read_core_and_memory(
            (area, _IDLE_HEAD), (top - _STUB_SCRATCH.size, _STUB_SCRATCH.size), thread=thread if select else None
        )
        self._g_thread = thread
        if self._area(core) == area:  # in the stub: the record is this stop's (see _read_stopped)
            self._idle_views[thread.vcpu] = (head, stack)
            self._recorded[thread.vcpu] = _PAIR.unpack(head[A_TRAP_ELR2 : A_TRAP_ELR2 + _PAIR.size])
        return core

    async def _set_return(
        self, vcpu: int, core: CoreRegs, pc: int, pstate: int, el1: tuple[int, int] | None = None
    ) -> None:
        block = _RESUME_BLOCK.pack(*_resume_request(pc, pstate, el1))
        # Goes out with the register write-back and the resume (one write, no round trip).
        self._memory_writes.append((self._area(core) + A_RESUME_FLAGS, block))
        self._next_return[vcpu] = (pc, pstate)
        if el1 is not None:
            self._next_el1[vcpu] = el1
        core.pc = self.layout.resume

    async def _handle_stop(self, stop: StopReply, *, ours: bool = True) -> None:
        failure, self._mail_failure = self._mail_failure, None
        if failure is not None:
            raise ConduitError(f"serving a call through the mailbox failed: {failure}") from failure
        if "watch" in stop.info:
            self.stats.doorbell_stops += 1
        self._next_return.clear()
        self._next_el1.clear()
        self._recorded.clear()
        self._idle_views.clear()
        try:
            await super()._handle_stop(stop, ours=ours)
        finally:
            self._next_return.clear()
            self._next_el1.clear()
            self._idle_views.clear()

    async def _trap(self, thread: ThreadId, core: CoreRegs) -> ThreadId | None:
        if core.pc == self.layout.unexpected:
            esr = (await self._read_pair(self._area(core) + A_TRAP_ESR2))[0]
            raise ConduitError(
                f"vCPU {thread.vcpu} took an exception the EL2 stub does not handle (ESR_EL2 {esr:#x}, "
                f"EC {esr >> 26:#x}); the guest cannot go on"
            )
        if core.cpsr & PSTATE_EL_MASK != PSTATE_EL2:
            # Guest code at EL0/EL1 that happens to run at the stub's address: not a call.
            return thread
        if core.pc in (self.layout.wake_site, self.layout.wake_site - 4):  # its breakpoint, or its doorbell
            self._kicked.discard(thread.vcpu)
            log.debug("vCPU %d woke from the stub's idle loop", thread.vcpu)
            # An idle vCPU we kicked: back to the guest through stub_resume, entering a handler
            # on the way if one is deliverable (see _enter_handlers).
            self.stats.idle_wakes += 1
            core.pc = self.layout.resume
            self._dirty[thread.vcpu] = core
            return None
        vcpu = thread.vcpu
        await self._learn_area(vcpu, core)
        area = self._areas[vcpu]
        if self._posted_call_in_stop(vcpu, area, core):
            return None
        self.stats.traps += 1
        fid = function_id(core.x[0])
        if fid not in _CONTEXT_SWITCHES:
            self._lease(vcpu, area)  # for the calls that may follow this one
        elif self._mail is not None:
            # The handler's lease ends with it: the guest goes back to what the event interrupted,
            # which seldom calls at once, and a watcher polling for nothing takes a host core's
            # time from QEMU. A handler entered in this stop gets a lease of its own.
            self._mail.revoke(area)
        if fid != Function.EVENT_CONTEXT and vcpu not in self._context_clear:
            # Any other call may end or change the running handler: the stub stops answering
            # EVENT_CONTEXT until the next handler entry (an out-of-range EVENT_CONTEXT changes
            # nothing and keeps it).
            self._memory_writes.append((self._area(core) + A_CTX_VALID, _NO_CONTEXT))
            self._context_clear.add(vcpu)
        if sdei.is_sdei_range(fid):
            self.stats.sdei_calls += 1
            regs = VcpuRegs(list(core.x), self.layout.resume, core.cpsr)
            if fid in _CONTEXT_SWITCHES:
                # The handler's own return state: COMPLETE_AND_RESUME keeps its PAN bit.
                regs.pc, regs.pstate = await self._interrupted(vcpu, core)
            completion = self.dispatcher.hypercall(vcpu, regs)
            core.x[:] = [to_u64(v) for v in regs.x]
            core.pc = self.layout.resume
            if completion is Completion.COMPLETE:
                await self._set_return(vcpu, core, regs.pc, regs.pstate)
            elif completion is Completion.COMPLETE_AND_RESUME:
                await self._set_return(vcpu, core, regs.pc, regs.pstate, (regs.elr_el1, regs.spsr_el1))
            self._dirty[vcpu] = core
            return None
        if psci.is_psci_range(fid):
            self._watch_for_sdei_probe()
        if self._filter_call(vcpu, fid, core, answered_pc=self.layout.resume):
            return None
        core.pc = self.layout.trap_site + 4  # the stub forwards it to QEMU's firmware
        self._dirty[vcpu] = core
        return None

    def _deliver_one(self, vcpu: int, regs: VcpuRegs) -> bool:
        """Enter a handler, and leave its interrupted x0..x17 (what the dispatcher saved and its
        EVENT_CONTEXT answers from) in the vCPU's area, so that the stub answers the handler's
        EVENT_CONTEXT calls without a stop. Written with the stop's write-back, before the vCPU runs."""
        interrupted = [to_u64(v) for v in regs.x[:CTX_REGS]]
        if not super()._deliver_one(vcpu, regs):
            return False
        block = _CONTEXT_BLOCK.pack(1, *interrupted)
        area = self._areas.get(vcpu)
        if area is not None:  # else (not seen in the stub since attach) the stub traps its calls
            if self._serving_post and self._mail is not None:  # the vCPU runs: straight into its area
                self._mail.write_bytes(area + A_CTX_VALID, block)
            else:  # with the stop's write-back
                self._memory_writes.append((area + A_CTX_VALID, block))
            self._context_clear.discard(vcpu)
            self._lease_until_complete(vcpu, area)
        return True

    def _lease_until_complete(self, vcpu: int, area: int) -> None:
        """A handler was entered: its calls, its COMPLETE above all, go through the mailbox until
        that COMPLETE is served (which ends the lease). Written straight into guest RAM: the VM is
        stopped, or the vCPU is waiting for the answer that enters the handler."""
        if self._mail is not None and self._watcher is not None and self._mail_may_lease():
            self._mail.write(area, A_FAST_UNTIL, LEASE_UNTIL_COMPLETE)
            self._watcher.watch(vcpu, area)
            self._watcher.keep_hot()

    async def _wake_through_gic(self, vcpu: int, area: int) -> None:
        """With a kick, make the vCPU's timer interrupt pending in its redistributor: a halted vCPU
        then wakes as soon as the VM runs, instead of at the stub's next poll (up to 1 ms later).
        The stub takes the interrupt back (A_UNPEND) when it leaves the idle loop, before the
        guest runs. Sent with the kick (no round trip of its own; the first time, two to find the
        frames)."""
        if not (self.wake_through_gic and self._kick_enters):
            return
        if self._redistributors is None:
            self._redistributors = await find_redistributors(self.rsp, len(self.threads))
            log.info(
                "idle vCPUs wake through their GIC redistributors (%d found)"
                if self._redistributors
                else "no GICv3/v4 redistributors at -M virt's address: idle vCPUs wake at the stub's poll",
                len(self._redistributors),
            )
        frame = self._redistributors.get(vcpu)
        if frame is not None:
            self._memory_writes.append((area + A_UNPEND, (frame + PENDING_CLEAR).to_bytes(8, "little")))
            self._memory_writes.append((frame + PENDING_SET, VTIMER_BIT))
            self.stats.idle_gic_wakes += 1

    async def _enter_from_idle(self, vcpu: int, core: CoreRegs) -> bool | None:
        """Enter the handlers deliverable on a vCPU halted in the stub's idle loop (right after its
        ``wfi``) from this stop, instead of kicking it to the wake site and entering them at that
        second stop.

        The guest's x16..x19 are on the stub's stack, its return state is the area's trap record.
        The handler's entry goes into the area as a resume request and the kick is KICK_ENTER:
        when the vCPU wakes (at once, through its redistributor, or at the stub's poll), the stub
        puts the guest's timer back, pops those registers and goes through ``stub_resume`` into
        the handler. x0..x15 are written in place; the stub never touches them on that path.
        """
        area = self._area(core)
        view = self._idle_views.get(vcpu)
        if view is not None and core.sp == area + self.layout.percpu_size - _STUB_SCRATCH.size:
            head, stack = view
        else:  # not read with its registers (its area was not known yet): one more round trip
            read = await self.rsp.read_memory_regions([(area, _IDLE_HEAD), (core.sp, _STUB_SCRATCH.size)])
            if read[0] is None or read[1] is None:
                raise ConduitError(f"cannot read vCPU {vcpu}'s stack or per-CPU area in the EL2 stub at {area:#x}")
            head, stack = read[0], read[1]
        resume_flags = head[A_RESUME_FLAGS : A_RESUME_FLAGS + 8]
        kick = head[A_KICK : A_KICK + 8]
        record = head[A_TRAP_ELR2 : A_TRAP_ELR2 + _PAIR.size]
        if any(resume_flags) or any(kick):
            # An earlier stop's entry or kick still waits for this vCPU to wake: what it enters
            # must run first. The vCPU wakes within a poll period: stop it again then.
            asyncio.get_running_loop().call_later(STUB_RETRY, self._retry_delivery, vcpu)
            return None
        guest = list(core.x)
        guest[16:20] = _STUB_SCRATCH.unpack(stack)
        pc, pstate = _PAIR.unpack(record)
        regs = VcpuRegs(guest, pc, pstate)
        self._areas[vcpu] = area
        self._kicked.discard(vcpu)
        if not self._enter_deliverable(vcpu, regs):
            return False
        handler = [to_u64(v) for v in regs.x]
        core.x[:16] = handler[:16]  # x16..x19 stay the stub's (x18: the area); it pops the guest's
        if handler[16:20] != guest[16:20]:  # the entry changed x16/x17 (a profile zeroing them)
            self._memory_writes.append((core.sp, _STUB_SCRATCH.pack(*handler[16:20])))
        self._memory_writes.append((area + A_RESUME_FLAGS, _RESUME_BLOCK.pack(*_resume_request(regs.pc, regs.pstate))))
        self._memory_writes.append((area + A_KICK, KICK_ENTER.to_bytes(8, "little")))
        self._next_return[vcpu] = (regs.pc, regs.pstate)
        await self._wake_through_gic(vcpu, area)
        self.stats.idle_entries += 1
        log.debug("vCPU %d halted in the stub: handler entered from this stop", vcpu)
        return True

    async def _enter_handlers(self, vcpu: int, core: CoreRegs) -> bool | None:
        if core.cpsr & PSTATE_EL_MASK != PSTATE_EL2:
            return await super()._enter_handlers(vcpu, core)
        if core.pc in self.layout.idle:
            if core.pc == self._after_wfi and self.enter_from_idle and self._kick_enters:
                return await self._enter_from_idle(vcpu, core)
            if vcpu in self._kicked:
                log.debug(
                    "vCPU %d still idle at %#x after its kick: falling back to the vector breakpoints", vcpu, core.pc
                )
                return None  # kicked before and still idle: fall back to the vector breakpoints
            # Halted in the stub's idle loop: kick it; it stops at the wake site within a poll
            # period, where the handler is entered. No vector breakpoints meanwhile (16 round
            # trips); if no wake-site stop comes in KICK_GRACE, a fresh stop tries again.
            # Goes out with the stop's write-back and resume (one write, no round trip of its own).
            self._memory_writes.append((self._area(core) + A_KICK, KICK_STOP.to_bytes(8, "little")))
            self.stats.idle_kicks += 1
            log.debug("vCPU %d idles in the stub: kicked", vcpu)
            await self._wake_through_gic(vcpu, self._area(core))
            self._kicked.add(vcpu)
            asyncio.get_running_loop().call_later(KICK_GRACE, self._check_kicked, vcpu)
            return False
        if core.pc != self.layout.resume:
            # Elsewhere in the stub, or a call still to be forwarded (trap_site + 4): entering a
            # handler now would lose it. Deferred to the vCPU's next exception entry; and since a
            # guest may take none for long (a busy loop with no interrupts), stop it again shortly:
            # by then it has left the stub's few instructions.
            log.debug("vCPU %d is inside the stub at %#x: delivery retried in %.3fs", vcpu, core.pc, STUB_RETRY)
            asyncio.get_running_loop().call_later(STUB_RETRY, self._retry_delivery, vcpu)
            return None
        el1: tuple[int, int] | None = None
        if vcpu not in self._dirty and vcpu not in self._next_return:
            flags, elr2, spsr2, elr1, spsr1 = await self._pending_request(vcpu, core)
        else:
            flags = 0  # this stop planned the vCPU's return itself (_interrupted() knows it)
            el1 = self._next_el1.get(vcpu)
        if flags & RESUME_EL2:
            # Stopped at stub_resume before running it, with the request an earlier stop left
            # (a COMPLETE's return, a handler entry) still in its area. The guest is, in effect,
            # at that request's return point: the new handler interrupts exactly there, and its
            # entry takes the request's place, keeping the ELR/SPSR_EL1 part a COMPLETE_AND_RESUME
            # put in it. (Retrying 2 ms later, as before, cost events raised right after a
            # COMPLETE about 2 ms each.)
            pc, pstate = elr2, spsr2
            el1 = (elr1, spsr1) if flags & RESUME_EL1 else None
        elif flags:  # only the EL1 part: never written so; leave it to stub_resume and look again
            asyncio.get_running_loop().call_later(STUB_RETRY, self._retry_delivery, vcpu)
            return None
        else:
            pc, pstate = await self._interrupted(vcpu, core)
        self._kicked.discard(vcpu)
        self._areas[vcpu] = self._area(core)
        regs = VcpuRegs(list(core.x), pc, pstate)
        entered = self._enter_deliverable(vcpu, regs)
        if entered:
            core.x[:] = [to_u64(v) for v in regs.x]
            await self._set_return(vcpu, core, regs.pc, regs.pstate, el1)
            if flags:
                self.stats.entries_over_request += 1
        return entered


async def attach_conduit(
    host: str,
    port: int,
    dispatcher: SdeiPort,
    find_sites: Callable[[], Awaitable[list[int]]],
    *,
    kernel: Path | None = None,
    timeout: float = 10.0,
    vcpus: int = 0,
    memory_mb: int = 0,
    map_ram: Callable[[StubLayout], RamWindow] | None = None,
) -> GdbstubConduit:
    """Connect to the gdbstub and pick the conduit, started, with the VM stopped:

    * the EL2 stub's, if the VM booted through it (no symbols needed);
    * for a Linux ``kernel`` image, the symbol conduit that checks at run time that the kernel
      runs at its link addresses and its trap sites hold calls (:mod:`qmp_sdei.conduit.symbols`);
    * otherwise the plain symbol/ELF conduit on ``find_sites()``.

    ``vcpus``: how many the VM has, when known (the thread list is then read in one round trip).
    ``memory_mb``: its RAM size, when known (the stub is then looked for at two places, not 65).
    ``map_ram``: maps the guest RAM a stub with a mailbox is in (in a thread; any error only costs
    the mailbox, and the log says why).
    """
    client = await RspClient.connect(host, port, timeout=timeout)
    ram: RamWindow | None = None
    try:
        layout = await probe_stub(client, memory_mb)
        conduit: GdbstubConduit
        if layout is not None:
            log.info("guest booted through the qmp-sdei EL2 stub: trapping at %#x", layout.trap_site)
            if map_ram is not None and layout.has_mailbox:
                try:
                    ram = await asyncio.to_thread(map_ram, layout)
                except (SdeiError, OSError, ValueError) as err:
                    log.info("the EL2 stub's mailbox is off, every call stops the VM: %s", err)
            conduit = El2Conduit(client, dispatcher, layout, timeout=timeout, ram=ram)
        else:
            sites = await find_sites()
            checks = await asyncio.to_thread(_kernel_checks, kernel) if kernel is not None else None
            if checks is not None:
                vectors, kernel_sites = checks
                conduit = KernelCheckedConduit(
                    client, dispatcher, sites, vectors=vectors, kernel_sites=kernel_sites, timeout=timeout
                )
            else:
                conduit = GdbstubConduit(client, dispatcher, sites, timeout=timeout)
        conduit.expected_vcpus = vcpus
        await conduit.start()
    except BaseException:
        if ram is not None:
            ram.close()
        await client.close()
        raise
    return conduit


BHB_VECTOR_SLOTS = 4  # arm64 __bp_harden_el1_vectors: one 2 KiB table per Spectre-BHB mitigation


def _kernel_checks(kernel: Path) -> tuple[list[int], list[int]] | None:
    """(link addresses VBAR_EL1 may hold, the kernel's trap sites) for the run-time check, or None
    if the symbol table has no ``vectors`` (then the check cannot be made, and the log says so)."""
    kallsyms = load_kallsyms(kernel)
    vectors = kallsyms.get("vectors")
    if vectors is None:
        log.warning("%s: kallsyms has no 'vectors'; cannot check at run time that the trap sites are right", kernel)
        return None
    candidates = [vectors]
    hardened = kallsyms.get("__bp_harden_el1_vectors")
    if hardened is not None:
        candidates += [hardened + slot * 0x800 for slot in range(BHB_VECTOR_SLOTS)]
    return candidates, linux_trap_sites(kernel, kallsyms)
