"""Pure parts of the MQTT transport: where a reply may go, topic names, the reconnect backoff."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmp_sdei.config import MqttSettings
from qmp_sdei.control.mqtt import Backoff, MqttBridge, Topics, valid_topic_level
from qmp_sdei.errors import ConfigError
from support.standin import control_service

TOPICS = Topics("qmp-sdei/v1", "vm1")


def test_topic_tree() -> None:
    assert (TOPICS.request, TOPICS.status, TOPICS.notifications) == (
        "qmp-sdei/v1/vm1/request",
        "qmp-sdei/v1/vm1/status",
        "qmp-sdei/v1/vm1/notifications",
    )
    assert TOPICS.reply("c1") == "qmp-sdei/v1/vm1/reply/c1"


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("qmp-sdei/v1/vm1/reply/c1", True),
        ("orchestrator/replies", True),
        ("qmp-sdei/v1/vm1/request", False),  # would loop back into this sidecar
        ("qmp-sdei/v1/vm2/request", False),  # would ask another VM's sidecar
        ("qmp-sdei/v1/vm2/status", False),  # would overwrite another VM's retained status
        ("qmp-sdei/v1/vm1/notifications", False),
        ("qmp-sdei/v1/request", True),  # not a VM's protocol topic (one level short)
        ("qmp-sdei/v1/+/reply", False),
        ("a/#", False),
        ("", False),
        ("nul\0here", False),
    ],
)
def test_where_a_reply_may_be_published(topic: str, allowed: bool) -> None:
    assert TOPICS.is_reply_target(topic) is allowed


@pytest.mark.parametrize(("name", "ok"), [("vm1", True), ("a/b", False), ("+", False), ("x#", False), ("", False)])
def test_vm_names_must_be_one_topic_level(name: str, ok: bool) -> None:
    assert valid_topic_level(name) is ok


def test_a_bridge_refuses_a_vm_name_that_is_not_a_topic_level() -> None:
    service, _ = control_service("a/b")
    with pytest.raises(ConfigError, match="topic level"):
        MqttBridge(service, MqttSettings(host="127.0.0.1", port=1883), vm_name="a/b", status=dict)


def test_a_bridge_refuses_unreadable_tls_files(tmp_path: Path) -> None:
    service, _ = control_service()
    settings = MqttSettings(host="127.0.0.1", port=8883, tls=True, ca=tmp_path / "missing-ca.pem")
    with pytest.raises(ConfigError, match="cannot load TLS files"):
        MqttBridge(service, settings, vm_name="vm1", status=dict)


def test_backoff_doubles_with_jitter_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.25, 2.0)
    delays = [backoff.next() for _ in range(8)]
    steps = [0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert all(step / 2 <= delay <= step for delay, step in zip(delays, steps, strict=True)), delays
    backoff.reset()
    assert backoff.next() <= 0.25
