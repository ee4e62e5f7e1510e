"""A private ``dbus-daemon`` for one VM's dbus-vmstate traffic: started, addressed, always stopped.

QEMU's ``dbus-vmstate`` object reaches its helpers over a D-Bus bus given by address. The sidecar
does not use the system or session bus for that: each VM gets its own bus daemon, listening on a
unix socket in a directory the sidecar owns, so nothing else on the host can claim the VM's state
name or read the state as it passes.

:class:`PrivateBus` writes the daemon's configuration file next to the socket, starts
``dbus-daemon --nofork --print-address``, reads the address it prints (the daemon listens before
it prints), and stops it (SIGTERM, then SIGKILL) however the ``async with`` block ends.

What it must not do: know about SDEI or QEMU, or leave a daemon running behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final
from xml.sax.saxutils import escape, quoteattr

from qmp_sdei.errors import VmstateError

__all__ = ["DBUS_DAEMON", "PrivateBus", "escape_address_value"]

log = logging.getLogger(__name__)

DBUS_DAEMON: Final = "dbus-daemon"
_UNIX_PATH_MAX: Final = 107  # sun_path holds 108 bytes including the terminating NUL
# D-Bus addresses pass these bytes through; every other byte is written as %XX.
_ADDRESS_SAFE: Final = frozenset(b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_/.\\*")


def escape_address_value(value: str) -> str:
    """Escape a value for a D-Bus address (``unix:path=<value>``), as the D-Bus spec requires.

    Without it a path with, say, a ``+`` or a space gives a bus daemon that refuses to start.
    """
    return "".join(chr(b) if b in _ADDRESS_SAFE else f"%{b:02x}" for b in os.fsencode(value))


def _config(socket_path: Path, allow_users: Sequence[str]) -> str:
    users = "".join(f"\n    <allow user={quoteattr(user)}/>" for user in allow_users)
    return f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>qmp-sdei-vmstate</type>
  <listen>{escape("unix:path=" + escape_address_value(str(socket_path)))}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">{users}
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class PrivateBus:
    """One ``dbus-daemon`` listening on ``directory/bus.sock``.

    Use as ``async with PrivateBus(directory) as bus: ... bus.address``. The directory is created
    if needed; the configuration file (``bus.conf``) and the socket are removed on exit.

    :param directory: where the socket and the config file live (a state or temp directory).
    :param allow_users: user names besides the daemon's own user that may connect (QEMU may run
        as another user than the sidecar). By default only the same user can.
    :param start_timeout: seconds for the daemon to print its address.
    """

    def __init__(self, directory: Path, *, allow_users: Sequence[str] = (), start_timeout: float = 10.0) -> None:
        self.directory = directory
        self.socket_path = directory / "bus.sock"
        self.config_path = directory / "bus.conf"
        self.pid_path = directory / "bus.pid"
        self.allow_users = tuple(allow_users)
        self.start_timeout = start_timeout
        self._process: asyncio.subprocess.Process | None = None
        self._address: str | None = None
        self._stderr: asyncio.Task[bytes] | None = None

    @property
    def address(self) -> str:
        """The address the daemon printed (``unix:path=...,guid=...``), for clients and for QEMU."""
        if self._address is None:
            raise VmstateError("the private D-Bus daemon is not running")
        return self._address

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> str:
        """Start the daemon and return its address.

        :raise VmstateError: ``dbus-daemon`` is missing, the socket path is too long, or the daemon
            exited or said nothing within ``start_timeout`` (its stderr is in the message).
        """
        if self._process is not None:
            raise VmstateError("this private D-Bus daemon was already started")
        binary = shutil.which(DBUS_DAEMON)
        if binary is None:
            raise VmstateError(f"{DBUS_DAEMON} not found on PATH (Debian package dbus)")
        if len(os.fsencode(self.socket_path)) > _UNIX_PATH_MAX:
            raise VmstateError(f"bus socket path is too long for a unix socket: {self.socket_path}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stop_orphan()
        try:
            self.socket_path.unlink()  # a daemon killed earlier leaves its socket; bind would fail
        except FileNotFoundError:
            pass
        except OSError as err:
            raise VmstateError(f"cannot remove {self.socket_path} to make room for the bus socket: {err}") from err
        self.config_path.write_text(_config(self.socket_path, self.allow_users))
        self._process = await asyncio.create_subprocess_exec(
            binary, f"--config-file={self.config_path}", "--nofork", "--nopidfile", "--print-address=1",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C meant for the sidecar must not kill the bus under QEMU
        )  # fmt: skip
        assert self._process.stdout is not None and self._process.stderr is not None
        self._stderr = asyncio.create_task(self._process.stderr.read(), name="qmp-sdei.vmstate.bus-stderr")
        try:
            line = await asyncio.wait_for(self._process.stdout.readline(), self.start_timeout)
        except TimeoutError:
            await self.stop()
            raise VmstateError(f"{DBUS_DAEMON} printed no address within {self.start_timeout}s") from None
        address = line.decode(errors="replace").strip()
        if not address:
            why = await self._stderr_text()  # the daemon exited: its stderr is complete
            await self.stop()
            raise VmstateError(f"{DBUS_DAEMON} failed to start: {why}")
        self._address = address
        try:
            self.pid_path.write_text(f"{self._process.pid}\n")
        except OSError as err:
            log.warning("could not record the bus daemon's pid in %s: %s", self.pid_path, err)
        log.info("private D-Bus daemon (pid %d) at %s", self._process.pid, address)
        return address

    def _stop_orphan(self) -> None:
        """Stop a daemon a killed sidecar left behind on this directory (it runs in its own session).

        Only a process whose command line names this directory's config file is signalled, so a
        recycled pid is left alone.
        """
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if f"--config-file={self.config_path}".encode() in cmdline.split(b"\0"):
            log.warning("stopping the private D-Bus daemon (pid %d) a previous sidecar left running", pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)

    async def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            return (await asyncio.wait_for(self._stderr, 5.0)).decode(errors="replace").strip()
        return ""

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the daemon (idempotent) and remove its socket and config file."""
        process, self._process, self._address = self._process, None, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._stderr is not None:
            self._stderr.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._stderr
            self._stderr = None
        for path in (self.socket_path, self.config_path, self.pid_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def __aenter__(self) -> PrivateBus:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
