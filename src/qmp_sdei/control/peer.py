"""A source sidecar's line to the destination sidecar, for migrations whose QEMU has no dbus-vmstate.

When the SDEI state cannot ride QEMU's own stream, the source sidecar hands it to the destination
sidecar over the destination's control API, at the pre-switchover pause, and continues the
migration only once the destination has accepted it. :class:`PeerLink` is that line:

* ``unix`` peer: the destination's local control socket (a same-host migration);
* ``mqtt`` peer: the destination's ``<prefix>/<vm>/incoming`` topic on the source's own broker
  (its ``[mqtt]`` settings), for a destination on another host.

:meth:`PeerLink.open` is meant to run while RAM moves, so that the pause (downtime) pays for one
request and its reply only; :meth:`PeerLink.send_state` sends the migration payload (base64 in an
``incoming-state`` request) and returns the destination's acknowledgement, or raises.

What it must not do: know what the bytes mean, decide whether to continue or cancel the
migration (the migration agent does), or keep a connection past :meth:`PeerLink.close`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from typing import Any

from qmp_sdei.config import MigrationPeer, MqttSettings
from qmp_sdei.control.commands import PROTOCOL_VERSION, STATE_COMMAND
from qmp_sdei.control.local import LocalControlClient
from qmp_sdei.errors import ControlError, MigrationError

__all__ = ["PeerLink", "StateRefused"]

log = logging.getLogger("qmp_sdei.control.peer")


class StateRefused(MigrationError):
    """The destination sidecar answered and refused the state (its reason is the message)."""


class PeerLink:
    """One connection to a destination sidecar's control API (see the module docstring).

    :param mqtt: this sidecar's broker settings; required for an ``mqtt`` peer.
    :param vm_name: this VM's name: an ``mqtt`` peer without a name is the same VM's destination.
    """

    def __init__(
        self, peer: MigrationPeer, *, mqtt: MqttSettings | None, vm_name: str, connect_timeout: float = 5.0
    ) -> None:
        if peer.kind == "mqtt" and mqtt is None:
            raise MigrationError(
                f"peer {peer}: an MQTT peer is reached through this sidecar's broker; configure [mqtt]"
            )
        self.peer = peer
        self._mqtt_settings = mqtt
        self.vm_name = vm_name
        self.connect_timeout = connect_timeout
        self._client: Any = None
        self._topic: str | None = None

    async def open(self) -> None:
        """Connect (and for MQTT subscribe to the reply topic). :raise MigrationError: unreachable."""
        if self._client is not None:
            return
        peer = self.peer
        try:
            if peer.kind == "unix":
                assert peer.path is not None
                client: Any = LocalControlClient(peer.path, timeout=self.connect_timeout)
            else:
                from qmp_sdei.control.mqtt import MqttControlClient, Topics  # noqa: PLC0415 (optional)

                settings = self._mqtt_settings
                assert settings is not None
                vm = peer.vm or self.vm_name
                client = MqttControlClient(
                    settings.url, vm, username=settings.username, password=settings.password, ca=settings.ca,
                    cert=settings.cert, key=settings.key, topic_prefix=settings.topic_prefix,
                    timeout=self.connect_timeout,
                )  # fmt: skip
                self._topic = Topics(settings.topic_prefix, vm).incoming
            await client.__aenter__()
        except ControlError as err:
            raise MigrationError(f"the destination sidecar at {peer} is unreachable: {err}") from err
        self._client = client
        log.info("connected to the destination sidecar at %s", peer)

    async def send_state(self, payload: bytes, timeout: float) -> dict[str, Any]:
        """Send the migration payload; the destination's ``result`` once it adopted the state.

        :raise StateRefused: the destination validated the state and refused it.
        :raise MigrationError: no link, no answer within ``timeout`` seconds, or the link broke.
        """
        await self.open()
        request = {
            "v": PROTOCOL_VERSION,
            "command": STATE_COMMAND,
            "state": base64.b64encode(payload).decode("ascii"),
            "source": self.vm_name,
        }
        try:
            if self._topic is not None:
                answer = await self._client.request(request, timeout, topic=self._topic)
            else:
                answer = await self._client.request(request, timeout)
        except ControlError as err:
            raise MigrationError(f"the destination sidecar at {self.peer} did not take the state: {err}") from err
        if not isinstance(answer, dict):
            raise MigrationError(f"the destination sidecar at {self.peer} answered {answer!r}")
        if not answer.get("ok"):
            error = answer.get("error") or {}
            code, message = error.get("code", "?"), error.get("message", "")
            if code == "state_refused":
                raise StateRefused(f"the destination sidecar refused the SDEI state: {message}")
            raise MigrationError(f"the destination sidecar at {self.peer} answered {code}: {message}")
        result: dict[str, Any] = answer.get("result") or {}
        return result

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)
