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
from qmp_sdei.control.commands import MAX_REQUEST_BYTES, ControlService, schema
from qmp_sdei.control.mqtt import Backoff, MqttBridge, MqttControlClient, Topics
from qmp_sdei.errors import ControlError
from support.mosquitto import EXAMPLE_ACL, Certs, Mosquitto, make_certs, requires_mosquitto, running_mosquitto
from support.sdei import PRIVATE, SHARED
from support.standin import control_service

pytestmark = [requires_mosquitto, pytest.mark.asyncio]

WAIT = 20.0  # upper bound for anything that waits on the broker
USERS = {"orchestrator": "orch-pw", "sidecar-vm1": "vm1-pw", "sidecar-vm2": "vm2-pw"}
REPLY = jsonschema.Draft202012Validator(schema("reply"))
NOTIFICATION = jsonschema.Draft202012Validator(schema("notification"))
STATUS = jsonschema.Draft202012Validator(schema("mqtt-status"))


def settings_for(broker: Mosquitto, **kw: Any) -> MqttSettings:
    host, port, tls = parse_mqtt_url(broker.url)
    return MqttSettings(host=host, port=port, tls=tls, **kw)


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    with running_mosquitto(tmp_path / "broker") as b:
        yield b


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("pki"))


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
        STATUS.validate(status)
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
        STATUS.validate(gone)
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
        STATUS.validate(status)
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


# ---- outages ----------------------------------------------------------------------------------------


async def test_broker_killed_and_restarted_mid_run(broker: Mosquitto) -> None:
    """The sidecar reconnects and re-publishes its status; the guest never noticed; every request that
    got a reply took effect exactly once (and none of the others more than once)."""
    service, guest = control_service()
    owner = service.owner
    sent = replied = 0
    progress = asyncio.Event()
    stop = asyncio.Event()
    go = asyncio.Event()  # cleared while the test watches for the "lost" report, which must come first
    go.set()

    async def orchestrator() -> None:
        nonlocal sent, replied
        while not stop.is_set():
            await go.wait()
            try:
                async with client_for(broker) as client:
                    while not stop.is_set():
                        await go.wait()
                        sent += 1
                        reply = await client.request(raise_request(PRIVATE, sent % 2), timeout=2)
                        assert reply["ok"] and reply["result"]["result"] == "delivered", reply
                        replied += 1
                        progress.set()
            except ControlError:
                await asyncio.sleep(0.05)  # retry pacing while the broker is away, not synchronisation

    async def replies_reach(count: int) -> None:
        while replied < count:
            progress.clear()
            await asyncio.wait_for(progress.wait(), WAIT)

    async with bridge_running(broker, service) as (bridge, _):
        traffic = asyncio.create_task(orchestrator())
        try:
            await replies_reach(20)
            broker.kill()
            await asyncio.wait_for(bridge.offline.wait(), WAIT)
            # The guest goes on while the broker is away: its calls complete, a host raise is
            # delivered, and the notifications nobody can carry are counted, not stored.
            guest.guest_calls(50)
            # (the test's own raises use the shared event: the orchestrator's raise PRIVATE, and a
            # raise landing while another of the same event waits for its stop would be "pending")
            during = await asyncio.wait_for(owner.raise_event(SHARED, None), WAIT)
            assert during.result.value == "delivered"
            assert bridge.stats.notifications_lost >= 100
            go.clear()  # no orchestrator traffic (and its notifications) until the watcher listens
            await asyncio.to_thread(broker.start)
            await asyncio.wait_for(bridge.online.wait(), WAIT)
            async with client_for(broker) as client:
                status = await client.status()
                assert status is not None and status["online"] is True, status  # re-published
                notes = client.watch()
                first = asyncio.ensure_future(anext(notes))
                await client.request({"v": 1, "command": "catalogue"})  # the watch is subscribed by now
                await owner.raise_event(SHARED, None)
                lost = await asyncio.wait_for(first, WAIT)
                assert lost["kind"] == "lost" and lost["count"] >= 100, lost
                await notes.aclose()
            go.set()
            before = replied
            await replies_reach(before + 20)
        finally:
            stop.set()
            go.set()
            await asyncio.wait_for(traffic, WAIT)
    host_raises = 2
    assert replied >= 40
    assert replied + host_raises <= owner.counters.raised <= sent + host_raises, (replied, sent, owner.counters)
    assert owner.counters.delivered == owner.counters.raised == guest.handled
    assert bridge.stats.connects >= 2 and bridge.stats.disconnects >= 1


async def test_sidecar_keeps_trying_while_no_broker_listens(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)  # not started yet
    service, _ = control_service()
    bridge = MqttBridge(
        service, settings_for(broker), vm_name="vm1", status=service._status, backoff=Backoff(0.02, 0.1)
    )
    ready = asyncio.Event()
    task = asyncio.create_task(bridge.run(ready))
    try:
        # a host raise works with no broker at all: the transport is not in the guest's path
        assert (await asyncio.wait_for(service.owner.raise_event(PRIVATE, 0), WAIT)).result.value == "delivered"
        await asyncio.to_thread(broker.start)
        await asyncio.wait_for(ready.wait(), WAIT)
        assert bridge.stats.connect_failures >= 1 and bridge.stats.connects == 1
        async with client_for(broker) as client:
            assert (await client.request(raise_request(PRIVATE, 1)))["result"]["result"] == "delivered"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        broker.stop()


# ---- bad input --------------------------------------------------------------------------------------

REPLIES = "qmp-sdei/v1/vm1/reply/test"


async def test_oversized_requests_are_refused_unparsed(broker: Mosquitto) -> None:
    service, _ = control_service()
    async with bridge_running(broker, service) as (bridge, _), Observer(broker, REPLIES) as eyes:
        before = await service.owner.snapshot()
        big = b'{"v":1,"command":"raise","event":1000,"vcpu":0,"id":"big","pad":"' + b"x" * MAX_REQUEST_BYTES + b'"}'
        await eyes.publish_request(big, response_topic=REPLIES, correlation=b"big")
        reply = await eyes.reply_to(b"big")
        REPLY.validate(reply)
        assert reply["error"]["code"] == "too_large" and reply["id"] is None, reply  # never parsed for its id
        # Far beyond the limit the broker does not even pass it on (our Maximum Packet Size).
        await eyes.publish_request(b"[" * (4 * MAX_REQUEST_BYTES), response_topic=REPLIES, correlation=b"huge")
        await eyes.publish_request(b'{"v":1,"command":"catalogue"}', response_topic=REPLIES, correlation=b"after")
        message = await eyes.messages.get()
        assert getattr(message.properties, "CorrelationData", None) == b"after"  # nothing for "huge" before it
        assert await service.owner.snapshot() == before
        assert bridge.stats.too_large == 1 and service.owner.counters.raised == 0


async def test_requests_without_a_usable_response_topic_get_no_reply(broker: Mosquitto) -> None:
    service, _ = control_service()
    other_vm = "qmp-sdei/v1/vm2/request"
    async with (
        bridge_running(broker, service) as (bridge, _),
        Observer(broker, REPLIES, other_vm, "qmp-sdei/v1/vm1/notifications") as eyes,
    ):
        raise_doc = json.dumps(raise_request(PRIVATE, 0)).encode()
        await eyes.publish_request(raise_doc)  # no ResponseTopic: served, not answered
        await eyes.publish_request(raise_doc, response_topic=other_vm, correlation=b"x")  # not onto a protocol topic
        # (a ResponseTopic with wildcards is a protocol error that mosquitto 2.0.21 answers by
        # disconnecting the sender; the bridge's own refusal of one is covered in test_mqtt_topics)
        raised = 0
        while raised < 2:
            doc = await eyes.next_doc("qmp-sdei/v1/vm1/notifications")
            raised += doc["kind"] == "raised"
        await eyes.publish_request(b'{"v":1,"command":"catalogue"}', response_topic=REPLIES, correlation=b"z")
        message = await eyes.messages.get()
        while message.topic.value != REPLIES:  # only notifications may come before it, never vm2/request
            assert message.topic.value.endswith("/notifications"), message.topic.value
            message = await eyes.messages.get()
        assert getattr(message.properties, "CorrelationData", None) == b"z"
        assert bridge.stats.unanswerable == 2 and service.owner.counters.raised == 2


async def test_a_repeated_request_is_answered_again_but_runs_once(broker: Mosquitto) -> None:
    service, _ = control_service()
    async with bridge_running(broker, service) as (bridge, _), Observer(broker, REPLIES) as eyes:
        payload = json.dumps(raise_request(PRIVATE, 0, id="once")).encode()
        for _ in range(2):
            await eyes.publish_request(payload, response_topic=REPLIES, correlation=b"same")
        first, second = await eyes.reply_to(b"same"), await eyes.reply_to(b"same")
        assert first == second and first["result"]["result"] == "delivered", (first, second)
        assert service.owner.counters.raised == 1 and bridge.stats.duplicates == 1


async def test_a_flood_gets_busy_replies_and_the_sidecar_stays_healthy(broker: Mosquitto) -> None:
    """While a (simulated) guest stop holds the owner, requests pile up: past the in-flight limit
    they are answered ``busy`` at once; when the stop ends the others complete."""
    service, guest = control_service()
    count = 300
    async with bridge_running(broker, service), Observer(broker, REPLIES) as eyes:
        guest.owner.begin_stop()
        try:
            payloads = [json.dumps({"v": 1, "id": i, "command": "status"}).encode() for i in range(count)]
            await asyncio.gather(
                *(
                    eyes.publish_request(p, response_topic=REPLIES, correlation=str(i).encode())
                    for i, p in enumerate(payloads)
                )
            )
            replies: list[dict[str, Any]] = []
            while len(replies) < count - 64:
                replies.append(await eyes.next_doc(REPLIES))
            assert all(r["error"]["code"] == "busy" for r in replies), replies[:3]
        finally:
            guest.owner.end_stop()
        while len(replies) < count:
            replies.append(await eyes.next_doc(REPLIES))
        for r in replies:
            REPLY.validate(r)
        assert sorted(r["id"] for r in replies if r["ok"]) == sorted(
            set(range(count)) - {r["id"] for r in replies if not r["ok"]}
        )
        assert sum(r["ok"] for r in replies) == 64 and service.stats.busy == count - 64
        # a request answered "busy" ran nothing: retried with the same CorrelationData, it runs
        refused = next(r["id"] for r in replies if not r["ok"])
        await eyes.publish_request(payloads[refused], response_topic=REPLIES, correlation=str(refused).encode())
        retried = await eyes.reply_to(str(refused).encode())
        assert retried["ok"] and retried["id"] == refused, retried
        async with client_for(broker) as client:
            assert (await client.request(raise_request(PRIVATE, 0)))["result"]["result"] == "delivered"


# ---- access control and TLS -------------------------------------------------------------------------


@pytest.fixture
def acl_broker(tmp_path: Path) -> Any:
    with running_mosquitto(tmp_path / "broker", users=USERS, acl=EXAMPLE_ACL) as b:
        yield b


def credentials(user: str) -> dict[str, str]:
    return {"username": user, "password": USERS[user]}


async def test_acl_orchestrator_raises_on_each_vm_and_others_cannot(acl_broker: Mosquitto) -> None:
    vm1, _ = control_service("vm1")
    vm2, _ = control_service("vm2")
    async with (
        bridge_running(acl_broker, vm1, **credentials("sidecar-vm1")),
        bridge_running(acl_broker, vm2, **credentials("sidecar-vm2")),
    ):
        for vm in ("vm1", "vm2"):
            async with client_for(acl_broker, vm, **credentials("orchestrator")) as orch:
                assert (await orch.request(raise_request(PRIVATE, 0)))["result"]["result"] == "delivered"
                status = await orch.status()
                assert status is not None and status["online"] and status["vm_name"] == vm
        # vm2's sidecar user may not ask vm1's sidecar anything
        async with client_for(acl_broker, "vm1", **credentials("sidecar-vm2")) as intruder:
            with pytest.raises(ControlError, match="refused our publish to qmp-sdei/v1/vm1/request"):
                await intruder.request(raise_request(PRIVATE, 0))
        # nor may a sidecar fake another VM's status
        async with Observer(acl_broker, **credentials("sidecar-vm2")) as eyes:
            await eyes.client.publish("qmp-sdei/v1/vm1/status", b'{"online": false}', qos=1, retain=True)
        async with client_for(acl_broker, "vm1", **credentials("orchestrator")) as orch:
            status = await orch.status()
            assert status is not None and status["online"] is True, status
        # an unknown user, or a wrong password, is not let in at all
        for user, password in (("mallory", "x"), ("orchestrator", "wrong")):
            with pytest.raises(ControlError, match="refused us"):
                async with client_for(acl_broker, "vm1", username=user, password=password):
                    pass
        assert vm1.owner.counters.raised == 1 and vm2.owner.counters.raised == 1


async def test_tls_broker_verified_by_ca(tmp_path: Path, certs: Certs) -> None:
    service, _ = control_service()
    with running_mosquitto(tmp_path / "broker", certs=certs) as tls_broker:
        assert tls_broker.url.startswith("mqtts://")
        async with bridge_running(tls_broker, service, ca=certs.ca), client_for(tls_broker, ca=certs.ca) as client:
            assert (await client.request(raise_request(PRIVATE, 0)))["result"]["result"] == "delivered"
        with pytest.raises(ControlError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            async with client_for(tls_broker, ca=certs.other_ca):
                pass


async def test_tls_with_client_certificates(tmp_path: Path, certs: Certs) -> None:
    service, _ = control_service()
    with running_mosquitto(tmp_path / "broker", certs=certs, require_client_cert=True) as tls_broker:
        mine = {"ca": certs.ca, "cert": certs.client_cert, "key": certs.client_key}
        async with bridge_running(tls_broker, service, **mine), client_for(tls_broker, **mine) as client:
            assert (await client.request({"v": 1, "command": "catalogue"}))["ok"]
        # No client certificate: the broker closes the connection before any CONNACK.
        with pytest.raises(ControlError, match="cannot reach the MQTT broker"):
            async with MqttControlClient(tls_broker.url, "vm1", ca=certs.ca, timeout=2):
                pass
