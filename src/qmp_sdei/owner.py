"""The one owner of a VM's SDEI state: the dispatcher, the version pins, the PSCI policy and the
moment state becomes durable.

Why one owner: the dispatcher is pure and not re-entrant, but four parts of the sidecar want to
change it — the conduit inside a breakpoint stop, the PSCI filter inside the same stop, QMP's RESET
handler, and orchestrators raising events from their own tasks. A host action that lands between a
stop's ``hypercall`` and its register write-back would leave the guest's registers and the SDEI
state describing two different histories. So:

* **Guest calls** stay synchronous inside a conduit stop. The conduit brackets every stop with
  :meth:`SdeiOwner.begin_stop` and :meth:`SdeiOwner.end_stop`, calls :meth:`hypercall`,
  :meth:`psci_call`, :meth:`deliver` in between, and :meth:`commit` before it writes registers
  back (the state is on disk before the guest sees a result).
* **Host actions** (raise, VM reset, snapshot/restore for migration) are :meth:`submit`-ted. They run
  at a safe point: at once when no stop is in flight, otherwise right after the stop ends, and their
  result (or exception) goes back to the caller.
* **Notifications** describe what happened (registered, enabled, masked, handler entered, completed
  with its latency, pending, reset, ...). They are queued while a stop runs and published after its
  commit to every subscriber's bounded queue, which drops its oldest entry rather than ever making
  the guest wait for a slow reader.

No I/O here: persisting is a callback the program layer supplies, delivering is a callback the
conduit supplies. Nothing but this class mutates the dispatcher once the sidecar is serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qmp_sdei.abi import psci
from qmp_sdei.abi.sdei import Function as Call
from qmp_sdei.abi.sdei import Result
from qmp_sdei.abi.smccc import function_id, to_s64
from qmp_sdei.errors import TriggerError
from qmp_sdei.sdei import Completion, Dispatcher, TriggerOutcome, VcpuRegs
from qmp_sdei.versions import VersionPins, psci_answer

log = logging.getLogger("qmp_sdei.owner")

T = TypeVar("T")

#: PSCI calls with which a guest resets the VM (passed through to QEMU).
GUEST_RESET_CALLS = frozenset({psci.Function.SYSTEM_RESET, psci.Function.SYSTEM_RESET2, psci.Function.SYSTEM_RESET2_64})

#: SDEI calls that never change dispatcher state: no need to write the state file after them.
READ_ONLY_CALLS = frozenset({Call.VERSION, Call.EVENT_STATUS, Call.EVENT_GET_INFO, Call.EVENT_CONTEXT, Call.FEATURES})

#: How long a raise waits for the handler to be entered before it answers "pending".
DEFAULT_DELIVERY_WAIT = 5.0

#: Notifications a subscriber may have unread before the oldest are dropped.
SUBSCRIBER_BACKLOG = 1024


class NotificationKind(enum.StrEnum):
    REGISTERED = "registered"
    ENABLED = "enabled"
    DISABLED = "disabled"
    UNREGISTERED = "unregistered"
    UNREGISTER_PENDING = "unregister_pending"  # unregistered once its running handler completes
    ROUTING_SET = "routing_set"
    BOUND = "bound"  # INTERRUPT_BIND made a dynamic event
    RELEASED = "released"
    MASKED = "masked"
    UNMASKED = "unmasked"
    SIGNALLED = "signalled"  # the guest raised event 0 with EVENT_SIGNAL
    RAISED = "raised"  # a host raise was accepted (pending or deliverable)
    PENDING = "pending"  # a raised event waits (disabled, masked, busy)
    ENTERED = "entered"
    COMPLETED = "completed"
    COMPLETED_AND_RESUMED = "completed_and_resumed"
    RESET = "reset"  # scope: vm, vcpu, private, shared
    RESTORED = "restored"  # the whole state was replaced (restart, migration)
    SIDECAR = "sidecar"  # the sidecar's own life: serving, degraded, shutting down, migration phases


@dataclass(frozen=True)
class Notification:
    """One thing that happened to the VM's SDEI state, for adapters to publish."""

    kind: NotificationKind
    vcpu: int | None = None
    event: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": str(self.kind), "time": round(self.time, 6)}
        if self.vcpu is not None:
            doc["vcpu"] = self.vcpu
        if self.event is not None:
            doc["event"] = self.event
        doc.update(self.detail)
        return doc


class Subscription:
    """A subscriber's queue of notifications. Iterate it with ``async for``; never blocks the owner.

    When the reader falls more than ``backlog`` behind, the oldest notifications are dropped and
    counted in :attr:`lost`, so a stuck orchestrator costs memory bounded by ``backlog``.
    """

    def __init__(self, backlog: int = SUBSCRIBER_BACKLOG) -> None:
        self._items: deque[Notification] = deque(maxlen=backlog)
        self._ready = asyncio.Event()
        self.lost = 0
        self.closed = False

    def put(self, item: Notification) -> None:
        if len(self._items) == self._items.maxlen:
            self.lost += 1
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    def get_nowait(self) -> Notification | None:
        return self._items.popleft() if self._items else None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Notification:
        while not self._items:
            if self.closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class RaiseResult(enum.StrEnum):
    DELIVERED = "delivered"
    PENDING = "pending"
    REFUSED = "refused"


@dataclass(frozen=True)
class RaiseOutcome:
    """What SDEI says happened to a host raise; ``code`` is machine-readable, ``reason`` for people."""

    result: RaiseResult
    event: int
    vcpu: int | None = None
    code: str = ""
    reason: str = ""
    latency_us: float | None = None  # raise submitted -> handler entered

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"result": str(self.result), "event": self.event, "vcpu": self.vcpu}
        if self.code:
            doc["code"] = self.code
        if self.reason:
            doc["reason"] = self.reason
        if self.latency_us is not None:
            doc["latency_us"] = round(self.latency_us, 1)
        return doc


@dataclass
class OwnerCounters:
    resets: int = 0
    guest_resets: int = 0
    vcpu_resets: int = 0
    state_writes: int = 0
    raised: int = 0
    delivered: int = 0
    refused: int = 0
    completed: int = 0


@dataclass
class _HostAction:
    run: Callable[[], Any]
    done: asyncio.Future[Any]


# Calls whose success is worth a notification, and what it is called.
_CALL_NOTIFICATIONS = {
    Call.EVENT_REGISTER: NotificationKind.REGISTERED,
    Call.EVENT_ENABLE: NotificationKind.ENABLED,
    Call.EVENT_DISABLE: NotificationKind.DISABLED,
    Call.EVENT_UNREGISTER: NotificationKind.UNREGISTERED,
    Call.EVENT_ROUTING_SET: NotificationKind.ROUTING_SET,
    Call.INTERRUPT_RELEASE: NotificationKind.RELEASED,
    Call.EVENT_SIGNAL: NotificationKind.SIGNALLED,
}


class SdeiOwner:
    """Holds the dispatcher and is the only one to change it; see the module docstring.

    :param persist: writes ``dispatcher.snapshot()`` durably (the state file); None keeps state in
        memory only (tests, benchmarks).
    :param pins: the pinned versions; without them PSCI calls are all left to QEMU.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        pins: VersionPins | None = None,
        persist: Callable[[bytes], None] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.pins = pins
        self._persist = persist
        self.counters = OwnerCounters()
        #: what the conduit reported it cannot do for the guest (see conduit_problem)
        self.problems: list[str] = []
        #: shutting down: enter no new handlers, so the running ones can finish before we detach
        self.draining = False
        self._dirty = False
        self._in_stop = False
        self._queued: deque[_HostAction] = deque()
        self._outbox: list[Notification] = []
        self._subscribers: set[Subscription] = set()
        self._request_delivery: Callable[[], None] | None = None
        self._entry_waiters: dict[int, deque[asyncio.Future[tuple[int, int]]]] = {}
        self._entered_ns: dict[int, list[int]] = {}  # vCPU -> entry times of its running handlers
        self._committed = asyncio.Event()  # replaced at each commit; see wait_committed()
        #: guest resets already applied when the guest's PSCI reset call went through; the QMP
        #: RESET event that follows each must not reset SDEI state a second time
        self._resets_applied_early = 0
        #: told of every SDEI call (function id, x0 as the dispatcher left it, completion) and every
        #: PSCI call (function id, the answer or None when passed to QEMU): the metrics' hooks
        self.on_sdei_call: Callable[[int, int, Completion], None] | None = None
        self.on_psci_call: Callable[[int, int | None], None] | None = None

    # ---- wiring -----------------------------------------------------------------------------------

    def bind_delivery(self, request_delivery: Callable[[], None] | None) -> None:
        """The conduit's way in: called when a host action made an event deliverable."""
        self._request_delivery = request_delivery

    @contextlib.contextmanager
    def subscribe(self, backlog: int = SUBSCRIBER_BACKLOG) -> Iterator[Subscription]:
        sub = Subscription(backlog)
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
            sub.close()

    def notify(
        self, kind: NotificationKind, *, vcpu: int | None = None, event: int | None = None, **detail: Any
    ) -> None:
        """Queue a notification; it is published at the next commit or host action."""
        self._outbox.append(Notification(kind, vcpu, event, detail))
        if not self._in_stop:
            self._publish()

    def _publish(self) -> None:
        outbox, self._outbox = self._outbox, []
        for item in outbox:
            for sub in self._subscribers:
                sub.put(item)

    def conduit_problem(self, problem: str) -> None:
        """The conduit cannot serve the guest as it should (no SDEI probe seen, a stale trap site):
        kept for the status and sent as a notification, so it is never silent."""
        if problem not in self.problems:
            self.problems.append(problem)
            self.notify(NotificationKind.SIDECAR, what="conduit_problem", problem=problem)

    # ---- the guest's side: inside a conduit stop -------------------------------------------------

    def begin_stop(self) -> None:
        """A breakpoint stop is being handled: host actions wait until :meth:`end_stop`."""
        self._in_stop = True

    def end_stop(self) -> None:
        """The stop's registers are written back: run the host actions that waited for it."""
        self._in_stop = False
        self._publish()
        self._run_queued()

    def hypercall(self, vcpu: int, regs: VcpuRegs) -> Completion:
        fid = function_id(regs.x[0])
        event = to_s64(regs.x[1]) if fid != Call.INTERRUPT_BIND else None
        state = self.dispatcher.vcpus[vcpu] if 0 <= vcpu < len(self.dispatcher.vcpus) else None
        was_masked = state.masked if state is not None else None
        running = state.stack[-1].event if state is not None and state.stack else None
        outcome = self.dispatcher.hypercall(vcpu, regs)
        if self.on_sdei_call is not None:
            self.on_sdei_call(fid, regs.x[0], outcome)
        if fid not in READ_ONLY_CALLS:
            self._dirty = True
            self._note_call(
                fid=fid, vcpu=vcpu, event=event, regs=regs, outcome=outcome, was_masked=was_masked, running=running
            )
        return outcome

    def _note_call(
        self,
        *,
        fid: int,
        vcpu: int,
        event: int | None,
        regs: VcpuRegs,
        outcome: Completion,
        was_masked: bool | None,
        running: int | None,
    ) -> None:
        if outcome is not Completion.RETURN:
            entered = self._entered_ns.get(vcpu)
            latency = (time.perf_counter_ns() - entered.pop()) / 1e3 if entered else None
            kind = NotificationKind.COMPLETED
            if outcome is Completion.COMPLETE_AND_RESUME:
                kind = NotificationKind.COMPLETED_AND_RESUMED
            self.counters.completed += 1
            self.notify(kind, vcpu=vcpu, event=running, handler_us=None if latency is None else round(latency, 1))
            return
        result = to_s64(regs.x[0])
        if fid in (Call.PE_MASK, Call.PE_UNMASK):
            masked = self.dispatcher.vcpus[vcpu].masked
            if was_masked is not None and masked != was_masked:
                self.notify(NotificationKind.MASKED if masked else NotificationKind.UNMASKED, vcpu=vcpu)
            return
        if fid in (Call.PRIVATE_RESET, Call.SHARED_RESET) and result == Result.SUCCESS:
            if fid == Call.PRIVATE_RESET:
                self._entered_ns.pop(vcpu, None)
            scope = "private" if fid == Call.PRIVATE_RESET else "shared"
            self.notify(NotificationKind.RESET, vcpu=vcpu, scope=scope, cause="guest")
            return
        if fid == Call.INTERRUPT_BIND and result >= 0:
            self.notify(NotificationKind.BOUND, vcpu=vcpu, event=result, interrupt=regs.x[1])
            return
        if fid == Call.EVENT_UNREGISTER and result == Result.PENDING:
            self.notify(NotificationKind.UNREGISTER_PENDING, vcpu=vcpu, event=event)
            return
        kind = _CALL_NOTIFICATIONS.get(fid)  # type: ignore[call-overload]  # IntEnum keys hash as ints
        if kind is not None and result == Result.SUCCESS:
            self.notify(kind, vcpu=vcpu, event=0 if fid == Call.EVENT_SIGNAL else event)

    def psci_call(self, vcpu: int, fid: int, x1: int, x2: int, x3: int) -> int | None:
        """Filter PSCI for the pinned version; keep SDEI state in step with vCPU and VM power.

        Returns the answer, or None to let QEMU answer (the call is then passed through).
        """
        if self.pins is None:
            return None
        answer = psci_answer(self.pins.psci, fid, x1)
        if answer is None and fid in GUEST_RESET_CALLS:
            # Reset SDEI state now, before QEMU resets the VM and the guest runs again. Waiting for
            # QMP's RESET event would race with the guest's first calls after the reset: the event
            # and the next breakpoint stop arrive on different sockets in no guaranteed order.
            self._reset_vm(cause="guest")
            self._resets_applied_early += 1
        elif answer is None and fid == psci.Function.CPU_OFF:
            # The vCPU powers down: its private events are gone and it comes back masked.
            self.dispatcher.reset_vcpu(vcpu)
            self._entered_ns.pop(vcpu, None)
            self.counters.vcpu_resets += 1
            self._dirty = True
            self.notify(NotificationKind.RESET, vcpu=vcpu, scope="vcpu", cause="cpu_off")
        if self.on_psci_call is not None:
            self.on_psci_call(fid, answer)
        return answer

    def deliverable(self) -> list[int]:
        return [] if self.draining else self.dispatcher.deliverable()

    def deliver(self, vcpu: int, regs: VcpuRegs) -> bool:
        if self.draining:
            return False
        entered = self.dispatcher.deliver(vcpu, regs)
        if entered:
            self._dirty = True
            now = time.perf_counter_ns()
            self._entered_ns.setdefault(vcpu, []).append(now)
            event = self.dispatcher.vcpus[vcpu].stack[-1].event
            self.counters.delivered += 1
            self.notify(NotificationKind.ENTERED, vcpu=vcpu, event=event)
            waiters = self._entry_waiters.get(event)
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result((vcpu, now))
                    break
        return entered

    def commit(self) -> None:
        """Make the stop's changes durable, then publish its notifications.

        Called by the conduit after its dispatcher calls and before any register is written back.
        """
        if self._dirty:
            self._save()
        self._publish()
        self._committed.set()
        self._committed = asyncio.Event()

    async def wait_committed(self) -> None:
        """Wait for the conduit's next commit (the end of a stop that may have changed state)."""
        await self._committed.wait()

    def handlers_running(self) -> bool:
        return any(vcpu.stack for vcpu in self.dispatcher.vcpus)

    # ---- the host's side: submitted, run at a safe point -----------------------------------------

    async def submit(self, action: Callable[[], T]) -> T:
        """Run ``action`` (which may change the dispatcher) at a safe point and return its result.

        Safe means no conduit stop is in flight: at once if none is, otherwise right after the
        current one's registers are written back. The state is saved after the action if it changed
        anything, and the action's notifications are published. Exceptions propagate to the caller.
        """
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queued.append(_HostAction(action, done))
        if not self._in_stop:
            self._run_queued()
        return await done

    def _run_queued(self) -> None:
        while self._queued and not self._in_stop:
            item = self._queued.popleft()
            if item.done.cancelled():
                continue
            try:
                value = item.run()
            except Exception as err:  # handed to the submitter, who decides
                item.done.set_exception(err)
            else:
                item.done.set_result(value)
            # Ask for the stop first: QEMU stops the vCPU while we write the state file.
            if self._request_delivery is not None and self.deliverable():
                self._request_delivery()
            if self._dirty:
                self._save()
            self._publish()

    def _save(self) -> None:
        self._dirty = False
        if self._persist is not None:
            self._persist(self.dispatcher.snapshot())
            self.counters.state_writes += 1

    def save_now(self) -> None:
        """Write the state file whatever changed (at attach, after a restore)."""
        self._dirty = True
        self._save()

    def _reset_vm(self, cause: str) -> None:
        self.dispatcher.reset()
        self._entered_ns.clear()
        self._dirty = True
        self.counters.resets += 1
        self.notify(NotificationKind.RESET, scope="vm", cause=cause)

    async def vm_reset(self, *, guest: bool, reason: str = "") -> None:
        """QMP reported a VM reset: SDEI state resets with it (the pins stay).

        A guest reset the conduit already applied when it passed the PSCI call through is not
        applied twice.
        """

        def reset() -> None:
            if guest:
                self.counters.guest_resets += 1
            if guest and self._resets_applied_early:
                self._resets_applied_early -= 1
                return
            self._reset_vm(cause=reason or ("guest" if guest else "host"))

        await self.submit(reset)

    async def restore(self, blob: bytes, *, cause: str) -> None:
        """Replace the whole state (validated first; nothing changes when it raises)."""

        def restore() -> None:
            self.dispatcher.restore(blob)
            self._entered_ns.clear()
            self._dirty = True
            self.notify(NotificationKind.RESTORED, cause=cause)

        await self.submit(restore)

    async def adopt(self, dispatcher: Dispatcher, pins: VersionPins, *, cause: str) -> None:
        """Take over another dispatcher's state and pins (a migration's incoming state).

        The caller built ``dispatcher`` and restored the incoming snapshot into it (so every check
        has passed); here it replaces the current one between stops, and the state is saved.
        """

        def adopt() -> None:
            self.dispatcher = dispatcher
            self.pins = pins
            self._entered_ns.clear()
            self._dirty = True
            self.notify(NotificationKind.RESTORED, cause=cause)

        await self.submit(adopt)

    async def snapshot(self) -> bytes:
        """The state at a safe point (never half a stop)."""
        return await self.submit(self.dispatcher.snapshot)

    async def raise_event(self, event: int, vcpu: int | None, *, wait: float = DEFAULT_DELIVERY_WAIT) -> RaiseOutcome:
        """Raise ``event`` from the host and say what SDEI made of it.

        ``delivered`` once a handler was entered for it (within ``wait`` seconds), ``pending``
        with the reason it waits, ``refused`` with why it cannot be raised (nothing changed then).
        ``wait=0`` returns as soon as SDEI has decided (code ``deliverable`` when a vCPU can take it).
        """
        started = time.perf_counter_ns()
        if self.draining:
            # Accepted now, it would never be entered: the host must know.
            self.counters.refused += 1
            return RaiseOutcome(RaiseResult.REFUSED, event, vcpu, "shutting_down", "the sidecar is shutting down")
        refusal = self._check_raise(event, vcpu)
        if refusal is not None:
            self.counters.refused += 1
            return refusal
        loop = asyncio.get_running_loop()
        entry: asyncio.Future[tuple[int, int]] = loop.create_future()

        def trigger() -> RaiseOutcome | None:
            d = self.dispatcher
            key = (vcpu, event) if not d.spec(event).shared else (None, event)
            if key in d.pending:
                return RaiseOutcome(
                    RaiseResult.PENDING, event, vcpu, "already_pending", "an earlier raise is still pending"
                )
            try:
                result = d.trigger(event, vcpu)
            except TriggerError as err:
                return RaiseOutcome(RaiseResult.REFUSED, event, vcpu, "invalid", str(err))
            if result.outcome is TriggerOutcome.DROPPED:
                code = "not_bound" if "bound" in result.reason else "not_registered"
                return RaiseOutcome(RaiseResult.REFUSED, event, vcpu, code, result.reason)
            self._dirty = True
            self.counters.raised += 1
            self.notify(NotificationKind.RAISED, vcpu=vcpu, event=event)
            if result.outcome is TriggerOutcome.PENDING:
                self.notify(NotificationKind.PENDING, vcpu=vcpu, event=event, reason=result.reason)
                return RaiseOutcome(RaiseResult.PENDING, event, vcpu, _pending_code(result.reason), result.reason)
            if self._request_delivery is None:
                reason = "deliverable, but no conduit is serving the guest"
                return RaiseOutcome(RaiseResult.PENDING, event, vcpu, "no_conduit", reason)
            self._entry_waiters.setdefault(event, deque()).append(entry)
            return None

        decided = await self.submit(trigger)
        if decided is not None:
            if decided.result is RaiseResult.REFUSED:
                self.counters.refused += 1
            return decided
        if wait <= 0:
            self._forget_entry(event, entry)
            return RaiseOutcome(
                RaiseResult.PENDING, event, vcpu, "deliverable", "deliverable; not waiting for the entry"
            )
        try:
            entered_vcpu, entered_ns = await asyncio.wait_for(asyncio.shield(entry), wait)
        except TimeoutError:
            self._forget_entry(event, entry)
            reason = f"deliverable, but no vCPU entered the handler within {wait:g}s (VM paused or vCPU not in EL1)"
            return RaiseOutcome(RaiseResult.PENDING, event, vcpu, "not_entered_yet", reason)
        return RaiseOutcome(RaiseResult.DELIVERED, event, entered_vcpu, latency_us=(entered_ns - started) / 1e3)

    def _forget_entry(self, event: int, entry: asyncio.Future[tuple[int, int]]) -> None:
        entry.cancel()
        waiters = self._entry_waiters.get(event)
        if waiters is not None and entry in waiters:
            waiters.remove(entry)

    def _check_raise(self, event: int, vcpu: int | None) -> RaiseOutcome | None:
        """Refusals that need no state: unknown event, wrong or missing vCPU (read-only checks)."""
        d = self.dispatcher
        if not d.has_event(event):
            reason = f"event {event} is not in the catalogue"
            return RaiseOutcome(RaiseResult.REFUSED, event, vcpu, "unknown_event", reason)
        shared = d.spec(event).shared
        if shared and vcpu is not None:
            reason = f"event {event} is shared: it is routed as the guest registered it; give no vCPU"
            return RaiseOutcome(RaiseResult.REFUSED, event, vcpu, "vcpu_not_allowed", reason)
        if not shared and vcpu is None:
            reason = f"event {event} is private: name the vCPU to raise it on"
            return RaiseOutcome(RaiseResult.REFUSED, event, vcpu, "vcpu_required", reason)
        if vcpu is not None and not 0 <= vcpu < len(d.vcpus):
            reason = f"vCPU {vcpu} does not exist (the VM has {len(d.vcpus)})"
            return RaiseOutcome(RaiseResult.REFUSED, event, vcpu, "vcpu_out_of_range", reason)
        return None

    # ---- read-only views (the control API's queries) -----------------------------------------------

    def catalogue(self) -> list[dict[str, Any]]:
        return [
            {"number": s.number, "shared": s.shared, "critical": s.critical, "name": s.name}
            for s in self.dispatcher.catalogue
        ]

    def event_view(self, number: int) -> dict[str, Any]:
        """One event's state: per vCPU for a private event, once for a shared one."""
        d = self.dispatcher
        spec = d.spec(number)
        doc: dict[str, Any] = {"number": number, "shared": spec.shared, "critical": spec.critical, "name": spec.name}

        def view(vcpu: int) -> dict[str, Any]:
            inst = d.instance(number, vcpu)
            return {"state": inst.state.name.lower(), "status": int(inst.state)}

        if spec.shared:
            inst = d.instance(number, 0)
            doc.update(view(0))
            doc["route_mode"] = "pe" if inst.route_mode else "any"
            if inst.route_mode:
                doc["affinity"] = inst.affinity
            doc["pending"] = (None, number) in d.pending
        else:
            doc["vcpus"] = [{"index": i, **view(i), "pending": (i, number) in d.pending} for i in range(len(d.vcpus))]
        return doc

    def registered(self) -> dict[str, Any]:
        """Registered events: shared ones once, private ones per vCPU (KVM SDEI's VMM queries)."""
        d = self.dispatcher
        shared = [n for n, inst in sorted(d.shared.items()) if inst.state.registered]
        private = {
            str(i): [n for n, inst in sorted(v.private.items()) if inst.state.registered] for i, v in enumerate(d.vcpus)
        }
        return {"count": len(shared) + sum(len(v) for v in private.values()), "shared": shared, "private": private}

    def vcpu_views(self) -> list[dict[str, Any]]:
        return [
            {
                "index": i,
                "mpidr": v.mpidr,
                "masked": v.masked,
                "running": [f.event for f in v.stack],
                "depth": len(v.stack),
            }
            for i, v in enumerate(self.dispatcher.vcpus)
        ]


def _pending_code(reason: str) -> str:
    if "disabled" in reason:
        return "not_enabled"
    if "masked" in reason:
        return "masked"
    return "busy"
