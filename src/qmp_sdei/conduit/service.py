"""Run the gdbstub conduit as one of the sidecar's components: find trap sites, reach the stub
(starting it over QMP if QEMU has none), serve until the VM goes, and keep the conduit in step with
the VM's runstate as QMP reports it.

It is handed what it needs (the QMP session, the SDEI owner, its settings) and imports nothing of
the program layer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from qmp_sdei.conduit.el2 import attach_conduit
from qmp_sdei.conduit.gdbstub import GdbstubConduit, SdeiPort
from qmp_sdei.conduit.mailbox import RamWindow
from qmp_sdei.conduit.rsp import RspClient
from qmp_sdei.conduit.traps import elf_trap_sites, linux_trap_sites, load_kallsyms, merge_sites
from qmp_sdei.config import parse_tcp
from qmp_sdei.errors import ConduitError, ConfigError, GuestImageError, SdeiError, SharedRamUnavailable
from qmp_sdei.qemu.guestram import map_guest_ram, map_guest_ram_file, qemu_pid_of_thread
from qmp_sdei.qemu.migration import wait_left_finish_migrate
from qmp_sdei.qemu.qmp import EventSubscription, QmpSession, VmEventKind, gdbstub_address, start_gdbstub
from qmp_sdei.stub import MAGIC, StubLayout

if TYPE_CHECKING:
    from qmp_sdei.config import ConduitSettings

log = logging.getLogger("qmp_sdei.conduit")


async def find_trap_sites(settings: ConduitSettings) -> list[int]:
    """Addresses to trap: the ELF's and/or the kernel's hvc/smc sites plus configured extras."""
    groups: list[list[int]] = [list(settings.trap_sites)]
    try:
        if settings.elf is not None:
            groups.append(await asyncio.to_thread(elf_trap_sites, settings.elf))
        if settings.kernel is not None:
            kernel = settings.kernel
            kallsyms = await asyncio.to_thread(load_kallsyms, kernel)
            groups.append(await asyncio.to_thread(linux_trap_sites, kernel, kallsyms))
    except SdeiError:
        raise
    except OSError as err:
        raise GuestImageError(f"cannot read the guest image for trap sites: {err}") from err
    sites = merge_sites(*groups)
    if not sites:  # a config error: the images configured hold no hvc/smc to trap
        raise ConfigError(
            "the conduit is enabled but has no trap sites: set conduit.elf, conduit.kernel or conduit.trap_sites"
        )
    return sites


async def serve_conduit(
    session: QmpSession,
    owner: SdeiPort,
    settings: ConduitSettings,
    *,
    on_attached: Callable[[GdbstubConduit], None],
    start_vm: bool = False,
    stops_need_our_resume: bool = True,
    guest_arrival: Callable[[], Awaitable[bool]] | None = None,
    vcpus: int = 0,
    memory_mb: int = 0,
    vcpu_thread: int | None = None,
) -> None:
    """Attach the conduit and serve until the VM exits or the task is cancelled.

    :param on_attached: told the conduit once it is attached, before the VM is resumed.
    :param guest_arrival: on a migration destination, waits until the guest has arrived (the
        gdbstub must not be attached before) and says whether to run it. What needs no guest (the
        gdbstub's address, the trap sites in the ELF) is done before, as the time between the
        arrival and the guest running is downtime.
    :param vcpus: the VM's vCPU count, if known (saves round trips while attaching).
    :param memory_mb: the VM's RAM size, if known (where a firmware-booted stub can be).
    :param vcpu_thread: the host thread id of one of QEMU's vCPUs (QMP gives it), which leads to
        QEMU's process and its guest RAM: with both this and ``memory_mb`` the EL2 stub's calls
        can be answered through its mailbox (``settings.mailbox``).
    :param stops_need_our_resume: the stub reports a stop only after a resume of the debugger's
        (QEMU 8.1 and later; see :func:`~qmp_sdei.conduit.gdbstub.stub_reports_only_our_resumes`).
    """
    if settings.gdb:
        host, port = parse_tcp(settings.gdb, "conduit.gdb")
    else:
        existing = await gdbstub_address(session)
        host, port = existing if existing is not None else await start_gdbstub(session)
    early_sites: asyncio.Task[list[int]] | None = None
    if guest_arrival is not None:
        early_sites = asyncio.create_task(find_trap_sites(settings), name="conduit.trap-sites")
        # Unused when the guest booted through the EL2 stub: its outcome must still be taken.
        early_sites.add_done_callback(lambda task: task.cancelled() or task.exception())
    try:
        if guest_arrival is not None:
            start_vm = await guest_arrival()

        async def trap_sites() -> list[int]:
            return await (early_sites if early_sites is not None else find_trap_sites(settings))

        # "debug" means a gdbstub stop: a sidecar before us died holding it. Ours to resume, unlike
        # a VM its owner paused or started with -S. An arrived guest runs as its source did (the
        # query is skipped there: QEMU answers it late, right after the incoming migration).
        was_running = guest_arrival is None and await session.refresh_runstate() in ("running", "debug")
        map_ram = _guest_ram_mapper(vcpu_thread, memory_mb, settings.guest_ram) if settings.mailbox else None
        conduit = await attach_conduit(  # the EL2 stub's trap site if the VM booted through it
            host,
            port,
            owner,
            trap_sites,
            kernel=settings.kernel,
            timeout=30.0,
            vcpus=vcpus,
            memory_mb=memory_mb,
            map_ram=map_ram,
        )
    finally:
        if early_sites is not None:
            early_sites.cancel()
    conduit.follow_owner(session.refresh_runstate, stops_need_our_resume=stops_need_our_resume)
    on_attached(conduit)
    log.info("conduit attached to %s:%d with %d trap site(s)", host, port, len(conduit.trap_sites))
    resume = was_running or start_vm or settings.start_vm
    with session.subscribe({VmEventKind.RESUME}) as resumes:
        watcher = asyncio.create_task(_follow_resumes(session, conduit, resumes), name="conduit.resumes")
        try:
            await conduit.run(resume=resume)
        finally:
            watcher.cancel()
    if conduit.exit_reason is not None:
        log.info("conduit stopped: %s", conduit.exit_reason)


def map_stub_areas(source: int | Path, memory_mb: int, layout: StubLayout) -> RamWindow:
    """Map the EL2 stub, header to per-CPU areas, from shared guest RAM that holds the stub's
    header there: QEMU process ``source``'s RAM file (found among its open files), or the RAM
    file at path ``source`` (``[conduit] guest_ram``). :raise SharedRamUnavailable: none such."""
    window = (layout.base, layout.areas_end - layout.base)
    magic = (layout.base + 8, MAGIC)
    if isinstance(source, Path):
        return map_guest_ram_file(source, memory_mb, *window, magic=magic)
    return map_guest_ram(source, memory_mb, *window, magic=magic)


def _guest_ram_mapper(
    vcpu_thread: int | None, memory_mb: int, path: Path | None
) -> Callable[[StubLayout], RamWindow] | None:
    """How to map the part of guest RAM the EL2 stub's mailboxes are in, or None if unknown:
    through the file the configuration names, else through QEMU's process (a vCPU thread's)."""
    if memory_mb <= 0 or (path is None and vcpu_thread is None):
        return None
    thread = vcpu_thread

    def map_stub(layout: StubLayout) -> RamWindow:
        if path is not None:
            try:
                return map_stub_areas(path, memory_mb, layout)
            except SharedRamUnavailable as err:  # configured, so not what the operator expects
                log.warning("[conduit] guest_ram: %s", err)
                raise
        assert thread is not None
        return map_stub_areas(qemu_pid_of_thread(thread), memory_mb, layout)

    return map_stub


async def _follow_resumes(session: QmpSession, conduit: GdbstubConduit, resumes: EventSubscription) -> None:
    """Tell a holding conduit when the VM's owner resumes it (QMP ``cont``)."""
    async for _event in resumes:
        if conduit.held:
            await conduit.owner_resumed()


async def resume_from_switchover_stop(session: QmpSession, settings: ConduitSettings, *, timeout: float) -> bool:
    """Run again, through the gdbstub, a VM that a migration's switchover stopped (``finish-migrate``)
    while no conduit is attached; whether it left ``finish-migrate``.

    For a sidecar that finds an orphaned migration at its pre-switchover pause (ours died during
    it) and was running the guest: QEMU may have recorded ``debug`` for it (stopped at one of the
    dead conduit's breakpoints), and then aborts when the migration is cancelled while the VM is
    still in ``finish-migrate`` (QEMU 8.1 and later). QMP ``cont`` refuses that runstate; a gdbstub
    continue does not. The guest may stop again at a breakpoint left by the dead conduit: that
    ``debug`` is the conduit's to serve once it attaches.
    """
    if settings.gdb:
        host, port = parse_tcp(settings.gdb, "conduit.gdb")
    else:
        address = await gdbstub_address(session)
        if address is None:
            return False  # no gdbstub: nobody can have left the VM at a breakpoint
        host, port = address
    with session.subscribe({VmEventKind.RESUME}) as resumes:
        try:
            client = await RspClient.connect(host, port, timeout=timeout)
        except ConduitError as err:
            log.warning("cannot reach the gdbstub to run the VM before the cancel: %s", err)
            return False
        try:
            client.resume()
            return await wait_left_finish_migrate(session, resumes, timeout)
        finally:
            await client.close()
