"""The sidecar's QMP attachment to one QEMU: connect (or accept), follow the VM's life, run commands.

What this module is for:

* :func:`attach` reaches QEMU's control monitor, in either direction. In *connect* mode the
  sidecar may start before QEMU, so it waits for the socket and retries ``ENOENT`` /
  ``ECONNREFUSED`` (QEMU creates the socket file before it calls ``listen()``) until the
  deadline. In *listen* mode QEMU connects out to us (``-chardev socket,...,reconnect=N``).
  Anything that is not a QEMU system emulator on the other end (junk, silence, a monitor
  already taken by another client) becomes a one-line :class:`~qmp_sdei.errors.QemuError`
  within the timeout.
* :class:`QmpSession` keeps qemu.qmp's event memory bounded (0.0.6 records every event
  forever in ``EventListener._history``; with gdbstub interception every guest call makes a
  STOP and a RESUME), turns lifecycle events into typed :class:`VmEvent` values for
  subscribers, tracks the runstate, and ends every subscription with one
  :data:`VmEventKind.DISCONNECTED` when the QMP connection is gone.
* :meth:`QmpSession.execute` maps qemu.qmp's errors onto :class:`QemuError` /
  :class:`QmpCommandError` with the command named in the message.
* :func:`start_gdbstub` / :func:`gdbstub_address` open or find QEMU's gdbstub for the conduit.

What it must not do: know about SDEI, own any VM state besides what QEMU told us, or keep
events for a consumer that does not read them.

Typical use::

    async with await attach(path, listen=False, timeout=10.0) as session:
        with session.subscribe({VmEventKind.RESET, VmEventKind.SHUTDOWN}) as events:
            async for event in events:          # ends after VmEventKind.DISCONNECTED
                ...
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import re
import socket
import stat
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from qmp_sdei.errors import QemuError

__all__ = [
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_SUBSCRIPTION_LIMIT",
    "EventSubscription",
    "QmpAddress",
    "QmpCommandError",
    "QmpSession",
    "VmEvent",
    "VmEventKind",
    "attach",
    "gdbstub_address",
    "open_tcp_socket",
    "start_gdbstub",
]

log = logging.getLogger(__name__)

QmpAddress = str | os.PathLike[str] | tuple[str, int]
"""A unix socket path, or ``(host, port)`` for TCP."""

DEFAULT_COMMAND_TIMEOUT: Final = 30.0
"""Seconds a single command may take. QEMU answers queries in about a millisecond; a command
that takes this long means QEMU is wedged (big lock held), and the caller should hear about it."""

DEFAULT_SUBSCRIPTION_LIMIT: Final = 10_000
"""Undelivered events one subscriber may hold before it is cut off (see :class:`EventSubscription`)."""

_RETRY_FIRST: Final = 0.005
_RETRY_MAX: Final = 0.1


class QmpCommandError(QemuError):
    """QEMU refused a command (a QMP ``error`` reply).

    Kept distinct from a lost connection so callers can branch on ``error_class``
    (``CommandNotFound``, ``DeviceNotFound``, ``GenericError``...) as QEMU reports it.
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command} failed: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class VmEventKind(enum.Enum):
    """The VM lifecycle events the sidecar acts on; QMP names, plus our terminal DISCONNECTED."""

    RESET = "RESET"
    STOP = "STOP"
    RESUME = "RESUME"
    SHUTDOWN = "SHUTDOWN"
    POWERDOWN = "POWERDOWN"
    MIGRATION = "MIGRATION"
    DISCONNECTED = "DISCONNECTED"


@dataclass(frozen=True, slots=True)
class VmEvent:
    """One lifecycle event, typed.

    Which fields are set depends on ``kind``:

    * ``RESET``, ``SHUTDOWN``: ``guest`` (did the guest ask for it) and ``reason`` (QEMU's
      ``ShutdownCause``, e.g. ``"guest-reset"``, ``"host-qmp-quit"``). SDEI state must be reset
      on every RESET: a guest reset produces no STOP/RESUME.
    * ``MIGRATION``: ``status`` (``"setup"``, ``"active"``, ``"pre-switchover"``, ...).
    * ``DISCONNECTED``: ``reason`` says why (QEMU exited, connection reset, closed by us).
      It is always the last event a subscription yields; ``timestamp`` is our clock then.

    ``timestamp`` is QEMU's event time in seconds since the epoch (host realtime clock).
    """

    kind: VmEventKind
    timestamp: float
    guest: bool | None = None
    reason: str | None = None
    status: str | None = None


class EventSubscription:
    """A FIFO of :class:`VmEvent` for one consumer, created by :meth:`QmpSession.subscribe`.

    Iterate it (``async for``) or call :meth:`get`; iteration ends after the
    ``DISCONNECTED`` event, which is always delivered. The queue is bounded: a consumer that
    leaves more than ``limit`` events unread is cut off, and its next :meth:`get` raises
    :class:`QemuError`, because silently dropping a RESET would let SDEI state outlive the guest
    that owned it. Leave the ``with`` block (or call :meth:`close`) to stop receiving.
    """

    def __init__(self, session: QmpSession, kinds: frozenset[VmEventKind] | None, limit: int) -> None:
        self._session = session
        self._kinds = kinds
        self._limit = limit
        self._queue: asyncio.Queue[VmEvent] = asyncio.Queue()
        self._overflowed = False
        self._finished = False

    def _offer(self, event: VmEvent) -> None:
        """Called by the session for every event; never blocks the session's reader."""
        terminal = event.kind is VmEventKind.DISCONNECTED
        if self._overflowed or (not terminal and self._kinds is not None and event.kind not in self._kinds):
            return
        if not terminal and self._queue.qsize() >= self._limit:
            self._overflowed = True
            while not self._queue.empty():
                self._queue.get_nowait()
            log.error("event subscriber fell behind by %d events; cutting it off", self._limit)
        self._queue.put_nowait(event)

    async def get(self, timeout: float | None = None) -> VmEvent:
        """Wait for the next event.

        :param timeout: seconds to wait; ``None`` waits as long as it takes.
        :raise TimeoutError: nothing arrived in time.
        :raise QemuError: this subscriber fell behind and was cut off.
        :raise StopAsyncIteration: the ``DISCONNECTED`` event was already returned.
        """
        if not self._overflowed:
            if self._finished:
                raise StopAsyncIteration
            async with asyncio.timeout(timeout):
                event = await self._queue.get()
        if self._overflowed:
            raise QemuError(f"VM event subscriber fell behind by more than {self._limit} events")
        if event.kind is VmEventKind.DISCONNECTED:
            self._finished = True
        return event

    async def wait_for(self, kind: VmEventKind, timeout: float) -> VmEvent:
        """Skip events until one of ``kind`` arrives, and return it.

        :raise TimeoutError: it did not arrive within ``timeout`` seconds.
        :raise QemuError: the connection ended first (unless waiting for ``DISCONNECTED``),
            or this subscriber was cut off.
        """
        async with asyncio.timeout(timeout):
            while True:
                event = await self.get()
                if event.kind is kind:
                    return event
                if event.kind is VmEventKind.DISCONNECTED:
                    raise QemuError(f"QEMU disconnected while waiting for {kind.value}: {event.reason}")

    def pending(self) -> int:
        """How many events are queued and not yet read."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop receiving events; queued ones are discarded."""
        self._session._unsubscribe(self)

    def __aiter__(self) -> AsyncIterator[VmEvent]:
        return self

    async def __anext__(self) -> VmEvent:
        return await self.get()

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _forget_history(listener: EventListener) -> None:
    """Empty qemu.qmp's private per-listener event log.

    qemu.qmp 0.0.6 appends every event a listener accepts to ``EventListener._history`` and never
    trims it, not even on ``get()``/``clear()``; the default ``events`` listener accepts
    everything and cannot be removed. Measured ~0.9 KB per event, and every gdbstub-intercepted
    guest call makes two events, so a long-lived sidecar must clear it. There is no public API
    for this in 0.0.6, hence the private attribute; the integration tests check it stays empty.
    """
    history = getattr(listener, "_history", None)
    if isinstance(history, list):
        history.clear()


def _timestamp(msg: Message) -> float:
    stamp = msg.get("timestamp")
    if isinstance(stamp, Mapping):
        seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
        if isinstance(seconds, int) and isinstance(micros, int):
            return seconds + micros / 1_000_000
    return time.time()


def _to_vm_event(msg: Message) -> VmEvent | None:
    """Translate a QMP event message; ``None`` for events the sidecar does not follow."""
    try:
        kind = VmEventKind(msg["event"])
    except (KeyError, ValueError):
        return None
    if kind is VmEventKind.DISCONNECTED:  # a QMP event of that name would be an impostor
        return None
    data = msg.get("data")
    data = data if isinstance(data, Mapping) else {}
    guest, reason, status = data.get("guest"), data.get("reason"), data.get("status")
    return VmEvent(
        kind=kind,
        timestamp=_timestamp(msg),
        guest=guest if isinstance(guest, bool) else None,
        reason=reason if isinstance(reason, str) else None,
        status=status if isinstance(status, str) else None,
    )


def _describe_address(address: QmpAddress) -> str:
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return os.fspath(address)


class QmpSession:
    """A live QMP connection to one QEMU, owned by the sidecar.

    Obtain one from :func:`attach`. It is an async context manager that always closes the
    connection. Two background tasks run while it is open: one drains qemu.qmp's event queue
    (translating, tracking the runstate, fanning out to subscribers), one watches the
    connection and, when QEMU goes away, delivers the remaining events then ``DISCONNECTED``.

    Runstate tracking: :attr:`status` starts from ``query-status`` at attach and then follows
    events. ``running`` is exact (STOP/RESUME). ``status`` is best effort between queries,
    because a STOP event does not say *why* the VM stopped (``paused``, ``debug``,
    ``finish-migrate``...); call :meth:`refresh_runstate` when the exact value matters.
    """

    def __init__(self, client: QMPClient, address: QmpAddress, command_timeout: float) -> None:
        self._client = client
        self.address = address
        self.command_timeout = command_timeout
        self._status = "unknown"
        self._running = False
        self._subscribers: list[EventSubscription] = []
        self._pump_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._finisher: asyncio.Task[None] | None = None
        self._close_requested = False
        self._disconnect_event: VmEvent | None = None
        self._disconnected = asyncio.Event()
        self.events_seen = 0
        """Every QMP event received, followed or not (a cheap health counter for benchmarks/logs)."""

    # -- lifecycle -------------------------------------------------------------------------------

    def _start(self, status: Mapping[str, object]) -> None:
        self._apply_status(status)
        name = self._client.name or "qmp"
        self._pump_task = asyncio.create_task(self._pump_events(), name=f"qmp-sdei.qmp[{name}].events")
        self._watch_task = asyncio.create_task(self._watch_connection(), name=f"qmp-sdei.qmp[{name}].watch")

    async def close(self) -> None:
        """Disconnect from QEMU (idempotent). Subscribers receive ``DISCONNECTED``.

        Never raises for the connection's own end (qemu.qmp's ``disconnect()`` re-raises
        ``EOFError`` even for a normal QEMU exit); it is recorded as the event's reason.
        """
        self._close_requested = True
        await asyncio.shield(self._ensure_finisher())

    async def __aenter__(self) -> QmpSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True until QEMU goes away or :meth:`close` is called."""
        return not self._disconnected.is_set() and self._client.runstate is Runstate.RUNNING

    @property
    def status(self) -> str:
        """QEMU's ``RunState`` name as last known (see the class docstring for how exact it is)."""
        return self._status

    @property
    def running(self) -> bool:
        """Whether the guest's vCPUs are running, per the latest STOP/RESUME/RESET/SHUTDOWN."""
        return self._running

    @property
    def greeting_version(self) -> tuple[int, int, int]:
        """QEMU's version from the QMP greeting (``(major, minor, micro)``); no round trip."""
        greeting = self._client.greeting
        assert greeting is not None  # attach() validated it
        qemu = greeting.QMP.version.get("qemu")
        if not isinstance(qemu, Mapping):
            return (0, 0, 0)
        return int(qemu.get("major", 0)), int(qemu.get("minor", 0)), int(qemu.get("micro", 0))

    async def wait_disconnected(self, timeout: float | None = None) -> VmEvent:
        """Wait until the connection is gone and return the ``DISCONNECTED`` event.

        :raise TimeoutError: still connected after ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            await self._disconnected.wait()
        assert self._disconnect_event is not None
        return self._disconnect_event

    # -- commands --------------------------------------------------------------------------------

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float | None = None
    ) -> object:
        """Run a QMP command and return its ``return`` value.

        Commands may be issued concurrently (replies are matched by id), so ``asyncio.gather``
        works and is how :mod:`qmp_sdei.qemu.facts` stays fast with many vCPUs.

        :param timeout: seconds; defaults to :attr:`command_timeout`.
        :raise QmpCommandError: QEMU answered with an error.
        :raise QemuError: not connected, the connection dropped before the reply, the reply
            was malformed, or no reply within the timeout.
        """
        limit = self.command_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await self._client.execute(command, arguments)
        except ExecuteError as err:
            raise QmpCommandError(command, err.error_class, str(err)) from err
        except ExecInterruptedError as err:
            raise QemuError(f"QMP {command}: QEMU went away before replying") from err
        except StateError as err:
            raise QemuError(f"QMP {command}: not connected to QEMU ({self._client.runstate.name})") from err
        except QMPError as err:
            raise QemuError(f"QMP {command}: {type(err).__name__}: {err}") from err
        except TimeoutError as err:
            raise QemuError(f"QMP {command}: no reply from QEMU within {limit}s") from err

    @property
    def can_pass_fds(self) -> bool:
        """True on a unix socket: only there can a file descriptor travel to QEMU (SCM_RIGHTS)."""
        return not isinstance(self.address, tuple)

    async def pass_fd(self, fd: int, name: str) -> None:
        """Give QEMU a duplicate of ``fd`` under ``name`` (``getfd``), for commands that take
        ``fd:NAME``. The caller keeps (and closes) its own ``fd``.

        :raise QemuError: not a unix socket, the descriptor could not be sent, or QEMU refused it.
        """
        if not self.can_pass_fds:
            raise QemuError(f"cannot pass a file descriptor to QEMU over {_describe_address(self.address)}")
        try:
            self._client.send_fd_scm(fd)
        except (QMPError, OSError) as err:
            raise QemuError(f"could not pass a file descriptor to QEMU: {err}") from err
        await self.execute("getfd", {"fdname": name})

    async def refresh_runstate(self) -> str:
        """Ask QEMU for the exact runstate (``query-status``), record and return it."""
        reply = await self.execute("query-status")
        if not isinstance(reply, Mapping):
            raise QemuError(f"query-status returned {reply!r}, not an object")
        self._apply_status(reply)
        return self._status

    def _apply_status(self, reply: Mapping[str, object]) -> None:
        status, running = reply.get("status"), reply.get("running")
        if not isinstance(status, str) or not isinstance(running, bool):
            raise QemuError(f"query-status returned {dict(reply)!r}, not a StatusInfo")
        self._status, self._running = status, running

    # -- events ----------------------------------------------------------------------------------

    def subscribe(
        self, kinds: Iterable[VmEventKind] | None = None, *, limit: int = DEFAULT_SUBSCRIPTION_LIMIT
    ) -> EventSubscription:
        """Start receiving lifecycle events from now on.

        :param kinds: only these kinds (``DISCONNECTED`` is always delivered); ``None`` for all.
            Filtering here keeps a consumer that only cares about RESET from buffering the STOP/
            RESUME pair every intercepted guest call produces.
        :param limit: undelivered events tolerated before the subscriber is cut off.
        """
        subscription = EventSubscription(self, None if kinds is None else frozenset(kinds), limit)
        if self._disconnect_event is not None:
            subscription._offer(self._disconnect_event)
        else:
            self._subscribers.append(subscription)
        return subscription

    def _unsubscribe(self, subscription: EventSubscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(subscription)

    def _publish(self, event: VmEvent) -> None:
        for subscriber in tuple(self._subscribers):
            subscriber._offer(event)

    def _handle(self, msg: Message) -> None:
        """Translate one QMP event, update the runstate, fan out. Synchronous on purpose: the
        pump can be cancelled between events without losing one (asyncio.Queue.get does not
        remove an item from the queue when the waiting task is cancelled)."""
        self.events_seen += 1
        event = _to_vm_event(msg)
        if event is None:
            return
        self._track_runstate(event)
        self._publish(event)

    def _track_runstate(self, event: VmEvent) -> None:
        # STOP/RESUME are only emitted on a real running<->stopped transition, so one that
        # does not change ``running`` predates our query-status reply and is ignored.
        if event.kind is VmEventKind.RESUME and not self._running:
            self._running, self._status = True, "running"
        elif event.kind is VmEventKind.STOP and self._running:
            self._running, self._status = False, "paused"
        elif event.kind is VmEventKind.SHUTDOWN:
            self._running, self._status = False, "shutdown"
        elif event.kind is VmEventKind.RESET and not self._running:
            self._status = "prelaunch"  # verified on 7.2: system_reset while paused -> prelaunch

    async def _pump_events(self) -> None:
        listener = self._client.events
        while True:
            msg = await listener.get()
            _forget_history(listener)
            self._handle(msg)

    async def _watch_connection(self) -> None:
        while self._client.runstate is Runstate.RUNNING:
            await self._client.runstate_changed()
        await asyncio.shield(self._ensure_finisher())

    def _ensure_finisher(self) -> asyncio.Task[None]:
        if self._finisher is None:
            name = self._client.name or "qmp"
            self._finisher = asyncio.create_task(self._finish(), name=f"qmp-sdei.qmp[{name}].finish")
        return self._finisher

    async def _finish(self) -> None:
        """The one place that calls ``QMPClient.disconnect()``.

        qemu.qmp's ``disconnect()`` must not run twice concurrently (the second caller trips an
        assertion in its cleanup), and the watcher and :meth:`close` can both want it.
        """
        peer_gone = self._client.runstate is not Runstate.RUNNING and not self._close_requested
        reason = "closed by the sidecar"
        try:
            await self._client.disconnect()
        except EOFError:
            reason = "QEMU closed the QMP connection (exited or quit)"
        except OSError as err:
            reason = f"QMP connection lost: {err.strerror or err}"
        except Exception as err:
            reason = f"QMP session failed: {type(err).__name__}: {err}"
        else:
            if peer_gone:
                reason = "QEMU closed the QMP connection"
        tasks = [t for t in (self._pump_task, self._watch_task) if t is not None and t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        # Events the reader queued before EOF (SHUTDOWN before a quit, say) come first.
        for msg in self._client.events.clear():
            self._handle(msg)
        _forget_history(self._client.events)
        self._running = False
        self._disconnect_event = VmEvent(VmEventKind.DISCONNECTED, time.time(), reason=reason)
        log.info("QMP %s: %s", _describe_address(self.address), reason)
        self._publish(self._disconnect_event)
        self._subscribers.clear()
        self._disconnected.set()


# -- attaching ----------------------------------------------------------------------------------


def _socket_identity(path: Path) -> tuple[int, int] | None:
    with contextlib.suppress(OSError):
        info = path.lstat()
        if stat.S_ISSOCK(info.st_mode):
            return info.st_dev, info.st_ino
    return None


def _unlink_socket(path: Path, identity: tuple[int, int] | None) -> None:
    """Remove our listening socket file, unless it is gone or is someone else's by now."""
    if identity is not None and _socket_identity(path) == identity:
        with contextlib.suppress(OSError):
            path.unlink()


_RETRYABLE: Final = frozenset({errno.ENOENT, errno.ECONNREFUSED})


async def open_tcp_socket(host: str, port: int) -> socket.socket:
    """One connection attempt to each address ``host`` resolves to, in order; the first that
    connects, as a non-blocking socket. :raise OSError: the last attempt's error."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError = OSError(errno.EADDRNOTAVAIL, f"no address for {host}")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, sockaddr)
        except OSError as err:
            sock.close()
            last = err
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last


async def _open_transport(address: QmpAddress) -> socket.socket:
    """One connection attempt; returns a connected non-blocking socket or raises ``OSError``."""
    if isinstance(address, tuple):
        return await open_tcp_socket(*address)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, os.fspath(address))
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect_with_retry(address: QmpAddress, where: str, deadline_hint: float) -> socket.socket:
    """Retry until connected; the caller's ``asyncio.timeout`` bounds it.

    Polling with a short backoff is deliberate: nothing signals "QEMU now listens" (the socket
    file even appears before ``listen()``), and attach latency matters more than a few wakeups.
    """
    delay = _RETRY_FIRST
    last_errno: int | None = None
    while True:
        try:
            return await _open_transport(address)
        except OSError as err:
            if err.errno not in _RETRYABLE:
                raise QemuError(f"cannot connect to QMP at {where}: {err.strerror or err}") from err
            if err.errno != last_errno:
                log.debug("QMP %s: %s; retrying for up to %.1fs", where, err.strerror, deadline_hint)
                last_errno = err.errno
        await asyncio.sleep(delay)
        delay = min(delay * 2, _RETRY_MAX)


def _one_line(text: str, limit: int = 160) -> str:
    """Collapse a peer-influenced message (it may quote raw bytes) to one short line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _session_error(where: str, err: ConnectError) -> QemuError:
    cause = err.exc
    if isinstance(cause, GreetingError):
        detail = _one_line(f"{type(cause.exc).__name__}: {cause.exc}")
        return QemuError(f"{where} is not a QEMU monitor: did not understand its greeting ({detail})")
    if isinstance(cause, NegotiationError):
        detail = _one_line(f"{type(cause.exc).__name__}: {cause.exc}")
        return QemuError(f"{where} is not a QEMU monitor: capabilities negotiation failed ({detail})")
    if isinstance(cause, EOFError):
        return QemuError(f"{where} closed the connection before completing the QMP handshake")
    if isinstance(cause, OSError):
        return QemuError(f"QMP handshake with {where} failed: {cause.strerror or cause}")
    return QemuError(f"QMP handshake with {where} failed: {cause}")


class _Attempt:
    """Where an attach attempt got to, so a timeout can say what QEMU failed to do."""

    def __init__(self, address: QmpAddress, listen: bool) -> None:
        self.address = address
        self.where = _describe_address(address)
        self.listen = listen
        self.phase = "accept" if listen else "connect"
        self.listen_path = None if (not listen or isinstance(address, tuple)) else Path(os.fspath(address))
        self.listen_identity: tuple[int, int] | None = None

    async def run(self, client: QMPClient, timeout: float) -> object:
        """Connect or accept, handshake, and return the ``query-status`` reply."""
        if self.listen:
            target = self.address if isinstance(self.address, tuple) else os.fspath(self.address)
            try:
                await client.start_server(target)
            except ConnectError as err:
                cause = err.exc
                detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
                raise QemuError(f"cannot listen for QEMU on {self.where}: {detail}") from err
            if self.listen_path is not None:
                self.listen_identity = _socket_identity(self.listen_path)
            await client.accept()
            # qemu.qmp stops listening after one peer; the file would only invite ECONNREFUSED.
            self.remove_listen_socket()
        else:
            sock = await _connect_with_retry(self.address, self.where, timeout)
            self.phase = "greeting"
            try:
                await client.connect(sock)
            except BaseException:
                sock.close()
                raise
        self.phase = "query-status"
        return await client.execute("query-status")

    def remove_listen_socket(self) -> None:
        if self.listen_path is not None:
            _unlink_socket(self.listen_path, self.listen_identity)
            self.listen_identity = None

    def error(self, err: BaseException, timeout: float) -> QemuError | None:
        """The :class:`QemuError` to raise for ``err``; ``None`` to re-raise ``err`` as is."""
        if isinstance(err, QemuError | asyncio.CancelledError) or not isinstance(err, Exception):
            return None
        if isinstance(err, TimeoutError):
            return QemuError(_timeout_message(self.where, self.phase, timeout))
        if isinstance(err, ConnectError):
            return _session_error(self.where, err)
        if isinstance(err, ExecuteError):
            return QemuError(
                f"{self.where} speaks QMP but is not a QEMU system emulator (query-status: {err.error_class})"
            )
        return QemuError(f"QMP attach to {self.where} failed during {self.phase}: {_one_line(str(err))}")


class _QuietQMPClient(QMPClient):
    """qemu.qmp formats every message for a debug log line even when nobody logs debug.

    With the gdbstub conduit every trapped guest call brings a STOP and a RESUME event, and that
    eager ``str(msg)`` (a JSON dump each) was a measurable share of the sidecar's time per call.
    """

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_inbound(msg)
        return msg

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_outbound(msg)
        return msg


async def attach(
    address: QmpAddress,
    *,
    listen: bool,
    timeout: float,
    name: str | None = None,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
) -> QmpSession:
    """Attach to QEMU's control monitor and return a running :class:`QmpSession`.

    :param address: unix socket path, or ``(host, port)``.
    :param listen: ``False``: connect to QEMU's server socket, waiting for it to exist and
        accept (QEMU may start after the sidecar). ``True``: listen on ``address`` and accept
        the one connection QEMU makes (``-chardev socket,...,reconnect=N``); the socket file
        is removed once QEMU is accepted (nothing else may connect) or attaching fails.
    :param timeout: seconds for the whole attach: connect or accept, greeting, negotiation and
        the initial ``query-status``. QEMU's monitor serves one client at a time and a second
        one gets no greeting, so this bound is what turns "monitor taken" into an error.
    :param name: label for logs and task names.
    :param command_timeout: default per-command timeout of the session.
    :raise QemuError: nothing to attach to within ``timeout``, or the peer is not a QEMU
        system emulator (one-line message naming the address).
    """
    attempt = _Attempt(address, listen)
    client: QMPClient | None = None
    try:
        async with asyncio.timeout(timeout):
            client, status = await _handshake(attempt, name or f"qmp-sdei:{attempt.where}", timeout)
        session = QmpSession(client, address, command_timeout)
        if not isinstance(status, Mapping):
            raise QemuError(f"{attempt.where} answered query-status with {status!r}: not QEMU")
        session._start(status)
    except BaseException as err:
        if client is not None:
            await _drop(client)
        attempt.remove_listen_socket()
        mapped = attempt.error(err, timeout)
        if mapped is None:
            raise
        raise mapped from err
    log.info("QMP attached to %s (QEMU %d.%d.%d)", attempt.where, *session.greeting_version)
    return session


#: How often a connect meeting a message before QEMU's greeting is tried (see _stale_before_greeting).
_STALE_GREETING_TRIES: Final = 3


async def _handshake(attempt: _Attempt, name: str, timeout: float) -> tuple[QMPClient, object]:
    """A client through the handshake and its ``query-status`` reply (see :meth:`_Attempt.run`);
    connecting again when a stale message came where the greeting should be. A client that
    failed is dropped."""
    tries = 0
    while True:
        tries += 1
        client = _QuietQMPClient(name)
        try:
            return client, await attempt.run(client, timeout)
        except ConnectError as err:
            await _drop(client)
            if attempt.listen or tries >= _STALE_GREETING_TRIES or not _stale_before_greeting(err):
                raise
            log.debug("QMP %s sent a message before its greeting; connecting again", attempt.where)
        except BaseException:
            await _drop(client)
            raise


def _stale_before_greeting(err: ConnectError) -> bool:
    """Whether the handshake failed on a QMP message where the greeting should be.

    QEMU's monitor serves one client at a time. An event or reply meant for the client before us
    can reach us ahead of our greeting when we connect right after that client left (seen with
    QEMU 10.0, a sidecar restarted at once against the same VM). Such a message is a JSON object
    without the greeting's ``QMP`` member; a peer that is not QMP at all fails differently.
    """
    return isinstance(err.exc, GreetingError) and isinstance(err.exc.exc, KeyError)


def _timeout_message(where: str, phase: str, timeout: float) -> str:
    if phase == "connect":
        return f"no QMP socket accepting connections at {where} within {timeout}s"
    if phase == "accept":
        return f"QEMU did not connect to {where} within {timeout}s"
    if phase == "greeting":
        return f"no QMP greeting from {where} within {timeout}s: not QEMU, or its monitor already serves another client"
    return f"QEMU at {where} did not answer {phase} within {timeout}s"


async def _drop(client: QMPClient) -> None:
    """Disconnect a client we are abandoning; its own end-of-session exception is irrelevant."""
    if client.runstate is Runstate.IDLE:
        return
    with contextlib.suppress(Exception):
        await client.disconnect()


# -- gdbstub ------------------------------------------------------------------------------------

_GDB_CHARDEV_LABEL: Final = "gdb"
_TCP_FILENAME = re.compile(r"(?:^|:)tcp:(?P<host>\[[^\]]+\]|[^:,]+):(?P<port>\d+)")
_SAFE_DEVICE = re.compile(r"tcp:[A-Za-z0-9.\-\[\]:]*:\d{1,5}")


async def gdbstub_address(session: QmpSession) -> tuple[str, int] | None:
    """Where QEMU's gdbstub listens, or ``None`` if it has none.

    Found through ``query-chardev``: both ``-gdb`` and the ``gdbserver`` monitor command create
    a chardev labelled ``gdb`` whose filename carries the *bound* port (so port 0 works).

    :raise QemuError: the stub exists but does not listen on TCP (e.g. ``-gdb unix:...``).
    """
    chardevs = await session.execute("query-chardev")
    if not isinstance(chardevs, list):
        raise QemuError(f"query-chardev returned {chardevs!r}, not a list")
    for chardev in chardevs:
        if isinstance(chardev, Mapping) and chardev.get("label") == _GDB_CHARDEV_LABEL:
            filename = str(chardev.get("filename", ""))
            match = _TCP_FILENAME.search(filename)
            if match is None:
                raise QemuError(f"QEMU's gdbstub is not on TCP ({filename}); the conduit needs TCP")
            return match["host"].strip("[]"), int(match["port"])
    return None


async def start_gdbstub(session: QmpSession, address: str = "tcp:127.0.0.1:0") -> tuple[str, int]:
    """Start QEMU's gdbstub at run time, for a QEMU started without ``-gdb``.

    Uses the HMP ``gdbserver`` command (through ``human-monitor-command``; QMP has no
    equivalent in 7.2). HMP reports failure only as text, and QEMU 7.2 cannot start a second
    stub while one exists ("duplicate yank instance"), so this checks first and verifies after.

    :param address: ``tcp:HOST:PORT``; port 0 picks a free port.
    :return: ``(host, port)`` the stub actually listens on.
    :raise QemuError: the address is malformed, a stub is already running (the message says
        where; use :func:`gdbstub_address` to reuse it), or QEMU could not open it.
    """
    if _SAFE_DEVICE.fullmatch(address) is None:
        raise QemuError(f"gdbstub address must look like tcp:HOST:PORT, not {address!r}")
    existing = await gdbstub_address(session)
    if existing is not None:
        raise QemuError(f"QEMU's gdbstub is already running on {existing[0]}:{existing[1]}")
    output = await session.execute("human-monitor-command", {"command-line": f"gdbserver {address}"})
    text = output.strip() if isinstance(output, str) else repr(output)
    if not text.startswith("Waiting for gdb connection"):
        raise QemuError(f"QEMU could not start its gdbstub on {address}: {' '.join(text.split())}")
    started = await gdbstub_address(session)
    if started is None:
        raise QemuError(f"QEMU said it started a gdbstub on {address} but lists no gdb chardev")
    return started
