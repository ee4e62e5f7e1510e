"""The sidecar's part in live migrations: SDEI state rides inside QEMU's own migration stream.

One :class:`MigrationAgent` per sidecar, a component beside the conduit and the control API:

* **In-band channel.** At attach it starts a private ``dbus-daemon`` in the state directory, serves
  ``org.qemu.VMState1`` (Id ``sdei``) on it and adds QEMU's ``dbus-vmstate`` object over the
  sidecar's own QMP monitor with ``id-list=sdei``, so QEMU's command line needs nothing new and a
  missing helper fails a migration instead of silently dropping the state.
* **Source.** It enables ``events``, ``pause-before-switchover`` and ``return-path`` and drives the
  switchover of every outgoing migration, whoever started it (``qmp-sdei migrate``, an
  orchestrator such as libvirt on its own monitor). At ``pre-switchover`` it closes the conduit's
  gate (no more resumes: a gdbstub ``c`` now would run the guest during the switchover) and
  continues only if the VM was stopped by QEMU's migration stop rather than at one of our
  breakpoints, because QEMU records the runstate before that stop and a destination that receives
  ``debug`` aborts. Otherwise it cancels; the guest runs on and the migration may be retried.
  ``Save()`` answers from memory (it is downtime).
* **Destination.** Attached to a QEMU in ``inmigrate``, it does not negotiate versions: ``Load()``
  validates the whole incoming state (format, pinned versions this QEMU can honour, catalogue,
  vCPUs and MPIDRs) and adopts it, or raises, and QEMU then fails the migration. A migration that
  completes without SDEI state leaves the guest stopped and says so: the guest never runs with
  versions or state other than those it saw.
* **Fallback: the control transport.** For a QEMU without the ``dbus-vmstate`` object type
  (``[migration] transport``: ``auto`` picks it then, ``control`` forces it), the state travels
  beside the stream: at ``pre-switchover``, once the switchover is safe, the source sends the same
  payload to the destination sidecar's control API (its peer: a local socket or the destination's
  MQTT ``incoming`` topic) and continues only when the destination has validated and adopted it;
  a refusal, an unreachable peer or no answer within ``peer_timeout`` cancels the migration. The
  link is opened while RAM moves, so the pause pays for one request and its reply.
* **Nothing lost.** A source keeps its state (and its state file) after ``completed``; when a
  migration fails or is cancelled the source VM is resumed if it was running, with its SDEI state
  intact, and the log, the status and the notifications say what happened.

What it must not do: touch the dispatcher (it goes through the owner) or the stub (it asks the
conduit to close and open its gate; only a switchover our dead predecessor left is resumed through
:func:`qmp_sdei.conduit.service.resume_from_switchover_stop`, before any conduit attaches).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qmp_sdei.config import Config, MigrationPeer, parse_peer
from qmp_sdei.control.peer import PeerLink, StateRefused
from qmp_sdei.errors import ConduitError, IncompatibleState, MigrationError, QemuError, SdeiError
from qmp_sdei.owner import NotificationKind, SdeiOwner
from qmp_sdei.qemu import migration as qmig
from qmp_sdei.qemu.facts import VmFacts, qemu_psci_version
from qmp_sdei.qemu.qmp import QmpSession, VmEventKind
from qmp_sdei.sdei import Dispatcher
from qmp_sdei.statefile import VmIdentity
from qmp_sdei.versions import accept_incoming, format_version
from qmp_sdei.vmstate.bus import PrivateBus
from qmp_sdei.vmstate.payload import MigrationPayload, decode_payload, encode_payload
from qmp_sdei.vmstate.service import VmstateService

log = logging.getLogger("qmp_sdei.migration")

#: How long the conduit may take to settle once the switchover begins (it is downtime).
PARK_TIMEOUT = 2.0
#: The runstate of a VM stopped by a migration's switchover.
FINISH_MIGRATE = "finish-migrate"
#: Migration statuses of an outgoing migration that has not ended yet.
IN_PROGRESS = frozenset({"setup", "active", "pre-switchover", "device", "cancelling", "postcopy-active"})
#: How long a sidecar that finds someone else's migration under way waits for its cancel to end.
CANCEL_TIMEOUT = 30.0
#: In the state directory while an outgoing migration runs: whether the guest was running, for a
#: sidecar that restarts after this one died mid-migration.
MARKER = "migration.json"
#: How a cancelled switchover's reason begins when the VM was not safe to hand over (the guest
#: stopped inside an SDEI call): an orchestrator retries those with a new destination.
UNSAFE_SWITCHOVER = "the VM could not be handed over safely"


class GatedConduit(Protocol):
    """What the agent needs of the conduit: a gate that stops it resuming the VM."""

    async def hold_vcpus_awake(self, awake: bool) -> None: ...
    def close_gate(self) -> None: ...
    async def wait_parked(self, timeout: float) -> None: ...
    def switchover_safe(self) -> bool: ...
    def stopped_by_migration(self) -> bool: ...
    @property
    def held(self) -> bool: ...
    async def open_gate(self) -> None: ...


# ---- reports -----------------------------------------------------------------------------------------


@dataclass
class MigrationReport:
    """One outgoing migration as ``qmp-sdei migrate`` prints it."""

    uri: str
    outcome: str = "none"  # completed, failed, cancelled
    attempts: int = 0
    phases: list[tuple[str, float]] = field(default_factory=list)  # (phase, seconds since start)
    total_ms: int | None = None
    downtime_ms: int | None = None
    error: str | None = None
    #: what carries the stream: "tcp-nodelay" (a socket this sidecar connected) or "qemu"
    connection: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "outcome": self.outcome,
            "attempts": self.attempts,
            "phases": [{"phase": p, "at_ms": round(t * 1e3, 1)} for p, t in self.phases],
            "total_ms": self.total_ms,
            "downtime_ms": self.downtime_ms,
            "error": self.error,
            "connection": self.connection,
        }


@dataclass
class MigrationCounters:
    migrations_out: int = 0
    migrations_in: int = 0
    switchovers_cancelled: int = 0
    migrations_failed: int = 0
    #: control transport: states sent to / refused by the destination, and sends that failed
    states_sent: int = 0
    states_refused: int = 0
    state_sends_failed: int = 0


# ---- the agent -------------------------------------------------------------------------------------


class MigrationAgent:
    """Carries one VM's SDEI state across its live migrations (see the module docstring)."""

    def __init__(
        self,
        session: QmpSession,
        owner: SdeiOwner,
        config: Config,
        facts: VmFacts,
        identity: VmIdentity,
        *,
        conduit: Callable[[], GatedConduit | None],
        incoming: bool,
    ) -> None:
        self.session = session
        self.owner = owner
        self.config = config
        self.facts = facts
        self.identity = identity
        self._conduit = conduit
        #: this QEMU waits for an incoming migration (runstate ``inmigrate`` at attach)
        self.incoming = incoming
        self.loaded: MigrationPayload | None = None
        self.counters = MigrationCounters()
        self.phase = "idle"
        self.last_outcome: str | None = None
        self.ready = asyncio.Event()
        #: set once start() has dealt with a migration found under way (or failed): the conduit
        #: must not resume the VM before, or it would run the guest during a switchover
        self.checked = asyncio.Event()
        #: tests and benchmarks: awaited at the pre-switchover pause before the decision (downtime)
        self.before_switchover: Callable[[], Awaitable[None]] | None = None
        #: an incoming migration completed with SDEI state: the guest is here (still stopped)
        self.arrived = asyncio.Event()
        #: an outgoing migration completed: the guest runs elsewhere now
        self.migrated_out = asyncio.Event()
        self._bus = PrivateBus(config.state_dir / "vmstate")
        self._service: VmstateService | None = None
        self._status_changed: asyncio.Event = asyncio.Event()
        self._our_migration: asyncio.Future[str] | None = None
        self._vm_running = False  # from STOP/RESUME, in event order (see follow())
        self._running_at_active = False  # was the VM running when RAM started to move?
        self._source_running = False  # what Save() tells the destination
        self._moved_out = False  # an outgoing migration completed and nobody resumed the VM here
        #: "dbus-vmstate" or "control", decided in start() from [migration] transport and QEMU
        self.transport = config.migration.transport
        #: the destination sidecar of the next outgoing migration (control transport)
        self._peer_override: MigrationPeer | None = None
        self._link: PeerLink | None = None
        self._link_opening: asyncio.Task[None] | None = None
        self._cancel_reason: str | None = None  # why this sidecar cancelled the last switchover
        self.last_state_ms: float | None = None  # control transport: payload sent and acknowledged

    # -- set-up ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """The private bus, the VMState1 service, QEMU's dbus-vmstate object, the capabilities.

        A source whose previous sidecar died mid-migration first cancels that migration (see
        :meth:`_cancel_orphaned`).
        """
        try:
            if not self.incoming:
                await self._cancel_orphaned()
        finally:
            self.checked.set()
        self.transport = await self._choose_transport()
        if self.transport == "dbus-vmstate":
            address = await self._bus.start()
            self._service = VmstateService(address, save=self._save, load=self._load)
            await self._service.start()
            await qmig.add_dbus_vmstate(self.session, address)
        else:
            await self._drop_stale_vmstate_object()
            log.info(
                "the SDEI state travels over the control API at the switchover (migration.transport = control)%s",
                "" if self.incoming or self.config.migration.peer else "; no migration.peer: give one per migration",
            )
        if self.incoming:
            await qmig.prepare_destination(self.session)
            log.info("destination of an incoming migration: the SDEI and PSCI versions come with the guest's state")
        else:
            await qmig.prepare_source(self.session)
        self.ready.set()

    async def _choose_transport(self) -> str:
        """``[migration] transport``, with ``auto`` resolved: dbus-vmstate when QEMU has the type."""
        wanted = self.config.migration.transport
        if wanted != "auto":
            return wanted
        if await qmig.has_dbus_vmstate(self.session):
            return "dbus-vmstate"
        log.warning(
            "this QEMU has no dbus-vmstate object type: the SDEI state will travel over the control API "
            "(migration.transport = control)"
        )
        return "control"

    async def _drop_stale_vmstate_object(self) -> None:
        """A dbus-vmstate object an earlier sidecar of ours added points at a dead bus, and would
        fail every migration ("pre-save failed"): the control transport has no use for it."""
        with contextlib.suppress(QemuError):
            if qmig.DEFAULT_VMSTATE_OBJECT in await qmig.dbus_vmstate_objects(self.session):
                await qmig.remove_dbus_vmstate(self.session)
                log.info("removed the dbus-vmstate object an earlier sidecar left in QEMU")

    async def _cancel_orphaned(self) -> None:
        """Cancel an outgoing migration that no sidecar drives (ours died during it).

        Nobody can answer its pre-switchover pause safely: the conduit of the sidecar that died
        may have left the VM at a breakpoint (QEMU then recorded ``debug`` for the destination,
        which aborts on it), and Save would find no service. So it is cancelled, whoever started
        it; the orchestrator retries with this sidecar serving. A guest that was running before
        the migration (the marker the previous sidecar left says so) runs again: QEMU itself only
        resumes a VM that was running at the switchover, not one parked at a breakpoint.
        """
        marker = self.config.state_dir / MARKER
        was_running = self._read_marker(marker)
        info = await qmig.query_migrate(self.session)
        if info.status in IN_PROGRESS:
            log.warning(
                "found an outgoing migration in %s with no sidecar driving it (the previous one died): cancelling it",
                info.status,
            )
            if was_running and self.config.conduit.enabled and await self.session.refresh_runstate() == FINISH_MIGRATE:
                await self._run_orphaned_switchover_stop()
            with self.session.subscribe({VmEventKind.MIGRATION}) as events:
                with contextlib.suppress(QemuError):
                    await qmig.migrate_cancel(self.session)
                if (await qmig.query_migrate(self.session)).status in IN_PROGRESS:
                    await qmig.wait_for_migration_end(events, CANCEL_TIMEOUT)
            self.counters.switchovers_cancelled += 1
            self.last_outcome = "cancelled"
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
        if was_running and await self.session.refresh_runstate() == "postmigrate":
            log.warning("the guest was running before the interrupted migration: resuming it")
            await self.session.execute("cont")

    async def _run_orphaned_switchover_stop(self) -> None:
        """Run the guest again (through the gdbstub) before cancelling an orphaned switchover.

        QEMU 8.1 and later give a cancelled migration's VM back the runstate it had when the
        switchover stopped it; for a guest stopped at a breakpoint of the dead conduit that is
        ``debug``, a transition from ``finish-migrate`` QEMU does not allow: it aborts. A VM that
        runs again before the cancel is left alone. The marker says the guest was running at the
        start of the migration, so running it is what the cancel would have done anyway.
        """
        from qmp_sdei.conduit.service import resume_from_switchover_stop  # noqa: PLC0415 (optional subsystem)

        try:
            resumed = await resume_from_switchover_stop(self.session, self.config.conduit, timeout=PARK_TIMEOUT)
        except (ConduitError, QemuError) as err:
            log.warning("could not run the VM before cancelling the orphaned migration: %s", err)
            resumed = False
        if not resumed:
            log.warning("the VM is still stopped by the switchover: QEMU may abort on the cancel")

    async def _run_conduit_stop_before_cancel(self) -> None:
        """Let the conduit resume the stop of its own the switchover found, before the cancel.

        Why: see :meth:`_run_orphaned_switchover_stop` (QEMU 8.1 and later abort when a migration
        that stopped the VM in ``debug`` is cancelled while the VM is in ``finish-migrate``). The
        conduit's gdbstub continue takes it out of ``finish-migrate`` (QMP ``cont`` cannot); QEMU
        7.2 is fine either way. The guest was going to run on after the cancel in any case.
        """
        with self.session.subscribe({VmEventKind.RESUME}) as resumes:
            await self._release_conduit()
            if not await qmig.wait_left_finish_migrate(self.session, resumes, PARK_TIMEOUT):
                log.warning("the conduit did not run the VM again before the cancel: QEMU may abort on it")

    @staticmethod
    def _read_marker(marker: Path) -> bool:
        try:
            return bool(json.loads(marker.read_text()).get("vm_running"))
        except FileNotFoundError:
            return False
        except (OSError, ValueError, AttributeError) as err:
            log.warning("ignoring a damaged %s: %s", marker, err)
            return False

    def _write_marker(self, vm_running: bool) -> None:
        marker = self.config.state_dir / MARKER
        try:
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"vm_running": vm_running, "pid": os.getpid()}))
            tmp.replace(marker)
        except OSError as err:
            log.warning("could not write %s: %s", marker, err)

    def _drop_marker(self) -> None:
        with contextlib.suppress(OSError):
            (self.config.state_dir / MARKER).unlink()

    async def close(self) -> None:
        await self._close_link()
        if self._service is not None:
            with contextlib.suppress(SdeiError, OSError):
                await self._service.close()
        await self._bus.stop()

    # -- the D-Bus callbacks ---------------------------------------------------------------------

    async def _save(self) -> bytes:
        assert self.owner.pins is not None
        snapshot = await self.owner.snapshot()  # no stop is in flight: the conduit is parked
        return encode_payload(self.owner.pins, snapshot, source_running=self._source_running)

    async def receive_state(self, blob: bytes, source: str | None) -> dict[str, Any]:
        """The control API's ``incoming-state``: validate and adopt, exactly as ``Load`` does.

        :raise IncompatibleState, VersionError: refused (nothing changed); the source cancels.
        """
        started = time.perf_counter()
        await self._load(blob)
        assert self.owner.pins is not None
        elapsed = (time.perf_counter() - started) * 1e3
        log.info(
            "took the SDEI state from %s over the control API (%d bytes, %.2f ms)", source or "?", len(blob), elapsed
        )
        return {"accepted": True, "bytes": len(blob), "pins": self.owner.pins.to_dict(), "load_ms": round(elapsed, 3)}

    async def _load(self, blob: bytes) -> None:
        if not self.incoming:
            raise IncompatibleState("this VM is not waiting for an incoming migration")
        incoming = decode_payload(blob)
        pins = accept_incoming(None, incoming.pins, qemu_psci=qemu_psci_version(self.facts))
        sdei = self.config.sdei
        dispatcher = Dispatcher(
            events=sdei.events,
            mpidrs=[v.mpidr for v in self.facts.vcpus],
            version=pins.sdei,
            vendor=pins.sdei_vendor,
            profile=sdei.profile,
            bind_slots=sdei.bind_slots,
        )
        dispatcher.restore(incoming.snapshot)  # catalogue, topology, versions: raises on any mismatch
        await self.owner.adopt(dispatcher, pins, cause="migration")
        self.loaded = incoming
        log.info(
            "incoming SDEI state adopted: SDEI %s, PSCI %s (the versions the guest saw at boot); the guest %s",
            format_version(pins.sdei),
            format_version(pins.psci),
            "ran on the source" if incoming.source_running else "was paused on the source",
        )

    # -- following migrations --------------------------------------------------------------------

    async def follow(self) -> None:
        """Drive every migration of this VM, outgoing or incoming, until QEMU goes away."""
        kinds = {VmEventKind.MIGRATION, VmEventKind.RESUME, VmEventKind.STOP}
        with self.session.subscribe(kinds) as events:
            self._vm_running = self.session.running
            async for event in events:
                if event.kind is VmEventKind.STOP:
                    self._vm_running = False
                    continue
                if event.kind is VmEventKind.DISCONNECTED:
                    if self.incoming and self.phase not in ("idle", "completed"):
                        log.error("QEMU went away during the incoming migration (%s)", self.phase)
                    return
                if event.kind is VmEventKind.RESUME:
                    self._vm_running = True
                    await self._resumed()
                    continue
                status = event.status or "?"
                self._phase(status)
                if self.incoming:
                    await self._incoming_status(status)
                else:
                    await self._outgoing_status(status)

    def _phase(self, status: str) -> None:
        self.phase = status
        self.owner.notify(NotificationKind.SIDECAR, event=None, what="migration", phase=status, incoming=self.incoming)
        self._status_changed.set()
        self._status_changed = asyncio.Event()

    async def _outgoing_status(self, status: str) -> None:
        if status == "setup":
            self._cancel_reason = None
            if self.transport == "control":
                self._start_link()
        elif status == "active":
            # QEMU stops the VM for the switchover after this event, not before.
            self._running_at_active = self._vm_running
            conduit = self._conduit()
            self._write_marker(not conduit.held if conduit is not None else self._vm_running)
            if conduit is not None:
                await self._hold_vcpus_awake(conduit, True)
        elif status == qmig.PRE_SWITCHOVER:
            if self.before_switchover is not None:
                await self.before_switchover()
            if not await self._switchover_safe():
                conduit = self._conduit()
                if conduit is not None and not conduit.held:
                    # Stopped at one of our breakpoints, not (only) by QEMU: run it out of that stop
                    # first, or QEMU 8.1 and later abort on the cancel.
                    with contextlib.suppress(QemuError):
                        await self._run_conduit_stop_before_cancel()
                await self._cancel_switchover(
                    f"{UNSAFE_SWITCHOVER} (stopped inside an SDEI call, or a vCPU halted in the EL2 stub's idle "
                    "loop); the guest runs on here; start the destination again and retry"
                )
            elif self.transport == "control" and (problem := await self._hand_over_state()) is not None:
                await self._cancel_switchover(problem)
            else:
                await self._continue()
        elif status == "completed":
            self.counters.migrations_out += 1
            self.last_outcome = "completed"
            log.info("migrated out: the destination has the SDEI state; keeping ours until this QEMU goes")
            self.migrated_out.set()
            self._moved_out = True
            self._drop_marker()
            await self._close_link()
            self._finish("completed")
        elif status in ("failed", "cancelled"):
            self.last_outcome = status
            if status == "failed":
                self.counters.migrations_failed += 1
            reason = await self._error_desc()
            log.warning("migration %s%s; the VM keeps its SDEI state here", status, f": {reason}" if reason else "")
            await self._release_conduit()
            self._drop_marker()
            await self._close_link()
            self._finish(status)

    async def _incoming_status(self, status: str) -> None:
        if status == "completed":
            if self.loaded is None:
                # id-list=sdei makes this a failed migration in QEMU; if it still happens, refuse.
                self.last_outcome = "no-state"
                log.error("incoming migration completed without SDEI state: keeping the guest stopped")
                with contextlib.suppress(QemuError):
                    await self.session.execute("stop")
                return
            self.counters.migrations_in += 1
            self.last_outcome = "completed"
            self.incoming = False  # from now on this VM is a possible source
            log.info("incoming migration completed with the guest's SDEI state")
            # The conduit arms and runs the guest on this signal: that is downtime, so the
            # capabilities a later outgoing migration needs are set after it, not before.
            self.arrived.set()
            with contextlib.suppress(QemuError):
                await qmig.prepare_source(self.session)
        elif status == "failed":
            self.last_outcome = "failed"
            log.error("incoming migration failed; QEMU will exit")

    async def _resumed(self) -> None:
        # A source whose outgoing migration completed is resumed by its owner (the destination
        # failed after all): the guest runs here again, with the state we kept.
        if self._moved_out:
            log.warning("the migrated-out VM was resumed here; serving it again")
            self._moved_out = False
            self.phase = "idle"
            await self._release_conduit()

    async def _switchover_safe(self) -> bool:
        conduit = self._conduit()
        if conduit is None:
            # No breakpoints: the VM cannot be stopped at one. STOP/RESUME are the owner's own.
            self._source_running = self._running_at_active
            return True
        conduit.close_gate()
        try:
            await conduit.wait_parked(PARK_TIMEOUT)
        except (ConduitError, TimeoutError) as err:
            log.warning("the conduit did not settle at the switchover: %s", err)
            return False
        # With the conduit, STOP/RESUME pairs come from its breakpoints too; what tells a running
        # VM from one its owner paused is the stop reply the conduit got: QEMU's migration stop.
        self._source_running = conduit.stopped_by_migration()
        return conduit.switchover_safe()

    async def _cancel_switchover(self, why: str) -> None:
        self.counters.switchovers_cancelled += 1
        self._cancel_reason = f"cancelled at the switchover: {why}"
        log.warning("switchover cancelled: %s", why)
        with contextlib.suppress(QemuError):
            await qmig.migrate_cancel(self.session)

    # -- the control transport ---------------------------------------------------------------------

    def use_peer(self, peer: str | None) -> None:
        """The destination sidecar of the next outgoing migration (until it ends), instead of
        ``migration.peer``; ``None``: back to the config. :raise ConfigError, MigrationError:"""
        override = parse_peer(peer, "peer") if peer else None
        if override is not None and override.kind == "mqtt" and self.config.mqtt is None:
            raise MigrationError("peer: an MQTT peer is reached through this sidecar's broker; configure [mqtt]")
        self._peer_override = override

    def _peer(self) -> MigrationPeer | None:
        return self._peer_override or self.config.migration.peer

    def _start_link(self) -> None:
        """Connect to the destination sidecar while RAM moves (the pause must not pay for it)."""
        peer = self._peer()
        if peer is None or self._link is not None:
            return
        try:
            self._link = PeerLink(
                peer, mqtt=self.config.mqtt, vm_name=self.identity.name or self.config.name or "default"
            )
        except SdeiError as err:
            log.error("%s", err)
            return
        self._link_opening = asyncio.create_task(self._link.open(), name="migration.peer-link")
        # Its failure is reported at the switchover (send_state opens again, and says why).
        self._link_opening.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _hand_over_state(self) -> str | None:
        """Send the state to the destination sidecar and wait for its acceptance; why not, or None.

        The VM is stopped and the conduit parked: the snapshot is final. Every millisecond here is
        downtime; the link was opened while RAM moved.
        """
        peer = self._peer()
        if peer is None:
            self.counters.state_sends_failed += 1
            return (
                "the SDEI state travels over the control API (no dbus-vmstate) but no destination sidecar is known: "
                "set migration.peer or give a peer with the migrate request"
            )
        if self._link is None:
            self._start_link()
        if self._link is None:
            self.counters.state_sends_failed += 1
            return f"cannot reach the destination sidecar at {peer}"
        if self._link_opening is not None:
            with contextlib.suppress(Exception):
                await self._link_opening  # its error, if any, comes back from send_state below
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.migration.peer_timeout):
                assert self.owner.pins is not None
                snapshot = await self.owner.snapshot()  # no stop is in flight: the conduit is parked
                payload = encode_payload(self.owner.pins, snapshot, source_running=self._source_running)
                await self._link.send_state(payload, self.config.migration.peer_timeout)
        except StateRefused as err:
            self.counters.states_refused += 1
            return str(err)
        except TimeoutError:
            self.counters.state_sends_failed += 1
            timeout = self.config.migration.peer_timeout
            return f"the destination sidecar at {peer} did not acknowledge the state within {timeout:g}s"
        except SdeiError as err:
            self.counters.state_sends_failed += 1
            return str(err)
        self.last_state_ms = (time.perf_counter() - started) * 1e3
        self.counters.states_sent += 1
        log.info(
            "the destination sidecar at %s accepted the SDEI state (%d bytes, %.2f ms): continuing the migration",
            peer,
            len(payload),
            self.last_state_ms,
        )
        self.owner.notify(
            NotificationKind.SIDECAR, event=None, what="migration", phase="state-accepted", peer=str(peer)
        )
        return None

    async def _close_link(self) -> None:
        link, self._link = self._link, None
        opening, self._link_opening = self._link_opening, None
        if opening is not None and not opening.done():
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await opening
        if link is not None:
            await link.close()
        self._peer_override = None

    async def _continue(self) -> None:
        try:
            await qmig.migrate_continue(self.session)
        except QemuError as err:
            log.error("migrate-continue refused: %s; cancelling", err)
            with contextlib.suppress(QemuError):
                await qmig.migrate_cancel(self.session)

    async def _release_conduit(self) -> None:
        conduit = self._conduit()
        if conduit is not None:
            try:
                await conduit.open_gate()
            except ConduitError as err:
                log.error("could not resume the guest after the migration ended: %s", err)
            await self._hold_vcpus_awake(conduit, False)

    @staticmethod
    async def _hold_vcpus_awake(conduit: GatedConduit, awake: bool) -> None:
        """See the conduit's ``hold_vcpus_awake``. A failure only costs that protection (or, when
        releasing, host CPU while the guest idles): logged, the migration goes on."""
        try:
            await conduit.hold_vcpus_awake(awake)
        except ConduitError as err:
            log.warning("could not %s idle vCPUs for the migration: %s", "wake" if awake else "release", err)

    async def _error_desc(self) -> str | None:
        try:
            return (await qmig.query_migrate(self.session)).error
        except QemuError:
            return None

    def _finish(self, outcome: str) -> None:
        if self._our_migration is not None and not self._our_migration.done():
            self._our_migration.set_result(outcome)

    # -- migrations this sidecar starts ------------------------------------------------------------

    async def migrate(self, uri: str, *, peer: str | None = None, timeout: float = 300.0) -> MigrationReport:
        """Migrate this VM to ``uri`` (the destination QEMU listens there, its sidecar runs).

        The report's outcome is ``completed`` only when the destination confirmed: with
        ``return-path`` QEMU completes only after the destination loaded everything, the SDEI state
        included. A switchover this sidecar had to cancel (the VM was at one of its breakpoints)
        ends the attempt: QEMU 7.2's destination exits on a cancelled stream, so a retry needs a
        new destination, which only the caller can start.

        :param peer: the destination sidecar's control endpoint (``unix:PATH``, ``mqtt``,
            ``mqtt:VM``) when the state travels over the control API; default ``migration.peer``.
        """
        if self.incoming:
            raise MigrationError("this VM is itself waiting for an incoming migration")
        if self._our_migration is not None and not self._our_migration.done():
            raise MigrationError("a migration started by this sidecar is already running")
        self.use_peer(peer)
        if self.transport == "control" and self._peer() is None:
            raise MigrationError(
                "the SDEI state travels over the control API here (no dbus-vmstate): name the destination "
                "sidecar with a peer (unix:PATH/control.sock, mqtt or mqtt:VM) or set migration.peer"
            )
        report = MigrationReport(uri, attempts=1)
        started = time.perf_counter()
        self._our_migration = asyncio.get_running_loop().create_future()
        cancelled_before = self.counters.switchovers_cancelled
        with self.session.subscribe({VmEventKind.MIGRATION}) as events:
            try:
                report.connection = await qmig.migrate(self.session, uri, tcp_nodelay=self.config.migration.tcp_nodelay)
            except (QemuError, MigrationError) as err:
                report.outcome, report.error = "failed", str(err)
                self._our_migration.cancel()
                self._peer_override = None
                return report
            report.outcome = await self._await_outcome(events, report, started, timeout)
        info = await qmig.query_migrate(self.session)
        report.total_ms, report.downtime_ms = info.total_time_ms, info.downtime_ms
        if report.outcome != "completed":
            report.error = info.error
            if self.counters.switchovers_cancelled > cancelled_before and self._cancel_reason:
                report.error = self._cancel_reason
        return report

    async def _await_outcome(self, events: Any, report: MigrationReport, started: float, timeout: float) -> str:
        assert self._our_migration is not None
        async with asyncio.timeout(timeout):
            while not self._our_migration.done():
                event = await events.get()
                if event.kind is VmEventKind.DISCONNECTED:
                    raise MigrationError("QEMU went away during the migration")
                if event.kind is VmEventKind.MIGRATION and event.status:
                    report.phases.append((event.status, time.perf_counter() - started))
                    if event.status in qmig.FINAL_STATUSES:
                        # follow() handles it too (resumes the guest on failure): wait for it
                        return await asyncio.shield(self._our_migration)
        return self._our_migration.result()

    async def wait_for_outcome(self, outcomes: Collection[str], timeout: float) -> str:
        """Wait until the last migration's outcome is one of ``outcomes`` (for tests and tools)."""
        async with asyncio.timeout(timeout):
            while self.last_outcome not in outcomes:
                await self._status_changed.wait()
        assert self.last_outcome is not None
        return self.last_outcome

    @property
    def moved_out(self) -> bool:
        """The guest migrated out and nobody resumed it here: this VM must not run again."""
        return self._moved_out

    def status(self) -> dict[str, Any]:
        peer = self._peer()
        return {
            "role": "destination" if self.incoming else "source",
            "transport": self.transport,
            "peer": str(peer) if peer is not None else None,
            "last_cancel_reason": self._cancel_reason,
            "last_state_ms": round(self.last_state_ms, 3) if self.last_state_ms is not None else None,
            "phase": self.phase,
            "last_outcome": self.last_outcome,
            "state_received": self.loaded is not None,
            **vars(self.counters),
        }


def bus_directory(state_dir: Path) -> Path:
    return state_dir / "vmstate"
