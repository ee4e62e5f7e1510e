"""The ``org.qemu.VMState1`` service: the sidecar's state rides inside QEMU's own migration stream.

QEMU's ``dbus-vmstate`` object (added with :func:`qmp_sdei.qemu.migration.add_dbus_vmstate`) asks
every owner of the well-known name ``org.qemu.VMState1`` on its bus for a blob at save time and
hands each blob back, byte for byte, to the owner with the same ``Id`` on the destination's bus.
:class:`VmstateService` is that owner for the sidecar:

* object ``/org/qemu/VMState1``, interface ``org.qemu.VMState1``;
* property ``Id`` (``s``, 1..255 bytes, default ``"sdei"``): must match the ``id-list`` given to
  QEMU's object, so a missing service fails the migration instead of silently dropping state;
* ``Save() -> ay``: on the source, in the migration's device phase (guest stopped, QEMU's big lock
  held, so every millisecond is downtime); answers ``save()``;
* ``Load(ay)``: on the destination, after the device state arrived; calls ``load(blob)``. If that
  raises, the D-Bus method returns an error and QEMU fails the incoming migration (the destination
  QEMU exits; with ``return-path`` the source resumes).

The name is requested *with queuing*, so several helpers with different Ids can share one bus, as
QEMU expects.

The callbacks may be plain functions or coroutine functions. ``save`` must return the whole state
(at most :data:`MAX_STATE_BYTES`, QEMU's per-helper limit); ``load`` must validate the whole blob
and change nothing when it refuses it (``Dispatcher.restore`` behaves so), raising a
:class:`~qmp_sdei.errors.SdeiError` (normally ``IncompatibleState``) with a message for the log.

What it must not do: know what the bytes mean, touch QEMU, or swallow a failure: every refused
``Load`` and failed ``Save`` is logged here and returned to QEMU as a D-Bus error.
"""

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from dbus_fast import BusType, DBusError, NameFlag, PropertyAccess, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBytes, DBusStr
from dbus_fast.errors import DBusFastError
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from qmp_sdei.errors import SdeiError, VmstateError

__all__ = [
    "DEFAULT_ID",
    "ERROR_LOAD_REFUSED",
    "ERROR_SAVE_FAILED",
    "INTERFACE",
    "MAX_STATE_BYTES",
    "OBJECT_PATH",
    "LoadFn",
    "SaveFn",
    "VmstateService",
    "VmstateStats",
]

log = logging.getLogger(__name__)

INTERFACE: Final = "org.qemu.VMState1"
OBJECT_PATH: Final = "/org/qemu/VMState1"
BUS_NAME: Final = INTERFACE  # QEMU lists the queued owners of this well-known name
DEFAULT_ID: Final = "sdei"
MAX_STATE_BYTES: Final = 1024 * 1024  # QEMU's dbus-vmstate refuses more per helper
ERROR_LOAD_REFUSED: Final = "org.qmp_sdei.VMState.LoadRefused"
ERROR_SAVE_FAILED: Final = "org.qmp_sdei.VMState.SaveFailed"

SaveFn = Callable[[], bytes | Awaitable[bytes]]
LoadFn = Callable[[bytes], Awaitable[None] | None]


@dataclass
class VmstateStats:
    """What the service did, for status output, logs and benchmarks."""

    saves: int = 0
    loads: int = 0
    refused_loads: int = 0
    failed_saves: int = 0
    last_save_bytes: int = 0
    last_load_bytes: int = 0
    last_save_ms: float = 0.0  # time in the save callback (the bus round trips come on top)
    last_load_ms: float = 0.0
    last_error: str | None = None


def _check_id(state_id: str) -> str:
    encoded = state_id.encode()
    if not 1 <= len(encoded) <= 255:
        raise VmstateError(f"VMState Id must be 1..255 bytes, got {len(encoded)}: {state_id!r}")
    if "," in state_id:
        raise VmstateError(f"VMState Id {state_id!r} contains a comma (QEMU's id-list separator)")
    return state_id


class _VMState1(ServiceInterface):
    """The D-Bus face; all logic is in :class:`VmstateService`.

    The module does not use postponed annotations: dbus-fast reads these at class creation, and
    it takes a postponed ``-> None`` for a D-Bus signature.
    """

    def __init__(self, owner: "VmstateService") -> None:
        super().__init__(INTERFACE)
        self._owner = owner

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:  # noqa: N802 (D-Bus member names are QEMU's)
        return self._owner.state_id

    @dbus_method()
    async def Save(self) -> DBusBytes:  # noqa: N802
        return await self._owner._save()

    @dbus_method()
    async def Load(self, data: DBusBytes) -> None:  # noqa: N802
        await self._owner._load(bytes(data))


class VmstateService:
    """Serve one ``Id`` of ``org.qemu.VMState1`` on a bus, backed by ``save``/``load`` callbacks.

    Use as ``async with VmstateService(address, save=..., load=...)``: entering connects, exports
    the object and claims the name; leaving disconnects (QEMU then no longer finds this Id).

    :param address: the bus address (from :class:`~qmp_sdei.vmstate.bus.PrivateBus`); ``None``
        uses the session bus.
    :param save: returns the state to send (bytes, or an awaitable of bytes).
    :param load: installs a received state, or raises to refuse it (changing nothing).
    :param state_id: the ``Id`` QEMU matches between source and destination.
    """

    def __init__(
        self, address: str | None, *, save: SaveFn, load: LoadFn, state_id: str = DEFAULT_ID, timeout: float = 10.0
    ) -> None:
        self.address = address
        self.state_id = _check_id(state_id)
        self.timeout = timeout
        self.stats = VmstateStats()
        self._save_fn = save
        self._load_fn = load
        self._bus: MessageBus | None = None
        self._interface = _VMState1(self)

    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.connected

    @property
    def unique_name(self) -> str | None:
        """This service's connection name on the bus (``:1.N``) while started; for logs and tools."""
        return self._bus.unique_name if self._bus is not None else None

    async def start(self) -> None:
        """Connect, export ``/org/qemu/VMState1`` and queue for the name ``org.qemu.VMState1``.

        :raise VmstateError: the bus cannot be reached or refuses the name.
        """
        if self._bus is not None:
            raise VmstateError("this VMState1 service was already started")
        bus = MessageBus(bus_address=self.address, bus_type=BusType.SESSION, auth_timeout=self.timeout)
        try:
            await bus.connect()
        except (OSError, DBusFastError, TimeoutError) as err:
            raise VmstateError(f"cannot connect to the vmstate bus {self.address}: {err}") from err
        try:
            bus.export(OBJECT_PATH, self._interface)
            reply = await bus.request_name(BUS_NAME, NameFlag.NONE)
        except (OSError, DBusFastError) as err:
            bus.disconnect()
            raise VmstateError(f"cannot claim {BUS_NAME} on {self.address}: {err}") from err
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.IN_QUEUE):
            bus.disconnect()
            raise VmstateError(f"the bus answered {reply.name} when queuing for {BUS_NAME}")
        self._bus = bus
        log.info("serving %s Id %r on %s as %s", INTERFACE, self.state_id, self.address, bus.unique_name)

    async def close(self) -> None:
        """Leave the bus (idempotent)."""
        bus, self._bus = self._bus, None
        if bus is None:
            return
        if bus.connected:
            # Released explicitly (not only by hanging up) so that when close() returns, the bus
            # daemon has already dropped us from the queue QEMU will look at.
            try:
                await asyncio.wait_for(bus.release_name(BUS_NAME), self.timeout)
            except (OSError, DBusFastError, TimeoutError) as err:
                log.warning("could not release %s before leaving the bus: %s", BUS_NAME, err)
            bus.disconnect()
        with contextlib.suppress(Exception):  # it re-raises what broke the connection; we are leaving
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    async def wait_closed(self) -> None:
        """Return when the connection to the bus is gone (the bus daemon died, or :meth:`close`)."""
        if self._bus is not None:
            try:
                await self._bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
            except Exception as err:
                log.warning("lost the vmstate bus %s: %s", self.address, err)

    async def __aenter__(self) -> "VmstateService":
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the two calls QEMU makes -----------------------------------------------------------------

    async def _save(self) -> bytes:
        started = time.perf_counter()
        try:
            result = self._save_fn()
            blob = await result if inspect.isawaitable(result) else result
            if not isinstance(blob, bytes | bytearray):
                raise VmstateError(f"save callback returned {type(blob).__name__}, not bytes")
            if len(blob) > MAX_STATE_BYTES:
                raise VmstateError(f"state is {len(blob)} bytes; QEMU's dbus-vmstate carries at most {MAX_STATE_BYTES}")
        except Exception as err:
            self.stats.failed_saves += 1
            self.stats.last_error = f"Save failed: {err}"
            log.error("VMState Save for Id %r failed, the migration will fail: %s", self.state_id, err)
            raise DBusError(ERROR_SAVE_FAILED, str(err)) from err
        self.stats.saves += 1
        self.stats.last_save_bytes = len(blob)
        self.stats.last_save_ms = (time.perf_counter() - started) * 1e3
        log.info("VMState Save: %d bytes in %.2f ms", len(blob), self.stats.last_save_ms)
        return bytes(blob)

    async def _load(self, blob: bytes) -> None:
        started = time.perf_counter()
        try:
            result = self._load_fn(blob)
            if inspect.isawaitable(result):
                await result
        except SdeiError as err:
            self.stats.refused_loads += 1
            self.stats.last_error = f"Load refused: {err}"
            log.error("VMState Load of %d bytes refused, the migration will fail: %s", len(blob), err)
            raise DBusError(ERROR_LOAD_REFUSED, str(err)) from err
        except Exception as err:
            self.stats.refused_loads += 1
            self.stats.last_error = f"Load failed: {type(err).__name__}: {err}"
            log.exception("VMState Load of %d bytes failed unexpectedly", len(blob))
            raise DBusError(ERROR_LOAD_REFUSED, f"{type(err).__name__}: {err}") from err
        self.stats.loads += 1
        self.stats.last_load_bytes = len(blob)
        self.stats.last_load_ms = (time.perf_counter() - started) * 1e3
        log.info("VMState Load: %d bytes in %.2f ms", len(blob), self.stats.last_load_ms)
