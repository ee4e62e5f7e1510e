"""A control service over a real SdeiOwner and Dispatcher, with a stand-in for the guest.

For transport tests that need no QEMU: the stand-in plays the conduit's part the way a guest with
handlers registered behaves — on a delivery request it handles one stop that enters every
deliverable handler and completes it at once (EVENT_COMPLETE), so every accepted raise is
``delivered`` and leaves the state as it found it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from qmp_sdei.control.commands import ControlService
from qmp_sdei.owner import SdeiOwner
from qmp_sdei.versions import VersionPins
from support.sdei import PRIVATE, SHARED, F, interrupted_regs, make, register


class GuestStandIn:
    def __init__(self, owner: SdeiOwner) -> None:
        self.owner = owner
        self.stops = 0
        self.handled = 0
        owner.bind_delivery(self.request_delivery)

    def request_delivery(self) -> None:
        asyncio.get_running_loop().call_soon(self.stop)

    def stop(self) -> None:
        """One breakpoint stop: enter each deliverable handler and complete it."""
        owner = self.owner
        self.stops += 1
        owner.begin_stop()
        try:
            for vcpu in owner.deliverable():
                regs = interrupted_regs(vcpu)
                if owner.deliver(vcpu, regs):
                    regs.x[0] = F.EVENT_COMPLETE
                    owner.hypercall(vcpu, regs)
                    self.handled += 1
            owner.commit()
        finally:
            owner.end_stop()

    def guest_calls(self, count: int) -> None:
        """``count`` stops of guest SDEI calls (mask, unmask on vCPU 0): the guest keeps running."""
        for _ in range(count):
            self.owner.begin_stop()
            for fid in (F.PE_MASK, F.PE_UNMASK):
                regs = interrupted_regs()
                regs.x[0] = fid
                self.owner.hypercall(0, regs)
            self.owner.commit()
            self.owner.end_stop()


def serving_owner(vcpus: int = 2) -> tuple[SdeiOwner, GuestStandIn]:
    """An owner whose guest registered, enabled and unmasked PRIVATE on every vCPU and SHARED."""
    owner = SdeiOwner(make(vcpus=vcpus), pins=VersionPins((1, 1), 0, (1, 0)))
    for vcpu in range(vcpus):
        register(owner.dispatcher, vcpu, PRIVATE)
    register(owner.dispatcher, 0, SHARED)
    return owner, GuestStandIn(owner)


def control_service(vm_name: str = "vm1", vcpus: int = 2) -> tuple[ControlService, GuestStandIn]:
    owner, guest = serving_owner(vcpus)

    def status() -> dict[str, Any]:
        return {"vm": {"name": vm_name}, "counters": dict(vars(owner.counters))}

    return ControlService(owner, status, vm_name=vm_name), guest
