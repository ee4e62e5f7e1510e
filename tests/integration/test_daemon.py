"""The sidecar daemon against real QEMU (TCG, ``-M virt``): attach, pin, follow, persist, exit.

In-process tests drive :class:`Sidecar` directly and play "the host" on QEMU's harness monitor;
subprocess tests run ``python -m qmp_sdei`` to check exit codes, signals and one-line errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qmp_sdei.config import parse
from qmp_sdei.daemon import ExitCode, Sidecar
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.sdei import Dispatcher
from qmp_sdei.statefile import StateStore
from support.guests import build_guest_dir
from support.qemu import SLOW, fake_peer, harness_client, requires_qemu, running_qemu, send_junk
from support.sdei import ENTRY, F, call
from support.sidecar import assert_one_line_error as _assert_one_line_error
from support.sidecar import config_for, serving
from support.sidecar import read_until as _read_until
from support.sidecar import run_cli as _run_cli
from support.sidecar import start_cli as _start_cli
from support.sidecar import write_config as _write_config

pytestmark = [pytest.mark.qemu, requires_qemu]

UUID = "6b3f4d2e-0c1a-4f5e-9d8c-7a6b5c4d3e2f"
RESET_ACTION = ("-action", "reboot=reset")  # QemuSpec passes -no-reboot; a reset must stay a reset


def state_doc(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "state" / "state.json").read_text())


def status_doc(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "state" / "status.json").read_text())


# -- attach, topology, exit -----------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("smp", [1, 2, 8])
async def test_topology_and_mpidrs(tmp_path: Path, smp: int) -> None:
    async with running_qemu(tmp_path, QemuSpec(smp=smp)) as vm, serving(parse(config_for(tmp_path, vm))) as (s, _):
        assert s.dispatcher is not None
        assert s.dispatcher.mpidrs == tuple(range(smp))  # virt: Aff0 = index up to 8 per cluster
        status = status_doc(tmp_path)
        assert [v["mpidr"] for v in status["vm"]["vcpus"]] == list(range(smp))
        assert all(v["masked"] for v in status["sdei"]["vcpus"])


@pytest.mark.asyncio
async def test_exits_zero_when_qemu_quits(tmp_path: Path) -> None:
    async with (
        running_qemu(tmp_path) as vm,
        serving(parse(config_for(tmp_path, vm))) as (sidecar, task),
        harness_client(vm) as host,
    ):
        await host.execute("quit")
        assert await asyncio.wait_for(task, SLOW) == ExitCode.OK
        assert sidecar.shutdown_reason == "QEMU exited"


@pytest.mark.asyncio
async def test_exits_zero_when_qemu_is_killed(tmp_path: Path) -> None:
    async with running_qemu(tmp_path) as vm, serving(parse(config_for(tmp_path, vm))) as (_, task):
        vm.kill(signal.SIGKILL)
        assert await asyncio.wait_for(task, SLOW) == ExitCode.OK


@pytest.mark.asyncio
async def test_sidecar_started_before_qemu(tmp_path: Path) -> None:
    vm = QemuProcess(QemuSpec(), tmp_path / "vm")
    sidecar = Sidecar(parse(config_for(tmp_path, vm.sidecar_socket)))
    task = asyncio.create_task(sidecar.run())
    done, _ = await asyncio.wait({task}, timeout=1.0)
    assert not done, "the sidecar gave up instead of waiting for QEMU"
    try:
        await vm.start()
        await asyncio.wait_for(sidecar.ready.wait(), SLOW)
        assert sidecar.facts is not None
        assert len(sidecar.facts.vcpus) == 1
    finally:
        await vm.stop()
    assert await asyncio.wait_for(task, SLOW) == ExitCode.OK


@pytest.mark.asyncio
async def test_listen_mode(tmp_path: Path) -> None:
    socket = tmp_path / "listen.sock"
    sidecar = Sidecar(parse(config_for(tmp_path, socket, qmp={"mode": "listen"})))
    task = asyncio.create_task(sidecar.run())
    spec = QemuSpec(sidecar_listens=True, extra_args=("-chardev", f"socket,id=s2,path={socket},reconnect=1",
                                                      "-mon", "chardev=s2,mode=control"))  # fmt: skip
    async with running_qemu(tmp_path, spec):
        await asyncio.wait_for(sidecar.ready.wait(), SLOW)
    assert await asyncio.wait_for(task, SLOW) == ExitCode.OK


@pytest.mark.asyncio
async def test_a_signal_before_the_loop_handles_it_logs_nothing_then_shuts_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The early (plain) signal handler may interrupt a log line on stderr, where a second write
    raises and used to lose the signal: it records the shutdown silently, and run() says it."""
    sidecar = Sidecar(parse(config_for(tmp_path, tmp_path / "listen.sock", qmp={"mode": "listen"})))
    with caplog.at_level(logging.DEBUG):
        sidecar.request_shutdown_from_signal("SIGTERM")
        assert caplog.records == []
        assert sidecar.shutdown.is_set() and sidecar.shutdown_reason == "SIGTERM"
        assert await asyncio.wait_for(sidecar.run(), SLOW) == ExitCode.OK
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shutting down")]
    assert said == ["shutting down: SIGTERM"]


# -- versions and resets ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pins_survive_reset_and_a_changed_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = QemuSpec(uuid=UUID, extra_args=RESET_ACTION)
    async with running_qemu(tmp_path, spec) as vm:
        first = parse(config_for(tmp_path, vm, sdei={"version": "1.0"}, psci={"version": "1.0"}))
        async with serving(first) as (sidecar, _), harness_client(vm) as host:
            assert sidecar.dispatcher is not None
            call(sidecar.dispatcher, 0, F.EVENT_REGISTER, 1000, ENTRY, 1, 0, 0)
            sidecar.owner.save_now()
            await host.execute("system_reset")
            await sidecar.wait_until(lambda: sidecar.owner.counters.resets == 1, SLOW)
            assert call(sidecar.dispatcher, 0, F.EVENT_STATUS, 1000) == 0  # SDEI state reset...
            assert call(sidecar.dispatcher, 0, F.VERSION) >> 32 == 0x1_0000  # ...SDEI 1.0 kept
            assert state_doc(tmp_path)["pins"] == {"sdei": "1.0", "sdei_vendor": 0, "psci": "1.0"}

        caplog.set_level(logging.WARNING)
        later = parse(config_for(tmp_path, vm, sdei={"version": "1.1"}, psci={"version": "1.1"}))
        async with serving(later) as (sidecar, _):
            assert sidecar.pins is not None
            assert (sidecar.pins.sdei, sidecar.pins.psci) == ((1, 0), (1, 0))
            assert sidecar.owner.psci_call(0, 0x8400_0000, 0, 0, 0) == 0x10000  # PSCI_VERSION answers 1.0
    assert sum("keeping what it saw" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.asyncio
async def test_guest_reset_resets_sdei_state(tmp_path: Path) -> None:
    guest = _reset_guest(tmp_path)
    spec = QemuSpec(kernel=guest, extra_args=RESET_ACTION)  # paused until the sidecar serves
    async with running_qemu(tmp_path, spec) as vm, serving(parse(config_for(tmp_path, vm))) as (sidecar, _):
        assert sidecar.dispatcher is not None
        call(sidecar.owner, 0, F.EVENT_REGISTER, 1000, ENTRY, 7, 0, 0)  # type: ignore[arg-type]
        async with harness_client(vm) as host:
            await host.execute("cont")
            await sidecar.wait_until(lambda: sidecar.owner.counters.guest_resets >= 1, SLOW)
        assert call(sidecar.dispatcher, 0, F.EVENT_STATUS, 1000) == 0
        assert status_doc(tmp_path)["counters"]["guest_resets"] >= 1


def _reset_guest(tmp_path: Path) -> Path:
    """A guest that performs one PSCI SYSTEM_RESET (counted in RAM that survives the reset)."""
    source = tmp_path / "reset.S"
    source.write_text(
        """
        .global _start
        _start:
            ldr x1, =0x40200000
            ldr x2, [x1]
            add x2, x2, #1
            str x2, [x1]
            cmp x2, #1
            b.ne 1f
            movz x0, #0x0009
            movk x0, #0x8400, lsl #16
            hvc #0
        1:  wfi
            b 1b
        """
    )
    elf = tmp_path / "reset.elf"
    subprocess.run(
        ["aarch64-linux-gnu-gcc", "-nostdlib", "-static", "-Wl,-Ttext=0x40080000", "-o", str(elf), str(source)],
        check=True,
    )
    return elf


# -- state directory --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_restart_picks_up_state_of_a_running_vm(tmp_path: Path) -> None:
    spec = QemuSpec(smp=2, uuid=UUID, paused=False)
    async with running_qemu(tmp_path, spec) as vm:
        async with serving(parse(config_for(tmp_path, vm))) as (sidecar, _):
            assert call(sidecar.owner, 1, F.EVENT_REGISTER, 1000, ENTRY, 7, 0, 0) == 0  # type: ignore[arg-type]
            assert call(sidecar.owner, 1, F.PE_UNMASK) == 0  # type: ignore[arg-type]
            sidecar.owner.commit()  # what the conduit does before letting the guest go
        async with serving(parse(config_for(tmp_path, vm))) as (again, _):
            assert again.dispatcher is not None
            assert call(again.dispatcher, 1, F.EVENT_STATUS, 1000) == 1
            assert not again.dispatcher.vcpus[1].masked


@pytest.mark.asyncio
async def test_fresh_qemu_keeps_pins_but_not_sdei_state(tmp_path: Path) -> None:
    for attempt in range(2):
        async with running_qemu(tmp_path / str(attempt), QemuSpec(uuid=UUID)) as vm:
            version = "1.0" if attempt == 0 else "latest"
            async with serving(parse(config_for(tmp_path, vm, sdei={"version": version}))) as (sidecar, _):
                assert sidecar.pins is not None and sidecar.pins.sdei == (1, 0)
                assert sidecar.dispatcher is not None
                assert call(sidecar.dispatcher, 0, F.EVENT_STATUS, 1000) == 0  # prelaunch: nothing restored
                call(sidecar.owner, 0, F.EVENT_REGISTER, 1000, ENTRY, 7, 0, 0)  # type: ignore[arg-type]
                sidecar.owner.commit()


@pytest.mark.asyncio
async def test_state_from_another_vm_is_refused(tmp_path: Path) -> None:
    async with running_qemu(tmp_path / "a", QemuSpec(uuid=UUID)) as vm, serving(parse(config_for(tmp_path, vm))):
        pass
    other = QemuSpec(uuid="00000000-1111-2222-3333-444444444444")
    async with running_qemu(tmp_path / "b", other) as vm:
        before = (tmp_path / "state" / "state.json").read_bytes()
        code = await Sidecar(parse(config_for(tmp_path, vm))).run()
        assert code == ExitCode.STATE
        assert (tmp_path / "state" / "state.json").read_bytes() == before


@pytest.mark.asyncio
async def test_damaged_state_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text('{"format": 1, "vm": {}, "pins": "x"}')
    async with running_qemu(tmp_path) as vm:
        assert await Sidecar(parse(config_for(tmp_path, vm))).run() == ExitCode.STATE


@pytest.mark.asyncio
async def test_pinned_psci_this_qemu_cannot_honour_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_qemu(tmp_path, QemuSpec(uuid=UUID)) as vm:
        async with serving(parse(config_for(tmp_path, vm, psci={"version": "1.1"}))):
            pass
        # The same VM meets a QEMU that implements only PSCI 1.0 (the version table is the only
        # thing that differs between QEMU releases here).
        monkeypatch.setattr("qmp_sdei.daemon.qemu_psci_version", lambda facts: (1, 0))
        assert await Sidecar(parse(config_for(tmp_path, vm))).run() == ExitCode.STATE
    assert any("cannot honour" in r.getMessage() for r in caplog.records)


# -- the program: exit codes, signals, logs ---------------------------------------------------------


@pytest.mark.asyncio
async def test_sigterm_is_graceful_and_sighup_reloads(tmp_path: Path) -> None:
    async with running_qemu(tmp_path) as vm:
        doc = config_for(tmp_path, vm)
        path = _write_config(tmp_path, doc)
        proc = await _start_cli("run", "--config", str(path), "--log-format", "json")
        assert proc.stderr is not None
        seen: list[str] = []
        await _read_until(proc.stderr, "attached to QEMU", seen)
        assert json.loads(seen[-1])["level"] == "info"  # JSON logs

        doc["log"] = {"level": "debug", "format": "text"}
        doc["sdei"]["events"].append({"number": 3000})
        _write_config(tmp_path, doc)
        proc.send_signal(signal.SIGHUP)
        await _read_until(proc.stderr, "[sdei] cannot change while the VM runs", seen)
        await _read_until(proc.stderr, "logging is now debug/text", seen)

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), SLOW) == ExitCode.OK
        assert "Traceback" not in "".join(seen) + (await proc.stderr.read()).decode()


@pytest.mark.asyncio
async def test_sigkilled_sidecar_restarts_with_state(tmp_path: Path) -> None:
    async with running_qemu(tmp_path, QemuSpec(uuid=UUID, paused=False)) as vm:
        path = _write_config(tmp_path, config_for(tmp_path, vm, sdei={"version": "1.0"}))
        proc = await _start_cli("run", "--config", str(path))
        assert proc.stderr is not None
        await _read_until(proc.stderr, "attached to QEMU", [])
        proc.kill()
        await proc.wait()
        # The lock died with the process; a new sidecar takes over with the pinned versions.
        path = _write_config(tmp_path, config_for(tmp_path, vm, sdei={"version": "1.1"}))
        proc = await _start_cli("run", "--config", str(path))
        assert proc.stderr is not None
        seen: list[str] = []
        await _read_until(proc.stderr, "attached to QEMU", seen)
        assert any("keeping what it saw" in line for line in seen)
        assert any("resumed SDEI state" in line for line in seen)
        status = await _start_cli("status", "--state-dir", str(tmp_path / "state"), "--json")
        out, _ = await status.communicate()
        doc = json.loads(out)
        assert doc["alive"] is True
        assert doc["pins"]["sdei"] == "1.0"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), SLOW) == 0


@pytest.mark.asyncio
async def test_second_sidecar_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    async with running_qemu(tmp_path) as vm, serving(parse(config_for(tmp_path, vm))):
        assert await Sidecar(parse(config_for(tmp_path, vm))).run() == ExitCode.STATE


def test_unreachable_socket(tmp_path: Path) -> None:
    doc = config_for(tmp_path, tmp_path / "nothing.sock", qmp={"timeout": 0.5})
    result = _run_cli("run", "--config", str(_write_config(tmp_path, doc)))
    _assert_one_line_error(result, ExitCode.QEMU, "nothing.sock")


@pytest.mark.asyncio
async def test_peer_that_is_not_qemu(tmp_path: Path) -> None:
    async with fake_peer(tmp_path / "junk.sock", send_junk) as path:
        doc = config_for(tmp_path, path, qmp={"timeout": 5})
        proc = await asyncio.to_thread(_run_cli, "run", "--config", str(_write_config(tmp_path, doc)))
    _assert_one_line_error(proc, ExitCode.QEMU, "junk.sock")


@pytest.mark.asyncio
async def test_machine_without_psci_is_refused(tmp_path: Path) -> None:
    async with running_qemu(tmp_path, QemuSpec(machine_options={"secure": "on"})) as vm:
        doc = config_for(tmp_path, vm)
        result = await asyncio.to_thread(_run_cli, "run", "--config", str(_write_config(tmp_path, doc)))
    _assert_one_line_error(result, ExitCode.QEMU, "PSCI")


def test_invalid_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[qmp]\nsocket = "/x"\n[sdei]\nevents = [{number = -4}]\n')
    _assert_one_line_error(_run_cli("run", "--config", str(path)), ExitCode.CONFIG, "sdei.events[0].number")
    _assert_one_line_error(_run_cli("check-config", str(path)), ExitCode.CONFIG, "sdei.events[0].number")


def test_status_without_a_sidecar(tmp_path: Path) -> None:
    _assert_one_line_error(_run_cli("status", "--state-dir", str(tmp_path)), ExitCode.NO_STATUS, "no sidecar status")


@pytest.mark.asyncio
async def test_status_text(tmp_path: Path) -> None:
    async with (
        running_qemu(tmp_path, QemuSpec(smp=2, name="vm-status")) as vm,
        serving(parse(config_for(tmp_path, vm))) as (sidecar, _),
    ):
        call(sidecar.owner, 0, F.EVENT_REGISTER, 1000, ENTRY, 7, 0, 0)  # type: ignore[arg-type]
        sidecar.write_status()
        result = await asyncio.to_thread(_run_cli, "status", "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 0, result.stderr
    assert "sidecar   running" in result.stdout
    assert "vm        vm-status" in result.stdout
    assert "1000:registered" in result.stdout
    assert os.linesep.join(result.stdout.splitlines()).count("vcpu ") == 2


@pytest.mark.asyncio
async def test_qemu_that_is_not_aarch64_is_refused(tmp_path: Path) -> None:
    """qemu-system-arm (32-bit Arm target, same Debian package) speaks QMP but is not our machine."""
    socket = tmp_path / "arm.sock"
    qemu = await asyncio.create_subprocess_exec(
        "qemu-system-arm", "-M", "virt", "-S", "-display", "none", "-nodefaults",
        "-qmp", f"unix:{socket},server=on,wait=off",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        doc = config_for(tmp_path, socket, qmp={"timeout": SLOW})
        result = await asyncio.to_thread(_run_cli, "run", "--config", str(_write_config(tmp_path, doc)))
    finally:
        qemu.kill()
        await qemu.wait()
    _assert_one_line_error(result, ExitCode.QEMU, "not aarch64")


@pytest.mark.asyncio
async def test_guest_changes_are_durable_at_commit_not_before(tmp_path: Path) -> None:
    """One state write per conduit stop: nothing before the commit, everything after it."""
    async with running_qemu(tmp_path) as vm, serving(parse(config_for(tmp_path, vm))) as (sidecar, _):
        writes = sidecar.owner.counters.state_writes
        assert call(sidecar.owner, 0, F.EVENT_REGISTER, 1000, ENTRY, 7, 0, 0) == 0  # type: ignore[arg-type]
        assert call(sidecar.owner, 0, F.EVENT_ENABLE, 1000) == 0  # type: ignore[arg-type]
        assert call(sidecar.owner, 0, F.EVENT_STATUS, 1000) == 3  # type: ignore[arg-type]
        assert sidecar.owner.counters.state_writes == writes
        sidecar.owner.commit()
        sidecar.owner.commit()  # nothing new: no second write
        assert sidecar.owner.counters.state_writes == writes + 1
        stored = StateStore(tmp_path / "state").load()
        assert stored is not None
        target = make_like(sidecar)
        target.restore(stored.snapshot)
        assert call(target, 0, F.EVENT_STATUS, 1000) == 3


def make_like(sidecar: Sidecar) -> Dispatcher:
    d = sidecar.dispatcher
    assert d is not None
    return Dispatcher(
        events=d.catalogue, mpidrs=d.mpidrs, version=d.version, profile=d.profile, bind_slots=d.bind_slots
    )


@pytest.mark.guest
@pytest.mark.asyncio
async def test_qemu_killed_while_the_conduit_traps_calls(tmp_path: Path) -> None:
    """QEMU dying mid-trap is "QEMU exited" (exit 0), not a conduit failure."""
    guest = build_guest_dir(Path(__file__).parents[1] / "guests" / "loop", tmp_path / "guest", ("start.S", "loop.c"))
    async with running_qemu(tmp_path, QemuSpec(kernel=guest)) as vm:
        doc = config_for(tmp_path, vm, conduit={"enabled": True, "elf": str(guest), "start_vm": True})
        async with serving(parse(doc)) as (sidecar, task):
            await vm.wait_for_console(r"ROUND 1 ", SLOW)  # hundreds of trapped calls in
            vm.kill(signal.SIGKILL)
            assert await asyncio.wait_for(task, SLOW) == ExitCode.OK
            assert sidecar.shutdown_reason == "QEMU exited"
            assert sidecar.conduit.stats.sdei_calls >= 200
