"""The symbol conduit's self-check: is the kernel really where its symbols say, and do the trap
sites still hold the calls they were found at?

The gdbstub conduit traps a Linux guest at addresses computed from the kernel image on the host
(link addresses, valid only with ``nokaslr``). A kernel that booted with KASLR, or a guest running a
different kernel than the image given (an update inside the guest), would otherwise be trapped
nowhere: no stop, no error, and the guest quietly sees QEMU's own PSCI and no SDEI. This conduit
checks, as soon as the kernel runs, that ``VBAR_EL1`` equals the link address of ``vectors`` (the
distance between them is the KASLR offset) and that every kernel trap site holds ``hvc #0`` or
``smc #0`` (or the ``nop`` KPTI patches over the inline SDEI exit). A mismatch ends the conduit
with a :class:`~qmp_sdei.errors.ConduitError` naming the cause and the remedy: loud in the log,
``status`` and the exit code, never silent.

It only adds checks; trapping and delivery are :class:`GdbstubConduit`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from qmp_sdei.conduit.gdbstub import GdbstubConduit, SdeiPort
from qmp_sdei.conduit.rsp import RspClient, StopReply
from qmp_sdei.conduit.traps import CONDUIT_INSNS
from qmp_sdei.errors import ConduitError

log = logging.getLogger(__name__)

NOP = 0xD503201F  # KPTI replaces the inline SDEI exit (smc/hvc) by nops; the trampoline is used
CHECK_INTERVAL = 0.2  # seconds between looks while the kernel has not set VBAR_EL1 yet
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
        while self.verified is None and not self._stop_requested():
            with contextlib.suppress(ConduitError):
                await self._at_next_stop(self._check)
            if self._failure is not None:
                if self._running:
                    self._interrupt()  # the loop raises it at that stop
                return
            if self.verified is None:
                await asyncio.sleep(CHECK_INTERVAL)  # the kernel has not got far enough yet

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
        if vbar not in self.vectors:
            link = self.vectors[0]
            self._fail(
                f"the guest kernel's vectors are at {vbar:#x}, not at their link address {link:#x} "
                f"(KASLR offset {vbar - link:#x}, or another kernel than the image given): the trap "
                "sites are link addresses, so none of the guest's calls are trapped and it sees QEMU's own "
                "PSCI and no SDEI. Boot the guest with 'nokaslr', or through the EL2 stub (qmp-sdei qemu-args)"
            )
            return
        stale: list[str] = []
        patched = 0
        for site in self.kernel_sites:
            word = int.from_bytes(await self.rsp.read_memory(site, 4), "little")
            if word == NOP:
                patched += 1
            elif word not in CONDUIT_INSNS:
                stale.append(f"{site:#x} holds {word:#010x}")
        if stale:
            self._fail(
                "trap sites do not hold hvc/smc, so the running kernel is not the image the sidecar read: "
                + ", ".join(stale)
            )
            return
        if patched:
            log.info("%d trap site(s) patched to nop by the kernel (KPTI's SDEI exit moves to its trampoline)", patched)
        log.info("kernel trap sites verified: vectors at their link address, %d site(s)", len(self.kernel_sites))
        self.verified = True

    def _fail(self, message: str) -> None:
        log.error("%s", message)
        self._failure = ConduitError(message)
        self.verified = False
