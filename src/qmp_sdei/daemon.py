"""The sidecar program: attach to one QEMU, pin versions, serve SDEI, follow the VM until it exits.

Structure (one owner per piece of state, see ``docs/architecture.md``):

* :class:`Sidecar` is a composition of components: the QMP session (VM facts and lifecycle), the
  SDEI owner (:class:`~qmp_sdei.owner.SdeiOwner`: dispatcher, pins, PSCI policy; this module gives
  it the state-file write), the gdbstub conduit (guest traps, when enabled), the local control
  socket (always) and the MQTT bus (when configured). Adapters get the owner and submit to it;
  none of them imports this module.
* Everything runs in one ``asyncio.TaskGroup`` with named tasks. Shutdown goes through one
  ``asyncio.Event``; whatever ends the sidecar (QEMU exit, SIGTERM/SIGINT, a task failing) sets it,
  and the remaining tasks are cancelled within a bounded time.
* SIGHUP re-reads the config: logging changes apply, anything else is refused with a message.

Exit codes are :class:`qmp_sdei.errors.ExitCode`, carried by each error class (documented in the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from qmp_sdei import __version__, sdnotify
from qmp_sdei.config import Config, load
from qmp_sdei.control.commands import ControlService
from qmp_sdei.control.local import LocalControlServer, socket_path
from qmp_sdei.errors import ConfigError, IncompatibleState, SdeiError, SharedRamUnavailable
from qmp_sdei.errors import ExitCode as ExitCode  # noqa: PLC0414 (re-export: callers know daemon.ExitCode)
from qmp_sdei.logs import configure_logging
from qmp_sdei.migration import MigrationAgent
from qmp_sdei.owner import SdeiOwner
from qmp_sdei.qemu.facts import VmFacts, discover, qemu_psci_version
from qmp_sdei.qemu.guestram import prepare_guest_ram_file
from qmp_sdei.qemu.qmp import QmpSession, VmEvent, VmEventKind, attach
from qmp_sdei.sdei import Dispatcher
from qmp_sdei.statefile import StateStore, StoredState, VmIdentity
from qmp_sdei.versions import Negotiation, VersionPins, format_version, negotiate

if TYPE_CHECKING:
    from qmp_sdei.metrics import MetricsExporter, SidecarMetrics
    from qmp_sdei.metrics_settings import MetricsSettings

log = logging.getLogger("qmp_sdei.daemon")

SHUTDOWN_GRACE = 5.0  # seconds the tasks get to finish after shutdown is requested
STATUS_SETTLE = 0.1  # seconds a status write waits after a migration event (see _write_status_soon)


class Sidecar:
    """One VM's sidecar. ``await Sidecar(config).run()`` returns an :class:`ExitCode`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = StateStore(config.state_dir)
        self.session: QmpSession | None = None
        self.facts: VmFacts | None = None
        self.dispatcher: Dispatcher | None = None
        self.owner: SdeiOwner | None = None
        self.control: ControlService | None = None
        self.pins: VersionPins | None = None
        self.conduit: Any = None  # GdbstubConduit when enabled (imported lazily: optional path)
        #: set once the conduit is attached (``self.conduit`` usable); its ``serving`` event follows
        self.conduit_ready = asyncio.Event()
        self.control_server: LocalControlServer | None = None
        self.migration: MigrationAgent | None = None
        self.migration_error = ""
        self.incoming_listener: Any = None  # IncomingStateListener while a destination waits (MQTT)
        self.started = time.time()
        self.attach_seconds = 0.0
        self.shutdown = asyncio.Event()
        self._shutdown_unsaid = False  # a signal asked for the shutdown before it could be logged
        self.shutdown_reason = ""
        self.exit_code = ExitCode.OK
        #: set once attached, negotiated and serving; tests and ``boot-test`` wait on it
        self.ready = asyncio.Event()
        #: Prometheus metrics and their exporter, when [metrics] is configured
        self.metrics: SidecarMetrics | None = None
        self.metrics_exporter: MetricsExporter | None = None
        self._changed = asyncio.Event()  # replaced after each VM event: see wait_until()
        self._status_due: asyncio.TimerHandle | None = None  # a status write put off (_write_status_soon)
        self._status_written = asyncio.Event()  # replaced after each write put off
        self._background: set[asyncio.Task[None]] = set()

    # -- setup ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Attach, learn the VM, negotiate versions and build the dispatcher. Raises SdeiError."""
        t0 = time.perf_counter()
        self.store.acquire()
        qmp = self.config.qmp
        self.session = await attach(
            qmp.address, listen=qmp.mode == "listen", timeout=qmp.timeout, name=self.config.name
        )
        self.facts = await discover(self.session)
        facts = self.facts
        identity = VmIdentity(str(facts.uuid) if facts.uuid else None, facts.name or self.config.name)
        stored = self.store.load()
        if stored is not None and not stored.identity.matches(identity):
            raise IncompatibleState(
                f"{self.store.state_path} belongs to another VM ({stored.identity}), this is {identity}; "
                "refusing to serve it with foreign state"
            )
        incoming = facts.runstate == "inmigrate"
        if incoming:
            # A migration destination takes the versions the guest saw from the incoming state
            # (the dispatcher built here is a placeholder until then; nothing is pinned or saved).
            stored = None
            negotiation = negotiate(self.config.versions, qemu_psci=qemu_psci_version(facts), pinned=None)
        else:
            negotiation = negotiate(
                self.config.versions, qemu_psci=qemu_psci_version(facts), pinned=stored.pins if stored else None
            )
            self._log_negotiation(negotiation)
        self.pins = negotiation.pins
        self.dispatcher = Dispatcher(
            events=self.config.sdei.events,
            mpidrs=[v.mpidr for v in facts.vcpus],
            version=self.pins.sdei,
            vendor=self.pins.sdei_vendor,
            profile=self.config.sdei.profile,
            bind_slots=self.config.sdei.bind_slots,
        )
        if stored is not None and facts.runstate not in ("prelaunch",):
            # The guest has run: it holds registrations and maybe running handlers. Pick them up.
            try:
                self.dispatcher.restore(stored.snapshot)
            except IncompatibleState as err:
                raise IncompatibleState(f"{self.store.state_path}: {err}") from err
            log.info("resumed SDEI state from %s (VM is %s)", self.store.state_path, facts.runstate)
        self.identity = identity
        self.owner = SdeiOwner(self.dispatcher, pins=None if incoming else self.pins, persist=self._persist)
        if incoming:
            # Its first state (adopted in the migration's downtime) is then a journal append.
            self.store.open_journal()
        else:
            self.owner.save_now()
        self.migration = MigrationAgent(
            self.session, self.owner, self.config, facts, identity, conduit=lambda: self.conduit, incoming=incoming
        )
        self.control = ControlService(
            self.owner,
            self.status,
            vm_name=self.vm_name,
            migrate=self._migrate_command,
            receive_state=self.migration.receive_state,
        )
        self.control_server = LocalControlServer(self.control, socket_path(self.config.state_dir))
        if self.config.metrics is not None:
            await self._start_metrics(self.config.metrics)
        self.attach_seconds = time.perf_counter() - t0
        versions = (
            "versions from the incoming migration"
            if incoming
            else f"SDEI {format_version(self.pins.sdei)}, PSCI {format_version(self.pins.psci)}"
        )
        log.info(
            "attached to QEMU %s: %d vCPU(s), PSCI conduit %s, %s, %d event(s), %.1f ms",
            facts.qemu_version,
            len(facts.vcpus),
            facts.psci_conduit.name,
            versions,
            len(self.dispatcher.catalogue),
            self.attach_seconds * 1e3,
        )

    def _log_negotiation(self, negotiation: Negotiation) -> None:
        for warning in negotiation.warnings:
            log.warning("%s", warning)
        if negotiation.newly_pinned:
            pins = negotiation.pins
            log.info(
                "pinned SDEI %s and PSCI %s for this VM's life", format_version(pins.sdei), format_version(pins.psci)
            )

    # -- state ------------------------------------------------------------------------------------

    def _persist(self, snapshot: bytes) -> None:
        """Make the state durable (a journal record; see statefile); the owner calls it before the
        guest sees a change."""
        assert self.owner is not None and self.owner.pins is not None
        self.pins = self.owner.pins  # a migration destination adopts the incoming pins
        self.store.record(StoredState(self.identity, self.owner.pins, snapshot))

    async def _migrate_command(self, uri: str, peer: str | None) -> dict[str, Any]:
        assert self.migration is not None
        report = await self.migration.migrate(uri, peer=peer)
        return report.to_dict()

    async def _start_metrics(self, settings: MetricsSettings) -> None:
        """Build the metrics and bind the exporter now, so READY=1 means it is listening."""
        from qmp_sdei.metrics import MetricsExporter, SidecarMetrics  # noqa: PLC0415 (optional)

        owner, control, migration = self.owner, self.control, self.migration
        assert owner is not None and control is not None and migration is not None
        metrics = SidecarMetrics(self.vm_name, version=__version__)
        metrics.watch_owner(owner)
        owner.on_sdei_call = metrics.observe_sdei_call
        owner.on_psci_call = metrics.observe_psci_call
        metrics.add_counters("control", lambda: control.stats)
        metrics.add_counters("migration", lambda: migration.counters)
        self.metrics_exporter = MetricsExporter(metrics.render, settings.host, settings.port)
        await self.metrics_exporter.start()
        self.metrics = metrics

    def _ready_text(self) -> str:
        migration = self.migration
        if migration is not None and migration.incoming:
            return f"VM {self.vm_name}: waiting for the incoming migration"
        pins, dispatcher = self.pins, self.dispatcher
        assert pins is not None and dispatcher is not None
        return (
            f"serving VM {self.vm_name}: SDEI {format_version(pins.sdei)}, PSCI {format_version(pins.psci)}, "
            f"{len(dispatcher.catalogue)} event(s)"
        )

    async def _serve_migration(self) -> None:
        assert self.migration is not None
        try:
            await self.migration.start()
        except SdeiError as err:
            # Without the in-band channel QEMU carries no SDEI state: a destination with it refuses
            # the stream, and with return-path the source then resumes. Loud, not fatal.
            log.error("live migration cannot carry SDEI state for this VM: %s", err)
            self.migration_error = str(err)
            return
        if self.shutdown.is_set():
            return  # a cancel that arrived during start() can be lost in 3.11's wait_for
        await self.migration.follow()

    @property
    def vm_name(self) -> str:
        """The VM's name for people and topics: QEMU's ``-name``, else the config's ``[vm] name``."""
        facts = self.facts
        return (facts.name if facts is not None and facts.name else None) or self.config.name or "default"

    def status(self) -> dict[str, Any]:
        """What this sidecar knows, for ``status.json``."""
        facts = self.facts
        doc: dict[str, Any] = {
            "sidecar": {"pid": os.getpid(), "version": __version__, "started": self.started},
            "updated": time.time(),
            "shutdown_reason": self.shutdown_reason or None,
        }
        if facts is not None:
            doc["vm"] = {
                "name": self.vm_name,
                "uuid": str(facts.uuid) if facts.uuid else None,
                "qemu": str(facts.qemu_version),
                "machine": facts.machine_type,
                "gic_version": facts.gic_version,
                "psci_conduit": facts.psci_conduit.name.lower(),
                "runstate": self.session.status if self.session else None,
                "vcpus": [{"index": v.index, "mpidr": v.mpidr} for v in facts.vcpus],
            }
        if self.owner is not None and self.owner.pins is not None:
            doc["pins"] = self.owner.pins.to_dict()
        if self.owner is not None and self.owner.problems:
            doc["problems"] = list(self.owner.problems)
        if self.migration is not None:
            doc["migration"] = self.migration.status()
            if self.migration_error:
                doc["migration"]["error"] = self.migration_error
        if self.dispatcher is not None:
            doc["sdei"] = self.dispatcher.describe()
        counters: dict[str, int] = dict(vars(self.owner.counters)) if self.owner is not None else {}
        if self.control is not None:
            counters.update({f"control_{k}": v for k, v in vars(self.control.stats).items()})
        if self.conduit is not None:
            stats = vars(self.conduit.stats)
            counters.update({f"conduit_{k}": v for k, v in stats.items() if isinstance(v, int)})
        doc["counters"] = counters
        doc["attach_ms"] = round(self.attach_seconds * 1e3, 2)
        return doc

    def _write_status_soon(self) -> None:
        """Write ``status.json`` in STATUS_SETTLE, not now. A migration's events come in its
        downtime (``pre-switchover`` on the source, ``completed`` on the destination), where the
        migration agent must act first; this task often sees them before it does, and a status
        write there (~1 ms) was measured in the guest's downtime. The status is informational."""
        if self._status_due is None:
            self._status_due = asyncio.get_running_loop().call_later(STATUS_SETTLE, self._write_due_status)

    def _write_due_status(self) -> None:
        self._status_due = None
        self.write_status()
        self._status_written.set()
        self._status_written = asyncio.Event()

    async def status_settled(self) -> None:
        """Return once ``status.json`` has what the sidecar knows now (no write is put off)."""
        while self._status_due is not None:
            await self._status_written.wait()

    def write_status(self) -> None:
        try:
            self.store.write_status(self.status())
        except OSError as err:  # status is informational; never let it stop the sidecar
            log.warning("could not write status: %s", err)

    # -- running ----------------------------------------------------------------------------------

    def request_shutdown(self, reason: str, code: ExitCode = ExitCode.OK) -> None:
        if not self.shutdown.is_set():
            self.shutdown_reason = reason
            self.exit_code = code
            log.info("shutting down: %s", reason)
            sdnotify.stopping(f"shutting down: {reason}")
            self.shutdown.set()

    def request_shutdown_from_signal(self, reason: str) -> None:
        """:meth:`request_shutdown` for a plain signal handler (before the event loop handles the
        signal). Such a handler can interrupt a log line being written to stderr, and a second write
        there raises ("reentrant call"), which used to lose the signal: the sidecar ran on. So
        nothing is written here; :meth:`run` says it once it can."""
        if not self.shutdown.is_set():
            self.shutdown_reason = reason
            self.exit_code = ExitCode.OK
            self._shutdown_unsaid = True
            self.shutdown.set()

    def _say_signalled_shutdown(self) -> None:
        if self._shutdown_unsaid:
            self._shutdown_unsaid = False
            log.info("shutting down: %s", self.shutdown_reason)
            sdnotify.stopping(f"shutting down: {self.shutdown_reason}")

    async def _follow_lifecycle(self) -> None:
        assert self.session is not None and self.dispatcher is not None
        # Not STOP/RESUME: with the conduit every trapped call makes a pair; runstate is tracked
        # by the session itself.
        kinds = {VmEventKind.RESET, VmEventKind.SHUTDOWN, VmEventKind.POWERDOWN, VmEventKind.MIGRATION}
        with self.session.subscribe(kinds) as events:
            async for event in events:
                await self._on_vm_event(event)
                if event.kind is VmEventKind.DISCONNECTED:
                    self.request_shutdown("QEMU exited")
                    return

    async def _on_vm_event(self, event: VmEvent) -> None:
        assert self.owner is not None
        kind = event.kind
        if kind is VmEventKind.RESET:
            # SDEI state resets with the VM (all masked, nothing registered); the pins stay. The
            # owner applies it between conduit stops, never in the middle of one.
            await self.owner.vm_reset(guest=bool(event.guest), reason=event.reason or "")
            log.info("VM reset (%s): SDEI state cleared, versions kept", event.reason or "host")
            if self.conduit is not None:
                self._spawn(self.conduit.rearm(), "conduit.rearm")
        elif kind is VmEventKind.SHUTDOWN:
            log.info("VM shutdown (%s, %s)", "guest" if event.guest else "host", event.reason)
        if kind is VmEventKind.MIGRATION:
            self._write_status_soon()
        else:
            self.write_status()
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds, re-checking after each VM event the sidecar handled."""

        async def wait() -> None:
            while not predicate():
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a short job beside the main tasks; its failure is logged, not fatal."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("%s failed: %s", task.get_name(), error, exc_info=error)

    async def _status_writer(self, period: float = 2.0) -> None:
        """Refresh ``status.json`` now and then, so ``qmp-sdei status`` sees counters move."""
        while True:
            self.write_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.shutdown.wait(), period)
                return

    async def _serve_conduit(self) -> None:
        from qmp_sdei.conduit.gdbstub import stub_reports_only_our_resumes  # noqa: PLC0415
        from qmp_sdei.conduit.service import serve_conduit  # noqa: PLC0415 (optional subsystem)

        assert self.session is not None and self.owner is not None

        def attached(conduit: Any) -> None:
            self.conduit = conduit
            self.conduit_ready.set()
            if self.metrics is not None:
                self.metrics.tap_conduit(conduit.stats)
            sdnotify.status(f"{self._ready_text()}; conduit attached")

        settings = self.config.conduit
        migration = self.migration
        arrival: Callable[[], Awaitable[bool]] | None = None
        if migration is not None and not migration.incoming:
            # A migration our predecessor left under way is cancelled first: resuming the VM
            # before would run the guest during its switchover.
            await migration.checked.wait()
        if migration is not None and migration.incoming:
            # A destination's guest arrives with the migration: arm the conduit once it is here and
            # before it runs (QEMU started with -S), then run it if it ran on the source.
            incoming, run_at_boot = migration, settings.start_vm

            async def arrival() -> bool:
                await incoming.arrived.wait()
                return bool(incoming.loaded and incoming.loaded.source_running and run_at_boot)

            # conduit.start_vm is about starting a -S VM at boot: here the source's runstate decides
            # (a guest its owner had paused arrives paused).
            settings = dataclasses.replace(settings, start_vm=False)
        assert self.facts is not None
        qemu = self.facts.qemu_version
        await serve_conduit(
            self.session,
            self.owner,
            settings,
            on_attached=attached,
            stops_need_our_resume=stub_reports_only_our_resumes(qemu.major, qemu.minor),
            guest_arrival=arrival,
            vcpus=len(self.facts.vcpus),
            memory_mb=self.facts.memory_mb,
            vcpu_thread=next((v.thread_id for v in self.facts.vcpus if v.thread_id), None),
        )

    async def _serve_control(self) -> None:
        assert self.control_server is not None
        await self.control_server.serve()

    async def _serve_mqtt(self) -> None:
        from qmp_sdei.control.mqtt import MqttBridge  # noqa: PLC0415 (optional transport)

        assert self.control is not None and self.config.mqtt is not None
        migration = self.migration
        if migration is not None and migration.incoming:
            # The VM's topics belong to the sidecar serving the VM: a destination takes them over
            # only once the guest has arrived (the source gives them up when it has left). Until
            # then it listens on the VM's incoming topic only, for a state sent over the control API.
            await self._take_incoming_state_over_mqtt(migration)
            if self.config.conduit.enabled:
                # ...and once the conduit serves it: a raise before that could not be delivered.
                await self.conduit_ready.wait()
                await self.conduit.serving.wait()
        bridge = MqttBridge(self.control, self.config.mqtt, vm_name=self.vm_name, status=self.control.status_document)
        if self.metrics is not None:
            self.metrics.watch_broker(bridge.online.is_set, lambda: bridge.stats)
        if migration is None:
            await bridge.run()
            return
        serving = asyncio.create_task(bridge.run(), name="control.mqtt.bridge")

        async def migrated_out() -> None:
            await migration.migrated_out.wait()
            # The request that started the migration (and any other) still gets its reply.
            await bridge.drain(SHUTDOWN_GRACE)

        left = asyncio.create_task(migrated_out(), name="control.mqtt.migrated-out")
        try:
            await asyncio.wait({serving, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            if not serving.done():
                log.info("the guest migrated away: leaving the VM's MQTT topics to its new sidecar")
                serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving

    async def _take_incoming_state_over_mqtt(self, migration: MigrationAgent) -> None:
        """Serve the VM's MQTT ``incoming`` topic until the guest has arrived."""
        from qmp_sdei.control.mqtt import IncomingStateListener  # noqa: PLC0415 (optional transport)

        assert self.control is not None and self.config.mqtt is not None
        listener = IncomingStateListener(self.control, self.config.mqtt, vm_name=self.vm_name)
        self.incoming_listener = listener
        listening = asyncio.create_task(listener.run(), name="control.mqtt.incoming")
        try:
            await migration.arrived.wait()
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening

    def _install_signals(self) -> list[int]:
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        for sig, handler in (
            (signal.SIGTERM, lambda: self.request_shutdown("SIGTERM")),
            (signal.SIGINT, lambda: self.request_shutdown("SIGINT")),
            (signal.SIGHUP, self.reload),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
        return installed

    def reload(self) -> None:
        """SIGHUP: re-read the config; apply what may change at run time, refuse the rest."""
        if self.config.source is None:
            log.warning("SIGHUP: no config file to re-read")
            return
        try:
            new = load(self.config.source)
        except ConfigError as err:
            log.error("SIGHUP: config not reloaded: %s", err)
            return
        allowed, refused = self.config.runtime_changes(new)
        for key in refused:
            log.warning("SIGHUP: [%s] cannot change while the VM runs; keeping the current settings", key)
        if "log" in allowed:
            configure_logging(new.log.level, new.log.format)
            self.config = dataclasses.replace(self.config, log=new.log)
            log.info("SIGHUP: logging is now %s/%s", new.log.level, new.log.format)
        elif not refused:
            log.info("SIGHUP: config unchanged")

    def _prepare_guest_ram(self) -> None:
        """``[conduit] guest_ram``: have the file there, group-writable, before QEMU opens it (a
        QEMU that creates it makes it its own user's alone). Without it the mailbox is off, which
        costs speed, not service: said, and the sidecar goes on."""
        conduit = self.config.conduit
        if not (conduit.enabled and conduit.mailbox and conduit.guest_ram is not None):
            return
        try:
            if prepare_guest_ram_file(conduit.guest_ram):
                log.info("created the guest RAM file %s (empty, group-writable) for QEMU", conduit.guest_ram)
        except SharedRamUnavailable as err:
            log.warning("%s: every call through the EL2 stub will stop the VM", err)

    async def run(self) -> ExitCode:
        """Serve until QEMU exits or a signal arrives; never raises for expected failures."""
        signals = self._install_signals()
        self._prepare_guest_ram()
        sdnotify.status(f"attaching to QEMU at {self.config.qmp.address}")
        try:
            # A shutdown signal wins over the wait for QEMU (which may be long, or unbounded).
            starting = asyncio.create_task(self.start(), name="sidecar.start")
            stopping = asyncio.create_task(self.shutdown.wait(), name="sidecar.shutdown-wait")
            try:
                await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                self._say_signalled_shutdown()
            finally:
                stopping.cancel()
                if not starting.done():
                    starting.cancel()
                    await asyncio.wait({starting})
            if starting.cancelled():
                await self._start_vm_unserved()
                return self.exit_code
            starting.result()  # its SdeiError, if any, is handled below
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._follow_lifecycle(), name="qmp.lifecycle")]
                tasks.append(tg.create_task(self._status_writer(), name="status.writer"))
                tasks.append(tg.create_task(self._serve_control(), name="control.local"))
                tasks.append(tg.create_task(self._serve_migration(), name="migration"))
                if self.config.mqtt is not None:
                    tasks.append(tg.create_task(self._serve_mqtt(), name="control.mqtt"))
                if self.config.conduit.enabled:
                    tasks.append(tg.create_task(self._serve_conduit(), name="conduit"))
                if self.metrics is not None and self.metrics_exporter is not None and self.owner is not None:
                    tasks.append(tg.create_task(self.metrics_exporter.serve(), name="metrics.http"))
                    tasks.append(tg.create_task(self.metrics.follow(self.owner), name="metrics.follow"))
                self.ready.set()
                sdnotify.ready(self._ready_text())
                await self.shutdown.wait()
                self._say_signalled_shutdown()
                await self._stop_tasks(tasks)
        except* SdeiError as group:
            err = _first_leaf(group)
            self.request_shutdown(str(err), _exit_code_for(err))
            log.error("%s", err)
            if self.config.conduit.enabled and self.config.conduit.start_vm and self.conduit is None:
                log.warning("conduit.start_vm: the VM was not started, as the sidecar could not serve it")
        finally:
            self._say_signalled_shutdown()
            await self._cleanup()
            loop = asyncio.get_running_loop()
            for sig in signals:
                loop.remove_signal_handler(sig)
        return self.exit_code

    async def drain_handlers(self, timeout: float) -> bool:
        """Stop entering handlers and wait for the running ones to COMPLETE; False on timeout.

        Detaching while a handler runs would send its COMPLETE to QEMU, which answers -1, and the
        handler would return into whatever x30 held: so shutdown waits for handlers first.
        """
        owner = self.owner
        assert owner is not None
        owner.draining = True

        async def wait() -> None:
            while owner.handlers_running():
                await owner.wait_committed()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            running = {i: [f.event for f in v.stack] for i, v in enumerate(owner.dispatcher.vcpus) if v.stack}
            log.warning("detaching with SDEI handlers still running after %.0fs: %s", timeout, running)
            return False
        return True

    async def _stop_tasks(self, tasks: list[asyncio.Task[None]]) -> None:
        if self.conduit is not None and self.migration is not None and self.migration.moved_out:
            # The guest runs on the destination now. A gdbstub detach resumes the VM, and QEMU lets
            # a postmigrate VM run: the guest would run twice. Hang up instead; it stays stopped.
            log.info("the VM migrated out: leaving its gdbstub without resuming it")
            with contextlib.suppress(SdeiError, TimeoutError):
                await asyncio.wait_for(self.conduit.close(), SHUTDOWN_GRACE)
        else:
            await self._leave_conduit(tasks)
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)
            for task in stuck:
                task.cancel()  # again: Python 3.11's wait_for can swallow a cancellation
                frames = "; ".join(f"{f.f_code.co_filename}:{f.f_lineno}" for f in task.get_stack(limit=8))
                log.error(
                    "task %s did not stop within %.0fs of being cancelled: %s", task.get_name(), SHUTDOWN_GRACE, frames
                )

    async def _leave_conduit(self, tasks: list[asyncio.Task[None]]) -> None:
        """Leave the VM as its owner wants it: serve what was promised, then detach (or hold)."""
        conduit_task = next((t for t in tasks if t.get_name() == "conduit" and not t.done()), None)
        if conduit_task is not None and not (self.conduit is not None and self.conduit.serving.is_set()):
            # Attaching the gdbstub pauses the VM and arms breakpoints; cut off there, the VM would
            # stay paused. Let the conduit come up (it then runs or holds the VM as its owner
            # wants), and detach it properly below.
            async def conduit_serving() -> None:
                await self.conduit_ready.wait()
                await self.conduit.serving.wait()

            waiter = asyncio.create_task(conduit_serving(), name="shutdown.conduit-serving")
            await asyncio.wait({waiter, conduit_task}, timeout=SHUTDOWN_GRACE, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter  # a cancelled task left pending is reported when the loop closes
        if self.conduit is not None:
            # Only a conduit still serving a VM that is still there can make progress worth waiting for.
            session_up = self.session is not None and self.session.connected
            live = session_up and conduit_task is not None and not conduit_task.done()
            if live and (self.conduit.held or not await self._settle(SHUTDOWN_GRACE)):
                await self.drain_handlers(SHUTDOWN_GRACE)
            if self.conduit.held and self.session is not None and self.session.connected:
                # The owner may have resumed the VM a moment ago (the RESUME watcher may not have
                # told the conduit yet): a running VM must be detached, not held.
                with contextlib.suppress(SdeiError, TimeoutError):
                    if await asyncio.wait_for(self.session.refresh_runstate(), SHUTDOWN_GRACE) == "running":
                        await asyncio.wait_for(self.conduit.owner_resumed(), SHUTDOWN_GRACE)
            # No await between these two: from here no host event is accepted, nothing is entered,
            # and detach() makes the conduit's next stop its last.
            assert self.owner is not None
            self.owner.draining = True
            await self._release_conduit()

    async def _settle(self, timeout: float) -> bool:
        """Keep serving until no handler runs and nothing is deliverable; False on timeout.

        Events deliverable when shutdown begins were promised: the host was told its event is
        deliverable, or a guest's SIGNAL succeeded. Withholding them would leave the guest waiting
        for a handler that never comes (running, but stuck).
        """
        owner = self.owner
        assert owner is not None

        async def settled() -> None:
            while owner.dispatcher.deliverable() or owner.handlers_running():
                await owner.wait_committed()

        try:
            async with asyncio.timeout(timeout):  # not wait_for: the caller goes on in the same step
                await settled()
        except TimeoutError:
            return False
        return True

    async def _start_vm_unserved(self) -> None:
        """Shut down before serving: a VM ``start_vm`` was to start is started all the same (the
        sidecar never touched it; its owner asked for it to run)."""
        conduit = self.config.conduit
        if not (conduit.enabled and conduit.start_vm):
            log.info("left before serving the VM (%s); its runstate was not touched", self.shutdown_reason)
            return
        if self.session is None:
            log.warning("conduit.start_vm: the VM was not started: the sidecar left before reaching QEMU")
            return
        try:
            if await asyncio.wait_for(self.session.refresh_runstate(), SHUTDOWN_GRACE) == "prelaunch":
                await asyncio.wait_for(self.session.execute("cont"), SHUTDOWN_GRACE)
                log.warning("conduit.start_vm: started the VM without SDEI service, leaving before serving it")
        except (SdeiError, TimeoutError) as err:
            log.error("conduit.start_vm: could not start the VM on the way out (%s); it stays stopped", err)

    async def _release_conduit(self) -> None:
        """Detach the conduit (a no-op if done), leaving the VM as its owner wants it; say loudly
        if that failed while QEMU is still there."""
        assert self.conduit is not None
        try:
            async with asyncio.timeout(SHUTDOWN_GRACE):  # not wait_for: detach starts in this step
                await self.conduit.detach()
            return
        except (SdeiError, TimeoutError) as err:
            problem = str(err) or f"no answer within {SHUTDOWN_GRACE:.0f}s"
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.conduit.close(), SHUTDOWN_GRACE)
        if self.session is None or not self.session.connected or self.conduit.rsp.peer_closed:
            return  # QEMU has gone: there is no VM to leave in any state
        try:
            runstate = await asyncio.wait_for(self.session.refresh_runstate(), SHUTDOWN_GRACE)
        except (SdeiError, TimeoutError):
            runstate = "unknown"
        log.error(
            "could not detach from QEMU's gdbstub (%s): the VM is left %s%s",
            problem,
            runstate,
            "; its owner must resume it (QMP cont)" if runstate in ("paused", "debug") else "",
        )

    async def _cleanup(self) -> None:
        if self.metrics_exporter is not None:
            await self.metrics_exporter.close()
        if self.migration is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.migration.close(), SHUTDOWN_GRACE)
        if self.conduit is not None:
            await self._release_conduit()
        if self.session is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.session.close(), SHUTDOWN_GRACE)
        if self._status_due is not None:
            self._status_due.cancel()
            self._status_due = None
        if self.dispatcher is not None:
            self.write_status()
        self.store.release()


def _first_leaf(group: BaseExceptionGroup[SdeiError]) -> SdeiError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _exit_code_for(err: SdeiError) -> ExitCode:
    return err.exit_code  # one map, in errors.py
