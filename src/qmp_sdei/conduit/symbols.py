"""The symbol conduit's self-check: is the kernel really where its symbols say, and do the trap
sites still hold the calls they were found at?

The gdbstub conduit traps a Linux guest at addresses computed from the kernel image on the host
(link addresses, valid only with ``nokaslr``). A kernel that booted with KASLR, or a guest running a
different kernel than the image given (an update inside the guest), would otherwise be trapped
nowhere: no stop, no error, and the guest quietly sees QEMU's own PSCI and no SDEI. This conduit
looks at ``VBAR_EL1`` as soon as the kernel runs (every few milliseconds while the guest boots):
its distance from the link address of ``vectors`` is the KASLR offset, and the trap sites are moved
by it, between the kernel installing its vectors (~10 ms into a boot) and its first PSCI call
(~100 ms). Every (moved) kernel trap site must hold ``hvc #0`` or ``smc #0`` (or the ``nop`` KPTI
patches over the inline SDEI exit), and if the sites were moved, the guest's first trapped call
must be its PSCI probe's first (PSCI_VERSION): otherwise it already ran its probes untrapped.
Each failure ends the conduit with a :class:`~qmp_sdei.errors.ConduitError` naming the cause and
the remedy: loud in the log, ``status`` and the exit code, never silent.

It only adds checks; trapping and delivery are :class:`GdbstubConduit`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from qmp_sdei.abi import psci
from qmp_sdei.abi.smccc import function_id
from qmp_sdei.conduit.gdbstub import GdbstubConduit, SdeiPort
from qmp_sdei.conduit.rsp import CoreRegs, RspClient, StopReply, ThreadId
from qmp_sdei.conduit.traps import CONDUIT_INSNS
from qmp_sdei.errors import ConduitError

log = logging.getLogger(__name__)

NOP = 0xD503201F  # KPTI replaces the inline SDEI exit (smc/hvc) by nops; the trampoline is used
CHECK_INTERVAL = 0.2  # seconds between looks while the kernel has not set VBAR_EL1 yet
EARLY_CHECK_INTERVAL = 0.005  # ... during the first EARLY_CHECK_PERIOD, to beat the first PSCI call
EARLY_CHECK_PERIOD = 3.0
KASLR_ALIGN = 0x1_0000  # KASLR offsets are multiples of 64 KiB (2 MiB for a direct boot)
PSTATE_EL_MASK = 0xC
PSTATE_EL1 = 0x4


class KernelCheckedConduit(GdbstubConduit):
    """A :class:`GdbstubConduit` for a Linux guest that verifies its kernel trap sites at run time.

    :param vectors: link addresses ``VBAR_EL1`` may hold in the kernel: ``vectors`` first, then
        any Spectre-BHB variants (``__bp_harden_el1_vectors`` slots) a CPU may switch to.
    :param kernel_sites: the sites found in the kernel image (checked for hvc/smc); other trap
        sites (configured, or from an ELF) are trusted as given.
    """

    def __init__(
        self,
        rsp: RspClient,
        dispatcher: SdeiPort,
        trap_sites: Sequence[int],
        *,
        vectors: Sequence[int],
        kernel_sites: Sequence[int],
        timeout: float = 10.0,
    ) -> None:
        super().__init__(rsp, dispatcher, trap_sites, timeout=timeout)
        self.vectors = tuple(vectors)
        self.kernel_sites = tuple(kernel_sites)
        #: None until checked; then True (sites verified) or the error that ends the conduit
        self.verified: bool | None = None
        self._failure: ConduitError | None = None
        self._checker: asyncio.Task[None] | None = None
        self.link_sites = frozenset(self.trap_sites)
        #: the KASLR offset the kernel trap sites were moved by (0: none)
        self.offset = 0
        self._first_call_pending = False  # sites moved: the next trapped call must be PSCI_VERSION

    async def run(self, *, resume: bool = True) -> None:
        self._checker = asyncio.create_task(self._check_until_verified(), name="conduit.kernel-check")
        try:
            await super().run(resume=resume)
        finally:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConduitError):
                await self._checker

    async def _handle_stop(self, stop: StopReply, *, ours: bool = True) -> None:
        await super()._handle_stop(stop, ours=ours)
        if self._failure is not None:
            raise self._failure

    async def _check_until_verified(self) -> None:
        await self.serving.wait()
        started = asyncio.get_running_loop().time()
        while self.verified is None and not self._stop_requested():
            with contextlib.suppress(ConduitError):
                await self._at_next_stop(self._check)
            if self._failure is not None:
                if self._running:
                    self._interrupt()  # the loop raises it at that stop
                return
            if self.verified is None:  # the kernel has not got far enough yet
                early = asyncio.get_running_loop().time() - started < EARLY_CHECK_PERIOD
                await asyncio.sleep(EARLY_CHECK_INTERVAL if early else CHECK_INTERVAL)

    async def _trap(self, thread: ThreadId, core: CoreRegs) -> ThreadId | None:
        if self._first_call_pending:
            self._first_call_pending = False
            fid = function_id(core.x[0])
            if fid != psci.Function.PSCI_VERSION:
                self._fail(
                    f"the guest kernel runs at KASLR offset {self.offset:#x}, found only after it had made its "
                    f"first firmware calls untrapped (the first trapped call is {fid:#x}, not PSCI_VERSION): it "
                    "has seen QEMU's own PSCI and no SDEI. Reboot the guest, boot it with 'nokaslr', or boot it "
                    "through the EL2 stub (qmp-sdei qemu-args)"
                )
        return await super()._trap(thread, core)

    def _offset_for(self, vbar: int) -> int | None:
        """The KASLR offset that puts one of the kernel's vector tables at ``vbar``, if any."""
        for link in self.vectors:
            if (vbar - link) % KASLR_ALIGN == 0:
                return vbar - link
        return None

    async def _move_sites(self, offset: int) -> None:
        moved = {site + offset for site in self.kernel_sites}
        for site in sorted(self.link_sites & set(self.kernel_sites)):
            await self.rsp.remove_breakpoint(site)
        self.trap_sites = frozenset((self.trap_sites - set(self.kernel_sites)) | moved)
        for site in sorted(moved):
            await self.rsp.insert_breakpoint(site)
        self.offset = offset
        self._first_call_pending = self.stats.traps == 0

    async def rearm(self) -> None:
        """After a VM reset the kernel boots again at a new offset: back to the link addresses,
        and check again."""

        async def reset_sites() -> None:
            if self.offset:
                for site in sorted(self.trap_sites - self.link_sites):
                    await self.rsp.remove_breakpoint(site)
                self.trap_sites = self.link_sites
                self.offset = 0
            await self._arm()

        await self._at_next_stop(reset_sites)
        self.verified = None
        self._first_call_pending = False
        if self._checker is None or self._checker.done():
            self._checker = asyncio.create_task(self._check_until_verified(), name="conduit.kernel-check")

    async def _check(self) -> None:
        """At a stop: decide from vCPU 0's VBAR_EL1 and the trap sites' bytes, or wait longer."""
        assert self.registers is not None
        await self._select(self.threads[0])
        core = await self.rsp.read_core()
        if core.cpsr & PSTATE_EL_MASK != PSTATE_EL1:
            return  # at EL0 VBAR_EL1 may be KPTI's trampoline vectors: look again later
        vbar = await self.rsp.read_register(self.registers["VBAR_EL1"].regnum)
        if vbar == 0:
            return  # the kernel has not installed its vectors yet
        offset = self._offset_for(vbar)
        if offset is None:
            self._fail(
                f"the guest kernel's vectors are at {vbar:#x}, which no KASLR offset of the image's vectors "
                f"({self.vectors[0]:#x}) explains: the guest runs another kernel than the image given, so none "
                "of its calls are trapped. Give the sidecar the guest's kernel, or boot it through the EL2 stub "
                "(qmp-sdei qemu-args)"
            )
            return
        stale: list[str] = []
        patched = 0
        for site in self.kernel_sites:
            word = int.from_bytes(await self.rsp.read_memory(site + offset, 4), "little")
            if word == NOP:
                patched += 1
            elif word not in CONDUIT_INSNS:
                stale.append(f"{site + offset:#x} holds {word:#010x}")
        if stale:
            self._fail(
                "trap sites do not hold hvc/smc, so the running kernel is not the image the sidecar read: "
                + ", ".join(stale)
            )
            return
        if patched:
            log.info("%d trap site(s) patched to nop by the kernel (KPTI's SDEI exit moves to its trampoline)", patched)
        if offset:
            await self._move_sites(offset)
            log.warning(
                "the guest kernel runs at KASLR offset %#x: its %d trap sites were moved by it%s",
                offset,
                len(self.kernel_sites),
                "" if self._first_call_pending else " after it had already made trapped calls",
            )
        else:
            log.info("kernel trap sites verified: vectors at their link address, %d site(s)", len(self.kernel_sites))
        self.verified = True

    def _fail(self, message: str) -> None:
        log.error("%s", message)
        self._failure = ConduitError(message)
        self.verified = False
