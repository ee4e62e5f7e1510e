"""Run the gdbstub conduit for a :class:`~qmp_sdei.daemon.Sidecar`: find trap sites, reach the
stub (starting it over QMP if QEMU has none), serve until the VM goes, and keep the conduit in step
with the VM's runstate as QMP reports it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from qmp_sdei.conduit.gdbstub import GdbstubConduit, stub_reports_only_our_resumes
from qmp_sdei.conduit.traps import elf_trap_sites, linux_trap_sites, load_kallsyms, merge_sites
from qmp_sdei.errors import ConduitError, SdeiError
from qmp_sdei.qemu.qmp import EventSubscription, VmEventKind, gdbstub_address, start_gdbstub

if TYPE_CHECKING:
    from qmp_sdei.config import ConduitSettings
    from qmp_sdei.daemon import Sidecar

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
        raise ConduitError(f"cannot read the guest image for trap sites: {err}") from err
    sites = merge_sites(*groups)
    if not sites:
        raise ConduitError(
            "the conduit is enabled but has no trap sites: set conduit.elf, conduit.kernel or conduit.trap_sites"
        )
    return sites


def _parse_tcp(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    return host, int(port)


async def serve_conduit(sidecar: Sidecar, *, start_vm: bool = False) -> None:
    """Attach the conduit and serve until the VM exits or the sidecar shuts down."""
    assert sidecar.session is not None
    session = sidecar.session
    settings = sidecar.config.conduit
    sites = await find_trap_sites(settings)
    if settings.gdb:
        host, port = _parse_tcp(settings.gdb)
    else:
        existing = await gdbstub_address(session)
        host, port = existing if existing is not None else await start_gdbstub(session)
    # "debug" means a gdbstub stop: a sidecar before us died holding it. Ours to resume, unlike a
    # VM its owner paused or started with -S.
    was_running = await session.refresh_runstate() in ("running", "debug")
    assert sidecar.facts is not None
    qemu = sidecar.facts.qemu_version
    conduit = await GdbstubConduit.attach(
        host,
        port,
        sidecar.persisting,
        sites,
        psci_filter=sidecar.psci_policy,
        on_commit=sidecar.persisting.commit,
        timeout=30.0,
        runstate=session.refresh_runstate,
        stops_need_our_resume=stub_reports_only_our_resumes(qemu.major, qemu.minor),
    )
    sidecar.conduit = conduit
    sidecar.conduit_ready.set()
    log.info("conduit attached to %s:%d with %d trap site(s)", host, port, len(sites))
    resume = was_running or start_vm or sidecar.config.conduit.start_vm
    with session.subscribe({VmEventKind.RESUME}) as resumes:
        watcher = asyncio.create_task(_follow_resumes(sidecar, conduit, resumes), name="conduit.resumes")
        try:
            await conduit.run(resume=resume)
        finally:
            watcher.cancel()
    if conduit.exit_reason is not None:
        log.info("conduit stopped: %s", conduit.exit_reason)


async def _follow_resumes(sidecar: Sidecar, conduit: GdbstubConduit, resumes: EventSubscription) -> None:
    """Tell a holding conduit when the VM's owner resumes it (QMP ``cont``)."""
    assert sidecar.session is not None
    async for _event in resumes:
        if conduit.held:
            await conduit.owner_resumed()
