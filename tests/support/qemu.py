"""Helpers for tests that run a real ``qemu-system-aarch64`` (marked ``qemu``).

* :func:`running_qemu` starts a QEMU from a :class:`QemuSpec` in the test's ``tmp_path`` and
  always stops it.
* :func:`harness_client` connects a plain qemu.qmp client to the *harness* monitor, which is
  how tests play "the host" (system_reset, stop/cont, quit) without touching the sidecar's own
  monitor (one client per monitor).
* :func:`fake_peer` serves a unix socket that is deliberately not QEMU.

Timeouts are generous: TCG on two busy cores, with other test runs also starting QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from qmp_sdei.qemu.launch import QEMU_BINARY, QemuProcess, QemuSpec

SLOW = 60.0
"""Upper bound for anything that waits on QEMU (start, attach, an event)."""

requires_qemu = pytest.mark.skipif(shutil.which(QEMU_BINARY) is None, reason=f"{QEMU_BINARY} not installed")


@functools.cache
def qemu_release() -> tuple[int, int]:
    """(major, minor) of the installed ``qemu-system-aarch64``, for behaviour that differs by release."""
    out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    assert m is not None, out
    return int(m.group(1)), int(m.group(2))


@contextlib.asynccontextmanager
async def running_qemu(tmp_path: Path, spec: QemuSpec | None = None) -> AsyncIterator[QemuProcess]:
    """A started QEMU in ``tmp_path/vm``; killed and reaped on exit whatever happened."""
    vm = QemuProcess(spec or QemuSpec(), tmp_path / "vm")
    try:
        await asyncio.wait_for(vm.start(), SLOW)
        yield vm
    finally:
        await vm.stop()


@contextlib.asynccontextmanager
async def harness_client(vm: QemuProcess) -> AsyncIterator[QMPClient]:
    """A qemu.qmp client on the VM's harness monitor, disconnected on exit."""
    client = await vm.connect_harness(SLOW, "test-harness")
    try:
        yield client
    finally:
        # disconnect() re-raises how the session ended (EOFError once QEMU has quit).
        with contextlib.suppress(Exception):
            await client.disconnect()


PeerBehaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def send_junk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Not QMP at all: a line of text, then wait for the client to give up."""
    writer.write(b"SSH-2.0-definitely-not-qemu\r\n")
    await writer.drain()
    await reader.read()


async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept and stay silent, like a QEMU monitor that already has a client."""
    await reader.read()


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept and close at once."""
    writer.close()


async def qmp_but_not_qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Speak enough QMP to pass the handshake, but know no commands (like a storage daemon)."""
    writer.write(b'{"QMP": {"version": {"qemu": {"major": 9, "minor": 9, "micro": 9}, "package": ""},')
    writer.write(b' "capabilities": []}}\r\n')
    async for request in _requests(reader):
        if request.get("execute") == "qmp_capabilities":
            reply: dict[str, object] = {"return": {}}
        else:
            reply = {"error": {"class": "CommandNotFound", "desc": "The command is not found"}}
        if "id" in request:
            reply["id"] = request["id"]
        writer.write(json.dumps(reply).encode() + b"\r\n")
        await writer.drain()


def stale_event_first(stale_connections: int) -> PeerBehaviour:
    """A QEMU-like monitor whose first ``stale_connections`` clients get an event meant for the
    client before them ahead of the greeting (QEMU 10.0 did that to a sidecar restarted at once);
    later ones get a plain handshake and a running VM's ``query-status``."""
    seen = 0

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        seen += 1
        if seen <= stale_connections:
            writer.write(b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}\r\n')
        writer.write(b'{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": ""},')
        writer.write(b' "capabilities": ["oob"]}}\r\n')
        await writer.drain()
        async for request in _requests(reader):
            reply: dict[str, object] = {"return": {}}
            if request.get("execute") == "query-status":
                reply = {"return": {"status": "running", "running": True}}
            if "id" in request:
                reply["id"] = request["id"]
            writer.write(json.dumps(reply).encode() + b"\r\n")
            await writer.drain()

    return behaviour


async def _requests(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects a QMP client sends (qemu.qmp sends them with no separator)."""
    decoder = json.JSONDecoder()
    pending = ""
    while chunk := await reader.read(4096):
        pending += chunk.decode()
        while pending.strip():
            try:
                request, end = decoder.raw_decode(pending.lstrip())
            except json.JSONDecodeError:
                break
            pending = pending.lstrip()[end:]
            yield request


@contextlib.asynccontextmanager
async def fake_peer(path: Path, behaviour: PeerBehaviour) -> AsyncIterator[Path]:
    """A unix server at ``path`` that handles every connection with ``behaviour``."""
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await behaviour(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_unix_server(handle, path=str(path))
    try:
        yield path
    finally:
        server.close()
        for task in tuple(handlers):
            task.cancel()
        await server.wait_closed()
