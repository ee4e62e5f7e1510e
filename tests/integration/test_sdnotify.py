"""sd_notify against real AF_UNIX datagram sockets, as systemd's manager reads them."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmp_sdei import sdnotify


@pytest.fixture(autouse=True)
def _fresh_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdnotify, "_warned", False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


def _manager_socket(address: str | bytes) -> socket.socket:
    """A socket like systemd's notify socket: datagrams, with the sender's credentials attached."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(address)
    sock.settimeout(10)
    return sock


def _receive(sock: socket.socket) -> tuple[list[str], int]:
    """One message's lines and the pid the kernel says sent it."""
    creds_size = socket.CMSG_SPACE(12)  # struct ucred: pid, uid, gid
    data, ancillary, _flags, _addr = sock.recvmsg(4096, creds_size)
    pid = -1
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = int.from_bytes(payload[:4], "little")
    return data.decode().split("\n"), pid


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    sock = _manager_socket(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_ready_status_and_stopping_arrive_as_systemd_reads_them(path_socket: socket.socket) -> None:
    assert sdnotify.status("waiting for QEMU at /run/qmp-sdei/vm1.sock")
    assert sdnotify.ready("serving vm1:\n SDEI 1.1, PSCI 1.0")
    assert sdnotify.stopping("SIGTERM")
    assert sdnotify.watchdog()
    messages = [_receive(path_socket) for _ in range(4)]
    assert [lines for lines, _ in messages] == [
        ["STATUS=waiting for QEMU at /run/qmp-sdei/vm1.sock"],
        ["READY=1", "STATUS=serving vm1: SDEI 1.1, PSCI 1.0"],  # newlines folded: one status line
        ["STOPPING=1", "STATUS=SIGTERM"],
        ["WATCHDOG=1"],
    ]
    # systemd accepts READY=1 from the main pid only (NotifyAccess=main): it is sent from ours.
    assert {pid for _, pid in messages} == {os.getpid()}


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"qmp-sdei-test-{uuid.uuid4().hex}"
    sock = _manager_socket(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert _receive(sock)[0] == ["READY=1"]
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready("x") is False


def test_a_missing_socket_is_logged_once_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.DEBUG, logger="qmp_sdei.sdnotify"):
        assert sdnotify.ready("serving") is False
        assert sdnotify.status("still serving") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "nobody-listens" in warnings[0].getMessage()
    assert any(r.levelno == logging.DEBUG for r in caplog.records)


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234"])
def test_an_unusable_notify_socket_value_is_reported(
    value: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    with caplog.at_level(logging.WARNING, logger="qmp_sdei.sdnotify"):
        assert sdnotify.ready() is False
    assert "neither a path nor an abstract socket" in caplog.text


def test_a_malformed_line_is_refused_and_nothing_is_sent(path_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1", "STATUS=two\nlines") is False
    assert sdnotify.notify("READY") is False
    assert sdnotify.notify("STATUS=after") is True
    assert _receive(path_socket)[0] == ["STATUS=after"]  # the refused messages never arrived


def test_watchdog_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_period() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_period() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_period() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_period() is None
    monkeypatch.setenv("WATCHDOG_USEC", "garbage")
    monkeypatch.delenv("WATCHDOG_PID")
    assert sdnotify.watchdog_period() is None
