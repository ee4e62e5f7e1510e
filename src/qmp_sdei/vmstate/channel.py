"""One call that opens the in-band migration channel for a VM: bus, service, QEMU object.

:func:`open_channel` is what the program layer calls once it is attached to QEMU over QMP and has
a dispatcher (source) or is ready to receive one (destination). In order:

1. start a private ``dbus-daemon`` in ``directory`` (:class:`~qmp_sdei.vmstate.bus.PrivateBus`);
2. serve ``org.qemu.VMState1`` on it with the given callbacks (:class:`VmstateService`);
3. add QEMU's ``dbus-vmstate`` object pointing at the bus with ``id-list=<state_id>``
   (:func:`~qmp_sdei.qemu.migration.add_dbus_vmstate`).

On exit the service and the bus stop, but **QEMU's object stays**, on purpose: while no sidecar
serves the VM's state, QEMU cannot reach a helper and every migration fails (the source resumes),
instead of moving the guest without its SDEI state. A sidecar that attaches again calls
:func:`open_channel` again, which replaces the object with one pointing at its new bus.

What it must not do: know what the bytes mean, or drive migrations.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from qmp_sdei.qemu.migration import DEFAULT_VMSTATE_OBJECT, add_dbus_vmstate
from qmp_sdei.qemu.qmp import QmpSession
from qmp_sdei.vmstate.bus import PrivateBus
from qmp_sdei.vmstate.service import DEFAULT_ID, LoadFn, SaveFn, VmstateService

__all__ = ["VmstateChannel", "open_channel"]


@dataclass(frozen=True)
class VmstateChannel:
    """An open channel: the bus and the service (for status output and for tests)."""

    bus: PrivateBus
    service: VmstateService
    object_id: str


@contextlib.asynccontextmanager
async def open_channel(
    session: QmpSession,
    directory: Path,
    *,
    save: SaveFn,
    load: LoadFn,
    state_id: str = DEFAULT_ID,
    object_id: str = DEFAULT_VMSTATE_OBJECT,
    allow_users: Sequence[str] = (),
) -> AsyncIterator[VmstateChannel]:
    """Open the channel for the QEMU behind ``session``; see the module docstring.

    :param directory: where the bus socket and config live (the sidecar's state directory, or a
        subdirectory of it; the unix socket path must stay under 108 bytes).
    :param allow_users: users besides our own that may connect to the bus (QEMU's, if it differs).
    :raise VmstateError: the bus or the service could not start.
    :raise MigrationError: QEMU refused the object (another dbus-vmstate object exists, or it
        cannot reach the bus).
    """
    async with (
        PrivateBus(directory, allow_users=allow_users) as bus,
        VmstateService(bus.address, save=save, load=load, state_id=state_id) as service,
    ):
        await add_dbus_vmstate(session, bus.address, id_list=[state_id], object_id=object_id)
        yield VmstateChannel(bus, service, object_id)
