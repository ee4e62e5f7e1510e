"""Faults an operator runs into, against sidecar processes (and real QEMU where the case needs one).

* Shutdown wins over every wait: SIGTERM while the sidecar waits for QEMU ends it at once, and a
  SIGHUP meanwhile with an unreadable config is refused in one log line.
* A sidecar that leaves leaves the VM in the runstate its owner wants: running if it ran or
  ``start_vm`` started it (the guest then runs on with no breakpoint left), stopped if its owner
  holds it; and when it cannot detach, it says so in an error naming the runstate.
* Nothing promised is lost on the way out: an event that was deliverable when shutdown began is
  entered (and completed) before the detach; later host events are refused; a guest call trapped
  at the very last stop is left for QEMU to answer rather than answered with a promise.
* ``status`` piped into a reader that stops early ends quietly.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from integration.test_sidecar_conduit import config_doc, guest_vm, registrations
from qmp_sdei.config import parse
from qmp_sdei.daemon import ExitCode, Sidecar
from qmp_sdei.owner import RaiseResult, SdeiOwner
from qmp_sdei.qemu.launch import QemuProcess, QemuSpec
from qmp_sdei.sdei import Dispatcher, EventSpec
from support.guests import build_guest_dir, cached_build_dir
from support.qemu import SLOW, harness_client, requires_qemu, running_qemu
from support.sidecar import config_for, read_until, serving, start_cli, write_config

LOOP_GUEST = Path(__file__).resolve().parents[1] / "guests" / "loop"


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


async def wait_for_path(path: Path) -> None:
    async def poll() -> None:
        while not path.exists():  # noqa: ASYNC110 (a file the sidecar creates; no event to wait on)
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), SLOW)


# -- shutdown wins over the wait for QEMU ----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["connect", "listen"])
async def test_sigterm_while_waiting_for_qemu(tmp_path: Path, mode: str) -> None:
    """An hour's qmp.timeout and no QEMU: SIGTERM still ends the sidecar at once, with exit 0."""
    doc = config_for(tmp_path, tmp_path / "qemu.sock", qmp={"timeout": 3600.0, "mode": mode})
    path = write_config(tmp_path, doc)
    proc = await start_cli("run", "--config", str(path), "--log-level", "debug")
    assert proc.stderr is not None
    seen: list[str] = []
    if mode == "connect":
        await read_until(proc.stderr, "retrying for up to", seen)  # logged once it is waiting
    else:
        await wait_for_path(tmp_path / "qemu.sock")  # it listens (nothing is logged)

    # SIGHUP meanwhile, with the config replaced by bytes that are not UTF-8: one line, no traceback.
    path.write_bytes(b'[vm]\nname = "\xff"\n')
    proc.send_signal(signal.SIGHUP)
    await read_until(proc.stderr, "SIGHUP: config not reloaded", seen)
    assert "not UTF-8 text (byte 0xff at offset 13)" in seen[-1]

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), SLOW) == ExitCode.OK
    rest = (await proc.stderr.read()).decode()
    no_traceback("".join(seen), rest)
    assert "shutting down: SIGTERM" in "".join(seen) + rest


# -- leaving the VM as its owner wants it ---------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_guest_dir(LOOP_GUEST, cached_build_dir(request, tmp_path_factory, "loop-guest"), ("start.S", "loop.c"))


def conduit_config(tmp_path: Path, vm: QemuProcess, guest: Path, *, start_vm: bool) -> dict[str, Any]:
    return config_for(tmp_path, vm, conduit={"enabled": True, "elf": str(guest), "start_vm": start_vm})


async def runstate(vm: QemuProcess) -> str:
    async with harness_client(vm) as host:
        reply = await host.execute("query-status")
    assert isinstance(reply, dict)
    status: str = reply["status"]
    return status


async def sigterm_sidecar_at(tmp_path: Path, vm: QemuProcess, guest: Path, marker: str, *, start_vm: bool) -> str:
    """Run the sidecar CLI (debug log) on ``vm``, SIGTERM it as soon as its log shows ``marker``,
    check it exits OK with no traceback, and return its whole log."""
    path = write_config(tmp_path, conduit_config(tmp_path, vm, guest, start_vm=start_vm))
    proc = await start_cli("run", "--config", str(path), "--log-level", "debug")
    assert proc.stderr is not None
    seen: list[str] = []
    await read_until(proc.stderr, marker, seen)
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), SLOW)
    log = "".join(seen) + (await proc.stderr.read()).decode()
    assert code == ExitCode.OK, log
    no_traceback(log)
    return log


#: Log lines at which SIGTERM is sent: during attach, before the conduit, and (twice, it was the
#: racy one) the moment the conduit has attached and is starting the VM.
SIGTERM_POINTS = ["QMP attached", "attached to QEMU", "conduit attached", "conduit attached"]


@pytest.mark.qemu
@pytest.mark.guest
@requires_qemu
@pytest.mark.asyncio
@pytest.mark.parametrize("point", range(len(SIGTERM_POINTS)), ids=lambda i: SIGTERM_POINTS[i].replace(" ", "-"))
async def test_sigterm_during_boot_leaves_the_vm_running(tmp_path: Path, loop_guest: Path, point: int) -> None:
    """-S VM, start_vm = true: whenever SIGTERM comes, the VM ends up running, free of breakpoints."""
    async with running_qemu(tmp_path, QemuSpec(kernel=loop_guest)) as vm:
        log = await sigterm_sidecar_at(tmp_path, vm, loop_guest, SIGTERM_POINTS[point], start_vm=True)
        assert "could not" not in log, log
        assert await runstate(vm) == "running", log
        # Its calls now reach QEMU (which answers NOT_SUPPORTED) and nothing stops it: it finishes
        # its rounds. A breakpoint left behind would have frozen it in "debug" at the first call.
        await vm.wait_for_console(r"ROUND 9 ", SLOW)
        assert await runstate(vm) == "running"


@pytest.mark.qemu
@pytest.mark.guest
@requires_qemu
@pytest.mark.asyncio
async def test_sigterm_before_reaching_qemu_says_the_vm_was_not_started(tmp_path: Path, loop_guest: Path) -> None:
    """SIGTERM the moment ``run`` starts (before the event loop's own handlers): exit 0, and a
    start_vm VM left stopped is reported (the sidecar used to die of the signal, silently)."""
    async with running_qemu(tmp_path, QemuSpec(kernel=loop_guest)) as vm:
        log = await sigterm_sidecar_at(tmp_path, vm, loop_guest, "run: ", start_vm=True)
        # Usually the signal beats the attach; if the sidecar got further, it must have started the VM.
        left_stopped = "conduit.start_vm: the VM was not started" in log
        assert await runstate(vm) == ("prelaunch" if left_stopped else "running"), log


@pytest.mark.qemu
@pytest.mark.guest
@requires_qemu
@pytest.mark.asyncio
async def test_sigterm_leaves_a_held_vm_held(tmp_path: Path, loop_guest: Path) -> None:
    """-S VM, start_vm = false: the sidecar leaves it stopped (D;1 would have started it), without
    breakpoints, so the owner's later cont runs the guest freely."""
    async with running_qemu(tmp_path, QemuSpec(kernel=loop_guest)) as vm:
        log = await sigterm_sidecar_at(tmp_path, vm, loop_guest, "conduit attached", start_vm=False)
        assert await runstate(vm) == "prelaunch", log
        assert vm.console == ""
        async with harness_client(vm) as host:
            await host.execute("cont")
        await vm.wait_for_console(r"ROUND 9 ", SLOW)
        assert await runstate(vm) == "running"


@pytest.mark.qemu
@pytest.mark.guest
@requires_qemu
@pytest.mark.asyncio
async def test_a_new_sidecar_takes_over_a_vm_left_held(tmp_path: Path, loop_guest: Path) -> None:
    """Left held without a D;1, the gdbstub still takes the next sidecar, which then serves the guest."""
    async with running_qemu(tmp_path, QemuSpec(kernel=loop_guest)) as vm:
        async with serving(parse(conduit_config(tmp_path, vm, loop_guest, start_vm=False))) as (first, _):
            await asyncio.wait_for(first.conduit_ready.wait(), SLOW)
            await asyncio.wait_for(first.conduit.serving.wait(), SLOW)
            assert first.conduit.held
        assert await runstate(vm) == "prelaunch"
        async with serving(parse(conduit_config(tmp_path, vm, loop_guest, start_vm=True))) as (second, _):
            await vm.wait_for_console(r"ROUND 1 ", SLOW)
            assert second.conduit.stats.sdei_calls >= 200


@pytest.mark.qemu
@pytest.mark.guest
@requires_qemu
@pytest.mark.asyncio
async def test_sigterm_while_serving_a_busy_guest(tmp_path: Path, loop_guest: Path) -> None:
    """Thousands of trapped calls a second, then SIGTERM: detached at a stop, the guest runs on."""
    async with running_qemu(tmp_path, QemuSpec(kernel=loop_guest)) as vm:
        doc = conduit_config(tmp_path, vm, loop_guest, start_vm=True)
        async with serving(parse(doc)) as (sidecar, task):
            await vm.wait_for_console(r"ROUND 1 ", SLOW)
            sidecar.request_shutdown("test")
            assert await asyncio.wait_for(task, SLOW) == ExitCode.OK
            calls = sidecar.conduit.stats.sdei_calls
        assert calls >= 200
        assert await runstate(vm) == "running"
        await vm.wait_for_console(r"ROUND 9 ", SLOW)


@pytest.mark.qemu
@pytest.mark.guest
@requires_qemu
@pytest.mark.asyncio
async def test_shutdown_while_a_stop_resumes_the_vm(
    tmp_path: Path, loop_guest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race behind "SIGTERM during early boot leaves the VM paused", made certain.

    The conduit's loop has just sent the registers and the resume of a trapped call and waits for
    the register write's reply; right then shutdown asks it to stop (0x03). The loop must consume
    that stop before it ends, or the VM stays paused and the detach times out.
    """
    async with running_qemu(tmp_path, QemuSpec(kernel=loop_guest)) as vm:
        doc = conduit_config(tmp_path, vm, loop_guest, start_vm=True)
        async with serving(parse(doc)) as (sidecar, task):
            await vm.wait_for_console(r"ROUND 1 ", SLOW)
            conduit = sidecar.conduit
            interrupted = asyncio.Event()
            real_interrupt, real_reply = conduit._interrupt, conduit.rsp.reply

            def interrupt() -> None:
                real_interrupt()
                interrupted.set()

            async def reply(future: Any, what: str, timeout: float) -> bytes:
                if what == "register write-back" and conduit._running and not sidecar.shutdown.is_set():
                    sidecar.request_shutdown("test: shutdown while the VM resumes")
                    await asyncio.wait_for(interrupted.wait(), SLOW)  # detach asked the VM to stop
                result: bytes = await real_reply(future, what, timeout)
                return result

            monkeypatch.setattr(conduit, "_interrupt", interrupt)
            monkeypatch.setattr(conduit.rsp, "reply", reply)
            assert await asyncio.wait_for(task, SLOW) == ExitCode.OK
            assert sidecar.shutdown_reason.startswith("test: shutdown while")
        assert await runstate(vm) == "running"
        await vm.wait_for_console(r"ROUND 9 ", SLOW)


@pytest.mark.qemu
@pytest.mark.guest
@requires_qemu
@pytest.mark.asyncio
async def test_a_failed_detach_is_reported_with_the_runstate(
    tmp_path: Path, loop_guest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """QEMU frozen (SIGSTOP) when the sidecar leaves: the detach cannot happen, and the log says so."""
    async with running_qemu(tmp_path, QemuSpec(kernel=loop_guest)) as vm:
        doc = conduit_config(tmp_path, vm, loop_guest, start_vm=True)
        async with serving(parse(doc)) as (sidecar, task):
            await vm.wait_for_console(r"ROUND 1 ", SLOW)
            vm.kill(signal.SIGSTOP)
            try:
                sidecar.request_shutdown("test")
                assert await asyncio.wait_for(task, SLOW) == ExitCode.OK
            finally:
                vm.kill(signal.SIGCONT)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert errors[0].startswith("could not detach from QEMU's gdbstub")
    assert "the VM is left unknown" in errors[0]  # QMP did not answer either


# -- nothing promised is lost on the way out ----------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.guest
@requires_qemu
@pytest.mark.asyncio
async def test_an_event_raised_as_shutdown_begins_is_still_delivered(tmp_path: Path, guest_elf: Path) -> None:
    """The guest waits for host event 1000; it is raised and shutdown requested in the same breath.

    The host was told the event is deliverable, so the guest gets it: the handler runs and
    completes before the sidecar detaches (it used to be withheld, the guest spinning forever).
    """
    async with guest_vm(tmp_path, guest_elf) as vm:
        config = parse(config_doc(vm, tmp_path / "state", guest_elf, start_vm=True))
        async with serving(config) as (sidecar, task):
            await vm.wait_for_console(r"WAIT host-private 1000\r?\n", SLOW)
            assert sidecar.owner is not None
            raising = asyncio.create_task(sidecar.owner.raise_event(1000, 0))
            sidecar.request_shutdown("test: shutdown as the event is raised")
            assert await asyncio.wait_for(task, SLOW) == ExitCode.OK
            assert (await raising).result is RaiseResult.DELIVERED
            late = await sidecar.owner.raise_event(1000, 0)  # too late now: refused, not silently withheld
            assert (late.result, late.code) == (RaiseResult.REFUSED, "shutting_down"), late
        await vm.wait_for_console(r"STEP host-private-handled count=0x0+2 ev=0x0+3e8", SLOW)
        assert registrations(tmp_path / "state", config)["pending"] == []
        assert await runstate(vm) in ("running", "shutdown")  # it goes on (and may power off)


@pytest.mark.asyncio
async def test_host_events_are_refused_while_draining() -> None:
    owner = SdeiOwner(Dispatcher(events=[EventSpec(1000)], mpidrs=[0]))
    owner.draining = True
    outcome = await owner.raise_event(1000, 0)
    assert (outcome.result, outcome.code) == (RaiseResult.REFUSED, "shutting_down"), outcome
    assert outcome.reason == "the sidecar is shutting down"
    assert owner.dispatcher.describe()["pending"] == []


# -- state that does not fit ---------------------------------------------------------------------------


@pytest.mark.qemu
@requires_qemu
@pytest.mark.asyncio
async def test_state_that_does_not_fit_names_the_state_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A running VM whose saved state is from another catalogue: refused, naming state.json."""
    spec = QemuSpec(uuid="6b3f4d2e-0c1a-4f5e-9d8c-7a6b5c4d3e2f", paused=False)
    async with running_qemu(tmp_path, spec) as vm:
        async with serving(parse(config_for(tmp_path, vm))):
            pass
        state = tmp_path / "state" / "state.json"
        before = state.read_bytes()
        other = config_for(tmp_path, vm, sdei={"events": [{"number": 1000}]})
        assert await asyncio.wait_for(Sidecar(parse(other)).run(), SLOW) == ExitCode.STATE
        assert state.read_bytes() == before
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(e.startswith(f"{state}: state is from a dispatcher with a different event catalogue") for e in errors)


# -- status into a closed pipe ----------------------------------------------------------------------------


def test_status_into_a_pipe_closed_early(tmp_path: Path) -> None:
    """``qmp-sdei status | head -1``: no BrokenPipeError, exit 0 (the reader chose to stop)."""
    vcpus = [{"index": i, "mpidr": i, "masked": True, "running": [], "events": {}} for i in range(4000)]
    (tmp_path / "status.json").write_text(json.dumps({"sidecar": {"pid": 1}, "updated": 0, "sdei": {"vcpus": vcpus}}))
    for extra in ([], ["--json"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "qmp_sdei", "status", "--state-dir", str(tmp_path), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()  # the output is far larger than a pipe's buffer
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=SLOW) == ExitCode.OK, err
        assert first
        assert err == ""
