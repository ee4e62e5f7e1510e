"""End to end: the bare-metal guest drives every SDEI call through the gdbstub conduit.

A real QEMU (2 vCPUs, TCG) boots ``tests/guests/baremetal``; the conduit traps its single ``hvc``
and serves it from a real :class:`Dispatcher`. The guest prints one ``STEP`` line per call; this
test raises host events when the guest says ``WAIT`` and then checks every line against what the
TF-A profile of an SDEI 1.1 dispatcher must answer.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from qmp_sdei.conduit.el2 import El2Stats
from qmp_sdei.conduit.gdbstub import GdbstubConduit
from qmp_sdei.owner import RaiseOutcome, RaiseResult, SdeiOwner
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.sdei import Dispatcher, EventSpec
from qmp_sdei.versions import VersionPins
from support.guests import GUEST_DIR, build_guest_el2, conduit_on_gdbstub, el2_conduit, el2_spec, elf_symbols

pytestmark = [pytest.mark.qemu, pytest.mark.guest, pytest.mark.asyncio]

TIMEOUT = 60.0  # per wait: TCG on a busy 2-core host, other QEMUs running beside us
PSCI_VERSION = 0x8400_0000
PINNED_PSCI_VERSION = 0x0001_0000  # the filter answers 1.0 so the test can tell it from QEMU's own


def u64(value: int) -> int:
    return value & 0xFFFF_FFFF_FFFF_FFFF


NOT_SUPPORTED, INVALID, DENIED, PENDING, OUT_OF_RESOURCE = (u64(v) for v in (-1, -2, -3, -5, -10))
DYN_PRIVATE, DYN_SHARED = 0x4000_0000, 0x4001_0000

#: step name -> expected x0 (for "STEP <name> x0=..." lines); TF-A profile, SDEI 1.1, slots (3, 3)
EXPECTED_X0: dict[str, int] = {
    "version": 0x0001_0001_0000_0000,
    "shared-reset": 0, "private-reset": 0,
    "features-0": 0x0003_0003, "features-1": 0, "features-2": INVALID,
    # GET_INFO type / signaled (TF-A's inverted "not signaled" sense) / priority
    "info-0-type": 0, "info-0-signaled": 0, "info-0-priority": 0,
    "info-1000-type": 0, "info-1000-signaled": 1, "info-1000-priority": 0,
    "info-1001-type": 0, "info-1001-signaled": 1, "info-1001-priority": 1,
    "info-2000-type": 1, "info-2000-signaled": 1, "info-2000-priority": 0,
    "info-2000-mode-unregistered": DENIED, "info-1000-mode": INVALID, "info-1000-bad": INVALID,
    # error paths
    "enable-unregistered": DENIED, "disable-unregistered": DENIED, "unregister-unregistered": DENIED,
    "register-unknown": INVALID, "register-entry-0": INVALID, "register-bad-flags": INVALID,
    "status-unknown": INVALID, "context-outside": DENIED, "context-18-outside": INVALID,
    "complete-outside": DENIED, "complete-resume-outside": DENIED,
    "signal-event-1": INVALID, "signal-unregistered": INVALID, "routing-set-private": INVALID,
    "release-static": INVALID, "unknown-fid": NOT_SUPPORTED, "smc32-version": NOT_SUPPORTED,
    # PSCI: one answered by the filter, the rest passed through to QEMU
    "psci-version": PINNED_PSCI_VERSION, "psci-features-cpu-on": 0, "psci-cpu-on": 0,
    "psci-affinity-info": 0,
    "cpu1-register-0": 0, "cpu1-enable-0": 0, "cpu1-register-1000": 0, "cpu1-enable-1000": 0,
    "cpu1-status-1000": 3, "cpu1-unmask": 0,
    # vCPU 0 registrations
    "register-0": 0, "enable-0": 0, "register-1000": 0, "register-1000-again": DENIED,
    "status-1000-registered": 1, "enable-1000": 0, "enable-1000-again": 0,
    "register-1001": 0, "enable-1001": 0, "status-1000": 3, "status-1001": 3, "pe-unmask": 0,
    "signal-self": 0, "signal-other": 0, "signal-bad-mpidr": INVALID,
    # shared event, routed to vCPU 1
    "register-2000": 0, "info-2000-mode-any": 0, "info-2000-aff-any": INVALID,
    "routing-set-2000": 0, "info-2000-mode-pe": 1, "info-2000-aff-pe": 1, "enable-2000": 0,
    "routing-set-2000-enabled": DENIED, "status-2000": 3,
    "car-signal": 0,
    "unreg-signal": 0, "unreg-status-after": 0, "unreg-again": DENIED,
    # masking
    "register-0-again": 0, "signal-disabled": INVALID, "enable-0-again": 0, "pe-mask": 1,
    "pe-mask-again": 0, "signal-masked": INVALID, "pe-unmask-again": 0,
    # interrupt binding: 3 private + 3 shared dynamic slots
    "bind-ppi-20": DYN_PRIVATE, "bind-ppi-20-again": DYN_PRIVATE, "bind-ppi-21": DYN_PRIVATE + 1,
    "bind-ppi-22": DYN_PRIVATE + 2, "bind-ppi-23": OUT_OF_RESOURCE, "bind-spi-40": DYN_SHARED,
    "bind-sgi-5": INVALID, "register-bound": 0, "release-registered": DENIED, "unregister-bound": 0,
    "release-ppi-20": 0, "release-ppi-20-again": INVALID, "register-unbound": DENIED,
    # cleanup
    "disable-1000": 0, "status-1000-disabled": 1, "unregister-1000": 0, "unregister-1001": 0,
    "unregister-2000": 0, "private-reset-end": 0, "shared-reset-end": 0, "status-0-end": 0,
}  # fmt: skip

# fmt: off
#: steps that report observations (several keys) rather than one call result
EXPECTED_FACTS: dict[str, dict[str, int]] = {
    "boot": {"el": 1, "daif": 0x3C0},
    "cpu1-up": {"context": 0x77, "el": 1},
    "signal-self-handled": {"count": 1, "ev": 0, "arg": 0xA0, "daif": 0x3C0, "spsel": 1, "el": 1},
    "signal-self-context": {"delivered": 1, "pc_is_after_hvc": 1},
    "signal-other-handled": {"count": 1, "ev": 0, "arg": 0xB0, "daif": 0x3C0, "spsel": 1, "el": 1},
    "host-private-handled": {"count": 2, "ev": 1000, "arg": 0xA1, "daif": 0x3C0, "spsel": 1},
    "host-private-context": {
        "pc_in_spin": 1,
        "ctx0": 0x5EED_0000, "ctx1": 0x5EED_0001, "ctx2": 0x5EED_0002, "ctx3": 0x5EED_0003,
        "ctx17": 0x5EED_0011, "ctx18": INVALID,
    },
    "host-private-cpu1-handled": {"count": 2, "ev": 1000, "arg": 0xB1, "daif": 0x3C0},
    "host-shared-handled": {"count": 3, "ev": 2000, "arg": 0xA3, "daif": 0x3C0},
    "nested-normal-enter": {"ev": 1000},
    "nested-critical-handled": {"count": 1, "ev": 1001, "arg": 0xA2, "daif": 0x3C0, "spsel": 1},
    "nested-done": {
        "normal": 1, "critical": 1, "critical_saw_status_1000": 7, "critical_saw_status_1001": 7,
        "critical_pc_outside_spin": 1, "critical_interrupted_daif": 0x3C0,
    },
    "car-resumed": {
        "resumed": 1, "elr_is_interrupted_pc": 1, "elr_is_after_hvc": 1, "spsr_is_interrupted_pstate": 1,
    },
    "unreg-inside": {"unregister": PENDING, "status": 4},
}
# fmt: on

#: host events the guest waits for: WAIT tag -> (event, vCPU or None for a routed shared event)
HOST_EVENTS: dict[str, tuple[int, int | None]] = {
    "host-private": (1000, 0),
    "host-private-cpu1": (1000, 1),
    "host-shared": (2000, None),
    "host-nested": (1000, 0),
    "host-critical": (1001, 0),
}

STEP_RE = re.compile(r"^STEP (\S+)((?: \w+=0x[0-9a-f]+)*)\r?$", re.M)


@dataclass
class Booted:
    vm: QemuProcess
    conduit: GdbstubConduit
    owner: SdeiOwner
    run: asyncio.Task[None]
    symbols: dict[str, int]


#: The real pinning policy, pinned to PSCI 1.0 so the test can tell its answers from QEMU's 1.1.
PINS = VersionPins((1, 1), 0, (1, 0))


@pytest_asyncio.fixture(params=["symbols", "el2-mailbox"])
async def booted(request: pytest.FixtureRequest, tmp_path: Path, guest_elf: Path) -> AsyncIterator[Booted]:
    """The guest served by the symbol conduit (its one hvc), or booted through the EL2 stub and
    served mostly through the stub's mailbox in shared guest RAM, without VM stops."""
    el2 = request.param == "el2-mailbox"
    image: Path | None = None
    if el2:
        guest_elf, image = build_guest_el2(GUEST_DIR, tmp_path / "guest")
    symbols = elf_symbols(guest_elf)
    dispatcher = Dispatcher(
        events=[EventSpec(1000), EventSpec(1001, critical=True), EventSpec(2000, shared=True)],
        mpidrs=[0x0, 0x1],
        version=(1, 1),
        profile="tf-a",
        bind_slots=(3, 3),
    )
    owner = SdeiOwner(dispatcher, pins=PINS)
    spec = el2_spec(image, smp=2) if image is not None else QemuSpec(smp=2, kernel=guest_elf)
    build = el2_conduit(owner, TIMEOUT) if el2 else None
    sites = [] if el2 else [symbols["sdei_hvc_insn"]]
    async with conduit_on_gdbstub(spec, tmp_path, owner, sites, TIMEOUT, build=build) as (vm, conduit, run):
        yield Booted(vm, conduit, owner, run, symbols)


def parse_steps(console: str) -> dict[str, dict[str, int]]:
    steps: dict[str, dict[str, int]] = {}
    for m in STEP_RE.finditer(console):
        name = m.group(1)
        assert name not in steps, f"step {name} printed twice"
        steps[name] = {k: int(v, 16) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+)", m.group(2))}
    return steps


def check_all_steps(console: str, symbols: dict[str, int]) -> dict[str, dict[str, int]]:
    """Compare every STEP line the guest printed with the expected values; return the steps."""
    assert "FATAL" not in console, console
    steps = parse_steps(console)
    assert steps["boot"]["hvc"] == symbols["sdei_hvc_insn"]
    mismatches = {
        name: (hex(steps[name]["x0"]) if name in steps else "missing", hex(want))
        for name, want in EXPECTED_X0.items()
        if name not in steps or steps[name].get("x0") != want
    }
    for name, facts in EXPECTED_FACTS.items():
        got = steps.get(name, {})
        for key, want in facts.items():
            if got.get(key) != want:
                mismatches[f"{name}.{key}"] = (hex(got[key]) if key in got else "missing", hex(want))
    assert not mismatches, f"steps that differ (got, want): {mismatches}\n\n{console}"
    return steps


async def raise_host_events(
    vm: QemuProcess, raise_event: Callable[[int, int | None], Awaitable[RaiseOutcome]], tags: Iterable[str]
) -> None:
    """Raise each host event when the guest announces it is waiting for it."""
    for tag in tags:
        event, vcpu = HOST_EVENTS[tag]
        await vm.wait_for_console(rf"WAIT {tag} {event}\r?\n", TIMEOUT)
        result = await raise_event(event, vcpu)
        # The guest announces a wait as soon as its previous handler has recorded its visit, which
        # may be just before that handler's COMPLETE traps: then the event is pending and is
        # delivered right after the COMPLETE. The guest's step lines check that it arrived.
        assert result.result is RaiseResult.DELIVERED or (
            result.result is RaiseResult.PENDING and result.code == "busy"
        ), (tag, result)


async def test_guest_drives_every_sdei_call(booted: Booted) -> None:
    vm, conduit = booted.vm, booted.conduit
    try:
        await raise_host_events(vm, booted.owner.raise_event, HOST_EVENTS)
        await vm.wait_for_console(r"DONE\r?\n", TIMEOUT)
    except TimeoutError:
        print("---- console tail ----\n" + "\n".join(vm.console.splitlines()[-15:]))
        print(f"---- conduit ----\n{conduit.stats}")
        raise
    console = vm.console
    steps = check_all_steps(console, booted.symbols)
    unexpected = set(steps) - set(EXPECTED_X0) - set(EXPECTED_FACTS)
    assert not unexpected, f"steps this test does not check: {sorted(unexpected)}"

    # Interrupted pstates are EL1h; the spin loop runs with DAIF clear, the main flow masked.
    assert steps["signal-self-context"]["pstate"] & 0x3CF == 0x3C5
    assert steps["host-private-context"]["pstate"] & 0x3CF == 0x005
    assert steps["car-resumed"]["elr"] == booted.symbols["sdei_hvc_insn"] + 4

    # The guest powers off with PSCI SYSTEM_OFF (passed through): QEMU exits, the loop ends.
    assert await vm.wait(TIMEOUT) == 0
    await asyncio.wait_for(booted.run, TIMEOUT)

    stats = conduit.stats
    assert stats.deliveries == 9  # 3 signals to self, 1 to vCPU 1, 5 host events
    assert stats.psci_answered == 1 and stats.psci_passthrough >= 4
    assert stats.sdei_calls > 100
    if isinstance(stats, El2Stats):
        # COMPLETE_AND_RESUME goes through the stub's resume request, and most calls through the
        # mailbox (each vCPU's first call, and any after a quiet spell, stop the VM to start it).
        assert stats.sysreg_writes == 0
        assert stats.mailbox_calls > stats.sdei_calls // 2, stats
    else:
        assert stats.sysreg_writes == 1  # the one COMPLETE_AND_RESUME
