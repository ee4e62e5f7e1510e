"""The exception tree of qmp-sdei.

Every error this package raises on purpose derives from :class:`SdeiError`, so a caller can catch
one root. The children say *what kind* of thing went wrong, and wrap the underlying cause with
``raise ... from err`` so tracebacks (for bugs) still show it::

    SdeiError
     +-- ConfigError          a config file or value is invalid (names the key)
     |    +-- GuestImageError  a guest ELF/kernel Image cannot give trap sites
     +-- CatalogueError       an event catalogue or topology is invalid (at Dispatcher construction)
     +-- IncompatibleState    a state blob is damaged, unknown, or cannot be honoured here
     +-- VersionError         a requested or pinned SDEI/PSCI version cannot be honoured
     +-- TriggerError         the host asked to raise an event that cannot be raised that way
     +-- QemuError            QEMU is unreachable, not QEMU, or not a machine we can serve
     |    +-- QmpCommandError  a QMP command failed (in qemu/qmp.py, carries QEMU's error class)
     |    +-- MigrationError   a live migration failed, was cancelled, or ended in a state we did not expect
     +-- VmstateError         the in-band migration channel failed (private D-Bus daemon, VMState1 service)
     +-- ConduitError         the gdbstub conduit failed (protocol error, lost connection)
     +-- StateDirBusy         another sidecar holds the state directory
 +-- ControlError         the control API cannot be served or reached (socket, broker, bad reply)
     +-- KernelFetchError     a Debian arm64 kernel could not be fetched
     +-- DtbError             dtc failed or is missing

``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations


class SdeiError(Exception):
    """Root of every error qmp-sdei raises deliberately."""


class ConfigError(SdeiError):
    """A configuration file or value is invalid.

    The message names the offending key (``sdei.events[2].number``) and the problem.
    """


class CatalogueError(SdeiError):
    """An event catalogue or vCPU topology given to the dispatcher is invalid."""


class IncompatibleState(SdeiError):
    """A saved dispatcher state cannot be restored here.

    Raised for truncated or corrupted blobs, unknown format versions, and states from a VM whose
    catalogue, topology or pinned versions differ from this dispatcher's. Restoring never changes
    anything when this is raised.
    """


class VersionError(SdeiError):
    """A requested or pinned SDEI/PSCI version cannot be honoured."""


class TriggerError(SdeiError):
    """The host asked to raise an event in a way the catalogue does not allow."""


class QemuError(SdeiError):
    """QEMU is unreachable, is not QEMU, or runs a machine the sidecar cannot serve."""


class MigrationError(QemuError):
    """A live migration failed, was cancelled, or reached a state the caller did not wait for.

    The message carries QEMU's ``error-desc`` when it gave one.
    """


class VmstateError(SdeiError):
    """The in-band migration channel failed: the private D-Bus daemon or the VMState1 service.

    Raised when the bus daemon cannot start, the service cannot connect or claim its name, or a
    state is too large for QEMU's dbus-vmstate to carry.
    """


class ConduitError(SdeiError):
    """The guest conduit (QEMU's gdbstub) failed: protocol error, lost connection, bad reply."""


class KernelFetchError(SdeiError):
    """A Debian arm64 kernel could not be resolved, downloaded or unpacked (the message says which)."""


class DtbError(SdeiError):
    """dtc is missing, or failed to decompile/compile the tree (the message has its diagnostics)."""


class GuestImageError(ConfigError):
    """A guest image or its symbol table cannot be used to find trap sites.

    Subclasses :class:`~qmp_sdei.errors.ConfigError` because the image is something the user
    configured; the message names the file and what is wrong with it.
    """


class StateDirBusy(SdeiError):
    """Another sidecar holds this state directory."""


class ControlError(SdeiError):
    """The control API cannot be served (socket in use, broker refused us) or reached by a client."""
