"""Random call sequences against the dispatcher, checking its invariants after every step.

Invariants (issue: the foundation):
* every event instance's STATUS is one of 0, 1, 3, 4, 5, 7;
* no vCPU has more than two nested handlers, and a nested pair is normal-then-critical;
* running instances and dispatch stacks agree;
* snapshot -> restore into a fresh dispatcher gives an equal dispatcher, at any point.
"""

from __future__ import annotations

from hypothesis import event as record_event
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qmp_sdei.abi.sdei import Function
from qmp_sdei.errors import TriggerError
from qmp_sdei.sdei import DYNAMIC_PRIVATE_BASE, DYNAMIC_SHARED_BASE, Completion, Dispatcher, VcpuRegs
from support.sdei import CRITICAL, PRIVATE, SHARED, SHARED_CRITICAL, make, mpidr_of

VCPUS = 3
EVENTS = [0, PRIVATE, CRITICAL, SHARED, SHARED_CRITICAL, DYNAMIC_PRIVATE_BASE, DYNAMIC_SHARED_BASE]
event_numbers = st.sampled_from([*EVENTS, 4242, 0xFFFF_FFFF])
small = st.sampled_from([0, 1, 2, 3, 4, 17, 18, 0x4008_1000])
mpidrs = st.sampled_from([mpidr_of(i) for i in range(VCPUS)] + [0x77, 1 << 31])
interrupts = st.sampled_from([5, 16, 17, 20, 32, 40, 1019, 1020])


class DispatcherMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d: Dispatcher = make()
        self.regs: list[VcpuRegs] = []

    @initialize(profile=st.sampled_from(["tf-a", "kvm"]), version=st.sampled_from([(1, 0), (1, 1)]))
    def setup(self, profile: str, version: tuple[int, int]) -> None:
        self.d = make(profile=profile, vcpus=VCPUS, version=version)
        self.regs = [
            VcpuRegs(x=[i * 0x100 + r for r in range(31)], pc=0x4000_0000 + i, pstate=0x5) for i in range(VCPUS)
        ]

    def _call(self, vcpu: int, fid: int, *args: int) -> None:
        regs = self.regs[vcpu]
        regs.x[0] = fid
        for i, value in enumerate(args, start=1):
            regs.x[i] = value
        outcome = self.d.hypercall(vcpu, regs)
        if outcome is Completion.RETURN:
            regs.pc += 4  # the conduit would continue after the hvc

    vcpus = st.integers(0, VCPUS - 1)

    @rule(vcpu=vcpus, event=event_numbers, entry=small, flags=st.sampled_from([0, 1, 2]), aff=mpidrs)
    def register(self, vcpu: int, event: int, entry: int, flags: int, aff: int) -> None:
        self._call(vcpu, Function.EVENT_REGISTER, event, entry, 0xA0, flags, aff)

    @rule(vcpu=vcpus, events=st.lists(st.sampled_from(EVENTS), min_size=1, max_size=3), rm_pe=st.booleans())
    def arm(self, vcpu: int, events: list[int], rm_pe: bool) -> None:
        """A guest setting events up properly: without it random calls rarely reach a handler."""
        for event in events:
            if event in (DYNAMIC_PRIVATE_BASE, DYNAMIC_SHARED_BASE):
                self._call(vcpu, Function.INTERRUPT_BIND, 16 if event == DYNAMIC_PRIVATE_BASE else 33)
            self._call(vcpu, Function.EVENT_REGISTER, event, 0x4008_1000 + event, 0xA0, int(rm_pe), mpidr_of(vcpu))
            self._call(vcpu, Function.EVENT_ENABLE, event)
        self._call(vcpu, Function.PE_UNMASK)

    @rule(vcpu=vcpus, critical=st.sampled_from([CRITICAL, SHARED_CRITICAL]))
    def raise_nested(self, vcpu: int, critical: int) -> None:
        """Raise a normal and then a critical event on one vCPU: the path to nesting depth 2."""
        for event in (PRIVATE, critical):
            self.d.trigger(event, None if self.d.spec(event).shared else vcpu)
            self.d.deliver(vcpu, self.regs[vcpu])

    @rule(vcpu=vcpus, event=event_numbers, fn=st.sampled_from([
        Function.EVENT_ENABLE, Function.EVENT_DISABLE, Function.EVENT_UNREGISTER, Function.EVENT_STATUS,
        Function.INTERRUPT_RELEASE,
    ]))  # fmt: skip
    def event_call(self, vcpu: int, event: int, fn: int) -> None:
        self._call(vcpu, fn, event)

    @rule(vcpu=vcpus, event=event_numbers, info=st.integers(0, 5))
    def get_info(self, vcpu: int, event: int, info: int) -> None:
        self._call(vcpu, Function.EVENT_GET_INFO, event, info)

    @rule(vcpu=vcpus, event=event_numbers, mode=st.sampled_from([0, 1, 2]), aff=mpidrs)
    def routing_set(self, vcpu: int, event: int, mode: int, aff: int) -> None:
        self._call(vcpu, Function.EVENT_ROUTING_SET, event, mode, aff)

    @rule(vcpu=vcpus, fn=st.sampled_from([
        Function.PE_MASK, Function.PE_UNMASK, Function.PRIVATE_RESET, Function.SHARED_RESET, Function.VERSION,
    ]))  # fmt: skip
    def plain_call(self, vcpu: int, fn: int) -> None:
        self._call(vcpu, fn)

    @rule(vcpu=vcpus, index=small)
    def context(self, vcpu: int, index: int) -> None:
        self._call(vcpu, Function.EVENT_CONTEXT, index)

    @rule(vcpu=vcpus, resume=st.booleans())
    def complete(self, vcpu: int, resume: bool) -> None:
        if resume:
            self._call(vcpu, Function.EVENT_COMPLETE_AND_RESUME, 0x4010_0280)
        else:
            self._call(vcpu, Function.EVENT_COMPLETE, 0)

    @rule(vcpu=vcpus, to=mpidrs, event=st.sampled_from([0, 0, PRIVATE]))
    def signal(self, vcpu: int, to: int, event: int) -> None:
        self._call(vcpu, Function.EVENT_SIGNAL, event, to)

    @rule(vcpu=vcpus, intid=interrupts)
    def bind(self, vcpu: int, intid: int) -> None:
        self._call(vcpu, Function.INTERRUPT_BIND, intid)

    @rule(vcpu=vcpus, feature=st.integers(0, 2))
    def features(self, vcpu: int, feature: int) -> None:
        self._call(vcpu, Function.FEATURES, feature)

    @rule(event=st.sampled_from(EVENTS), vcpu=vcpus)
    def trigger(self, event: int, vcpu: int) -> None:
        self.d.trigger(event, None if self.d.spec(event).shared else vcpu)

    def _registered(self) -> list[tuple[int, int | None]]:
        found: list[tuple[int, int | None]] = [
            (n, i) for i, v in enumerate(self.d.vcpus) for n, inst in v.private.items() if inst.state.registered
        ]
        return found + [(n, None) for n, inst in self.d.shared.items() if inst.state.registered]

    @precondition(lambda self: bool(self._registered()))
    @rule(data=st.data())
    def trigger_registered(self, data: st.DataObject) -> None:
        """Raise an event somebody registered, so handlers actually run and nest."""
        event, vcpu = data.draw(st.sampled_from(self._registered()))
        self.d.trigger(event, vcpu)
        ready = self.d.deliverable()
        if ready and data.draw(st.booleans()):
            target = data.draw(st.sampled_from(ready))
            assert self.d.deliver(target, self.regs[target])

    @rule(event=st.sampled_from([*EVENTS, 4242]), vcpu=st.one_of(st.none(), st.integers(-1, VCPUS)))
    def trigger_any_arguments(self, event: int, vcpu: int | None) -> None:
        before = self.d.snapshot()
        try:
            self.d.trigger(event, vcpu)
        except TriggerError:
            assert self.d.snapshot() == before  # refused, nothing changed

    @precondition(lambda self: bool(self.d.deliverable()))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        vcpu = data.draw(st.sampled_from(self.d.deliverable()))
        assert self.d.deliver(vcpu, self.regs[vcpu])

    @rule(vcpu=vcpus)
    def deliver_anywhere(self, vcpu: int) -> None:
        expected = vcpu in self.d.deliverable()
        assert self.d.deliver(vcpu, self.regs[vcpu]) == expected

    @rule(vcpu=vcpus, whole_vm=st.booleans())
    def reset(self, vcpu: int, whole_vm: bool) -> None:
        # One rule for both resets, so wiping everything is not drawn more often than building up.
        if whole_vm:
            self.d.reset()
        else:
            self.d.reset_vcpu(vcpu)

    @invariant()
    def record_coverage(self) -> None:
        """Statistics (pytest --hypothesis-show-statistics) show the deep states are reached."""
        depth = max(len(v.stack) for v in self.d.vcpus)
        record_event(f"max nesting depth {depth}")
        states = {int(i.state) for v in self.d.vcpus for i in v.private.values()}
        states |= {int(i.state) for i in self.d.shared.values()}
        if 4 in states:
            record_event("unregister-pending reached")

    @invariant()
    def status_values_reachable_only(self) -> None:
        for vcpu in self.d.vcpus:
            assert all(int(inst.state) in {0, 1, 3, 4, 5, 7} for inst in vcpu.private.values())
        assert all(int(inst.state) in {0, 1, 3, 4, 5, 7} for inst in self.d.shared.values())

    @invariant()
    def nesting_at_most_two_normal_then_critical(self) -> None:
        for vcpu in self.d.vcpus:
            assert len(vcpu.stack) <= 2
            if len(vcpu.stack) == 2:
                assert not self.d.spec(vcpu.stack[0].event).critical
                assert self.d.spec(vcpu.stack[1].event).critical

    @invariant()
    def running_matches_stacks(self) -> None:
        on_stacks = [(i, f.event) for i, v in enumerate(self.d.vcpus) for f in v.stack]
        for i, vcpu in enumerate(self.d.vcpus):
            for number, inst in vcpu.private.items():
                assert inst.state.running == ((i, number) in on_stacks)
        for number, inst in self.d.shared.items():
            assert inst.state.running == (sum(1 for _, n in on_stacks if n == number) == 1)

    @invariant()
    def snapshot_round_trip(self) -> None:
        fresh = make(profile=self.d.profile.name, vcpus=VCPUS, version=self.d.version)
        fresh.restore(self.d.snapshot())
        assert fresh == self.d


DispatcherMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
TestDispatcherMachine = DispatcherMachine.TestCase
