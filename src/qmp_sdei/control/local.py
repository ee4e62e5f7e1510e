"""The local control transport: a unix socket in the state directory, newline-delimited JSON.

Always on, needs no broker: it is what ``qmp-sdei raise|watch|status`` use on the same host and what
CI boot tests use. The socket is created owner-only (0600): whoever may raise events for this VM
must be able to write its state directory anyway.

Each line is one request (see :mod:`qmp_sdei.control.commands`) and gets one reply line. Requests on
one connection are served in order; clients run side by side. ``watch`` turns the connection into a
notification stream (one JSON line per notification) until the client closes it. A line over the
size limit gets a ``too_large`` reply and is skipped up to its newline; the connection stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qmp_sdei.control.commands import (
    MAX_REQUEST_BYTES,
    MAX_STATE_REQUEST_BYTES,
    PROTOCOL_VERSION,
    ControlService,
    encode,
    error_reply,
    notification_document,
    parse_request,
    reply,
)
from qmp_sdei.errors import ConfigError, ControlError

log = logging.getLogger("qmp_sdei.control.local")

SOCKET_NAME = "control.sock"
MAX_CLIENTS = 32
#: sockaddr_un.sun_path holds 108 bytes including the terminating NUL
MAX_SOCKET_PATH = 107
READ_CHUNK = 65536


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


class LocalControlServer:
    """Serve a :class:`ControlService` on a unix socket until cancelled (then the socket is removed)."""

    def __init__(self, service: ControlService, path: Path) -> None:
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            limit = f"a unix socket path must be at most {MAX_SOCKET_PATH} bytes; use a shorter state_dir"
            raise ConfigError(f"{path}: {limit}")
        self.service = service
        self.path = path
        self.ready = asyncio.Event()
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def serve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a sidecar that died; the state dir lock is ours
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=READ_CHUNK)
        except OSError as err:
            raise ControlError(f"cannot listen on {self.path}: {err.strerror}") from err
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        log.info("control socket %s", self.path)
        self.ready.set()
        try:
            async with server:
                await asyncio.Future()  # until cancelled
        finally:
            # Closing each connection ends its task (EOF) without cancelling it mid-request.
            for writer in self._clients.values():
                writer.close()
            if self._clients:
                await asyncio.wait(list(self._clients), timeout=2.0)
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_CLIENTS:
            writer.write(encode(error_reply(None, "busy", f"more than {MAX_CLIENTS} control clients")) + b"\n")
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            return
        self._clients[task] = writer
        try:
            await self._serve_lines(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing of its requests is half-done
        finally:
            self._clients.pop(task, None)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_lines(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        skipping = False  # inside an oversized line, until its newline
        while chunk := await reader.read(READ_CHUNK):
            buf += chunk
            while (end := buf.find(b"\n")) >= 0:
                line = bytes(buf[:end])
                del buf[: end + 1]
                if skipping:
                    skipping = False
                    continue
                if not line.strip():
                    continue
                if await self._serve_one(line, reader, writer):
                    return  # the connection became a watch stream and has ended
            # A line may be as long as a migration's state; the command layer holds every other
            # request to MAX_REQUEST_BYTES once the line is complete.
            if len(buf) > MAX_STATE_REQUEST_BYTES and not skipping:
                skipping = True
                buf.clear()
                doc = error_reply(None, "too_large", f"request line over {MAX_STATE_REQUEST_BYTES} bytes")
                writer.write(encode(doc) + b"\n")
                await writer.drain()
            elif skipping:
                buf.clear()

    async def _serve_one(self, line: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one line; True when it was ``watch`` and the stream is over."""
        if b'"watch"' in line:
            try:
                request = parse_request(line)
            except Exception:  # handle() below gives the proper error reply
                request = None
            if request is not None and request["command"] == "watch":
                await self._watch(request.get("id"), reader, writer)
                return True
        doc = await self.service.handle(line)
        writer.write(encode(doc) + b"\n")
        await writer.drain()
        return False

    async def _watch(self, request_id: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        owner = self.service.owner
        with owner.subscribe() as sub:
            writer.write(encode(reply(request_id, {"watching": self.service.vm_name})) + b"\n")
            await writer.drain()
            closed = asyncio.create_task(_until_eof(reader), name="control.watch.eof")
            lost = 0
            try:
                while not closed.done():
                    nxt = asyncio.ensure_future(anext(sub))
                    await asyncio.wait({nxt, closed}, return_when=asyncio.FIRST_COMPLETED)
                    if not nxt.done():
                        nxt.cancel()
                        break
                    if sub.lost != lost:
                        missed, lost = sub.lost - lost, sub.lost
                        writer.write(encode({"v": PROTOCOL_VERSION, "kind": "lost", "count": missed}) + b"\n")
                    writer.write(encode(notification_document(nxt.result().to_dict())) + b"\n")
                    await writer.drain()
            except StopAsyncIteration:
                pass
            finally:
                closed.cancel()


async def _until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(READ_CHUNK):
        pass  # a watching client has nothing more to say; anything it sends is ignored


class LocalControlClient:
    """A client of a sidecar's control socket (what the CLI uses).

    ``async with LocalControlClient(path) as client: reply = await client.request({...})``
    """

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> LocalControlClient:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path), limit=16 * MAX_REQUEST_BYTES), self.timeout
            )
        except (OSError, TimeoutError) as err:
            raise ControlError(f"no sidecar is listening on {self.path}: {err}") from err
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def request(self, doc: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        await self._send(doc)
        return await self._read_line(timeout if timeout is not None else self.timeout)

    async def start_watch(self) -> None:
        """Turn this connection into a notification stream; subscribed when this returns."""
        first = await self.request({"v": PROTOCOL_VERSION, "command": "watch"})
        if not first.get("ok"):
            raise ControlError(f"watch refused: {first.get('error')}")

    async def notifications(self) -> AsyncIterator[dict[str, Any]]:
        """Notifications (after :meth:`start_watch`) until the sidecar goes away."""
        assert self._reader is not None
        while line := await self._reader.readline():
            yield json.loads(line)

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """Notifications until the sidecar goes away."""
        await self.start_watch()
        async for item in self.notifications():
            yield item

    async def _send(self, doc: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write(encode(doc) + b"\n")
        await self._writer.drain()

    async def _read_line(self, timeout: float) -> dict[str, Any]:
        assert self._reader is not None
        try:
            line = await asyncio.wait_for(self._reader.readline(), timeout)
        except TimeoutError as err:
            raise ControlError(f"the sidecar did not answer within {timeout:g}s") from err
        if not line:
            raise ControlError("the sidecar closed the connection")
        doc: dict[str, Any] = json.loads(line)
        return doc
