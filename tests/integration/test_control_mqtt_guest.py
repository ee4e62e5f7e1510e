"""End to end over MQTT: an orchestrator raises the bare-metal guest's host events through a real
mosquitto, the whole sidecar (QMP, pins, gdbstub conduit) delivers them, and the guest's step table
says every one arrived.

The daemon wires the MQTT transport itself once ``[mqtt]`` is configured; here the test starts
:func:`serve_mqtt` beside an in-process :class:`~qmp_sdei.daemon.Sidecar` with the sidecar's own
control service and status, which is what that wiring does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from integration.test_baremetal_guest import HOST_EVENTS, check_all_steps
from integration.test_baremetal_guest import raise_host_events as raise_awaited_events
from qmp_sdei.config import MqttSettings, parse, parse_mqtt_url
from qmp_sdei.control.commands import schema
from qmp_sdei.control.mqtt import MqttControlClient, serve_mqtt
from qmp_sdei.owner import RaiseOutcome, RaiseResult
from support.guests import config_doc, elf_symbols, guest_vm
from support.mosquitto import Mosquitto, requires_mosquitto, running_mosquitto
from support.sidecar import RunningSidecar

pytestmark = [pytest.mark.qemu, pytest.mark.guest, pytest.mark.asyncio, requires_mosquitto]

TIMEOUT = 60.0
NOTIFICATION = jsonschema.Draft202012Validator(schema("notification"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with running_mosquitto(tmp_path / "broker") as b:
        yield b


async def test_orchestrator_raises_the_guests_host_events_over_mqtt(
    tmp_path: Path, guest_elf: Path, sidecars: list[RunningSidecar], broker: Mosquitto
) -> None:
    async with guest_vm(tmp_path, guest_elf) as vm:
        running = RunningSidecar(parse(config_doc(vm, tmp_path / "state", guest_elf, start_vm=True)))
        sidecars.append(running)
        sidecar = await running.ready()
        assert sidecar.control is not None
        host, port, _ = parse_mqtt_url(broker.url)
        ready = asyncio.Event()
        transport = asyncio.create_task(
            serve_mqtt(
                sidecar.control,
                MqttSettings(host=host, port=port),
                vm_name=sidecar.vm_name,
                status=sidecar.status,
                ready=ready,
            )
        )
        try:
            await asyncio.wait_for(ready.wait(), TIMEOUT)
            async with MqttControlClient(broker.url, sidecar.vm_name, timeout=TIMEOUT) as orchestrator:
                status = await orchestrator.status()
                assert status is not None and status["online"], status
                assert status["status"]["vm"]["name"] == sidecar.vm_name
                assert status["status"]["pins"]["psci"] == "1.0"

                notes: list[dict[str, Any]] = []

                async def watch() -> None:
                    async for doc in orchestrator.watch():
                        NOTIFICATION.validate(doc)
                        notes.append(doc)

                watcher = asyncio.create_task(watch())
                await orchestrator.request({"v": 1, "command": "catalogue"})  # the watch is subscribed now

                async def raise_over_mqtt(event: int, vcpu: int | None) -> RaiseOutcome:
                    reply = await orchestrator.request({"v": 1, "command": "raise", "event": event, "vcpu": vcpu})
                    assert reply["ok"], reply
                    r = reply["result"]
                    return RaiseOutcome(RaiseResult(r["result"]), r["event"], r["vcpu"], r.get("code", ""))

                await raise_awaited_events(vm, raise_over_mqtt, list(HOST_EVENTS))
                await vm.wait_for_console(r"DONE\r?\n", TIMEOUT)
                check_all_steps(vm.console, elf_symbols(guest_elf))
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            entered = [
                (n["event"], n["vcpu"]) for n in notes if n["kind"] == "entered" and n["event"] in (1000, 1001, 2000)
            ]
            for event, vcpu in HOST_EVENTS.values():
                assert any(e == event and (vcpu is None or v == vcpu) for e, v in entered), (event, vcpu, entered)
        finally:
            transport.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(transport, TIMEOUT)
        async with MqttControlClient(broker.url, sidecar.vm_name, timeout=TIMEOUT) as after:
            final = await after.status()
            assert final is not None and final["online"] is False and final["reason"] == "shutdown", final


async def test_configured_mqtt_and_the_command_line_through_the_broker(
    tmp_path: Path, guest_elf: Path, sidecars: list[RunningSidecar], broker: Mosquitto
) -> None:
    """``[mqtt]`` in the config starts the bridge with the sidecar; ``qmp-sdei raise|status --mqtt``
    reach it through the broker, as an operator on another host would."""
    import json  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "qmp_sdei", *args, "--mqtt", broker.url, "--vm", "sidecar-conduit-test"],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip

    async with guest_vm(tmp_path, guest_elf) as vm:
        doc = config_doc(vm, tmp_path / "state", guest_elf, start_vm=True)
        doc["mqtt"] = {"url": broker.url}
        running = RunningSidecar(parse(doc))
        sidecars.append(running)
        await running.ready()
        for n, (tag, (event, vcpu)) in enumerate(HOST_EVENTS.items()):
            await vm.wait_for_console(rf"WAIT {tag} {event}\r?\n", TIMEOUT)
            if n == 1:  # while the guest still runs (it powers off after its last step)
                status = await asyncio.to_thread(cli, "status", "--json")
                assert status.returncode == 0, status.stderr
                assert json.loads(status.stdout)["pins"]["psci"] == "1.0"
                refused = await asyncio.to_thread(cli, "raise", "--event", "4242", "--vcpu", "0")
                assert refused.returncode == 1 and "unknown_event" in refused.stdout, refused
            args = ["raise", "--event", str(event), "--json"] + (["--vcpu", str(vcpu)] if vcpu is not None else [])
            result = await asyncio.to_thread(cli, *args)
            assert result.returncode == 0, (tag, result.stdout, result.stderr)
            outcome = json.loads(result.stdout)["result"]
            assert outcome["result"] == "delivered" or outcome.get("code") == "busy", (tag, outcome)
        await vm.wait_for_console(r"DONE\r?\n", TIMEOUT)
        check_all_steps(vm.console, elf_symbols(guest_elf))
