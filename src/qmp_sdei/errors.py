"""The exception tree of qmp-sdei, and the exit code each kind of error ends the program with.

Every error this package raises on purpose derives from :class:`SdeiError`, so a caller can catch
one root. The children say *what kind* of thing went wrong, and wrap the underlying cause with
``raise ... from err`` so tracebacks (for bugs) still show it. Each class carries the
:class:`ExitCode` the command line exits with when it ends a command (``exit_code``); the CLI and
the daemon both read it from here, so the mapping exists once::

    SdeiError                                                       exit code
     +-- ConfigError          a config file or value is invalid      2 CONFIG (names the key)
     |    +-- GuestImageError  a guest ELF/kernel Image cannot give trap sites
     |    +-- StateDirError    the state directory cannot be used (names the path)
     +-- HostError            the host lacks something: a tool, a    2 CONFIG
     |    |                   download (the message says what)
     |    +-- KernelFetchError a Debian arm64 kernel could not be fetched
     |    +-- DtbError         dtc failed or is missing
     +-- CatalogueError       an event catalogue or topology is       2 CONFIG
     |                        invalid (at Dispatcher construction)
     +-- TriggerError         the host asked to raise an event that   2 CONFIG
     |                        cannot be raised that way
     +-- QemuError            QEMU is unreachable, not QEMU, or not   3 QEMU
     |    |                   a machine we can serve
     |    +-- QmpCommandError  a QMP command failed (in qemu/qmp.py, carries QEMU's error class)
     |    +-- MigrationError   a live migration failed, was cancelled, or ended unexpectedly
     |    +-- SharedRamUnavailable  QEMU's guest RAM cannot be mapped (not a shared backend)
     +-- VmstateError         the in-band migration channel failed    3 QEMU
     |                        (private D-Bus daemon, VMState1 service)
     +-- IncompatibleState    a state blob (or status file) is       4 STATE
     |                        damaged, unknown, or cannot be honoured here
     +-- VersionError         a requested or pinned SDEI/PSCI version 4 STATE
     |                        cannot be honoured
     +-- StateDirBusy         another sidecar holds the state dir    4 STATE
     +-- ConduitError         the gdbstub conduit failed (protocol    5 CONDUIT
     |                        error, lost connection)
     +-- NoStatus             ``status``: no sidecar has written a    6 NO_STATUS
     |                        status in that state directory
     +-- ControlError         the control API cannot be served, or a  7 UNREACHABLE
                              client cannot reach the sidecar or broker

Anything else that escapes is a bug: exit code 1, with the traceback in the log.
``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ExitCode(enum.IntEnum):
    """The program's exit codes (documented in the README)."""

    OK = 0  # QEMU exited, or SIGTERM/SIGINT; a command did what it was asked
    INTERNAL = 1  # a bug: the log has a traceback
    CONFIG = 2  # invalid command line or config, or the host lacks what the config needs
    QEMU = 3  # QEMU unreachable, not QEMU, or a machine we cannot serve
    STATE = 4  # versions cannot be honoured, or the saved state belongs elsewhere / is damaged
    CONDUIT = 5  # the gdbstub conduit failed
    NO_STATUS = 6  # ``status``: no sidecar has written a status in that state directory
    UNREACHABLE = 7  # ``raise``/``watch``/``migrate``/``status --mqtt``: the sidecar or broker is out of reach


class SdeiError(Exception):
    """Root of every error qmp-sdei raises deliberately."""

    #: what the program exits with when this error ends it; every child sets its own
    exit_code: ClassVar[ExitCode] = ExitCode.INTERNAL


class ConfigError(SdeiError):
    """A configuration file or value is invalid.

    The message names the offending key (``sdei.events[2].number``) and the problem.
    """

    exit_code = ExitCode.CONFIG


class CatalogueError(SdeiError):
    """An event catalogue or vCPU topology given to the dispatcher is invalid."""

    exit_code = ExitCode.CONFIG


class IncompatibleState(SdeiError):
    """A saved dispatcher state cannot be restored here.

    Raised for truncated or corrupted blobs, unknown format versions, and states from a VM whose
    catalogue, topology or pinned versions differ from this dispatcher's. Restoring never changes
    anything when this is raised.
    """

    exit_code = ExitCode.STATE


class VersionError(SdeiError):
    """A requested or pinned SDEI/PSCI version cannot be honoured."""

    exit_code = ExitCode.STATE


class TriggerError(SdeiError):
    """The host asked to raise an event in a way the catalogue does not allow."""

    exit_code = ExitCode.CONFIG


class QemuError(SdeiError):
    """QEMU is unreachable, is not QEMU, or runs a machine the sidecar cannot serve."""

    exit_code = ExitCode.QEMU


class MigrationError(QemuError):
    """A live migration failed, was cancelled, or reached a state the caller did not wait for.

    The message carries QEMU's ``error-desc`` when it gave one.
    """


class SharedRamUnavailable(QemuError):
    """The sidecar cannot map this QEMU's guest RAM (:mod:`qmp_sdei.qemu.guestram`).

    The guest RAM is private (no ``memory-backend-*,share=on`` of the VM's size among QEMU's
    files), the process is gone or belongs to another user, or no candidate holds the expected
    bytes. The message says what was looked at and how to start QEMU so that it works
    (``qmp-sdei qemu-args`` prints the arguments). Nothing was mapped or left open.
    """


class VmstateError(SdeiError):
    """The in-band migration channel failed: the private D-Bus daemon or the VMState1 service.

    Raised when the bus daemon cannot start, the service cannot connect or claim its name, or a
    state is too large for QEMU's dbus-vmstate to carry.
    """

    exit_code = ExitCode.QEMU


class ConduitError(SdeiError):
    """The guest conduit (QEMU's gdbstub) failed: protocol error, lost connection, bad reply."""

    exit_code = ExitCode.CONDUIT


class HostError(SdeiError):
    """The host lacks something the sidecar needs: a tool is missing or failed, a download failed."""

    exit_code = ExitCode.CONFIG


class KernelFetchError(HostError):
    """A Debian arm64 kernel could not be resolved, downloaded or unpacked (the message says which)."""


class DtbError(HostError):
    """dtc is missing, or failed to decompile/compile the tree (the message has its diagnostics)."""


class GuestImageError(ConfigError):
    """A guest image or its symbol table cannot be used to find trap sites.

    Subclasses :class:`~qmp_sdei.errors.ConfigError` because the image is something the user
    configured; the message names the file and what is wrong with it.
    """


class StateDirError(ConfigError):
    """The configured state directory cannot be used: not a directory, not writable, on a read-only
    file system, or under ``/proc`` or ``/sys``. The message names the path."""


class StateDirBusy(SdeiError):
    """Another sidecar holds this state directory."""

    exit_code = ExitCode.STATE


class NoStatus(SdeiError):
    """``qmp-sdei status``: no sidecar has written a status file in that state directory yet."""

    exit_code = ExitCode.NO_STATUS


class ControlError(SdeiError):
    """The control API cannot be served (socket in use, broker refused us) or reached by a client."""

    exit_code = ExitCode.UNREACHABLE
