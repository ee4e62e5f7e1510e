"""The in-band migration channel: the SDEI state rides inside QEMU's migration stream.

* :mod:`.bus`: a private ``dbus-daemon`` per VM (:class:`PrivateBus`).
* :mod:`.service`: the ``org.qemu.VMState1`` service QEMU's ``dbus-vmstate`` object calls
  (:class:`VmstateService`), backed by a save and a load callback.
* :mod:`.channel`: :func:`open_channel`, the one call that starts both and adds QEMU's object.
* :mod:`.payload`: the blob that rides (pinned versions plus the dispatcher snapshot).

QEMU's side (adding the ``dbus-vmstate`` object, driving a migration) is in
:mod:`qmp_sdei.qemu.migration`. Nothing here knows what the bytes mean; the program layer passes
callbacks that snapshot and restore the dispatcher. See ``docs/migration.md``.
"""

from qmp_sdei.vmstate.bus import PrivateBus
from qmp_sdei.vmstate.channel import VmstateChannel, open_channel
from qmp_sdei.vmstate.payload import MigrationPayload, decode_payload, encode_payload
from qmp_sdei.vmstate.service import DEFAULT_ID, MAX_STATE_BYTES, VmstateService, VmstateStats

__all__ = [
    "DEFAULT_ID",
    "MAX_STATE_BYTES",
    "MigrationPayload",
    "PrivateBus",
    "VmstateChannel",
    "VmstateService",
    "VmstateStats",
    "decode_payload",
    "encode_payload",
    "open_channel",
]
