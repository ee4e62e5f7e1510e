"""Per-call behaviour of the dispatcher, as ``docs/sdei.md`` describes it (calls, delivery, profiles)."""

from __future__ import annotations

import json

import pytest

from qmp_sdei.abi.sdei import Result
from qmp_sdei.errors import CatalogueError, TriggerError
from qmp_sdei.sdei import (
    DYNAMIC_PRIVATE_BASE,
    DYNAMIC_SHARED_BASE,
    Completion,
    Dispatcher,
    EventSpec,
    TriggerOutcome,
    VcpuRegs,
)
from support.sdei import (
    ARG,
    CRITICAL,
    ENTRY,
    PRIVATE,
    SHARED,
    SHARED_CRITICAL,
    F,
    call,
    interrupted_regs,
    make,
    mpidr_of,
    register,
    run_handler,
)

INVALID, DENIED, PENDING, NOT_SUPPORTED = (
    Result.INVALID_PARAMETERS,
    Result.DENIED,
    Result.PENDING,
    Result.NOT_SUPPORTED,
)


# -- construction ----------------------------------------------------------------------------------


def test_event_zero_always_present_private_normal() -> None:
    d = Dispatcher(events=[EventSpec(5)], mpidrs=[0])
    assert [s.number for s in d.catalogue] == [0, 5]
    assert call(d, 0, F.EVENT_GET_INFO, 0, 0) == 0  # private
    assert call(d, 0, F.EVENT_GET_INFO, 0, 2) == 0  # normal


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([EventSpec(7), EventSpec(7)], "declared twice"),
        ([EventSpec(0x8000_0000)], "bit 31"),
        ([EventSpec(-1)], "bit 31"),
        ([EventSpec(0, shared=True)], "event 0"),
        ([EventSpec(0, critical=True)], "event 0"),
        ([EventSpec(DYNAMIC_PRIVATE_BASE)], "reserved"),
        ([EventSpec(True)], "not an integer"),  # type: ignore[arg-type]
    ],
)
def test_invalid_catalogue(events: list[EventSpec], message: str) -> None:
    with pytest.raises(CatalogueError, match=message):
        Dispatcher(events=events, mpidrs=[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mpidrs": []}, "at least one"),
        ({"mpidrs": [0, 0]}, "share an MPIDR"),
        ({"mpidrs": [1 << 31]}, "affinity"),
        ({"version": (2, 0)}, "not supported"),
        ({"version": (1, 2)}, "not supported"),
        ({"profile": "linux"}, "unknown profile"),
        ({"bind_slots": (-1, 0)}, "bind_slots"),
        ({"bind_slots": (0x10000, 0)}, "bind_slots"),
        ({"vendor": 1 << 32}, "vendor"),
    ],
)
def test_invalid_topology_or_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(CatalogueError, match=message):
        Dispatcher(**kwargs)  # type: ignore[arg-type]


# -- VERSION, FEATURES, unknown ids ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "vendor", "word"), [((1, 0), 0, 0x1_0000_0000_0000), ((1, 1), 0x4B564D, 0x1_0001_004B_564D)]
)
def test_version_encoding(version: tuple[int, int], vendor: int, word: int) -> None:
    d = make(version=version, vendor=vendor)
    assert call(d, 0, F.VERSION) == word


@pytest.mark.parametrize("fid", [0x8400_0020, 0x8400_002F, 0x8400_0032, 0xC400_0033, 0xC400_003F, 0xC400_0000, 0x1234])
def test_smc32_forms_and_unknown_ids_not_supported(fid: int) -> None:
    d = make()
    assert call(d, 0, fid) == NOT_SUPPORTED


def test_upper_half_of_x0_is_not_part_of_the_function_id() -> None:
    assert call(make(), 0, (0xDEAD << 32) | F.VERSION) > 0


def test_features() -> None:
    assert call(make(bind_slots=(3, 5)), 0, F.FEATURES, 0) == 0x0005_0003
    assert call(make(version=(1, 1)), 0, F.FEATURES, 1) == 0
    assert call(make(version=(1, 0), profile="tf-a"), 0, F.FEATURES, 1) == INVALID
    assert call(make(version=(1, 0), profile="kvm"), 0, F.FEATURES, 1) == 0
    assert call(make(), 0, F.FEATURES, 2) == INVALID


# -- REGISTER and argument ordering ----------------------------------------------------------------


def test_register_argument_checks_come_before_state_checks() -> None:
    d = make()
    register(d, 0, PRIVATE)  # now registered: a state check alone would say DENIED
    assert call(d, 0, F.EVENT_REGISTER, PRIVATE, 0, ARG, 0, 0) == INVALID  # entry point 0
    assert call(d, 0, F.EVENT_REGISTER, PRIVATE, ENTRY, ARG, 2, 0) == INVALID  # relative mode flag
    assert call(d, 0, F.EVENT_REGISTER, PRIVATE, ENTRY, ARG, 1, 0x77) == INVALID  # RM_PE, no such PE
    assert call(d, 0, F.EVENT_REGISTER, PRIVATE, ENTRY, ARG, 0, 0) == DENIED
    assert call(d, 0, F.EVENT_REGISTER, 4242, ENTRY, ARG, 0, 0) == INVALID  # unknown event


def test_event_number_is_low_32_bits_signed() -> None:
    d = make()
    assert call(d, 0, F.EVENT_STATUS, (1 << 32) | PRIVATE) == 0
    assert call(d, 0, F.EVENT_STATUS, 0xFFFF_FFFF) == INVALID


def test_private_events_are_per_vcpu() -> None:
    d = make()
    register(d, 0, PRIVATE)
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 3
    assert call(d, 1, F.EVENT_STATUS, PRIVATE) == 0
    assert call(d, 1, F.EVENT_REGISTER, PRIVATE, ENTRY, ARG, 0, 0) == 0


def test_shared_events_are_per_vm() -> None:
    d = make()
    register(d, 0, SHARED)
    assert call(d, 1, F.EVENT_STATUS, SHARED) == 3
    assert call(d, 1, F.EVENT_REGISTER, SHARED, ENTRY, ARG, 0, 0) == DENIED
    assert call(d, 1, F.EVENT_DISABLE, SHARED) == 0
    assert call(d, 0, F.EVENT_STATUS, SHARED) == 1


# -- GET_INFO --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "event0", "other"), [("tf-a", 0, 1), ("kvm", 1, 0)])
def test_get_info_signaled_sense_per_profile(profile: str, event0: int, other: int) -> None:
    d = make(profile=profile)
    assert call(d, 0, F.EVENT_GET_INFO, 0, 1) == event0
    assert call(d, 0, F.EVENT_GET_INFO, PRIVATE, 1) == other


def test_get_info_type_priority_and_errors() -> None:
    d = make()
    assert call(d, 0, F.EVENT_GET_INFO, SHARED, 0) == 1
    assert call(d, 0, F.EVENT_GET_INFO, PRIVATE, 0) == 0
    assert call(d, 0, F.EVENT_GET_INFO, CRITICAL, 2) == 1
    assert call(d, 0, F.EVENT_GET_INFO, PRIVATE, 2) == 0
    assert call(d, 0, F.EVENT_GET_INFO, PRIVATE, 5) == INVALID
    assert call(d, 0, F.EVENT_GET_INFO, 4242, 0) == INVALID
    assert call(d, 0, F.EVENT_GET_INFO, PRIVATE, 3) == INVALID  # routing of a private event
    assert call(d, 0, F.EVENT_GET_INFO, SHARED, 3) == DENIED  # shared, not registered
    assert call(d, 0, F.EVENT_REGISTER, SHARED, ENTRY, ARG, 0, 0) == 0
    assert call(d, 0, F.EVENT_GET_INFO, SHARED, 3) == 0  # RM_ANY
    assert call(d, 0, F.EVENT_GET_INFO, SHARED, 4) == INVALID  # no affinity in RM_ANY


# -- routing ---------------------------------------------------------------------------------------


def test_shared_rm_pe_routes_to_that_vcpu_only() -> None:
    d = make(vcpus=3)
    for v in range(3):
        call(d, v, F.PE_UNMASK)
    assert call(d, 0, F.EVENT_REGISTER, SHARED, ENTRY, ARG, 1, mpidr_of(2) | (1 << 31)) == 0
    assert call(d, 0, F.EVENT_GET_INFO, SHARED, 3) == 1
    assert call(d, 0, F.EVENT_GET_INFO, SHARED, 4) == mpidr_of(2)
    call(d, 0, F.EVENT_ENABLE, SHARED)
    result = d.trigger(SHARED)
    assert result.outcome is TriggerOutcome.DELIVERABLE
    assert result.vcpus == (2,)
    assert d.deliverable() == [2]
    assert not d.deliver(0, interrupted_regs())
    assert d.deliver(2, interrupted_regs())


def test_shared_rm_any_goes_to_any_unmasked_vcpu_once() -> None:
    d = make(vcpus=3)
    register(d, 0, SHARED, unmask=False)
    call(d, 1, F.PE_UNMASK)
    call(d, 2, F.PE_UNMASK)
    assert d.trigger(SHARED).vcpus == (1, 2)
    assert d.deliver(2, interrupted_regs())
    assert not d.deliver(1, interrupted_regs())  # taken by vCPU 2; not delivered twice
    assert d.deliverable() == []


def test_routing_set() -> None:
    d = make()
    assert call(d, 0, F.EVENT_ROUTING_SET, PRIVATE, 0, 0) == INVALID
    assert call(d, 0, F.EVENT_ROUTING_SET, SHARED, 2, 0) == INVALID  # no such mode
    assert call(d, 0, F.EVENT_ROUTING_SET, SHARED, 1, 0x99) == INVALID  # no such PE
    assert call(d, 0, F.EVENT_ROUTING_SET, SHARED, 1, 1) == DENIED  # not registered
    call(d, 0, F.EVENT_REGISTER, SHARED, ENTRY, ARG, 0, 0)
    assert call(d, 0, F.EVENT_ROUTING_SET, SHARED, 1, 1) == 0
    assert call(d, 0, F.EVENT_GET_INFO, SHARED, 4) == 1
    call(d, 0, F.EVENT_ENABLE, SHARED)
    assert call(d, 0, F.EVENT_ROUTING_SET, SHARED, 0, 0) == DENIED  # enabled


# -- masking ---------------------------------------------------------------------------------------


def test_vcpus_start_masked_and_unmask_makes_pending_deliverable() -> None:
    d = make()
    register(d, 0, PRIVATE, unmask=False)
    result = d.trigger(PRIVATE, 0)
    assert result.outcome is TriggerOutcome.PENDING
    assert "masked" in result.reason
    assert d.deliverable() == []
    call(d, 0, F.PE_UNMASK)
    assert d.deliverable() == [0]


@pytest.mark.parametrize(("profile", "first", "second"), [("tf-a", 1, 0), ("kvm", 0, 0)])
def test_pe_mask_result(profile: str, first: int, second: int) -> None:
    d = make(profile=profile)
    assert call(d, 0, F.PE_MASK) == 0  # starts masked
    assert call(d, 0, F.PE_UNMASK) == 0
    assert call(d, 0, F.PE_MASK) == first
    assert call(d, 0, F.PE_MASK) == second


def test_masking_does_not_interrupt_a_running_handler() -> None:
    d = make()
    register(d, 0, PRIVATE)
    run_handler(d, 0, PRIVATE)
    assert call(d, 0, F.PE_MASK) == 1
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 7


# -- pending ---------------------------------------------------------------------------------------


def test_trigger_of_unregistered_event_is_dropped() -> None:
    d = make()
    assert d.trigger(PRIVATE, 0).outcome is TriggerOutcome.DROPPED
    register(d, 0, PRIVATE)
    assert d.deliverable() == []


def test_disabled_event_stays_pending_until_enabled() -> None:
    d = make()
    register(d, 0, PRIVATE, enable=False)
    assert d.trigger(PRIVATE, 0).outcome is TriggerOutcome.PENDING
    assert d.deliverable() == []
    call(d, 0, F.EVENT_ENABLE, PRIVATE)
    assert d.deliverable() == [0]


def test_unregister_clears_pending() -> None:
    d = make()
    register(d, 0, PRIVATE, enable=False)
    d.trigger(PRIVATE, 0)
    call(d, 0, F.EVENT_UNREGISTER, PRIVATE)
    register(d, 0, PRIVATE)
    assert d.deliverable() == []


def test_retrigger_while_running_is_delivered_after_complete() -> None:
    d = make()
    register(d, 0, PRIVATE)
    regs = run_handler(d, 0, PRIVATE)
    assert d.trigger(PRIVATE, 0).outcome is TriggerOutcome.PENDING
    assert d.deliverable() == []
    call(d, 0, F.EVENT_COMPLETE, 0, regs=regs)
    assert d.deliverable() == [0]


def test_trigger_errors_change_nothing() -> None:
    d = make()
    register(d, 0, PRIVATE)
    before = d.snapshot()
    for event, vcpu in [(4242, 0), (SHARED, 0), (PRIVATE, None), (PRIVATE, 2), (PRIVATE, -1)]:
        with pytest.raises(TriggerError):
            d.trigger(event, vcpu)
    assert d.snapshot() == before


# -- handler entry, CONTEXT, COMPLETE, COMPLETE_AND_RESUME -----------------------------------------


@pytest.mark.parametrize("profile", ["tf-a", "kvm"])
def test_handler_entry_registers(profile: str) -> None:
    d = make(profile=profile)
    register(d, 0, PRIVATE)
    d.trigger(PRIVATE, 0)
    regs = interrupted_regs(50)
    before = regs.copy()
    assert d.deliver(0, regs)
    assert regs.x[:4] == [PRIVATE, ARG, before.pc, before.pstate]
    expected_x4_17 = [0] * 14 if profile == "kvm" else before.x[4:18]
    assert regs.x[4:18] == expected_x4_17
    assert regs.x[18:] == before.x[18:]
    assert regs.pc == ENTRY
    assert regs.pstate == 0x6000_03C5  # NZCV kept, EL1h, DAIF masked


def test_context_returns_interrupted_registers() -> None:
    d = make()
    register(d, 0, PRIVATE)
    run_handler(d, 0, PRIVATE, seed=70)
    assert [call(d, 0, F.EVENT_CONTEXT, i) for i in range(18)] == [70 + i for i in range(18)]
    assert call(d, 0, F.EVENT_CONTEXT, 18) == INVALID


@pytest.mark.parametrize(("profile", "expected"), [("tf-a", INVALID), ("kvm", DENIED)])
def test_context_index_check_order(profile: str, expected: int) -> None:
    assert call(make(profile=profile), 0, F.EVENT_CONTEXT, 18) == expected
    assert call(make(profile=profile), 0, F.EVENT_CONTEXT, 0) == DENIED


def test_complete_restores_x0_x17_pc_pstate_exactly() -> None:
    d = make()
    register(d, 0, PRIVATE)
    original = interrupted_regs(10)
    d.trigger(PRIVATE, 0)
    regs = original.copy()
    d.deliver(0, regs)
    regs.x[:18] = [0xEE] * 18  # the handler clobbers what it may
    regs.x[0], regs.x[1] = F.EVENT_COMPLETE, 1
    assert d.hypercall(0, regs) is Completion.COMPLETE
    assert regs.x[:18] == original.x[:18]
    assert regs.x[18:] == original.x[18:]
    assert (regs.pc, regs.pstate) == (original.pc, original.pstate)
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 3


def test_complete_and_resume_sets_elr_spsr_and_enters_at_address() -> None:
    d = make()
    register(d, 0, PRIVATE)
    original = interrupted_regs(20)
    d.trigger(PRIVATE, 0)
    regs = original.copy()
    d.deliver(0, regs)
    regs.x[0], regs.x[1] = F.EVENT_COMPLETE_AND_RESUME, 0x4010_0A80
    assert d.hypercall(0, regs) is Completion.COMPLETE_AND_RESUME
    assert regs.x[:18] == original.x[:18]
    assert (regs.elr_el1, regs.spsr_el1) == (original.pc, original.pstate)
    assert regs.pc == 0x4010_0A80
    assert regs.pstate == 0x3C5  # EL1h, DAIF masked


def test_complete_without_handler_is_denied() -> None:
    d = make()
    regs = VcpuRegs(pc=0x1234)
    for fid in (F.EVENT_COMPLETE, F.EVENT_COMPLETE_AND_RESUME):
        regs.x[0] = fid
        assert d.hypercall(0, regs) is Completion.RETURN
        assert regs.x[0] == DENIED & (2**64 - 1)
        assert regs.pc == 0x1234


# -- priorities and nesting ------------------------------------------------------------------------


def test_critical_preempts_normal_and_completes_back_into_it() -> None:
    d = make()
    register(d, 0, PRIVATE)
    register(d, 0, CRITICAL)
    normal = run_handler(d, 0, PRIVATE, seed=0)
    normal.x[5] = 0x5555  # the normal handler's own state at the moment of preemption
    normal_before = normal.copy()
    d.trigger(CRITICAL, 0)
    assert d.deliverable() == [0]
    assert d.deliver(0, normal)
    assert normal.x[0] == CRITICAL
    assert normal.x[2] == normal_before.pc  # interrupted pc is inside the normal handler
    assert call(d, 0, F.EVENT_CONTEXT, 5) == 0x5555
    normal.x[0] = F.EVENT_COMPLETE
    d.hypercall(0, normal)
    assert normal.x[:18] == normal_before.x[:18]
    assert normal.pc == normal_before.pc
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 7
    assert call(d, 0, F.EVENT_STATUS, CRITICAL) == 3


def test_normal_never_preempts_and_critical_never_preempts_critical() -> None:
    d = make()
    register(d, 0, PRIVATE)
    register(d, 0, CRITICAL)
    register(d, 0, SHARED_CRITICAL)
    register(d, 0, SHARED)
    run_handler(d, 0, PRIVATE)
    d.trigger(SHARED)
    assert d.deliverable() == []  # normal while normal runs
    run_handler(d, 0, CRITICAL)
    d.trigger(SHARED_CRITICAL)
    assert d.deliverable() == []  # critical while critical runs
    assert len(d.vcpus[0].stack) == 2


def test_critical_delivered_before_normal_when_both_pending() -> None:
    d = make()
    register(d, 0, PRIVATE, unmask=False)
    register(d, 0, CRITICAL, unmask=False)
    d.trigger(PRIVATE, 0)
    d.trigger(CRITICAL, 0)
    call(d, 0, F.PE_UNMASK)
    regs = interrupted_regs()
    d.deliver(0, regs)
    assert regs.x[0] == CRITICAL
    assert d.deliverable() == []  # normal waits for the critical to finish


# -- UNREGISTER while running ----------------------------------------------------------------------


def test_unregister_while_running() -> None:
    d = make()
    register(d, 0, PRIVATE)
    regs = run_handler(d, 0, PRIVATE)
    assert call(d, 0, F.EVENT_UNREGISTER, PRIVATE) == PENDING
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 4
    assert call(d, 0, F.EVENT_UNREGISTER, PRIVATE) == PENDING
    assert call(d, 0, F.EVENT_ENABLE, PRIVATE) == DENIED
    assert call(d, 0, F.EVENT_REGISTER, PRIVATE, ENTRY, ARG, 0, 0) == DENIED
    call(d, 0, F.EVENT_COMPLETE, 0, regs=regs)
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 0
    assert call(d, 0, F.EVENT_UNREGISTER, PRIVATE) == DENIED


# -- resets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "expected"), [("tf-a", DENIED), ("kvm", 0)])
def test_private_reset(profile: str, expected: int) -> None:
    d = make(profile=profile)
    register(d, 0, PRIVATE)
    register(d, 0, CRITICAL)
    register(d, 1, PRIVATE)
    assert call(d, 0, F.PRIVATE_RESET) == 0
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 0
    assert call(d, 1, F.EVENT_STATUS, PRIVATE) == 3  # other vCPUs untouched
    assert call(d, 0, F.PE_MASK) != 0 or profile == "kvm"  # mask state unchanged (still unmasked)
    call(d, 0, F.PE_UNMASK)
    register(d, 0, PRIVATE)
    run_handler(d, 0, PRIVATE)
    assert call(d, 0, F.PRIVATE_RESET) == expected
    assert call(d, 0, F.EVENT_STATUS, PRIVATE) == 4


def test_shared_reset_unregisters_and_releases_bindings() -> None:
    d = make()
    register(d, 0, SHARED)
    dyn = call(d, 0, F.INTERRUPT_BIND, 40)
    assert call(d, 0, F.SHARED_RESET) == 0
    assert call(d, 0, F.EVENT_STATUS, SHARED) == 0
    assert call(d, 0, F.INTERRUPT_RELEASE, dyn) == INVALID  # already released
    assert d.bindings == {}


def test_shared_reset_denied_while_shared_handler_runs_keeps_bindings() -> None:
    d = make()
    register(d, 0, SHARED)
    call(d, 0, F.INTERRUPT_BIND, 40)
    run_handler(d, 0, SHARED)
    assert call(d, 1, F.SHARED_RESET) == DENIED
    assert call(d, 1, F.EVENT_STATUS, SHARED) == 4
    assert d.bindings


def test_reset_vcpu_clears_private_state_and_masks() -> None:
    d = make()
    register(d, 1, PRIVATE)
    register(d, 1, SHARED)
    run_handler(d, 1, SHARED)
    d.reset_vcpu(1)
    assert call(d, 1, F.EVENT_STATUS, PRIVATE) == 0
    assert call(d, 1, F.EVENT_STATUS, SHARED) == 3  # shared stays registered, no longer running
    assert d.vcpus[1].masked
    assert d.vcpus[1].stack == []


def test_vm_reset_clears_everything() -> None:
    d = make()
    fresh = make()
    register(d, 0, PRIVATE)
    register(d, 1, SHARED)
    call(d, 0, F.INTERRUPT_BIND, 20)
    run_handler(d, 0, PRIVATE)
    d.trigger(SHARED)
    d.reset()
    assert d == fresh


# -- SIGNAL ----------------------------------------------------------------------------------------


def test_signal_to_self_and_to_another_vcpu() -> None:
    d = make()
    register(d, 0, 0)
    register(d, 1, 0)
    assert call(d, 0, F.EVENT_SIGNAL, 0, mpidr_of(0)) == 0
    assert call(d, 0, F.EVENT_SIGNAL, 0, mpidr_of(1) | (1 << 31)) == 0  # MPIDR_EL1 as read
    assert d.deliverable() == [0, 1]


@pytest.mark.parametrize(("profile", "queued"), [("tf-a", False), ("kvm", True)])
def test_signal_to_masked_or_disabled_target(profile: str, queued: bool) -> None:
    d = make(profile=profile)
    register(d, 1, 0, unmask=False)  # masked
    expected = 0 if queued else INVALID
    assert call(d, 1, F.EVENT_SIGNAL, 0, mpidr_of(1)) == expected
    call(d, 1, F.PE_UNMASK)
    call(d, 1, F.EVENT_DISABLE, 0)
    assert call(d, 1, F.EVENT_SIGNAL, 0, mpidr_of(1)) == expected
    call(d, 1, F.EVENT_ENABLE, 0)
    assert (d.deliverable() == [1]) == queued


def test_kvm_signal_ignores_x2_and_targets_the_caller() -> None:
    d = make(profile="kvm")
    register(d, 1, 0)
    assert call(d, 1, F.EVENT_SIGNAL, 0, 0xDEAD) == 0  # x2 is not even checked
    assert d.deliverable() == [1]
    assert call(d, 0, F.EVENT_SIGNAL, 0, mpidr_of(1)) == INVALID  # caller vCPU 0 has no event 0


def test_profiles_default_versions() -> None:
    assert call(Dispatcher(profile="tf-a"), 0, F.VERSION) == 0x1_0000_0000_0000
    assert call(Dispatcher(profile="kvm"), 0, F.VERSION) == 0x1_0001_004B_564D
    assert call(Dispatcher(profile="kvm", version=(1, 0), vendor=0), 0, F.VERSION) == 0x1_0000_0000_0000


def test_kvm_has_no_interrupt_binding_and_no_private_affinity_check() -> None:
    d = make(profile="kvm")
    assert call(d, 0, F.INTERRUPT_BIND, 40) == NOT_SUPPORTED
    assert call(d, 0, F.INTERRUPT_RELEASE, DYNAMIC_SHARED_BASE) == NOT_SUPPORTED
    assert call(d, 0, F.EVENT_REGISTER, PRIVATE, ENTRY, ARG, 1, 0x77) == 0  # RM_PE, bogus affinity
    assert call(make(), 0, F.EVENT_REGISTER, PRIVATE, ENTRY, ARG, 1, 0x77) == INVALID  # TF-A checks it


def test_trigger_reports_only_the_triggered_event_as_deliverable() -> None:
    d = make()
    register(d, 0, 0)
    register(d, 0, PRIVATE, enable=False)
    d.trigger(0, 0)
    result = d.trigger(PRIVATE, 0)  # vCPU 0 has a deliverable event, but not this one
    assert result.outcome is TriggerOutcome.PENDING
    assert "disabled" in result.reason
    register(d, 0, CRITICAL)
    d.trigger(PRIVATE, 0)
    call(d, 0, F.EVENT_ENABLE, PRIVATE)
    assert d.trigger(CRITICAL, 0).outcome is TriggerOutcome.DELIVERABLE  # critical goes first
    late = d.trigger(0, 0)
    assert late.outcome is TriggerOutcome.PENDING
    assert "higher-priority" in late.reason


def test_signal_argument_errors() -> None:
    d = make()
    register(d, 0, 0)
    assert call(d, 0, F.EVENT_SIGNAL, PRIVATE, 0) == INVALID  # only event 0
    assert call(d, 0, F.EVENT_SIGNAL, 0, 0x42) == INVALID  # no such PE
    assert call(d, 0, F.EVENT_SIGNAL, 0, mpidr_of(1)) == INVALID  # not registered there


# -- INTERRUPT_BIND / RELEASE ----------------------------------------------------------------------


def test_bind_ppi_and_spi_to_slots() -> None:
    d = make(bind_slots=(3, 2))
    assert call(d, 0, F.INTERRUPT_BIND, 16) == DYNAMIC_PRIVATE_BASE
    assert call(d, 0, F.INTERRUPT_BIND, 17) == DYNAMIC_PRIVATE_BASE + 1
    assert call(d, 0, F.INTERRUPT_BIND, 16) == DYNAMIC_PRIVATE_BASE  # idempotent
    assert call(d, 0, F.INTERRUPT_BIND, 18) == DYNAMIC_PRIVATE_BASE + 2
    assert call(d, 0, F.INTERRUPT_BIND, 19) == Result.OUT_OF_RESOURCE
    assert call(d, 0, F.INTERRUPT_BIND, 32) == DYNAMIC_SHARED_BASE
    assert call(d, 0, F.EVENT_GET_INFO, DYNAMIC_SHARED_BASE, 0) == 1
    for bad in (0, 15, 1020, 1 << 40):
        assert call(d, 0, F.INTERRUPT_BIND, bad) == INVALID


def test_no_slots_means_out_of_resource() -> None:
    assert call(make(bind_slots=(0, 0)), 0, F.INTERRUPT_BIND, 40) == Result.OUT_OF_RESOURCE


def test_dynamic_event_lifecycle() -> None:
    d = make()
    dyn = DYNAMIC_SHARED_BASE
    assert call(d, 0, F.EVENT_REGISTER, dyn, ENTRY, ARG, 0, 0) == DENIED  # not bound
    assert call(d, 0, F.INTERRUPT_RELEASE, dyn) == INVALID  # not bound
    assert call(d, 0, F.INTERRUPT_RELEASE, SHARED) == INVALID  # not dynamic
    assert d.trigger(dyn).outcome is TriggerOutcome.DROPPED
    assert call(d, 0, F.INTERRUPT_BIND, 99) == dyn
    register(d, 0, dyn)
    assert call(d, 0, F.INTERRUPT_RELEASE, dyn) == DENIED  # still registered
    run_handler(d, 0, dyn)
    call(d, 0, F.EVENT_COMPLETE, 0)
    call(d, 0, F.EVENT_UNREGISTER, dyn)
    assert call(d, 0, F.INTERRUPT_RELEASE, dyn) == 0
    assert call(d, 0, F.INTERRUPT_BIND, 100) == dyn  # slot reusable


def test_release_of_private_dynamic_needs_every_vcpu_unregistered() -> None:
    d = make()
    dyn = call(d, 0, F.INTERRUPT_BIND, 20)
    register(d, 1, dyn)
    assert call(d, 0, F.INTERRUPT_RELEASE, dyn) == DENIED
    call(d, 1, F.EVENT_UNREGISTER, dyn)
    assert call(d, 0, F.INTERRUPT_RELEASE, dyn) == 0


# -- describe --------------------------------------------------------------------------------------


def test_describe_is_json_friendly() -> None:
    d = make()
    register(d, 0, PRIVATE)
    register(d, 0, SHARED)
    run_handler(d, 0, PRIVATE)
    doc = json.loads(json.dumps(d.describe()))
    assert doc["vcpus"][0]["running"] == [PRIVATE]
    assert doc["shared"][str(SHARED)]["status"] == 3
    assert doc["vcpus"][1]["masked"] is True


def test_sve_hint_in_the_function_id_is_ignored() -> None:
    # SMCCC v1.3: a caller with SVE may set bit 16 ("SVE state not live"); it is still SDEI_VERSION.
    assert call(make(), 0, F.VERSION | (1 << 16)) > 0
