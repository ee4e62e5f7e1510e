"""The control transport's pure parts: its config, the incoming-state request and its size rules."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from qmp_sdei.config import MigrationPeer, parse, parse_peer
from qmp_sdei.control.commands import (
    MAX_REQUEST_BYTES,
    MAX_STATE_REQUEST_BYTES,
    CommandError,
    ControlService,
    parse_request,
)
from qmp_sdei.control.mqtt import Topics
from qmp_sdei.control.peer import PeerLink
from qmp_sdei.errors import ConfigError, IncompatibleState, MigrationError
from qmp_sdei.qemu.migration import plain_tcp_target
from support.standin import serving_owner

BASE: dict[str, Any] = {"qmp": {"socket": "/s"}}


def with_migration(**table: Any) -> dict[str, Any]:
    return {**BASE, "migration": table}


# -- config ---------------------------------------------------------------------------------------------


def test_migration_defaults_to_auto_with_no_peer() -> None:
    settings = parse(BASE).migration
    assert (settings.transport, settings.peer, settings.peer_timeout) == ("auto", None, 3.0)
    assert settings.tcp_nodelay is True
    assert parse(with_migration(tcp_nodelay=False)).migration.tcp_nodelay is False


def test_migration_table_parses() -> None:
    settings = parse(with_migration(transport="control", peer="unix:/run/dst/control.sock", peer_timeout=1)).migration
    assert settings.transport == "control"
    assert settings.peer == MigrationPeer("unix", path=Path("/run/dst/control.sock"))
    assert settings.peer_timeout == 1.0
    mqtt = parse({**with_migration(peer="mqtt:vm9"), "mqtt": {"url": "mqtt://broker"}}).migration
    assert mqtt.peer == MigrationPeer("mqtt", vm="vm9")


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"transport": "tcp"}, "migration.transport: 'tcp' is not one of auto, dbus-vmstate, control"),
        ({"peer": "relative/control.sock"}, "migration.peer: 'relative/control.sock' is not unix:/ABSOLUTE/PATH"),
        ({"peer": "unix:/" + "x" * 200}, "migration.peer: "),
        ({"peer": "mqtt"}, "migration.peer: an MQTT peer is reached through this sidecar's broker"),
        ({"peer_timeout": 0}, "migration.peer_timeout: must be positive"),
        ({"peer_timeout": float("inf")}, "migration.peer_timeout: must be a finite number"),
        ({"peers": "x"}, "migration.peers: unknown key"),
        ({"tcp_nodelay": "yes"}, "migration.tcp_nodelay: "),
    ],
)
def test_bad_migration_settings_are_named(table: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match="^" + words.replace("(", r"\(").replace(".", r"\.")):
        parse(with_migration(**table))


@pytest.mark.parametrize(
    ("uri", "target"),
    [
        ("tcp:127.0.0.1:4444", ("127.0.0.1", 4444)),
        ("tcp:dst.example:4444", ("dst.example", 4444)),
        ("tcp:[::1]:4444", ("::1", 4444)),
        ("tcp:127.0.0.1:4444,ipv4", None),  # options: QEMU's own connection, as written
        ("tcp::4444", None),
        ("tcp:host:0", None),
        ("tcp:host:99999", None),
        ("tcp:host:port", None),
        ("tcp:host", None),
        ("unix:/run/mig.sock", None),
        ("exec:cat", None),
    ],
)
def test_only_a_plain_tcp_uri_gets_a_connection_of_ours(uri: str, target: tuple[str, int] | None) -> None:
    assert plain_tcp_target(uri) == target


def test_peer_names() -> None:
    assert str(parse_peer("/a/control.sock")) == "unix:/a/control.sock"
    assert str(parse_peer("mqtt")) == "mqtt"
    assert str(parse_peer("mqtt:vm2")) == "mqtt:vm2"
    with pytest.raises(ConfigError, match="topic level"):
        parse_peer("mqtt:a/b")


def test_migration_settings_cannot_change_at_run_time() -> None:
    _, refused = parse(BASE).runtime_changes(parse(with_migration(transport="control")))
    assert refused == ["migration"]


def test_an_mqtt_peer_needs_a_broker() -> None:
    with pytest.raises(MigrationError, match=r"configure \[mqtt\]"):
        PeerLink(MigrationPeer("mqtt"), mqtt=None, vm_name="vm1")


def test_the_incoming_topic_is_a_protocol_topic() -> None:
    topics = Topics("qmp-sdei/v1", "vm1")
    assert topics.incoming == "qmp-sdei/v1/vm1/incoming"
    assert not topics.is_reply_target("qmp-sdei/v1/vm2/incoming")  # never a place for replies


# -- size rules ------------------------------------------------------------------------------------------


def state_request(size: int) -> bytes:
    return json.dumps({"v": 1, "command": "incoming-state", "state": "A" * size}).encode()


def test_only_incoming_state_may_exceed_the_request_limit() -> None:
    big = state_request(4 * MAX_REQUEST_BYTES)
    assert parse_request(big)["command"] == "incoming-state"
    padded = json.dumps({"v": 1, "command": "status", "pad": "x" * MAX_REQUEST_BYTES}).encode()
    with pytest.raises(CommandError) as err:
        parse_request(padded)
    assert err.value.code == "too_large"


def test_no_request_may_exceed_the_state_limit() -> None:
    with pytest.raises(CommandError) as err:
        parse_request(state_request(MAX_STATE_REQUEST_BYTES))
    assert err.value.code == "too_large"


def test_deep_nesting_is_bad_json_not_a_crash() -> None:
    with pytest.raises(CommandError) as err:
        parse_request(b"[" * (2 * MAX_REQUEST_BYTES))
    assert err.value.code == "bad_json"


# -- the command ----------------------------------------------------------------------------------------


def service(receive: Any = None) -> ControlService:
    owner, _ = serving_owner()
    return ControlService(owner, dict, vm_name="vm1", receive_state=receive)


def request(state: str, **extra: Any) -> bytes:
    return json.dumps({"v": 1, "id": 3, "command": "incoming-state", "state": state, **extra}).encode()


@pytest.mark.asyncio
async def test_incoming_state_reaches_the_receiver_decoded() -> None:
    seen: list[tuple[bytes, str | None]] = []

    async def receive(blob: bytes, source: str | None) -> dict[str, Any]:
        seen.append((blob, source))
        return {"accepted": True, "bytes": len(blob)}

    reply = await service(receive).handle(request(base64.b64encode(b"QSDEIMIG...").decode(), source="vm1"))
    assert reply == {"v": 1, "id": 3, "ok": True, "result": {"accepted": True, "bytes": 11}}
    assert seen == [(b"QSDEIMIG...", "vm1")]


@pytest.mark.asyncio
async def test_a_refused_state_is_state_refused_with_the_reason() -> None:
    async def receive(blob: bytes, source: str | None) -> dict[str, Any]:
        raise IncompatibleState("catalogue differs: event 3000")

    reply = await service(receive).handle(request(base64.b64encode(b"x").decode()))
    assert reply["error"] == {"code": "state_refused", "message": "catalogue differs: event 3000"}


@pytest.mark.asyncio
async def test_state_that_is_not_base64_is_a_bad_request() -> None:
    called: list[bytes] = []

    async def receive(blob: bytes, source: str | None) -> dict[str, Any]:
        called.append(blob)
        return {}

    reply = await service(receive).handle(request("not base64!"))
    assert reply["error"]["code"] == "bad_request" and "base64" in reply["error"]["message"]
    assert called == []


@pytest.mark.asyncio
async def test_a_sidecar_without_a_receiver_says_unavailable() -> None:
    reply = await service().handle(request(base64.b64encode(b"x").decode()))
    assert reply["error"]["code"] == "unavailable"


@pytest.mark.asyncio
async def test_a_transport_may_serve_only_some_commands() -> None:
    reply = await service().handle(b'{"v": 1, "command": "status"}', only={"incoming-state"})
    assert reply["error"]["code"] == "unknown_command"
    assert "only incoming-state" in reply["error"]["message"]
