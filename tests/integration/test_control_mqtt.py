"""The MQTT v5 control transport against a real mosquitto: requests and replies, notifications,
retained status and last will, broker restarts, bad input, access control and TLS.

The sidecar side is a real ControlService over a real SdeiOwner and Dispatcher; a stand-in plays
the guest (no QEMU needed). The end-to-end test with a guest is in test_control_mqtt_guest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from qmp_sdei.config import MqttSettings, parse_mqtt_url
from qmp_sdei.control.commands import ControlService, schema
from qmp_sdei.control.mqtt import Backoff, MqttBridge, MqttControlClient, Topics
from qmp_sdei.errors import ControlError
from support.mosquitto import Mosquitto, requires_mosquitto, running_mosquitto
from support.sdei import PRIVATE, SHARED
from support.standin import control_service

pytestmark = [requires_mosquitto, pytest.mark.asyncio]

WAIT = 20.0  # upper bound for anything that waits on the broker
USERS = {"orchestrator": "orch-pw", "sidecar-vm1": "vm1-pw", "sidecar-vm2": "vm2-pw"}
REPLY = jsonschema.Draft202012Validator(schema("reply"))
NOTIFICATION = jsonschema.Draft202012Validator(schema("notification"))


def settings_for(broker: Mosquitto, **kw: Any) -> MqttSettings:
    host, port, tls = parse_mqtt_url(broker.url)
    return MqttSettings(host=host, port=port, tls=tls, **kw)


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    with running_mosquitto(tmp_path / "broker") as b:
        yield b


@contextlib.asynccontextmanager
async def bridge_running(
    broker: Mosquitto, service: ControlService, **settings: Any
) -> AsyncIterator[tuple[MqttBridge, asyncio.Task[None]]]:
    """The sidecar's MQTT side, connected (ready); cancelled and awaited on exit."""
    bridge = MqttBridge(
        service,
        settings_for(broker, **settings),
        vm_name=service.vm_name,
        status=service._status,
        status_interval=2.0,
        backoff=Backoff(0.05, 0.5),
    )
    ready = asyncio.Event()
    task = asyncio.create_task(bridge.run(ready), name="mqtt-bridge")
    try:
        await asyncio.wait_for(ready.wait(), WAIT)
        yield bridge, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)


def client_for(broker: Mosquitto, vm: str = "vm1", **kw: Any) -> MqttControlClient:
    return MqttControlClient(broker.url, vm, timeout=WAIT, **kw)


class Observer:
    """A plain MQTT v5 subscriber recording what arrives on some topics (the test's own eyes)."""

    def __init__(self, broker: Mosquitto, *topics: str, **kw: Any) -> None:
        self.broker = broker
        self.topics = topics
        self.kw = kw
        self.messages: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Observer:
        host, port, _ = parse_mqtt_url(self.broker.url)
        self.client = await self._stack.enter_async_context(
            aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5, timeout=WAIT, **self.kw)
        )
        for topic in self.topics:
            await self.client.subscribe(topic, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in self.client.messages:
                self.messages.put_nowait(message)

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self._stack.aclose()

    async def next_doc(self, topic: str | None = None, timeout: float = WAIT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.messages.get()
                if topic is None or message.topic.value == topic:
                    doc: dict[str, Any] = json.loads(message.payload)  # type: ignore[arg-type]
                    return doc

    async def publish_request(
        self, payload: bytes, *, response_topic: str | None = None, correlation: bytes | None = None, vm: str = "vm1"
    ) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        await self.client.publish(Topics("qmp-sdei/v1", vm).request, payload, qos=1, properties=props)

    async def reply_to(self, correlation: bytes, timeout: float = WAIT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.messages.get()
                if getattr(message.properties, "CorrelationData", None) == correlation:
                    doc: dict[str, Any] = json.loads(message.payload)  # type: ignore[arg-type]
                    return doc


def raise_request(event: int = PRIVATE, vcpu: int | None = 0, **kw: Any) -> dict[str, Any]:
    return {"v": 1, "command": "raise", "event": event, "vcpu": vcpu, **kw}


# ---- round trips --------------------------------------------------------------------------------------


async def test_status_catalogue_event_and_raise_round_trip(broker: Mosquitto) -> None:
    service, guest = control_service()
    async with bridge_running(broker, service) as (bridge, _), client_for(broker) as client:
        status = await client.status()
        assert status is not None and status["online"] is True and status["vm_name"] == "vm1", status
        assert status["status"]["vm"]["name"] == "vm1"

        catalogue = await client.request({"v": 1, "id": "c1", "command": "catalogue"})
        REPLY.validate(catalogue)
        assert catalogue["id"] == "c1" and catalogue["result"]["count"] == 5, catalogue  # event 0 and four

        event = await client.request({"v": 1, "id": 7, "command": "event", "number": PRIVATE})
        assert event["ok"] and event["id"] == 7 and event["result"]["vcpus"][0]["state"] == "enabled"

        raised = await client.request(raise_request(PRIVATE, 1, id="r1"))
        REPLY.validate(raised)
        assert raised["result"]["result"] == "delivered" and raised["result"]["vcpu"] == 1, raised
        shared = await client.request(raise_request(SHARED, None))
        assert shared["result"]["result"] == "delivered", shared
        assert guest.handled == 2 and service.owner.counters.raised == 2

        refused = await client.request(raise_request(PRIVATE, 5))  # the VM has 2 vCPUs
        assert refused["result"] == {
            "result": "refused",
            "event": PRIVATE,
            "vcpu": 5,
            "code": "vcpu_out_of_range",
            "reason": refused["result"]["reason"],
        }
        unknown = await client.request(raise_request(4242, 0))
        assert unknown["result"]["code"] == "unknown_event", unknown
        no_such = await client.request({"v": 1, "command": "event", "number": 4242})
        assert no_such["error"]["code"] == "unknown_event", no_such
        assert service.owner.counters.raised == 2

        full = await client.request({"v": 1, "command": "status"})
        assert full["ok"] and full["result"]["vm_name"] == "vm1" and len(full["result"]["vcpu_state"]) == 2

        # TCP_NODELAY on the sidecar's broker connection (requests and replies are small)
        assert bridge.client is not None
        sock = bridge.client._client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert bridge.stats.replies >= 8


async def test_notifications_are_published(broker: Mosquitto) -> None:
    service, _ = control_service()
    async with bridge_running(broker, service), client_for(broker) as client:
        seen: list[dict[str, Any]] = []

        async def collect() -> None:
            async for doc in client.watch():
                NOTIFICATION.validate(doc)
                seen.append(doc)
                if doc["kind"] == "completed":
                    return

        watching = asyncio.create_task(collect())
        # the watch subscription is in place once a request has been answered after it started
        await asyncio.sleep(0)
        await client.request({"v": 1, "command": "catalogue"})
        assert (await client.request(raise_request(PRIVATE, 0)))["result"]["result"] == "delivered"
        await asyncio.wait_for(watching, WAIT)
    kinds = [(d["kind"], d.get("vcpu"), d.get("event")) for d in seen]
    assert kinds == [("raised", 0, PRIVATE), ("entered", 0, PRIVATE), ("completed", 0, PRIVATE)], kinds


async def test_status_is_republished_when_it_changes(broker: Mosquitto) -> None:
    service, _ = control_service()
    async with bridge_running(broker, service), Observer(broker, "qmp-sdei/v1/vm1/status") as eyes:
        first = await eyes.next_doc()
        assert first["status"]["counters"]["raised"] == 0
        async with client_for(broker) as client:
            await client.request(raise_request(PRIVATE, 0))
        while (doc := await eyes.next_doc())["status"]["counters"]["raised"] == 0:
            pass
        assert doc["online"] and doc["status"]["counters"]["delivered"] == 1


async def test_last_will_marks_the_vm_offline_and_the_bridge_comes_back(broker: Mosquitto) -> None:
    service, _ = control_service()
    async with bridge_running(broker, service) as (bridge, _), Observer(broker, "qmp-sdei/v1/vm1/status") as eyes:
        assert (await eyes.next_doc())["online"] is True
        assert bridge.client is not None
        # Cut the sidecar's TCP connection under it: no DISCONNECT, so the broker sends the will.
        bridge.client._client.socket().shutdown(socket.SHUT_RDWR)
        gone = await eyes.next_doc()
        assert gone["online"] is False and gone["reason"] == "connection_lost" and gone["vm_name"] == "vm1", gone
        back = await eyes.next_doc()
        assert back["online"] is True, back
        assert bridge.stats.connects == 2 and bridge.stats.disconnects == 1
        async with client_for(broker) as client:
            assert (await client.request({"v": 1, "command": "catalogue"}))["ok"]


async def test_clean_shutdown_leaves_a_retained_offline_status(broker: Mosquitto) -> None:
    service, _ = control_service()
    async with bridge_running(broker, service) as (_, task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
    async with client_for(broker) as client:
        status = await client.status()
        assert status is not None and status["online"] is False and status["reason"] == "shutdown", status
        with pytest.raises(ControlError, match="no reply from VM 'vm1'"):
            await client.request({"v": 1, "command": "status"}, timeout=0.5)


async def test_status_of_a_vm_that_never_connected_is_none(broker: Mosquitto) -> None:
    async with client_for(broker, "nobody") as client:
        assert await client.status() is None


async def test_client_errors_are_control_errors(tmp_path: Path) -> None:
    dead = Mosquitto(tmp_path)  # configured, never started: nothing listens on its port
    with pytest.raises(ControlError, match="cannot reach the MQTT broker"):
        async with client_for(dead):
            pass
    with pytest.raises(ControlError, match="MQTT topic level"):
        MqttControlClient("mqtt://127.0.0.1:1", "a/b")
