"""The SDEI owner: host actions wait for safe points, raises say what SDEI did, notifications flow."""

from __future__ import annotations

import asyncio

import pytest

from qmp_sdei.abi import psci
from qmp_sdei.owner import NotificationKind, RaiseResult, SdeiOwner
from qmp_sdei.sdei import Dispatcher
from qmp_sdei.versions import VersionPins
from support.sdei import ENTRY, PRIVATE, SHARED, F, call, interrupted_regs, make, register

pytestmark = pytest.mark.asyncio


class FakeConduit:
    """Plays the conduit's part: on a delivery request it handles one stop that enters handlers."""

    def __init__(self, owner: SdeiOwner, *, responsive: bool = True) -> None:
        self.owner = owner
        self.responsive = responsive
        self.requests = 0
        self.stops = 0
        owner.bind_delivery(self.request_delivery)

    def request_delivery(self) -> None:
        self.requests += 1
        if self.responsive:
            asyncio.get_running_loop().call_soon(self.stop)

    def stop(self) -> None:
        self.stops += 1
        self.owner.begin_stop()
        for vcpu in self.owner.deliverable():
            self.owner.deliver(vcpu, interrupted_regs(vcpu))
        self.owner.commit()
        self.owner.end_stop()


def owner_with_writes(d: Dispatcher | None = None) -> tuple[SdeiOwner, list[bytes]]:
    writes: list[bytes] = []
    owner = SdeiOwner(d or make(), pins=VersionPins((1, 1), 0, (1, 0)), persist=writes.append)
    return owner, writes


async def test_a_host_reset_submitted_during_a_stop_waits_for_the_stop_to_end() -> None:
    """The race the owner exists for: a QMP RESET landing between a call and its write-back."""
    owner, writes = owner_with_writes()
    d = owner.dispatcher
    owner.begin_stop()
    assert call(owner, 0, F.EVENT_REGISTER, PRIVATE, ENTRY, 1, 0, 0) == 0  # type: ignore[arg-type]
    reset = asyncio.create_task(owner.vm_reset(guest=False, reason="host-qmp-system-reset"))
    await asyncio.sleep(0)  # let the reset task run up to its wait
    await asyncio.sleep(0)
    assert not reset.done(), "the reset ran in the middle of a stop"
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 1  # the stop still sees its own registration
    owner.commit()  # the registration is durable before the guest sees SUCCESS...
    assert len(writes) == 1
    assert not reset.done()
    owner.end_stop()  # ...and the reset comes after the stop, as a whole
    await asyncio.wait_for(reset, 1)
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 0
    assert owner.counters.resets == 1
    assert len(writes) == 2  # the reset is durable too


async def test_host_actions_run_at_once_between_stops() -> None:
    owner, writes = owner_with_writes()
    await asyncio.wait_for(owner.vm_reset(guest=False), 1)
    assert owner.counters.resets == 1 and len(writes) == 1


async def test_a_failing_host_action_reaches_its_caller_and_changes_nothing() -> None:
    owner, writes = owner_with_writes()
    register(owner.dispatcher, 0, PRIVATE)
    before = owner.dispatcher.snapshot()
    with pytest.raises(Exception, match=r"corrupted|truncated|magic"):
        await owner.restore(b"not a snapshot", cause="test")
    assert owner.dispatcher.snapshot() == before
    assert writes == []


async def test_guest_reset_passed_through_is_not_applied_twice() -> None:
    owner, _ = owner_with_writes()
    d = owner.dispatcher
    register(d, 0, PRIVATE)
    owner.begin_stop()
    assert owner.psci_call(0, psci.Function.SYSTEM_RESET, 0, 0, 0) is None  # QEMU performs it
    owner.commit()
    owner.end_stop()
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 0
    register(d, 0, PRIVATE)  # the guest runs again before QMP's RESET event is read
    await owner.vm_reset(guest=True, reason="guest-reset")
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 3  # kept
    await owner.vm_reset(guest=False)
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 0


@pytest.mark.parametrize(
    ("event", "vcpu", "code"),
    [
        (4242, 0, "unknown_event"),
        (PRIVATE, None, "vcpu_required"),
        (SHARED, 0, "vcpu_not_allowed"),
        (PRIVATE, 2, "vcpu_out_of_range"),
        (PRIVATE, 0, "not_registered"),
    ],
)
async def test_refused_raises_say_why_and_change_nothing(event: int, vcpu: int | None, code: str) -> None:
    owner, writes = owner_with_writes()
    FakeConduit(owner)
    before = owner.dispatcher.snapshot()
    with owner.subscribe() as notes:
        outcome = await owner.raise_event(event, vcpu)
        assert notes.get_nowait() is None
    assert outcome.result is RaiseResult.REFUSED and outcome.code == code, outcome
    assert outcome.reason
    assert owner.dispatcher.snapshot() == before and writes == []
    assert owner.counters.refused == 1


async def test_raise_on_a_masked_vcpu_is_pending_and_durable() -> None:
    owner, writes = owner_with_writes()
    conduit = FakeConduit(owner)
    register(owner.dispatcher, 0, PRIVATE, unmask=False)
    outcome = await owner.raise_event(PRIVATE, 0)
    assert (outcome.result, outcome.code) == (RaiseResult.PENDING, "masked"), outcome
    assert len(writes) == 1 and conduit.requests == 0
    again = await owner.raise_event(PRIVATE, 0)
    assert again.code == "already_pending"


async def test_raise_on_a_disabled_event_is_pending() -> None:
    owner, _ = owner_with_writes()
    FakeConduit(owner)
    register(owner.dispatcher, 0, PRIVATE, enable=False)
    outcome = await owner.raise_event(PRIVATE, 0)
    assert (outcome.result, outcome.code) == (RaiseResult.PENDING, "not_enabled"), outcome


async def test_raise_is_delivered_through_the_conduit_with_notifications() -> None:
    owner, _ = owner_with_writes()
    conduit = FakeConduit(owner)
    with owner.subscribe() as notes:
        owner.begin_stop()
        register(owner, 1, PRIVATE)  # type: ignore[arg-type]  # the guest's calls, inside a stop
        assert notes.get_nowait() is None, "published before the commit"
        owner.commit()
        owner.end_stop()
        outcome = await asyncio.wait_for(owner.raise_event(PRIVATE, 1), 5)
        assert outcome.result is RaiseResult.DELIVERED and outcome.vcpu == 1, outcome
        assert outcome.latency_us is not None and outcome.latency_us >= 0
        assert conduit.stops == 1
        owner.begin_stop()
        regs = interrupted_regs()
        regs.x[0] = F.EVENT_COMPLETE
        owner.hypercall(1, regs)
        owner.commit()
        owner.end_stop()
        kinds = []
        while (item := notes.get_nowait()) is not None:
            kinds.append((item.kind, item.vcpu, item.event))
    assert kinds == [
        (NotificationKind.REGISTERED, 1, PRIVATE),
        (NotificationKind.ENABLED, 1, PRIVATE),
        (NotificationKind.UNMASKED, 1, None),
        (NotificationKind.RAISED, 1, PRIVATE),
        (NotificationKind.ENTERED, 1, PRIVATE),
        (NotificationKind.COMPLETED, 1, PRIVATE),
    ]


async def test_raise_without_a_conduit_or_a_stop_says_pending() -> None:
    owner, _ = owner_with_writes()
    register(owner.dispatcher, 0, PRIVATE)
    assert (await owner.raise_event(PRIVATE, 0)).code == "no_conduit"
    owner2, _ = owner_with_writes()
    FakeConduit(owner2, responsive=False)  # e.g. a VM its owner paused
    register(owner2.dispatcher, 0, PRIVATE)
    outcome = await owner2.raise_event(PRIVATE, 0, wait=0.05)
    assert (outcome.result, outcome.code) == (RaiseResult.PENDING, "not_entered_yet"), outcome
    assert owner2.dispatcher.deliverable() == [0]  # still pending: delivered when the VM runs


async def test_a_slow_subscriber_loses_the_oldest_never_blocks() -> None:
    owner, _ = owner_with_writes()
    with owner.subscribe(backlog=3) as notes:
        for _ in range(5):
            owner.begin_stop()
            call(owner, 0, F.PE_UNMASK)  # type: ignore[arg-type]
            call(owner, 0, F.PE_MASK)  # type: ignore[arg-type]
            owner.commit()
            owner.end_stop()
        assert notes.lost == 7
        got = [n.kind for n in [notes.get_nowait(), notes.get_nowait(), notes.get_nowait()] if n]
    assert got == [NotificationKind.MASKED, NotificationKind.UNMASKED, NotificationKind.MASKED]


async def test_cpu_off_and_draining() -> None:
    owner, _ = owner_with_writes()
    FakeConduit(owner)
    register(owner.dispatcher, 0, PRIVATE)
    owner.draining = True
    outcome = await owner.raise_event(PRIVATE, 0, wait=0.05)
    assert (outcome.result, outcome.code) == (RaiseResult.REFUSED, "shutting_down")  # never entered: say so
    assert owner.dispatcher.pending == set() and not owner.handlers_running()
    owner.draining = False
    owner.begin_stop()
    assert owner.psci_call(0, psci.Function.CPU_OFF, 0, 0, 0) is None
    owner.commit()
    owner.end_stop()
    assert owner.dispatcher.vcpus[0].masked and owner.counters.vcpu_resets == 1
