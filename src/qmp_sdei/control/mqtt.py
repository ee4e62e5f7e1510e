"""The MQTT v5 control transport: one VM's control API on a broker, when ``[mqtt]`` is configured.

Topic tree, per VM, under ``<prefix>/<vm name>/`` (the prefix defaults to ``qmp-sdei/v1``):

* ``status`` -- retained, QoS 1: ``{"v": 1, "vm_name", "online": true, "time", "status": {...}}``,
  published on connect, when notifications say something changed (coalesced) and every few seconds.
  The connection's last will is the same topic with ``"online": false`` (``reason: "connection_lost"``);
  a clean shutdown publishes ``reason: "shutdown"`` itself.
* ``request`` -- the sidecar subscribes (QoS 1). A request is one JSON document (see
  :mod:`qmp_sdei.control.commands`); its reply is published (QoS 1) to the message's ResponseTopic
  with its CorrelationData. A request without a ResponseTopic is served but gets no reply.
* ``notifications`` -- QoS 0, not retained: one document per notification of the
  :class:`~qmp_sdei.owner.SdeiOwner`; ``{"kind": "lost", "count": N}`` says how many were dropped
  while the broker was away (they are counted, never buffered without bound).
* ``reply/<client id>`` -- where :class:`MqttControlClient` asks for its replies.
* ``incoming`` -- while the VM waits for an incoming live migration, its destination sidecar takes
  the SDEI state here (``incoming-state`` only, :class:`IncomingStateListener`): the VM's other
  topics still belong to the source's sidecar until the guest has arrived.

What it must not do: decide anything a request means (that is the command layer's job), or make the
guest wait. The owner's notification queue drops its oldest entries rather than block, and nothing
the guest does waits on a publish; a broker outage only loses notifications (counted) and replies
to requests in flight. The bridge reconnects with capped exponential backoff and jitter.

A request that arrives twice with the same ResponseTopic and CorrelationData (a QoS 1 redelivery, or
a client retrying after a lost reply) is answered with the first reply and not executed again;
except after a ``busy`` reply, which ran nothing, so the retry runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import ssl
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from qmp_sdei.config import MqttSettings, parse_mqtt_url
from qmp_sdei.control.commands import (
    MAX_IN_FLIGHT,
    MAX_REQUEST_BYTES,
    MAX_STATE_REQUEST_BYTES,
    PROTOCOL_VERSION,
    STATE_COMMAND,
    ControlService,
    encode,
    error_reply,
    notification_document,
)
from qmp_sdei.errors import ConfigError, ControlError
from qmp_sdei.owner import Subscription

log = logging.getLogger("qmp_sdei.control.mqtt")

DEFAULT_PREFIX = "qmp-sdei/v1"
#: Largest packet the sidecar accepts from the broker (MQTT v5 Maximum Packet Size). Requests
#: between MAX_REQUEST_BYTES and this get a ``too_large`` reply; the broker drops larger ones for us.
MAX_PACKET_BYTES = 2 * MAX_REQUEST_BYTES
#: Messages received but not yet read, per connection (aiomqtt drops, with a warning, beyond this).
MAX_QUEUED_MESSAGES = 1024
#: Request tasks alive at once; past this the reader answers ``busy`` itself, which slows it down
#: and lets the broker's own per-client queue limits apply.
MAX_REQUEST_TASKS = 2 * MAX_IN_FLIGHT
#: Recent (ResponseTopic, CorrelationData) pairs remembered to answer a repeated request once.
RECENT_REQUESTS = 1024
KEEPALIVE_S = 15
STATUS_INTERVAL_S = 5.0
#: Least time between two status publications triggered by notifications (bursts coalesce).
STATUS_MIN_GAP_S = 0.25
BACKOFF_INITIAL_S = 0.25
BACKOFF_CAP_S = 30.0
#: How long a clean shutdown waits to publish the offline status.
SHUTDOWN_PUBLISH_S = 2.0
#: The topic levels below ``<prefix>/<vm>/`` that belong to the protocol; never a reply target.
NOTIFICATION_QOS = 0
PROTOCOL_TOPICS = frozenset({"request", "status", "notifications", "incoming"})

_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class Topics:
    """The topic tree of one VM."""

    prefix: str
    vm: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.vm}"

    @property
    def request(self) -> str:
        return f"{self.base}/request"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def notifications(self) -> str:
        return f"{self.base}/notifications"

    @property
    def incoming(self) -> str:
        return f"{self.base}/incoming"

    def reply(self, client_id: str) -> str:
        return f"{self.base}/reply/{client_id}"

    def is_reply_target(self, topic: str) -> bool:
        """May a reply be published to ``topic``? Not to a wildcard, nor onto any VM's protocol topics.

        Otherwise a request could make this sidecar publish a "request" to another VM or overwrite a
        retained status (the broker's ACL is the real fence; this keeps an open broker sane too).
        """
        if not topic or "+" in topic or "#" in topic or "\0" in topic or len(topic.encode()) > 65535:
            return False
        prefix = self.prefix.split("/")
        levels = topic.split("/")
        in_tree = levels[: len(prefix)] == prefix and len(levels) == len(prefix) + 2
        return not (in_tree and levels[-1] in PROTOCOL_TOPICS)


def valid_topic_level(name: str) -> bool:
    return bool(name) and not any(c in name for c in "/+#\0")


def tls_context(ca: Path | None, cert: Path | None, key: Path | None, *, where: str = "mqtt") -> ssl.SSLContext:
    """A client TLS context that verifies the broker (with ``ca``, else the system's CAs). :raise ConfigError:"""
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key is not None else None)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"{where}.ca/cert/key: cannot load TLS files: {err}") from err
    return context


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho's constructor is untyped


def _json_properties() -> Properties:
    props = _properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.PayloadFormatIndicator = 1  # UTF-8
    return props


#: Shared by every status and notification publication (paho only reads it; building one per
#: message is a measurable share of a raise's cost).
_JSON = _json_properties()


def _reply_properties(correlation: bytes | None) -> Properties:
    props = _json_properties()
    if correlation is not None:
        props.CorrelationData = correlation
    return props


@dataclass
class MqttStats:
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    requests: int = 0
    replies: int = 0
    #: requests with no (usable) ResponseTopic: served, not answered
    unanswerable: int = 0
    #: replies that could not be published (broker gone meanwhile)
    replies_lost: int = 0
    duplicates: int = 0
    too_large: int = 0
    status_published: int = 0
    notifications_published: int = 0
    notifications_lost: int = 0


class Backoff:
    """Capped exponential backoff with jitter (each delay is drawn from the upper half of its step)."""

    def __init__(self, initial: float = BACKOFF_INITIAL_S, cap: float = BACKOFF_CAP_S) -> None:
        self.initial = initial
        self.cap = cap
        self._step = initial

    def reset(self) -> None:
        self._step = self.initial

    def next(self) -> float:
        delay = random.uniform(self._step / 2, self._step)  # noqa: S311  # jitter, not a secret
        self._step = min(self._step * 2, self.cap)
        return delay


def _keep_cancellation(cause: BaseException | None = None) -> None:
    """Raise CancelledError again if this task was asked to stop and something below lost that.

    Two things below us can. Python 3.11's ``wait_for`` (under aiomqtt's publish and subscribe)
    returns the result when our cancellation meets an operation that has just completed: the
    periodic status task went on publishing after its cancel, and the shutdown waiting for it hung
    (seen in clean-clone CI runs, with the PUBACK of the last status arriving as the test ended).
    And leaving aiomqtt's ``async with`` disconnects; a disconnect that fails raises MqttError in
    place of our CancelledError, which the reconnect loops would take for an outage. The task
    still counts the request (``cancelling()``), so every long-lived loop asks it after each
    aiomqtt operation (:func:`_publish`, :func:`_subscribe`) and before reconnecting.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from cause


async def _publish(client: aiomqtt.Client, topic: str, payload: bytes, **options: Any) -> None:
    """``client.publish``, then :func:`_keep_cancellation`: the publish may have swallowed ours."""
    await client.publish(topic, payload, **options)
    _keep_cancellation()


async def _subscribe(client: aiomqtt.Client, topic: str) -> Any:
    """``client.subscribe`` at QoS 1, then :func:`_keep_cancellation` (see :func:`_publish`)."""
    reasons = await client.subscribe(topic, qos=1)
    _keep_cancellation()
    return reasons


class MqttBridge:
    """Serves one :class:`ControlService` on a broker until cancelled; see the module docstring.

    :param status: builds the status document; it is called at a safe point of the owner.
    """

    def __init__(
        self,
        service: ControlService,
        settings: MqttSettings,
        *,
        vm_name: str,
        status: Callable[[], dict[str, Any]],
        status_interval: float = STATUS_INTERVAL_S,
        backoff: Backoff | None = None,
    ) -> None:
        if not valid_topic_level(vm_name):
            raise ConfigError(f"vm.name: {vm_name!r} cannot be an MQTT topic level (no '/', '+', '#', NUL)")
        self.service = service
        self.settings = settings
        self.vm_name = vm_name
        self.topics = Topics(settings.topic_prefix, vm_name)
        # Unique per sidecar process: during a migration the source's and the destination's sidecars
        # serve the same VM name, and a broker drops the older of two sessions with one client id.
        self.client_id = settings.client_id or f"qmp-sdei-{vm_name}-{socket.gethostname()}-{os.getpid()}"
        self.stats = MqttStats()
        self.status_interval = status_interval
        self.backoff = backoff or Backoff()
        self._status = status
        self._tls = tls_context(settings.ca, settings.cert, settings.key) if settings.tls else None
        #: the connected client, None while the broker is away
        self.client: aiomqtt.Client | None = None
        #: set while connected and serving / while not (for status reports and tests)
        self.online = asyncio.Event()
        self.offline = asyncio.Event()
        self.offline.set()
        self._status_changed = asyncio.Event()
        self._request_tasks: set[asyncio.Task[None]] = set()
        self._recent: OrderedDict[tuple[str, bytes], asyncio.Future[dict[str, Any]]] = OrderedDict()
        self._lost_unreported = 0

    # ---- documents ---------------------------------------------------------------------------------

    def _offline_document(self, reason: str) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "vm_name": self.vm_name, "online": False, "reason": reason, "time": time.time()}

    async def _online_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"v": PROTOCOL_VERSION, "vm_name": self.vm_name, "online": True, "time": time.time()}
        try:
            doc["status"] = await self.service.owner.submit(self._status)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug in the provider: still say we are online, and why it is thin
            log.exception("building the MQTT status document failed")
            doc["status_error"] = str(err)
        return doc

    def _new_client(self) -> aiomqtt.Client:
        s = self.settings
        will_props = _json_properties()
        connect_props = _properties(PacketTypes.CONNECT)
        connect_props.MaximumPacketSize = MAX_PACKET_BYTES
        client = aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(
                self.topics.status,
                encode(self._offline_document("connection_lost")),
                qos=1,
                retain=True,
                properties=will_props,
            ),
            clean_start=True,
            keepalive=KEEPALIVE_S,
            properties=connect_props,
            tls_context=self._tls,
            socket_options=[_NODELAY],
            max_queued_incoming_messages=MAX_QUEUED_MESSAGES,
            logger=logging.getLogger("qmp_sdei.control.mqtt.paho"),
        )
        # Replies and notifications in flight at once are normal here, not worth a warning each.
        client.pending_calls_threshold = MAX_REQUEST_TASKS + MAX_QUEUED_MESSAGES
        return client

    # ---- the connection loop -----------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until every request being served has had its reply sent."""
        if self._request_tasks:
            await asyncio.wait(list(self._request_tasks), timeout=timeout)

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until cancelled; broker outages are logged and retried, never raised."""
        with self.service.owner.subscribe() as notes:
            pump = asyncio.create_task(self._pump_notifications(notes), name="mqtt.notifications")
            try:
                await self._connect_forever(ready)
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
                for task in list(self._request_tasks):
                    task.cancel()

    async def _connect_forever(self, ready: asyncio.Event | None) -> None:
        url = self.settings.url
        failures = 0
        while True:
            connected = False
            try:
                async with self._new_client() as client:
                    connected = True
                    failures = 0
                    self.backoff.reset()
                    self.stats.connects += 1
                    log.info("MQTT connected to %s as %s; serving %s", url, self.client_id, self.topics.base)
                    await self._serve_connection(client, ready)
            except aiomqtt.MqttError as err:
                _keep_cancellation(err)
                if connected:
                    self.stats.disconnects += 1
                    log.warning("MQTT connection to %s lost: %s", url, err)
                else:
                    failures += 1
                    self.stats.connect_failures += 1
                    log.warning("MQTT broker %s unreachable or refused us (attempt %d): %s", url, failures, err)
            finally:
                self._set_client(None)
            delay = self.backoff.next()
            log.info("MQTT reconnecting to %s in %.2fs", url, delay)
            await asyncio.sleep(delay)

    async def _serve_connection(self, client: aiomqtt.Client, ready: asyncio.Event | None) -> None:
        status_task: asyncio.Task[None] | None = None
        try:
            reasons = await _subscribe(client, self.topics.request)
            refused = [r for r in reasons if isinstance(r, ReasonCode) and r.is_failure]
            if refused:
                # Not an outage: the ACL does not let us read our own request topic. Keep publishing
                # status and notifications, and say loudly why no request will ever arrive.
                log.error("MQTT broker refused our subscription to %s: %s", self.topics.request, refused[0])
            await self._publish_status(client)
            self._set_client(client)
            if ready is not None:
                ready.set()
            status_task = asyncio.create_task(self._status_loop(client), name="mqtt.status")
            async for message in client.messages:
                await self._on_message(message)
                _keep_cancellation()
        except asyncio.CancelledError:
            # A clean shutdown, at any point of the connection: say so, then disconnect normally
            # (which makes the broker drop the will). The periodic status goes first: an online
            # status it was publishing could otherwise reach the broker after the offline one and
            # stay retained (seen on Debian 13 about one run in three).
            self._set_client(None)
            if status_task is not None:
                status_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await status_task
                status_task = None
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await client.publish(
                    self.topics.status,
                    encode(self._offline_document("shutdown")),
                    qos=1,
                    retain=True,
                    properties=_JSON,
                    timeout=SHUTDOWN_PUBLISH_S,
                )
            raise
        finally:
            if status_task is not None:
                status_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await status_task

    def _set_client(self, client: aiomqtt.Client | None) -> None:
        self.client = client
        (self.offline if client is None else self.online).set()
        (self.online if client is None else self.offline).clear()

    async def _publish_status(self, client: aiomqtt.Client) -> None:
        doc = await self._online_document()
        await _publish(client, self.topics.status, encode(doc), qos=1, retain=True, properties=_JSON)
        self.stats.status_published += 1

    async def _status_loop(self, client: aiomqtt.Client) -> None:
        """Re-publish the status when notifications say it changed (coalesced), and periodically."""
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that meets
            # the event being set, and the shutdown then waited for this loop until its timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.status_interval):
                    await self._status_changed.wait()
            await asyncio.sleep(STATUS_MIN_GAP_S)  # rate limit: a burst of changes is one publication
            self._status_changed.clear()
            try:
                await self._publish_status(client)
            except aiomqtt.MqttError as err:  # the reader sees a lost connection too and ends it
                log.debug("status not published: %s", err)

    # ---- notifications ------------------------------------------------------------------------------

    async def _pump_notifications(self, notes: Subscription) -> None:
        """Publish the owner's notifications; while the broker is away, count them as lost."""
        overflow_seen = 0
        async for note in notes:
            self._status_changed.set()
            if notes.lost != overflow_seen:  # the owner's queue dropped some while we were slow
                self._count_lost(notes.lost - overflow_seen)
                overflow_seen = notes.lost
            client = self.client
            if client is None:
                self._count_lost(1)
                continue
            try:
                topic = self.topics.notifications
                if self._lost_unreported:
                    lost = {"v": PROTOCOL_VERSION, "kind": "lost", "count": self._lost_unreported, "time": time.time()}
                    await _publish(client, topic, encode(lost), qos=NOTIFICATION_QOS, properties=_JSON)
                    self._lost_unreported = 0
                doc = notification_document(note.to_dict())
                await _publish(client, topic, encode(doc), qos=NOTIFICATION_QOS, properties=_JSON)
                self.stats.notifications_published += 1
            except aiomqtt.MqttError as err:
                log.debug("notification not published: %s", err)
                self._count_lost(1)

    def _count_lost(self, count: int) -> None:
        self.stats.notifications_lost += count
        self._lost_unreported += count

    # ---- requests ------------------------------------------------------------------------------------

    async def _on_message(self, message: aiomqtt.Message) -> None:
        if not message.topic.matches(self.topics.request):
            return  # nothing else is subscribed; a broker bug or a stale subscription
        self.stats.requests += 1
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        if response_topic is None or not self.topics.is_reply_target(response_topic):
            self.stats.unanswerable += 1
            log.debug("MQTT request without a usable ResponseTopic (%r): served, not answered", response_topic)
            response_topic = None
        if len(payload) > MAX_REQUEST_BYTES:
            # Answered without parsing: a huge document costs nothing but this comparison.
            self.stats.too_large += 1
            self.service.stats.requests += 1
            self.service.stats.errors += 1
            doc = error_reply(None, "too_large", f"request of {len(payload)} bytes; the limit is {MAX_REQUEST_BYTES}")
            await self._reply(response_topic, correlation, doc)
            return
        if len(self._request_tasks) >= MAX_REQUEST_TASKS:
            self.service.stats.requests += 1
            self.service.stats.busy += 1
            doc = error_reply(None, "busy", f"more than {MAX_REQUEST_TASKS} MQTT requests in flight; retry later")
            await self._reply(response_topic, correlation, doc)  # awaited here: the reader slows down
            return
        task = asyncio.create_task(self._serve_request(payload, response_topic, correlation), name="mqtt.request")
        self._request_tasks.add(task)
        task.add_done_callback(self._request_tasks.discard)

    async def _serve_request(self, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None:
        key = (response_topic, correlation) if response_topic is not None and correlation is not None else None
        if key is not None and (first := self._recent.get(key)) is not None:
            self.stats.duplicates += 1
            log.info("MQTT request repeated (same ResponseTopic and CorrelationData): answering the first reply")
            doc = await asyncio.shield(first)
        else:
            done: asyncio.Future[dict[str, Any]] | None = None
            if key is not None:
                done = asyncio.get_running_loop().create_future()
                self._recent[key] = done
                while len(self._recent) > RECENT_REQUESTS:
                    _, old = self._recent.popitem(last=False)
                    if not old.done():
                        old.cancel()
            try:
                doc = await self.service.handle(payload)
            except BaseException:
                if done is not None and not done.done():
                    done.cancel()
                    self._recent.pop(key, None)  # type: ignore[arg-type]  # key is set when done is
                raise
            if done is not None and not done.done():
                done.set_result(doc)
                if not doc["ok"] and doc["error"]["code"] == "busy":
                    self._recent.pop(key, None)  # type: ignore[arg-type]  # nothing ran: a retry must run
        await self._reply(response_topic, correlation, doc)

    async def _reply(self, response_topic: str | None, correlation: bytes | None, doc: dict[str, Any]) -> None:
        if response_topic is None:
            return
        client = self.client  # the connection of now: it may have been re-made while the request ran
        if client is None:
            self.stats.replies_lost += 1
            log.warning("MQTT reply to %s lost: the broker is away", response_topic)
            return
        try:
            await _publish(client, response_topic, encode(doc), qos=1, properties=_reply_properties(correlation))
        except (aiomqtt.MqttError, ValueError) as err:
            self.stats.replies_lost += 1
            log.warning("MQTT reply to %s not published: %s", response_topic, err)
            return
        self.stats.replies += 1


class IncomingStateListener:
    """A migration destination's MQTT ear: takes the VM's SDEI state on ``<prefix>/<vm>/incoming``.

    It runs while the VM waits for an incoming migration whose state travels over the control API
    (the fallback for a QEMU without ``dbus-vmstate``). The VM's ``request``, ``status`` and
    ``notifications`` topics still belong to the source's sidecar then, so this publishes nothing of
    its own (no status, no will): it answers ``incoming-state`` requests on its one topic, up to
    ``MAX_STATE_REQUEST_BYTES``, and refuses every other command. Broker outages are retried with
    backoff; cancel it once the guest has arrived (the :class:`MqttBridge` takes over).
    """

    def __init__(self, service: ControlService, settings: MqttSettings, *, vm_name: str) -> None:
        if not valid_topic_level(vm_name):
            raise ConfigError(f"vm.name: {vm_name!r} cannot be an MQTT topic level (no '/', '+', '#', NUL)")
        self.service = service
        self.settings = settings
        self.topics = Topics(settings.topic_prefix, vm_name)
        self.client_id = f"qmp-sdei-{vm_name}-incoming-{socket.gethostname()}-{os.getpid()}"
        self._tls = tls_context(settings.ca, settings.cert, settings.key) if settings.tls else None
        self.backoff = Backoff()
        #: set while subscribed to the incoming topic
        self.ready = asyncio.Event()
        self.requests = 0

    def _new_client(self) -> aiomqtt.Client:
        s = self.settings
        connect_props = _properties(PacketTypes.CONNECT)
        connect_props.MaximumPacketSize = MAX_STATE_REQUEST_BYTES + 4096  # the packet's own header too
        return aiomqtt.Client(
            s.host, s.port, username=s.username, password=s.password, identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=True, keepalive=KEEPALIVE_S,
            properties=connect_props, tls_context=self._tls, socket_options=[_NODELAY],
            logger=logging.getLogger("qmp_sdei.control.mqtt.paho"),
        )  # fmt: skip

    async def run(self) -> None:
        url = self.settings.url
        while True:
            try:
                async with self._new_client() as client:
                    self.backoff.reset()
                    reasons = await _subscribe(client, self.topics.incoming)
                    refused = [r for r in reasons if isinstance(r, ReasonCode) and r.is_failure]
                    if refused:
                        log.error("MQTT broker refused our subscription to %s: %s", self.topics.incoming, refused[0])
                    else:
                        log.info("MQTT: waiting for the incoming SDEI state on %s", self.topics.incoming)
                    self.ready.set()
                    async for message in client.messages:
                        await self._serve(client, message)
                        _keep_cancellation()
            except aiomqtt.MqttError as err:
                _keep_cancellation(err)
                log.warning("MQTT broker %s (incoming state): %s", url, err)
            finally:
                self.ready.clear()
            await asyncio.sleep(self.backoff.next())

    async def _serve(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        if not message.topic.matches(self.topics.incoming):
            return
        self.requests += 1
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        doc = await self.service.handle(payload, only={STATE_COMMAND})
        if response_topic is None or not self.topics.is_reply_target(response_topic):
            log.warning("incoming-state request without a usable ResponseTopic (%r): not answered", response_topic)
            return
        try:
            await _publish(client, response_topic, encode(doc), qos=1, properties=_reply_properties(correlation))
        except (aiomqtt.MqttError, ValueError) as err:
            log.warning("MQTT reply to %s not published: %s", response_topic, err)


async def serve_mqtt(
    service: ControlService,
    settings: MqttSettings,
    *,
    vm_name: str,
    status: Callable[[], dict[str, Any]],
    ready: asyncio.Event | None = None,
) -> None:
    """Serve ``service`` over MQTT until cancelled (see :class:`MqttBridge` for the stats)."""
    await MqttBridge(service, settings, vm_name=vm_name, status=status).run(ready)


# ---- the client ------------------------------------------------------------------------------------


class _Client(aiomqtt.Client):
    """aiomqtt's client, also remembering publishes the broker refused (MQTT v5 PUBACK reason codes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refusals: deque[str] = deque(maxlen=64)
        self.refused = 0

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any) -> None:
        if isinstance(reason_code, ReasonCode) and reason_code.is_failure:
            self.refused += 1
            self.refusals.append(str(reason_code))
        super()._on_publish(client, userdata, mid, reason_code, properties)


#: Notifications a watcher may have unread before the oldest are dropped (and a "lost" doc says so).
WATCH_BACKLOG = 1024


class MqttControlClient:
    """A client of a sidecar's MQTT control topics (what ``qmp-sdei raise|watch|status --mqtt`` use).

    ``async with MqttControlClient("mqtt://broker:1883", "vm1") as c: reply = await c.request({...})``

    Every failure to reach or use the broker raises :class:`~qmp_sdei.errors.ControlError`.
    """

    def __init__(
        self,
        url: str,
        vm: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        topic_prefix: str = DEFAULT_PREFIX,
        timeout: float = 10.0,
    ) -> None:
        self.host, self.port, tls = parse_mqtt_url(url, key="--mqtt")
        self.url = url
        if not valid_topic_level(vm):
            raise ControlError(f"{vm!r} cannot be an MQTT topic level (no '/', '+', '#', NUL)")
        if (cert is None) != (key is None):
            raise ControlError("a client certificate needs its key, and a key its certificate")
        self.vm = vm
        self.topics = Topics(topic_prefix, vm)
        self.timeout = timeout
        self.client_id = f"qmp-sdei-cli-{uuid.uuid4().hex[:12]}"
        self.reply_topic = self.topics.reply(self.client_id)
        self._username = username
        self._password = password
        try:
            self._tls = tls_context(ca, cert, key, where="--mqtt") if tls else None
        except ConfigError as err:
            raise ControlError(str(err)) from err
        self._mqtt: _Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._watchers: set[_DocQueue] = set()
        self._status_doc: dict[str, Any] | None = None
        self._status_seen = asyncio.Event()
        self._status_subscribed = False
        self._notes_subscribed = False
        self._gone: ControlError | None = None

    async def __aenter__(self) -> MqttControlClient:
        client = _Client(
            self.host,
            self.port,
            username=self._username,
            password=self._password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            tls_context=self._tls,
            socket_options=[_NODELAY],
            timeout=self.timeout,
            logger=logging.getLogger("qmp_sdei.control.mqtt.paho"),
        )
        try:
            await client.__aenter__()
        except aiomqtt.MqttCodeError as err:
            raise ControlError(f"the MQTT broker at {self.url} refused us: {_reason(err)}") from err
        except aiomqtt.MqttError as err:
            raise ControlError(f"cannot reach the MQTT broker at {self.url}: {err}") from err
        self._mqtt = client
        self._reader = asyncio.create_task(self._read(client), name="mqtt.client.reader")
        try:
            await self._subscribe(self.reply_topic)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        client, self._mqtt = self._mqtt, None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    def _connected(self) -> _Client:
        if self._gone is not None:
            raise self._gone
        if self._mqtt is None:
            raise ControlError("the MQTT control client is not connected (use it in `async with`)")
        return self._mqtt

    async def _subscribe(self, topic: str) -> None:
        try:
            reasons = await self._connected().subscribe(topic, qos=1)
        except aiomqtt.MqttError as err:
            raise ControlError(f"cannot subscribe to {topic} on {self.url}: {err}") from err
        refused = [r for r in reasons if isinstance(r, ReasonCode) and r.is_failure]
        if refused:
            raise ControlError(f"the MQTT broker at {self.url} refused our subscription to {topic}: {refused[0]}")

    async def _publish(self, topic: str, payload: bytes, props: Properties, timeout: float) -> None:
        client = self._connected()
        refused_before = client.refused
        try:
            await client.publish(topic, payload, qos=1, properties=props, timeout=timeout)
        except aiomqtt.MqttError as err:
            raise ControlError(f"cannot publish to {topic} on {self.url}: {err}") from err
        if client.refused != refused_before:
            why = client.refusals[-1] if client.refusals else "refused"
            raise ControlError(f"the MQTT broker at {self.url} refused our publish to {topic}: {why}")

    async def request(
        self, doc: dict[str, Any], timeout: float | None = None, *, topic: str | None = None
    ) -> dict[str, Any]:
        """Send one request to the VM's sidecar and wait for its reply. :raise ControlError:

        :param topic: where to publish it (default: the VM's ``request`` topic).
        """
        timeout = self.timeout if timeout is None else timeout
        correlation = uuid.uuid4().bytes
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = waiter
        props = _json_properties()
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        try:
            await self._publish(topic or self.topics.request, encode(doc), props, timeout)
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError as err:
            raise ControlError(
                f"no reply from VM {self.vm!r} within {timeout:g}s over {self.url}: is its sidecar running "
                f"and connected (its retained status is on {self.topics.status})?"
            ) from err
        finally:
            self._pending.pop(correlation, None)

    async def status(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The VM's retained status document, or None when the broker holds none (never connected)."""
        timeout = self.timeout if timeout is None else timeout
        if not self._status_subscribed:
            await self._subscribe(self.topics.status)
            self._status_subscribed = True
            # The broker sends retained messages right after the SUBACK, in order with what follows
            # on this connection: once a message we publish to ourselves is back, a retained status
            # would have arrived before it.
            marker = b"status-marker-" + uuid.uuid4().bytes
            back: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[marker] = back
            try:
                await self._publish(self.reply_topic, b"{}", _reply_properties(marker), timeout)
                await asyncio.wait_for(back, timeout)
            except (ControlError, TimeoutError) as err:
                log.debug("status marker did not come back (%s); waiting for a retained status instead", err)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._status_seen.wait(), timeout)
            finally:
                self._pending.pop(marker, None)
        self._connected()
        return self._status_doc

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """The VM's notifications, until the broker connection is lost (then :class:`ControlError`)."""
        queue = _DocQueue(WATCH_BACKLOG)
        self._watchers.add(queue)
        try:
            if not self._notes_subscribed:
                await self._subscribe(self.topics.notifications)
                self._notes_subscribed = True
            while (doc := await queue.get()) is not None:
                yield doc
        finally:
            self._watchers.discard(queue)
        if self._gone is not None:
            raise self._gone

    async def _read(self, client: _Client) -> None:
        try:
            async for message in client.messages:
                self._route(message)
        except aiomqtt.MqttError as err:
            self._gone = ControlError(f"lost the MQTT broker at {self.url}: {err}")
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(self._gone)
            for queue in self._watchers:
                queue.close()

    def _route(self, message: aiomqtt.Message) -> None:
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            log.warning("ignoring a non-JSON message on %s", message.topic.value)
            return
        if not isinstance(doc, dict):
            log.warning("ignoring a non-object JSON message on %s", message.topic.value)
            return
        topic = message.topic.value
        if topic == self.reply_topic:
            correlation = getattr(message.properties, "CorrelationData", None)
            waiter = self._pending.get(correlation) if isinstance(correlation, bytes) else None
            if waiter is not None and not waiter.done():
                waiter.set_result(doc)
        elif topic == self.topics.status:
            self._status_doc = doc
            self._status_seen.set()
        elif topic == self.topics.notifications:
            for queue in self._watchers:
                queue.put(doc)


class _DocQueue:
    """A watcher's bounded queue: a slow reader loses the oldest documents, and is told how many."""

    def __init__(self, backlog: int) -> None:
        self._items: deque[dict[str, Any]] = deque(maxlen=backlog)
        self._ready = asyncio.Event()
        self._lost = 0
        self._closed = False

    def put(self, doc: dict[str, Any]) -> None:
        if len(self._items) == self._items.maxlen:
            self._lost += 1
        self._items.append(doc)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> dict[str, Any] | None:
        """The next document (a ``lost`` one first if some were dropped), None once closed."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        if self._lost:
            lost, self._lost = self._lost, 0
            return {"v": PROTOCOL_VERSION, "kind": "lost", "count": lost, "time": time.time()}
        return self._items.popleft()


def _reason(err: aiomqtt.MqttCodeError) -> str:
    return str(err.rc) if isinstance(err.rc, ReasonCode) else str(err)
