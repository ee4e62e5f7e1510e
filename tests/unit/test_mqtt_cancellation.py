"""A cancelled MQTT bridge stops, even when the layer below loses the cancellation.

aiomqtt's ``async with`` disconnects on the way out; when that disconnect fails it raises
MqttError in place of the CancelledError that was passing through. The bridge's reconnect loop
catches MqttError, so without care it reconnects a sidecar that is shutting down (seen once in a
clean-clone CI run). The broker's side of that failure cannot be provoked on demand with a real
mosquitto, so a stand-in client plays it here: this tests the bridge's own loop logic only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest

from qmp_sdei.config import MqttSettings
from qmp_sdei.control.mqtt import Backoff, IncomingStateListener, MqttBridge
from support.standin import control_service

pytestmark = pytest.mark.asyncio

WAIT = 10.0


class DisconnectFails:
    """An aiomqtt client stand-in: connects, idles on its messages, fails its disconnect."""

    def __init__(self, connects: list[DisconnectFails]) -> None:
        if len(connects) == 2:  # the loop came back twice: end it, so a failing test still ends
            raise RuntimeError("reconnected after being cancelled")
        connects.append(self)
        self.published: list[str] = []
        self.closed = asyncio.Event()

    async def __aenter__(self) -> DisconnectFails:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.closed.set()
        raise aiomqtt.MqttError("Unexpected disconnection")

    async def subscribe(self, topic: str, **kw: Any) -> list[Any]:
        return []

    async def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.published.append(topic)

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        return self._idle()

    async def _idle(self) -> AsyncIterator[aiomqtt.Message]:
        await asyncio.Event().wait()  # nothing ever arrives
        yield  # type: ignore[misc]  # pragma: no cover - makes this an async generator


async def _cancel_and_expect_it_to_end(task: asyncio.Task[None]) -> None:
    task.cancel()
    # A loop that loses the cancellation reconnects and serves again: this wait then runs out.
    done, _ = await asyncio.wait([task], timeout=WAIT)
    assert task in done, "the cancelled loop did not end (it reconnected to serve again)"
    assert task.cancelled(), repr(task.exception())


async def test_a_bridge_whose_disconnect_fails_still_ends_when_cancelled() -> None:
    service, _ = control_service()
    connects: list[DisconnectFails] = []
    bridge = MqttBridge(
        service,
        MqttSettings(host="127.0.0.1", port=1883),
        vm_name="vm1",
        status=dict,
        backoff=Backoff(0.0, 0.0),
    )
    bridge._new_client = lambda: DisconnectFails(connects)  # type: ignore[assignment,return-value,method-assign]
    ready = asyncio.Event()
    task = asyncio.create_task(bridge.run(ready))
    await asyncio.wait_for(ready.wait(), WAIT)
    await _cancel_and_expect_it_to_end(task)
    assert len(connects) == 1 and bridge.stats.connects == 1
    # It still said goodbye first: the retained offline status went out before the disconnect.
    assert connects[0].published == [bridge.topics.status, bridge.topics.status]
    assert bridge.offline.is_set()


async def test_the_incoming_state_listener_whose_disconnect_fails_still_ends_when_cancelled() -> None:
    service, _ = control_service()
    connects: list[DisconnectFails] = []
    listener = IncomingStateListener(service, MqttSettings(host="127.0.0.1", port=1883), vm_name="vm1")
    listener._new_client = lambda: DisconnectFails(connects)  # type: ignore[assignment,return-value,method-assign]
    task = asyncio.create_task(listener.run())
    await asyncio.wait_for(listener.ready.wait(), WAIT)
    await _cancel_and_expect_it_to_end(task)
    assert len(connects) == 1
