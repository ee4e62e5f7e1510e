"""Plain data the dispatcher is driven with: event specs, vCPU registers and behaviour profiles."""

from __future__ import annotations

from dataclasses import dataclass, field

from qmp_sdei.abi.smccc import U64_MASK

GPR_COUNT = 31  # x0..x30; sp is not part of the interface the dispatcher touches


@dataclass(frozen=True)
class EventSpec:
    """One event of the VM's fixed catalogue.

    :param number: the SDEI event number (bit 31 clear).
    :param shared: one instance per VM routed to a vCPU, instead of one instance per vCPU.
    :param critical: critical priority (may preempt a running normal handler).
    :param name: an optional label for logs and the orchestration API.
    """

    number: int
    shared: bool = False
    critical: bool = False
    name: str | None = None

    @property
    def signalable(self) -> bool:
        """Only event 0 can be raised by the guest with SDEI_EVENT_SIGNAL."""
        return self.number == 0


@dataclass
class VcpuRegs:
    """The part of a vCPU's register file the SDEI interface reads and writes.

    ``x`` holds x0..x30 as unsigned 64-bit ints. ``pc`` is where execution continues: before a
    ``hypercall`` it is the address the call returns to (the instruction after ``hvc``).
    """

    x: list[int] = field(default_factory=lambda: [0] * GPR_COUNT)
    pc: int = 0
    pstate: int = 0
    elr_el1: int = 0
    spsr_el1: int = 0

    def __post_init__(self) -> None:
        if len(self.x) != GPR_COUNT:
            raise ValueError(f"VcpuRegs.x must hold {GPR_COUNT} registers, got {len(self.x)}")

    def copy(self) -> VcpuRegs:
        return VcpuRegs(list(self.x), self.pc, self.pstate, self.elr_el1, self.spsr_el1)

    def set_result(self, value: int) -> None:
        """Write a call result to x0 as a u64 (negative error codes become two's complement)."""
        self.x[0] = value & U64_MASK


@dataclass(frozen=True)
class Profile:
    """Behaviour where real SDEI dispatchers disagree (``docs/sdei.md``, "Profiles").

    Each field is one documented divergence; the named profiles pin a whole set so a conformance
    test can say "behave like TF-A" or "behave like the KVM series" and mean something exact.
    """

    name: str
    #: GET_INFO(EV_SIGNALED): TF-A returns "not signaled" (event 0 -> 0); others the positive sense.
    signaled_info_inverted: bool
    #: EVENT_SIGNAL to a masked target, or where event 0 is disabled: refuse (TF-A) or queue it.
    signal_queues_when_not_ready: bool
    #: PE_MASK: TF-A answers 1 when it changed the mask, 0 when already masked; KVM always 0.
    pe_mask_reports_change: bool
    #: PRIVATE_RESET with a handler running: DENIED (TF-A) or 0 (KVM); the state is the same.
    private_reset_denied_while_running: bool
    #: EVENT_CONTEXT: check the register index before (TF-A) or after (KVM) "is a handler running".
    context_checks_index_first: bool
    #: Handler entry: leave x4..x17 as interrupted (TF-A) or zero them (KVM).
    zero_unused_entry_registers: bool
    #: FEATURES(RELATIVE_MODE) on an SDEI 1.0 dispatcher: INVALID_PARAMETERS (TF-A) or 0 (KVM).
    relative_mode_feature_on_1_0: bool
    #: EVENT_SIGNAL: x2 names the target PE (TF-A), or is ignored and the caller is the target (KVM).
    signal_targets_caller: bool
    #: INTERRUPT_BIND/RELEASE are served (TF-A) or answer NOT_SUPPORTED (KVM has no binding).
    interrupt_binding: bool
    #: REGISTER of a private event with RM_PE checks the affinity (TF-A) or only the flags (KVM).
    validates_private_affinity: bool
    #: SDEI_VERSION when the dispatcher is not given one: TF-A reports 1.0/0, KVM 1.1/"KVM".
    default_version: tuple[int, int]
    default_vendor: int


PROFILES: dict[str, Profile] = {
    "tf-a": Profile(
        name="tf-a",
        signaled_info_inverted=True,
        signal_queues_when_not_ready=False,
        pe_mask_reports_change=True,
        private_reset_denied_while_running=True,
        context_checks_index_first=True,
        zero_unused_entry_registers=False,
        relative_mode_feature_on_1_0=False,
        signal_targets_caller=False,
        interrupt_binding=True,
        validates_private_affinity=True,
        default_version=(1, 0),
        default_vendor=0,
    ),
    "kvm": Profile(
        name="kvm",
        signaled_info_inverted=False,
        signal_queues_when_not_ready=True,
        pe_mask_reports_change=False,
        private_reset_denied_while_running=False,
        context_checks_index_first=False,
        zero_unused_entry_registers=True,
        relative_mode_feature_on_1_0=True,
        signal_targets_caller=True,
        interrupt_binding=False,
        validates_private_affinity=False,
        default_version=(1, 1),
        default_vendor=0x4B564D,  # ASCII "KVM"
    ),
}
