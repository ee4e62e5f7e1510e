"""The gdbstub conduit: turns breakpoint stops on the guest's ``hvc`` into dispatcher calls.

QEMU (7.2 and 10) answers every ``hvc`` with its own PSCI code, so the sidecar puts breakpoints on the
guest's call sites (``trap_sites``, found by the caller) and handles each stop:

* SDEI function ids go to :meth:`Dispatcher.hypercall`; the result (or a whole new context, for
  COMPLETE) is written back with one ``G`` pipelined with the ``vCont;c`` that resumes the VM.
* PSCI ids go to an optional policy callback; if it has no opinion the call is passed through by
  single-stepping the ``hvc`` (QEMU's PSCI then runs) while the other vCPUs continue.
* Anything else is passed through the same way (QEMU answers NOT_SUPPORTED).

After every stop the conduit asks the dispatcher which vCPUs have a deliverable event and enters
the handlers by rewriting registers. Registers can only be rewritten safely when the vCPU sits in
EL1h (QEMU's cpsr write does not swap stack pointers or rebuild hflags), so for a vCPU in EL0 or
EL1t delivery is deferred: temporary breakpoints on its VBAR_EL1 vectors catch the next exception
entry, which is EL1h by construction.

System registers are read-only through QEMU's stub, so COMPLETE_AND_RESUME's ELR_EL1/SPSR_EL1
are set by patching two ``msr`` instructions over the trapped ``hvc``, stepping them on that vCPU
alone, and restoring the original bytes.

A VM its owner stops (QMP ``stop``, ``-S``, migration) is *held*: the conduit serves requests but
never resumes it. When the owner resumes it, :meth:`GdbstubConduit.owner_resumed` takes the run
back where the stub needs it (QEMU 8.1 and later report no stop after a resume that was not ours).

Only this module's run loop talks to the stub. Other tasks (``request_delivery``, ``rearm``,
``detach``) ask the loop for a stop and wait for it to do the work, so RSP requests are never
interleaved; ``owner_resumed`` talks to the stub itself only while the loop waits for a stop and
none is queued. It owns breakpoints and registers in flight; SDEI state belongs to the SDEI owner
(:class:`qmp_sdei.owner.SdeiOwner`), which the conduit drives only through :class:`SdeiPort` and
brackets every stop for (``begin_stop`` ... ``commit`` ... ``end_stop``), so host-side changes never
land in the middle of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from qmp_sdei.abi import psci, sdei
from qmp_sdei.abi.smccc import SVE_HINT, function_id, has_sve_hint, to_u64
from qmp_sdei.conduit.rsp import (
    SIGNAL_QUIT,
    SIGNAL_TRAP,
    SIGNAL_XCPU,
    CoreRegs,
    RegisterMap,
    RspClient,
    StopReply,
    ThreadId,
)
from qmp_sdei.errors import ConduitError
from qmp_sdei.sdei import Completion, VcpuRegs

log = logging.getLogger(__name__)

PSTATE_MODE_MASK = 0xF  # M[3:0]: EL and SP selection
PSTATE_EL1H = 0x5
MSR_ELR_EL1_X0 = 0xD5184020  # msr elr_el1, x0
MSR_SPSR_EL1_X1 = 0xD5184001  # msr spsr_el1, x1
# VBAR_EL1 offsets of the vectors that an exception from EL1t (0x000-0x180) or a lower EL
# (0x400-0x780) enters; they are the first EL1h instructions after the vCPU leaves EL0/EL1t.
DEFERRAL_VECTOR_OFFSETS = tuple(range(0x000, 0x200, 0x80)) + tuple(range(0x400, 0x800, 0x80))

LATENCY_SAMPLES = 4096
TAKEOVER_ATTEMPTS = 5
"""How many 0x03 + probe rounds :meth:`GdbstubConduit.owner_resumed` makes when the owner keeps
stopping and resuming the VM faster than one round takes."""

Runstate = Callable[[], Awaitable[str]]
"""Returns QEMU's current runstate (QMP ``query-status``), e.g. ``running``, ``paused``, ``debug``."""


def stub_reports_only_our_resumes(qemu_major: int, qemu_minor: int) -> bool:
    """Whether this QEMU's gdbstub sends stop replies only after the debugger's own resume.

    QEMU 8.1 made stop replies answer a ``c``/``s``/``vCont``/``?`` or 0x03 of the debugger only;
    7.2 reports every stop, including those after the VM's owner resumed it over QMP.
    """
    return (qemu_major, qemu_minor) >= (8, 1)


class SdeiPort(Protocol):
    """What the conduit needs of the SDEI owner (:class:`qmp_sdei.owner.SdeiOwner`).

    Every stop is bracketed by ``begin_stop``/``end_stop``; ``commit`` comes after the stop's SDEI
    calls and before any register is written back (the state is durable before the guest sees it).
    """

    def begin_stop(self) -> None: ...
    def hypercall(self, vcpu: int, regs: VcpuRegs) -> Completion: ...
    def psci_call(self, vcpu: int, fid: int, x1: int, x2: int, x3: int) -> int | None:
        """The answer to a PSCI call, or None to let QEMU answer (it also sees those calls)."""

    def deliverable(self) -> list[int]: ...
    def deliver(self, vcpu: int, regs: VcpuRegs) -> bool: ...
    def commit(self) -> None: ...
    def end_stop(self) -> None: ...
    def bind_delivery(self, request_delivery: Callable[[], None] | None) -> None: ...
    def conduit_problem(self, problem: str) -> None:
        """The conduit cannot serve the guest as it should: shown in the status and notified."""


@dataclass
class ConduitStats:
    """Counters and latency samples (nanoseconds) for monitoring and the benchmark."""

    stops: int = 0
    traps: int = 0
    sdei_calls: int = 0
    psci_answered: int = 0
    psci_passthrough: int = 0
    other_passthrough: int = 0
    deliveries: int = 0
    deferred_deliveries: int = 0
    interrupts: int = 0
    takeovers: int = 0  # owner_resumed() calls that sent a 0x03 to get stop replies again
    sysreg_writes: int = 0
    #: stop reply received -> resume sent, for trapped calls (the sidecar's share of a call)
    trap_handling_ns: deque[int] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    #: request_delivery() called -> handler registers written and the VM resumed
    delivery_ns: deque[int] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))


@dataclass
class _Waiter:
    """A request from another task, served at the next stop."""

    action: Callable[[], Awaitable[None]] | None
    done: asyncio.Future[None]


def ours_when_leaving(x0: int) -> bool:
    """Whether a call trapped at the last stop before a detach is still ours to answer: anything
    but SDEI, and the SDEI calls that end a running handler."""
    fid = function_id(x0)
    return not sdei.is_sdei_range(fid) or fid in (sdei.Function.EVENT_COMPLETE, sdei.Function.EVENT_COMPLETE_AND_RESUME)


async def _loop_ended(waiting: Awaitable[None]) -> None:
    """Await the run loop's end: its cancellation is expected, ours (a caller's timeout) is not."""
    try:
        await waiting
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


def _is_el1h(cpsr: int) -> bool:
    return cpsr & PSTATE_MODE_MASK == PSTATE_EL1H


def _to_vcpu_regs(core: CoreRegs) -> VcpuRegs:
    return VcpuRegs(list(core.x), core.pc, core.cpsr)


def _apply(core: CoreRegs, regs: VcpuRegs) -> None:
    core.x[:] = [v & 0xFFFF_FFFF_FFFF_FFFF for v in regs.x]
    core.pc = regs.pc
    core.cpsr = regs.pstate & 0xFFFF_FFFF


class GdbstubConduit:
    """Serve one VM's SDEI interface through its gdbstub.

    Typical use::

        conduit = GdbstubConduit(client, owner, trap_sites=[hvc_address])
        await conduit.start()                 # threads, registers, breakpoints; VM stays stopped
        task = asyncio.create_task(conduit.run(), name="conduit")   # resumes the VM
        await owner.raise_event(1000, vcpu=0) # the owner asks the conduit to deliver
        await conduit.detach()                # the run task ends; the VM keeps running
    """

    def __init__(
        self,
        rsp: RspClient,
        dispatcher: SdeiPort,
        trap_sites: Sequence[int],
        *,
        timeout: float = 10.0,
        runstate: Runstate | None = None,
        stops_need_our_resume: bool = True,
    ) -> None:
        """:param dispatcher: the SDEI owner; the conduit binds itself as the owner's way to
        deliver (``request_delivery``).
        :param runstate: asks QEMU for the VM's runstate (QMP ``query-status``). Without it the
        conduit cannot follow a VM its owner stops and resumes (:meth:`owner_resumed`).
        :param stops_need_our_resume: the stub reports a stop only after a resume of ours (QEMU 8.1
        and later, see :func:`stub_reports_only_our_resumes`); False for QEMU 7.2, which reports
        every stop. True is always safe; on 7.2 it costs one extra stop per owner resume."""
        if not trap_sites:
            raise ConduitError("no trap sites: the conduit would never see a call")
        self.rsp = rsp
        self.dispatcher = dispatcher
        self.trap_sites = frozenset(trap_sites)
        dispatcher.bind_delivery(self.request_delivery)
        #: set once run() has resumed the VM or decided to hold it
        self.serving = asyncio.Event()
        self.timeout = timeout
        self.stats = ConduitStats()
        self.stops_need_our_resume = stops_need_our_resume
        self._runstate = runstate
        self.threads: list[ThreadId] = []
        self.registers: RegisterMap | None = None
        self._running = False  # we sent a resume and no stop reply has been consumed since
        self._stopping = False  # run() should end at the next stop (detach or close)
        # The VM was stopped by someone else (QMP stop, -S, migration): we must not resume it. The
        # loop then only waits for the next stop; owner_resumed() tells us the owner let it go.
        self._held = False
        self._takeover_lock = asyncio.Lock()
        # Set while run() waits for a stop: then (and with no stop queued) the loop sends nothing,
        # so owner_resumed() may talk to the stub.
        self._awaiting_stop = asyncio.Event()
        self._held_signal: int | None = None  # the stop reply that made us hold the VM
        self._trapped_while_held = False  # a breakpoint stop came (and was served) while held
        self._interrupt_sent = False  # a 0x03 of ours is outstanding: the next T02 is ours
        # A migration's switchover is under way: never resume the VM (see close_gate()).
        self._gate_closed = False
        self._settled = asyncio.Event()  # gate closed, no stop being served, no resume of ours outstanding
        self._in_stop = False
        self._resume_when_served = False  # the gate opened while a stop was being served
        self._waiters: list[_Waiter] = []
        self._vector_bps: set[int] = set()
        #: the VM's vCPU count when the caller knows it: start() reads the thread list in one go
        self.expected_vcpus = 0
        self._deferred: set[int] = set()  # vCPUs waiting for their next EL1h kernel entry
        self._run_task: asyncio.Task[None] | None = None
        self._g_thread: ThreadId | None = None  # which thread g/G/p/m act on (QEMU's g_cpu)
        self._dirty: dict[int, CoreRegs] = {}  # vCPU -> registers to write before resuming
        self._memory_writes: list[tuple[int, bytes]] = []  # (address, bytes) to write with them
        self._last_write_ns = 0
        self._delivery_requested_ns = 0  # request_delivery() -> the stop that entered a handler
        self.exit_reason: str | None = None  # why run() returned by itself (VM exit)
        self._released = False  # detached or closed: the stub is no longer ours

    @classmethod
    async def attach(
        cls,
        host: str,
        port: int,
        dispatcher: SdeiPort,
        trap_sites: Sequence[int],
        *,
        timeout: float = 10.0,
        runstate: Runstate | None = None,
        stops_need_our_resume: bool = True,
    ) -> GdbstubConduit:
        """Connect to the stub and :meth:`start`; the VM is left stopped until :meth:`run`."""
        client = await RspClient.connect(host, port, timeout=timeout)
        conduit = cls(
            client,
            dispatcher,
            trap_sites,
            timeout=timeout,
            runstate=runstate,
            stops_need_our_resume=stops_need_our_resume,
        )
        try:
            await conduit.start()
        except BaseException:
            await client.close()
            raise
        return conduit

    # ---- setup ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Learn the vCPUs and registers, and arm the trap breakpoints. The VM must be stopped."""
        self.threads = await self.rsp.threads(self.expected_vcpus)
        if not self.threads:
            raise ConduitError("the gdbstub lists no vCPUs")
        self.registers = await self.rsp.read_register_map()
        for name in ("ELR_EL1", "SPSR_EL1", "VBAR_EL1"):
            self.registers[name]  # fail now, not at the first COMPLETE_AND_RESUME
        await self._arm()

    async def _arm(self) -> None:
        await self.rsp.insert_breakpoints([*sorted(self.trap_sites), *sorted(self._vector_bps)])

    async def _disarm_extra(self) -> None:
        """Remove what a subclass armed besides the breakpoints, when leaving a held VM one by one
        (``D;1`` removes everything at once)."""

    async def rearm(self) -> None:
        """Insert the breakpoints again (after a VM reset, or on a migration destination).

        QEMU does not migrate gdbstub breakpoints, so the destination must be re-armed before the
        guest runs there. Inserting an existing breakpoint again is harmless.
        """
        await self._at_next_stop(self._arm)

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self, *, resume: bool = True) -> None:
        """Serve stops until :meth:`detach`/:meth:`close` or the VM exits.

        :param resume: start the VM now. False leaves a VM that someone else stopped (``-S``,
            QMP ``stop``) stopped, with the breakpoints armed, until its owner resumes it (then
            call :meth:`owner_resumed`).
        """
        self._run_task = asyncio.current_task()
        try:
            if resume:
                # Requests that arrived before the loop started, and events already deliverable.
                self.dispatcher.begin_stop()
                try:
                    await self._after_stop(None, None)
                finally:
                    self.dispatcher.end_stop()
            else:
                self._held = True
            self.serving.set()
            if self._stopping and not self._running:
                return
            while True:
                self._awaiting_stop.set()
                try:
                    stop = await self.rsp.wait_stop(forever=True)  # requests carry their own timeouts
                finally:
                    self._awaiting_stop.clear()
                self._running = False
                if stop.exited:
                    log.info("VM exited (%s%02x)", stop.kind, stop.signal)
                    self.exit_reason = f"{stop.kind}{stop.signal:02x}"
                    self._fail_waiters(ConduitError("the VM exited"))
                    return
                self.stats.stops += 1
                ours, self._interrupt_sent = self._interrupt_sent, False
                if stop.signal == SIGNAL_QUIT:
                    # RUN_STATE_SHUTDOWN: the guest powered off or reset with -no-reboot. QEMU is
                    # about to exit; nothing can be resumed, so stop serving.
                    log.info("VM shut down (T%02x)", stop.signal)
                    self.exit_reason = "shutdown"
                    self._fail_waiters(ConduitError("the VM shut down"))
                    return
                await self._serve_stop(stop, ours=ours)
                self._resume_if_gate_opened()
                # A stop handled while detach() was asked for may already have resumed the VM; then
                # detach's stop request is still coming and must be consumed here, or the VM is
                # left stopped with nobody to detach it.
                if self._stop_requested() and not self._running:
                    return
        except ConduitError as err:
            self._fail_waiters(err)
            if self.rsp.peer_closed:
                # QEMU 7.2 reports a guest power-off as a T03 stop and then closes the socket
                # (no W packet), possibly while we are still reading registers for that stop.
                log.info("the gdbstub closed the connection: the VM has gone")
                self.exit_reason = "connection closed"
                return
            raise
        finally:
            self._running = False

    async def _serve_stop(self, stop: StopReply, *, ours: bool) -> None:
        """One stop, bracketed for the SDEI owner (host actions wait until it is over)."""
        self.dispatcher.begin_stop()
        self._in_stop = True
        try:
            await self._handle_stop(stop, ours=ours)
        finally:
            self._in_stop = False
            self.dispatcher.end_stop()
        self._check_settled()

    async def _handle_stop(self, stop: StopReply, *, ours: bool = True) -> None:
        thread = stop.thread or self.threads[0]
        self._g_thread = thread  # QEMU points g/G at the vCPU that stopped
        core = await self._read_stopped(thread)
        step_over: ThreadId | None = None
        trapped = self._at_call_site(core.pc)
        if trapped and self._stopping and not self._answer_when_leaving(thread.vcpu, core):
            # The last stop before a detach: the call is left for QEMU to answer (NOT_SUPPORTED)
            # once we are gone. Answering it could promise what nobody will keep: a SIGNAL's
            # event would never be entered. A handler's COMPLETE is still answered.
            trapped = False
        # QEMU's migration stop (T18) is never the answer to our 0x03 (that is a T02), even when one
        # of ours is outstanding: wait_parked() interrupts when the T18 is slow to come.
        if stop.signal == SIGNAL_XCPU or (stop.signal != SIGNAL_TRAP and not ours):
            # Stopped by someone else (QMP stop, migration): serve what we can, but do not resume.
            # Even a vCPU paused right at a trap site is left there: it hits the breakpoint as
            # soon as its owner resumes it, and the call is served then.
            log.info("VM stopped by its owner (T%02x); waiting until it is resumed", stop.signal)
            self._held = True
            self._held_signal = stop.signal
            self._trapped_while_held = False
            await self._after_stop(thread, core, resume=False)
            # Its owner may have resumed it already, and that RESUME may have reached
            # owner_resumed() before this stop reached us.
            await self._follow_owner(in_loop=True)
            return
        if self._held and stop.signal == SIGNAL_TRAP:
            # A trap while we hold the VM: its owner (or QEMU, cancelling a migration) resumed it
            # and the guest hit a breakpoint at once, maybe while the migration gate kept us from
            # resuming it. _follow_owner() must not wait for a stop reply that has come already.
            self._trapped_while_held = True
        if trapped:
            # Also for our own T02: a vCPU interrupted exactly at the hvc was about to trap anyway.
            step_over = await self._trap(thread, core)
        elif stop.signal == SIGNAL_TRAP and core.pc in self._vector_bps:
            # A deferred delivery point; if nothing is delivered the vCPU must step off it.
            step_over = thread
        # Otherwise a single-step finished (pass-through) or the stop was ours (0x03): go on.
        resumed_ns = await self._after_stop(thread, core, step_over=step_over)
        if trapped and stop.received_ns:
            self.stats.trap_handling_ns.append(resumed_ns - stop.received_ns)

    def _answer_when_leaving(self, vcpu: int, core: CoreRegs) -> bool:
        """Whether the call ``vcpu`` makes at the last stop before a detach is still ours to
        answer (see :func:`ours_when_leaving`; a subclass may know of more)."""
        return ours_when_leaving(core.x[0])

    async def _read_stopped(self, thread: ThreadId) -> CoreRegs:
        """The registers of the vCPU a stop reply named (``g`` acts on it); a subclass may read
        more in the same round trip."""
        return await self.rsp.read_core()

    def _at_call_site(self, pc: int) -> bool:
        """Whether a vCPU stopped at ``pc`` is making a call (a subclass may stop calls elsewhere)."""
        return pc in self.trap_sites

    async def _trap(self, thread: ThreadId, core: CoreRegs) -> ThreadId | None:
        """Handle a call at a trap site. Returns the thread to single-step, if it passes through."""
        self.stats.traps += 1
        fid = function_id(core.x[0])
        vcpu = thread.vcpu
        if sdei.is_sdei_range(fid):
            self.stats.sdei_calls += 1
            site = core.pc
            regs = _to_vcpu_regs(core)
            regs.pc = site + 4
            completion = self.dispatcher.hypercall(vcpu, regs)
            _apply(core, regs)
            if completion is Completion.COMPLETE_AND_RESUME:
                await self._write_elr_spsr(thread, site, core, regs.elr_el1, regs.spsr_el1)
            self._dirty[vcpu] = core
            return None
        if self._filter_call(vcpu, fid, core, answered_pc=core.pc + 4):
            return None
        return thread

    def _filter_call(self, vcpu: int, fid: int, core: CoreRegs, *, answered_pc: int) -> bool:
        """A trapped call that is not SDEI: True if the owner's PSCI policy answered it (x0 set,
        execution goes on at ``answered_pc``); otherwise it is counted as passed through and any
        SVE hint is stripped, for the caller to hand to QEMU."""
        if psci.is_psci_range(fid):
            answer = self.dispatcher.psci_call(vcpu, fid, core.x[1], core.x[2], core.x[3])
            if answer is not None:
                self.stats.psci_answered += 1
                core.x[0] = to_u64(answer)
                core.pc = answered_pc
                self._dirty[vcpu] = core
                return True
            self.stats.psci_passthrough += 1
        else:
            self.stats.other_passthrough += 1
        self._strip_sve_hint(vcpu, core)
        return False

    def _strip_sve_hint(self, vcpu: int, core: CoreRegs) -> None:
        """Pass a call on without the SMCCC v1.3 SVE hint: QEMU's PSCI (7.2) does not clear it and
        would answer NOT_SUPPORTED. The hint only permits discarding SVE state, so dropping it is
        always allowed."""
        if has_sve_hint(core.x[0]):
            core.x[0] &= ~SVE_HINT
            self._dirty[vcpu] = core

    async def _write_elr_spsr(self, thread: ThreadId, site: int, core: CoreRegs, elr: int, spsr: int) -> None:
        """Set ELR_EL1/SPSR_EL1 on a stopped EL1 vCPU by executing two ``msr`` there.

        The stub ignores writes to system registers, so: patch ``msr elr_el1, x0; msr spsr_el1,
        x1`` over the trapped ``hvc`` (``M`` bypasses page permissions and invalidates translated
        code), load x0/x1, step the two instructions on this vCPU only (the others stay stopped
        and cannot run the patched code), then restore the bytes. The caller then writes the final
        registers, so x0/x1 and pc are restored too.
        """
        self.stats.sysreg_writes += 1
        await self._select(thread)
        original = await self.rsp.read_memory(site, 8)
        patch = MSR_ELR_EL1_X0.to_bytes(4, "little") + MSR_SPSR_EL1_X1.to_bytes(4, "little")
        scratch = core.copy()
        scratch.x[0], scratch.x[1], scratch.pc = elr, spsr & 0xFFFF_FFFF_FFFF_FFFF, site
        await self.rsp.write_memory(site, patch)
        try:
            await self.rsp.write_core(scratch)
            for expected in (site + 4, site + 8):
                stop = await self.rsp.step(thread, timeout=self.timeout)
                if stop.thread not in (None, thread):
                    raise ConduitError(f"stepping {thread} stopped {stop.thread} instead")
                pc = (await self.rsp.read_core()).pc
                if pc != expected:
                    raise ConduitError(f"patched msr step on {thread} ended at {pc:#x}, expected {expected:#x}")
        finally:
            await self.rsp.write_memory(site, original)
        self._g_thread = thread

    async def _select(self, thread: ThreadId) -> None:
        if self._g_thread != thread:
            await self.rsp.select_thread(thread)
            self._g_thread = thread

    async def _after_stop(
        self,
        thread: ThreadId | None,
        core: CoreRegs | None,
        *,
        step_over: ThreadId | None = None,
        resume: bool = True,
    ) -> int:
        """Serve requests, deliver events, write registers back and resume the VM.

        Returns the time (perf_counter_ns) the resume was sent.
        """
        known: dict[int, CoreRegs] = {}
        if thread is not None and core is not None:
            known[thread.vcpu] = core
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if waiter.action is not None:
                try:
                    await waiter.action()
                except ConduitError as err:
                    if not waiter.done.done():
                        waiter.done.set_exception(err)
        delivered = await self._deliver_all(known)
        if step_over is not None and step_over.vcpu in delivered:
            step_over = None  # its pc now points at the handler, nothing to step over
        await self._update_vector_breakpoints()
        self.dispatcher.commit()
        if self._stopping or not resume or self._gate_closed:
            await self._flush_dirty(resume=None)
            for waiter in waiters:
                if not waiter.done.done():
                    waiter.done.set_result(None)
            return time.perf_counter_ns()
        await self._flush_dirty(resume=step_over, resume_always=True)
        now = self._last_write_ns
        if delivered and self._delivery_requested_ns:
            self.stats.delivery_ns.append(now - self._delivery_requested_ns)
            self._delivery_requested_ns = 0
        for waiter in waiters:
            if not waiter.done.done():
                waiter.done.set_result(None)
        return now

    # ---- delivery ------------------------------------------------------------------------------

    async def _deliver_all(self, known: dict[int, CoreRegs]) -> set[int]:
        delivered: set[int] = set()
        for vcpu in self.dispatcher.deliverable():
            if vcpu >= len(self.threads):
                log.warning("dispatcher names vCPU %d but the stub has %d", vcpu, len(self.threads))
                continue
            thread = self.threads[vcpu]
            core = self._dirty.get(vcpu) or known.get(vcpu)
            if core is None:
                core = known[vcpu] = await self._read_for_delivery(thread)
            entered = await self._enter_handlers(vcpu, core)
            if entered is None:
                if vcpu not in self._deferred:
                    self.stats.deferred_deliveries += 1
                    self._deferred.add(vcpu)
                continue
            if entered:
                self._dirty[vcpu] = core
                delivered.add(vcpu)
                self._deferred.discard(vcpu)
        # A deferred vCPU whose event went away (delivered elsewhere, unregistered) stops waiting.
        still = set(self.dispatcher.deliverable())
        self._deferred &= still
        return delivered

    async def _read_for_delivery(self, thread: ThreadId) -> CoreRegs:
        """The registers of a vCPU that may take an event, not yet read this stop (a subclass may
        read more in the same round trip)."""
        if self._g_thread == thread:
            return await self.rsp.read_core()
        self._g_thread = thread
        return await self.rsp.read_core_of(thread)  # Hg + g, one round trip

    async def _enter_handlers(self, vcpu: int, core: CoreRegs) -> bool | None:
        """Enter every handler deliverable on a stopped ``vcpu``, rewriting ``core``.

        Returns True if one was entered, False if none was deliverable, None if the vCPU cannot
        take one where it stands (delivery is then deferred). Subclasses with another way into the
        guest (the EL2 stub) override this.
        """
        if not _is_el1h(core.cpsr):
            return None
        regs = _to_vcpu_regs(core)
        entered = self._enter_deliverable(vcpu, regs)
        if entered:
            _apply(core, regs)
        return entered

    def _enter_deliverable(self, vcpu: int, regs: VcpuRegs) -> bool:
        """Enter every handler deliverable on ``vcpu`` from ``regs`` (which become the last entry's
        state): a critical event may be deliverable right on top of a normal one just entered.
        Whether any was."""
        entered = False
        while self._deliver_one(vcpu, regs):
            entered = True
            self.stats.deliveries += 1
            if vcpu not in self.dispatcher.deliverable():
                break
        return entered

    def _deliver_one(self, vcpu: int, regs: VcpuRegs) -> bool:
        """Enter one handler on ``vcpu`` (``regs`` becomes its entry state); a subclass hook."""
        return self.dispatcher.deliver(vcpu, regs)

    async def _update_vector_breakpoints(self) -> None:
        """Arm vector breakpoints while some vCPU waits for an EL1h entry; drop them after."""
        wanted: set[int] = set()
        if self._deferred:
            assert self.registers is not None
            vbar_reg = self.registers["VBAR_EL1"].regnum
            for vcpu in sorted(self._deferred):
                await self._select(self.threads[vcpu])
                vbar = await self.rsp.read_register(vbar_reg)
                if vbar:
                    wanted.update(vbar + off for off in DEFERRAL_VECTOR_OFFSETS)
                else:
                    log.warning("vCPU %d has no VBAR_EL1 yet; its event waits for a later stop", vcpu)
        wanted -= self.trap_sites
        # One round trip each way, not one per breakpoint: this runs inside a stop, and a timer
        # that retries a delivery (the EL2 stub's) must not find the stop still going.
        if stale := sorted(self._vector_bps - wanted):
            await self.rsp.remove_breakpoints(stale)
        if fresh := sorted(wanted - self._vector_bps):
            await self.rsp.insert_breakpoints(fresh)
        self._vector_bps = wanted

    # ---- write back and resume -----------------------------------------------------------------

    async def _flush_dirty(self, *, resume: ThreadId | None, resume_always: bool = False) -> None:
        """Write changed registers; with ``resume_always``, resume the VM in the same write.

        The last ``Hg`` + ``G`` go out in one write with the resume packet: QEMU handles them in
        order, and only the stop reply is waited for later (replies to Hg/G are checked as they
        arrive, while the VM already runs).
        """
        dirty, self._dirty = self._dirty, {}
        packets: list[bytes | str] = []
        expect: list[bool] = []
        # Guest memory the stop changed (the EL2 stub's per-CPU areas): before the registers, in
        # the same write; QEMU applies packets in order, so the vCPU sees it when it runs.
        for addr, data in self._memory_writes:
            packets.append(f"M{addr:x},{len(data):x}:{data.hex()}")
            expect.append(True)
        self._memory_writes.clear()
        for vcpu, core in dirty.items():
            thread = self.threads[vcpu]
            if self._g_thread != thread:
                packets.append(f"Hg{thread}")
                expect.append(True)
                self._g_thread = thread
            packets.append(RspClient.core_packet(core))
            expect.append(True)
        if resume_always:
            # Stepping a pass-through hvc lets the other vCPUs run: CPU_OFF never finishes its step.
            packets.append(RspClient.resume_packet(step=resume, others_continue=True))
            expect.append(False)
        if not packets:
            return
        futures = self.rsp.send(*packets, expect_reply=expect)
        self._last_write_ns = time.perf_counter_ns()  # the VM resumes now; replies are checked after
        if resume_always:
            self._running = True
            self._held = False  # we resumed it: whoever stopped it before has let it go
            self._trapped_while_held = False
            if self._waiters:
                # A request arrived while this stop was being handled, too late to be served in it.
                self._interrupt()
        for fut in futures:
            reply = await self.rsp.reply(fut, "register write-back", self.timeout)
            if reply != b"OK":
                raise ConduitError(f"register write-back failed: gdbstub replied {reply[:60]!r}")

    # ---- requests from other tasks ----------------------------------------------------------

    async def _at_next_stop(self, action: Callable[[], Awaitable[None]] | None) -> None:
        if self._held:
            # The VM is stopped and no resume of ours is outstanding: the stub answers requests.
            if action is not None:
                await action()
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(action, done))
        if self._running:
            self._interrupt()
        elif self._run_task is not None and self._run_task.done():
            self._waiters.pop()
            raise ConduitError("the conduit is not running (the VM exited or the loop failed)")
        elif self._run_task is None:
            # No loop yet: the VM is stopped and nobody else talks to the stub, act directly.
            self._waiters.pop()
            if action is not None:
                await action()
            return
        try:
            await asyncio.wait_for(asyncio.shield(done), self.timeout)
        except TimeoutError as err:
            raise ConduitError(f"the VM did not stop within {self.timeout}s to serve a request") from err

    def _interrupt(self) -> None:
        self.stats.interrupts += 1
        self._interrupt_sent = True
        self.rsp.interrupt()

    def report_problem(self, problem: str) -> None:
        """Say loudly that the guest is not served as it should be: the log, the SDEI owner (which
        puts it in the status and sends a notification), never silence."""
        log.warning("%s", problem)
        self.dispatcher.conduit_problem(problem)

    def follow_owner(self, runstate: Runstate, *, stops_need_our_resume: bool) -> None:
        """Give a conduit built without them (e.g. by ``attach_conduit``) what
        :meth:`owner_resumed` needs: the runstate query and whether this QEMU reports every stop."""
        self._runstate = runstate
        self.stops_need_our_resume = stops_need_our_resume

    async def owner_resumed(self) -> None:
        """The VM's owner may have resumed a VM the conduit holds: serve it again, on any QEMU.

        The contract for the QMP side: call this for every QMP ``RESUME`` event (it returns at
        once unless :attr:`held`); the conduit must have been given ``runstate``. Calls are
        serialised; each waits until the run loop has finished the stop it may be serving, and
        returns once the VM runs under the conduit again or is held again.
        The loop makes the same check itself after every stop its owner caused, so a RESUME that
        overtakes that stop is not lost.

        It never resumes a VM its owner holds: it acts only while ``runstate`` says ``running``,
        or ``debug`` (the owner resumed it and the guest has trapped since); any other state means
        the VM is still, or again, the owner's. On a stub that reports every stop (7.2) the
        conduit then just expects the next stop. On 8.1 and later a stop would only be reported
        after a resume of ours, so the conduit takes the run back: it sends 0x03 and a plain
        request behind it. If a stop reply comes first, the 0x03 stopped the running VM; the loop
        serves that stop and resumes the VM itself, and stop replies flow again. If not, the VM
        had already stopped before the 0x03 arrived (QEMU discards it), and ``runstate`` says why:
        ``debug`` is a breakpoint stop of ours nobody reported, so the conduit continues the VM and
        the vCPU hits the same breakpoint again at once, reported this time; any other stopped
        state means the owner stopped it again, and the conduit holds it again.

        :raise ConduitError: the stub stopped answering, or the loop stayed busy for ``timeout``.
        """
        async with self._takeover_lock:
            if await self._wait_loop_idle() and self._held:
                await self._follow_owner(in_loop=False)
                await self._wait_loop_idle()  # a stop our 0x03 caused is served and the VM resumed

    async def _follow_owner(self, *, in_loop: bool) -> None:
        """While held: if the owner has resumed the VM, serve it again (see :meth:`owner_resumed`).

        ``in_loop``: called by the run loop between stops; otherwise the loop must be idle, and it
        is checked again after every await (a stop reply wakes it, and then it decides).
        """
        if self._runstate is None or self._gate_closed:
            return  # no runstate to follow; or a migration's switchover: the VM must stay stopped
        for _attempt in range(TAKEOVER_ATTEMPTS):
            state = await self._runstate()
            if not self._held or not (in_loop or self._loop_idle()):
                return  # the loop is serving a stop (or resumed the VM already) and decides
            # "debug" while we hold the VM: its owner resumed it and the guest trapped since.
            if state not in ("running", "debug"):
                return  # still, or again, the owner's
            if not self.stops_need_our_resume:
                if state == "debug" and self._claim_trapped_hold():
                    # That trap was reported and served while the gate was closed, so nobody
                    # resumed the VM after it: do it now (a switchover cancelled after a long pause,
                    # the guest trapping as soon as QEMU resumed it).
                    self._running = True
                    self.rsp.resume()
                    return
                # Every stop is reported: the guest's next trap arrives by itself, and a trap it
                # made already is on its way (the loop resumes the VM after serving it).
                if state == "running":
                    self._held = False
                    self._running = True  # it runs without a resume of ours
                    # Pending deliveries and requests get a 0x03: served now, not at that trap.
                    if self._waiters or self.dispatcher.deliverable():
                        self._interrupt()
                return
            self._held = False
            self._running = state == "running"
            if await self._take_run_back(self._runstate):
                return
        log.warning("the VM's owner kept stopping and resuming it; the conduit waits for its next RESUME")

    def _loop_idle(self) -> bool:
        """run() waits for a stop and none is queued: nobody else talks to the stub, and only a
        new stop reply wakes the loop."""
        return self._awaiting_stop.is_set() and not self.rsp.stop_queued()

    async def _wait_loop_idle(self) -> bool:
        """Wait until :meth:`_loop_idle`; False if the loop is not running."""
        while not self._loop_idle():
            if self._run_task is None or self._run_task.done():
                return False
            if self._awaiting_stop.is_set():
                await asyncio.sleep(0)  # a stop is queued: let the loop take it
                continue
            try:
                await asyncio.wait_for(self._awaiting_stop.wait(), self.timeout)
            except TimeoutError as err:
                raise ConduitError(f"the conduit was busy with one stop for over {self.timeout}s") from err
        return True

    async def _take_run_back(self, runstate: Runstate) -> bool:
        """One 0x03 + probe round (see :meth:`owner_resumed`). False: the VM runs again, try again."""
        self.stats.takeovers += 1
        before = self.rsp.stops_received
        self._interrupt()
        (probe,) = self.rsp.send("qC")  # any request: its reply comes after the 0x03's stop reply
        await self.rsp.reply(probe, "qC after 0x03", self.timeout)
        if self.rsp.stops_received != before:
            return True  # the loop has that stop and resumes the VM itself
        self._interrupt_sent = False  # QEMU discarded it: the VM had stopped already
        state = await runstate()
        if self.rsp.stops_received != before:
            return True  # a stop reply after all (only a stub that reports every stop sends one)
        if state == "debug":
            log.info("the VM's owner resumed it and the guest trapped unreported; continuing to see the trap")
            self._running = True
            self.rsp.resume()
            return True
        if state == "running":
            log.info("the VM's owner stopped and resumed it again meanwhile; interrupting again")
            self._held = True  # as before this round; _follow_owner() starts the next one
            self._running = False
            return False
        log.info("the VM's owner stopped it again (%s); holding it", state)
        self._held = True
        self._running = False
        await self._after_stop(None, None, resume=False)  # requests that came in meanwhile
        return True

    # ---- the migration gate ------------------------------------------------------------------------

    async def hold_vcpus_awake(self, awake: bool) -> None:
        """A migration begins (True) or ended here (False). Conduits with an idle loop of their
        own (the EL2 stub's) keep idle vCPUs from halting meanwhile; this one has none."""

    def close_gate(self) -> None:
        """A migration's switchover has begun: from now on never resume the VM.

        A gdbstub ``c`` during the switchover would run the guest while QEMU sends its final
        state. Stops are still served (their registers written back); the VM just stays stopped.
        """
        self._gate_closed = True
        self._settled.clear()
        self._check_settled()

    def _check_settled(self) -> None:
        if self._gate_closed and not self._in_stop and not self._running:
            self._settled.set()

    async def wait_parked(self, timeout: float) -> None:
        """Wait until, with the gate closed, no stop is being served and no resume of ours runs.

        If the VM still runs under a resume of ours after a short grace (QEMU's own stop reply is
        then not coming), it is interrupted: the switchover will be refused anyway.
        """
        grace = min(0.1, timeout / 4)
        try:
            await asyncio.wait_for(self._settled.wait(), grace)
            return
        except TimeoutError:
            pass
        if self._running and not self._interrupt_sent:
            self._interrupt()
        try:
            await asyncio.wait_for(self._settled.wait(), timeout - grace)
        except TimeoutError as err:
            raise ConduitError(f"the conduit did not settle within {timeout}s for the switchover") from err

    def switchover_safe(self) -> bool:
        """True when the VM is stopped by someone else (QEMU's migration stop, or its owner) and
        not at a breakpoint of ours: the runstate QEMU recorded for the destination is not ``debug``.
        """
        return self._settled.is_set() and self._held

    def stopped_by_migration(self) -> bool:
        """True when the VM is held at QEMU's own migration stop (``T18``): it was running until
        the migration stopped it, so it should run again wherever the migration ends."""
        return self._held and self._held_signal == SIGNAL_XCPU

    async def open_gate(self) -> None:
        """The switchover is over (cancelled or failed): let the VM run again if it was ours to run.

        Nothing to do if the gate was never closed (the migration failed before its switchover), or
        if the VM is held at someone else's stop (QEMU's migration stop: QEMU resumes that VM itself
        when the migration is cancelled, and the RESUME follower tells us). A VM held at one of our
        own stops is resumed here, as it would have been without the gate; if that stop is still
        being served, the loop resumes it when it is done.
        """
        was_closed, self._gate_closed = self._gate_closed, False
        self._settled.clear()
        if not was_closed or self._run_task is None or self._run_task.done():
            return
        if self._in_stop:
            self._resume_when_served = True
            return
        if self._running:
            return
        if self._held:
            # QEMU may have resumed it already (its RESUME came while the gate was closed): check.
            await self.owner_resumed()
            return
        self.rsp.resume()  # the loop is waiting for a stop: it consumes the next reply
        self._running = True

    def _claim_trapped_hold(self) -> bool:
        """If the VM we hold has trapped since its owner resumed it (that stop was reported while
        held), it sits at our breakpoint: it is ours to resume again. Returns whether it was."""
        if not (self._held and self._trapped_while_held):
            return False
        self._held = False
        self._trapped_while_held = False
        return True

    def _resume_if_gate_opened(self) -> None:
        """The gate opened while a stop was served after the loop had decided not to resume."""
        if self._resume_when_served:
            self._resume_when_served = False
            if not self.stops_need_our_resume and self._claim_trapped_hold():
                # The stop just served was a trap after QEMU (ending a failed migration) or the
                # owner resumed the VM we held: it sits at our breakpoint now, ours to resume, as
                # _follow_owner() decides when the gate opens between stops. Without this, a gate
                # that opened during that very stop left the guest in "debug" for good.
                log.info("the VM was resumed by its owner and trapped while the gate opened: resuming it")
            if not (self._running or self._held or self._gate_closed or self._stopping):
                self.rsp.resume()
                self._running = True

    @property
    def held(self) -> bool:
        """True while the VM is stopped by someone else and we are waiting for it to run."""
        return self._held

    def request_delivery(self) -> None:
        """The owner made an event deliverable outside a stop: get a stop soon to enter it.

        Non-blocking (the owner calls it synchronously). A running VM is interrupted; a VM held by
        its owner is left alone (:meth:`owner_resumed` delivers once it runs); inside a stop nothing
        is needed, the stop's own delivery pass sees the event.
        """
        if self._running and not self._interrupt_sent:
            self._interrupt()
        self._delivery_requested_ns = self._delivery_requested_ns or time.perf_counter_ns()

    async def wait_served(self) -> None:
        """Wait until the conduit has handled one stop from now (requests, deliveries)."""
        await self._at_next_stop(None)

    async def detach(self) -> None:
        """Remove every breakpoint and leave the VM as its owner wants it, then close.

        A VM we serve runs on without us (``D;1``). A VM its owner holds (``-S``, QMP ``stop``)
        stays stopped: ``D;1`` would resume it, so its breakpoints are removed one by one instead.
        Calling it again, or after :meth:`close`, does nothing.
        """
        if self._released:
            return
        self._stopping = True
        if self._run_task is not None and not self._run_task.done():
            if self._held:
                # The loop only waits for the stop an owner's cont would bring; nothing is in flight.
                self._run_task.cancel()
                await _loop_ended(self._run_task)
            else:
                # Wait for the loop to end, not for this request to be served: the loop may end
                # at a stop it was already handling, leaving the request unserved.
                request = asyncio.ensure_future(self._at_next_stop(None))
                try:
                    await _loop_ended(asyncio.wait_for(asyncio.shield(self._run_task), self.timeout))
                finally:
                    request.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ConduitError):
                        await request
        if self._held:
            for addr in sorted(self.trap_sites | self._vector_bps):
                await self.rsp.remove_breakpoint(addr)
            await self._disarm_extra()
        else:
            await self.rsp.detach()
        self._released = True
        await self.rsp.close()

    async def close(self) -> None:
        """Drop the connection without detaching (QEMU leaves the VM paused)."""
        self._released = True
        self._stopping = True
        if self._run_task is not None and not self._run_task.done():
            self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConduitError):
                await self._run_task
        await self.rsp.close()

    def _stop_requested(self) -> bool:
        # A method, not the attribute, because another task sets it while the loop awaits.
        return self._stopping

    def _fail_waiters(self, err: ConduitError) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done.done():
                waiter.done.set_exception(err)
