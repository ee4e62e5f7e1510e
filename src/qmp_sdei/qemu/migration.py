"""QMP for live migration, as the sidecar needs it: capabilities, the dbus-vmstate object, driving
and following a migration on either side.

* :func:`prepare_source` / :func:`prepare_destination` set the capabilities the in-band protocol
  relies on: ``events`` (MIGRATION events, per side), ``pause-before-switchover`` (source: a safe
  point before the device phase) and ``return-path`` (both sides: a destination that refuses the
  state fails the migration on the source too, which then resumes the guest, instead of leaving it
  running nowhere).
* :func:`add_dbus_vmstate` adds QEMU's ``dbus-vmstate`` object at run time (``object-add``; works
  on a running or ``-S`` QEMU and on a ``-incoming defer`` destination before
  ``migrate-incoming``), always with an ``id-list`` so a missing helper is an error, not a silent
  loss of state.
* :func:`migrate`, :func:`migrate_incoming`, :func:`migrate_continue`, :func:`migrate_cancel`,
  :func:`query_migrate` are the commands; :func:`wait_for_migration` follows MIGRATION events on a
  subscription; :func:`run_source_migration` strings them together for a whole source-side
  migration with an optional hook at the pre-switchover pause.

What it must not do: know about SDEI or D-Bus (it passes a bus address to QEMU, nothing more),
or decide policy (whether to cancel, when to resume a failed source): callers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from qmp_sdei.errors import MigrationError, QemuError
from qmp_sdei.qemu.qmp import EventSubscription, QmpCommandError, QmpSession, VmEventKind, open_tcp_socket

__all__ = [
    "DBUS_VMSTATE_TYPE",
    "DEFAULT_VMSTATE_OBJECT",
    "FINAL_STATUSES",
    "MigrationInfo",
    "add_dbus_vmstate",
    "completed_info",
    "connect_nodelay",
    "dbus_vmstate_objects",
    "has_dbus_vmstate",
    "migrate",
    "migrate_cancel",
    "migrate_continue",
    "migrate_incoming",
    "plain_tcp_target",
    "prepare_destination",
    "prepare_source",
    "query_migrate",
    "remove_dbus_vmstate",
    "run_source_migration",
    "set_capabilities",
    "wait_for_migration",
    "wait_for_migration_end",
]

log = logging.getLogger(__name__)

DBUS_VMSTATE_TYPE: Final = "dbus-vmstate"
DEFAULT_VMSTATE_OBJECT: Final = "qmp-sdei-vmstate"
FINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})
PRE_SWITCHOVER: Final = "pre-switchover"


@dataclass(frozen=True)
class MigrationInfo:
    """The part of ``query-migrate`` the sidecar uses (times in milliseconds, as QEMU reports)."""

    status: str  # "none" before any migration
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    error: str | None = None  # QEMU's error-desc
    raw: Mapping[str, object] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_reply(cls, reply: object) -> MigrationInfo:
        if not isinstance(reply, Mapping):
            raise QemuError(f"query-migrate returned {reply!r}, not a MigrationInfo")

        def number(key: str) -> int | None:
            value = reply.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        status, error = reply.get("status", "none"), reply.get("error-desc")
        return cls(
            status=status if isinstance(status, str) else "none",
            total_time_ms=number("total-time"),
            downtime_ms=number("downtime"),
            setup_time_ms=number("setup-time"),
            error=error if isinstance(error, str) else None,
            raw=dict(reply),
        )


# -- commands --------------------------------------------------------------------------------------


async def set_capabilities(session: QmpSession, capabilities: Mapping[str, bool]) -> None:
    """``migrate-set-capabilities`` (QEMU refuses it while a migration runs)."""
    await session.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": name, "state": state} for name, state in capabilities.items()]},
    )


async def prepare_source(
    session: QmpSession, *, pause_before_switchover: bool = True, return_path: bool = True
) -> None:
    """Capabilities of a source: MIGRATION events, the pre-switchover pause, the return path."""
    await set_capabilities(
        session,
        {"events": True, "pause-before-switchover": pause_before_switchover, "return-path": return_path},
    )


async def prepare_destination(session: QmpSession, *, return_path: bool = True) -> None:
    """Capabilities of a destination. ``return-path`` must match the source's."""
    await set_capabilities(session, {"events": True, "return-path": return_path})


#: the name under which the socket of a ``tcp_nodelay`` migration is handed to QEMU (``getfd``)
MIGRATION_FD_NAME: Final = "qmp-sdei-migration"

#: statuses in which QEMU refuses a new ``migrate`` (checked before connecting to a destination)
BUSY_STATUSES: Final = frozenset(
    {"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug", "postcopy-active",
     "postcopy-paused", "postcopy-recover"}
)  # fmt: skip


async def migrate(session: QmpSession, uri: str, *, tcp_nodelay: bool = False, connect_timeout: float = 10.0) -> str:
    """Start migrating to ``uri`` (``tcp:HOST:PORT``, ``unix:PATH``...); returns at once, saying
    which connection carries the stream: ``"tcp-nodelay"`` (ours, see below) or ``"qemu"``.

    ``tcp_nodelay``: for a plain ``tcp:HOST:PORT``, connect to the destination here, with
    ``TCP_NODELAY``, and hand QEMU that socket (``getfd``, ``migrate fd:``). QEMU leaves Nagle's
    algorithm on for its own connection, and with the return path on, the stream's last small
    write then waits for the destination's delayed acknowledgement: about 40 ms of downtime on
    loopback in QEMU 7.2 and 10, which the sidecar's migrations would otherwise always pay. Falls
    back to the URI as given where a socket cannot be handed over (QMP over TCP) or QEMU needs the
    address itself (``multifd``, TLS, URI options), and when a migration already runs (QEMU refuses
    it before it would touch the destination).

    :raise MigrationError: the destination could not be reached (nothing was started).
    :raise QemuError: QEMU refused the command.
    """
    target = plain_tcp_target(uri) if tcp_nodelay else None
    if target is None or not session.can_pass_fds or (why := await _needs_qemu_to_connect(session)) is not None:
        if target is not None:
            log.debug("migrating to %s over QEMU's own connection (%s)", uri, why or "QMP is not a unix socket")
        await session.execute("migrate", {"uri": uri})
        return "qemu"
    sock = await connect_nodelay(*target, connect_timeout)
    try:
        await session.pass_fd(sock.fileno(), MIGRATION_FD_NAME)
    finally:
        sock.close()  # QEMU holds its own duplicate now
    try:
        await session.execute("migrate", {"uri": f"fd:{MIGRATION_FD_NAME}"})
    except QemuError:
        with contextlib.suppress(QemuError):
            await session.execute("closefd", {"fdname": MIGRATION_FD_NAME})
        raise
    log.debug("migrating to %s over a connection without Nagle's delay", uri)
    return "tcp-nodelay"


def plain_tcp_target(uri: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``tcp:HOST:PORT`` or ``tcp:[V6]:PORT`` without options, else None."""
    if not uri.startswith("tcp:") or "," in uri:
        return None
    host, sep, port = uri.removeprefix("tcp:").rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


async def _needs_qemu_to_connect(session: QmpSession) -> str | None:
    """Why the migration must use QEMU's own connection, or None."""
    status, capabilities, parameters = await asyncio.gather(
        session.execute("query-migrate"),
        session.execute("query-migrate-capabilities"),
        session.execute("query-migrate-parameters"),
    )
    if isinstance(status, dict) and status.get("status") in BUSY_STATUSES:
        return f"a migration is {status['status']}"
    enabled = set()
    if isinstance(capabilities, list):
        enabled = {c.get("capability") for c in capabilities if isinstance(c, dict) and c.get("state")}
    if "multifd" in enabled:
        return "multifd opens its own connections"
    if isinstance(parameters, dict) and parameters.get("tls-creds"):
        return "TLS checks the destination's host name"
    return None


async def connect_nodelay(host: str, port: int, timeout: float) -> socket.socket:
    """A blocking TCP socket connected to the destination, with ``TCP_NODELAY``.

    :raise MigrationError: no connection (refused, unresolvable, or not within ``timeout``).
    """
    try:
        async with asyncio.timeout(timeout):
            sock = await open_tcp_socket(host, port)
    except TimeoutError:
        problem = f"no connection within {timeout}s"
    except OSError as err:
        problem = str(err)
    else:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(True)  # QEMU's migration thread writes it blocking
        except BaseException:
            sock.close()
            raise
        return sock
    raise MigrationError(f"cannot connect to the migration destination {host}:{port}: {problem}")


async def migrate_incoming(session: QmpSession, uri: str) -> None:
    """Start listening for the incoming migration on a ``-incoming defer`` destination."""
    await session.execute("migrate-incoming", {"uri": uri})


async def migrate_continue(session: QmpSession) -> None:
    """Leave the pre-switchover pause: QEMU sends the device state (dbus-vmstate's Save runs now)."""
    await session.execute("migrate-continue", {"state": PRE_SWITCHOVER})


async def migrate_cancel(session: QmpSession) -> None:
    """Cancel the outgoing migration; the source resumes if it was running (MIGRATION cancelled)."""
    await session.execute("migrate_cancel")  # QEMU's name for it has an underscore


async def wait_left_finish_migrate(session: QmpSession, resumes: EventSubscription, timeout: float) -> bool:
    """Whether the VM has left ``finish-migrate`` (the switchover's stop), waiting up to ``timeout``.

    ``resumes`` must have been subscribed (RESUME) before whatever is to resume the VM was asked to.
    Why it matters: QEMU 8.1 and later give a cancelled or failed migration's VM back the runstate it
    had when the switchover stopped it, and abort on ``finish-migrate`` -> ``debug`` (a VM stopped at
    a gdbstub breakpoint); a VM that runs again first is left alone.
    """
    if await session.refresh_runstate() != "finish-migrate":
        return True
    try:
        async with asyncio.timeout(timeout):
            while True:
                event = await resumes.get()
                if event.kind is VmEventKind.DISCONNECTED:
                    return False
                if event.kind is VmEventKind.RESUME:
                    return True
    except TimeoutError:
        return await session.refresh_runstate() != "finish-migrate"


async def query_migrate(session: QmpSession) -> MigrationInfo:
    return MigrationInfo.from_reply(await session.execute("query-migrate"))


# -- the dbus-vmstate object ------------------------------------------------------------------------


async def has_dbus_vmstate(session: QmpSession) -> bool:
    """Does this QEMU build have the ``dbus-vmstate`` object type (``qom-list-types``)?

    A QEMU built without D-Bus support (``--disable-dbus`` or no gio) lacks it: the SDEI state
    must then travel beside the migration stream (the control transport).
    """
    reply = await session.execute("qom-list-types", {"abstract": False})
    if not isinstance(reply, list):
        raise QemuError(f"qom-list-types returned {reply!r}, not a list")
    return any(isinstance(entry, Mapping) and entry.get("name") == DBUS_VMSTATE_TYPE for entry in reply)


async def dbus_vmstate_objects(session: QmpSession) -> list[str]:
    """Ids of the ``dbus-vmstate`` objects this QEMU has (QEMU allows at most one)."""
    reply = await session.execute("qom-list", {"path": "/objects"})
    if not isinstance(reply, list):
        raise QemuError(f"qom-list /objects returned {reply!r}, not a list")
    return [
        str(entry.get("name"))
        for entry in reply
        if isinstance(entry, Mapping) and entry.get("type") == f"child<{DBUS_VMSTATE_TYPE}>"
    ]


async def add_dbus_vmstate(
    session: QmpSession,
    address: str,
    *,
    id_list: Iterable[str] = ("sdei",),
    object_id: str = DEFAULT_VMSTATE_OBJECT,
) -> None:
    """Add QEMU's ``dbus-vmstate`` object so the next migration carries the helpers' states.

    The object connects to ``address`` at once, so the bus must be up. An object we added earlier
    (same ``object_id``, say before a sidecar restart whose bus has a new address) is replaced.

    :param id_list: the helper Ids QEMU must find on the bus, on both sides; never empty, because
        without it a missing helper silently migrates no state.
    :raise MigrationError: another ``dbus-vmstate`` object exists (QEMU allows only one), or QEMU
        refused the object (bus unreachable, no dbus-vmstate support in this build).
    """
    ids = list(id_list)
    if not ids or any(not i or "," in i for i in ids):
        raise MigrationError(f"id-list must name at least one helper Id without commas, got {ids!r}")
    existing = await dbus_vmstate_objects(session)
    foreign = [name for name in existing if name != object_id]
    if foreign:
        raise MigrationError(
            f"QEMU already has a dbus-vmstate object ({', '.join(foreign)}) and allows only one; "
            "the SDEI state cannot ride this VM's migrations"
        )
    if object_id in existing:
        await remove_dbus_vmstate(session, object_id)
    arguments = {"qom-type": DBUS_VMSTATE_TYPE, "id": object_id, "addr": address, "id-list": ",".join(ids)}
    try:
        await session.execute("object-add", arguments)
    except QmpCommandError as err:
        raise MigrationError(f"QEMU refused the dbus-vmstate object: {err.desc}") from err
    log.info("added QEMU object %s (dbus-vmstate, id-list=%s) on %s", object_id, ",".join(ids), address)


async def remove_dbus_vmstate(session: QmpSession, object_id: str = DEFAULT_VMSTATE_OBJECT) -> None:
    """``object-del`` the object (its section no longer rides migrations)."""
    await session.execute("object-del", {"id": object_id})


# -- following a migration --------------------------------------------------------------------------


async def wait_for_migration(subscription: EventSubscription, statuses: Collection[str], timeout: float) -> str:
    """Skip MIGRATION events until one with a status in ``statuses``; return that status.

    The subscription must have been opened (``session.subscribe({VmEventKind.MIGRATION})``)
    before the command that starts the migration, so no event is missed.

    :raise MigrationError: the migration ended (``failed``/``cancelled``/``completed``) with a
        status not in ``statuses``, or QEMU went away first (a destination QEMU exits when it
        cannot load the stream).
    :raise TimeoutError: nothing suitable within ``timeout`` seconds.
    """
    wanted = frozenset(statuses)
    async with asyncio.timeout(timeout):
        while True:
            event = await subscription.get()
            if event.kind is VmEventKind.DISCONNECTED:
                raise MigrationError(f"QEMU went away during the migration ({event.reason})")
            if event.kind is not VmEventKind.MIGRATION or event.status is None:
                continue
            if event.status in wanted:
                return event.status
            if event.status in FINAL_STATUSES:
                raise MigrationError(f"migration {event.status} while waiting for {'/'.join(sorted(wanted))}")


async def wait_for_migration_end(subscription: EventSubscription, timeout: float) -> str:
    """Skip MIGRATION events until a final one (``completed``/``failed``/``cancelled``); return it.

    :raise MigrationError: QEMU went away first.
    :raise TimeoutError: no final status within ``timeout`` seconds.
    """
    async with asyncio.timeout(timeout):
        while True:
            event = await subscription.get()
            if event.kind is VmEventKind.DISCONNECTED:
                raise MigrationError(f"QEMU went away during the migration ({event.reason})")
            if event.kind is VmEventKind.MIGRATION and event.status in FINAL_STATUSES:
                return event.status


async def run_source_migration(
    session: QmpSession,
    uri: str,
    *,
    timeout: float,
    at_pre_switchover: Callable[[], Awaitable[None]] | None = None,
) -> MigrationInfo:
    """Migrate the VM behind ``session`` to ``uri`` and return ``query-migrate`` once it completed.

    :func:`prepare_source` must have run. If it enabled ``pause-before-switchover``, the
    migration pauses there (guest stopped): ``at_pre_switchover`` runs (every millisecond it takes
    is downtime), then the migration continues. If the hook raises, the migration is cancelled
    and the error propagates.

    :raise MigrationError: the migration failed or was cancelled (the message has QEMU's
        error-desc; a source that was running resumes by itself).
    """
    with session.subscribe({VmEventKind.MIGRATION}) as events:
        await migrate(session, uri)
        try:
            status = await wait_for_migration(events, {PRE_SWITCHOVER, "completed"}, timeout)
            if status == PRE_SWITCHOVER:
                if at_pre_switchover is not None:
                    try:
                        await at_pre_switchover()
                    except BaseException:
                        await migrate_cancel(session)
                        raise
                await migrate_continue(session)
                await wait_for_migration(events, {"completed"}, timeout)
        except MigrationError as err:
            try:
                reason = (await query_migrate(session)).error or "QEMU gave no reason"
            except QemuError as query_err:
                reason = f"query-migrate failed too: {query_err}"
            raise MigrationError(f"{err}: {reason}") from err
    return await completed_info(session)


async def completed_info(session: QmpSession, settle_timeout: float = 2.0) -> MigrationInfo:
    """``query-migrate`` after a completed migration, once QEMU has filled in its times.

    QEMU sends the MIGRATION ``completed`` event before it computes ``total-time`` and
    ``downtime``; a query made at once (seen on 7.2: about one in three) reports both as 0. There is
    no event for "times computed", so this re-asks for up to ``settle_timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_timeout
    while True:
        info = await query_migrate(session)
        if info.status != "completed" or info.total_time_ms or loop.time() > deadline:
            return info
        await asyncio.sleep(0.002)  # see the docstring: QEMU gives no signal to wait on
