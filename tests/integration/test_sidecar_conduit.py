"""The whole sidecar (QMP attach, version pins, state directory, gdbstub conduit) serving the bare-metal guest.

``test_baremetal_guest.py`` drives a bare :class:`GdbstubConduit`; here the same guest runs behind
:class:`qmp_sdei.daemon.Sidecar` built from a config, which starts the gdbstub over QMP itself,
pins the versions, persists every state change, and follows QEMU's runstate. The guest's step
table is the verdict, so every SDEI/PSCI answer is checked through the daemon path:

* (a) a full guest run with an in-process sidecar that starts the ``-S`` VM itself;
* (b) a sidecar process SIGKILLed while the guest waits for a host event with events registered
  and unmasked; a new sidecar on the same state directory restores the registrations, and the
  guest carries on through every later step (handlers ask SDEI_EVENT_CONTEXT of the new sidecar);
* (c) a ``-S`` VM with ``conduit.start_vm = false`` stays stopped until its owner sends ``cont``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from integration.test_baremetal_guest import EXPECTED_X0, HOST_EVENTS, check_all_steps, parse_steps
from integration.test_baremetal_guest import raise_host_events as raise_awaited_events
from qmp_sdei.config import Config, parse
from qmp_sdei.daemon import ExitCode, Sidecar
from qmp_sdei.qemu.launch import QemuProcess
from qmp_sdei.sdei import Dispatcher
from qmp_sdei.statefile import StateStore
from support.guests import config_doc, elf_symbols, guest_vm
from support.qemu import harness_client
from support.sidecar import RunningSidecar, to_toml

pytestmark = [pytest.mark.qemu, pytest.mark.guest, pytest.mark.asyncio]

TIMEOUT = 60.0  # per wait: TCG on a busy 2-core host
REPO = Path(__file__).resolve().parents[2]
VERSION_LINE = "STEP version x0=0x0001000100000000"  # SDEI 1.1, vendor 0
PSCI_LINE = "STEP psci-version x0=0x0000000000010000"  # PSCI pinned to 1.0 (QEMU itself has 1.1)


async def raise_host_events(vm: QemuProcess, sidecar: Sidecar, tags: list[str]) -> None:
    assert sidecar.owner is not None
    await raise_awaited_events(vm, sidecar.owner.raise_event, tags)


def registrations(state_dir: Path, config: Config, vcpus: int = 2) -> dict[str, Any]:
    """What state.json says the guest has registered, decoded by a dispatcher like the sidecar's."""
    stored = StateStore(state_dir).load()
    assert stored is not None, f"no state.json in {state_dir}"
    dispatcher = Dispatcher(
        events=config.sdei.events,
        mpidrs=list(range(vcpus)),
        version=stored.pins.sdei,
        vendor=stored.pins.sdei_vendor,
        profile=config.sdei.profile,
        bind_slots=config.sdei.bind_slots,
    )
    dispatcher.restore(stored.snapshot)
    return dispatcher.describe()


def assert_guest_waiting_registrations(described: dict[str, Any]) -> None:
    """vCPU 0 at 'WAIT host-private': events 0, 1000, 1001 registered+enabled, PE unmasked; vCPU 1 too."""
    cpu0, cpu1 = described["vcpus"]
    assert not cpu0["masked"] and not cpu1["masked"]
    # status bits: registered (1) | enabled (2)
    assert {n: e["status"] for n, e in cpu0["events"].items()} == {"0": 3, "1000": 3, "1001": 3}, cpu0
    # vCPU 1's handler for the guest's signal-other may still be between recording its visit and
    # its COMPLETE (status 7 = running too): then the sidecar is killed with a handler running.
    cpu1_events = {n: e["status"] for n, e in cpu1["events"].items()}
    assert cpu1_events in ({"0": 3, "1000": 3}, {"0": 7, "1000": 3}), cpu1
    assert cpu1["running"] == ([0] if cpu1_events["0"] == 7 else []), cpu1
    assert cpu0["running"] == []


async def status_from(state_dir: Path, pid: int) -> dict[str, Any]:
    """status.json once the sidecar with ``pid`` has written it (it gives no other signal; poll)."""
    path = state_dir / "status.json"
    deadline = time.monotonic() + TIMEOUT
    while True:
        with contextlib.suppress(FileNotFoundError, ValueError):
            doc: dict[str, Any] = json.loads(path.read_text())
            if doc["sidecar"]["pid"] == pid and "sdei" in doc:
                return doc
        assert time.monotonic() < deadline, f"no status.json from pid {pid}"
        await asyncio.sleep(0.02)


# -- (a) -------------------------------------------------------------------------------------------


async def test_sidecar_serves_the_whole_guest(tmp_path: Path, guest_elf: Path, sidecars: list[RunningSidecar]) -> None:
    async with guest_vm(tmp_path, guest_elf) as vm:
        state_dir = tmp_path / "state"
        config = parse(config_doc(vm, state_dir, guest_elf, start_vm=True))
        running = RunningSidecar(config)
        sidecars.append(running)
        sidecar = await running.ready()
        # The sidecar started the -S VM itself once its breakpoint was armed.
        await vm.wait_for_console(rf"{VERSION_LINE}\r?\n", TIMEOUT)
        await vm.wait_for_console(rf"{PSCI_LINE}\r?\n", TIMEOUT)
        await raise_host_events(vm, sidecar, list(HOST_EVENTS))
        await vm.wait_for_console(r"DONE\r?\n", TIMEOUT)
        check_all_steps(vm.console, elf_symbols(guest_elf))

        # SYSTEM_OFF is passed through: QEMU exits and takes the sidecar with it, cleanly.
        assert await vm.wait(TIMEOUT) == 0
        assert await asyncio.wait_for(running.task, TIMEOUT) is ExitCode.OK
        stats = sidecar.conduit.stats
        assert stats.deliveries == 9  # 3 signals to self, 1 to vCPU 1, 5 host events
        assert stats.psci_answered == 1 and stats.psci_passthrough >= 4
        assert stats.sysreg_writes == 1
        state = json.loads((state_dir / "state.json").read_text())
        assert state["pins"] == {"sdei": "1.1", "sdei_vendor": 0, "psci": "1.0"}
        status = json.loads((state_dir / "status.json").read_text())
        assert status["counters"]["conduit_sdei_calls"] == stats.sdei_calls > 100
        assert status["pins"]["psci"] == "1.0"


# -- (b) -------------------------------------------------------------------------------------------


async def test_sigkilled_sidecar_restarts_with_the_guests_registrations(
    tmp_path: Path, guest_elf: Path, sidecars: list[RunningSidecar]
) -> None:
    async with guest_vm(tmp_path, guest_elf) as vm:
        state_dir = tmp_path / "state"
        doc = config_doc(vm, state_dir, guest_elf, start_vm=True)
        config_file = tmp_path / "vm.toml"
        config_file.write_text(to_toml(doc))
        config = parse(doc)
        log_path = tmp_path / "sidecar1.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "qmp_sdei", "run", "--config", str(config_file),
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO / "src")},
            )  # fmt: skip
        try:
            # The guest registered and unmasked everything, and now spins until the host raises 1000.
            await vm.wait_for_console(r"WAIT host-private 1000\r?\n", TIMEOUT)
            assert proc.returncode is None, log_path.read_text()
            assert_guest_waiting_registrations(registrations(state_dir, config))
            assert StateStore(state_dir).writer_alive()
        finally:
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), TIMEOUT)
        assert proc.returncode == -signal.SIGKILL
        assert not StateStore(state_dir).writer_alive()
        console_at_kill = vm.console
        assert "STEP host-private-handled" not in console_at_kill

        # A new sidecar on the same state directory (in-process, so the test can raise events).
        running = RunningSidecar(parse(config_doc(vm, state_dir, guest_elf, start_vm=False)))
        sidecars.append(running)
        sidecar = await running.ready()
        assert sidecar.dispatcher is not None
        assert_guest_waiting_registrations(sidecar.dispatcher.describe())
        assert sidecar.pins is not None and sidecar.pins.psci == (1, 0)
        status = await status_from(state_dir, os.getpid())
        assert_guest_waiting_registrations(status["sdei"])
        await running.conduit_attached()

        # The guest goes on: the rest of its host events, handled by the new sidecar.
        await raise_host_events(vm, sidecar, list(HOST_EVENTS))
        await vm.wait_for_console(r"DONE\r?\n", TIMEOUT)
        check_all_steps(vm.console, elf_symbols(guest_elf))
        assert await vm.wait(TIMEOUT) == 0
        assert await asyncio.wait_for(running.task, TIMEOUT) is ExitCode.OK
        assert sidecar.conduit.stats.deliveries == 7  # 5 host events + 2 self-signals after the restart


# -- (c) -------------------------------------------------------------------------------------------


async def test_prelaunch_vm_waits_for_its_owners_cont(
    tmp_path: Path, guest_elf: Path, sidecars: list[RunningSidecar]
) -> None:
    async with guest_vm(tmp_path, guest_elf) as vm, harness_client(vm) as harness:
        config = parse(config_doc(vm, tmp_path / "state", guest_elf, start_vm=False))
        running = RunningSidecar(config)
        sidecars.append(running)
        conduit = await running.conduit_attached()
        # Fully attached, breakpoint armed, serving: and the VM has not run.
        assert conduit.held
        status = await harness.execute("query-status")
        assert status["status"] == "prelaunch" and status["running"] is False, status
        assert vm.console == ""

        await harness.execute("cont")
        await vm.wait_for_console(rf"{VERSION_LINE}\r?\n", TIMEOUT)
        await vm.wait_for_console(rf"{PSCI_LINE}\r?\n", TIMEOUT)
        steps = parse_steps(vm.console)
        assert steps["version"]["x0"] == EXPECTED_X0["version"]
        assert running.sidecar.conduit.stats.sdei_calls >= 1
        assert await running.stop() is ExitCode.OK
