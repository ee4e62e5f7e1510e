"""The sidecar program: attach to one QEMU, pin versions, serve SDEI, follow the VM until it exits.

Structure (one owner per piece of state, see ``docs/architecture.md``):

* :class:`Sidecar` wires the adapters together: the QMP session (VM facts and lifecycle), the
  dispatcher (SDEI state) behind :class:`PersistingDispatcher` (state file), and optionally the
  gdbstub conduit (guest traps).
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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from qmp_sdei import __version__
from qmp_sdei.abi import psci
from qmp_sdei.abi.sdei import Function as SdeiFunction
from qmp_sdei.abi.smccc import function_id
from qmp_sdei.config import Config, load
from qmp_sdei.errors import ConfigError, IncompatibleState, SdeiError, TriggerError
from qmp_sdei.errors import ExitCode as ExitCode  # noqa: PLC0414 (re-export: callers know daemon.ExitCode)
from qmp_sdei.logs import configure_logging
from qmp_sdei.qemu.facts import VmFacts, discover, qemu_psci_version
from qmp_sdei.qemu.qmp import QmpSession, VmEvent, VmEventKind, attach
from qmp_sdei.sdei import Completion, Dispatcher, TriggerOutcome, TriggerResult, VcpuRegs
from qmp_sdei.statefile import StateStore, StoredState, VmIdentity
from qmp_sdei.versions import Negotiation, VersionPins, format_version, negotiate, psci_answer

log = logging.getLogger("qmp_sdei.daemon")

SHUTDOWN_GRACE = 5.0  # seconds the tasks get to finish after shutdown is requested


#: PSCI calls with which a guest resets the VM (passed through to QEMU).
GUEST_RESET_CALLS = frozenset({psci.Function.SYSTEM_RESET, psci.Function.SYSTEM_RESET2, psci.Function.SYSTEM_RESET2_64})

#: SDEI calls that never change dispatcher state: no need to write the state file after them.
READ_ONLY_CALLS = frozenset(
    {
        SdeiFunction.VERSION,
        SdeiFunction.EVENT_STATUS,
        SdeiFunction.EVENT_GET_INFO,
        SdeiFunction.EVENT_CONTEXT,
        SdeiFunction.FEATURES,
    }
)


class PersistingDispatcher:
    """The dispatcher as the conduit sees it: every state change is saved before the guest goes on.

    Guest-side changes (``hypercall``, ``deliver``) mark the state dirty; the conduit calls
    :meth:`commit` once per stop, after its dispatcher calls and before it writes any register
    back or resumes the VM. So the guest never sees a result that a restarted sidecar would not
    know about, at the cost of one state write per stop instead of one per call. Host-side changes
    (``trigger``) are saved at once: no stop follows a trigger that stays pending.
    """

    def __init__(self, dispatcher: Dispatcher, save: Callable[[], None]) -> None:
        self.inner = dispatcher
        self._save = save
        self._dirty = False
        #: shutting down: enter no new handlers, so the running ones can finish before we detach
        self.draining = False
        self._committed = asyncio.Event()  # replaced at each commit; see wait_committed()

    def commit(self) -> None:
        if self._dirty:
            self._save()
            self._dirty = False
        self._committed.set()
        self._committed = asyncio.Event()

    async def wait_committed(self) -> None:
        """Wait for the conduit's next commit (the end of a stop that may have changed state)."""
        await self._committed.wait()

    def handlers_running(self) -> bool:
        return any(vcpu.stack for vcpu in self.inner.vcpus)

    def hypercall(self, vcpu: int, regs: VcpuRegs) -> Completion:
        fid = function_id(regs.x[0])
        outcome = self.inner.hypercall(vcpu, regs)
        if fid not in READ_ONLY_CALLS:
            self._dirty = True
        return outcome

    def trigger(self, event: int, vcpu: int | None = None) -> TriggerResult:
        if self.draining:  # accepted now, it would never be entered: the host must know
            raise TriggerError(f"event {event} not raised: the sidecar is shutting down")
        result = self.inner.trigger(event, vcpu)
        if result.outcome is not TriggerOutcome.DROPPED:
            self._save()
        return result

    def deliverable(self) -> list[int]:
        return [] if self.draining else self.inner.deliverable()

    def deliver(self, vcpu: int, regs: VcpuRegs) -> bool:
        if self.draining:
            return False
        entered = self.inner.deliver(vcpu, regs)
        if entered:
            self._dirty = True
        return entered


@dataclass
class Counters:
    resets: int = 0
    guest_resets: int = 0
    state_writes: int = 0
    vcpu_resets: int = 0


class Sidecar:
    """One VM's sidecar. ``await Sidecar(config).run()`` returns an :class:`ExitCode`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = StateStore(config.state_dir)
        self.session: QmpSession | None = None
        self.facts: VmFacts | None = None
        self.dispatcher: Dispatcher | None = None
        self.pins: VersionPins | None = None
        self.conduit: Any = None  # GdbstubConduit when enabled (imported lazily: optional path)
        #: set once the conduit is attached (``self.conduit`` usable); its ``serving`` event follows
        self.conduit_ready = asyncio.Event()
        self.counters = Counters()
        self.started = time.time()
        self.attach_seconds = 0.0
        self.shutdown = asyncio.Event()
        self.shutdown_reason = ""
        self.exit_code = ExitCode.OK
        #: set once attached, negotiated and serving; tests and ``boot-test`` wait on it
        self.ready = asyncio.Event()
        self._changed = asyncio.Event()  # replaced after each VM event: see wait_until()
        #: guest resets already applied when the conduit passed the guest's PSCI reset call through;
        #: the QMP RESET event that follows each must not reset SDEI state a second time
        self._resets_applied_early = 0
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
        self.persisting = PersistingDispatcher(self.dispatcher, self.save_state)
        self.save_state()
        self.attach_seconds = time.perf_counter() - t0
        log.info(
            "attached to QEMU %s: %d vCPU(s), PSCI conduit %s, SDEI %s, PSCI %s, %d event(s), %.1f ms",
            facts.qemu_version,
            len(facts.vcpus),
            facts.psci_conduit.name,
            format_version(self.pins.sdei),
            format_version(self.pins.psci),
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

    def save_state(self) -> None:
        """Write the state file (atomic). Called after every dispatcher change."""
        assert self.dispatcher is not None and self.pins is not None
        self.store.save(StoredState(self.identity, self.pins, self.dispatcher.snapshot()))
        self.counters.state_writes += 1

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
                "name": facts.name,
                "uuid": str(facts.uuid) if facts.uuid else None,
                "qemu": str(facts.qemu_version),
                "machine": facts.machine_type,
                "gic_version": facts.gic_version,
                "psci_conduit": facts.psci_conduit.name.lower(),
                "runstate": self.session.status if self.session else None,
                "vcpus": [{"index": v.index, "mpidr": v.mpidr} for v in facts.vcpus],
            }
        if self.pins is not None:
            doc["pins"] = self.pins.to_dict()
        if self.dispatcher is not None:
            doc["sdei"] = self.dispatcher.describe()
        counters: dict[str, int] = dict(vars(self.counters))
        if self.conduit is not None:
            stats = vars(self.conduit.stats)
            counters.update({f"conduit_{k}": v for k, v in stats.items() if isinstance(v, int)})
        doc["counters"] = counters
        doc["attach_ms"] = round(self.attach_seconds * 1e3, 2)
        return doc

    def write_status(self) -> None:
        try:
            self.store.write_status(self.status())
        except OSError as err:  # status is informational; never let it stop the sidecar
            log.warning("could not write status: %s", err)

    # -- policy hooks used by the conduit ---------------------------------------------------------

    def psci_policy(self, vcpu: int, fid: int, x1: int, x2: int, x3: int) -> int | None:
        """Filter PSCI for the pinned version; keep SDEI state in step with vCPU power."""
        assert self.pins is not None and self.dispatcher is not None
        answer = psci_answer(self.pins.psci, fid, x1)
        if answer is None and fid in GUEST_RESET_CALLS:
            # Reset SDEI state now, before QEMU resets the VM and the guest runs again. Waiting for
            # QMP's RESET event would race with the guest's first calls after the reset: the event
            # and the next breakpoint stop arrive on different sockets in no guaranteed order.
            self.dispatcher.reset()
            self._resets_applied_early += 1
            self.save_state()
        elif answer is None and fid == psci.Function.CPU_OFF:
            # The vCPU powers down: its private events are gone and it comes back masked.
            self.dispatcher.reset_vcpu(vcpu)
            self.counters.vcpu_resets += 1
            self.save_state()
        return answer

    # -- running ----------------------------------------------------------------------------------

    def request_shutdown(self, reason: str, code: ExitCode = ExitCode.OK) -> None:
        if not self.shutdown.is_set():
            self.shutdown_reason = reason
            self.exit_code = code
            log.info("shutting down: %s", reason)
            self.shutdown.set()

    async def _follow_lifecycle(self) -> None:
        assert self.session is not None and self.dispatcher is not None
        # Not STOP/RESUME: with the conduit every trapped call makes a pair; runstate is tracked
        # by the session itself.
        kinds = {VmEventKind.RESET, VmEventKind.SHUTDOWN, VmEventKind.POWERDOWN, VmEventKind.MIGRATION}
        with self.session.subscribe(kinds) as events:
            async for event in events:
                self._on_vm_event(event)
                if event.kind is VmEventKind.DISCONNECTED:
                    self.request_shutdown("QEMU exited")
                    return

    def _on_vm_event(self, event: VmEvent) -> None:
        assert self.dispatcher is not None
        kind = event.kind
        if kind is VmEventKind.RESET:
            # SDEI state resets with the VM (all masked, nothing registered); the pins stay.
            if event.guest and self._resets_applied_early:
                self._resets_applied_early -= 1  # done when the conduit saw the PSCI call
            else:
                self.dispatcher.reset()
            self.counters.resets += 1
            self.counters.guest_resets += int(bool(event.guest))
            self.save_state()
            log.info("VM reset (%s): SDEI state cleared, versions kept", event.reason or "host")
            if self.conduit is not None:
                self._spawn(self.conduit.rearm(), "conduit.rearm")
        elif kind is VmEventKind.SHUTDOWN:
            log.info("VM shutdown (%s, %s)", "guest" if event.guest else "host", event.reason)
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
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %s", task.get_name(), task.exception())

    async def _status_writer(self, period: float = 2.0) -> None:
        """Refresh ``status.json`` now and then, so ``qmp-sdei status`` sees counters move."""
        while True:
            self.write_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.shutdown.wait(), period)
                return

    async def _serve_conduit(self) -> None:
        from qmp_sdei.conduit.service import serve_conduit  # noqa: PLC0415 (optional subsystem)

        await serve_conduit(self)

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

    async def run(self) -> ExitCode:
        """Serve until QEMU exits or a signal arrives; never raises for expected failures."""
        signals = self._install_signals()
        try:
            # A shutdown signal wins over the wait for QEMU (which may be long, or unbounded).
            starting = asyncio.create_task(self.start(), name="sidecar.start")
            stopping = asyncio.create_task(self.shutdown.wait(), name="sidecar.shutdown-wait")
            try:
                await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
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
                if self.config.conduit.enabled:
                    tasks.append(tg.create_task(self._serve_conduit(), name="conduit"))
                self.ready.set()
                await self.shutdown.wait()
                await self._stop_tasks(tasks)
        except* SdeiError as group:
            err = _first_leaf(group)
            self.request_shutdown(str(err), _exit_code_for(err))
            log.error("%s", err)
            if self.config.conduit.enabled and self.config.conduit.start_vm and self.conduit is None:
                log.warning("conduit.start_vm: the VM was not started, as the sidecar could not serve it")
        finally:
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
        persisting = self.persisting
        persisting.draining = True

        async def wait() -> None:
            while persisting.handlers_running():
                await persisting.wait_committed()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            running = {i: [f.event for f in v.stack] for i, v in enumerate(persisting.inner.vcpus) if v.stack}
            log.warning("detaching with SDEI handlers still running after %.0fs: %s", timeout, running)
            return False
        return True

    async def _stop_tasks(self, tasks: list[asyncio.Task[None]]) -> None:
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
                        self.conduit.vm_resumed()
            # No await between these two: from here no host event is accepted, nothing is entered,
            # and detach() makes the conduit's next stop its last.
            self.persisting.draining = True
            await self._release_conduit()
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)

    async def _settle(self, timeout: float) -> bool:
        """Keep serving until no handler runs and nothing is deliverable; False on timeout.

        Events deliverable when shutdown begins were promised: the host was told its event is
        deliverable, or a guest's SIGNAL succeeded. Withholding them would leave the guest waiting
        for a handler that never comes (running, but stuck).
        """
        persisting = self.persisting

        async def settled() -> None:
            while persisting.inner.deliverable() or persisting.handlers_running():
                await persisting.wait_committed()

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
        if self.conduit is not None:
            await self._release_conduit()
        if self.session is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.session.close(), SHUTDOWN_GRACE)
        if self.dispatcher is not None:
            self.write_status()
        self.store.release()


def _first_leaf(group: BaseExceptionGroup[SdeiError]) -> SdeiError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _exit_code_for(err: SdeiError) -> ExitCode:
    return err.exit_code  # one map, in errors.py
