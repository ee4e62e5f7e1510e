"""A cancelled MQTT bridge stops, even when the layer below loses the cancellation.

Two things under the bridge can lose it, both seen in clean-clone CI runs: Python 3.11's
``wait_for`` inside aiomqtt's publish returns normally when our cancellation meets a PUBACK that
has just arrived (the status task then published on, and the shutdown awaiting it hung), and
aiomqtt's disconnect on leaving ``async with`` raises MqttError in place of the CancelledError
passing through (the reconnect loop took it for an outage). Neither can be provoked on demand with
a real mosquitto, so a stand-in client plays them: this tests the bridge's own loop logic only.
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
SETTINGS = MqttSettings(host="127.0.0.1", port=1883)


class StandInClient:
    """An aiomqtt client stand-in that idles on its messages.

    :param disconnect_fails: its ``async with`` exit raises MqttError, as a failed disconnect does.
    :param swallowing_publish: this publish (counting from 0) waits until cancelled and then
        returns normally, as 3.11's ``wait_for`` does when the PUBACK arrives with the cancel.
    """

    def __init__(
        self, connects: list[StandInClient], *, disconnect_fails: bool = False, swallowing_publish: int = -1
    ) -> None:
        if len(connects) == 2:  # the loop came back twice: end it, so a failing test still ends
            raise RuntimeError("reconnected after being cancelled")
        connects.append(self)
        self.disconnect_fails = disconnect_fails
        self.swallowing_publish = swallowing_publish
        self.published: list[str] = []
        self.swallowing = asyncio.Event()

    async def __aenter__(self) -> StandInClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.disconnect_fails:
            raise aiomqtt.MqttError("Unexpected disconnection")

    async def subscribe(self, topic: str, **kw: Any) -> list[Any]:
        return []

    async def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.published.append(topic)
        if len(self.published) - 1 == self.swallowing_publish:
            self.swallowing.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        return self._idle()

    async def _idle(self) -> AsyncIterator[aiomqtt.Message]:
        await asyncio.Event().wait()  # nothing ever arrives
        yield  # type: ignore[misc]  # pragma: no cover - makes this an async generator


async def _cancel_and_expect_it_to_end(task: asyncio.Task[None]) -> None:
    task.cancel()
    # A loop that loses the cancellation serves on (or reconnects): this wait then runs out.
    done, _ = await asyncio.wait([task], timeout=WAIT)
    assert task in done, "the cancelled loop did not end"
    assert task.cancelled(), repr(task.exception())


def _bridge(connects: list[StandInClient], **client: Any) -> MqttBridge:
    service, _ = control_service()
    bridge = MqttBridge(service, SETTINGS, vm_name="vm1", status=dict, status_interval=0.01, backoff=Backoff(0, 0))
    bridge._new_client = lambda: StandInClient(connects, **client)  # type: ignore[assignment,return-value,method-assign]
    return bridge


async def test_a_bridge_whose_disconnect_fails_still_ends_when_cancelled() -> None:
    connects: list[StandInClient] = []
    bridge = _bridge(connects, disconnect_fails=True)
    ready = asyncio.Event()
    task = asyncio.create_task(bridge.run(ready))
    await asyncio.wait_for(ready.wait(), WAIT)
    await _cancel_and_expect_it_to_end(task)
    assert len(connects) == 1 and bridge.stats.connects == 1
    # It still said goodbye first: the retained offline status went out before the disconnect.
    assert connects[0].published[-1] == bridge.topics.status
    assert bridge.offline.is_set()


async def test_a_status_publish_that_swallows_the_cancel_does_not_hold_the_shutdown() -> None:
    connects: list[StandInClient] = []
    # publish 0 is the status on connecting; 1 is the periodic status task's first
    bridge = _bridge(connects, swallowing_publish=1)
    ready = asyncio.Event()
    task = asyncio.create_task(bridge.run(ready))
    await asyncio.wait_for(ready.wait(), WAIT)
    await asyncio.wait_for(connects[0].swallowing.wait(), WAIT)
    await _cancel_and_expect_it_to_end(task)
    assert len(connects) == 1
    # nothing after the swallowed one but the offline status
    assert len(connects[0].published) == 3, connects[0].published


async def test_the_incoming_state_listener_whose_disconnect_fails_still_ends_when_cancelled() -> None:
    service, _ = control_service()
    connects: list[StandInClient] = []
    listener = IncomingStateListener(service, SETTINGS, vm_name="vm1")
    listener._new_client = lambda: StandInClient(connects, disconnect_fails=True)  # type: ignore[assignment,return-value,method-assign]
    task = asyncio.create_task(listener.run())
    await asyncio.wait_for(listener.ready.wait(), WAIT)
    await _cancel_and_expect_it_to_end(task)
    assert len(connects) == 1
