"""The SDEI dispatcher: one per VM, pure, synchronous and deterministic.

The dispatcher is driven by calls from the adapters and answers through return values and the
:class:`VcpuRegs` it is handed:

* ``hypercall(vcpu, regs)``: the guest made an SMC/HVC; x0 holds the function id.
* ``trigger(event, vcpu)``: the host raises an event (private: on a vCPU; shared: routed).
* ``deliverable()`` / ``deliver(vcpu, regs)``: which vCPUs have an event to enter now, and entering it.
* ``reset_vcpu(vcpu)`` / ``reset()``: PSCI CPU_ON/OFF and VM reset.
* ``snapshot()`` / ``restore(blob)``: the whole state as bytes (see ``snapshot.py``).

It must never do I/O, sleep, look at the clock, or know about QEMU: the conduit, the bus and the
vmstate service translate their worlds into these calls. Behaviour follows Arm DEN 0054 as
``docs/sdei.md`` describes it call by call; where real dispatchers differ, a
:class:`~qmp_sdei.sdei.model.Profile` decides.

Ordering rule used by every call: argument checks (unknown event, bad flags, bad MPIDR, bad info
id...) answer INVALID_PARAMETERS before any state check answers DENIED, as TF-A does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from qmp_sdei.abi import sdei as abi
from qmp_sdei.abi.sdei import Function, Result
from qmp_sdei.abi.smccc import function_id
from qmp_sdei.errors import CatalogueError, TriggerError
from qmp_sdei.sdei.model import PROFILES, EventSpec, Profile, VcpuRegs
from qmp_sdei.sdei.state import Action, HandlerState, transition

#: Dynamic (INTERRUPT_BIND) event numbers: private slot i is PRIVATE_BASE + i, shared SHARED_BASE + i.
#: Bit 30 marks them, as the QEMU RFC did, keeping them clear of platform numbers like 1000/2000.
DYNAMIC_PRIVATE_BASE = 0x4000_0000
DYNAMIC_SHARED_BASE = 0x4001_0000
DYNAMIC_RANGE = range(DYNAMIC_PRIVATE_BASE, DYNAMIC_SHARED_BASE + 0x1_0000)
MAX_BIND_SLOTS = 0xFFFF  # FEATURES(BIND_SLOTS) reports each count in 16 bits
MAX_NESTING = 2  # one normal handler plus one critical handler per vCPU

# PSTATE fields
PSTATE_MODE_MASK = 0x1F  # M[4:0]
PSTATE_EL1H = 0x5  # AArch64, EL1, SP_EL1
PSTATE_DAIF = 0x3C0
PSTATE_SS = 1 << 21
PSTATE_IL = 1 << 20
PSTATE_PAN = 1 << 22
PSTATE_BTYPE = 0x3 << 10

SUPPORTED_VERSIONS = ((1, 0), (1, 1))


class Completion(Enum):
    """How a hypercall left the vCPU; the conduit uses it to know what to write back."""

    RETURN = "return"  # x0 holds the result; execution continues at regs.pc
    COMPLETE = "complete"  # x0..x17, pc and pstate were restored to the interrupted context
    COMPLETE_AND_RESUME = "complete_and_resume"  # as COMPLETE, plus ELR_EL1/SPSR_EL1 and a new pc


class TriggerOutcome(Enum):
    DROPPED = "dropped"  # the event is not registered (or its interrupt not bound): nothing happens
    PENDING = "pending"  # recorded; it will be delivered once enabled/unmasked/free
    DELIVERABLE = "deliverable"  # a vCPU can enter the handler now


@dataclass(frozen=True)
class TriggerResult:
    outcome: TriggerOutcome
    #: vCPUs that could enter the handler right now (empty unless DELIVERABLE).
    vcpus: tuple[int, ...] = ()
    reason: str = ""


@dataclass
class EventInstance:
    """One registration slot: per vCPU for private events, per VM for shared ones."""

    state: HandlerState = HandlerState.UNREGISTERED
    entry_point: int = 0
    argument: int = 0
    route_mode: int = abi.RM_ANY  # shared events only
    affinity: int = 0  # shared events with RM_PE only

    def forget_registration(self) -> None:
        self.entry_point = self.argument = self.affinity = 0
        self.route_mode = abi.RM_ANY


@dataclass
class DispatchFrame:
    """A handler in progress on a vCPU, with the context it interrupted."""

    event: int
    saved_x: list[int]  # x0..x17
    pc: int
    pstate: int


@dataclass
class VcpuState:
    mpidr: int
    masked: bool = True  # every vCPU starts masked
    stack: list[DispatchFrame] = field(default_factory=list)
    private: dict[int, EventInstance] = field(default_factory=dict)


_Handler = Callable[["Dispatcher", int, VcpuRegs], "int | Completion"]
_HANDLERS: dict[int, _Handler] = {}


def _handles(function: Function) -> Callable[[_Handler], _Handler]:
    def register(handler: _Handler) -> _Handler:
        _HANDLERS[function] = handler
        return handler

    return register


def _u32_signed(value: int) -> int:
    """Event numbers are the low 32 bits of x1, read as a signed int (TF-A does ``(int)x1``)."""
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value & (1 << 31) else value


def handler_entry_pstate(interrupted: int) -> int:
    """PSTATE for a handler: the client EL with SP_ELx (EL1h) and D, A, I, F all masked.

    Other bits (NZCV, PAN, DIT...) carry over from the interrupted context, as an exception entry
    would leave them; single-step, illegal-state and BTYPE are cleared.
    """
    cleared = interrupted & ~(PSTATE_MODE_MASK | PSTATE_DAIF | PSTATE_SS | PSTATE_IL | PSTATE_BTYPE)
    return cleared | PSTATE_DAIF | PSTATE_EL1H


class Dispatcher:
    """A spec-complete SDEI dispatcher for one VM.

    :param events: the VM's fixed catalogue; event 0 is always added (private, normal, signalable).
    :param mpidrs: each vCPU's MPIDR, indexed by vCPU number (affinity fields only).
    :param version: the SDEI version to advertise, (1, 0) or (1, 1); default: the profile's.
    :param vendor: the 32-bit vendor field of SDEI_VERSION; default: the profile's.
    :param profile: ``"tf-a"`` (default), ``"kvm"``, or a :class:`Profile`.
    :param bind_slots: (private, shared) dynamic slots for SDEI_INTERRUPT_BIND.
    :raise CatalogueError: for an invalid catalogue or topology.
    """

    def __init__(  # noqa: PLR0917 (positional order is part of the published API)
        self,
        events: Iterable[EventSpec] = (),
        mpidrs: Sequence[int] = (0,),
        version: tuple[int, int] | None = None,
        profile: str | Profile = "tf-a",
        bind_slots: tuple[int, int] = (0, 0),
        vendor: int | None = None,
    ) -> None:
        self.profile = _resolve_profile(profile)
        self.version = _check_version(self.profile.default_version if version is None else version)
        vendor = self.profile.default_vendor if vendor is None else vendor
        if not 0 <= vendor <= 0xFFFF_FFFF:
            raise CatalogueError(f"SDEI vendor field {vendor:#x} does not fit in 32 bits")
        self.vendor = vendor
        self.bind_slots = _check_bind_slots(bind_slots)
        self.mpidrs = _check_mpidrs(mpidrs)
        self.catalogue: tuple[EventSpec, ...] = _check_catalogue(events)
        self._specs: dict[int, EventSpec] = {spec.number: spec for spec in self.catalogue}
        private_slots, shared_slots = self.bind_slots
        for slot in range(private_slots):
            self._specs[DYNAMIC_PRIVATE_BASE + slot] = EventSpec(DYNAMIC_PRIVATE_BASE + slot)
        for slot in range(shared_slots):
            self._specs[DYNAMIC_SHARED_BASE + slot] = EventSpec(DYNAMIC_SHARED_BASE + slot, shared=True)
        # Delivery preference: critical before normal, then lower event numbers first.
        self._priority_order = sorted(self._specs.values(), key=lambda s: (not s.critical, s.number))
        self._vcpu_by_mpidr = {mpidr: index for index, mpidr in enumerate(self.mpidrs)}
        self._init_state()

    # -- state ------------------------------------------------------------------------------------

    def _init_state(self) -> None:
        self.vcpus: list[VcpuState] = [
            VcpuState(mpidr, private=self.fresh_private_instances()) for mpidr in self.mpidrs
        ]
        self.shared: dict[int, EventInstance] = {n: EventInstance() for n, spec in self._specs.items() if spec.shared}
        #: dynamic event number -> bound interrupt id
        self.bindings: dict[int, int] = {}
        #: pending triggers: (vCPU, event) for private events, (None, event) for shared ones
        self.pending: set[tuple[int | None, int]] = set()

    def fresh_private_instances(self) -> dict[int, EventInstance]:
        return {n: EventInstance() for n, spec in self._specs.items() if not spec.shared}

    def has_event(self, number: object) -> bool:
        """True if ``number`` is an event of this VM (catalogue or dynamic slot)."""
        return isinstance(number, int) and number in self._specs

    def is_dynamic(self, number: int) -> bool:
        return number in DYNAMIC_RANGE and number in self._specs

    def spec(self, number: int) -> EventSpec:
        """The catalogue entry for ``number`` (dynamic slots included). :raise KeyError:"""
        return self._specs[number]

    def instance(self, number: int, vcpu: int) -> EventInstance:
        """The instance of ``number`` as seen from ``vcpu`` (private: that vCPU's; shared: the VM's)."""
        if self._specs[number].shared:
            return self.shared[number]
        return self.vcpus[vcpu].private[number]

    def _pending_key(self, number: int, vcpu: int) -> tuple[int | None, int]:
        return (None, number) if self._specs[number].shared else (vcpu, number)

    def _instances_of(self, number: int) -> list[EventInstance]:
        if self._specs[number].shared:
            return [self.shared[number]]
        return [vcpu.private[number] for vcpu in self.vcpus]

    def _check_vcpu(self, vcpu: int) -> VcpuState:
        if not 0 <= vcpu < len(self.vcpus):
            raise ValueError(f"vCPU index {vcpu} out of range (VM has {len(self.vcpus)} vCPUs)")
        return self.vcpus[vcpu]

    # -- the guest's calls ------------------------------------------------------------------------

    def hypercall(self, vcpu: int, regs: VcpuRegs) -> Completion:
        """Handle the SDEI call in ``regs.x[0]`` made by ``vcpu``.

        On return either x0 holds the result (``Completion.RETURN``) or the whole context was
        rewritten by COMPLETE / COMPLETE_AND_RESUME. Function ids that are not SDEI SMC64 calls,
        including the SMC32 encodings of SDEI numbers, answer NOT_SUPPORTED.
        """
        self._check_vcpu(vcpu)
        handler = _HANDLERS.get(function_id(regs.x[0]))
        if handler is None:
            regs.set_result(Result.NOT_SUPPORTED)
            return Completion.RETURN
        outcome = handler(self, vcpu, regs)
        if isinstance(outcome, Completion):
            return outcome
        regs.set_result(outcome)
        return Completion.RETURN

    def _event_arg(self, raw: int) -> EventSpec | None:
        return self._specs.get(_u32_signed(raw))

    def _valid_mpidr(self, mpidr: int) -> bool:
        # Only the affinity fields identify a PE: a guest may pass MPIDR_EL1 as read, with the
        # RES1 bit 31 (and U/MT bits) set.
        return (mpidr & abi.MPIDR_AFFINITY_MASK) in self._vcpu_by_mpidr

    def _valid_route(self, mode: int, affinity: int) -> bool:
        if mode == abi.RM_ANY:
            return True
        return mode == abi.RM_PE and self._valid_mpidr(affinity)

    @_handles(Function.VERSION)
    def _version(self, vcpu: int, regs: VcpuRegs) -> int:
        return abi.encode_version(*self.version, self.vendor)

    @_handles(Function.EVENT_REGISTER)
    def _register(self, vcpu: int, regs: VcpuRegs) -> int:
        spec = self._event_arg(regs.x[1])
        entry_point, argument, flags, affinity = regs.x[2], regs.x[3], regs.x[4], regs.x[5]
        if spec is None or entry_point == 0:
            return Result.INVALID_PARAMETERS
        if flags not in abi.REGISTER_FLAGS_VALID:
            return Result.INVALID_PARAMETERS
        checks_affinity = spec.shared or self.profile.validates_private_affinity
        if checks_affinity and not self._valid_route(flags, affinity):
            return Result.INVALID_PARAMETERS
        if self.is_dynamic(spec.number) and spec.number not in self.bindings:
            return Result.DENIED
        inst = self.instance(spec.number, vcpu)
        nxt = transition(Action.REGISTER, inst.state)
        if isinstance(nxt, Result):
            return nxt
        inst.state, inst.entry_point, inst.argument = nxt, entry_point, argument
        if spec.shared:
            inst.route_mode = flags
            inst.affinity = affinity & abi.MPIDR_AFFINITY_MASK if flags == abi.RM_PE else 0
        # A private event always targets its own vCPU, whatever the flags said (TF-A forces RM_PE).
        return Result.SUCCESS

    def _simple_transition(self, action: Action, vcpu: int, regs: VcpuRegs) -> int:
        spec = self._event_arg(regs.x[1])
        if spec is None:
            return Result.INVALID_PARAMETERS
        inst = self.instance(spec.number, vcpu)
        nxt = transition(action, inst.state)
        if isinstance(nxt, Result):
            return nxt
        inst.state = nxt
        return Result.SUCCESS

    @_handles(Function.EVENT_ENABLE)
    def _enable(self, vcpu: int, regs: VcpuRegs) -> int:
        return self._simple_transition(Action.ENABLE, vcpu, regs)

    @_handles(Function.EVENT_DISABLE)
    def _disable(self, vcpu: int, regs: VcpuRegs) -> int:
        return self._simple_transition(Action.DISABLE, vcpu, regs)

    @_handles(Function.EVENT_UNREGISTER)
    def _unregister(self, vcpu: int, regs: VcpuRegs) -> int:
        spec = self._event_arg(regs.x[1])
        if spec is None:
            return Result.INVALID_PARAMETERS
        inst = self.instance(spec.number, vcpu)
        nxt = transition(Action.UNREGISTER, inst.state)
        if isinstance(nxt, Result):
            return nxt
        inst.state = nxt
        self.pending.discard(self._pending_key(spec.number, vcpu))
        if nxt is HandlerState.UNREGISTER_PENDING:
            return Result.PENDING
        inst.forget_registration()
        return Result.SUCCESS

    @_handles(Function.EVENT_STATUS)
    def _status(self, vcpu: int, regs: VcpuRegs) -> int:
        spec = self._event_arg(regs.x[1])
        if spec is None:
            return Result.INVALID_PARAMETERS
        return int(self.instance(spec.number, vcpu).state)

    @_handles(Function.EVENT_GET_INFO)
    def _get_info(self, vcpu: int, regs: VcpuRegs) -> int:
        spec = self._event_arg(regs.x[1])
        info = regs.x[2]
        if spec is None:
            return Result.INVALID_PARAMETERS
        if info == abi.InfoId.EV_TYPE:
            return abi.TYPE_SHARED if spec.shared else abi.TYPE_PRIVATE
        if info == abi.InfoId.EV_SIGNALED:
            return int(spec.signalable != self.profile.signaled_info_inverted)
        if info == abi.InfoId.EV_PRIORITY:
            return abi.PRIORITY_CRITICAL if spec.critical else abi.PRIORITY_NORMAL
        if info in (abi.InfoId.EV_ROUTING_MODE, abi.InfoId.EV_ROUTING_AFF):
            if not spec.shared:
                return Result.INVALID_PARAMETERS
            inst = self.shared[spec.number]
            if not inst.state.registered:
                return Result.DENIED
            if info == abi.InfoId.EV_ROUTING_MODE:
                return inst.route_mode
            return inst.affinity if inst.route_mode == abi.RM_PE else Result.INVALID_PARAMETERS
        return Result.INVALID_PARAMETERS

    @_handles(Function.EVENT_ROUTING_SET)
    def _routing_set(self, vcpu: int, regs: VcpuRegs) -> int:
        spec = self._event_arg(regs.x[1])
        mode, affinity = regs.x[2], regs.x[3]
        if spec is None or not spec.shared:
            return Result.INVALID_PARAMETERS
        if self.is_dynamic(spec.number) and spec.number not in self.bindings:
            return Result.INVALID_PARAMETERS  # only events with an interrupt behind them route
        if not self._valid_route(mode, affinity):
            return Result.INVALID_PARAMETERS
        inst = self.shared[spec.number]
        nxt = transition(Action.ROUTING_SET, inst.state)
        if isinstance(nxt, Result):
            return nxt
        inst.route_mode = mode
        inst.affinity = affinity & abi.MPIDR_AFFINITY_MASK if mode == abi.RM_PE else 0
        return Result.SUCCESS

    @_handles(Function.PE_MASK)
    def _pe_mask(self, vcpu: int, regs: VcpuRegs) -> int:
        state = self.vcpus[vcpu]
        changed = not state.masked
        state.masked = True
        return int(changed and self.profile.pe_mask_reports_change)

    @_handles(Function.PE_UNMASK)
    def _pe_unmask(self, vcpu: int, regs: VcpuRegs) -> int:
        self.vcpus[vcpu].masked = False
        return Result.SUCCESS

    @_handles(Function.EVENT_CONTEXT)
    def _context(self, vcpu: int, regs: VcpuRegs) -> int:
        index = regs.x[1]
        stack = self.vcpus[vcpu].stack
        checks = [
            (index >= abi.SAVED_GPRS, Result.INVALID_PARAMETERS),
            (not stack, Result.DENIED),
        ]
        if not self.profile.context_checks_index_first:
            checks.reverse()
        for failed, code in checks:
            if failed:
                return code
        return stack[-1].saved_x[index]

    def _pop_dispatch(self, vcpu: int) -> DispatchFrame:
        """Finish the newest handler on ``vcpu``: its event leaves the running state."""
        frame = self.vcpus[vcpu].stack.pop()
        inst = self.instance(frame.event, vcpu)
        nxt = transition(Action.COMPLETE, inst.state)
        assert isinstance(nxt, HandlerState), "a dispatched event must be in a running state"
        inst.state = nxt
        if nxt is HandlerState.UNREGISTERED:
            inst.forget_registration()
        return frame

    @_handles(Function.EVENT_COMPLETE)
    def _complete(self, vcpu: int, regs: VcpuRegs) -> int | Completion:
        if not self.vcpus[vcpu].stack:
            return Result.DENIED
        frame = self._pop_dispatch(vcpu)  # x1 (handled/failed) is informational, as in TF-A
        regs.x[: abi.SAVED_GPRS] = frame.saved_x
        regs.pc, regs.pstate = frame.pc, frame.pstate
        return Completion.COMPLETE

    @_handles(Function.EVENT_COMPLETE_AND_RESUME)
    def _complete_and_resume(self, vcpu: int, regs: VcpuRegs) -> int | Completion:
        if not self.vcpus[vcpu].stack:
            return Result.DENIED
        resume_address = regs.x[1]
        handler_pstate = regs.pstate
        frame = self._pop_dispatch(vcpu)
        # Make it look as if an exception had been taken to EL1 at the interrupted point.
        regs.x[: abi.SAVED_GPRS] = frame.saved_x
        regs.elr_el1, regs.spsr_el1 = frame.pc, frame.pstate
        regs.pc = resume_address
        regs.pstate = (handler_pstate & PSTATE_PAN) | PSTATE_DAIF | PSTATE_EL1H
        return Completion.COMPLETE_AND_RESUME

    @_handles(Function.EVENT_SIGNAL)
    def _signal(self, vcpu: int, regs: VcpuRegs) -> int:
        if _u32_signed(regs.x[1]) != abi.SIGNAL_EVENT:
            return Result.INVALID_PARAMETERS
        if self.profile.signal_targets_caller:
            target = vcpu
        elif self._valid_mpidr(regs.x[2]):
            target = self._vcpu_by_mpidr[regs.x[2] & abi.MPIDR_AFFINITY_MASK]
        else:
            return Result.INVALID_PARAMETERS
        inst = self.vcpus[target].private[abi.SIGNAL_EVENT]
        if not self.profile.signal_queues_when_not_ready:
            ready = inst.state.enabled and not self.vcpus[target].masked
            if not ready:
                return Result.INVALID_PARAMETERS
        elif not inst.state.registered:
            return Result.INVALID_PARAMETERS
        self.pending.add((target, abi.SIGNAL_EVENT))
        return Result.SUCCESS

    @_handles(Function.FEATURES)
    def _features(self, vcpu: int, regs: VcpuRegs) -> int:
        feature = regs.x[1]
        if feature == abi.Feature.BIND_SLOTS:
            private_slots, shared_slots = self.bind_slots
            return (shared_slots << 16) | private_slots
        relative_mode_known = self.version >= (1, 1) or self.profile.relative_mode_feature_on_1_0
        if feature == abi.Feature.RELATIVE_MODE and relative_mode_known:
            return 0  # relative-mode registration is not supported
        return Result.INVALID_PARAMETERS

    @_handles(Function.INTERRUPT_BIND)
    def _interrupt_bind(self, vcpu: int, regs: VcpuRegs) -> int:
        if not self.profile.interrupt_binding:
            return Result.NOT_SUPPORTED
        intid = regs.x[1]
        if intid in abi.PPI_RANGE:
            base, slots = DYNAMIC_PRIVATE_BASE, self.bind_slots[0]
        elif intid in abi.SPI_RANGE:
            base, slots = DYNAMIC_SHARED_BASE, self.bind_slots[1]
        else:
            return Result.INVALID_PARAMETERS  # SGIs and ids outside the GIC's PPI/SPI ranges
        for number, bound in self.bindings.items():
            if bound == intid:
                return number  # binding is idempotent
        for number in range(base, base + slots):
            if number not in self.bindings:
                self.bindings[number] = intid
                return number
        return Result.OUT_OF_RESOURCE

    @_handles(Function.INTERRUPT_RELEASE)
    def _interrupt_release(self, vcpu: int, regs: VcpuRegs) -> int:
        if not self.profile.interrupt_binding:
            return Result.NOT_SUPPORTED
        spec = self._event_arg(regs.x[1])
        if spec is None or not self.is_dynamic(spec.number) or spec.number not in self.bindings:
            return Result.INVALID_PARAMETERS
        return self._release(spec.number)

    def _release(self, number: int) -> int:
        for inst in self._instances_of(number):
            if isinstance(transition(Action.INTERRUPT_RELEASE, inst.state), Result):
                return Result.DENIED  # still registered somewhere
        del self.bindings[number]
        self.pending = {key for key in self.pending if key[1] != number}
        return Result.SUCCESS

    def _unregister_for_reset(self, number: int, vcpu: int) -> bool:
        """Unregister one instance for a reset call; False if its handler runs (left pending)."""
        inst = self.instance(number, vcpu)
        self.pending.discard(self._pending_key(number, vcpu))
        if inst.state.running:
            inst.state = HandlerState.UNREGISTER_PENDING
            return False
        if inst.state.registered:
            inst.state = HandlerState.UNREGISTERED
            inst.forget_registration()
        return True

    @_handles(Function.PRIVATE_RESET)
    def _private_reset(self, vcpu: int, regs: VcpuRegs) -> int:
        clean = [self._unregister_for_reset(n, vcpu) for n in self.vcpus[vcpu].private]
        if all(clean) or not self.profile.private_reset_denied_while_running:
            return Result.SUCCESS
        return Result.DENIED

    @_handles(Function.SHARED_RESET)
    def _shared_reset(self, vcpu: int, regs: VcpuRegs) -> int:
        clean = [self._unregister_for_reset(n, vcpu) for n in self.shared]
        if not all(clean):
            return Result.DENIED  # bindings are kept when a shared handler is still running
        released = [self._release(n) for n in sorted(self.bindings)]
        return Result.SUCCESS if all(r == Result.SUCCESS for r in released) else Result.DENIED

    # -- the host's side --------------------------------------------------------------------------

    def trigger(self, event: int, vcpu: int | None = None) -> TriggerResult:
        """Raise ``event``: on ``vcpu`` for a private event, routed (``vcpu=None``) for a shared one.

        A trigger for an event that is not registered (or a dynamic event whose interrupt is not
        bound) is dropped, as the spec says. Otherwise it stays pending until delivered.

        :raise TriggerError: unknown event, or a vCPU given for a shared event / missing for a
            private one, or out of range. Nothing changes then.
        """
        spec = self._specs.get(event)
        if spec is None:
            raise TriggerError(f"event {event} is not in this VM's catalogue")
        if spec.shared and vcpu is not None:
            raise TriggerError(f"event {event} is shared: it is routed by its registration, not to a vCPU")
        if not spec.shared:
            if vcpu is None:
                raise TriggerError(f"event {event} is private: name the vCPU to raise it on")
            if not 0 <= vcpu < len(self.vcpus):
                raise TriggerError(f"vCPU {vcpu} does not exist (VM has {len(self.vcpus)})")
        target = 0 if vcpu is None else vcpu
        if self.is_dynamic(event) and event not in self.bindings:
            return TriggerResult(TriggerOutcome.DROPPED, reason="no interrupt is bound to this event")
        if not self.instance(event, target).state.registered:
            return TriggerResult(TriggerOutcome.DROPPED, reason="event is not registered")
        key = self._pending_key(event, target)
        self.pending.add(key)
        # Only this event counts: another one being deliverable on the vCPU says nothing about it.
        ready = tuple(v for v in self._route_targets(key) if self._pick(v) == key)
        if ready:
            return TriggerResult(TriggerOutcome.DELIVERABLE, ready)
        return TriggerResult(TriggerOutcome.PENDING, reason=self._why_waiting(key))

    def _why_waiting(self, key: tuple[int | None, int]) -> str:
        inst = self.instance(key[1], key[0] or 0)
        if not inst.state.enabled:
            return "event is disabled or its handler is running"
        targets = self._route_targets(key)
        if all(self.vcpus[v].masked for v in targets):
            return "target vCPU is masked"
        if all(not self.vcpus[v].stack for v in targets):
            return "a higher-priority event is delivered first"
        return "a handler of equal or higher priority is running"

    def _route_targets(self, key: tuple[int | None, int]) -> list[int]:
        vcpu, number = key
        if vcpu is not None:
            return [vcpu]
        inst = self.shared[number]
        if inst.route_mode == abi.RM_PE:
            target = self._vcpu_by_mpidr.get(inst.affinity)
            return [] if target is None else [target]
        return list(range(len(self.vcpus)))

    def _pick(self, vcpu: int) -> tuple[int | None, int] | None:
        """The pending event ``vcpu`` would enter now, or None (the delivery conditions in ``docs/sdei.md``)."""
        state = self.vcpus[vcpu]
        if state.masked or not self.pending or len(state.stack) >= MAX_NESTING:
            return None
        only_critical = bool(state.stack)
        if only_critical and self._specs[state.stack[-1].event].critical:
            return None  # nothing preempts a critical handler
        for spec in self._priority_order:
            if only_critical and not spec.critical:
                return None  # a normal event never preempts a running handler
            key = self._pending_key(spec.number, vcpu)
            if key not in self.pending:
                continue
            if self.instance(spec.number, vcpu).state is not HandlerState.ENABLED:
                continue
            if key[0] is None and vcpu not in self._route_targets(key):
                continue
            return key
        return None

    def deliverable(self) -> list[int]:
        """The vCPU indices that could enter a handler right now, in ascending order."""
        if not self.pending:
            return []
        candidates: set[int] = set()
        for key in self.pending:
            candidates.update(self._route_targets(key))
        return sorted(v for v in candidates if self._pick(v) is not None)

    def deliver(self, vcpu: int, regs: VcpuRegs) -> bool:
        """Enter the best deliverable handler on ``vcpu``, rewriting ``regs``; False if none.

        Saves x0..x17, pc and pstate of the interrupted context, then sets x0 = event,
        x1 = registered argument, x2 = interrupted pc, x3 = interrupted pstate, pc = entry point
        and a PSTATE of EL1h with DAIF masked.
        """
        self._check_vcpu(vcpu)
        key = self._pick(vcpu)
        if key is None:
            return False
        number = key[1]
        inst = self.instance(number, vcpu)
        nxt = transition(Action.DISPATCH, inst.state)
        assert isinstance(nxt, HandlerState)
        inst.state = nxt
        self.pending.discard(key)
        self.vcpus[vcpu].stack.append(DispatchFrame(number, list(regs.x[: abi.SAVED_GPRS]), regs.pc, regs.pstate))
        regs.x[0], regs.x[1], regs.x[2], regs.x[3] = number, inst.argument, regs.pc, regs.pstate
        if self.profile.zero_unused_entry_registers:
            regs.x[4 : abi.SAVED_GPRS] = [0] * (abi.SAVED_GPRS - 4)
        regs.pc = inst.entry_point
        regs.pstate = handler_entry_pstate(regs.pstate)
        return True

    def reset_vcpu(self, vcpu: int) -> None:
        """A vCPU was powered on/off or reset: its private state is cleared and it is masked.

        Handlers it was running are abandoned; a shared event it was handling leaves the running
        state so another vCPU can take it again.
        """
        state = self._check_vcpu(vcpu)
        while state.stack:
            frame = state.stack[-1]
            if self._specs[frame.event].shared:
                self._pop_dispatch(vcpu)
            else:
                state.stack.pop()
        state.private = self.fresh_private_instances()
        state.masked = True
        self.pending = {key for key in self.pending if key[0] != vcpu}

    def reset(self) -> None:
        """VM reset: nothing registered, nothing bound or pending, every vCPU masked."""
        self._init_state()

    # -- introspection ----------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary of the state, for status output and the orchestration API."""

        def inst_view(inst: EventInstance) -> dict[str, Any]:
            return {"status": int(inst.state), "state": inst.state.name.lower()}

        return {
            "version": f"{self.version[0]}.{self.version[1]}",
            "vendor": self.vendor,
            "profile": self.profile.name,
            "vcpus": [
                {
                    "index": i,
                    "mpidr": v.mpidr,
                    "masked": v.masked,
                    "running": [f.event for f in v.stack],
                    "events": {str(n): inst_view(inst) for n, inst in v.private.items() if inst.state},
                }
                for i, v in enumerate(self.vcpus)
            ],
            "shared": {str(n): inst_view(inst) for n, inst in self.shared.items()},
            "bindings": {str(n): intid for n, intid in sorted(self.bindings.items())},
            "pending": sorted(
                [{"event": n, "vcpu": v} for v, n in self.pending], key=lambda p: (p["event"], p["vcpu"] or 0)
            ),
        }

    def snapshot(self) -> bytes:
        """The whole state as a self-describing, checksummed blob (see ``snapshot.py``)."""
        from qmp_sdei.sdei.snapshot import encode  # noqa: PLC0415 (snapshot imports this module)

        return encode(self)

    def restore(self, blob: bytes) -> None:
        """Replace the state with ``blob``; validates everything first and changes nothing on error.

        :raise IncompatibleState: truncated, corrupted, unknown format version, or a state from a
            dispatcher with a different catalogue, topology, profile or versions.
        """
        from qmp_sdei.sdei.snapshot import decode_into  # noqa: PLC0415

        decode_into(self, blob)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Dispatcher):
            return NotImplemented
        from qmp_sdei.sdei.snapshot import state_document  # noqa: PLC0415

        return state_document(self) == state_document(other)

    __hash__ = None  # type: ignore[assignment]  # mutable


# -- construction checks ----------------------------------------------------------------------------


def _check_version(version: tuple[int, int]) -> tuple[int, int]:
    version = tuple(version)  # type: ignore[assignment]
    if version not in SUPPORTED_VERSIONS:
        raise CatalogueError(f"SDEI version {version} is not supported (choose 1.0 or 1.1)")
    return version


def _resolve_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise CatalogueError(f"unknown profile {profile!r} (choose {', '.join(PROFILES)})") from None


def _check_bind_slots(bind_slots: tuple[int, int]) -> tuple[int, int]:
    if len(bind_slots) != 2 or not all(isinstance(n, int) and 0 <= n <= MAX_BIND_SLOTS for n in bind_slots):
        raise CatalogueError(f"bind_slots must be (private, shared) counts in 0..{MAX_BIND_SLOTS}")
    return (bind_slots[0], bind_slots[1])


def _check_mpidrs(mpidrs: Sequence[int]) -> tuple[int, ...]:
    result = tuple(mpidrs)
    if not result:
        raise CatalogueError("a VM needs at least one vCPU")
    for index, mpidr in enumerate(result):
        if not isinstance(mpidr, int) or mpidr < 0 or mpidr & ~abi.MPIDR_AFFINITY_MASK:
            raise CatalogueError(f"vCPU {index}: MPIDR {mpidr!r} has bits outside the affinity fields")
    if len(set(result)) != len(result):
        raise CatalogueError("two vCPUs share an MPIDR")
    return result


def _check_catalogue(events: Iterable[EventSpec]) -> tuple[EventSpec, ...]:
    specs = list(events)
    numbers: set[int] = set()
    for spec in specs:
        if not isinstance(spec, EventSpec):
            raise CatalogueError(f"catalogue entries must be EventSpec, got {spec!r}")
        if not isinstance(spec.number, int) or isinstance(spec.number, bool):
            raise CatalogueError(f"event number {spec.number!r} is not an integer")
        if spec.number < 0 or spec.number > 0x7FFF_FFFF:
            raise CatalogueError(f"event {spec.number:#x}: event numbers are 31-bit (bit 31 must be clear)")
        if spec.number in DYNAMIC_RANGE:
            raise CatalogueError(
                f"event {spec.number:#x} is in the range reserved for INTERRUPT_BIND slots "
                f"({DYNAMIC_RANGE.start:#x}..{DYNAMIC_RANGE.stop - 1:#x})"
            )
        if spec.number in numbers:
            raise CatalogueError(f"event {spec.number} is declared twice")
        if spec.number == abi.SIGNAL_EVENT and (spec.shared or spec.critical):
            raise CatalogueError("event 0 is defined by the spec as private and normal priority")
        numbers.add(spec.number)
    if abi.SIGNAL_EVENT not in numbers:
        specs.insert(0, EventSpec(abi.SIGNAL_EVENT, name="software-signalled"))
    return tuple(sorted(specs, key=lambda s: s.number))
